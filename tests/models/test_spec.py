"""ModelSpec from Hugging Face configs: transformers 4.x and 5.x spellings agree, and
inconsistent or unsupported configs are refused with the field named."""

from __future__ import annotations

import pytest

from mpq_jax.errors import ConfigError, UnsupportedArchitectureError
from mpq_jax.models.spec import RopeScaling, spec_from_dict, spec_from_hf_config, spec_to_dict

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_v4_and_v5_rope_keys_give_the_same_spec():
    v4 = spec_from_hf_config({**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3})
    v5 = spec_from_hf_config({**BASE, "rope_parameters": {"rope_theta": 500000.0, **LLAMA3}})
    assert v4 == v5
    assert v4.rope_theta == 500000.0 and v4.rope_scaling == RopeScaling(**LLAMA3)
    assert v4.head_dim == 16 and v4.num_kv_heads == 2


def test_conflicting_rope_keys_are_refused():
    config = {**BASE, "rope_scaling": LLAMA3, "rope_parameters": {**LLAMA3, "factor": 4.0}}
    with pytest.raises(ConfigError, match="disagree on factor"):
        spec_from_hf_config(config)


def test_family_specific_pieces():
    qwen2 = spec_from_hf_config({**BASE, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.linear_has_bias("self_attn", "q_proj") and not qwen2.linear_has_bias("self_attn", "o_proj")
    qwen3 = spec_from_hf_config({**BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert qwen3.qk_norm and "layers.1.self_attn.q_norm.weight" in qwen3.expected_shapes()
    assert qwen3.linear_shape("self_attn", "q_proj") == (4 * 32, 64)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        spec_from_hf_config({**BASE, "architectures": ["MistralForCausalLM"]})


def test_dict_round_trip():
    spec = spec_from_hf_config({**BASE, "rope_scaling": LLAMA3})
    assert spec_from_dict(spec_to_dict(spec)) == spec
