"""Which implementation runs: the pure-torch reference or the Triton kernel.

Chosen at call time from the tensors and ``SCIDIFF_KERNELS``:

- ``auto`` (default): Triton for CUDA tensors of a supported dtype when ``triton`` is installed,
  the torch reference otherwise (CPU, float64, no Triton).
- ``torch``: always the reference (what ONNX export traces).
- ``triton``: always Triton; an error if it cannot run (not installed, or CPU tensors outside
  the Triton interpreter, ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

MODES = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAS_TRITON = _importable("triton")  # found, not imported: importing triton is left to the kernels


def kernel_mode() -> str:
    """The ``SCIDIFF_KERNELS`` setting (``auto`` when unset)."""
    mode = os.environ.get("SCIDIFF_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"SCIDIFF_KERNELS={mode!r}; choose one of {', '.join(MODES)}")
    return mode


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _compiled_kernel_modules() -> list[str]:
    """Loaded kernel modules whose kernels Triton compiled for a GPU: Triton fixes the mode when
    the module is imported, so these cannot run on CPU tensors even with TRITON_INTERPRET=1 now."""
    jit = sys.modules.get("triton.runtime.jit")
    if jit is None:
        return []
    return sorted(name.rsplit(".", 1)[1] for name, module in list(sys.modules.items())
                  if name.startswith("scidiff.kernels.") and module is not None
                  and any(isinstance(v, jit.JITFunction) for v in vars(module).values()))


def use_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernel should run for tensors like ``x``."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not HAS_TRITON:
            raise RuntimeError("SCIDIFF_KERNELS=triton but triton is not installed (pip install 'triton==3.8.0')")
        if not x.is_cuda and not interpreting():
            raise RuntimeError("SCIDIFF_KERNELS=triton with CPU tensors needs the Triton interpreter: "
                               "set TRITON_INTERPRET=1 before scidiff is imported")
        compiled = [] if x.is_cuda else _compiled_kernel_modules()
        if compiled:
            raise RuntimeError(f"SCIDIFF_KERNELS=triton with CPU tensors, but the kernels {compiled} were loaded "
                               "before TRITON_INTERPRET=1 was set (compiled for a GPU): set it before scidiff is "
                               "imported, in a new process")
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"the Triton kernels take {[str(d) for d in TRITON_DTYPES]}, got {x.dtype}")
        return True
    return HAS_TRITON and x.is_cuda and x.dtype in TRITON_DTYPES


def load_kernel(name: str):
    """The Triton kernel module ``scidiff.kernels.<name>``. An installed scidiff has it (setup.py
    maps the top-level ``kernels/`` there); a source tree used in place gets the same folder
    registered under that name."""
    full = f"scidiff.kernels.{name}"
    if full in sys.modules:
        return sys.modules[full]
    if "scidiff.kernels" not in sys.modules and importlib.util.find_spec("scidiff.kernels") is None:
        root = Path(__file__).resolve().parents[2] / "kernels"
        if not (root / "__init__.py").exists():
            raise ModuleNotFoundError("scidiff.kernels is missing: reinstall scidiff (pip install -e .)")
        spec = importlib.util.spec_from_file_location("scidiff.kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["scidiff.kernels"] = module
        spec.loader.exec_module(module)
    return importlib.import_module(full)
