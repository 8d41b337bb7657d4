"""Perturbation effects at the gene level, fitted in closed form from the training cells.

A perturbation model needs three things beside its network, all fitted here once, before
training, and stored in the checkpoint (:class:`PerturbationEffects`):

- **Single effects.** Each single perturbation's change of mean expression, pooled over the
  contexts (cell types, patients, lines: the other categorical covariates) where it was seen: the
  weighted least-squares fit of every group's change (a group is one context under one
  perturbation label; its change is its mean minus the mean of that context's control cells) on
  the additive model ``change(S) = sum_{p in S} e_p`` (the additive combination of CPA and GEARS,
  Lotfollahi et al. 2023, Roohani et al. 2024). The model's latent is widened by these directions
  (:meth:`scidiff.models.ScIDiffModel.from_data`), so a single's gene-level change, and any sum of
  them, is representable exactly.
- **The combination term**, chosen by leave-one-combination-out cross-validation over the
  combinations seen in training (each held-out combination predicted from singles refitted
  without it): additive, a scaled sum ``lambda * s`` or the saturating polynomial
  ``s + a (s^2 - sum_p e_p^2) + b (s^3 - sum_p e_p^3)`` (``s = sum_p e_p``; for two singles its
  correction is ``2a xy + 3b xy (x + y)``). A candidate is used only where it beats additive in
  the cross-validation by more than the standard error of the gain (the one-standard-error rule,
  Breiman et al. 1984) and by at least 5% of additive's error; otherwise the term is zero. The fit reports every candidate's error.
- **Where each perturbation was seen**, and a reference of training control cells per context
  (their latent codes), so that :func:`scidiff.tasks.perturb.perturb` can move a context's own
  cells by an effect learned elsewhere (weighted by the nearest reference cells' contexts).

Everything is in the model's space (scaled log1p expression).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data.rows import unique_rows
from ..data.stream_setup import stream_group_moments
from .shrinkage import adaptive_shrinkage

COMBINATIONS = ("additive", "scaled", "polynomial")
MIN_GAIN = 0.05  # a combination term must remove this share of additive's held-out error
REFERENCE_CELLS = 256  # control cells kept per context for the nearest-neighbour weights
SUPPORT_NEIGHBOURS = 10  # neighbours whose mean distance tells a cell inside a context's cells from one outside
CONTROL_QUANTILES = 32  # quantiles kept per context and gene of the control cells' expression
QUANTILE_CELLS = 5000  # control cells per context they are read from (a random subset beyond)


def _rows_of(table: torch.Tensor, context) -> torch.Tensor:
    """Which rows of a context table ``[R, K]`` are ``context`` (with ``K = 0``, every row)."""
    return (table == torch.as_tensor(np.asarray(context), dtype=torch.long).reshape(1, -1)).all(1)


def context_table(covariates: dict, keys: list[str], n: int) -> np.ndarray:
    """``[N, len(keys)]`` codes of the context covariates (no column without keys)."""
    if not keys:
        return np.zeros((n, 0), dtype=np.int64)
    return np.stack([np.asarray(covariates[k]).astype(np.int64) for k in keys], 1)


def unperturbed_cells(covariate) -> np.ndarray:
    """Which cells carry no perturbation of a covariate (per-cell table or streamed codes)."""
    table = getattr(covariate, "table", None)
    if table is not None:
        return (np.asarray(table)[:, :-1].sum(1) == 0)[np.asarray(covariate.index)]
    return np.asarray(covariate[:, :-1].sum(1)) == 0


def control_cells(covariates: dict, keys) -> np.ndarray:
    """Which cells carry no perturbation of any covariate ``keys`` (the control cells)."""
    n = len(next(iter(covariates.values())))
    return np.logical_and.reduce([unperturbed_cells(covariates[k]) for k in keys] or [np.ones(n, bool)])


class StreamedGroups:
    """One perturbation covariate's groups over cells streamed from a file: ``cell_group``, each
    file row's fine group (context, label, dose; -1 for a row left out) of ``n_fine``; the
    groups :func:`group_changes` would form (context rows ``g_ctx``, design rows ``g_rows`` over
    (single, dose) columns ``single_of`` / ``column_dose``, ``n_singles`` singles) and ``order``,
    each fine group's group (several fine groups of control cells at different doses share one)."""

    def __init__(self, cell_group, n_fine, g_ctx, g_rows, order, single_of, column_dose, n_singles):
        self.cell_group, self.n_fine, self.g_ctx, self.g_rows = cell_group, n_fine, g_ctx, g_rows
        self.order, self.single_of, self.column_dose, self.n_singles = order, single_of, column_dose, n_singles

    def merged(self, moments) -> list[np.ndarray]:
        """The groups' ``(counts, sums, squares)`` from the fine groups'."""
        merged = [np.zeros((len(self.g_rows),) + np.shape(a)[1:]) for a in moments]
        for total, part in zip(merged, moments):
            np.add.at(total, self.order, part)
        return merged

    def changes(self, moments):
        """:func:`group_changes`' output from the fine groups' ``(counts, sums, squares)``."""
        return changes_of_groups(self.g_ctx, self.g_rows, *self.merged(moments))


