"""Trajectories over a numeric covariate (time): the same cells carried across a grid of values.

For each time ``t`` of the grid the input cells are predicted under ``{key: t, **condition}`` by
:func:`scidiff.tasks.perturb.perturb` (each cell's counterfactual: DDIM inversion under its own
covariates, decoding under the target), so every time point holds the *same* cells, each keeping
what the time does not explain. The result is one AnnData, time after time.
"""
from __future__ import annotations

import math
import warnings

import anndata as ad
import numpy as np
from tqdm.auto import tqdm

from ..checks import warn, yes_no
from ..data.dataset import USE_RAW
from .cells import SOURCE_COLUMN, model_spec, read_cells
from .perturb import numeric_value, perturb
from .screen import stack_obs


def _grid(spec, times) -> tuple[str, list[float]]:
    if not isinstance(times, dict) or len(times) != 1:
        raise ValueError(f"times must name one numeric covariate and its grid, e.g. {{'day_num': [2, 3, 4]}}; got "
                         f"{times!r}")
    (key, grid), = times.items()
    if key not in spec.continuous:
        kind = "a categorical covariate" if key in spec.categorical else "not a covariate of the model"
        columns = getattr(spec, "perturbation_columns", None) or {}
        names = [k for k in spec.continuous if key in (columns.get(k) or {})]
        hint = (f" ({key!r} names the times of {names[0]!r} in the training cells: give {{{names[0]!r}: [...]}}, "
                f"its labels such as {next(iter(columns[names[0]][key].values()))!r} read as "
                f"their times)") if names else ""
        raise ValueError(f"{key!r} is {kind}; a trajectory runs over a numeric one: "
                         f"{list(spec.continuous) or 'the model has none (train with continuous_keys / a dose)'}{hint}")
    if isinstance(grid, (str, bytes, dict)) or not hasattr(grid, "__iter__") or \
            getattr(grid, "ndim", 1) == 0:  # one time (a number, its text or a label: 'd2')
        grid = [grid]
    # any sequence of times: a list, a range, a numpy array, a pandas Index or Series, a tensor
    values = [v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v for v in grid]
    if not values:
        raise ValueError(f"the grid of {key!r} is empty")
    out = []
    for v in values:
        # a number, its text, or a label of a measured time ('d2' for day 2)
        f = numeric_value(spec, key, v, where=f"the grid of {key!r} holds {v!r},")
        if not math.isfinite(f):
            raise ValueError(f"the grid of {key!r} holds {v!r}, not a finite number")
        out.append(f)
    read = [float(np.float32(v)) for v in out]  # as the model reads a time: 1.2 and float32 1.2 are one
    if len(set(read)) != len(read):
        raise ValueError(f"the grid of {key!r} repeats values: "
                         f"{sorted({f'{v:g}' for v in read if read.count(v) > 1})}")
    return key, out


