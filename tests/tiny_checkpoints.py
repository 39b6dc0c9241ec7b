"""Tiny random Llama / Qwen2 / Qwen3 checkpoints written by transformers itself.

Shared by the parity, loading-error, perplexity and CLI tests. Needs torch (test extra);
importing this module skips the importing test module when torch is absent.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=False),
    "llama-tied-bias": lambda: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True, attention_bias=True, mlp_bias=True
    ),
    "llama3.1-rope": lambda: transformers.LlamaConfig(
        **COMMON,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False),
}
MODEL_CLASSES = {
    "LlamaConfig": transformers.LlamaForCausalLM,
    "Qwen2Config": transformers.Qwen2ForCausalLM,
    "Qwen3Config": transformers.Qwen3ForCausalLM,
}


def write_tiny_checkpoint(family: str, directory, sharded: bool, seed: int = 0, **overrides):
    """A randomly initialised transformers model saved to `directory`; returns the torch model.

    `overrides` replace config fields (e.g. a real tokenizer's `vocab_size`).
    """
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = MODEL_CLASSES[type(config).__name__](config).eval()
    with torch.no_grad():
        # transformers initialises biases to 0 and norms to 1; randomise them so a dropped
        # bias or norm would show.
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.save_pretrained(directory, max_shard_size="40KB" if sharded else "10GB")
    return model


def write_tiny_checkpoint_with_real_tokenizer(family: str, directory, sharded: bool = False, **overrides):
    """A tiny checkpoint of `family` that runs the text pipelines (calibration, WikiText-2):
    the default model's tokenizer saved beside it, and a vocabulary to match."""
    from mpq_jax.models.checkpoint import default_model_path, load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    write_tiny_checkpoint(family, directory, sharded, vocab_size=len(tokenizer), **overrides)
    tokenizer.save_pretrained(str(directory))
