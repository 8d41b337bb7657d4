"""The evaluation verb: generated cells scored against real ones (:func:`evaluate_files`), or
predicted perturbation responses against the real perturbed cells (:func:`evaluate_perturbation`),
written as a report folder."""
from __future__ import annotations

import json
import os
import re
import time

import anndata as ad
import numpy as np
import pandas as pd

from ..checks import warn, whole_number, yes_no
from ..data.dataset import MISSING_TEXT, _log_expression, _separator_hint, control_hint
from ..data.gene_symbols import genes_of_in, readable_names
from ..data.io import atomic_path, staged_files, user_path
from ..data.preprocess import common_total, dense, detect_input, expression_as_x, gene_columns, log_normalize
from ..data.validate import check_labelled
from ..evaluation import evaluate_generation_quality, fit_pca
from ..evaluation.cell_eval import INSTALL_HINT, CellEvalResult, cell_eval_score, cell_eval_version, run_cell_eval
from ..evaluation.perturbation import (control_labels_of, discrimination_score, number_text, numeric_column,
                                       perturbation_labels, perturbation_metrics, rank_degs)
from ..evaluation.plots import remove_report_plots, report_plots
from .cells import read_cells


def log_expression_of(adata: ad.AnnData, genes, target_sum: float = 1e4) -> np.ndarray:
    """The log1p-normalised expression of ``genes`` in ``adata`` (counts normalised to ``target_sum``)."""
    return _log_and_kind(adata, genes, target_sum)[0]


def _log_and_kind(adata: ad.AnnData, genes, target_sum: float = 1e4) -> tuple[np.ndarray, str]:
    """:func:`log_expression_of` and what ``adata``'s ``X`` held (``"counts"`` or ``"log1p"``)."""
    matrix, var_names, kind, _ = _log_expression(adata, None, False, "auto", target_sum)
    return dense(matrix[:, gene_columns(var_names, genes)]), kind


_RESCALE = 1.01  # a log1p file normalised to a total this far off the reference is rescaled to it


def _rescaled(x: np.ndarray, total: float | None, target_sum: float, where: str) -> tuple[np.ndarray, str]:
    """Log1p values ``x`` normalised to ``total`` per cell brought to ``target_sum`` (with a warning),
    and what was read."""
    if total is None or abs(np.log(target_sum / total)) <= np.log(_RESCALE):
        return x, "log1p"
    warn(f"the log1p values of {where} are normalised to {total:,.0f} per cell (every cell's total), not "
         f"{target_sum:,.0f}: rescaled to {target_sum:,.0f}")
    return np.log1p(np.expm1(x.astype(np.float64)) * (target_sum / total)), \
        f"log1p (normalised to {total:g}, rescaled to {target_sum:g})"


def _real_log(real_ad: ad.AnnData, genes, other: ad.AnnData) -> tuple[np.ndarray, str, float]:
    """The real cells' log1p expression on ``genes``, what ``X`` held and the library size both
    files are compared at: the one ``other`` (generated or predicted cells) records, else the real
    log1p values' own (every cell's total, where one), else 10,000; real counts are normalised to
    it, real log1p values normalised to another total rescaled to it."""
    recorded = generated_target_sum(other, np.nan)
    target_sum = recorded if np.isfinite(recorded) else 1e4
    total = common_total(real_ad.X, "X of the real file")  # before the kind is read: log2 refused naming it so
    x, kind = _log_and_kind(real_ad, genes, target_sum)
    if kind == "log1p":
        target_sum = target_sum if np.isfinite(recorded) or total is None else total
        x, kind = _rescaled(x, total, target_sum, "the real file")
    return x, kind, target_sum


_TARGET_SUM = re.compile(r"target_sum ([0-9.eE+]+)")


def generated_target_sum(adata: ad.AnnData, default: float = 1e4) -> float:
    """The library size a scidiff file's log1p expression was normalised to, as a prediction's
    ``uns['scidiff_prediction']['target_sum']`` or generated cells' ``uns['scidiff']['target_sum']``
    record it (files written before that: the note ``uns['scidiff']['expression']``,
    ``log1p-normalised (target_sum 5000)``), else ``default``: real counts are normalised to it
    before the two are compared."""
    generated, predicted = (adata.uns.get(k) for k in ("scidiff", "scidiff_prediction"))
    value = next((d.get("target_sum") for d in (predicted, generated)
                  if isinstance(d, dict) and d.get("target_sum") is not None), None)
    if value is None and isinstance(generated, dict) and generated.get("expression"):
        found = _TARGET_SUM.search(str(generated["expression"]))
        value = found.group(1) if found else None
    try:
        value = float(value) if value is not None else default
    except (TypeError, ValueError):
        return default
    return value if np.isfinite(value) and value > 0 else default


