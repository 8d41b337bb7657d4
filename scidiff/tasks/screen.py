"""Screens: many targets predicted for the same control cells in one call, one AnnData out.

:func:`predict_screen` runs :func:`scidiff.tasks.perturb.perturb` once per target on one loaded
model and stacks the predictions; :func:`baseline_screen` does the same with a baseline of
:func:`scidiff.evaluation.perturbation.predict_baseline` (no model). Both give the same layout:

- one row per (target, input cell), the targets in the order given, each target's rows in the
  input's order; ``obs_names`` are the input's for one target, ``<cell>-<i>`` for target ``i``
  of several (unique either way), ``obs['scidiff_source_cell']`` the input cell's name;
- ``obs`` copied from the input cells with the target covariates set, ``obs['scidiff_target']``
  the target's text (``key=value[,key=value]``), and every other column that describes the
  perturbation (:attr:`scidiff.data.DataSpec.perturbation_columns`: Papalexi's ``target`` for
  ``perturbation``) set from the target's label, or missing where the training cells give that
  label no single value (a combination, an unseen label, a guide column): never left at the
  control cell's own value;
- ``X`` the predicted log1p expression (``uns['log1p']``, as scanpy records it), ``var`` the
  input's gene columns, ``layers['control']`` the input cells', and
  ``uns['scidiff_prediction']`` the settings (``method``, ``targets``, and each target's record
  under ``per_target`` where there are several).
"""
from __future__ import annotations


import anndata as ad
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..checks import condition_mapping, refuse_one_condition, said_once, warn, yes_no
from ..data.dataset import control_hint
from ..data.h5ad_writer import H5adWriter
from ..data.spec import describing_columns, lookup_label, scanpy_log1p
from ..evaluation.perturbation import number_text, numeric_column, predict_baseline
from .cells import read_cells, source_named
from .perturb import perturb

TARGET_COLUMN = "scidiff_target"


def target_text(target: dict) -> str:
    """``{'perturbation': 'STAT1', 'dose': 1.0}`` -> ``"perturbation=STAT1,dose=1.0"``."""
    return ",".join(f"{k}={v}" for k, v in target.items())


def _check_targets(targets) -> list[dict]:
    refuse_one_condition(targets, "targets", "{'condition': 'stimulated'}", "dicts")
    targets = [condition_mapping(t, "each target") for t in targets]
    if not targets:
        raise ValueError("no targets given; give at least one, e.g. {'condition': 'stimulated'}")
    for t in targets:
        if not t:
            raise ValueError("a target is empty; give at least one covariate, e.g. {'condition': 'stimulated'}")
    texts = [target_text(t) for t in targets]
    repeated = sorted({x for x in texts if texts.count(x) > 1})
    if repeated:
        raise ValueError(f"targets given more than once: {repeated}")
    return targets


