"""Pallas dequant-matmul kernels for QuantizedLinear layers on GPU (Triton lowering) and TPU
(Mosaic), each beside the plain-jnp reference, chosen by `quantized_matmul` on the backend.
Layout and design: README.md in this folder."""

from pallas_kernels.blocks import GPU_BLOCKS, TPU_BLOCKS, KernelBlocks
from pallas_kernels.dispatch import kernel_backend, quantized_matmul

__all__ = ["GPU_BLOCKS", "TPU_BLOCKS", "KernelBlocks", "kernel_backend", "quantized_matmul"]
