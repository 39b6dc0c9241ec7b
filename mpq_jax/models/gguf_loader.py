"""Read a llama.cpp GGUF file into our params layout (dequantized to float32).

The GGUF stores llama.cpp's tensor names and, for Llama, q/k rows permuted so that RoPE's
rotated pairs are interleaved; we map the names back to Hugging Face's and undo that
permutation, so the decoder needs no GGUF-specific path. The architecture comes from the
GGUF metadata (`llama.*` keys), the tokenizer from its `tokenizer.ggml.*` keys through
transformers.

Not for: writing GGUF, or architectures other than Llama/Qwen2/Qwen3.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from mpq_jax.errors import CheckpointError, UnsupportedArchitectureError
from mpq_jax.models.spec import ModelSpec, spec_from_hf_config

log = logging.getLogger(__name__)

_GGUF_ARCH_TO_HF = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# llama.cpp's block tensor names -> ours (HF names without the `model.` prefix).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_config_from_gguf(reader, path: Path) -> dict[str, Any]:
    """The transformers-style config dict implied by a GGUF file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_ARCH_TO_HF:
        raise UnsupportedArchitectureError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(_GGUF_ARCH_TO_HF)}"
        )

    def key(name: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{name}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks '{arch}.{name}'; the file is incomplete")
        return value

    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise CheckpointError(f"{path}: GGUF has no 'token_embd.weight' tensor")
    # llama.cpp stores Llama-3.1's rope scaling as a per-frequency `rope_freqs` tensor, and
    # other schemes under `rope.scaling.*`; only plain linear scaling maps onto our spec.
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UnsupportedArchitectureError(
            f"{path}: GGUF rope frequency factors (rope_freqs, Llama-3.1 style) are not supported; "
            "load the model's Hugging Face directory instead"
        )
    scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise UnsupportedArchitectureError(
            f"{path}: GGUF rope scaling '{scaling_type}' is not supported (supported: none, linear); "
            "load the model's Hugging Face directory instead"
        )
    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    config = {
        "architectures": [_GGUF_ARCH_TO_HF[arch]],
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", int(embed.shape[-1]))),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length")),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if scaling_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    if arch == "llama" and any(t.name.endswith("attn_q.bias") for t in reader.tensors):
        config["attention_bias"] = True
    return config


# Special tokens named by id in GGUF metadata -> tokenizer attribute.
_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def gguf_tokenizer(path: Path):
    """The tokenizer a GGUF's `tokenizer.ggml.*` metadata describes, as a transformers fast tokenizer.

    transformers' `AutoTokenizer.from_pretrained(..., gguf_file=)` reads the metadata with a
    reader that imports torch; we read it with the `gguf` package instead and hand it to
    transformers' own converter, so the result is the same tokenizer without needing torch.
    """
    from transformers import PreTrainedTokenizerFast
    try:  # transformers >= 5.2x keeps the GGUF helpers here ...
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:  # ... older releases (e.g. the 5.17 the compare extra pins) in ggml.py
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    reader = open_gguf(path)
    metadata = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in metadata:
        raise CheckpointError(f"{path}: GGUF has no tokenizer metadata (tokenizer.ggml.tokens)")
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(_field(reader, "general.architecture"), tokenizer_dict)
    # Older converters also return special tokens; the file's own ids win where it has them.
    kwargs = {**extra, **{k: v for k, v in tokenizer_config.items() if v is not None or k not in extra}}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def unpermute_qk_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. w: [heads * head_dim, in] (or [heads*head_dim]).

    llama.cpp reorders each head's rows from (two halves of head_dim) to (pairs interleaved);
    reading rows as [heads, head_dim/2, 2] and swapping the last two axes restores the halves.
    """
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _our_name(gguf_name: str) -> str | None:
    match = _BLOCK_RE.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        mapped = _BLOCK_NAMES.get(part)
        return None if mapped is None else f"layers.{layer}.{mapped}.{kind}"
    stem, _, kind = gguf_name.rpartition(".")
    mapped = _GLOBAL_NAMES.get(stem)
    return None if mapped is None else f"{mapped}.{kind}"


GGUF_MAGIC = b"GGUF"


def open_gguf(path: Path):
    """gguf.GGUFReader over `path` (memory-mapped: tensors are read when used).

    The reader fails on a cut-short file with numpy's words ("cannot reshape array of size
    399424 into shape (576,960)"): say instead what is wrong with the file and what to do.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r})")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # bare ValueError/IndexError from numpy views past the end of the file
        raise CheckpointError(
            f"{path}: the GGUF file is truncated or damaged ({path.stat().st_size} bytes; its header or tensor "
            f"table points past what is there: {type(exc).__name__}: {exc}); copy or download it again"
        ) from exc


def read_gguf_config(path: Path) -> tuple[ModelSpec, dict[str, Any]]:
    """(spec, HF-style config) from a GGUF's metadata alone, without reading its tensors."""
    config = hf_config_from_gguf(open_gguf(path), path)
    return spec_from_hf_config(config, source=str(path)), config


def load_gguf(path: Path) -> tuple[dict[str, np.ndarray], ModelSpec, dict[str, Any]]:
    """Returns (flat float32 tensors by our dotted names, spec, HF-style config dict)."""
    import gguf

    path = Path(path)
    reader = open_gguf(path)
    config = hf_config_from_gguf(reader, path)
    spec = spec_from_hf_config(config, source=str(path))
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _our_name(tensor.name)
        if name is None:
            log.warning("%s: ignoring unknown GGUF tensor %s", path, tensor.name)
            continue
        weight = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if spec.family == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = unpermute_qk_rows(weight, spec.num_heads)
        elif spec.family == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = unpermute_qk_rows(weight, spec.num_kv_heads)
        tensors[name] = weight
    return tensors, spec, config