def _as_column(values: list):
    """A column of recorded values (``None`` = missing): numbers as floats, anything else as
    categorical labels (h5ad-writable either way)."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.array([np.nan if v is None else float(v) for v in values])
    return pd.Categorical([None if v is None else str(v) for v in values])


def set_perturbation_columns(obs: pd.DataFrame, columns: dict, target: dict, *, separator: str = "+",
                             control_labels=("control", "ctrl")) -> pd.DataFrame:
    """``obs`` (predicted cells of one target) with each recorded column describing a perturbation
    of ``target`` set to the target label's value; ``columns``: ``{key: {column: {label: value}}}``
    (:attr:`~scidiff.data.DataSpec.perturbation_columns`). A label without a value (combination,
    unseen label, a column that refines the perturbation) leaves the column missing."""
    obs = obs.copy()
    for key, described in columns.items():
        if key not in target:
            continue
        for column, values in described.items():
            if column in target:
                continue  # the user set it
            value = lookup_label(values, target[key], separator, control_labels)
            obs[column] = _as_column([value] * len(obs))
    return obs


def _stack(parts: list[ad.AnnData], texts: list[str], columns: dict) -> ad.AnnData:
    """One AnnData of the per-target predictions (module docstring's layout)."""
    if len(parts) == 1:
        out = parts[0]
        out.obs[TARGET_COLUMN] = pd.Categorical([texts[0]] * out.n_obs)
        _drop_empty(out.obs, columns)
        out.uns.setdefault("log1p", scanpy_log1p())  # a baseline's log1p X too, as scanpy records it
        return out
    obs = []
    for i, p in enumerate(parts):
        o = p.obs.copy()
        o.index = [f"{name}-{i}" for name in p.obs_names]
        obs.append(o)
    frame = stack_obs(obs, columns)
    frame[TARGET_COLUMN] = pd.Categorical(np.repeat(texts, [p.n_obs for p in parts]), categories=texts)
    out = ad.AnnData(X=np.vstack([np.asarray(p.X) for p in parts]), obs=frame)
    out.var = parts[0].var.copy()
    out.layers["control"] = np.vstack([np.asarray(p.layers["control"]) for p in parts])
    out.uns["log1p"] = scanpy_log1p()  # X is log1p, as scanpy records it (a single target's prediction has it)
    out.uns["scidiff_prediction"] = _screen_record([p.uns.get("scidiff_prediction", {}) for p in parts], texts)
    return out


def stack_obs(frames: list[pd.DataFrame], columns: dict) -> pd.DataFrame:
    """The ``obs`` of several targets' predictions, one below the other: label columns
    categorical, each column describing a target (``columns``, as
    :func:`set_perturbation_columns` takes) a column of its recorded values with missing ones,
    dropped where none has a value."""
    described = {c for d in columns.values() for c in d}
    frame = pd.concat([o.astype({c: object for c in o.columns if isinstance(o[c].dtype, pd.CategoricalDtype)})
                       for o in frames], axis=0, join="outer")
    for c in frame.columns:
        if c in described:
            frame[c] = _as_column([None if _missing(v) else v for v in frame[c]])
        elif frame[c].dtype == object:  # labels (categorical in the parts, or strings)
            frame[c] = pd.Categorical([None if _missing(v) else str(v) for v in frame[c]])
    _drop_empty(frame, columns)
    return frame


def _screen_record(records: list[dict], texts: list[str]) -> dict:
    """``uns['scidiff_prediction']`` of a screen: one target's own record, or for several the
    first's settings with every target's text and record."""
    first = dict(records[0])
    if len(records) == 1:
        return first
    first.pop("target", None)
    return {**first, "targets": list(texts), "per_target": {str(i): dict(r) for i, r in enumerate(records)}}


def _missing(v) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _drop_empty(obs: pd.DataFrame, columns: dict) -> None:
    for c in {c for d in columns.values() for c in d}:
        if c in obs.columns and obs[c].isna().all():
            del obs[c]


def _perturbation_columns(model) -> dict:
    """The obs columns that describe each perturbation covariate of the model's training cells."""
    return getattr(model.data_spec, "perturbation_columns", None) or {}


def _model_parts(model, cells, targets, progress, device, perturb_kwargs):
    """Each target's prediction (its perturbation columns set by ``perturb``), one at a time (the
    control cells' inversions kept in one store, shared by the targets)."""
    store, many = {}, len(targets) > 1
    bar = tqdm(targets, desc="targets", unit="target", disable=not (progress and many))
    said: set = set()
    for target in bar:
        bar.set_postfix_str(target_text(target)[:60])
        with said_once(said):  # the control cells' warnings (features left out, ...) once, not once per target
            pred = perturb(model, cells, target, progress=progress and not many, device=device, store=store,
                           **perturb_kwargs)
        yield pred


def predict_screen(model, cells, targets: list[dict], *, progress: bool = True, device=None,
                   **perturb_kwargs) -> ad.AnnData:
    """Predict the control ``cells`` (an AnnData or ``.h5ad`` path, read once) under each of
    ``targets`` with one model: :func:`~scidiff.tasks.perturb.perturb` per target (same
    ``perturb_kwargs``, e.g. ``method``, ``steps``, ``guidance_scale``, ``seed``, ``batch_size``:
    each target's rows equal a single call's), stacked as the module docstring describes. The
    control cells are inverted once for all targets (``perturb``'s ``store``).
    ``device``: run there (the model is moved)."""
    progress = yes_no("progress", progress)  # 'no' showed the bars: any non-empty text is true
    targets, columns = _check_targets(targets), _perturbation_columns(model)
    parts = list(_model_parts(model, read_cells(cells), targets, progress, device, perturb_kwargs))
    return _stack(parts, [target_text(t) for t in targets], columns)


def predict_screen_to_file(model, cells, targets: list[dict], out, *, progress: bool = True, device=None,
                           **perturb_kwargs) -> tuple[int, int]:
    """:func:`predict_screen` straight into the ``.h5ad`` at ``out``, one target at a time, so
    memory holds one target's prediction however many targets there are (an in-silico screen of
    thousands). The file holds what ``write_h5ad(predict_screen(...), out)`` would (the same
    ``X``, ``layers['control']``, ``obs`` values and names, and ``uns``; numbers as floats, integer
    columns as integers, categories in the order met); it appears only when complete. Returns
    ``(cells, genes)``."""
    progress = yes_no("progress", progress)  # 'no' showed the bars: any non-empty text is true
    targets, columns = _check_targets(targets), _perturbation_columns(model)
    parts = _model_parts(model, read_cells(cells), targets, progress, device, perturb_kwargs)
    return _write_parts(out, parts, [target_text(t) for t in targets], columns)


def _write_parts(out, parts, texts: list[str], columns: dict) -> tuple[int, int]:
    """Per-target predictions (an iterable, read one at a time) into the ``.h5ad`` at ``out`` as
    :func:`_stack` would stack them. Returns ``(cells, genes)``."""
    described = {c for d in columns.values() for c in d}
    many, records, writer, n_genes = len(texts) > 1, [], None, 0
    try:
        for i, (pred, text) in enumerate(zip(parts, texts)):
            if writer is None:
                writer = H5adWriter(out, [str(g) for g in pred.var_names])
                writer.var = pred.var.copy()
                writer.drop_if_empty = set(described)
                n_genes = pred.n_vars
            obs = pred.obs.copy()
            obs[TARGET_COLUMN] = text
            names = [f"{name}-{i}" for name in pred.obs_names] if many else list(pred.obs_names)
            writer.append(np.asarray(pred.X), obs={c: _file_values(obs[c], c in described) for c in obs.columns},
                          obs_names=names, layers={"control": np.asarray(pred.layers["control"])})
            records.append(pred.uns.get("scidiff_prediction", {}))
        writer.uns = {"log1p": scanpy_log1p(), "scidiff_prediction": _screen_record(records, texts)}
        n_cells = writer.n_cells
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return n_cells, n_genes


def _file_values(column: pd.Series, described: bool):
    """One obs column of a target's prediction as the file's writer takes it: numbers as a float
    array (integers without a missing value as integers), anything else as labels (``None`` for
    missing), as :func:`_stack` makes them."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        if pd.api.types.is_integer_dtype(column) and not column.isna().any():
            return column.to_numpy(dtype=np.int64)
        return column.to_numpy(dtype=np.float64)
    values = [None if _missing(v) else v for v in column.astype(object)]
    made = _as_column(values) if described else None  # the stacked screen's reading of a described column
    if isinstance(made, np.ndarray):
        return made
    return [None if v is None else str(v) for v in values]


# -- baselines -------------------------------------------------------------------------------------

def check_control_labels(key: str, control_labels, files: dict, *, required: str | None = None) -> list[str]:
    """The labels of ``control_labels`` that some cell carries in ``obs[key]`` of the AnnData in
    ``files`` (``{name: adata}``; one without the column is passed over). Warns naming each label
    no cell of any of them carries; refuses when no cell of ``files[required]`` carries any."""
    present, numeric = {}, False
    for what, adata in files.items():
        if adata is not None and key in adata.obs.columns:
            present[what] = set(adata.obs[key].astype(str).str.strip())
            if numeric_column(adata, key):  # a time or dose: '2' names day 2.0, as the labels read
                numeric, present[what] = True, {number_text(v) for v in present[what]}
    if required is not None and required not in present:
        adata = files[required]
        raise KeyError(f"obs key {key!r} is not in {required}; available obs keys: {list(adata.obs.columns)}")
    carried = set().union(*present.values()) if present else set()
    read = {c: number_text(c) if numeric else c for c in control_labels}
    for c in control_labels:
        if present and read[c] not in carried:
            common = sorted(carried)[:8]
            warn(f"control label {c!r} matches no cell of {' or '.join(present)} (obs[{key!r}] holds "
                 f"{common}{' ...' if len(carried) > 8 else ''})")
    if required is not None and not set(read.values()) & present[required]:
        raise ValueError(f"no cell of {required} carries a control label {list(control_labels)} in obs[{key!r}]; "
                         f"the baselines need its control cells (--control-labels){control_hint(present[required])}")
    return [c for c in control_labels if read[c] in carried]


def baseline_screen(method: str, train, cells, targets: list[dict], *, perturbation_key: str | None = None,
                    context_key: str | None = None, control_labels=("control",), time_key: str | None = None,
                    exclude_columns=(), columns: dict | None = None, out=None, drop_obs=(), **baseline_kwargs):
    """Predict ``cells`` under each of ``targets`` with the baseline ``method``
    (:func:`~scidiff.evaluation.perturbation.predict_baseline`, from the ``train`` cells; both
    AnnData of log1p expression on the same genes), stacked like :func:`predict_screen`, or with
    ``out`` (an ``.h5ad`` path) written target by target like :func:`predict_screen_to_file`
    (then ``(cells, genes)`` is returned). ``control_labels``: every one is taken as control (the
    first names it); labels are matched in canonical form
    (:func:`~scidiff.evaluation.perturbation.perturbation_labels`). ``columns``: the obs columns
    that describe the perturbation, and the time (default: those of ``train``,
    :func:`~scidiff.data.spec.describing_columns`, the context and ``exclude_columns`` aside: a
    time course's ``day`` for its ``time_key``); ``drop_obs``: obs columns of ``cells`` left out
    of the predictions. A target's dose is read from the training cells measured at it.
    ``baseline_kwargs``: ``alpha`` (the linear ridge's penalty; default: cross-validated, recorded
    in ``uns['scidiff_prediction']``), ``features``, ``separator``."""
    targets = _check_targets(targets)
    control_labels = [str(c) for c in control_labels] or ["control"]
    separator = baseline_kwargs.get("separator", "+")
    if columns is None:
        columns = {}
        contexts = [context_key] if context_key else ()
        for key, obs in [(perturbation_key, None), (time_key, "time")]:
            if train is None or key is None or key not in train.obs.columns:
                continue
            skip = {context_key, time_key, perturbation_key, *exclude_columns} - {None, key}
            if obs == "time":  # Klein's day for day_num: the times read as floats, as the model's set-up reads them
                obs = train.obs.assign(**{key: pd.to_numeric(train.obs[key], errors="coerce").astype(float)})
            columns[key] = describing_columns(train.obs if obs is None else obs, key, exclude=skip, contexts=contexts,
                                              separator=separator if obs is None else None,
                                              control_labels=control_labels)
    parts = _baseline_parts(method, train, cells, targets, perturbation_key, context_key, control_labels, time_key,
                            columns, separator, baseline_kwargs)
    if drop_obs:
        parts = (_without(pred, drop_obs) for pred in parts)
    texts = [target_text(t) for t in targets]
    return _write_parts(out, parts, texts, columns) if out is not None else _stack(list(parts), texts, columns)


def _without(pred: ad.AnnData, columns) -> ad.AnnData:
    pred.obs = pred.obs.drop(columns=[c for c in columns if c in pred.obs.columns])
    return pred


def _baseline_parts(method, train, cells, targets, perturbation_key, context_key, control_labels, time_key, columns,
                    separator, baseline_kwargs):
    """Each target's baseline prediction, one at a time (:func:`baseline_screen`)."""
    said: set = set()
    for target in targets:
        with said_once(said):
            pred = predict_baseline(method, train if train is not None else cells, cells, target,
                                    perturbation_key=perturbation_key, context_key=context_key,
                                    control_label=control_labels, time_key=time_key, **baseline_kwargs)
            pred.obs = source_named(pred.obs, "the control cells")
        record = pred.uns.pop("baseline")
        target = {**target, **record["at"]}  # a dose as the number it was read at
        pred.obs = set_perturbation_columns(pred.obs, columns, target, separator=separator,
                                            control_labels=control_labels)
        pred.obs["scidiff_route"] = pd.Categorical([f"baseline:{record['method']}"] * pred.n_obs)
        pred.obs["scidiff_confidence"] = np.full(pred.n_obs, np.nan, dtype=np.float32)
        pred.uns["scidiff_prediction"] = {
            "method": record["method"], "target": {k: str(v) for k, v in target.items()},
            "baseline": {"perturbation_key": perturbation_key or "", "context_key": context_key or "",
                         "control_label": control_labels[0], "time_key": time_key or "",
                         **({"alpha": record["alpha"]} if "alpha" in record else {})},
            "confidence": "not assessed by a baseline (NaN)"}
        yield pred
