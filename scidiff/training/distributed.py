"""Process groups for multi-process training and generation, on PyTorch's own engine.

``torchrun --nproc_per_node N`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address; :func:`init_distributed` reads them and starts the default process group (NCCL on
GPUs, gloo on CPU). The helpers below are no-ops in a single process, so the same code runs
with and without ``torchrun``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else env_world_size()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def distributed_device(device="auto") -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``"auto"``/``"cuda"`` when CUDA is
    present, else the CPU."""
    if device in (None, "auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    if device in (None, "auto", "cuda"):
        return torch.device("cpu")
    return torch.device(device)


def init_distributed(device="auto", backend: str | None = None) -> torch.device:
    """Join the process group described by ``torchrun``'s environment (if not joined yet) and
    return this rank's device. ``backend``: ``"nccl"`` on CUDA, ``"gloo"`` otherwise."""
    dev = distributed_device(device)
    if is_distributed():
        return dev
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"distributed training needs a process group: start the job with torchrun "
                           f"(missing environment variables {missing}) or call "
                           f"torch.distributed.init_process_group first")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"))
    return dev


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce(values, op: str = "sum", device="cpu") -> list[float]:
    """Reduce a list of numbers over ranks (``"sum"``, ``"min"`` or ``"max"``); the list itself
    in a single process."""
    values = [float(v) for v in values]
    if not is_distributed():
        return values
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.cpu().tolist()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def derived_seed(seed: int, stream: int) -> int:
    """Seed of the ``stream``-th random stream of a run seeded with ``seed``: ``seed`` itself for
    stream 0 (so one process reproduces the single-stream run), else a 63-bit seed from
    ``numpy.random.SeedSequence([seed, stream])``."""
    if stream == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), int(stream)]).generate_state(1, np.uint64)[0] >> 1)


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """``(first, count)`` of rank ``rank``'s contiguous share of ``n`` items split over ``world``
    ranks (sizes differ by at most one)."""
    first = rank * n // world
    return first, (rank + 1) * n // world - first