def _unique_genes(adata: ad.AnnData, genes, what: str) -> None:
    """Refuse ``genes`` that ``adata`` names twice (one of the copies would be scored as both)."""
    names = pd.Index([str(g) for g in adata.var_names])
    twice = sorted(set(names[names.duplicated()]) & set(map(str, genes)))
    if twice:
        raise ValueError(f"the {what} names {len(twice)} genes more than once: {twice[:20]}; keep one column of "
                         f"each, or make the names unique (`adata.var_names_make_unique()`)")


def _check_out_dir(out_dir):
    """``out_dir`` with ``~`` as the home folder (it wrote a folder named ``~``); refuse, before any
    work, one that is a file (it failed at the end, after scoring)."""
    out_dir = None if out_dir is None else user_path(out_dir)
    if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} is a file; give a folder to write metrics.json in")
    return out_dir


def _key_argument(name: str, value) -> None:
    """An obs column argument (``groupby``, ``perturbation_key``, ...): text or ``None``; a list
    failed as "unhashable type: 'list'" without naming it."""
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be one obs column name (text), got {value!r}")


def _write_json(path, obj) -> None:
    """``obj`` as strict JSON (NaN and infinities as ``null``, numpy scalars as numbers), written
    under a temporary name then renamed."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(_json_safe(obj), f, indent=1, allow_nan=False)

    atomic_path(path, write)


def _group_labels(real_ad: ad.AnnData, gen_ad: ad.AnnData, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``obs[key]`` of both files as text; where the column is numeric in either file and the two
    spell the labels differently (``1`` against ``1.0``), each number as a float's text."""
    real, gen = (a.obs[key].astype(str).to_numpy() for a in (real_ad, gen_ad))
    if (numeric_column(real_ad, key) or numeric_column(gen_ad, key)) and not set(gen) <= set(real):
        real, gen = (np.array([number_text(v) for v in labels], dtype=object) for labels in (real, gen))
    return real, gen


def evaluate_files(real, generated, out_dir, groupby: str | None = None, plots: bool = True,
                   auc_repeats: int = 1, layer: str | None = None, use_raw: bool = False) -> dict:
    """Score generated cells against real ones on the generated file's genes; write
    ``metrics.json`` (strict JSON: NaN as ``null``) and the report plots into ``out_dir``.
    ``auc_repeats``: draws of each classifier AUC averaged
    (:func:`scidiff.evaluation.evaluate_generation_quality`); ``layer`` / ``use_raw``: where the
    real cells' expression lies (default ``X``). Each file's counts are normalised (to the library
    size the generated file records, :func:`generated_target_sum`, else 10,000) and log1p'd,
    log1p is taken as is; ``inputs`` says which each held. Numeric ``groupby`` labels match as
    numbers (``1`` and ``1.0``)."""
    out_dir, plots, use_raw = _check_out_dir(out_dir), yes_no("plots", plots), yes_no("use_raw", use_raw)
    _key_argument("groupby", groupby)
    auc_repeats = whole_number("auc_repeats", auc_repeats, 1, what="an integer >= 1")
    real_ad, gen_ad = expression_as_x(read_cells(real), layer, use_raw), expression_as_x(read_cells(generated))
    genes = [str(g) for g in gen_ad.var_names]
    labels = {}
    if groupby:
        for name, a in (("real", real_ad), ("generated", gen_ad)):
            _column(a, groupby, f"{name} file")  # there, and every cell labelled
        labels = dict(zip(("cell_types", "generated_cell_types"), _group_labels(real_ad, gen_ad, groupby)))
    in_real = genes_of_in(gen_ad, real_ad, "genes of the generated file are not in the real file")
    _unique_genes(gen_ad, genes, "generated file")
    _unique_genes(real_ad, in_real, "real file")
    real_x, real_kind, target_sum = _real_log(real_ad, in_real, gen_ad)
    gen_total = common_total(gen_ad.X, "X of the generated file")
    gen_x, gen_kind = _log_and_kind(gen_ad, genes, target_sum)
    if gen_kind == "log1p":
        gen_x, gen_kind = _rescaled(gen_x, gen_total, target_sum, "the generated file")
    t0 = time.perf_counter()
    metrics = evaluate_generation_quality(real_x, gen_x, **labels, auc_repeats=auc_repeats)
    metrics["auc_repeats"] = auc_repeats
    metrics["inputs"] = {"real": real_kind, "generated": gen_kind, "target_sum": target_sum}
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    # the report's files renamed together at the end (metrics.json last): a re-run that fails or is
    # interrupted leaves the earlier report whole, and a new folder is not left with some plots
    with staged_files(out_dir) as stage:
        if plots:
            metrics["plots"] = [os.path.basename(p) for p in report_plots(real_x, gen_x, out_dir, stage=stage)]
        stage(os.path.join(out_dir, "metrics.json"), lambda tmp: _write_json(tmp, metrics))
    remove_report_plots(out_dir, keep=metrics.get("plots", ()))  # an earlier report's would stand beside these
    return metrics


