"""Random-number-generator states as plain tensors and numbers, so that a checkpoint holding
them loads with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch's (CPU and every CUDA device)
    with ``seed``: what a job calls first, so that everything drawn without its own generator
    (weight initialisation, dropout) repeats from run to run."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng_state(generators=()) -> dict:
    """The global torch (CPU and, once initialised, CUDA), numpy and Python states, plus the
    states of ``generators`` (``torch.Generator`` objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "generators": [g.get_state() for g in generators]}


def restore_rng_state(state: dict, generators=()) -> None:
    """Undo :func:`capture_rng_state` (the ``generators`` given in the same order)."""
    if len(state["generators"]) != len(generators):
        raise ValueError(f"the checkpoint holds {len(state['generators'])} noise generators, this trainer has "
                         f"{len(generators)}")
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():  # the devices this machine has (another may have more)
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
