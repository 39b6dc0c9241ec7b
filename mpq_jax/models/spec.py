"""Architecture description of a decoder-only checkpoint, read from a Hugging Face config.

`ModelSpec` is the one place that says what shapes a model has and which optional pieces
(q/k/v biases, q/k RMSNorm, rope scaling, tied embeddings) it uses. It is built from a
`config.json` dict (both the transformers 4.x keys `rope_theta`/`rope_scaling` and the 5.x
key `rope_parameters` are understood) or from GGUF metadata (see `gguf_loader.py`).

Not for: loading tensors (see `checkpoint.py`) or running the model (see `decoder.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mpq_jax.errors import ConfigError, UnsupportedArchitectureError

# HF `architectures[0]` -> our family name. Each family's differences from Llama are few:
# Qwen2 adds biases to q/k/v; Qwen3 adds a per-head RMSNorm on q and k.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# The linear layers of one decoder block, by their checkpoint names. Quantizers act on these
# (never on the embedding or the LM head).
BLOCK_LINEARS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Rotary-embedding frequency rescaling (Llama-3.1 `llama3` or plain `linear`)."""

    rope_type: str  # one of SUPPORTED_ROPE_TYPES other than "default"
    factor: float  # context extension factor
    # Only for `llama3`: wavelengths longer than original/low_freq_factor are divided by
    # `factor`, shorter than original/high_freq_factor are kept, and in between interpolated.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Shapes and options of a Llama/Qwen2/Qwen3 decoder. Hashable, so jit can treat it as static."""

    family: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads means grouped-query attention
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool  # True: the LM head is the embedding matrix
    attention_bias: bool  # Llama: bias on q/k/v/o; Qwen2: always on q/k/v, never on o
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def linear_has_bias(self, module: str, name: str) -> bool:
        if module == "mlp":
            return self.mlp_bias
        if self.family == "qwen2":
            return name != "o_proj"
        return self.attention_bias

    def linear_shape(self, module: str, name: str) -> tuple[int, int]:
        """[out, in] of a block linear, as stored in the checkpoint."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (q, d),
            "k_proj": (kv, d),
            "v_proj": (kv, d),
            "o_proj": (d, q),
            "gate_proj": (f, d),
            "up_proj": (f, d),
            "down_proj": (d, f),
        }[name]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the checkpoint must hold, by dotted name (without the `model.` prefix)."""
        shapes: dict[str, tuple[int, ...]] = {
            "embed_tokens.weight": (self.vocab_size, self.hidden_size),
            "norm.weight": (self.hidden_size,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        for i in range(self.num_layers):
            p = f"layers.{i}."
            shapes[p + "input_layernorm.weight"] = (self.hidden_size,)
            shapes[p + "post_attention_layernorm.weight"] = (self.hidden_size,)
            if self.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (self.head_dim,)
                shapes[p + "self_attn.k_norm.weight"] = (self.head_dim,)
            for module, name in BLOCK_LINEARS:
                out_f, in_f = self.linear_shape(module, name)
                shapes[f"{p}{module}.{name}.weight"] = (out_f, in_f)
                if self.linear_has_bias(module, name):
                    shapes[f"{p}{module}.{name}.bias"] = (out_f,)
        return shapes


def _require(config: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in config:
        raise ConfigError(f"{source}: missing field '{key}' needed to build the model")
    return config[key]


def _rope_settings(config: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    # transformers 5 folds theta and scaling into `rope_parameters`; 4.x keeps them apart.
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    conflicts = sorted(key for key in set(params) & set(scaling) if params[key] != scaling[key])
    if conflicts:
        raise ConfigError(
            f"{source}: rope_parameters and rope_scaling disagree on {', '.join(conflicts)}; keep one of them"
        )
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type '{rope_type}' is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    scaling_obj = RopeScaling(
        rope_type=rope_type,
        factor=float(_require(merged, "factor", f"{source} rope_scaling")),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            merged.get("original_max_position_embeddings", config.get("max_position_embeddings", 8192))
        ),
    )
    return float(theta), scaling_obj


def spec_from_hf_config(config: Mapping[str, Any], source: str = "config.json") -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config dict; `source` names it in error messages."""
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else None
    if arch is None:
        # Configs written without `architectures` still carry `model_type`.
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(
            config.get("model_type", "")
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {arch or config.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    hidden = int(_require(config, "hidden_size", source))
    heads = int(_require(config, "num_attention_heads", source))
    head_dim = config.get("head_dim") or hidden // heads
    theta, scaling = _rope_settings(config, source)
    eos = config.get("eos_token_id")
    return ModelSpec(
        family=family,
        vocab_size=int(_require(config, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_require(config, "intermediate_size", source)),
        num_layers=int(_require(config, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """JSON-ready form, stored in packed checkpoints' manifests."""
    return dataclasses.asdict(spec)


def spec_from_dict(data: Mapping[str, Any]) -> ModelSpec:
    data = dict(data)
    if data.get("rope_scaling") is not None:
        data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
    return ModelSpec(**data)