def trajectory(model, cells, times: dict[str, list[float]], *, condition: dict | None = None, steps: int = 50,
               guidance_scale: float = 1.0, seed: int = 0, progress: bool = True, layer: str | None = None,
               use_raw: bool | None = None, batch_size: int = 4096, device=None,
               observed: bool | None = None) -> ad.AnnData:
    """Carry ``cells`` (an AnnData or ``.h5ad`` path; typically control or early-time cells)
    across a grid of a numeric covariate: ``times={'day_num': [2, 3, 4, 5]}`` (any sequence: a
    range, an array, a pandas Index; a time as a number, its text or the label the training cells
    give it, Klein's ``'d2'``), under the other covariates of ``condition`` (e.g. a perturbation,
    one never seen too: the prior's effect is added at every time) when given.

    Returns one AnnData of ``n_cells x len(grid)`` rows, time after time (all cells at the first
    time, then all at the second, ...), with predicted log1p expression in ``X``; ``obs`` as
    :func:`~scidiff.tasks.perturb.perturb` writes it
    (the input cells' columns, target covariates set), ``obs[key]`` the time (float) and
    ``obs['scidiff_source_cell']`` the input cell's name (``obs_names`` are ``"<cell>@<key>=<t>"``);
    ``layers['control']`` each row's source cell (the input expression, computed once and repeated
    per time); ``uns['scidiff_trajectory']`` the grid, the condition and the settings. A time
    outside the range the model was trained on warns once, naming the range (predictions there
    are extrapolations). The prediction is deterministic for a given ``seed``; the cells are
    inverted once for all the times (``perturb``'s ``store``)."""
    spec = model_spec(model)
    progress, use_raw = yes_no("progress", progress), yes_no("use_raw", use_raw, USE_RAW)  # 'no' read as true
    observed = model.resolve_observed(observed)  # refused before any work, not at the first time point
    key, grid = _grid(spec, times)
    condition = dict(condition or {})
    if key in condition:
        raise ValueError(f"{key!r} is both the trajectory's axis and in condition=; give it in times= only")
    lo, hi = spec.continuous_range.get(key, (None, None))
    # in float32, as the range was measured and the model reads a time (day 0.7 is its measured 0.699999988)
    outside = [t for t in grid if lo is not None and not lo <= float(np.float32(t)) <= hi]
    if outside:
        warn(f"{key} {outside} is outside the range seen in training [{lo:g}, {hi:g}]; the trajectory "
             f"there is an extrapolation")
    adata = read_cells(cells)
    columns = getattr(spec, "perturbation_columns", None) or {}  # obs columns set from each time (Klein's day)
    parts, store = [], {}  # the cells' inversions, shared by the time points
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*outside the range seen in training.*")  # said once above
        for t in tqdm(grid, desc=f"trajectory over {key}", disable=not progress):
            part = perturb(model, adata, {key: t, **condition}, steps=steps, guidance_scale=guidance_scale,
                           seed=seed, layer=layer, use_raw=use_raw, batch_size=batch_size, progress=False,
                           device=device, store=store, observed=observed)  # sets the columns of its time
            parts.append(part)
    first = parts[0]
    names = [str(v) for v in first.obs_names]
    obs = stack_obs([p.obs for p in parts], columns)
    obs[key] = np.repeat(np.asarray(grid, dtype=np.float64), len(names))
    sources = first.obs[SOURCE_COLUMN].astype(str).to_numpy(dtype=object)  # the input's names (perturb's)
    obs[SOURCE_COLUMN] = np.tile(sources, len(grid))
    said = [f"{t:g}" for t in grid]  # 6 digits, unless two times differ only beyond them (1234567 s, 1234568 s)
    said = said if len(set(said)) == len(said) else [repr(t) for t in grid]
    obs.index = [f"{n}@{key}={t}" for t in said for n in names]
    out = ad.AnnData(X=np.vstack([np.asarray(p.X, dtype=np.float32) for p in parts]), obs=obs)
    out.var = first.var.copy()  # the gene IDs with the training file's symbols, as perturb writes them
    out.layers["control"] = np.tile(np.asarray(first.layers["control"], dtype=np.float32), (len(grid), 1))
    out.uns.update({k: v for k, v in first.uns.items() if k != "scidiff_prediction"})
    prediction = dict(first.uns.get("scidiff_prediction", {}))
    prediction["target"] = {**{k: str(v) for k, v in condition.items()}, key: "trajectory"}
    out.uns["scidiff_prediction"] = prediction
    out.uns["scidiff_trajectory"] = {"key": key, "times": [float(t) for t in grid], "n_cells": len(names),
                                     "condition": {k: str(v) for k, v in condition.items()}, "steps": int(steps),
                                     "guidance_scale": float(guidance_scale), "seed": int(seed),
                                     "training_range": [] if lo is None else [float(lo), float(hi)],
                                     "outside_training_range": [float(t) for t in outside]}
    return out