# -- perturbation predictions ----------------------------------------------------------------------
CELL_EVAL_MISSING = "cell-eval is not installed: its metrics and scores are skipped (pip install 'scidiff[celleval]')"


def _read(a, what: str) -> ad.AnnData:
    if a is None:
        raise ValueError(f"no {what} given")
    return read_cells(a)


def _has_key(a: ad.AnnData, key: str, what: str) -> None:
    if key not in a.obs.columns:
        raise KeyError(f"obs key {key!r} is not in the {what}; available obs keys: {list(a.obs.columns)}")


def _column(a: ad.AnnData, key: str, what: str, control: str | None = None) -> np.ndarray:
    """``obs[key]`` as text, every cell labelled (``control``: the perturbation's control label,
    which the error offers for unlabelled cells)."""
    _has_key(a, key, what)
    col = a.obs[key]
    check_labelled(col, key, f"the {what}", control)
    text = col.astype(str).str.strip()
    written = text.isin(MISSING_TEXT + ("",)).to_numpy()  # NaN saved as text: astype(str) writes 'nan'
    if written.any():
        found = sorted(set(text[written]))
        cells = [str(c) for c in a.obs_names[written][:3]]
        raise ValueError(f"obs[{key!r}] of the {what} labels {int(written.sum())} cells {found} (cells {cells}): a "
                         f"missing value written as text, which would be scored as a group of its own; drop those "
                         f"cells or give them a label" + (f" ({control!r} where they are unperturbed)" if control
                                                          else ""))
    return text.to_numpy()


def _predicted_matrix(a: ad.AnnData, genes, what: str, kinds: dict | None = None,
                      target_sum: float = 1e4) -> np.ndarray:
    """A prediction's expression on ``genes``: its ``X``, taken as log1p (negative values, as a
    mean shift can give, are kept), or, where it holds counts (non-negative integers only),
    normalised to ``target_sum`` over all its genes and log1p'd as the real file's counts are; the kind
    read goes into ``kinds[what]``."""
    names = [str(g) for g in a.var_names]
    known = set(names)
    missing = [g for g in genes if g not in known]
    if missing:
        raise KeyError(f"{len(missing)} genes of the prediction are not in the {what}: {missing[:20]}")
    columns = gene_columns(names, genes)
    x = dense(a.X[:, columns]).astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"the {what} holds NaN or infinite values")
    if not x.any():
        held = f"; its layers {list(a.layers)} may hold the prediction (`adata.X = adata.layers[NAME]`)"
        raise ValueError(f"X of the {what} is all zeros on the {len(genes)} scored genes" + (held if a.layers else ""))
    kind = "log1p"
    if x.min() >= 0:
        kind = detect_input(x, f"X of the {what}")
    if kind == "counts":  # each cell's library size over all the file's genes, as the real file's
        x = dense(log_normalize(a.X, target_sum)[0][:, columns]).astype(np.float64)
    else:
        x, kind = _rescaled(x, common_total(a.X, f"X of the {what}"), target_sum, f"the {what}")
    if kinds is not None:
        kinds[what] = kind
    return x


