"""Text generation with a KV cache: a jitted prefill and a jitted one-token decode step.

The blocks are the decoder's own (`mpq_jax.models.decoder`): the same norms, RoPE and
`linear`, so every QuantizedLinear goes through the kernel dispatch (Pallas kernels on
GPU/TPU, the jnp reference on CPU). Only attention differs: keys and values are written
into a fixed-size cache [B, max_len, KV, hd] at each row's current position and queries
attend to every cached position up to their own (positions beyond are masked), so one
compiled decode step serves the whole generation, and rows of one batch may sit at
different positions (prompts of different lengths generating side by side).

Prompts are right-padded to a multiple of PROMPT_BUCKET tokens, so prompts of nearby
lengths share one compiled prefill; the padded positions are masked from the real ones and
overwritten by the decode steps that follow.

Not here: the command line (mpq_jax.generate) or perplexity (mpq_jax.eval).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mpq_jax.models.decoder import apply_rope, linear, lm_head_weight, mlp, rms_norm, rope_inverse_frequencies, rope_tables
from mpq_jax.models.spec import ModelSpec

PROMPT_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; otherwise softmax(logits / temperature), optionally cut to the
    `top_k` most likely tokens and/or the smallest set whose probability reaches `top_p`."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no cut
    top_p: float = 1.0  # 1 = no cut

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling: need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self}")


def init_cache(spec: ModelSpec, batch: int, max_len: int, dtype) -> list[dict]:
    """Zeroed keys and values [B, max_len, KV, hd] for every layer."""
    shape = (batch, max_len, spec.num_kv_heads, spec.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(spec.num_layers)]


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, starts: jax.Array) -> jax.Array:
    """q [B, T, H, hd] at positions starts[b]..starts[b]+T-1 over the cache [B, S, KV, hd] -> [B, T, H, hd]."""
    batch, seq, heads, hd = q.shape
    kv_heads = k_cache.shape[2]
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_cache, preferred_element_type=jnp.float32) * (hd**-0.5)
    query_pos = starts[:, None] + jnp.arange(seq)[None, :]  # [B, T]
    visible = jnp.arange(k_cache.shape[1])[None, None, :] <= query_pos[:, :, None]  # [B, T, S]
    probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq, heads, hd).astype(q.dtype)


def _write_rows(cache: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """cache [B, S, KV, hd] with new [B, T, KV, hd] written at row b's positions starts[b].."""
    write = lambda row, update, start: jax.lax.dynamic_update_slice(row, update, (start, 0, 0))  # noqa: E731
    return jax.vmap(write)(cache, new.astype(cache.dtype), starts)


def block_step(layer: dict, spec: ModelSpec, h: jax.Array, cos, sin, cache: dict, starts) -> tuple[jax.Array, dict]:
    """One block over each row's new positions [starts[b], starts[b] + T), reading and extending its cache."""
    batch, seq, _ = h.shape
    p = layer["self_attn"]
    x = rms_norm(h, layer["input_layernorm"]["weight"], spec.rms_norm_eps)
    q = linear(p["q_proj"], x).reshape(batch, seq, spec.num_heads, spec.head_dim)
    k = linear(p["k_proj"], x).reshape(batch, seq, spec.num_kv_heads, spec.head_dim)
    v = linear(p["v_proj"], x).reshape(batch, seq, spec.num_kv_heads, spec.head_dim)
    if spec.qk_norm:
        q = rms_norm(q, p["q_norm"]["weight"], spec.rms_norm_eps)
        k = rms_norm(k, p["k_norm"]["weight"], spec.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache = {"k": _write_rows(cache["k"], k, starts), "v": _write_rows(cache["v"], v, starts)}
    context = cached_attention(q, cache["k"], cache["v"], starts).reshape(batch, seq, -1)
    h = h + linear(p["o_proj"], context)
    x = rms_norm(h, layer["post_attention_layernorm"]["weight"], spec.rms_norm_eps)
    return h + mlp(layer["mlp"], x)[0], cache


@functools.partial(jax.jit, static_argnames="spec", donate_argnames="cache")
def model_step(params: dict, spec: ModelSpec, tokens: jax.Array, cache: list[dict], start, last) -> tuple[jax.Array, list]:
    """tokens [B, T] at positions start.. -> (float32 logits [B, V] at index `last`, new cache).

    `start` and `last` are one number for every row or one per row ([B]): rows of a batch may
    be at different positions (prompts of different lengths generating side by side).
    """
    batch, seq = tokens.shape
    starts = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (batch,))
    lasts = jnp.broadcast_to(jnp.asarray(last, jnp.int32), (batch,))
    inv_freq = jnp.asarray(rope_inverse_frequencies(spec))
    positions = starts[:, None] + jnp.arange(seq)[None, :]  # [B, T]
    cos, sin = rope_tables(inv_freq, positions.reshape(-1))
    cos, sin = cos.reshape(batch, seq, -1), sin.reshape(batch, seq, -1)
    h = params["embed_tokens"]["weight"][tokens]
    new_cache = []
    for layer, layer_cache in zip(params["layers"], cache):
        h, layer_cache = block_step(layer, spec, h, cos, sin, layer_cache, starts)
        new_cache.append(layer_cache)
    h_last = jnp.take_along_axis(h, lasts[:, None, None], axis=1)[:, 0]  # [B, D]
    h_last = rms_norm(h_last, params["norm"]["weight"], spec.rms_norm_eps)
    return (h_last @ lm_head_weight(params, spec).T).astype(jnp.float32), new_cache


