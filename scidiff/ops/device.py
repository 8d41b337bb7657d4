"""Which device runs: one rule for loading a model, training and the sampling engine.

``"auto"`` (or ``None``) is CUDA where present, else the CPU. A CUDA or MPS request where that
device is absent either falls back to the CPU with a warning (loading and training, so a script
written on a GPU node runs on a laptop) or is refused (``strict``: the engine, where the user
asked for a device to be fast on). A string torch does not know as a device (``"gpu"``), or a
CUDA index this machine does not have, is a ValueError that names it.
"""
from __future__ import annotations

import warnings

import torch


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return bool(mps is not None and mps.is_available())
    return True


def resolve_device(device, strict: bool = False, stacklevel: int = 3) -> torch.device:
    """The ``torch.device`` for ``device`` (``"auto"``, ``None``, a name or a ``torch.device``)."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}: give 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if not _available(dev.type):
        if strict:
            raise ValueError(f"device={device!r} but {dev.type.upper()} is not available here (torch "
                             f"{torch.__version__}, CPU build or no GPU): use device='cpu' or leave it unset")
        warnings.warn(f"{dev.type.upper()} was requested but is not available; running on the CPU",
                      stacklevel=stacklevel)
        return torch.device("cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
