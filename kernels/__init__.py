"""Triton kernels of scidiff, installed inside the package as ``scidiff.kernels``.

Each module holds one fused operation and its launcher; the pure-torch reference with the same
signature lives in :mod:`scidiff.ops`, which chooses between them at call time. These modules
import ``triton`` and never import ``scidiff``; nothing imports them unless Triton is chosen,
except :mod:`.fold` (plain torch: LayerNorm folded into a weight), which the shared-modulation
kernel and ``scidiff.ops`` both use.

- :mod:`.modulated_block`: LayerNorm + scale/shift modulation + linear + bias + SiLU + gated
  residual add, forward and the two kernels of its backward.
- :mod:`.sampler_step`: one sampler update over ``[B, D]`` (guidance combine, clamp, per-row
  coefficients, in-kernel Gaussian noise).
"""
