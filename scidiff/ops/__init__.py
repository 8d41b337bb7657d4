"""Fused operations, each as a pure-torch reference and a Triton kernel (``scidiff.kernels``),
chosen at call time by :func:`use_triton` (device, dtype, Triton importable,
``SCIDIFF_KERNELS=auto|torch|triton``). The Triton paths are ``torch.library`` custom ops
(``torch.ops.scidiff.*``), so ``torch.compile(fullgraph=True)`` traces through them."""
from .dispatch import HAS_TRITON, interpreting, kernel_mode, load_kernel, use_triton
from .modulated_block import (fold_layer_norm, folded_linear, folded_linear_reference, modulated_block,
                              modulated_block_reference, row_stats, row_stats_reference)
from .sampler_step import sampler_step, sampler_step_reference

__all__ = ["HAS_TRITON", "fold_layer_norm", "folded_linear", "folded_linear_reference", "interpreting", "kernel_mode",
           "load_kernel", "modulated_block", "modulated_block_reference", "row_stats", "row_stats_reference",
           "sampler_step", "sampler_step_reference", "use_triton"]