class _Cells:
    """One AnnData's expression, perturbation labels and contexts."""

    def __init__(self, x, labels, contexts, adata):
        self.x, self.labels, self.contexts, self.adata = x, labels, contexts, adata
        self.gene_names: list[str] = []  # the scored genes' names (the real file's symbols where it has them)

    def rows(self, context, label) -> np.ndarray:
        return np.flatnonzero((self.contexts == context) & (self.labels == label))


def _cells(a, x, key, context_key, what, separator, controls, dose_key=None, numeric=()) -> _Cells:
    """``a``'s cells with canonical labels (its keys checked by :func:`_column` beforehand); with
    ``dose_key`` a perturbed cell's label carries its dose (``A @ 10``), so each dose is a group.
    ``numeric``: the keys read as numbers, as some file holds them (``1`` in one, ``1.0`` in another)."""
    labels = perturbation_labels(a, key, separator, controls, numeric=key in numeric)
    if dose_key:
        dose = pd.to_numeric(a.obs[dose_key], errors="coerce").to_numpy(np.float64)
        perturbed = labels != controls[0]
        if not np.isfinite(dose[perturbed]).all():
            raise ValueError(f"obs[{dose_key!r}] of the {what} must be a number for every perturbed cell")
        labels = np.array([f"{lab} @ {d:g}" if p else lab for lab, d, p in zip(labels, dose, perturbed)], dtype=object)
    contexts = _column(a, context_key, what) if context_key else np.full(a.n_obs, "all", dtype=object)
    if context_key in numeric:
        contexts = np.array([number_text(c) for c in contexts], dtype=object)
    return _Cells(x, labels, contexts, a)


def _group_name(context, label, context_key) -> str:
    return f"{context}/{label}" if context_key else str(label)


def _own_genes(label, index: dict, separator: str) -> list[int] | None:
    """The columns of the genes a perturbation ``label`` names (each single of a combination, a
    dose's `` @ 10`` aside), which its PDS leaves out: by name, else case-insensitively where one
    gene matches (a knockout labelled ``STAT1`` on mouse genes, ``Stat1``); ``None`` where it names none."""
    folded: dict[str, set] = {}
    for g, i in index.items():
        folded.setdefault(str(g).casefold(), set()).add(i)
    parts = str(label).split(" @ ")[0].split(separator)
    own = [index[p] if p in index else next(iter(folded[p.casefold()])) for p in parts
           if p in index or len(folded.get(p.casefold(), ())) == 1]
    return own or None


def _project_metrics(real: _Cells, pred: _Cells, groups, genes, control_label, project,
                     separator: str = "+") -> tuple[dict, dict]:
    """Per group, :func:`~scidiff.evaluation.perturbation.perturbation_metrics` plus the PDS
    (L1, cell-eval's definition) among the groups of the same context, each group's own genes
    (:func:`_own_genes`) left out of its distances."""
    per, effects = {}, {}
    for context, label, name in groups:
        true, ctrl = real.x[real.rows(context, label)], real.x[real.rows(context, control_label)]
        p = pred.x[pred.rows(context, label)]
        degs = rank_degs(true, ctrl, genes, min(100, len(genes)))
        per[name] = {"n_predicted": int(len(p)), "n_real": int(len(true)), "n_control": int(len(ctrl)),
                     **perturbation_metrics(p, true, ctrl, genes, degs, project)}
        effects[name] = (context, label, p.mean(0) - ctrl.mean(0), true.mean(0) - ctrl.mean(0))
    index = {**{g: i for i, g in enumerate(genes)}, **{g: i for i, g in enumerate(real.gene_names)}}
    for context in dict.fromkeys(c for c, _, _ in groups):
        names = [n for c, _, n in groups if c == context]
        if len(names) < 2:
            continue
        pds = discrimination_score(np.stack([effects[n][2] for n in names]), np.stack([effects[n][3] for n in names]),
                                   "l1", exclude=[_own_genes(effects[n][1], index, separator) for n in names])
        for n, v in zip(names, pds):
            per[n]["pds_l1"] = float(v)
    return per, _mean(per)


