"""What a model can say about a perturbation it never saw: a closed-form map from what is known of
a perturbation (its features, :mod:`scidiff.data.perturbation_features`) to its gene-level effect,
fitted on the seen perturbations and cross-validated on them. The model carries it as
``model.perturbation_prior`` (saved inside ``model.pt``), and :func:`scidiff.tasks.perturb.perturb`
asks it (:meth:`PerturbationPrior.effect`) for a label outside the model's vocabulary.

For each perturbation covariate, with the seen single perturbations ``k`` (effect ``y_k``: the
mean change of its cells against the control cells of their own context, log1p, per gene; see
:func:`single_effects`) and features ``x_k`` (each block centred on the seen labels and scaled so
its rows have unit mean squared norm over them, blocks then weighted equally; a block a label lacks
is the seen labels' mean), the prior is

    y_hat(x) = s(x) + c * (b + W x),

- ``b + W x``: ridge regression with an unpenalised intercept ``b`` (solved in its dual, kernel
  form, so thousands of feature columns cost nothing), the penalty chosen among
  ``RIDGE_PENALTIES`` times the kernel's mean diagonal, or infinite (the intercept alone: the mean
  seen effect), by exact leave-one-perturbation-out cross-validation over the seen singles;
- ``c`` in [0, 1]: the shrinkage toward zero, ``<y, y_cv> / <y_cv, y_cv>``, each label's from the
  other labels' out-of-fold predictions (so the cross-validated error of the shrunk map is itself
  honest);
- ``s(x)``: for a target gene among the model's genes, the self-effect on that gene alone: zero,
  the mean effect of seen targets on their own gene, or that mean as a fraction of the gene's
  control mean (the ridge then fits what is left).

Each term is chosen by the one-standard-error rule (Breiman et al. 1984) over the candidates
ordered from the simplest (no map; the intercept alone; ridge from the largest penalty down; for
the self-effect: zero, constant, fraction): the simplest whose per-perturbation cross-validated
errors exceed the best's by at most one standard error of their paired differences. So a chance
improvement never switches a term on: with features that carry nothing (or too few seen labels,
fewer than ``MIN_LABELS``), the map is off, and with no self-effect either, every unseen
perturbation is "no change" with confidence 0. (On a synthetic linear truth the map recovers
held-out perturbations with R^2 > 0.99, ``tests/test_perturbation_prior.py``; on Papalexi's
knockouts, 8 or 9 of them described by the data, it keeps the self-effect alone.)

Every prediction is ``control + effect`` in expression; nothing here samples. The numbers of the
cross-validation (each penalty's error, the chosen one, the shrinkage, the self-effect's errors,
``cv_r2``) are in :meth:`PerturbationPrior.report`, printed at training and stored in
``training.json`` and in the checkpoint.

The seen singles' effects are fitted as the model's own (:func:`single_effects`, through
:func:`scidiff.models.effects.group_changes` and :func:`~scidiff.models.effects.fit_singles`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import anndata as ad
import numpy as np
import torch

from ..data.block_order import as_runs
from ..data.perturbation_features import DATA_SOURCE, MAX_CONTROL_CELLS, FeatureTable, build_feature_tables
from ..data.stream_setup import read_var, stream_group_moments
from .effects import _dose_columns, context_table, control_cells, fit_singles, group_changes, streamed_groups

FORMAT = "scidiff.perturbation_prior"
FORMAT_VERSION = 1
RIDGE_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # times the mean diagonal of the centred kernel
MIN_LABELS = 3  # seen labels needed to cross-validate a term (fewer: the term is off)


# -- the seen singles' effects --------------------------------------------------------------------

def single_effects(cells) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, int]], np.ndarray]:
    """The gene-level effect of every seen single perturbation of a
    :class:`~scidiff.data.CellData` (log1p), as the model's own effects are fitted
    (:func:`scidiff.models.effects.group_changes` and :func:`~scidiff.models.effects.fit_singles`):
    every group's (one context, i.e. one combination of the other categorical covariates' values,
    under one perturbation label) mean change against that context's control cells, then the
    weighted least-squares additive fit of the singles over the groups (for singles seen only
    alone: the cell-weighted mean of their changes over contexts). Doses are pooled; for one
    covariate, cells perturbed in another are left out. Returns ``(effects[key][label],
    cells[key][label], control mean, by_dose[key][label])``; a single seen in no context with
    controls is absent. ``by_dose``: with a dose key, each single's effect at each dose it was
    given at (:func:`dose_effects`; empty without one)."""
    spec = cells.spec
    x = cells.log_expression()  # group_changes accumulates in float64 by chunks of cells
    n = len(x)
    pkeys = [k for k in spec.perturbation_keys if k in cells.covariates]
    rows = {k: cells.covariates[k].numpy()[:, : len(spec.categorical[k])] for k in pkeys}
    control = control_cells(cells.covariates, pkeys) if pkeys else np.ones(n, bool)
    if not control.any():
        raise ValueError("no control cell (every perturbation covariate at a control label) to measure "
                         "effects against")
    others = [k for k in spec.categorical if k not in spec.perturbation_keys and k in cells.covariates]
    ctx = context_table({k: cells.covariates[k].numpy() for k in others}, others, n)
    dose = (np.asarray(cells.covariates[spec.dose_key], np.float64)
            if spec.dose_key and spec.dose_key in cells.covariates else None)
    effects, counts, by_dose = {}, {}, {}
    for k in pkeys:
        vocab = spec.categorical[k]
        keep = np.ones(n, bool)
        for o in pkeys:
            if o != k:
                keep &= rows[o].sum(1) == 0
        part = slice(None) if keep.all() else keep  # no copy of the cells when none is left out
        hot = (rows[k][part] > 0).astype(np.float32)
        _, design, changes, n_group, _ = group_changes(x[part], hot, ctx[part])
        effects[k], counts[k], by_dose[k] = {}, {}, {}
        if not len(design):
            continue
        singles = fit_singles(design, changes, n_group)
        cells_of = design.T @ n_group
        for j, label in enumerate(vocab):
            if cells_of[j] > 0:
                effects[k][label], counts[k][label] = singles[j], int(round(cells_of[j]))
        if dose is not None:
            columns, single_of, column_dose = _dose_columns(hot, dose[part])
            by_dose[k] = dose_effects(group_changes(x[part], columns, ctx[part]), single_of, column_dose, vocab)
    return effects, counts, x[control].mean(0, dtype=np.float64), by_dose


def dose_effects(grouped, single_of, column_dose, vocab) -> dict[str, list[tuple[float, np.ndarray]]]:
    """Each single's effect at each dose > 0 it was given at, ``{label: [(dose, effect [G]), ...]}``
    (up the doses), from :func:`~scidiff.models.effects.group_changes`' output over (single, dose)
    columns, fitted as the pooled effects are (:func:`~scidiff.models.effects.fit_singles`)."""
    _, design, changes, n_group, _ = grouped
    out: dict[str, list] = {}
    if not len(design):
        return out
    fitted, cells_of = fit_singles(design, changes, n_group), design.T @ n_group
    for j, (p, d) in enumerate(zip(single_of, column_dose)):
        if cells_of[j] > 0 and d > 0:
            out.setdefault(vocab[int(p)], []).append((float(d), fitted[j]))
    return out


# -- how an unseen perturbation's effect grows with its dose --------------------------------------

@dataclass
class DoseCurve:
    """The dose response the prior gives an unseen perturbation: ``scale[i]``, its effect at
    ``doses[i]`` as a fraction of its effect pooled over doses (what the map predicts), read
    linearly in ``log1p(dose)`` (the network's dose axis) between the measured doses and held at
    the ends; 0 at dose 0. One curve for the covariate: the least-squares scale of the seen
    singles' pooled effects to their effects at each dose, over the singles measured at several
    doses (drugs differ in potency; one shared curve is what can be said of a drug never seen).
    Kept only where leave-one-perturbation-out cross-validation chooses it over a flat response
    (the one-standard-error rule); flat (no ``doses``): the pooled effect at every dose > 0."""

    doses: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scale: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __call__(self, dose) -> np.ndarray:
        d = np.asarray(dose, np.float64)
        s = (np.interp(np.log1p(np.clip(d, 0, None)), np.log1p(self.doses), self.scale) if len(self.doses)
             else np.ones_like(d))
        return np.where(d > 0, s, 0.0)


def _shared_scale(pooled: dict, by_dose: dict, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(doses, scale)``: at each dose, ``sum_k <y_k(d), y_k> / sum_k <y_k, y_k>`` over ``labels``
    measured there (``y_k`` pooled, ``y_k(d)`` at dose ``d``)."""
    num, den = {}, {}
    for label in labels:
        y = pooled[label]
        for d, yd in by_dose[label]:
            num[d] = num.get(d, 0.0) + float(yd @ y)
            den[d] = den.get(d, 0.0) + float(y @ y)
    doses = np.array(sorted(d for d in den if den[d] > 0))
    return doses, np.array([num[d] / den[d] for d in doses])


def fit_dose_curve(pooled: dict[str, np.ndarray], by_dose: dict[str, list]) -> tuple[DoseCurve, dict]:
    """The :class:`DoseCurve` of one covariate and its cross-validation report: each single
    measured at two or more doses left out in turn, its effects at its doses predicted as the
    pooled effect times the curve of the others, against the pooled effect alone (flat)."""
    labels = sorted(k for k, v in by_dose.items() if k in pooled and len(v) >= 2 and pooled[k] @ pooled[k] > 0)
    report = {"n_dosed": len(labels), "doses": sorted({d for k in labels for d, _ in by_dose[k]})}
    if len(labels) < MIN_LABELS:
        return DoseCurve(), {**report, "kind": "flat", "why": f"fewer than {MIN_LABELS} perturbations measured at "
                                                                "two or more doses"}
    flat, curve = np.zeros(len(labels)), np.zeros(len(labels))
    for i, label in enumerate(labels):
        held = DoseCurve(*_shared_scale(pooled, by_dose, labels[:i] + labels[i + 1:]))
        y = pooled[label]
        for d, yd in by_dose[label]:
            flat[i] += float(np.sum((yd - y) ** 2))
            curve[i] += float(np.sum((yd - held(d) * y) ** 2))
    chosen = DoseCurve(*_shared_scale(pooled, by_dose, labels)) if _one_se([flat, curve]) == 1 else DoseCurve()
    return chosen, {**report, "kind": "shared" if len(chosen.doses) else "flat", "cv_sse_flat": float(flat.sum()),
                    "cv_sse_curve": float(curve.sum()),
                    "scale": {f"{d:g}": float(v) for d, v in zip(chosen.doses, chosen.scale)}}


# -- fitting, per perturbation covariate ----------------------------------------------------------

@dataclass
class _KeyPrior:
    """The fitted prior of one perturbation covariate (see the module docstring)."""

    table: FeatureTable
    seen_labels: list[str]
    seen_effects: np.ndarray                 # [n_seen, G], log1p
    n_cells: list[int]
    norm: dict[str, tuple[np.ndarray, float]]  # block -> (mean over the fit labels, scale)
    fit_labels: list[str]
    intercept: np.ndarray                    # b [G]
    dual: np.ndarray                         # [K, G]: W x = (x - mu) . Xc^T dual
    feature_mean: np.ndarray                 # mu [P]
    shrink: float                            # c
    penalty: float | None                    # absolute lambda (None: the intercept alone)
    self_kind: str                           # "none" | "constant" | "fraction"
    self_value: float
    cv: dict
    dose: DoseCurve = field(default_factory=DoseCurve)
    _fit_x: np.ndarray = field(default=None, repr=False)  # centred, normalised features of the fit labels

    def __post_init__(self):
        self._fit_x = (np.stack([self.features(lab) for lab in self.fit_labels]) - self.feature_mean
                       if self.fit_labels else np.zeros((0, self.feature_mean.size)))
        self._kinv = (np.linalg.inv(self._fit_x @ self._fit_x.T + self.penalty * np.eye(len(self.fit_labels)))
                      if self.penalty is not None and len(self.fit_labels) else None)

    def features(self, label) -> np.ndarray:
        """The label's normalised feature vector (zeros for blocks it lacks)."""
        rows, parts = self.table.rows(label), []
        active = [b for b in self.table.blocks if b.name in self.norm]
        weight = 1.0 / np.sqrt(max(len(active), 1))
        for block in active:
            mean, scale = self.norm[block.name]
            v = rows.get(block.name)
            parts.append(np.zeros(block.dims) if v is None else (np.asarray(v, np.float64) - mean) / scale * weight)
        return np.concatenate(parts) if parts else np.zeros(0)

    def similarity(self, label) -> tuple[float, str | None, float]:
        """``(coverage, nearest seen label, its cosine)``. Coverage: the share of the label's
        centred features ``v`` that the seen labels' span, as the ridge weighs it,
        ``v' Xc' (Xc Xc' + lambda I)^-1 Xc v / v'v`` in [0, 1] (1 for features at the seen
        labels' mean, and for the intercept-only map, which reads no feature)."""
        if not len(self.fit_labels):
            return 0.0, None, 0.0
        v = self.features(label) - self.feature_mean
        a = self._fit_x @ v
        norms = np.linalg.norm(self._fit_x, axis=1) * np.linalg.norm(v)
        cos = np.divide(a, norms, out=np.zeros(len(norms)), where=norms > 1e-12)
        j = int(np.argmax(cos))
        vv = float(v @ v)
        coverage = 1.0 if self._kinv is None or vv < 1e-12 else float(a @ self._kinv @ a) / vv
        return float(min(1.0, max(0.0, coverage))), self.fit_labels[j], float(cos[j])

    def ridge(self, label) -> np.ndarray:
        v = self.features(label) - self.feature_mean
        return self.intercept + (self._fit_x @ v) @ self.dual if len(self.fit_labels) else self.intercept


def _normalise_blocks(table: FeatureTable, labels: list[str]) -> dict[str, tuple[np.ndarray, float]]:
    """Per block, the mean and the scale (root mean squared centred norm) over ``labels`` that it
    describes; blocks constant over them (or describing fewer than 2) are left out."""
    norm = {}
    for block in table.blocks:
        rows = [table._row(block, lab) for lab in labels]
        rows = [i for i in rows if i is not None]
        if len(rows) < 2:
            continue
        v = block.values[rows].astype(np.float64)
        mean = v.mean(0)
        scale = float(np.sqrt(np.mean(np.sum((v - mean) ** 2, 1))))
        if scale > 1e-12:
            norm[block.name] = (mean, scale)
    return norm


def _one_se(errors: list[np.ndarray]) -> int:
    """The one-standard-error rule over candidates ordered from the simplest: the first whose
    per-label cross-validated errors exceed the best candidate's by no more than one standard error
    of their paired differences (so a chance improvement never switches a term on)."""
    totals = [float(e.sum()) for e in errors]
    best = int(np.argmin(totals))
    for m, e in enumerate(errors):
        d = e - errors[best]
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        if d.mean() <= se:
            return m
    return best


def _self_term(own: np.ndarray, base: np.ndarray) -> tuple[str, float, dict, np.ndarray]:
    """Choose the self-effect among zero, a constant and a fraction of the control mean by
    leave-one-out error over the seen targets' effects on their own gene (``own``; ``base``: those
    genes' control means). Returns (kind, value, CV errors, leave-one-out predictions)."""
    k = len(own)
    loo = {"none": np.zeros(k)}
    if k >= MIN_LABELS:
        loo["constant"] = (own.sum() - own) / (k - 1)
        num, den = own * base, base ** 2
        loo["fraction"] = np.divide(num.sum() - num, den.sum() - den, out=np.zeros(k),
                                    where=(den.sum() - den) > 1e-12) * base
    names = list(loo)
    per_label = [(own - loo[name]) ** 2 for name in names]
    errors = {name: float(e.sum()) for name, e in zip(names, per_label)}
    kind = names[_one_se(per_label)]
    if kind == "constant":
        value = float(own.mean())
    elif kind == "fraction":
        value = float((own * base).sum() / max((base ** 2).sum(), 1e-12))
    else:
        value = 0.0
    return kind, value, errors, loo[kind]


def _honest_shrink(target: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, float]:
    """Per label ``i``, ``c_i = clip(<t, p> / <p, p>, 0, 1)`` over the other labels' rows, and
    the deployed ``c`` over all of them."""
    tp, pp = np.sum(target * pred, 1), np.sum(pred * pred, 1)
    num, den = tp.sum() - tp, pp.sum() - pp
    c_i = np.clip(np.divide(num, den, out=np.zeros_like(num), where=den > 1e-12), 0.0, 1.0)
    c = float(np.clip(tp.sum() / pp.sum(), 0.0, 1.0)) if pp.sum() > 1e-12 else 0.0
    return c_i, c


def _fit_key(table: FeatureTable, effects: dict[str, np.ndarray], n_cells: dict[str, int], genes: list[str],
             control_mean: np.ndarray, penalties=RIDGE_PENALTIES, by_dose: dict | None = None) -> _KeyPrior:
    seen = sorted(effects)
    Y_all = np.stack([np.asarray(effects[s], np.float64) for s in seen]) if seen else np.zeros((0, len(genes)))
    fit_labels = [s for s in seen if table.describes(s)]
    gene_index = {g: i for i, g in enumerate(genes)}
    norm = _normalise_blocks(table, fit_labels)
    # feature vectors (zeros without an active block: such labels stay out of the ridge fit)
    probe = _KeyPrior(table, seen, Y_all, [n_cells.get(s, 0) for s in seen], norm, [], np.zeros(len(genes)),
                      np.zeros((0, len(genes))), np.zeros(sum(b.dims for b in table.blocks if b.name in norm)),
                      0.0, None, "none", 0.0, {})
    fit_labels = [s for s in fit_labels if any(b.name in norm for b in table.blocks if table._row(b, s) is not None)]
    K, G = len(fit_labels), len(genes)
    Y = np.stack([Y_all[seen.index(s)] for s in fit_labels]) if K else np.zeros((0, G))
    cv = {"n_seen": len(seen), "n_fit": K, "blocks": {b.name: {"source": b.source, "dims": b.dims,
                                                                  "rows": len(b.labels), "used": b.name in norm}
                                                        for b in table.blocks},
          "no_features": [s for s in seen if s not in fit_labels][:50]}

    # the self-effect: targets among the model's genes
    own_gene = [gene_index.get(table.gene_of(s)) if table.gene_targets else None for s in fit_labels]
    has_own = [i for i, o in enumerate(own_gene) if o is not None]
    S_loo, S_full = np.zeros((K, G)), np.zeros((K, G))
    self_kind, self_value = "none", 0.0
    if has_own:
        idx = np.array([own_gene[i] for i in has_own])
        own = Y[has_own, idx]
        self_kind, self_value, self_errors, loo = _self_term(own, control_mean[idx])
        S_loo[has_own, idx] = loo
        if self_kind != "none":
            S_full[has_own, idx] = self_value * (control_mean[idx] if self_kind == "fraction" else 1.0)
        cv["self"] = {"n_targets": len(has_own), "kind": self_kind, "value": self_value, "cv_sse": self_errors}

    sse_zero = float(np.sum(Y ** 2))
    T = Y - S_loo                      # what the shrunk map must explain, out of fold
    sse_self = float(np.sum(T ** 2))
    X = np.stack([probe.features(s) for s in fit_labels]) if K else np.zeros((0, probe.feature_mean.size))
    mu = X.mean(0) if K else np.zeros(X.shape[1])
    Xc = X - mu
    R = Y - S_full                     # the ridge's targets
    # candidates from the simplest: no map, the intercept alone, then ridge from the largest penalty
    candidates = [{"sse": sse_self, "relative": None, "shrink": 0.0, "per_label": np.sum(T ** 2, 1)}]
    table_cv = []
    scale = 1.0
    if K >= MIN_LABELS:
        Kc = Xc @ Xc.T
        evals, U = np.linalg.eigh((Kc + Kc.T) / 2)
        evals = np.clip(evals, 0.0, None)
        scale = float(np.mean(np.diag(Kc))) or 1.0
        J = np.full((K, K), 1.0 / K)
        for rel in [float("inf")] + sorted(penalties, reverse=True):
            H = J if np.isinf(rel) else J + (U * (evals / (evals + rel * scale))) @ U.T
            fitted = H @ R
            lev = np.clip(1.0 - np.diag(H), 1e-9, None)
            P = R - (R - fitted) / lev[:, None]          # exact leave-one-out predictions of the ridge
            c_i, c = _honest_shrink(T, P)
            per_label = np.sum((T - c_i[:, None] * P) ** 2, 1)
            table_cv.append({"relative_penalty": None if np.isinf(rel) else rel, "cv_sse": float(per_label.sum()),
                             "shrink": c})
            if c > 0:
                candidates.append({"sse": float(per_label.sum()), "relative": rel, "shrink": c,
                                   "per_label": per_label})
    best = candidates[_one_se([cand["per_label"] for cand in candidates])]
    shrink, rel = best["shrink"], best["relative"]
    sse_final = best["sse"]
    if sse_final >= sse_zero:                      # no better than no change: the prior says nothing
        shrink, rel, self_kind, self_value, sse_final = 0.0, None, "none", 0.0, sse_zero
        S_full[:] = 0.0
    R = Y - S_full
    cv.update({"cv_sse": sse_final, "cv_sse_no_change": sse_zero, "cv_sse_self_only": sse_self,
               "cv_mse": sse_final / max(K * G, 1), "cv_mse_no_change": sse_zero / max(K * G, 1),
               "cv_r2": (1.0 - sse_final / sse_zero) if sse_zero > 0 else 0.0, "penalties": table_cv,
               "relative_penalty": None if rel is None or np.isinf(rel) else rel,
               "intercept_only": rel is not None and bool(np.isinf(rel)), "shrink": shrink})
    if self_kind == "none" and "self" in cv:
        cv["self"]["kind"] = "none"
    # the deployed map on all fit labels, shrunk
    intercept, dual, penalty = np.zeros(G), np.zeros((K, G)), None
    if shrink > 0:
        intercept = R.mean(0)
        if not np.isinf(rel):
            penalty = rel * scale
            dual = np.linalg.solve(Xc @ Xc.T + penalty * np.eye(K), R - intercept)
    dose, cv["dose"] = fit_dose_curve(effects, by_dose or {})
    return _KeyPrior(table, seen, Y_all, [n_cells.get(s, 0) for s in seen], norm, fit_labels, intercept * shrink,
                     dual * shrink, mu, shrink, penalty, self_kind, self_value, cv, dose)


# -- the prior ------------------------------------------------------------------------------------

class PerturbationPrior:
    """Effects of unseen perturbations from their features (module docstring), per perturbation
    covariate. Plain numpy inside (not an ``nn.Module``): ``model.to(device)`` leaves it alone, and
    :meth:`effect` returns CPU tensors.

    Build it with :meth:`fit` (effects and feature tables given) or :meth:`from_cells` (a
    training set); save it with :meth:`to_state` (tensors and plain values, the checkpoint's
    ``perturbation_prior`` entry) and restore it with :meth:`from_state`."""

    def __init__(self, genes, gene_scale, control_mean, keys: dict[str, _KeyPrior], separator: str = "+",
                 control_labels=("control", "ctrl")):
        self.genes = [str(g) for g in genes]
        self.gene_scale = np.asarray(gene_scale, np.float64)
        self.control_mean = np.asarray(control_mean, np.float64)
        self.keys = dict(keys)
        self.separator, self.control_labels = separator, list(control_labels)

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, genes, effects: dict[str, dict[str, np.ndarray]], tables: dict[str, FeatureTable], *,
            control_mean=None, gene_scale=None, n_cells: dict[str, dict[str, int]] | None = None,
            separator: str = "+", control_labels=("control", "ctrl"), penalties=RIDGE_PENALTIES,
            by_dose: dict[str, dict[str, list]] | None = None) -> "PerturbationPrior":
        """Fit one prior per covariate of ``tables``: ``effects[key][label]`` are the seen singles'
        gene-level effects (log1p, over ``genes``), ``tables[key]`` what is known of each label.
        ``control_mean`` (log1p, per gene) scales the fractional self-effect; ``gene_scale``
        converts effects to the model's space (default 1); ``by_dose[key][label]``, the singles'
        effects at each dose (:func:`dose_effects`), the dose curve (:func:`fit_dose_curve`)."""
        genes = [str(g) for g in genes]
        G = len(genes)
        control_mean = np.zeros(G) if control_mean is None else np.asarray(control_mean, np.float64)
        keys = {}
        for key, table in tables.items():
            eff = {str(k): np.asarray(v, np.float64) for k, v in effects.get(key, {}).items()}
            bad = [k for k, v in eff.items() if v.shape != (G,)]
            if bad:
                raise ValueError(f"effects of {bad[:5]} for {key!r} are not vectors over the {G} genes")
            keys[key] = _fit_key(table, eff, (n_cells or {}).get(key, {}), genes, control_mean, penalties,
                                 (by_dose or {}).get(key))
        return cls(genes, np.ones(G) if gene_scale is None else gene_scale, control_mean, keys, separator,
                   control_labels)

    @classmethod
    def from_cells(cls, cells, adata, *, perturbation_features=None, smiles=None,
                   seed: int = 0) -> "PerturbationPrior | None":
        """The prior of a training set: ``cells`` (a :class:`~scidiff.data.CellData` in the model's
        space), ``adata`` the AnnData it was read from (for target genes beyond the model's).
        ``None`` when nothing describes any perturbation (labels are not gene names and no file is
        given)."""
        spec = cells.spec
        effects, counts, control_mean, by_dose = single_effects(cells)
        control = control_cells(cells.covariates, spec.perturbation_keys)
        return cls._from_effects(spec, effects, counts, control_mean, adata, control, perturbation_features, smiles,
                                 seed, by_dose=by_dose)

    @classmethod
    def from_streamed(cls, cells, *, perturbation_features=None, smiles=None,
                      seed: int = 0) -> "PerturbationPrior | None":
        """:meth:`from_cells` for cells streamed from a file (a :class:`scidiff.data.StreamedCells`):
        the seen singles' effects and the control cells' mean from one streamed pass in log1p
        (grouped as :func:`single_effects` groups cells in memory,
        :func:`scidiff.models.effects.streamed_groups`), and the data-derived gene features from
        the same seeded subsample of control cells :meth:`from_cells` reads, read from the file."""
        spec = cells.spec
        keys = list(spec.perturbation_keys)
        contexts = [k for k in spec.categorical if k not in keys and k in cells.covariates]
        groups = streamed_groups(cells, keys, contexts, dose_columns=False)
        dosed = ({f"{k} by dose": g for k, g in streamed_groups(cells, keys, contexts, spec.dose_key).items()}
                 if spec.dose_key and spec.dose_key in cells.covariates else {})
        moments = stream_group_moments(cells, {k: (g.cell_group, g.n_fine) for k, g in {**groups, **dosed}.items()},
                                       transform=cells.transform.without_scaling())  # one pass for both
        by_dose = {k: dose_effects(dosed[f"{k} by dose"].changes(moments[f"{k} by dose"]),
                                   dosed[f"{k} by dose"].single_of, dosed[f"{k} by dose"].column_dose,
                                   spec.categorical[k]) for k in keys if f"{k} by dose" in dosed}
        effects, counts = {}, {}
        for k, g in groups.items():
            _, design, changes, n_group, _ = g.changes(moments[k])
            effects[k], counts[k] = {}, {}
            if not len(design):
                continue
            singles, cells_of = fit_singles(design, changes, n_group), design.T @ n_group
            for j, label in enumerate(spec.categorical[k]):
                if cells_of[j] > 0:
                    effects[k][label], counts[k][label] = singles[j], int(round(cells_of[j]))
        rows = np.flatnonzero(control_cells(cells.covariates, keys))
        if not len(rows):
            raise ValueError("no control cell (every perturbation covariate at a control label) to measure effects "
                             "against")
        plain = groups[keys[0]].g_rows.sum(1) == 0  # the control cells' groups, one per context
        n_group, sums, _ = groups[keys[0]].merged(moments[keys[0]])
        control_mean = sums[plain].sum(0) / n_group[plain].sum()
        if len(rows) > MAX_CONTROL_CELLS:  # the subsample control_expression draws in memory
            rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_CONTROL_CELLS, replace=False))
        holder = ad.AnnData(X=cells.reader.read_matrix(as_runs(rows)))
        holder.var_names = [str(g) for g in cells.reader.var_names]
        if spec.gene_symbol_column:  # the symbols beside the IDs, for labels that name genes by symbol
            var = read_var(cells.reader.path, cells.reader.layout.key == "raw/X")
            if spec.gene_symbol_column in var.columns and list(var.index) == list(holder.var_names):
                holder.var[spec.gene_symbol_column] = var[spec.gene_symbol_column].to_numpy()
        return cls._from_effects(replace(spec, source={**spec.source, "layer": None, "use_raw": False}), effects,
                                 counts, control_mean, holder, np.ones(len(rows), bool), perturbation_features,
                                 smiles, seed, model_spec=spec, by_dose=by_dose)

    @classmethod
    def _from_effects(cls, spec, effects, counts, control_mean, adata, control, perturbation_features, smiles, seed,
                      model_spec=None, by_dose=None) -> "PerturbationPrior | None":
        singles = {k: list(spec.categorical[k]) for k in spec.perturbation_keys}
        tables = build_feature_tables(adata, spec, singles, control, perturbation_features=perturbation_features,
                                      smiles=smiles, seed=seed)
        tables = {k: t for k, t in tables.items() if t.blocks}
        if not tables:
            return None
        spec = model_spec or spec
        return cls.fit(spec.gene_names, effects, tables, control_mean=control_mean, gene_scale=spec.gene_scale,
                       n_cells=counts, separator=spec.separator, control_labels=spec.control_labels, by_dose=by_dose)

    # -- predicting -------------------------------------------------------------------------------
    def _key(self, key) -> _KeyPrior:
        if key not in self.keys:
            raise ValueError(f"the perturbation prior knows nothing of covariate {key!r}; it describes "
                             f"{sorted(self.keys) or 'no covariate'}")
        return self.keys[key]

    def _refusal(self, key: str, label: str) -> ValueError:
        kp = self.keys[key]

        def given(smiles: bool) -> str:  # each file under the flag it was given with
            files = list(dict.fromkeys(b.source for b in kp.table.blocks
                                       if b.source != DATA_SOURCE and (b.name == "morgan") == smiles))
            return f" (given at training: {', '.join(files)})" if files else ""

        could = []
        if kp.table.gene_targets:
            could.append("as a target gene measured in the training file: data-derived features are kept for its "
                         "genes (for a file too large for all: the model's genes and those named as labels, seen or "
                         f"rows of a --perturbation-features TSV), and {label!r} is not among them")
        could.append(f"as a row of a --perturbation-features TSV{given(False)}")
        if not kp.table.gene_targets:
            could.append(f"as a drug of a --smiles CSV (name,smiles){given(True)}")
        return ValueError(f"no prior knowledge of perturbation {label!r} for {key!r}: it was not seen in training and "
                          f"no feature table describes it. It could be described " + "; or ".join(could) +
                          ": add it there and train again. Seen perturbations: "
                          f"{kp.seen_labels[:10]}{' ...' if len(kp.seen_labels) > 10 else ''}")

    def _single(self, key: str, label: str) -> tuple[np.ndarray, float, dict]:
        kp = self._key(key)
        if label in kp.seen_labels:
            return kp.seen_effects[kp.seen_labels.index(label)], 1.0, {"route": "measured"}
        if not kp.table.describes(label):
            raise self._refusal(key, label)
        delta = kp.ridge(label) if kp.shrink > 0 else np.zeros(len(self.genes))
        gene = kp.table.gene_of(label)
        own = self.genes.index(gene) if gene is not None and gene in self.genes else None
        if own is not None and kp.self_kind != "none":
            delta = delta.copy()
            delta[own] += kp.self_value * (self.control_mean[own] if kp.self_kind == "fraction" else 1.0)
        r2 = max(0.0, min(1.0, float(kp.cv.get("cv_r2", 0.0))))
        sim, nearest, cosine = kp.similarity(label)
        if kp.shrink > 0:
            confidence, route = r2 * sim, "prior"
        elif own is not None and kp.self_kind != "none":
            confidence, route = r2, "prior (self-effect only)"
        else:
            confidence, route = 0.0, "prior (no change: the features did not beat no change in cross-validation)"
        return delta, float(confidence), {"route": route, "similarity": sim, "nearest_seen": nearest,
                                          "nearest_cosine": cosine, "cv_r2": r2, "target_gene": gene,
                                          "blocks": sorted(kp.table.rows(label))}

    def predict(self, key: str, label) -> tuple[np.ndarray, float, dict]:
        """``(effect [G] in log1p expression, confidence, details)`` of ``label`` (a single, a
        combination ``A+B`` as the sum of its singles with the lowest of their confidences, or a
        control label: zero). A seen single gives its measured effect, confidence 1."""
        label = str(label).strip()
        G = len(self.genes)
        parts = [p.strip() for p in label.split(self.separator) if p.strip()] if self.separator else [label]
        parts = list(dict.fromkeys(p for p in parts if p not in self.control_labels))  # A+A is A, as when seen
        if not parts:
            self._key(key)
            return np.zeros(G), 1.0, {"route": "control"}
        out, conf, details = np.zeros(G), 1.0, []
        for p in parts:
            d, c, info = self._single(key, p)
            out, conf = out + d, min(conf, c)
            details.append({"label": p, "confidence": c, **info})
        return out, conf, (details[0] if len(details) == 1 else {"route": "sum of singles", "singles": details})

    def effect(self, key: str, label) -> tuple[torch.Tensor, float]:
        """``(delta, confidence)``: the effect of ``label`` of covariate ``key`` in the model's space
        (``float32 [G]`` on the CPU: the log1p effect divided by each gene's scale) and a
        confidence in [0, 1].

        Confidence of an unseen label = ``cv_r2 * similarity``. ``cv_r2`` is the prior's
        leave-one-perturbation-out skill over predicting no change on the seen singles of the
        covariate, ``1 - sum |y - y_cv|^2 / sum |y|^2`` over all genes (0 when cross-validation
        switched every term off). ``similarity`` is how much of the label's features the seen
        labels span, as the ridge weighs them: with ``v`` its centred, normalised feature vector,
        ``Xc`` the seen labels' and ``lambda`` the chosen penalty,
        ``v' Xc' (Xc Xc' + lambda I)^-1 Xc v / v'v`` in [0, 1] (a label whose features are a
        combination of seen labels' scores near 1, one in directions no seen label took near 0; 1
        when the map is the intercept alone, which reads no feature). When the map is off and only
        the self-effect remains, a target gene among the model's genes gets ``cv_r2``, and any other
        label "no change" with confidence 0. A seen single returns its measured effect with
        confidence 1; a label nothing describes is a ValueError that names it and the files that
        could describe it."""
        delta, confidence, _ = self.predict(key, label)
        return torch.from_numpy((delta / self.gene_scale).astype(np.float32)), float(confidence)

    def dose_scale(self, key: str, dose) -> np.ndarray:
        """The fraction of an unseen perturbation's effect (:meth:`effect`, pooled over doses) it
        takes at ``dose`` (an array): its covariate's :class:`DoseCurve`; 0 at dose 0."""
        return self._key(key).dose(dose)

    def describe(self, key: str, label) -> dict:
        """How :meth:`effect` treats ``label``: the route (measured, prior, self-effect only, no
        change), its confidence, similarity and nearest seen label, the feature blocks used."""
        _, confidence, details = self.predict(key, label)
        return {"label": str(label), "confidence": confidence, **details}

    def described(self, key: str) -> list[str]:
        """Every label the feature tables of ``key`` describe (gene-target rows as gene names)."""
        return self._key(key).table.labels()

    # -- reporting --------------------------------------------------------------------------------
    def report(self) -> dict:
        """The cross-validation of each covariate's prior (plain values, for training.json)."""
        out = {}
        for key, kp in self.keys.items():
            cv = dict(kp.cv)
            cv["n_described"] = len(kp.table.labels())
            cv["self_effect"] = {"kind": kp.self_kind, "value": kp.self_value}
            out[key] = cv
        return out

    def summary(self) -> str:
        lines = []
        for key, cv in self.report().items():
            blocks = ", ".join(f"{n} ({b['dims']} columns, {b['rows']} rows, {b['source']})"
                               for n, b in cv["blocks"].items() if b["used"]) or "none usable"
            pen = ("off" if cv["shrink"] == 0 else "intercept only (the mean seen effect)" if cv["intercept_only"]
                   else f"ridge, penalty {cv['relative_penalty']:g} x mean kernel diagonal")
            se = cv["self_effect"]
            self_txt = ("none" if se["kind"] == "none" else
                        f"{se['kind']} {se['value']:+.3g}" + (" x control mean" if se["kind"] == "fraction" else ""))
            lines.append(
                f"perturbation prior for {key!r}: {cv['n_seen']} seen singles, {cv['n_fit']} with features; blocks: "
                f"{blocks}. Leave-one-perturbation-out CV: MSE {cv['cv_mse']:.4g} vs {cv['cv_mse_no_change']:.4g} "
                f"for no change (R2 {cv['cv_r2']:.3f}); map: {pen}, shrink {cv['shrink']:.2f}; self-effect: "
                f"{self_txt}; {cv['n_described']} labels described" + _dose_text(cv.get("dose")))
        return "\n".join(lines)

    # -- saving -----------------------------------------------------------------------------------
    def to_state(self) -> dict:
        """Tensors and plain values only (a checkpoint is read with ``weights_only=True``)."""
        def t(a):
            return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float64)))

        keys = {}
        for key, kp in self.keys.items():
            keys[key] = {"table": kp.table.to_state(), "seen_labels": list(kp.seen_labels),
                         "seen_effects": t(kp.seen_effects), "n_cells": [int(v) for v in kp.n_cells],
                         "norm": {n: {"mean": t(m), "scale": float(s)} for n, (m, s) in kp.norm.items()},
                         "fit_labels": list(kp.fit_labels), "intercept": t(kp.intercept), "dual": t(kp.dual),
                         "feature_mean": t(kp.feature_mean), "shrink": float(kp.shrink),
                         "penalty": None if kp.penalty is None else float(kp.penalty),
                         "self_kind": kp.self_kind, "self_value": float(kp.self_value), "cv": _plain(kp.cv),
                         "dose": {"doses": t(kp.dose.doses), "scale": t(kp.dose.scale)}}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "genes": list(self.genes),
                "gene_scale": t(self.gene_scale), "control_mean": t(self.control_mean), "separator": self.separator,
                "control_labels": list(self.control_labels), "keys": keys}

    @classmethod
    def from_state(cls, state: dict) -> "PerturbationPrior":
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("not a scidiff perturbation prior")
        if state.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"a perturbation prior written by a newer scidiff (format {state['format_version']})")
        keys = {}
        for key, s in state["keys"].items():
            keys[key] = _KeyPrior(FeatureTable.from_state(s["table"]), list(s["seen_labels"]),
                                  s["seen_effects"].numpy(), list(s["n_cells"]),
                                  {n: (v["mean"].numpy(), float(v["scale"])) for n, v in s["norm"].items()},
                                  list(s["fit_labels"]), s["intercept"].numpy(), s["dual"].numpy(),
                                  s["feature_mean"].numpy(), float(s["shrink"]), s["penalty"], s["self_kind"],
                                  float(s["self_value"]), dict(s["cv"]),
                                  DoseCurve(s["dose"]["doses"].numpy(), s["dose"]["scale"].numpy()) if "dose" in s
                                  else DoseCurve())  # written before the dose curve: flat
        return cls(state["genes"], state["gene_scale"].numpy(), state["control_mean"].numpy(), keys,
                   state.get("separator", "+"), state.get("control_labels", ("control", "ctrl")))


def _dose_text(dose: dict | None) -> str:
    """The summary's words on the dose curve (nothing where no perturbation had two doses)."""
    if not dose or not dose.get("n_dosed"):
        return ""
    if dose["kind"] == "flat":
        why = dose.get("why") or (f"the curve did not beat it in cross-validation (SSE {dose['cv_sse_curve']:.4g} vs "
                                  f"{dose['cv_sse_flat']:.4g})")
        return f"; dose response of an unseen perturbation: flat ({why})"
    scale = ", ".join(f"{d}: {v:.2f}" for d, v in dose["scale"].items())
    return (f"; dose response of an unseen perturbation: shared by {dose['n_dosed']} seen ones (CV SSE "
            f"{dose['cv_sse_curve']:.4g} vs {dose['cv_sse_flat']:.4g} flat), fraction of the pooled effect at each "
            f"dose {scale}")


def _plain(value):
    """``value`` with numpy scalars as Python numbers (checkpoint-safe)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
