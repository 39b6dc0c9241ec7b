"""Text generation with a KV cache: a jitted prefill and a jitted one-token decode step.

The blocks are the decoder's own (`mpq_jax.models.decoder`): the same norms, RoPE and
`linear`, so every QuantizedLinear goes through the kernel dispatch (Pallas kernels on
GPU/TPU, the jnp reference on CPU). Only attention differs: keys and values are written
into a fixed-size cache [B, max_len, KV, hd] at the current position and queries attend to
every cached position up to their own (positions beyond are masked), so one compiled decode
step serves the whole generation.

The prompt is right-padded to a multiple of PROMPT_BUCKET tokens, so prompts of nearby
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


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, start: jax.Array) -> jax.Array:
    """q [B, T, H, hd] at positions start..start+T-1 over the cache [B, S, KV, hd] -> [B, T, H, hd]."""
    batch, seq, heads, hd = q.shape
    kv_heads = k_cache.shape[2]
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_cache, preferred_element_type=jnp.float32) * (hd**-0.5)
    query_pos = start + jnp.arange(seq)
    visible = jnp.arange(k_cache.shape[1])[None, :] <= query_pos[:, None]  # [T, S]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq, heads, hd).astype(q.dtype)


def block_step(layer: dict, spec: ModelSpec, h: jax.Array, cos, sin, cache: dict, start) -> tuple[jax.Array, dict]:
    """One block over new positions [start, start + T), reading and extending its cache."""
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
    at = (0, start, 0, 0)
    cache = {
        "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at),
        "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at),
    }
    context = cached_attention(q, cache["k"], cache["v"], start).reshape(batch, seq, -1)
    h = h + linear(p["o_proj"], context)
    x = rms_norm(h, layer["post_attention_layernorm"]["weight"], spec.rms_norm_eps)
    return h + mlp(layer["mlp"], x)[0], cache


@functools.partial(jax.jit, static_argnames="spec", donate_argnames="cache")
def model_step(params: dict, spec: ModelSpec, tokens: jax.Array, cache: list[dict], start, last) -> tuple[jax.Array, list]:
    """tokens [B, T] at positions start.. -> (float32 logits [B, V] at index `last`, new cache)."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(spec))
    cos, sin = rope_tables(inv_freq, start + jnp.arange(tokens.shape[1]))
    h = params["embed_tokens"]["weight"][tokens]
    new_cache = []
    for layer, layer_cache in zip(params["layers"], cache):
        h, layer_cache = block_step(layer, spec, h, cos, sin, layer_cache, start)
        new_cache.append(layer_cache)
    h_last = jax.lax.dynamic_index_in_dim(h, last, axis=1, keepdims=False)  # [B, D]
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


def generate(
    params: dict,
    spec: ModelSpec,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    eos_ids: Sequence[int] = (),
    seed: int = 0,
    prompt_len: int | None = None,
    cache_len: int | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt`, stopping after an EOS id.

    `prompt_len` (padded prompt length, default: the next multiple of PROMPT_BUCKET) and
    `cache_len` (default: padded prompt + max_new_tokens) fix the compiled shapes; callers
    that generate for many prompts (the lm-eval model) pass a few fixed values so that the
    prefill and the decode step compile once per bucket instead of once per prompt length.
    """
    prompt = np.asarray(prompt, dtype=np.int32)
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("prompt: need a non-empty 1-D sequence of token ids")
    if max_new_tokens < 1:
        return
    bucket = prompt_len or -(-prompt.size // PROMPT_BUCKET) * PROMPT_BUCKET
    max_len = cache_len or bucket + max_new_tokens
    if bucket < prompt.size or max_len < max(bucket, prompt.size + max_new_tokens):
        raise ValueError(
            f"generate: prompt_len={bucket} / cache_len={max_len} too small for a {prompt.size}-token prompt "
            f"and {max_new_tokens} new tokens"
        )
    padded = np.zeros((1, bucket), np.int32)
    padded[0, : prompt.size] = prompt
    cache = init_cache(spec, 1, max_len, params["embed_tokens"]["weight"].dtype)
    key = jax.random.PRNGKey(seed)
    logits, cache = model_step(params, spec, jnp.asarray(padded), cache, jnp.int32(0), jnp.int32(prompt.size - 1))
    position = prompt.size
    eos = set(int(t) for t in eos_ids)
    for step in range(max_new_tokens):
        key, subkey = jax.random.split(key)
        token = int(choose_token(logits, sampling, subkey)[0])
        yield token
        if token in eos or step == max_new_tokens - 1:
            return
        logits, cache = model_step(
            params, spec, jnp.asarray([[token]], jnp.int32), cache, jnp.int32(position), jnp.int32(0)
        )
        position += 1