def _mean(per: dict) -> dict:
    keys = list(dict.fromkeys(k for row in per.values() for k in row if not k.startswith("n_")))
    out = {}
    for k in keys:
        vals = np.array([row[k] for row in per.values() if k in row], float)
        vals = vals[np.isfinite(vals)]
        if len(vals):
            out[k] = float(vals.mean())
    return out


def _cell_eval_pair(real: _Cells, pred: _Cells, groups, context, key, control_label):
    """(pred, real) AnnData of one context for cell-eval: the context's evaluated perturbations,
    and the real control cells in both."""
    labels = [label for c, label, _ in groups if c == context]
    ctrl = real.rows(context, control_label)

    def frame(x, lab):
        a = ad.AnnData(X=x.astype(np.float32), obs=pd.DataFrame({key: lab}, index=[f"c{i}" for i in range(len(lab))]))
        a.var_names = list(real.gene_names)  # by symbol where the file has them: cell-eval leaves a target gene out
        return a

    rows_p = np.concatenate([pred.rows(context, lab) for lab in labels])
    rows_r = np.concatenate([real.rows(context, lab) for lab in labels])
    p = frame(np.vstack([pred.x[rows_p], real.x[ctrl]]), np.concatenate([pred.labels[rows_p], real.labels[ctrl]]))
    r = frame(np.vstack([real.x[rows_r], real.x[ctrl]]), np.concatenate([real.labels[rows_r], real.labels[ctrl]]))
    return p, r


def _run_cell_eval(real, pred, groups, key, control_label, context_key, min_de_genes, num_threads):
    results = {}
    for context in dict.fromkeys(c for c, _, _ in groups):
        p, r = _cell_eval_pair(real, pred, groups, context, key, control_label)
        results[context] = run_cell_eval(p, r, key, control_label, min_de_genes=min_de_genes,
                                         num_threads=num_threads)
    return CellEvalResult.concat(results) if context_key else results["all"]


