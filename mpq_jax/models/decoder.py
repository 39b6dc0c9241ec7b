"""The Llama / Qwen2 / Qwen3 decoder as pure functions over a params pytree.

The params pytree mirrors the Hugging Face checkpoint names with the `model.` prefix dropped:

    {"embed_tokens": {"weight": [V, D]},
     "layers": [{"input_layernorm": {"weight": [D]},
                 "self_attn": {"q_proj": LINEAR, "k_proj": LINEAR, "v_proj": LINEAR,
                               "o_proj": LINEAR, ("q_norm", "k_norm": {"weight": [hd]})},
                 "post_attention_layernorm": {"weight": [D]},
                 "mlp": {"gate_proj": LINEAR, "up_proj": LINEAR, "down_proj": LINEAR}}, ...],
     "norm": {"weight": [D]},
     ("lm_head": {"weight": [V, D]})}        # absent when the embeddings are tied

where LINEAR is either a dense `{"weight": [out, in], ("bias": [out])}` or a
`QuantizedLinear`, so a quantized model runs through the same code.

Activations run in the params' dtype (float32 or bfloat16); RMSNorm statistics, RoPE
angles and the attention softmax are always float32, as transformers does.

The full forward is a Python loop over blocks, each a call to one jitted block function:
the block compiles once and is reused by every layer of the same structure, which keeps
compile time small on CPU, and lets quantization stages run one block at a time.

Not for: loading weights (`checkpoint.py`), generation with a KV cache, or sharding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mpq_jax.models.spec import ModelSpec
from mpq_jax.packed.qlinear import QuantizedLinear
from mpq_jax.qat.trainable import TrainableLinear
from pallas_kernels.dispatch import quantized_matmul

Params = dict


def rope_inverse_frequencies(spec: ModelSpec) -> np.ndarray:
    """[head_dim // 2] float32 rotation frequencies, with Llama-3.1 / linear rescaling applied.

    Computed in float32 like transformers, so that angles at long positions match it bit for
    bit rather than drifting by float64-vs-float32 rounding.
    """
    dim = spec.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(spec.rope_theta) ** exponents)).astype(np.float32)
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (Llama 3.1 model card / transformers' `_compute_llama3_parameters`).
    old_context = np.float32(scaling.original_max_position_embeddings)
    low_wavelen = old_context / np.float32(scaling.low_freq_factor)
    high_wavelen = old_context / np.float32(scaling.high_freq_factor)
    wavelen = np.float32(2 * np.pi) / inv_freq
    slowed = np.where(wavelen > low_wavelen, inv_freq / np.float32(scaling.factor), inv_freq)
    smooth = (old_context / wavelen - np.float32(scaling.low_freq_factor)) / np.float32(
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * slowed / np.float32(scaling.factor) + smooth * slowed
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(in_band, blended, slowed).astype(np.float32)


def rope_tables(inv_freq: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [T, head_dim] for positions [T] (halves duplicated, transformers' layout)."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, heads, head_dim]; rotates the two halves of head_dim (not interleaved pairs).

    cos, sin: [T, head_dim] shared by every row, or [B, T, head_dim] per row."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def linear(layer, x: jax.Array) -> jax.Array:
    """x: [..., in] -> [..., out] through a dense `{"weight", "bias"?}` or a QuantizedLinear.

    A QuantizedLinear goes through the kernel dispatch: the Pallas kernel of the backend on
    GPU/TPU, the plain-jnp reference on CPU. A TrainableLinear (QAT) fake-quantizes its
    master weights through the straight-through estimator.
    """
    if isinstance(layer, QuantizedLinear):
        return quantized_matmul(x, layer)
    if isinstance(layer, TrainableLinear):
        return layer.apply(x)
    y = x @ layer["weight"].T
    if "bias" in layer:
        y = y + layer["bias"]
    return y


# Query rows per attention chunk. Chunking skips the fully masked upper triangle (about half
# of the work at 2048 tokens) and keeps the float32 score block small; 256 was fastest on a
# 2-core CPU among 128/256/512/unchunked.
ATTENTION_CHUNK = 256


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q kᵀ / sqrt(hd) + causal mask) v, grouped-query.

    q: [B, T, H, hd]; k, v: [B, T, KV, hd] with H a multiple of KV -> [B, T, H, hd].
    Query heads sharing a key/value head are grouped, so k and v are never repeated.
    """
    batch, seq, heads, hd = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    q = q.reshape(batch, seq, kv_heads, group, hd).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, hd]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, hd]
    outputs = []
    for start in range(0, seq, ATTENTION_CHUNK):
        stop = min(start + ATTENTION_CHUNK, seq)  # queries [start, stop) see keys [0, stop)
        scores = jnp.einsum(
            "bkgtd,bksd->bkgts", q[:, :, :, start:stop], k[:, :, :stop], preferred_element_type=jnp.float32
        ) * (hd**-0.5)
        visible = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]
        scores = jnp.where(visible, scores, -jnp.inf)
        # Softmax with the division moved after the PV product: dividing [.., hd] outputs
        # instead of [.., keys] probabilities saves a pass over the score block (~25% of
        # attention time on CPU); the row max keeps exp in range as usual.
        unnormalized = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        denominator = jnp.sum(unnormalized, axis=-1, keepdims=True)
        out = jnp.einsum("bkgts,bksd->bkgtd", unnormalized.astype(v.dtype), v[:, :, :stop], preferred_element_type=jnp.float32)
        outputs.append((out / denominator).astype(v.dtype))
    out = jnp.concatenate(outputs, axis=3)  # [B, KV, G, T, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, hd)


