"""A model's training groups (each combination of covariate values and how many training cells
carry it, :meth:`scidiff.data.DataSpec.count_groups`) and ``n`` cells shared out over those that
agree with a condition. numpy only: the data spec and the ONNX runtime share it, and the runtime
never imports torch."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def share_out(n: int, weights, seed: int | None = 0) -> np.ndarray:
    """``n`` whole cells split in proportion to ``weights`` by systematic rounding (Madow 1949):
    the shares laid end to end, each group's cells the whole numbers that fall in its stretch
    after one uniform offset drawn from ``seed``. Each share is the floor or the ceiling of
    ``n * w / sum(w)``, they sum to ``n``, and each is right in expectation over seeds, so that a
    request for fewer cells than there are groups draws small groups too (largest remainders
    would give the cells to the largest groups every time)."""
    w = np.asarray(weights, float)
    ends = np.concatenate([[0.0], np.cumsum(n * w / w.sum())])
    ends[-1] = n  # the last end exactly, whatever the rounding of the sum
    offset = np.random.default_rng(seed).random()
    return np.diff(np.floor(ends + offset)).astype(int)


def carrying(groups: dict, condition: dict | None, same: Callable[[str, object, object], bool]
             ) -> list[tuple[list, int]]:
    """The training ``groups`` (``{"keys", "values", "cells"}``) that agree with ``condition``
    (``same(key, group value, asked value)``), as ``(values, cells)``. Empty where there are no
    groups, ``condition`` names every grouped covariate already, or no group carries it (an unseen
    combination, a time between measured ones)."""
    condition = dict(condition or {})
    if not groups or set(groups["keys"]) <= set(condition):
        return []
    keys = groups["keys"]
    return [(values, c) for values, c in zip(groups["values"], groups["cells"])
            if all(same(k, v, condition[k]) for k, v in zip(keys, values) if k in condition)]


def mixture(groups: dict, n: int, condition: dict | None, same: Callable[[str, object, object], bool],
            seed: int | None = 0, rows: list | None = None) -> list[tuple[dict, int]]:
    """``n`` cells over the training ``groups`` that carry ``condition`` (:func:`carrying`, or
    ``rows`` where the caller kept them), in their training proportions (:func:`share_out` from
    ``seed``): ``[(full condition, cells), ...]`` for the groups that get any, the asked values
    kept as given; empty where no group carries it."""
    condition = dict(condition or {})
    rows = carrying(groups, condition, same) if rows is None else rows
    if not rows:
        return []
    cells = share_out(n, [c for _, c in rows], seed)
    return [({**dict(zip(groups["keys"], values)), **condition}, int(c)) for (values, _), c in zip(rows, cells) if c]
