"""mpq-jax: mixed-precision (2-4 bit) quantization of Llama/Qwen language models in JAX.

Entry points: `python -m mpq_jax.quantize --config X.yaml` (the pipeline),
`mpq_jax.models.load_model` (checkpoints), `mpq_jax.eval.perplexity` (WikiText-2),
`mpq_jax.packed.qlinear.QuantizedLinear` (the format every method produces).
"""

__version__ = "0.1.0"