def evaluate_perturbation(real, predicted, perturbation_key: str, control_label="control", *,
                          separator: str = "+", context_key: str | None = None, dose_key: str | None = None,
                          baselines: dict | None = None, out_dir=None,
                          cell_eval: bool | str = "auto", min_de_genes: int = 10, num_threads: int = 1,
                          seed: int = 0, layer: str | None = None, use_raw: bool = False) -> dict:
    """Score predicted perturbation responses against the real perturbed cells.

    ``real``: real perturbed and control cells (AnnData or ``.h5ad``; counts are normalised to
    the library size the prediction records in ``uns['scidiff_prediction']['target_sum']``, else
    the real log1p values' own, else 1e4, and log1p'd, log1p is taken as is or, where every cell
    sums back to another total, rescaled to it; log2 is refused; from ``X``, or ``layers[layer]``
    or ``.raw`` with ``use_raw``); ``predicted``: predicted cells (``scidiff predict``'s
    output: log1p ``X``, taken as is, or rescaled alike; a prediction or baseline of counts,
    non-negative integers only, is normalised and log1p'd as the real counts are, and ``inputs``
    says which each file held) with the same ``obs[perturbation_key]`` (and ``obs[context_key]``)
    labels, numbers in one file matching their text in another;
    its rows labelled ``control_label`` are ignored (the real control cells are the reference).
    Labels are matched in canonical form (``B+A`` as ``A+B``, GEARS' ``A+ctrl`` as ``A``,
    combinations split at ``separator``; ``control_label``: one label or several, all taken as
    control), and groups are named by it.
    A group is one perturbation (in one context; with ``dose_key``, at one dose: ``A @ 10``); a
    predicted group without real cells (or without real control cells in its context), or with
    only one of either (the DEGs' Wilcoxon test needs two), is skipped and listed under ``skipped``;
    a real group the prediction has no cells of is listed under ``not_predicted``.

    Returns (and writes to ``out_dir/metrics.json``): per group and averaged over groups, the
    project's metrics (:mod:`scidiff.evaluation.perturbation`: RMSE / MAE of the per-gene means,
    Pearson delta, scGen R², MSE top-20, E-distance and MMD in 30 PCs of the real cells, and the
    PDS among the groups of a context); the same for each of ``baselines`` (``{name: AnnData or
    path}``, predictions of the same groups); and, with cell-eval installed (``cell_eval="auto"``;
    ``True`` requires it, ``False`` skips it), cell-eval's metrics and its ``score`` of the
    prediction against each baseline (:mod:`scidiff.evaluation.cell_eval`; DE overlap only where
    the real cells have at least ``min_de_genes`` significant DE genes).
    """
    t0 = time.perf_counter()
    out_dir, use_raw = _check_out_dir(out_dir), yes_no("use_raw", use_raw)
    for name, column in (("perturbation_key", perturbation_key), ("context_key", context_key),
                         ("dose_key", dose_key)):
        _key_argument(name, column)
    if isinstance(cell_eval, (bool, np.bool_)):  # np.False_ is not False: cell-eval ran
        cell_eval = bool(cell_eval)
    elif not (isinstance(cell_eval, str) and cell_eval == "auto"):  # 'no' ran it
        raise ValueError(f"cell_eval must be True, False or 'auto', got {cell_eval!r}")
    min_de_genes = whole_number("min_de_genes", min_de_genes, 0, what="an integer >= 0")
    real_ad, pred_ad = expression_as_x(_read(real, "real cells"), layer, use_raw), _read(predicted, "prediction")
    # RNA alone in every file (a baseline of measured cells may carry ADTs, guides: they are no library size)
    pred_ad = expression_as_x(pred_ad)
    base_ad = {str(n): expression_as_x(_read(b, f"baseline {n!r}")) for n, b in (baselines or {}).items()}
    controls = control_labels_of(control_label)
    files = [(real_ad, "real file"), (pred_ad, "prediction")] + [(b, f"baseline {n!r}") for n, b in base_ad.items()]
    for a, what in files:
        for key in [perturbation_key] + [k for k in (context_key,) if k]:
            _column(a, key, what, controls[0] if key == perturbation_key else None)  # before any expression
        if dose_key:  # a number for every perturbed cell (_cells); control cells may have none
            _has_key(a, dose_key, what)
    control_label = controls[0]
    numeric = {k for k in (perturbation_key, context_key) if k and any(numeric_column(a, k) for a, _ in files)}
    real_labels = set(perturbation_labels(real_ad, perturbation_key, separator, controls,
                                          numeric=perturbation_key in numeric))
    if control_label not in real_labels:
        hint = control_hint(real_labels, "--control-label") or (
            "; the changes are scored against the real control cells: include them in the real file")
        raise ValueError(f"no real cell has {perturbation_key} in {list(controls)} (--control-label); the real "
                         f"file's labels include {sorted(real_labels)[:10]}{hint}")
    written = set(real_ad.obs[perturbation_key].astype(str))
    if perturbation_key not in numeric and not any(separator in lab for lab in written):
        # A|B read at + is a group of its own, B|A another: the groups would not meet
        _separator_hint(perturbation_key, written, controls, separator, "the real file")
    genes = [str(g) for g in pred_ad.var_names]
    in_real = genes_of_in(pred_ad, real_ad, "genes of the prediction are not in the real file")
    for a, what in files:
        _unique_genes(a, in_real if a is real_ad else genes, what)
    labelled = {"separator": separator, "controls": controls, "dose_key": dose_key, "numeric": numeric}
    real_x, real_kind, target_sum = _real_log(real_ad, in_real, pred_ad)
    real_c = _cells(real_ad, real_x.astype(np.float64), perturbation_key, context_key, "real file", **labelled)
    real_c.gene_names = readable_names(real_ad.var, in_real)
    kinds = {"real file": real_kind, "target_sum": target_sum}
    pred_c = _cells(pred_ad, _predicted_matrix(pred_ad, genes, "prediction", kinds, target_sum), perturbation_key,
                    context_key, "prediction", **labelled)
    base_c = {n: _cells(b, _predicted_matrix(b, genes, f"baseline {n!r}", kinds, target_sum), perturbation_key,
                        context_key, f"baseline {n!r}", **labelled) for n, b in base_ad.items()}
    for name, a in [("prediction", pred_ad), *((f"baseline {n!r}", b) for n, b in base_ad.items())]:
        if kinds.get(name) == "counts" and a.n_vars < real_ad.n_vars:
            warn(f"the {name} holds counts over {a.n_vars} genes and the real file over {real_ad.n_vars}: "
                 "each cell is normalised over its file's genes, so the two scales differ; score "
                 "log1p-normalised predictions, or counts over the real file's genes")
    groups, skipped = [], {}
    pairs = dict.fromkeys(zip(pred_c.contexts, pred_c.labels))
    for context, label in pairs:
        if label == control_label:
            continue
        name = _group_name(context, label, context_key)
        n_real, n_control = len(real_c.rows(context, label)), len(real_c.rows(context, control_label))
        if not n_real:
            skipped[name] = "no real cells of this perturbation" + (" in this context" if context_key else "")
        elif not n_control:
            skipped[name] = "no real control cells in this context"
        elif n_real < 2 or n_control < 2:  # the DEGs' Wilcoxon test needs two cells a side
            skipped[name] = ("1 real cell of this perturbation" if n_real < 2 else "1 real control cell") + \
                (" in this context" if context_key else "") + " (the DE ranking needs at least 2)"
        else:
            groups.append((context, label, name))
    if not groups:
        raise ValueError(f"no predicted perturbation has real cells to be scored against (obs[{perturbation_key!r}]"
                         + (f" and obs[{context_key!r}]" if context_key else "") + f"); skipped: {skipped}")
    project = fit_pca(real_c.x, 30, seed)
    per, mean = _project_metrics(real_c, pred_c, groups, genes, control_label, project, separator)
    result = {"mode": "perturbation", "perturbation_key": perturbation_key, "control_label": control_label,
              "context_key": context_key, "dose_key": dose_key, "n_genes": len(genes),
              "n_real_cells": int(real_ad.n_obs), "n_predicted_cells": int(pred_ad.n_obs), "n_groups": len(groups),
              "inputs": kinds, "skipped": skipped,
              "not_predicted": [_group_name(c, lab, context_key) for c, lab in dict.fromkeys(zip(real_c.contexts,
                                real_c.labels)) if lab != control_label and (c, lab) not in pairs],
              "mean": mean, "per_perturbation": per, "baselines": {}}
    for n, b in base_c.items():
        have = [g for g in groups if len(b.rows(g[0], g[1]))]
        absent = [g[2] for g in groups if g not in have]
        if not have:
            names = [g[2] for g in groups][:10]
            raise ValueError(f"baseline {n!r} predicts none of the scored perturbations ({names})")
        b_per, b_mean = _project_metrics(real_c, b, have, genes, control_label, project, separator)
        result["baselines"][n] = {"mean": b_mean, "per_perturbation": b_per, "missing": absent}
    result["cell_eval"] = _cell_eval_section(cell_eval, real_c, pred_c, base_c, groups, perturbation_key,
                                             control_label, context_key, min_de_genes, num_threads)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if out_dir is not None:
        with staged_files(out_dir) as stage:  # a new folder is not left behind empty by a failed write
            stage(os.path.join(out_dir, "metrics.json"), lambda tmp: _write_json(tmp, result))
    return result