def choose_token(logits: jax.Array, sampling: SamplingConfig, key) -> jax.Array:
    """[B, V] float32 logits -> [B] int32 token ids."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # The smallest prefix reaching top_p: keep tokens whose preceding mass is below it.
        keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate_steps(
    params: dict,
    spec: ModelSpec,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    prompt_len: int | None = None,
    cache_len: int | None = None,
) -> Iterator[np.ndarray]:
    """Generate after several prompts side by side: yields each step's new token ids [len(prompts)].

    Prompts are right-padded to `prompt_len` (default: the longest, rounded up to a multiple
    of PROMPT_BUCKET) and each row then decodes at its own position, so prompts of different
    lengths share every forward pass (one read of the weights per step for the whole batch).
    `cache_len` (default: padded prompt + max_new_tokens) fixes the cache: callers that
    generate for many prompts pass a few fixed values, so that the prefill and the decode
    step compile once per bucket. The caller stops early by closing the generator (EOS, stop
    strings); at most `max_new_tokens` steps are yielded.
    """
    prompts = [np.asarray(prompt, dtype=np.int32) for prompt in prompts]
    if not prompts or any(prompt.ndim != 1 or prompt.size == 0 for prompt in prompts):
        raise ValueError("prompts: need one or more non-empty 1-D sequences of token ids")
    if max_new_tokens < 1:
        return
    longest = max(prompt.size for prompt in prompts)
    bucket = prompt_len or -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    max_len = cache_len or bucket + max_new_tokens
    if bucket < longest or max_len < max(bucket, longest + max_new_tokens):
        raise ValueError(
            f"generate: prompt_len={bucket} / cache_len={max_len} too small for "
            f"prompts of up to {longest} tokens and {max_new_tokens} new tokens"
        )
    padded = np.zeros((len(prompts), bucket), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, : prompt.size] = prompt
    lengths = np.asarray([prompt.size for prompt in prompts], np.int32)
    cache = init_cache(spec, len(prompts), max_len, params["embed_tokens"]["weight"].dtype)
    key = jax.random.PRNGKey(seed)
    logits, cache = model_step(params, spec, jnp.asarray(padded), cache, jnp.int32(0), jnp.asarray(lengths - 1))
    for step in range(max_new_tokens):
        key, subkey = jax.random.split(key)
        tokens = choose_token(logits, sampling, subkey)
        yield np.asarray(tokens)
        if step == max_new_tokens - 1:
            return
        # The token just chosen sits at each row's next position: prompt length + step.
        logits, cache = model_step(params, spec, tokens[:, None], cache, jnp.asarray(lengths + step), jnp.int32(0))


def generate(
    params: dict,
    spec: ModelSpec,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    eos_ids: Sequence[int] = (),
    seed: int = 0,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt`, stopping after an EOS id."""
    eos = set(int(t) for t in eos_ids)
    for tokens in generate_steps(params, spec, [prompt], max_new_tokens, sampling=sampling, seed=seed):
        token = int(tokens[0])
        yield token
        if token in eos:
            return