def streamed_groups(cells, keys, context_keys, dose_key: str | None = None,
                    dose_columns: bool = True) -> dict[str, StreamedGroups]:
    """:class:`StreamedGroups` of every perturbation covariate ``keys`` of streamed ``cells``,
    from their codes alone, as :meth:`PerturbationEffects.fit` groups cells in memory (for one
    covariate, cells perturbed in another are left out; contexts are ``context_keys``).
    ``dose_columns=False``: the design is the plain multi-hot over all singles, doses pooled
    (:func:`scidiff.models.perturbation_prior.single_effects`' grouping)."""
    ids = cells.cell_ids()
    ctx = context_table({k: np.asarray(cells.covariates[k])[ids] for k in context_keys}, context_keys, len(ids))
    dose = (np.asarray(cells.covariates[dose_key], np.float64)[ids] if dose_key and dose_columns
            else np.zeros(len(ids)))
    control = {k: unperturbed_cells(cells.covariates[k])[ids] for k in keys}
    out = {}
    for key in keys:  # a streamed perturbation covariate: its labels' multi-hot rows, each file row's label
        rows, label = np.asarray(cells.covariates[key].table)[:, :-1], np.asarray(cells.covariates[key].index)
        alone = np.logical_and.reduce([control[o] for o in keys if o != key] or [np.ones(len(ids), bool)])
        distinct, row_of_label = np.unique(rows, axis=0, return_inverse=True)
        label_row = row_of_label.reshape(-1)[label[ids][alone]][:, None]
        (g_ctx, g_row, g_dose), member, _ = unique_rows(ctx[alone], label_row, dose[alone][:, None])
        cell_group = np.full(cells.reader.n_cells, -1, np.int64)
        cell_group[ids[alone]] = member
        design = distinct[g_row[:, 0]]
        if dose_columns:
            columns, single_of, column_dose = _dose_columns(design, g_dose[:, 0])
        else:
            columns, single_of, column_dose = design, np.arange(design.shape[1]), np.zeros(design.shape[1])
        g_ctx, g_rows, order = _groups(columns, g_ctx)  # the groups group_changes would form
        out[key] = StreamedGroups(cell_group, len(g_row), g_ctx, g_rows, order, single_of, column_dose,
                                  rows.shape[1])
    return out


def _groups(rows: np.ndarray, ctx: np.ndarray):
    """Distinct (context, perturbation set) groups, in lexicographic order of (context codes,
    multi-hot): their context rows, multi-hot rows (float64) and each cell's group number."""
    (g_ctx, g_rows), index, _ = unique_rows(ctx, rows)
    return g_ctx.astype(np.int64), g_rows.astype(np.float64), index


def _group_moments(x: np.ndarray, index: np.ndarray, n_groups: int, chunk: int = 16_384):
    """Per group, the sum and the sum of squares of the cells ``x [N, G]`` (float64, accumulated
    in chunks of cells so that no float64 copy of ``x`` is made)."""
    from scipy import sparse

    sums, squares = np.zeros((n_groups, x.shape[1])), np.zeros((n_groups, x.shape[1]))
    for start in range(0, len(x), chunk):
        part = np.asarray(x[start:start + chunk], np.float64)
        member = sparse.csr_matrix((np.ones(len(part)), (index[start:start + chunk], np.arange(len(part)))),
                                   shape=(n_groups, len(part)))
        sums += member @ part
        squares += member @ (part * part)
    return sums, squares


