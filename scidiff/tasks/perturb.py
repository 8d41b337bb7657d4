"""Perturbation prediction: each control cell moved by the change a perturbation makes to it.

A cell's change is read off the model as the difference of two decodings of the same noise
(deterministic DDIM inversion of the cell, Song et al. 2021 sec. 4.3, then DDIM decoding under the
target and under the cell's own condition), and added to the cell itself: the prediction keeps
everything about the cell that the condition does not explain, including the part of its
expression outside the model's latent. How the change is found depends on what training saw
(``obs['scidiff_route']``):

- ``seen``: the target (this context, this perturbation or combination) was in the training
  cells: the change under the target itself, moved by one offset per context so that its mean
  over the context's reference control cells (training controls the model keeps) is the
  group's estimated mean change (:func:`scidiff.models.effects.seen_group_means`: the training
  cells' change, pooled over contexts and shrunk toward zero by empirical Bayes), so the
  network gives how cells differ around a change the data measured, and a change within the
  data's noise is predicted as none.
- ``additive``: a combination never seen in this context whose singles were: the sum of the
  singles' changes to the cell (CPA/GEARS' additive model; each single seen in this context
  centred as in ``seen``), plus the combination term where
  cross-validation over the seen combinations chose one (:mod:`scidiff.models.effects`).
- ``transferred``: a perturbation never seen in this context: its change is read in the contexts
  where it was seen, each decoding done under that context for both the perturbed and the
  control condition, so the difference holds the perturbation's effect and not the other
  context's identity, and centred there as in ``seen`` on the group's estimated mean change in
  that context (a knockout within the noise of every context carries no change); the contexts
  are weighted, per cell, by the share of the cell's nearest
  training control cells (in the latent) that come from each. A cell like another context's
  cells takes that context's response; where the contexts disagree so much that their mean
  change is indistinguishable from zero, the change shrinks toward no change
  (:func:`disagreement_shrinkage`). The network's per-cell deviation around a context's mean
  change is kept only as far as the cell lies within that context's own control cells
  (:meth:`~scidiff.models.effects.PerturbationEffects.context_support`): beyond them it is the
  network's extrapolation, and a cell unlike every context read (another cell line) takes their
  mean change alone.
- ``prior``: a perturbation never seen at all, described by prior knowledge
  (:mod:`scidiff.models.perturbation_prior`): its predicted gene-level effect, at a dose scaled
  by the dose curve the seen perturbations share where one cross-validated
  (:class:`~scidiff.models.perturbation_prior.DoseCurve`). Beside seen singles (``A+B``, A seen,
  B not) each part's change is added (route ``seen+prior``).
- ``control``: the target is the control itself (no perturbation): the cells as they are.
- ``direct``: anything else (a new cell type asked for, a time or a dose, a model saved before
  the closed-form effects): the change under the target condition. With a perturbation never
  seen in the target too (an unseen drug at a time, along a trajectory), the prior's effect is
  added to it (route ``direct+prior``, the lower of the two confidences); at dose 0 a
  perturbation the prior describes changes nothing, as a seen one at dose 0.

``obs['scidiff_confidence']`` (0-1) says how much the prediction rests on: ``seen``, the
training cells of that group ``n / (n + 30)`` (at the dose asked for: :func:`_support`);
``transferred``, the lowest of the agreement of the contexts' changes for the cell,
``|sum_c w_c d_c|^2 / sum_c w_c |d_c|^2``, the share kept by the shrinkage, the training cells of
the groups read, ``sum_c w_c n_c / (n_c + 30)`` (a single seen there only inside combinations:
:func:`_within_combinations`; the contexts' estimates are pooled where they
agree, so agreement alone would not tell 20 cells from 600), and, for a cell outside every
context read, the contexts' agreement among themselves (:func:`transfer_evidence`: none from one
context); ``additive``, the least of its
singles'; ``prior``, the prior's own; ``control``, 1; ``direct``, the training cells of the group
asked for, ``n / (n + 30)``, for a time between two measured ones the two groups around it read
linearly (as the time embedding is), none beyond the measured times
(:func:`direct_support`; ``NaN``, not assessed, for a model saved without its training groups).

``method="population"`` applies the same changes to fresh cells sampled under the input cells'
own conditions instead of to the input cells.

Expression cannot fall below zero, and clipping the moved cells there would raise a gene's mean
above the predicted one wherever a change lowers a gene that many cells do not express (a
knockdown in sparse data). Where the predicted mean change was measured in the context itself
(the ``seen`` route, and ``additive`` combinations of seen singles), each gene is floored at zero
and its expressing cells scaled to keep that mean (:func:`_floor_scale`: read once per target and
context from the context's control cells, kept as quantiles at training, moved by the
prediction's mean change, so batching does not change it); a gene whose predicted mean is at or
below zero is predicted off. Other routes clip at zero: their change is carried from elsewhere,
and on Zhao's unseen patients keeping its decreases whole raised the RMSE (0.510 to 0.525) and
took one patient above no change. This is the ``observed=False`` output (each cell shifted).

By default (``observed``, where the model has a fitted detection model) the predicted cells are
measured: each input cell's measurement is carried from its smooth expression (its projection on
the model's latent) to that moved by the change, at the same position in the measured
distribution the detection model gives there (:mod:`scidiff.models.measured_change`), so zeros
stay zeros unless a gene's detection rises and a gene lowered far enough is switched off, first in
the cells lowest in it. Their mean per gene is the shifted output's: one shift of the moved smooth
expression per gene, a share of its detection kept where the shift cannot lower the mean enough,
and a level factor where it cannot raise it enough, fitted once per target and context on the
context's input cells (up to ``FIT_CELLS`` of them, evenly spaced, carried with the draws they
are predicted with: :func:`_counterfactual_keeping`), so the mean holds on the cells predicted
whatever batches they come in; fresh cells (``population``) on the context's reference control
cells measured by the detection model (:func:`_population_keeping`).
"""
from __future__ import annotations

import hashlib
import math

import anndata as ad
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..checks import choice, condition_mapping, warn, whole_number, yes_no
from ..data.dataset import USE_RAW, joined_otherwise
from ..data.preprocess import _name
from ..data.spec import exact_zeros, label_type, perturbed_input_error, scanpy_log1p, typed_labels
from ..diffusion.guidance import classifier_free_guidance
from ..diffusion.plans import check_steps
from ..diffusion.samplers import ddim, ddim_invert
from ..models.cell_draws import cell_normals, cell_uniforms, check_seed
from ..models.effects import context_table
from ..models.measured_change import Carried, fit_mean_keeping
from .cells import h5_keys, keep_var_columns, model_cells, own_codes, source_named

CONTROL_SPELLINGS = ("ctrl", "control", "non-targeting")  # how screens name the control: never a perturbation
SUPPORT_CELLS = 30  # training cells at which a seen group's confidence is one half
POPULATION_STREAM = 7  # the fresh cells' z_T (streams 1-6 are the measured cells' draws)
FIT_CELLS = 512  # input cells per context a measured counterfactual's mean keeping is fitted on (and batch cells
# a population's, without reference cells)


