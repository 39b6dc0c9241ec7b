"""Quantization-aware training that refines the output of any method: packed
`QuantizedLinear`s in, packed `QuantizedLinear`s out.

    ste.py        fake quantization with a straight-through estimator (jax.custom_vjp)
    trainable.py  the trainable form of a QuantizedLinear and its two conversions
    loop.py       the training state pytree, the one training loop, orbax checkpoints
    stages.py     stage 1 (block-wise reconstruction) and stage 2 (end-to-end)
"""