def group_changes(x: np.ndarray, rows: np.ndarray, ctx: np.ndarray):
    """Every perturbed group's mean change against its context's control cells.

    ``x [N, G]`` cells, ``rows [N, n]`` single-perturbation weights (multi-hot times dose
    weight; all zero for control), ``ctx [N, K]`` context codes. Returns ``(contexts [M, K],
    design [M, n], changes [M, G], counts [M], se2 [M, G])`` for the perturbed groups whose
    context has control cells; ``se2`` is each change's squared standard error (the group's and
    the controls' variance over their counts; a group of one cell takes the variance of all cells)."""
    g_ctx, g_rows, index = _groups(rows, ctx)
    counts = np.bincount(index, minlength=len(g_rows)).astype(np.float64)
    sums, squares = _group_moments(x, index, len(g_rows))
    return changes_of_groups(g_ctx, g_rows, counts, sums, squares)


def changes_of_groups(g_ctx: np.ndarray, g_rows: np.ndarray, counts: np.ndarray, sums: np.ndarray,
                      squares: np.ndarray):
    """:func:`group_changes` from every group's (in :func:`_groups`' order) context row, multi-hot
    row, cell count, and sum and sum of squares of its cells (float64): what a streamed pass
    accumulates (:func:`scidiff.data.stream_setup.stream_group_moments`)."""
    n_cells, n_genes = float(counts.sum()), sums.shape[1]
    means = sums / np.maximum(counts, 1)[:, None]
    variances = (squares - counts[:, None] * means**2) / np.maximum(counts - 1, 1)[:, None]
    if (counts == 1).any():  # a group of one cell takes the variance of all cells
        mean_all = sums.sum(0) / n_cells
        everyone = ((squares.sum(0) - n_cells * mean_all**2) / (n_cells - 1) if n_cells > 1
                    else np.zeros(n_genes))
        variances = np.where(counts[:, None] > 1, variances, np.maximum(everyone, 0))
    variances = np.maximum(variances, 0)
    control = g_rows.sum(1) == 0
    base = {tuple(c): i for i, c in enumerate(g_ctx) if control[i]}
    keep = [i for i in range(len(g_rows)) if not control[i] and tuple(g_ctx[i]) in base]
    ref = [base[tuple(g_ctx[i])] for i in keep]
    changes = (means[keep] - means[ref]).reshape(len(keep), n_genes)
    se2 = (variances[keep] / counts[keep, None] + variances[ref] / counts[ref, None]).reshape(len(keep), n_genes)
    return g_ctx[keep], g_rows[keep], changes, counts[keep], se2