def _denoiser(model, guidance_scale: float, n: int):
    if guidance_scale == 1.0:
        return model
    return classifier_free_guidance(model, guidance_scale, model.condition_encoder.null_condition(n))


def _weights_digest(model) -> str:
    """A digest of ``model``'s parameters and buffers (names, types, shapes and values)."""
    digest = hashlib.blake2b(digest_size=20)
    for name, t in model.state_dict().items():
        a = t.detach().cpu().contiguous()
        digest.update(f"{name}:{a.dtype}:{tuple(a.shape)}".encode())
        digest.update(a.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Reader:
    """The model's change to a batch of cells ``x`` (model space) between two conditions, by
    inversion under the reference condition and two decodings of the same noise.

    The inversion and the decoding under the reference are the same for every target read
    against the same cells and reference, so they are kept in ``store`` (a dict; keyed by the
    model's weights, the contents of the cells and of the condition, the device, the steps and
    the guidance, so that a store passed to another model, or to one trained further, is not read): each
    further target costs one decoding instead of an inversion and two decodings, with identical
    results. :func:`~scidiff.tasks.screen.predict_screen` shares one store over its targets."""

    def __init__(self, model, steps: int, guidance_scale: float, store: dict | None = None):
        self.model, self.steps, self.guidance = model, steps, guidance_scale
        self.store = {} if store is None else store
        self.changes = {}  # this call's changes to the reference cells, read twice by measured predictions
        self.weights = "" if store is None else _weights_digest(model)  # a store of this call alone: one model

    def decode(self, z_T, cond):
        m = self.model
        return m.decode(self._walk_down(z_T, cond))

    def _walk_down(self, z_T, cond):
        m = self.model
        return ddim(_denoiser(m, self.guidance, len(z_T)), z_T, m.scheduler, self.steps, cond=cond)

    def _key(self, x, cond) -> tuple:
        digest = hashlib.blake2b(digest_size=20)
        for name, t in [("x", x), *sorted(cond.items())]:
            a = t.detach().cpu().contiguous().numpy()
            digest.update(f"{name}:{a.dtype}:{a.shape}".encode())
            digest.update(a.tobytes())
        return self.weights, digest.hexdigest(), str(x.device), int(self.steps), float(self.guidance)

    def _inverted(self, x, reference: dict):
        """``(z_T, the reference's decoding in the diffusion space)`` of cells ``x``, kept."""
        key = self._key(x, reference)
        if key not in self.store:
            m = self.model
            z_T = ddim_invert(m, m.encode(x), m.scheduler, self.steps, cond=reference)
            self.store[key] = (z_T, self._walk_down(z_T, reference))
        return self.store[key]

    def change(self, x, reference: dict, target: dict, keep: bool = False) -> torch.Tensor:
        """The change; ``keep``: kept for this call (the context's reference cells, read by the
        centring and again by the measured cells' mean keeping)."""
        key = (self._key(x, reference), self._key(x[:0], target)) if keep else None
        if key is not None and key in self.changes:
            return self.changes[key]
        z_T, at_reference = self._inverted(x, reference)
        out = self.decode(z_T, target) - self.model.decode(at_reference)
        if key is not None:
            self.changes[key] = out
        return out


def _rows(n_singles: int, singles, b: int, device) -> torch.Tensor:
    rows = torch.zeros(b, n_singles + 1, device=device)
    rows[:, list(singles)] = 1.0
    return rows


def _with_context(cond: dict, keys, context, b: int, device) -> dict:
    out = dict(cond)
    for k, v in zip(keys, context):
        out[k] = torch.full((b,), int(v), dtype=torch.long, device=device)
    return out


def numeric_value(spec, key: str, value, where: str | None = None) -> float:
    """``value`` of the numeric covariate ``key`` (a time, a dose) as a number: a number, its text
    (``'4'``), or a label that names one measured value of it in the training cells' ``obs``
    (Klein's ``day`` column: ``'d2'`` for ``day_num`` 2, :attr:`~scidiff.data.DataSpec.perturbation_columns`).
    Anything else is a ValueError naming the key, the value (``where`` says where it was given) and
    the labels it could have been."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    columns = (getattr(spec, "perturbation_columns", None) or {}).get(key, {})
    named = {column: sorted((float(number), str(label).strip()) for number, label in values.items()
                            if label is not None) for column, values in columns.items()}
    for fold in (str, str.casefold):  # exactly, else whatever the case
        hits = {number for pairs in named.values() for number, label in pairs if fold(label) == fold(text)}
        if len(hits) == 1:
            return hits.pop()
    said = "; ".join(f"{column}: " + ", ".join(f"{label!r} = {number:g}" for number, label in pairs)
                     for column, pairs in named.items() if pairs)
    where = where or f"{key}={value!r} is"
    raise ValueError(f"{where} not a number" + (f" nor a label of a measured {key} ({said})" if said else
                                                f"; {key} is a numeric covariate, e.g. {key}=4"))


def numeric_target(spec, target: dict) -> dict:
    """``target`` with each numeric covariate's value as a number (:func:`numeric_value`); a
    negative dose, NaN or an infinity is refused, naming it (NaN is the network's null value: the
    cells were moved to no time in particular, where a trajectory refused it)."""
    out = dict(target)
    for key in [k for k in out if k in spec.continuous]:
        if not isinstance(out[key], (list, tuple, np.ndarray, pd.Series, torch.Tensor)) or \
                isinstance(out[key], torch.Tensor) and out[key].numel() == 1:
            out[key] = numeric_value(spec, key, out[key])
            if key == spec.dose_key and not out[key] >= 0:  # NaN too: it ended in an IndexError for a seen drug
                raise ValueError(f"{key}={target[key]!r}: a dose is a number >= 0 (0: the perturbation not given)")
            if not math.isfinite(out[key]):
                raise ValueError(f"{key}={target[key]!r} is not a finite number; leave {key} out of the target to "
                                 "keep each cell's own")
    return out


def split_target(model, target: dict) -> tuple[dict, dict]:
    """``(known, unseen)``: the target with the perturbation singles the model saw, and
    ``{key: label}`` of the singles it never saw (the ``prior`` route's part). Control parts are
    dropped (GEARS' ``A+ctrl`` is ``A``); a combination of seen and unseen singles is predicted as
    the sum of both parts. Without a perturbation prior an unseen single is an error that names it;
    with one, a label the prior cannot describe is too (:meth:`PerturbationPrior.effect`)."""
    spec, known, unseen = model.data_spec, dict(target), {}
    prior = getattr(model, "perturbation_prior", None)
    for key in spec.perturbation_keys:
        if key not in target or isinstance(target[key], (int, np.integer)):
            continue
        if isinstance(target[key], (list, tuple, set, np.ndarray, pd.Series, pd.Index, torch.Tensor)):
            # its text ("['A+B', 'B']") was read as a label and split at the separator
            raise ValueError(f"{key}={target[key]!r}: a target gives one label per key ({key}='A+B'); for several "
                             f"targets give one each (scidiff.tasks.screen.predict_screen, --targets-file)")
        if not spec.label_parts(target[key]) and not any(spec.is_control(p) for p in
                                                         str(target[key]).split(spec.separator)):
            # an empty label (a shell variable unset: perturbation=) is no perturbation asked for, not control
            raise ValueError(f"{key}={target[key]!r} names no perturbation; give a label, or "
                             f"{spec.control_labels[0]!r} for the control cells")
        vocab = set(spec.categorical[key])
        parts = list(dict.fromkeys(spec.label_parts(target[key])))  # A+A is A (a multi-hot sets A once)
        new = [p for p in parts if p not in vocab]
        if not new:
            continue
        folded = {str(v).casefold(): v for v in vocab}
        meant = {p: folded[p.casefold()] for p in new if p.casefold() in folded}
        if meant:  # not a perturbation never seen: the same label spelt in another case
            raise ValueError(f"{key}={target[key]!r}: {', '.join(f'{p!r}' for p in meant)} is not a label the model "
                             f"saw; it saw {', '.join(f'{v!r}' for v in meant.values())} (labels are case-sensitive)")
        other = [p for p in new if p.casefold() in CONTROL_SPELLINGS]
        if other:  # GEARS' A+ctrl on data whose control is 'control': a control spelling, not a perturbation
            write = spec.separator.join(p for p in parts if p not in other) or spec.control_labels[0]
            raise ValueError(f"{key}={target[key]!r}: {other[0]!r} is not this model's control label (it knows the "
                             f"control as {', '.join(map(repr, spec.control_labels))}); write {key}={write}")
        joined = joined_otherwise(new, vocab, spec.separator, spec.control_labels)
        if joined:  # KLF1_CEBPA on a model whose combinations are KLF1+CEBPA: not a perturbation never seen
            p, sep, _ = joined
            write = spec.separator.join(q for q in [*(q for q in parts if q != p), *(q.strip() for q in p.split(sep))]
                                        if q and not spec.is_control(q)) or spec.control_labels[0]
            raise ValueError(f"{key}={target[key]!r}: {p!r} joins singles the model saw with {sep!r}, but it reads "
                             f"combinations joined with {spec.separator!r} (the separator it was trained with, "
                             f"data.separator); write {key}={write}")
        if prior is None:
            spec.perturbation_singles(key, target[key])  # raises the error that names the label
        unseen[key] = spec.separator.join(new)
        prior.effect(key, unseen[key])  # raises naming a label nothing describes
        seen = [p for p in parts if p in vocab]
        if seen:
            known[key] = spec.separator.join(seen)
        else:
            known.pop(key)
    return known, unseen


class _Plan:
    """How one target is predicted for one context (module docstring), and the change's parts."""

    def __init__(self, model, target_codes: dict, unseen: dict, context, sets_context: bool):
        spec, eff = model.data_spec, model.effects
        self.route, self.parts, self.extra = "direct", [], []
        self.offsets = {}  # (key, singles, context) -> the network's mean change to that context's reference cells
        self.inside = {}  # context read -> [sum over predicted cells of how far each lies within its controls, cells]
        self.scale = False  # per gene, the floor at zero's mean-keeping factor (False: not read yet)
        self.keeping = None  # per gene, the measured cells' smooth shift, detection share, level factor (unread)
        pert_keys = [k for k in spec.perturbation_keys if k in target_codes]
        if (sets_context or eff is None or not eff.fitted or not (pert_keys or unseen)
                or any(k in target_codes for k in spec.continuous if k != spec.dose_key)):  # a time: read under it
            # decoded under the target itself; a perturbation never seen adds the prior's effect
            self.parts = [("prior", key, label, None) for key, label in unseen.items()]
            self.route = "direct+prior" if self.parts else "direct"
            return
        routes = []
        for key in pert_keys:
            singles = torch.nonzero(target_codes[key][0, :-1]).flatten().tolist()
            if not singles:
                continue
            here = _has(eff.seen_contexts(key, singles), context)
            if here:
                routes.append("seen")
                self.parts.append(("seen", key, singles, None))
                continue
            for p in singles:
                if _has(eff.seen_contexts(key, [p]), context):
                    self.parts.append(("seen", key, [p], None))
                else:
                    where = eff.seen_contexts(key, [p])
                    if not len(where):
                        where = eff.seen_contexts(key, [p], exact=False)
                    self.parts.append(("transferred", key, [p], where))
            routes.append("additive" if len(singles) > 1 else self.parts[-1][0])
            if len(singles) > 1:
                self.extra.append((key, singles))
        for key, label in unseen.items():
            routes.append("prior")
            self.parts.append(("prior", key, label, None))
        # every perturbation asked for is the control: the cells themselves
        self.route = "control" if not routes else routes[0] if len(set(routes)) == 1 else "+".join(routes)


def _has(contexts: np.ndarray, context) -> bool:
    return bool(len(contexts)) and bool((contexts == np.asarray(context)).all(1).any())


def _support(model, key: str, singles, context, dose: float | None = None) -> float:
    """Training cells of the group (context, exactly these singles), as ``n / (n + 30)``; at a
    ``dose``, those of the group at that dose, not of all its doses: read linearly in
    ``log(1 + dose)`` between the two measured doses around it (as its mean change is), the
    lowest's below it, none beyond the highest (an extrapolation, as a dose beyond the measured ones
    is for :func:`direct_support`); at dose 0 the perturbation is not given, and its no change is
    certain (1)."""
    slot = model.effects.of(key)
    match = model.effects.group_rows(key, singles, context)
    if not match.any():  # seen here inside combinations only (B in A+B, beside A), or not at all
        n = _within_combinations(model, key, singles, context)
        return float(n / (n + SUPPORT_CELLS))
    counts = slot.seen_counts.numpy()[match].astype(np.float64)
    if dose is not None and match.any() and slot.seen_dose.shape[:1] == slot.seen.shape[:1]:
        if dose == 0:
            return 1.0
        doses = slot.seen_dose.numpy()[match].astype(np.float64)
        order = np.argsort(doses)
        at, t = np.log1p(doses[order]), math.log1p(dose)
        counts = np.array([0.0 if t > at[-1] and not np.isclose(t, at[-1]) else np.interp(t, at, counts[order])])
    n = float(counts.sum())
    return n / (n + SUPPORT_CELLS)


def _within_combinations(model, key: str, singles, context) -> float:
    """Training cells behind ``singles`` of ``key`` in ``context`` where they were seen there only
    inside combinations: B's change in A+B beside A is the combination's minus the rest's (the
    additive fit of :mod:`scidiff.models.effects`), whose variance makes each such pair worth
    ``1 / (1 / n_combination + 1 / n_rest)`` cells; summed over the pairs (0 where none)."""
    slot, k = model.effects.of(key), len(model.effects.context_keys)
    seen, counts = slot.seen.numpy(), slot.seen_counts.numpy().astype(np.float64)
    if not len(seen):
        return 0.0
    here, hot = (seen[:, :k] == np.asarray(context)).all(1), seen[:, k:] != 0
    want = np.zeros(hot.shape[1], bool)
    want[list(singles)] = True
    n = 0.0
    for g in np.flatnonzero(here & hot[:, want].all(1) & (hot.sum(1) > want.sum())):
        rest = here & (hot == (hot[g] & ~want)).all(1)
        if rest.any() and counts[g] > 0:
            n += 1.0 / (1.0 / counts[g] + 1.0 / counts[rest].sum())
    return n


def direct_support(spec, codes: dict) -> torch.Tensor:
    """Per cell, the confidence of a prediction decoded under the condition ``codes`` itself (the
    ``direct`` route): the training cells of that group ``n``, as ``n / (n + 30)`` (as for
    ``seen``), from the spec's training groups. Along a numeric covariate (a time, a dose) ``n`` is
    read linearly between the measured values (each measured value's group weighted by its hat
    function: 1 there, falling to 0 at the measured values beside it among the groups that agree
    with it on every other covariate asked for), so a day between two measured days rests on both
    in proportion to nearness, and a value beyond the measured ones on none (a drug's dose beyond
    those it was measured at, whatever doses other drugs had); a covariate ``codes`` leaves out is
    summed over. ``NaN`` where the spec keeps no training
    groups (a model saved before them, or a covariate with a value per cell)."""
    groups = spec.training_groups
    n = len(next(iter(codes.values())))
    if not groups:
        return torch.full((n,), float("nan"))
    keys = [k for k in groups["keys"] if k in codes]
    labels = spec.decode_conditions({k: codes[k].cpu() for k in keys})
    distinct = {}  # the distinct conditions asked for, and each cell's
    row_of = np.array([distinct.setdefault(tuple(labels[k][i] for k in keys), len(distinct)) for i in range(n)],
                      np.int64)
    asked = list(distinct)
    weight = np.ones((len(asked), len(groups["cells"])))
    for j, key in enumerate(keys):
        at = groups["keys"].index(key)
        values = [row[at] for row in groups["values"]]
        column = [c[j] for c in asked]
        if key in spec.continuous:
            others = [groups["keys"].index(k) for k in keys if k != key]
            peers = [tuple(str(row[o]) for o in others) for row in groups["values"]]
            weight *= _hat_weights(np.asarray(column, np.float64), np.asarray(values, np.float64), peers)
        else:
            weight *= np.asarray([str(v) for v in column], object)[:, None] == \
                np.asarray([str(v) for v in values], object)[None, :]
    cells = weight @ np.asarray(groups["cells"], np.float64)
    return torch.as_tensor((cells / (cells + SUPPORT_CELLS))[row_of], dtype=torch.float32)


def _hat_weights(asked: np.ndarray, values: np.ndarray, peers: list) -> np.ndarray:
    """``[len(asked), len(values)]``: each value's weight in the linear interpolation, at each
    ``asked`` point, between the distinct measured values of its peers (the values whose ``peers``
    entry is the same as its own; 0 outside their range)."""
    lower, upper = values.copy(), values.copy()
    same: dict = {}
    for i, p in enumerate(peers):
        same.setdefault(p, []).append(i)
    for rows in same.values():
        own = values[rows]
        knots = np.unique(own)
        k = np.searchsorted(knots, own)
        lower[rows] = np.where(k > 0, knots[np.maximum(k - 1, 0)], own)
        upper[rows] = np.where(k < len(knots) - 1, knots[np.minimum(k + 1, len(knots) - 1)], own)
    t, v = asked[:, None], values[None, :]
    rising = np.divide(t - lower, v - lower, out=np.zeros(np.broadcast(t, v).shape), where=(v > lower) & (t < v))
    falling = np.divide(upper - t, upper - v, out=np.zeros_like(rising), where=(upper > v) & (t > v))
    return np.where(t == v, 1.0, np.clip(np.where(t < v, rising, falling), 0.0, 1.0))


def _relative_dose_weights(model, key: str, rows: torch.Tensor, dose: dict) -> torch.Tensor:
    """``rows``' singles weighted by the model's dose response at the target dose, relative to
    the dose their effect was fitted at (1 without a dose), ``[B, n]``."""
    enc, n = model.condition_encoder, rows.shape[1] - 1
    if not dose:
        return rows[:, :n]
    at_target = enc.single_weights(key, rows, dose, len(rows), rows.device)
    eye = torch.cat([torch.eye(n, device=rows.device), torch.zeros(n, 1, device=rows.device)], 1)
    reference = model.effects.of(key).reference_dose.to(rows.device)
    at_reference = enc.single_weights(key, eye, {enc.dose_key: reference}, n, rows.device).diagonal()
    return at_target / at_reference.clamp_min(1e-6)


def _first_rows(cond: dict, n: int) -> dict:
    """``cond``'s first row repeated ``n`` times: one context's reference cells under one target."""
    return {k: v[:1].expand(n, *v.shape[1:]) for k, v in cond.items()}


def _centred_change(model, reader, plan, x, src, target, key, singles, context, dose,
                    deviation: float | torch.Tensor = 1.0, keep: bool = False) -> torch.Tensor:
    """The network's change to cells ``x`` from ``src`` to ``target`` read in ``context``, where
    that context saw the group, centred on the group's estimated mean change there: the network
    gives how cells differ, the data (pooled and shrunk, :mod:`scidiff.models.effects`) the mean
    change. Used as is where the group has no estimate or the context no reference cells.
    ``deviation`` (a number, or one per cell) scales the network's part around the mean; at 0
    the mean change alone, without reading the network. ``keep``: ``x`` are the context's
    reference cells (their change is kept for the call)."""
    dose_key = model.data_spec.dose_key
    mean = _seen_mean(model, key, singles, context, float(dose[dose_key][0]) if dose else None)
    whole = isinstance(deviation, (int, float)) and deviation == 1
    deviation = torch.as_tensor(deviation, dtype=x.dtype, device=x.device).expand(len(x))
    if mean is not None and not deviation.any():
        return mean.to(x).expand_as(x)
    change = reader.change(x, src, target, keep)
    offset = None if mean is None else _reference_offset(model, reader, plan, key, singles, context, src, target)
    if offset is None:
        return change
    return (change - offset if whole else deviation[:, None] * (change - offset)) + mean.to(x)


def _seen_mean(model, key, singles, context, dose):
    """The group's estimated mean change in ``context`` at ``dose``
    (:meth:`~scidiff.models.effects.PerturbationEffects.seen_change`: read between the doses
    measured there); above the highest dose measured, the highest's change scaled by the model's
    dose response from that dose to this one (the ratio of the singles' summed dose weights)."""
    mean = model.effects.seen_change(key, singles, context, dose)
    doses = model.effects.seen_doses(key, singles, context) if mean is not None and dose is not None else []
    if len(doses) and dose > doses[-1] > 0:
        enc = model.condition_encoder
        rows = _rows(enc.perturbations[key], singles, 1, mean.device)
        at = [enc.single_weights(key, rows, {enc.dose_key: torch.tensor([d], device=mean.device)}, 1,
                                 mean.device).sum() for d in (dose, float(doses[-1]))]
        mean = mean * (at[0] / at[1].clamp_min(1e-6))
    return mean


def _reference_offset(model, reader, plan, key, singles, context, src, target) -> torch.Tensor | None:
    """The network's mean change to the context's reference control cells (kept in the model's
    effects, :meth:`~scidiff.models.effects.PerturbationEffects.fit_reference`) under ``target``:
    what a change read in that context is centred against, the same for every batch and every
    input. Cached per plan; ``None`` where the context has no reference cells."""
    cache = (key, tuple(singles), tuple(np.asarray(context).tolist()))
    if cache not in plan.offsets:
        x = _reference_cells(model, context, next(iter(src.values())).device if src else None)
        plan.offsets[cache] = None if x is None else \
            reader.change(x, _first_rows(src, len(x)), _first_rows(target, len(x)), keep=True).mean(0)
    return plan.offsets[cache]


def _seen_mean_change(model, reader, plan, context, src, tgt) -> torch.Tensor | None:
    """The mean change ``[G]`` a plan whose parts are all ``seen`` makes to the context's reference
    cells, in closed form: each part's estimated mean change (its network part cancels against its
    offset on those cells), the network's own mean where the group has none, plus the combination
    term. ``None`` where a part has neither."""
    dose_key = model.data_spec.dose_key
    dose = {dose_key: tgt[dose_key][:1]} if dose_key and dose_key in tgt else {}
    at = float(dose[dose_key][0]) if dose else None
    n_of, device = model.condition_encoder.perturbations, next(iter(src.values())).device
    total = 0.0
    for _, key, what, _ in plan.parts:
        mean = _seen_mean(model, key, what, context, at)
        if mean is None:
            target = {**src, **dose, key: _rows(n_of[key], what, 1, device)}
            mean = _reference_offset(model, reader, plan, key, what, context, src, target)
        if mean is None:
            return None
        total = total + mean.to(device)
    for key, singles in plan.extra:
        w = _relative_dose_weights(model, key, _rows(n_of[key], singles, 1, device), dose)
        total = total + model.effects.combination_term(key, w)[0].to(device)
    return total


def _floor_scale(model, reader, plan, context, src, tgt) -> torch.Tensor | None:
    """Per gene, ``s = max(mean(e), 0) / mean(max(e, 0))`` (at most 1) for the context's control
    cells (their stored quantiles) each moved by the prediction's mean change ``d``
    (:func:`_seen_mean_change`), ``e`` their expression: cells floored at zero and then scaled by
    ``s`` keep the mean ``max(mean(control) + d, 0)`` (module docstring). Cached per plan;
    ``None`` (clip at zero) unless every part of the plan is ``seen``, or where the model keeps no
    control quantiles there."""
    if plan.scale is False:
        plan.scale = None
        measured = bool(plan.parts) and all(kind == "seen" for kind, *_ in plan.parts)
        quantiles = model.effects.control_quantiles_of(context) if measured else None
        change = None if quantiles is None else _seen_mean_change(model, reader, plan, context, src, tgt)
        if change is not None:
            e = model.data_spec.to_expression(quantiles.T.to(change) + change, clip=False)  # [Q, G]
            want, have = e.mean(0).clamp_min(0), e.clamp_min(0).mean(0)
            plan.scale = torch.where(have > 0, want / have.clamp_min(1e-12), torch.ones_like(have))
    return plan.scale


def _moved(model, reader, plan, context, src, tgt, x, change) -> torch.Tensor:
    """Cells ``x`` moved by ``change`` in log1p expression, floored at zero keeping the predicted
    mean where it was measured (:func:`_floor_scale`), else clipped (module docstring)."""
    moved = model.data_spec.to_expression(x + change, clip=False).clamp_min(0)
    scale = _floor_scale(model, reader, plan, context, src, tgt)
    return moved if scale is None else moved * scale.to(moved)


def _in_expression(model, x, change, smooth=None):
    """``(measured, smooth, moved)`` log1p expression of cells ``x`` (model space) moved by
    ``change``: the cells as measured (exact zeros back), their smooth expression (by default the
    projection on the model's latent) and that moved by the change."""
    spec = model.data_spec
    at = spec.to_expression(x, clip=False)
    measured = exact_zeros(at)
    if smooth is None:
        smooth = spec.to_expression(model.decode(model.encode(x)), clip=False)
    return measured, smooth, smooth + (spec.to_expression(x + change, clip=False) - at)


def _carry(model, measured, smooth, moved, rows, seed: int, keep, entries: int = 1 << 19) -> torch.Tensor:
    """The measured cells carried from ``smooth`` to ``moved`` (:mod:`scidiff.models.measured_change`),
    their draws keyed by ``rows``, about ``entries`` values at a time."""
    shift, share, factor = keep if keep is not None else (None, None, None)
    out = torch.empty_like(measured)
    step = max(1, entries // max(measured.shape[1], 1))
    n_genes = measured.shape[1]
    for start in range(0, len(measured), step):
        part = slice(start, start + step)
        carried = Carried(model.detection, measured[part], smooth[part], moved[part],
                          cell_uniforms(seed, rows[part], n_genes, 1).to(measured))
        out[part] = carried.carry(shift, share, factor)
    return out


def _measured_cells(model, x, change, rows, seed: int, population: bool, keep) -> torch.Tensor:
    """Measured predicted cells (``perturb(observed=True)``): each input cell's measurement carried
    to its moved smooth expression; a fresh cell (``population``) is measured first, from draws
    keyed by its row."""
    measured, smooth, moved = _in_expression(model, x, change)
    if population:
        measured = _measure_keyed(model, smooth, rows, seed, (2, 3))
    return _carry(model, measured, smooth, moved, rows, seed, keep)


def _measure_keyed(model, smooth, rows, seed: int, streams: tuple[int, int]) -> torch.Tensor:
    """A measurement of smooth cells (log1p expression) from draws keyed by their ``rows``
    (detection and level uniforms from the two ``streams``)."""
    n_genes = smooth.shape[1]
    return model.detection.measure(smooth, *(cell_uniforms(seed, rows, n_genes, k).to(smooth) for k in streams))


def _fit_rows(contexts: np.ndarray, context: np.ndarray, most: int = FIT_CELLS) -> np.ndarray:
    """The input rows of ``context`` a counterfactual's mean keeping is fitted on: all of them, or
    ``most`` evenly spaced among them (chosen from the whole input, so batching does not change them)."""
    rows = np.flatnonzero((contexts == context).all(1))
    return rows if len(rows) <= most else rows[np.linspace(0, len(rows) - 1, most).round().astype(np.int64)]


def _fit_cells(model, reader, plan, context, ctx_keys, fit, cells, batch):
    """``(x, src, tgt, change)`` of the input rows ``fit`` (:func:`_fit_rows`): ``cells`` gives the
    first three of any rows; their change is read from the batch at hand ``batch = (rows,
    change)`` where it holds every one of them, else predicted (not counted as predicted cells)."""
    rows, change = batch
    x, src, tgt = cells(fit)
    at = np.searchsorted(rows, fit).clip(0, len(rows) - 1)  # both sorted
    if np.array_equal(rows[at], fit):
        return x, src, tgt, change[torch.as_tensor(at, device=change.device)]
    inside = {k: list(v) for k, v in plan.inside.items()}  # counted when the cells are predicted
    change, _ = _predict_batch(model, reader, x, src, tgt, plan, context, ctx_keys)
    plan.inside = inside
    return x, src, tgt, change


def _counterfactual_keeping(model, reader, plan, context, ctx_keys, seed: int, fit, cells, batch):
    """Per gene, the smooth shift, detection share and level factor
    (:func:`~scidiff.models.measured_change.fit_mean_keeping`) that give the measured
    counterfactuals of the input cells at rows ``fit`` (:func:`_fit_rows`) the mean of their
    shifted ones (:func:`_moved`): the cells as measured, carried with the draws they are predicted
    with, so the fit holds on the cells the prediction is made of, whatever the detection model
    says of their measurement (``cells``, ``batch``: :func:`_fit_cells`)."""
    x, src, tgt, change = _fit_cells(model, reader, plan, context, ctx_keys, fit, cells, batch)
    target = _moved(model, reader, plan, context, src, tgt, x, change).mean(0)
    measured, smooth, moved = _in_expression(model, x, change)
    return fit_mean_keeping(Carried(model.detection, measured, smooth, moved,
                                    cell_uniforms(seed, torch.as_tensor(fit), smooth.shape[1], 1).to(smooth)), target)


def _population_keeping(model, reader, plan, context, ctx_keys, seed: int, fit, cells, batch):
    """Per gene, the smooth shift, detection share and level factor
    (:func:`~scidiff.models.measured_change.fit_mean_keeping`) that give measured fresh cells the
    mean of :func:`_moved`'s, fitted once per plan: on the context's reference control cells
    (measured from draws keyed by their rows), or where the model keeps none, on the fresh cells
    of the input rows ``fit`` (:func:`_fit_rows`; ``cells``, ``batch``: :func:`_fit_cells`), so
    batching does not change it."""
    device = batch[1].device
    ref = _reference_cells(model, context, device)
    if ref is not None:
        _, src, tgt = cells(fit[:1], expression=False)  # the codes alone: no fresh cell decoded for them
        inside = {k: list(v) for k, v in plan.inside.items()}  # the reference cells are not predicted cells
        x, src, tgt = ref, _first_rows(src, len(ref)), _first_rows(tgt, len(ref))
        change, _ = _predict_batch(model, reader, x, src, tgt, plan, context, ctx_keys, reference=True)
        plan.inside = inside
    else:
        x, src, tgt, change = _fit_cells(model, reader, plan, context, ctx_keys, fit, cells, batch)
    smooth = model.data_spec.to_expression(x, clip=False)
    x = model.data_spec.to_model_space(_measure_keyed(model, smooth, torch.arange(len(x)), seed, (4, 5)))
    target = _moved(model, reader, plan, context, src, tgt, x, change).mean(0)
    measured, smooth, moved = _in_expression(model, x, change, smooth)
    carried = Carried(model.detection, measured, smooth, moved,
                      cell_uniforms(seed, torch.arange(len(x)), smooth.shape[1], 6).to(smooth))
    return fit_mean_keeping(carried, target)


def _reference_cells(model, context, device) -> torch.Tensor | None:
    """The context's reference control cells in model space (``None`` where there are none)."""
    latent = model.effects.reference_latent_of(context) if model.effects is not None else None
    return None if latent is None else model.decode(latent.to(device))


def disagreement_shrinkage(changes: torch.Tensor) -> torch.Tensor:
    """The share of a transferred change kept, per cell, from the changes ``[C, B, G]`` that ``C``
    contexts give it: positive-part James-Stein (Efron and Morris 1973) on the contexts' mean
    change ``m``, ``max(0, 1 - se^2 / |m|^2)`` with ``se^2 = sum_c |d_c - m|^2 / (C (C - 1))`` the
    squared standard error of that mean. Contexts that agree keep it whole; contexts whose
    disagreement leaves the mean indistinguishable from zero shrink it to no change. One context
    cannot show disagreement: 1."""
    n = changes.shape[0]
    if n < 2:
        return torch.ones(changes.shape[1], dtype=changes.dtype, device=changes.device)
    mean = changes.mean(0)
    se2 = (changes - mean).pow(2).sum((0, 2)) / (n * (n - 1))
    return (1 - se2 / mean.pow(2).sum(1).clamp_min(1e-12)).clamp(0, 1)


def transfer_evidence(changes: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """How far the data supports carrying a change to each cell, ``[B]`` in [0, 1], from the
    changes ``[C, B, G]`` the ``C`` contexts read give it and ``inside [B]``, how far the cell lies
    within the nearest of them (:meth:`~scidiff.models.effects.PerturbationEffects.context_support`):
    ``s + (1 - s) a``, with ``a`` the contexts' agreement among themselves, equally weighted,
    ``|mean_c d_c|^2 / mean_c |d_c|^2`` (1 where they all carry no change). A cell within a context
    read takes that context's response (1); a cell unlike every one takes their mean response,
    which only contexts that respond alike say carries to other contexts; one context read cannot
    say it (``a = 0``)."""
    if changes.shape[0] < 2:
        between = torch.zeros_like(inside)
    else:
        spread = changes.pow(2).sum(2).mean(0)
        between = torch.where(spread > 0, changes.mean(0).pow(2).sum(1) / spread.clamp_min(1e-30),
                              torch.ones_like(spread)).to(inside)
    return inside + (1 - inside) * between


def _predict_batch(model, reader, x, src, tgt, plan, context, ctx_keys, reference: bool = False):
    """``(change [B, G], confidence [B])`` of one batch of cells of one context (``reference``:
    the context's reference cells)."""
    b, device = len(x), x.device
    dose_key = model.data_spec.dose_key
    dose = {dose_key: tgt[dose_key]} if dose_key and dose_key in tgt else {}
    at = float(dose[dose_key][0]) if dose else None  # one target: one dose
    direct = plan.route.startswith("direct")
    change = reader.change(x, src, tgt) if direct else torch.zeros_like(x)
    confidence = direct_support(model.data_spec, tgt) if direct else torch.ones(b)
    n_of = model.condition_encoder.perturbations
    for kind, key, what, where in plan.parts:
        if kind == "prior":
            delta, conf = model.perturbation_prior.effect(key, what)
            given = dose[dose_key].float().cpu() if dose else torch.ones(b)
            # the effect (pooled over the doses seen ones were measured at) scaled by the dose curve the seen
            # perturbations share (flat where it did not cross-validate); at dose 0 the drug is not given: none
            scale = torch.from_numpy(model.perturbation_prior.dose_scale(key, given.double().numpy())) if dose \
                else torch.ones(b)
            change = change + scale.to(x)[:, None] * delta.to(x)
            confidence = torch.minimum(confidence, torch.where(given != 0, torch.tensor(float(conf)),
                                                               torch.ones(b)))
            continue
        rows = _rows(n_of[key], what, b, device)
        if kind == "seen":
            change = change + _centred_change(model, reader, plan, x, src, {**src, **dose, key: rows}, key, what,
                                              context, dose, keep=reference)
            confidence = torch.minimum(confidence, torch.tensor(_support(model, key, what, context, at)))
            continue
        latent = model.encode(x)
        weights = model.effects.context_weights(latent, where)  # [B, C]
        changes, insides = [], []
        for other in where:
            inside = model.effects.context_support(latent, other)  # the share of its deviation kept, per cell
            insides.append(inside)
            seen = plan.inside.setdefault(tuple(np.asarray(other).tolist()), [0.0, 0])
            seen[0], seen[1] = seen[0] + float(inside.sum()), seen[1] + len(inside)
            ref = _with_context(src, ctx_keys, other, b, device)
            changes.append(_centred_change(model, reader, plan, x, ref, {**ref, **dose, key: rows}, key, what, other,
                                           dose, inside))
        num = sum(weights[:, c].to(x)[:, None] * d for c, d in enumerate(changes))
        den = sum(weights[:, c].to(x) * d.pow(2).sum(1) for c, d in enumerate(changes))
        stacked = torch.stack(changes)
        kept = disagreement_shrinkage(stacked)
        change = change + kept[:, None] * num
        # contexts that all carry no change agree on it
        agreement = torch.where(den > 0, num.pow(2).sum(1) / den.clamp_min(1e-30), torch.ones_like(den))
        support = weights.cpu().float() @ torch.tensor([_support(model, key, what, other, at) for other in where])
        carried = transfer_evidence(stacked, torch.stack(insides).amax(0))
        confidence = torch.minimum(confidence, torch.minimum(torch.minimum(agreement, kept).cpu(), support))
        confidence = torch.minimum(confidence, carried.cpu().float())
    for key, singles in plan.extra:  # the combination term, on the singles at the target's dose
        w = _relative_dose_weights(model, key, _rows(n_of[key], singles, b, device), dose)
        change = change + model.effects.combination_term(key, w).to(x)
    return change, confidence


@torch.no_grad()
def perturb(model, cells, condition: dict, *, method: str = "counterfactual", steps: int = 50,
            guidance_scale: float = 1.0, seed: int = 0, layer: str | None = None, use_raw: bool | None = None,
            batch_size: int = 4096, progress: bool = True, device=None, store: dict | None = None,
            observed: bool | None = None) -> ad.AnnData:
    """Predict how the control ``cells`` (an AnnData or ``.h5ad`` path) respond to ``condition``
    (e.g. ``{'condition': 'stimulated'}``, ``{'drug': 'A+B', 'dose': 10.0}``; module docstring).

    Returns an AnnData with one predicted cell per input cell (same order and ``obs_names``, made
    unique where input cells share one): the
    predicted log1p-normalised expression in ``X`` on the model's genes, the input cells'
    expression in ``layers['control']``, ``obs`` copied with the target covariates set and
    ``scidiff_route`` / ``scidiff_confidence`` / ``scidiff_source_cell`` (the input cell's name)
    added; ``uns['log1p']`` as scanpy records it; ``uns['scidiff_prediction']`` records the
    settings and, per route, the contexts an effect was transferred from. ``method``:
    ``"counterfactual"`` (the input cells moved) or ``"population"`` (fresh cells of the input
    cells' own conditions, moved). ``device``: where to run (default: the model's). ``store``: a
    dict to keep the input cells' inversions in across calls (several targets for the same cells:
    each further one costs about a quarter of the network evaluations, with the same result;
    :func:`~scidiff.tasks.screen.predict_screen` passes one). ``observed``: measured cells, each
    input cell's measurement carried to its moved smooth expression through the model's detection
    model (:mod:`scidiff.models.measured_change`; the default where the model has a fitted one, as
    for generation), or each cell shifted by the change in log1p expression (``False``), which
    lifts every zero of a gene the change raises; ``uns['scidiff_prediction']['observed']`` says
    which.
    """
    choice("method", method, ("counterfactual", "population"))
    progress, use_raw = yes_no("progress", progress), yes_no("use_raw", use_raw, USE_RAW)  # 'no' read as true
    observed = model.resolve_observed(observed)  # 'no' refused before any work
    seed = check_seed(seed)  # before any work (the draws key on 32 bits)
    condition = condition_mapping(condition)  # "stim" read as a dict failed letter by letter
    steps = check_steps(steps)  # 5.0 steps are 5; True is not one step
    batch_size = whole_number("batch_size", batch_size, 1, what="an integer >= 1")  # 7.0: range() refused it
    if not condition:
        raise ValueError("target is empty; give at least one covariate, e.g. {'condition': 'stimulated'}")
    if device is not None:
        model.to(device)
    spec, control_adata, cells = model_cells(model, cells, layer=layer, use_raw=use_raw)
    n = len(cells)
    condition = numeric_target(spec, condition)  # a time as text or as its label (Klein's 'd2')
    known, unseen = split_target(model, condition)
    target_codes = spec.encode_conditions(known, n)
    source_codes = own_codes(model, cells)
    _check_control_cells(spec, source_codes, condition, control_adata)
    _warn_missing_columns(spec, condition, control_adata)
    dosed = spec.with_dose(condition)  # a perturbation asked for without its dose: the one it was measured at
    if dosed is not condition:
        condition, known = dosed, {**known, spec.dose_key: dosed[spec.dose_key]}
        target_codes = spec.encode_conditions(known, n)
    cond_target = {**source_codes, **target_codes}
    if spec.dose_key and spec.dose_key not in condition and spec.dose_key in source_codes:
        cond_target.pop(spec.dose_key)  # a dose belongs to the perturbation it came with
    ctx_keys = model.effects.context_keys if model.effects is not None else []
    sets_context = any(k in condition for k in ctx_keys)
    contexts = context_table({k: source_codes[k] for k in ctx_keys if k in source_codes}, ctx_keys, n) \
        if all(k in source_codes for k in ctx_keys) else np.zeros((n, 0), dtype=np.int64)
    device = next(model.parameters()).device
    model.eval()
    if observed and (model.detection is None or not bool(model.detection.fitted)):
        raise ValueError("observed=True needs a model with a fitted detection model (a principal-axes model)")
    reader = _Reader(model, steps, guidance_scale, store)
    out = np.empty((n, spec.n_genes), dtype=np.float32)
    confidence = np.empty(n, dtype=np.float32)
    routes = np.empty(n, dtype=object)
    plans = {}
    population = method == "population"

    def read(at, expression: bool = True):
        """``(x, src, tgt)`` of the input rows ``at``: the cells (fresh cells of their own
        conditions, drawn keyed by their rows, for ``population``; ``None`` without
        ``expression``) and their codes."""
        at = torch.as_tensor(at)
        src = {k: v[at].to(device) for k, v in source_codes.items()}
        tgt = {k: v[at].to(device) for k, v in cond_target.items()}
        if not expression:
            return None, src, tgt
        if not population:
            return cells.x[at].to(device), src, tgt
        return reader.decode(cell_normals(seed, at, model.diffusion_dim, POPULATION_STREAM).to(device), src), src, tgt

    for start in tqdm(range(0, n, batch_size), desc=f"predicting ({method})", disable=not progress):
        stop = min(start + batch_size, n)
        for context in np.unique(contexts[start:stop], axis=0):
            rows = start + np.flatnonzero((contexts[start:stop] == context).all(1))
            idx = torch.as_tensor(rows)
            x, src, tgt = read(rows)
            key = tuple(context.tolist())
            if key not in plans:
                plans[key] = _Plan(model, {k: v[:1] for k, v in tgt.items() if k in target_codes}, unseen,
                                   context, sets_context)
            plan = plans[key]

            change, conf = _predict_batch(model, reader, x, src, tgt, plan, context, ctx_keys)
            if observed:
                if plan.keeping is None:
                    keeping = _population_keeping if population else _counterfactual_keeping
                    plan.keeping = keeping(model, reader, plan, context, ctx_keys, int(seed),
                                           _fit_rows(contexts, context), read, (rows, change))
                out[rows] = _measured_cells(model, x, change, idx, int(seed), population, plan.keeping).cpu().numpy()
            else:
                out[rows] = _moved(model, reader, plan, context, src, tgt, x, change).cpu().numpy()
            confidence[rows] = conf.numpy()
            routes[rows] = plan.route
    obs = control_adata.obs.copy()
    for key, labels in spec.decode_conditions(target_codes).items():
        if key in spec.categorical:  # the input's column's type, else the training column's
            obs[key] = _labels_like(obs[key], labels) if key in obs else spec.labels_as_trained(key, labels)
        else:
            obs[key] = labels
    for key in spec.continuous:  # a time or dose as asked: its float32 code wrote day 0.7 as 0.699999988
        if isinstance(condition.get(key), float):
            obs[key] = condition[key]
    for key in spec.perturbation_keys:  # a label as asked for (the data's own spelling: GEARS' A+ctrl)
        if isinstance(condition.get(key), str):
            obs[key] = pd.Categorical([condition[key]] * n)
    obs = _described_columns_set(spec, obs, condition)
    obs["scidiff_route"] = pd.Categorical(routes.astype(str))
    obs["scidiff_confidence"] = confidence
    result = ad.AnnData(X=out, obs=source_named(obs, _name(control_adata)))
    result.var = spec.var_frame()
    keep_var_columns(result, control_adata, spec, layer=layer, use_raw=use_raw)
    result.layers["control"] = cells.log_expression().astype(np.float32)
    result.uns["log1p"] = scanpy_log1p()  # X is log1p, as scanpy records it
    result.uns["scidiff_prediction"] = {
        "method": method, "observed": bool(observed), "steps": int(steps), "guidance_scale": float(guidance_scale),
        "seed": int(seed),
        "target": {k: str(v) for k, v in condition.items()},
        **({"target_sum": float(spec.target_sum)} if spec.target_sum else {}),  # the library size X is normalised to
        **_transfers(model, plans, ctx_keys)}
    return result


def _labels_like(column: pd.Series | None, labels):
    """``labels`` (text, as the model reads ``obs``) in the type of the input's ``column`` where it
    holds booleans or numbers (a boolean column, a cluster's integer categories), so that the
    prediction concatenates and saves beside the input (:func:`~scidiff.data.spec.typed_labels`);
    else categorical text."""
    return typed_labels(labels, None if column is None else label_type(column))


def _described_columns_set(spec, obs: pd.DataFrame, condition: dict) -> pd.DataFrame:
    """``obs`` with each column that describes a perturbation or time of ``condition`` in the
    training cells (:attr:`~scidiff.data.DataSpec.perturbation_columns`: Papalexi's ``target``,
    Klein's ``day``) set from the target, never left at the control cell's value; missing where
    the target gives it no value (a combination, an unseen label, a guide column, a day never
    measured)."""
    from .screen import set_perturbation_columns  # lazy: screen imports this module

    return set_perturbation_columns(obs, getattr(spec, "perturbation_columns", None) or {}, condition,
                                    separator=spec.separator, control_labels=spec.control_labels)


def _warn_missing_columns(spec, condition: dict, adata) -> None:
    """Warn where ``obs`` lacks a covariate the model was trained on (a cell type, a batch) and the
    target does not set: the cells are then read under the model's null condition for it, not
    their own (a perturbation column absent means control, and says nothing)."""
    skip = {*spec.perturbation_keys, spec.dose_key, *condition}
    missing = [k for k in (*spec.categorical, *spec.continuous) if k not in skip and k not in adata.obs]
    if missing:
        warn(f"obs of {_name(adata)} has no column {missing} of the model's covariates: its cells are predicted "
             "under the model's null condition for them (add the column to condition on it)")


def _check_control_cells(spec, source_codes: dict, condition: dict, adata) -> None:
    """Refuse input cells already perturbed under a perturbation the target sets: every route
    moves a cell by the target's change against control, so a perturbed cell would keep its own
    perturbation's change on top (the error counts them and names their labels)."""
    for key in spec.perturbation_keys:
        if key not in condition or key not in source_codes:
            continue
        perturbed = source_codes[key][:, :-1].ne(0).any(1).numpy()
        if perturbed.any():
            labels = adata.obs[key].astype(str).to_numpy()
            raise perturbed_input_error(key, [lab if p else None for lab, p in zip(labels, perturbed)],
                                        spec.control_labels)


def _transfers(model, plans: dict, ctx_keys) -> dict:
    """For each context whose prediction was transferred: the contexts it was read in
    (``transferred_from``) and, per context read, the predicted cells' mean share of the network's
    per-cell deviation kept (``transferred_inside``: 1 for cells within that context's control
    cells, 0 for cells unlike them), as labels."""
    vocab = model.data_spec.categorical

    def label(row):
        return ",".join(f"{k}={vocab[k][int(c)]}" for k, c in zip(ctx_keys, row)) or "all"

    sources, inside = {}, {}
    for context, plan in plans.items():
        where = [w for kind, _, _, w in plan.parts if kind == "transferred"]
        if where:
            sources[label(context)] = sorted({label(row) for w in where for row in w})
            inside[label(context)] = {label(c): round(total / n, 4) for c, (total, n) in plan.inside.items() if n}
    return {"transferred_from": h5_keys(sources), "transferred_inside": h5_keys(inside)}  # labels with '/'


def predict_perturbation(model, control_adata, target: dict, *, method: str = "counterfactual", steps: int = 50,
                         guidance_scale: float = 1.0, seed: int = 0, layer: str | None = None,
                         use_raw: bool | None = None, batch_size: int = 4096, progress: bool = True) -> ad.AnnData:
    """Predict how ``control_adata``'s cells respond to ``target``: :func:`perturb` (``scidiff.perturb``)
    under its first name, where the cells are ``control_adata`` and the condition ``target``."""
    return perturb(model, control_adata, target, method=method, steps=steps, guidance_scale=guidance_scale, seed=seed,
                   layer=layer, use_raw=use_raw, batch_size=batch_size, progress=progress)