def _cell_eval_section(wanted, real_c, pred_c, base_c, groups, key, control_label, context_key, min_de_genes,
                       num_threads) -> dict:
    if wanted is False:
        return {"installed": None, "note": "not run (cell_eval=False)"}
    try:
        import cell_eval  # noqa: F401
    except ImportError:
        if wanted is True:
            raise ImportError(f"cell-eval is not installed: {INSTALL_HINT}") from None
        return {"installed": False, "note": CELL_EVAL_MISSING}
    args = (key, control_label, context_key, min_de_genes, num_threads)
    mine = _run_cell_eval(real_c, pred_c, groups, *args)
    out = {"installed": True, "version": cell_eval_version(), "prediction": mine.to_dict(), "baselines": {},
           "score": {}}
    for n, b in base_c.items():
        have = [g for g in groups if len(b.rows(g[0], g[1]))]
        theirs = _run_cell_eval(real_c, b, have, *args)
        out["baselines"][n] = theirs.to_dict()
        common = sorted(set(mine.per_perturbation) & set(theirs.per_perturbation))
        a = CellEvalResult({q: mine.per_perturbation[q] for q in common}, mine.mean)
        c = CellEvalResult({q: theirs.per_perturbation[q] for q in common}, theirs.mean)
        out["score"][n] = {**cell_eval_score(a, c), "n_perturbations": len(common)}
    return out


def _json_safe(o):
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.ndarray):
        return _json_safe(o.tolist())
    if isinstance(o, np.str_):
        return str(o)
    return o