def fit_singles(design: np.ndarray, changes: np.ndarray, counts: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Weighted least squares ``min sum_g n_g |c_g - d_g E|^2`` -> single effects ``E [n, G]``
    (a single never seen, alone or in a combination, gets 0)."""
    return _pooling_weights(design, counts, ridge) @ changes


def _pooling_weights(design: np.ndarray, counts: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """``A [n, M]`` with ``fit_singles(design, changes, counts) == A @ changes``."""
    gram = design.T @ (counts[:, None] * design)
    scale = max(float(np.trace(gram)) / max(len(gram), 1), 1.0)
    return np.linalg.solve(gram + ridge * scale * np.eye(len(gram)), design.T * counts)


def seen_group_means(design: np.ndarray, changes: np.ndarray, counts: np.ndarray, se2: np.ndarray,
                     chunk: int = 512) -> np.ndarray:
    """Each seen group's mean change ``[M, G]``, estimated by two-level empirical Bayes: the pooled
    (additive least-squares) change of its perturbations, shrunk toward zero, plus the group's own
    departure from it (the context's interaction), shrunk toward zero
    (:func:`scidiff.models.shrinkage.adaptive_shrinkage`, each with its exact standard error
    from ``se2``). Contexts that agree share one estimate; a context that truly differs keeps its
    departure; a change within its noise is set to zero."""
    pool = _pooling_weights(design, counts)
    # the pooled change depends on the group's perturbations alone: shrunk once per distinct design row
    (distinct,), which, _ = unique_rows(design)
    pooled = np.zeros((len(distinct), changes.shape[1]))
    for start in range(0, len(distinct), chunk):
        coef = distinct[start:start + chunk] @ pool
        coef[np.abs(coef) < 1e-12] = 0.0
        pooled[start:start + chunk] = adaptive_shrinkage(coef @ changes, coef**2 @ se2)
    out = pooled[which]
    for start in range(0, len(design), chunk):
        rows = slice(start, min(start + chunk, len(design)))
        coef = design[rows] @ pool  # [c, M]: pooled change = coef @ changes
        coef[np.abs(coef) < 1e-12] = 0.0
        own = np.zeros_like(coef)
        own[np.arange(len(coef)), np.arange(rows.start, rows.stop)] = 1.0
        out[rows] += adaptive_shrinkage((own - coef) @ changes, (own - coef) ** 2 @ se2)
    return out


def _candidate(kind: str, design: np.ndarray, effects: np.ndarray):
    """The candidate's fixed part ``s`` and its regressors for ``(coef)``: prediction
    ``s + regressors @ coef`` (scaled: ``lambda s = s + (lambda - 1) s``)."""
    s = design @ effects
    if kind == "scaled":
        return s, s[..., None]
    q2 = s**2 - (design**2) @ (effects**2)
    q3 = s**3 - (design**3) @ (effects**3)
    return s, np.stack([q2, q3], -1)


def _fit_coef(kind, design, effects, changes, counts):
    s, reg = _candidate(kind, design, effects)
    w = np.sqrt(counts)[:, None, None]
    a = (w * reg).reshape(-1, reg.shape[-1])
    b = (w[..., 0] * (changes - s)).reshape(-1)
    return np.linalg.lstsq(a, b, rcond=None)[0]


def _predict(kind, coef, design, effects):
    s, reg = _candidate(kind, design, effects) if kind != "additive" else (design @ effects, None)
    return s if kind == "additive" else s + reg @ coef


def choose_combination(design, changes, counts):
    """Leave-one-combination-out cross-validation of the combination candidates. Returns
    ``(kind, coef, cv)`` where ``cv`` maps each candidate to its mean squared error on held-out
    combinations (``None`` with fewer than two seen combinations: then additive)."""
    combo = np.flatnonzero((design != 0).sum(1) > 1)
    effects = fit_singles(design, changes, counts)
    if len(combo) < 2:
        return "additive", np.zeros(2), None
    errors = {k: [] for k in COMBINATIONS}
    for held in combo:
        rest = np.setdiff1d(np.arange(len(design)), [held])
        e = fit_singles(design[rest], changes[rest], counts[rest])
        others = np.intersect1d(combo, rest)
        for kind in COMBINATIONS:
            coef = None if kind == "additive" else _fit_coef(kind, design[others], e, changes[others], counts[others])
            pred = _predict(kind, coef, design[held:held + 1], e)[0]
            errors[kind].append(float(np.mean((pred - changes[held]) ** 2)))
    cv = {k: float(np.mean(v)) for k, v in errors.items()}
    best = min(COMBINATIONS, key=lambda k: cv[k])
    gain = np.subtract(errors["additive"], errors[best])
    if (best == "additive" or gain.mean() <= gain.std(ddof=1) / np.sqrt(len(gain))
            or gain.mean() < MIN_GAIN * cv["additive"]):
        return "additive", np.zeros(2), cv  # not clearly better than additive
    coef = _fit_coef(best, design[combo], effects, changes[combo], counts[combo])
    return best, np.pad(coef, (0, 2 - len(coef))), cv


def extra_axes(effects: np.ndarray, basis: np.ndarray, max_axes: int, tol: float = 1e-4) -> np.ndarray:
    """Orthonormal directions ``[m, G]`` that, added to the rows of ``basis`` (orthonormal), make
    its span hold every row of ``effects`` exactly: the principal directions of the effects'
    part outside the span, those above ``tol`` times the largest effect, at most ``max_axes``."""
    if not len(effects) or max_axes < 1:
        return np.zeros((0, basis.shape[1]))
    residual = effects - (effects @ basis.T) @ basis
    _, s, vt = np.linalg.svd(residual, full_matrices=False)
    top = np.linalg.norm(effects, axis=1).max()
    keep = int(np.sum(s > tol * max(top, 1e-12)))
    return vt[:min(keep, max_axes)]


def _dose_columns(rows: np.ndarray, dose: np.ndarray):
    """Each cell's (single, dose) multi-hot ``[N, m]`` (float32) and each column's single ``[m]``
    and dose ``[m]``; the columns are ordered by single, then dose."""
    cells, singles = np.nonzero(rows)
    pairs, column = np.unique(np.stack([singles.astype(np.float64), np.asarray(dose, np.float64)[cells]], 1),
                              axis=0, return_inverse=True)
    out = np.zeros((len(rows), len(pairs)), np.float32)
    out[cells, column.reshape(-1)] = 1.0
    return out, pairs[:, 0].astype(np.int64), pairs[:, 1]


def _by_single(design: np.ndarray, single_of: np.ndarray, n: int) -> np.ndarray:
    """(single, dose) columns back to a multi-hot over the ``n`` singles."""
    hot = np.zeros((len(design), n))
    for j, p in enumerate(single_of):
        hot[:, p] = np.maximum(hot[:, p], design[:, j] != 0)
    return hot


def _safe(key: str) -> str:
    return key.replace(".", "_")


class _KeyEffects(nn.Module):
    """One perturbation covariate's fitted effects (buffers sized when fitted or loaded):
    ``single [n, G]`` at the dose ``reference_dose [n]``; ``seen [S, K + n]`` the context codes and multi-hot of every perturbed
    group seen in training, ``seen_counts [S]``, ``seen_change [S, G]`` its mean change estimated
    by :func:`seen_group_means` and ``seen_dose [S]`` its dose (0 without one); ``combination [3]`` (candidate index, coefficient
    1, coefficient 2) and ``cv [3]`` (held-out error of each candidate; NaN: not run)."""

    NAMES = ("single", "reference_dose", "seen", "seen_counts", "seen_change", "seen_dose", "combination", "cv")
    OPTIONAL = ("seen_change", "seen_dose")  # absent from checkpoints written before them

    def __init__(self):
        super().__init__()
        for name in self.NAMES:
            self.register_buffer(name, torch.zeros(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.OPTIONAL:  # an older checkpoint: left empty (perturb then reads the network)
            state_dict.setdefault(prefix + name, torch.zeros(0))
        for name in self.NAMES:  # sizes come from the data: take them from the checkpoint
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def kind(self) -> str:
        return COMBINATIONS[int(self.combination[0])] if self.combination.numel() else "additive"


class PerturbationEffects(nn.Module):
    """The closed-form effects of every perturbation covariate (module docstring), the context
    covariates they are relative to, and the reference control cells per context."""

    def __init__(self, perturbation_keys, context_keys):
        super().__init__()
        self.context_keys = list(context_keys)
        self.per_key = nn.ModuleDict({_safe(k): _KeyEffects() for k in perturbation_keys})
        self.keys = list(perturbation_keys)
        self.register_buffer("reference_latent", torch.zeros(0))
        self.register_buffer("reference_context", torch.zeros(0, dtype=torch.long))
        self.register_buffer("control_quantiles", torch.zeros(0))
        self.register_buffer("quantile_context", torch.zeros(0, dtype=torch.long))
        self._spread = {}  # context -> the spread of its reference cells (context_support), read once

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._spread = {}
        # absent from checkpoints written before them: left empty (perturb then clips at zero)
        state_dict.setdefault(prefix + "control_quantiles", torch.zeros(0))
        state_dict.setdefault(prefix + "quantile_context", torch.zeros(0, dtype=torch.long))
        for name in ("reference_latent", "reference_context", "control_quantiles", "quantile_context"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def of(self, key: str) -> _KeyEffects:
        return self.per_key[_safe(key)]

    @property
    def fitted(self) -> bool:
        return all(self.of(k).single.numel() for k in self.keys)

    # -- fitting -----------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x: torch.Tensor, covariates: dict, dose_key: str | None = None) -> dict[str, dict]:
        """Fit every perturbation covariate's single effects, combination term and seen groups on
        cells ``x [N, G]`` (model space) with codes ``covariates``; returns the report per key
        (the combination chosen and each candidate's cross-validated error). With ``dose_key``
        each (single, dose) is its own column of the fit, and a single's effect is the one at its
        highest dose (the model's dose response scales it to the others)."""
        x = x.detach().cpu().numpy()  # group_changes accumulates in float64 by chunks of cells
        ctx = context_table({k: covariates[k].cpu() for k in self.context_keys}, self.context_keys, len(x))
        rows = {k: covariates[k][:, :-1].cpu().numpy() for k in self.keys}
        dose = (covariates[dose_key].double().cpu().numpy() if dose_key and dose_key in covariates
                else np.zeros(len(x)))
        report = {}
        for key in self.keys:
            others = [rows[k].sum(1) == 0 for k in self.keys if k != key]
            alone = np.logical_and.reduce(others) if others else np.ones(len(x), bool)
            cells = slice(None) if alone.all() else alone  # no copy of the cells when none is left out
            columns, single_of, column_dose = _dose_columns(rows[key][cells], dose[cells])
            report[key] = self._fit_key(key, group_changes(x[cells], columns, ctx[cells]), single_of, column_dose,
                                        rows[key].shape[1], x.shape[1])
        return report

    @torch.no_grad()
    def fit_streamed(self, cells, dose_key: str | None = None, progress: bool = False) -> dict[str, dict]:
        """:meth:`fit` for cells streamed from a file (a :class:`scidiff.data.StreamedCells`): each
        cell's group comes from the covariate codes held in memory (:func:`streamed_groups`), the
        groups' sums from one streamed pass
        (:func:`scidiff.data.stream_setup.stream_group_moments`); the same fit as :meth:`fit` on
        the same cells, up to the order of float64 sums."""
        groups = streamed_groups(cells, self.keys, self.context_keys, dose_key)
        moments = stream_group_moments(cells, {k: (g.cell_group, g.n_fine) for k, g in groups.items()},
                                       progress=progress)
        return {key: self._fit_key(key, g.changes(moments[key]), g.single_of, g.column_dose, g.n_singles,
                                   cells.spec.n_genes) for key, g in groups.items()}

    def _fit_key(self, key: str, grouped, single_of, column_dose, n: int, n_genes: int) -> dict:
        """Store one covariate's fit from its groups' changes (:func:`group_changes`' output over
        (single, dose) columns ``single_of`` / ``column_dose``, ``n`` singles); its report."""
        g_ctx, design, changes, counts, se2 = grouped
        means = seen_group_means(design, changes, counts, se2) if len(design) else changes
        single, reference = np.zeros((n, n_genes)), np.zeros(n)
        if len(design):
            fitted = fit_singles(design, changes, counts)
            for j, p in enumerate(single_of):  # columns run up the doses: the highest one is kept
                single[p], reference[p] = fitted[j], column_dose[j]
            kind, coef, cv = choose_combination(design, changes, counts)
        else:
            kind, coef, cv = "additive", np.zeros(2), None
        hot = _by_single(design, single_of, n)
        slot = self.of(key)
        slot.single = torch.tensor(single, dtype=torch.float32)
        slot.reference_dose = torch.tensor(reference, dtype=torch.float32)
        slot.seen = torch.tensor(np.concatenate([g_ctx.astype(np.float64), hot], 1), dtype=torch.float32)
        slot.seen_counts = torch.tensor(counts, dtype=torch.float32)
        slot.seen_change = torch.tensor(means, dtype=torch.float32)
        slot.seen_dose = torch.tensor([column_dose[design[i] != 0].max() if design[i].any() else 0.0
                                       for i in range(len(design))], dtype=torch.float32)
        slot.combination = torch.tensor([COMBINATIONS.index(kind), *coef], dtype=torch.float32)
        slot.cv = torch.tensor([cv[c] if cv else float("nan") for c in COMBINATIONS], dtype=torch.float32)
        return {"combination": kind, "coefficients": [float(c) for c in coef],
                "cv_mse": cv, "seen_combinations": int(((hot != 0).sum(1) > 1).sum()),
                "singles_seen": int((hot.sum(0) > 0).sum()),
                "seen_change_kept": float(np.sum(means**2) / max(np.sum(changes**2), 1e-30))}

    @torch.no_grad()
    def fit_reference(self, covariates: dict, read, encode, per_context: int = REFERENCE_CELLS,
                      seed: int = 0) -> None:
        """Keep the latent codes of up to ``per_context`` control cells (cells with no
        perturbation) of every context, for :meth:`context_weights`, and the quantiles per gene of
        up to ``QUANTILE_CELLS`` of them (:meth:`control_quantiles_of`). ``covariates``: the cells'
        codes; ``read(rows)``: those cells (sorted row numbers) in model space, ``[len(rows), G]``;
        ``encode``: the model's map of cells to latent codes. Only the chosen cells are read."""
        n = len(next(iter(covariates.values())))
        ctx = context_table({k: np.asarray(covariates[k]) for k in self.context_keys}, self.context_keys, n)
        control = control_cells(covariates, self.keys)
        rng = np.random.default_rng(seed)
        contexts = np.unique(ctx[control], axis=0) if control.any() else np.zeros((0, ctx.shape[1]), np.int64)
        keep = [np.sort(rng.choice(idx, min(per_context, len(idx)), replace=False))
                for idx in (np.flatnonzero(control & (ctx == c).all(1)) for c in contexts)]
        keep = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
        self._spread = {}
        self.reference_latent = encode(read(keep)).detach().float().cpu()
        self.reference_context = torch.as_tensor(ctx[keep], dtype=torch.long)
        levels = (np.arange(CONTROL_QUANTILES) + 0.5) / CONTROL_QUANTILES
        table = []
        for c in contexts:
            idx = np.flatnonzero(control & (ctx == c).all(1))
            if len(idx) > QUANTILE_CELLS:
                idx = np.sort(rng.choice(idx, QUANTILE_CELLS, replace=False))
            table.append(np.quantile(read(idx).double().cpu().numpy(), levels, axis=0).T)
        self.control_quantiles = torch.as_tensor(np.stack(table), dtype=torch.float32) if table else torch.zeros(0)
        self.quantile_context = torch.as_tensor(contexts, dtype=torch.long).reshape(len(contexts), ctx.shape[1])

    def control_quantiles_of(self, context) -> torch.Tensor | None:
        """``[G, Q]`` quantiles of the context's control cells per gene (model space), or ``None``
        (no control cells there, or a checkpoint from before they were kept)."""
        if not len(self.control_quantiles):
            return None
        rows = _rows_of(self.quantile_context, context)
        return self.control_quantiles[rows][0] if bool(rows.any()) else None

    def reference_latent_of(self, context) -> torch.Tensor | None:
        """The latent codes of the context's reference control cells, or ``None`` where it has none."""
        if not len(self.reference_latent):
            return None
        rows = _rows_of(self.reference_context, context)
        return self.reference_latent[rows] if bool(rows.any()) else None

    # -- what the fit says -------------------------------------------------------------------
    def seen_contexts(self, key: str, singles: list[int], exact: bool = True) -> np.ndarray:
        """Context rows ``[C, K]`` where perturbation ``singles`` of ``key`` was seen: as that exact
        set (``exact``), or any group containing every one of them (a single inside combinations
        counts as not seen alone)."""
        slot, k = self.of(key), len(self.context_keys)
        seen = slot.seen.numpy()
        if not len(seen):
            return np.zeros((0, k), dtype=np.int64)
        hot = seen[:, k:] != 0
        want = np.zeros(hot.shape[1], bool)
        want[singles] = True
        match = (hot == want).all(1) if exact else hot[:, want].all(1)
        return np.unique(seen[match, :k].astype(np.int64), axis=0)

    def group_rows(self, key: str, singles, context) -> np.ndarray:
        """Which seen groups ``[S]`` are ``context`` under exactly ``singles`` (any dose)."""
        slot, k = self.of(key), len(self.context_keys)
        seen = slot.seen.numpy()
        if not len(seen):
            return np.zeros(0, bool)
        want = np.zeros(seen.shape[1] - k, bool)
        want[list(singles)] = True
        return (seen[:, :k] == np.asarray(context)).all(1) & ((seen[:, k:] != 0) == want).all(1)

    def seen_change(self, key: str, singles: list[int], context, dose: float | None = None):
        """The estimated mean change ``[G]`` of the group seen in training as ``context`` under
        exactly ``singles`` (at ``dose`` where the model has one), or ``None`` where no group
        matches (not seen, several doses and none asked for, or a checkpoint without it).

        A dose the group was not measured at in ``context``, beside doses it was, is read between
        them: linearly in ``log(1 + dose)`` between the two measured doses around it, and below the
        lowest between no change at dose 0 and the lowest's change; above the highest, the
        highest's change (:func:`scidiff.tasks.perturb` scales it by the model's dose response)."""
        slot = self.of(key)
        if slot.seen_change.shape[:1] != slot.seen.shape[:1]:
            return None
        match = self.group_rows(key, singles, context)
        if dose is None:
            rows = np.flatnonzero(match)
            return slot.seen_change[int(rows[0])] if len(rows) == 1 else None
        doses = slot.seen_dose.numpy().astype(np.float64)
        rows = np.flatnonzero(match & np.isclose(doses, float(dose)))
        if len(rows) == 1:
            return slot.seen_change[int(rows[0])]
        rows = np.flatnonzero(match)
        if len(rows) == 0 or len(rows) != len(np.unique(doses[rows])):
            return None
        rows = rows[np.argsort(doses[rows])]
        at, t = np.log1p(doses[rows]), float(np.log1p(max(float(dose), 0.0)))
        if t >= at[-1]:
            return slot.seen_change[int(rows[-1])]
        i = int(np.searchsorted(at, t))  # at[i - 1] < t < at[i]
        hi = slot.seen_change[int(rows[i])]
        lo_t, lo = (0.0, torch.zeros_like(hi)) if i == 0 else (at[i - 1], slot.seen_change[int(rows[i - 1])])
        return lo + float((t - lo_t) / (at[i] - lo_t)) * (hi - lo)

    def seen_doses(self, key: str, singles: list[int], context) -> np.ndarray:
        """The doses (sorted) at which the group ``singles`` was measured in ``context``."""
        slot = self.of(key)
        if slot.seen_dose.shape[:1] != slot.seen.shape[:1]:
            return np.zeros(0)
        return np.sort(slot.seen_dose.numpy()[self.group_rows(key, singles, context)])

    def combination_term(self, key: str, weights: torch.Tensor) -> torch.Tensor:
        """The chosen combination model's departure from the additive sum for perturbation rows
        ``weights [B, n]`` (each single's effect relative to its effect at ``reference_dose``: 1 at
        that dose; zero for additive, and in rows with fewer than two singles), ``[B, G]``."""
        slot = self.of(key)
        e = slot.single.to(weights)
        w = weights.to(e.dtype)
        out = torch.zeros(w.shape[0], e.shape[1], dtype=e.dtype, device=e.device)
        kind = slot.kind
        if kind == "additive":
            return out
        s = w @ e
        a, b = float(slot.combination[1]), float(slot.combination[2])
        if kind == "scaled":
            term = a * s
        else:
            term = a * (s**2 - w**2 @ e**2) + b * (s**3 - w**3 @ e**3)
        combined = (w != 0).sum(-1, keepdim=True) > 1
        return torch.where(combined, term, out)

    def context_support(self, latent: torch.Tensor, context, k: int = SUPPORT_NEIGHBOURS) -> torch.Tensor:
        """How far cells ``latent [B, d]`` lie within the spread of ``context``'s reference control
        cells, ``[B]`` in [0, 1]: with ``rho`` a cell's mean distance to its ``k`` nearest of them
        and ``q`` the 95th percentile of the same distance among those cells themselves (each
        left out of its own), ``clip(2 - rho / q, 0, 1)``: 1 inside the context's cells, falling
        to 0 at twice the edge of their spread (a kNN outlier score, Ramaswamy et al. 2000).
        1 where the context has too few reference cells to tell."""
        ref = self.reference_latent_of(context)
        if ref is None or len(ref) <= k:
            return torch.ones(len(latent), dtype=latent.dtype, device=latent.device)
        ref = ref.to(latent.device).float()
        name = tuple(np.asarray(context).tolist())
        if name not in self._spread:
            d = torch.cdist(ref, ref)
            d.fill_diagonal_(float("inf"))
            self._spread[name] = float(torch.quantile(d.topk(k, largest=False).values.mean(1), 0.95))
        rho = torch.cdist(latent.float(), ref).topk(k, largest=False).values.mean(1)
        return (2 - rho / max(self._spread[name], 1e-12)).clamp(0, 1).to(latent.dtype)

    def context_weights(self, latent: torch.Tensor, contexts: np.ndarray, k: int = 30) -> torch.Tensor:
        """For cells ``latent [B, d]``: the share of each cell's ``k`` nearest reference control
        cells (among those of ``contexts [C, K]``) that belong to each context, ``[B, C]``."""
        ref, ref_ctx = self.reference_latent, self.reference_context.numpy()
        member = np.stack([(ref_ctx == c).all(1) for c in contexts], 1) if len(contexts) else np.zeros((len(ref), 0), bool)
        use = member.any(1)
        if not use.any():
            return torch.full((len(latent), len(contexts)), 1.0 / max(len(contexts), 1))
        ref, member = ref[torch.as_tensor(use)].to(latent), torch.as_tensor(member[use], dtype=latent.dtype,
                                                                             device=latent.device)
        k = min(k, len(ref))
        nearest = torch.cdist(latent.float(), ref.float()).topk(k, largest=False).indices  # [B, k]
        return member[nearest].mean(1)
