"""Whole-model views of the `QuantizedLinear` contract.

`dequantized_params` turns every packed block linear of a params tree back into a dense
effective weight: the fake-quantized model, which computes the same function. It lives beside
the contract because it only needs the contract, and every consumer (perplexity, lm-eval,
generation, QAT) reads packed models through it or through the kernels.

Not for: walking linears to quantize them (mpq_jax.quant.model) or file I/O (io.py).
"""

from __future__ import annotations

from mpq_jax.packed.qlinear import QuantizedLinear


def dequantized_params(params: dict) -> dict:
    """Params with every QuantizedLinear replaced by its dense effective weight (and bias).

    The fake-quantized model computes the same function; on CPU a dense matmul is faster
    than unpacking codes in every forward pass, so evaluation runs on this form. The dtype
    follows the embedding's, so bfloat16 models stay bfloat16.
    """
    dtype = params["embed_tokens"]["weight"].dtype

    def dense(layer):
        if not isinstance(layer, QuantizedLinear):
            return layer
        out = {"weight": layer.effective_weight(dtype)}
        if layer.bias is not None:
            out["bias"] = layer.bias.astype(dtype)
        return out

    layers = [
        {key: ({k: dense(v) for k, v in value.items()} if isinstance(value, dict) else value) for key, value in layer.items()}
        for layer in params["layers"]
    ]
    return {**params, "layers": layers}
