"""Model architectures (Llama, Qwen2, Qwen3) as pure functions, and checkpoint loading."""

from mpq_jax.models.checkpoint import DEFAULT_MODEL, LoadedModel, load_model
from mpq_jax.models.decoder import forward
from mpq_jax.models.spec import BLOCK_LINEARS, ModelSpec, spec_from_hf_config

__all__ = ["DEFAULT_MODEL", "BLOCK_LINEARS", "LoadedModel", "ModelSpec", "forward", "load_model", "spec_from_hf_config"]
