"""The job behind ``scidiff design``: design cells toward a target phenotype from a trained model,
report how well they meet it and how realistic they are, and rank what could produce them.

Outputs, beside ``out`` (``designed.h5ad`` -> ``designed.report.json`` ...), each written to a
temporary name and renamed:

- ``out``: the designed cells (``X``, log1p-normalised, the model's genes), the source cells
  they started from in ``layers['source']`` and per-target hits in ``obs``;
- ``.report.json``: :func:`scidiff.evaluation.design.design_report` plus the rankings' heads;
- ``.report.png``: each target gene in designed, source and real cells of the nearest type;
- ``.screen.tsv``: perturbation conditions ranked (models with perturbation covariates);
- ``.genes.tsv``: genes ranked by integrated-gradients attribution along the designed path;
- ``.tfs.tsv``: TFs ranked by activity change (with ``tf_network``).
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pandas as pd
import torch

from ...checks import yes_no
from ...data import transform_like
from ...data.io import read_h5ad, temporary_beside, write_h5ad
from ...evaluation.design import design_plot, design_report
from ...training import load_model
from .._keywords import no_other_keywords, renamed
from .attribution import gene_attribution, read_tf_network, tf_activity_change, tf_weight_matrix
from .classifier import CellTypeClassifier
from .designer import InverseDesigner, _jsonable
from .screen import screen_perturbations, seen_combinations
from .targets import PhenotypeTarget


def output_paths(out) -> dict[str, str]:
    """The files of one design run, named after ``out`` (an ``.h5ad`` path)."""
    out = os.fspath(out)
    named = out.lower().endswith(".h5ad")  # 'DESIGN.H5AD' too
    stem = out[:-5] if named else out
    return {"cells": out if named else out + ".h5ad", "report": stem + ".report.json",
            "plot": stem + ".report.png", "screen": stem + ".screen.tsv", "genes": stem + ".genes.tsv",
            "tfs": stem + ".tfs.tsv"}


def _select(adata, conditions: dict, what: str):
    mask = np.ones(adata.n_obs, bool)
    for key, value in conditions.items():
        if key not in adata.obs:
            raise KeyError(f"{what}: obs key {key!r} is not in the data; available: {list(adata.obs.columns)}")
        col = adata.obs[key].astype(str)
        if value not in set(col):
            raise ValueError(f"{what}: no cells with {key}={value!r}; values: {sorted(set(col))[:20]}")
        mask &= (col == value).to_numpy()
    if not mask.any():
        raise ValueError(f"{what}: no cells match {conditions}")
    return adata[mask].copy()


def _cell_type_key(model, adata, cell_type: str, key: str | None) -> str | None:
    """The obs key / model covariate whose values include ``cell_type``."""
    if key is not None:
        return key
    spec = model.data_spec
    for k, vocab in spec.categorical.items():
        if k not in spec.perturbation_keys and cell_type in vocab:
            return k
    if adata is not None:
        for k in adata.obs.columns:
            col = adata.obs[k]
            if (col.dtype == object or isinstance(col.dtype, pd.CategoricalDtype)) and cell_type in set(col.astype(str)):
                return k
    return None


def _staged(path, write) -> str:
    """``write(tmp)`` to a temporary file beside ``path`` (:func:`temporary_beside`), its name
    returned for the caller to rename once every file of the run is written; removed on an error."""
    tmp = temporary_beside(path)
    try:
        write(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def _write_json(data, path) -> None:
    with open(path, "w") as fh:
        fh.write(json.dumps(_jsonable(data), indent=1))


def run_design(model, target, out, *, data=None, source: dict | None = None,
               condition: dict | None = None, cell_type: str | None = None, cell_type_key: str | None = None,
               tf_network=None, n: int = 256, steps: int = 50, objective_scale: float = 10.0,
               backward_steps: int = 0, guidance_scale: float | None = None, tolerance: float = 0.1,
               realism_weight: float = 0.0, eta: float | None = None,
               select: str | None = None, screen_cells: int = 128, retries: int = 2,
               observed: bool | None = None,
               condition_measurement: bool = True, seed: int = 0, screen: bool = True, attribution: bool = True,
               progress: bool = True, **deprecated) -> dict:
    """Design ``n`` cells toward ``target`` (``"IL2RA>=5,FOXP3>=4,CD8A<=0.1"`` or a
    :class:`PhenotypeTarget`) and write the outputs of the module notes; returns the report.

    ``model``: a run folder, checkpoint or model. ``data``: real cells (``.h5ad`` or AnnData) for
    the report's realism, the cell-type classifier and the source cells. ``source``: obs labels
    picking the cells to start from (``{'cell_type': 'CD4T', 'condition': 'control'}``); without
    it cells start from noise and the unguided samples from the same noise are the comparison.
    ``cell_type``: a label of ``cell_type_key`` (found among the model's covariates or obs): the
    design is conditioned on it where the model knows it, and a classifier trained on ``data``
    scores it. ``tf_network``: a TSV of TF -> target edges. ``objective_scale``: the pull toward
    the target; ``guidance_scale``: classifier-free guidance on the condition (default 1;
    ``cfg_scale=`` is its deprecated name). ``eta``, ``select``, ``screen_cells``, ``retries``: see
    :meth:`~scidiff.tasks.design.InverseDesigner.design`; ``observed``: design measured cells
    (see :class:`~scidiff.tasks.design.InverseDesigner`; by default where the model has a fitted
    detection model), their target genes measured within the targets unless
    ``condition_measurement=False``."""
    (guidance_scale,) = renamed("run_design", deprecated, {"cfg_scale": ("guidance_scale", guidance_scale)})
    no_other_keywords("run_design", deprecated)
    condition_measurement, screen, attribution, progress = (yes_no(name, value) for name, value in (  # 'no' is true
        ("condition_measurement", condition_measurement), ("screen", screen), ("attribution", attribution),
        ("progress", progress)))
    cfg_scale = 1.0 if guidance_scale is None else float(guidance_scale)
    if not isinstance(model, torch.nn.Module):
        model = load_model(model)
    observed = model.resolve_observed(observed)
    if not observed and not condition_measurement:
        raise ValueError("a free measurement (--free-measurement) applies to measured cells, and these are smooth "
                         "(--smooth, or a model without a fitted detection model): add --observed (with --data to "
                         "fit one)")
    spec = model.data_spec
    paths = output_paths(out)
    if not isinstance(target, PhenotypeTarget):
        target = PhenotypeTarget.parse(target, cell_type=cell_type, tolerance=tolerance)
    elif cell_type is not None:
        target.cell_type = cell_type
    if target.constraints:  # fail on a bad gene before any work
        target.check_in(spec)
    if tf_network is not None and not isinstance(tf_network, pd.DataFrame):
        tf_network = read_tf_network(tf_network)
    if tf_network is not None:  # targets named by symbol match the model's IDs (gene_symbols)
        with warnings.catch_warnings():  # a network of another species: said once, when it is scored
            warnings.simplefilter("ignore")
            tf_weight_matrix(tf_network, spec.gene_names, gene_symbols=spec.gene_symbols)  # no overlap: fail now
    adata = None if data is None else (data if not isinstance(data, (str, os.PathLike)) else read_h5ad(data))
    condition = dict(condition or {})
    classifier = None
    if target.cell_type is not None:
        if cell_type_key is not None and cell_type_key not in spec.categorical and (
                adata is None or cell_type_key not in adata.obs):
            raise ValueError(f"--cell-type-key {cell_type_key!r} is neither a covariate of the model "
                             f"({sorted(spec.categorical)}) nor an obs key of --data"
                             + (f" ({list(adata.obs.columns)})" if adata is not None else " (none given)"))
        key = _cell_type_key(model, adata, target.cell_type, cell_type_key)
        in_model = key in spec.categorical and target.cell_type in spec.categorical.get(key, [])
        if in_model and key != select:  # a selected covariate is drawn per cell, scored by the classifier
            condition.setdefault(key, target.cell_type)
        if adata is not None and key is not None and key in adata.obs:
            if pd.api.types.is_numeric_dtype(adata.obs[key]) and not pd.api.types.is_bool_dtype(adata.obs[key]):
                raise ValueError(f"--cell-type-key {key!r} is a numeric column of --data; give the obs column "
                                 f"of the cell-type labels")
            classifier = CellTypeClassifier.fit_anndata(adata, key, model, seed=seed)
        elif not in_model:
            raise ValueError(f"cell type {target.cell_type!r} is neither a value of the model's covariates "
                             f"{ {k: v for k, v in spec.categorical.items()} } nor found in obs of the data; give "
                             "--data with the labelled real cells (and --cell-type-key)")
        if classifier is None:
            if key == select:
                raise ValueError(f"--select {select} would draw the cell type per cell, but without --data nothing "
                                 f"scores --cell-type {target.cell_type!r}: give --data with the labelled real "
                                 f"cells, or drop --select to decode every cell under {key}={target.cell_type}")
            if not target.constraints:
                raise ValueError(f"--cell-type {target.cell_type!r} alone: the design is decoded under "
                                 f"{key}={target.cell_type}, but without --data nothing scores the cell type and "
                                 "there is no gene target to guide toward; add gene targets (--target) or --data "
                                 "with the labelled real cells")
            target.cell_type = None  # conditioning carries it; nothing can score it without real cells
    if target.is_empty():
        target.check()
    detection_note = None
    detection = getattr(model, "detection", None)
    if observed and detection is not None and not bool(detection.fitted):  # a checkpoint from before it
        if adata is None:
            raise ValueError("this checkpoint's detection model is not fitted (it predates it): give --data with "
                             "real cells in the model's genes to fit it on, or retrain")
        model.fit_detection(transform_like(spec, adata, condition_keys=[]).x)
        detection_note = f"fitted on the {adata.n_obs} cells of --data (the checkpoint had none)"
    designer = InverseDesigner(model, classifier=classifier, realism_weight=realism_weight, observed=observed)
    designer.check(target)
    source_cells = None
    if source:
        if adata is None:
            raise ValueError("source cells are picked from the real cells: give --data")
        source_cells = _select(adata, source, "source")
    kw = dict(steps=steps, backward_steps=backward_steps, cfg_scale=cfg_scale, seed=seed, progress=False)
    result = designer.design(target, n, source=source_cells, condition=condition or None,
                             objective_scale=objective_scale, eta=eta, select=select, screen_cells=screen_cells,
                             retries=retries, condition_measurement=condition_measurement,
                             **{**kw, "progress": progress})  # the comparison below runs quietly
    start = paired = result.source
    if start is None:  # the comparison: the unguided samples from the same noise (not resampled toward the target)
        start = designer.design(target, n, condition=condition or None, objective_scale=0.0, resample=False,
                                eta=result.settings["eta"], **{**kw, "backward_steps": 0}).expression
        # row by row, the unguided cell of the noise each designed cell descends from (resampling copies some)
        paired = start if result.ancestors is None else start[result.ancestors]
    real = labels = None
    if adata is not None:
        cells = transform_like(spec, adata, condition_keys=[])
        real = cells.log_expression().clip(min=0)
        keys = [k for k in spec.categorical if k in adata.obs]
        if target.cell_type is not None and cell_type_key and cell_type_key not in keys:
            keys = [cell_type_key] + keys
        labels = (adata.obs[keys].astype(str).agg(" | ".join, axis=1).to_numpy() if keys
                  else np.array(["real"] * adata.n_obs))
    report = design_report(result.expression, spec.gene_names, target, met=result.met, source=start, real=real,
                           real_labels=labels, seed=seed)
    report["settings"] = result.settings
    if detection_note:
        report["detection_model"] = detection_note
    report["condition"] = {k: sorted(set(map(str, v))) for k, v in result.condition.items()}
    report["source"] = source or "noise (comparison: unguided samples from the same noise)"
    if classifier is not None:
        report["cell_type_classifier"] = {"key": cell_type_key or _cell_type_key(model, adata, target.cell_type, None),
                                          "classes": classifier.classes,
                                          "validation_accuracy": classifier.validation_accuracy}
    tables = {}  # computed first, then every file written, all renamed at the end
    if screen and spec.perturbation_keys:
        tables["screen"] = screen_perturbations(designer, target, source_cells if source_cells is not None else None,
                                                combinations=seen_combinations(model, adata) if adata is not None
                                                else None, condition=condition or None, n_cells=min(n, 256),
                                                steps=steps, seed=seed, progress=progress)
        report["screen_top"] = tables["screen"].head(10).to_dict("records")
    if attribution and target.constraints:
        tables["genes"] = genes = gene_attribution(designer, target, paired, result.expression)
        report["genes_top"] = genes.head(20).to_dict("records")
        report["attribution_totals"] = dict(genes.attrs)
    if tf_network is not None:
        tables["tfs"] = tfs = tf_activity_change(paired, result.expression, tf_network, spec.gene_names,
                                                 gene_symbols=spec.gene_symbols)
        report["tfs_top"] = tfs.head(20).to_dict("records")
        report["tfs_scored"] = {"network": tf_network.attrs.get("path", "a DataFrame"), "method": tfs.attrs["method"],
                                "comparison": "designed - source cells, each TF's mean activity",
                                "n_tfs": len(tfs)}
    staged = {}  # a failure on the way (a full disk, the plot) leaves the last run's files, not a mix of two runs
    try:
        for name, table in tables.items():
            staged[name] = _staged(paths[name], lambda tmp, t=table: t.to_csv(tmp, sep="\t", index=False))
        if target.constraints:
            reference = None
            if real is not None:
                reference = real[labels == report["realism"]["nearest_type"]]
            staged["plot"] = _staged(paths["plot"], lambda tmp: design_plot(
                result.expression, spec.gene_names, target, tmp, source=start, reference=reference,
                reference_name=report.get("realism", {}).get("nearest_type", "real")))
        cells = result.to_anndata()
        if result.source is None:
            cells.layers["source"] = paired.astype(np.float32)
            cells.uns["scidiff_design"]["source"] = "unguided samples from the same noise"
        staged["cells"] = _staged(paths["cells"], lambda tmp: write_h5ad(cells, tmp))
        report["files"] = {k: os.path.abspath(paths[k]) for k in [*staged, "report"]}
        staged["report"] = _staged(paths["report"], lambda tmp: _write_json(report, tmp))
    except BaseException:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for name, tmp in staged.items():  # the report last
        os.replace(tmp, paths[name])
    for name, path in paths.items():  # an earlier run's file this run does not write would sit beside other cells
        if name not in staged and os.path.exists(path):
            os.remove(path)
    return report
