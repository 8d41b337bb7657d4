"""A model's training groups (each combination of covariate values and how many training cells
carry it, :meth:`scidiff.data.DataSpec.count_groups`) and ``n`` cells shared out over those that
agree with a condition. numpy only: the data spec and the ONNX runtime share it, and the runtime
never imports torch."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def share_out(n: int, weights) -> np.ndarray:
    """``n`` whole cells split in proportion to ``weights``, largest remainders first (ties in
    the listed order): each share within one cell of ``n * w / sum(w)``, summing to ``n``."""
    w = np.asarray(weights, float)
    share = n * w / w.sum()
    cells = np.floor(share).astype(int)
    cells[np.argsort(-(share - cells), kind="stable")[: n - int(cells.sum())]] += 1
    return cells


def mixture(groups: dict, n: int, condition: dict | None, same: Callable[[str, object, object], bool]
            ) -> list[tuple[dict, int]]:
    """``n`` cells over the training ``groups`` (``{"keys", "values", "cells"}``) that agree with
    ``condition`` (``same(key, group value, asked value)``), in their training proportions:
    ``[(full condition, cells), ...]`` for the groups that get any, the asked values kept as
    given. Empty where there are no groups, ``condition`` names every grouped covariate already,
    or no group carries it (an unseen combination, a time between measured ones)."""
    condition = dict(condition or {})
    if not groups or set(groups["keys"]) <= set(condition):
        return []
    keys = groups["keys"]
    rows = [(values, c) for values, c in zip(groups["values"], groups["cells"])
            if all(same(k, v, condition[k]) for k, v in zip(keys, values) if k in condition)]
    if not rows:
        return []
    cells = share_out(n, [c for _, c in rows])
    return [({**dict(zip(keys, values)), **condition}, int(c)) for (values, _), c in zip(rows, cells) if c]