def attention(p: Params, spec: ModelSpec, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Causal grouped-query self-attention. x: [B, T, D] -> (output [B, T, D], o_proj input [B, T, H*hd])."""
    batch, seq, _ = x.shape
    hd, kv_heads = spec.head_dim, spec.num_kv_heads
    q = linear(p["q_proj"], x).reshape(batch, seq, spec.num_heads, hd)
    k = linear(p["k_proj"], x).reshape(batch, seq, kv_heads, hd)
    v = linear(p["v_proj"], x).reshape(batch, seq, kv_heads, hd)
    if spec.qk_norm:
        q = rms_norm(q, p["q_norm"]["weight"], spec.rms_norm_eps)
        k = rms_norm(k, p["k_norm"]["weight"], spec.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    context = causal_attention(q, k, v).reshape(batch, seq, spec.num_heads * hd)
    return linear(p["o_proj"], context), context


def mlp(p: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SwiGLU: down(silu(gate(x)) * up(x)). Returns (output, down_proj input)."""
    hidden = jax.nn.silu(linear(p["gate_proj"], x)) * linear(p["up_proj"], x)
    return linear(p["down_proj"], hidden), hidden


# The four distinct inputs of a block's seven linears (q/k/v share one, gate/up share one),
# by the name of what feeds them. Quantizers' Hessians are built from these.
LINEAR_INPUTS = ("attn_in", "o_proj_in", "mlp_in", "down_proj_in")
LINEAR_INPUT_OF = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "o_proj_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "down_proj_in",
}


def block_forward(layer: Params, spec: ModelSpec, h: jax.Array, cos: jax.Array, sin: jax.Array):
    """One pre-norm residual block. h: [B, T, D] -> (h' [B, T, D], {LINEAR_INPUTS name: array})."""
    attn_in = rms_norm(h, layer["input_layernorm"]["weight"], spec.rms_norm_eps)
    attn_out, o_proj_in = attention(layer["self_attn"], spec, attn_in, cos, sin)
    h = h + attn_out
    mlp_in = rms_norm(h, layer["post_attention_layernorm"]["weight"], spec.rms_norm_eps)
    mlp_out, down_proj_in = mlp(layer["mlp"], mlp_in)
    inputs = {"attn_in": attn_in, "o_proj_in": o_proj_in, "mlp_in": mlp_in, "down_proj_in": down_proj_in}
    return h + mlp_out, inputs


@functools.partial(jax.jit, static_argnames="spec")
def decoder_block(layer: Params, spec: ModelSpec, h: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """One block's output only (XLA drops the unused linear inputs)."""
    return block_forward(layer, spec, h, cos, sin)[0]


def lm_head_weight(params: Params, spec: ModelSpec) -> jax.Array:
    return params["embed_tokens"]["weight"] if spec.tie_word_embeddings else params["lm_head"]["weight"]


@jax.jit
def _embed(embedding: jax.Array, tokens: jax.Array, inv_freq: jax.Array):
    """Token embeddings [B, T, D] and the RoPE tables for positions 0..T-1."""
    cos, sin = rope_tables(inv_freq, jnp.arange(tokens.shape[1]))
    return embedding[tokens], cos, sin


def final_hidden(params: Params, spec: ModelSpec, tokens: jax.Array) -> jax.Array:
    """tokens: [B, T] int -> final-normed hidden states [B, T, D]."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(spec))
    h, cos, sin = _embed(params["embed_tokens"]["weight"], tokens, inv_freq)
    for layer in params["layers"]:
        h = decoder_block(layer, spec, h, cos, sin)
    return rms_norm(h, params["norm"]["weight"], spec.rms_norm_eps)


def forward(params: Params, spec: ModelSpec, tokens: jax.Array) -> jax.Array:
    """tokens: [B, T] int -> logits [B, T, V] in float32."""
    h = final_hidden(params, spec, tokens)
    return (h @ lm_head_weight(params, spec).T).astype(jnp.float32)


# Tokens per LM-head chunk in `target_log_probs`: logits are reduced [chunk, V] at a time
# instead of materializing all [T, V] (400 MB at T=2048, V=49k); measured ~15% faster on CPU.
HEAD_CHUNK = 256


def target_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(targets[b, t] | hidden[b, t]) and whether it is the argmax, both [B, T].

    hidden: [B, T, D] final-normed states; head: [V, D]; targets: [B, T]. The LM head is
    applied HEAD_CHUNK positions at a time, so float32 logits never exist for all [T, V] at
    once. Call it inside a jitted function: XLA then drops whichever output is unused.
    """
    log_probs, greedy = [], []
    for start in range(0, hidden.shape[1], HEAD_CHUNK):
        logits = (hidden[:, start : start + HEAD_CHUNK] @ head.T).astype(jnp.float32)
        chunk_targets = targets[:, start : start + HEAD_CHUNK]
        target = jnp.take_along_axis(logits, chunk_targets[..., None], axis=-1)[..., 0]
        log_probs.append(target - jax.nn.logsumexp(logits, axis=-1))
        greedy.append(jnp.argmax(logits, axis=-1) == chunk_targets)
    return jnp.concatenate(log_probs, axis=1), jnp.concatenate(greedy, axis=1)


@jax.jit
def next_token_nll(hidden: jax.Array, head: jax.Array, tokens: jax.Array) -> jax.Array:
    """Summed negative log-likelihood of tokens[:, 1:] given hidden[:, :-1]. Returns [B] float32.

    hidden: [B, T, D] final-normed states; head: [V, D]; tokens: [B, T].
    """
    log_probs, _ = target_log_probs(hidden[:, :-1], head, tokens[:, 1:])
    return -jnp.sum(log_probs, axis=-1)
