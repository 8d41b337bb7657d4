"""The gene space of a model: which genes, how expression was normalised and scaled, and the
covariate vocabularies. It travels inside every checkpoint so that a model needs no other file to
sample, and new data are brought into the same space by :func:`scidiff.data.transform_like`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

from ..checks import warn
from ..groups import carrying, mixture
from .gene_symbols import names_in, resolve_gene, symbol_column, symbol_index, symbols_of
from .rows import unique_rows

MEASURED_ZERO = 1e-5  # log1p expression below which a measured cell's value is its zero, come back from model space


def exact_zeros(x):
    """Log1p expression (a tensor or a numpy array) come back from model space with its measured
    zeros exact (below ``MEASURED_ZERO``: the standardisation's round trip leaves a zero within
    float32 rounding, some below zero)."""
    if isinstance(x, np.ndarray):
        return np.where(x < MEASURED_ZERO, np.zeros((), x.dtype), x)
    return torch.where(x < MEASURED_ZERO, torch.zeros_like(x), x)


def scanpy_log1p() -> dict:
    """scanpy's record that ``X`` holds natural-log log1p values (``uns['log1p']``), for the cells
    scidiff returns: ``sc.pp.log1p`` then warns that they are log-transformed already, and
    ``sc.tl.rank_genes_groups`` reads their fold changes in the right base."""
    return {"base": None}


def perturbation_rows(codes, n: int) -> torch.Tensor:
    """Single-perturbation codes ``LongTensor[B]`` (``n`` = null, ``-1`` = control) -> multi-hot
    ``[B, n + 1]``; a float ``[B, n + 1]`` tensor is returned as is."""
    codes = torch.as_tensor(codes)
    if codes.is_floating_point() and codes.ndim == 2:
        if codes.shape[1] != n + 1:
            raise ValueError(f"a multi-hot perturbation needs {n + 1} columns, got {codes.shape[1]}")
        return codes
    codes = codes.long().reshape(-1)
    if codes.numel() and (codes.min() < -1 or codes.max() > n):
        raise ValueError(f"perturbation codes must lie in [-1, {n}] (-1 control, {n} null); got {codes.tolist()}")
    rows = torch.zeros(codes.numel(), n + 1)
    hit = codes >= 0
    rows[hit.nonzero().squeeze(-1), codes[hit]] = 1.0
    return rows


@dataclass
class DataSpec:
    """Everything that maps between an AnnData and the model's input space.

    ``gene_names``: the model's genes, in order. ``input_kind``: ``"counts"`` (library-size
    normalised to ``target_sum`` then ``log1p``, as ``scanpy.pp.normalize_total`` + ``log1p``) or
    ``"log1p"`` (taken as is). The model sees ``(log1p_expression - gene_offset) / gene_scale``.
    ``categorical``: covariate name -> ordered labels. ``perturbation_keys``: the categorical
    covariates that are perturbations; their vocabulary holds single perturbations, a label
    ``A+B`` (``separator``) is the combination and any of ``control_labels`` is no perturbation.
    ``continuous``: names of numeric covariates (dose, time), with the range seen in training in
    ``continuous_range`` and the values the model's embedding interpolates between in
    ``continuous_knots`` (:func:`knots_of`); ``dose_key`` is the one that scales the perturbation
    embedding.
    ``source``: where expression was read (layer / raw), for provenance. ``label_counts``:
    training cells per value of each categorical covariate (perturbations by their combination
    label), the prior over conditions (:meth:`condition_prior`). ``perturbation_columns``: per
    perturbation key (and time key, its values as float text: ``'4.0'``), the other ``obs``
    columns that describe it in the training cells, each with its value per label (``{key:
    {column: {label: value}}}``, :func:`describing_columns`): what a predicted cell's ``obs``
    gets for its target. ``gene_symbol_column``: the ``var`` column of the training file that held
    gene symbols beside the gene IDs of ``gene_names`` (:mod:`scidiff.data.gene_symbols`), and
    ``gene_symbols`` each model gene's symbol (empty without one): a gene may be named by either.
    ``log_total``: the training cells' mean ``log`` of their total normalised expression on the
    model's genes (streamed: on the cells the genes were chosen on; ``None`` for a model set up
    before it): the scale counts of
    new cells are normalised to where the model was trained on log1p values
    (:func:`~scidiff.data.transform_like`).
    ``label_types``: each categorical covariate whose training ``obs`` column held booleans or
    numbers, with its type (:func:`label_type`: ``'bool'``, ``'category:int64'``); the labels of
    generated and designed cells are given that type (:meth:`labels_as_trained`), text without
    one (a model saved before it). ``gene_var``: the training file's other ``var`` columns
    (Ensembl IDs beside symbols, feature types), each model gene's value, for the ``var`` of
    generated and designed cells (:meth:`var_frame`; empty in a model saved before it).
    """

    gene_names: list[str]
    input_kind: str = "log1p"
    target_sum: float | None = None
    gene_offset: list[float] = field(default_factory=list)
    gene_scale: list[float] = field(default_factory=list)
    categorical: dict[str, list[str]] = field(default_factory=dict)
    continuous: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    perturbation_keys: list[str] = field(default_factory=list)
    control_labels: list[str] = field(default_factory=lambda: ["control", "ctrl"])
    separator: str = "+"
    dose_key: str | None = None
    continuous_range: dict[str, list[float]] = field(default_factory=dict)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    perturbation_columns: dict[str, dict[str, dict]] = field(default_factory=dict)
    continuous_knots: dict[str, list[float]] = field(default_factory=dict)
    gene_symbol_column: str | None = None
    gene_symbols: list[str] = field(default_factory=list)
    training_groups: dict = field(default_factory=dict)
    log_total: float | None = None
    label_types: dict[str, str] = field(default_factory=dict)
    gene_var: dict[str, list] = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.gene_names)
        if not self.gene_offset:
            self.gene_offset = [0.0] * n
        if not self.gene_scale:
            self.gene_scale = [1.0] * n
        if len(self.gene_offset) != n or len(self.gene_scale) != n:
            raise ValueError("gene_offset and gene_scale need one value per gene")
        if self.gene_symbols and len(self.gene_symbols) != n:
            raise ValueError("gene_symbols needs one symbol per gene")

    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(**d)  # fields added later have defaults: older checkpoints load

    def labels_as_trained(self, key: str, labels):
        """``labels`` of covariate ``key`` (text, as the model reads them) as a column of the
        training ``obs`` column's type (:attr:`label_types`), so that the cells concatenate and
        save beside the training cells; categorical text where it held text."""
        return typed_labels(labels, self.label_types.get(key))

    def perturbation_column_values(self, key: str, label) -> dict[str, object]:
        """The ``obs`` columns recorded for perturbation ``key`` (:attr:`perturbation_columns`)
        and the value each takes under ``label``; ``None`` where the training cells give the label
        no single value (a combination, a label never seen, or a column such as a guide that
        refines the perturbation): the predicted cells must not keep their own value there."""
        columns = self.perturbation_columns.get(key, {})
        return {column: lookup_label(values, label, self.separator, self.control_labels)
                for column, values in columns.items()}

    # -- expression <-> model space -------------------------------------------------------------
    def _vectors(self, like: torch.Tensor):
        off = torch.tensor(self.gene_offset, dtype=like.dtype, device=like.device)
        scale = torch.tensor(self.gene_scale, dtype=like.dtype, device=like.device)
        return off, scale

    def to_model_space(self, log_expression):
        """``(log1p expression - offset) / scale``; numpy in, numpy out; torch in, torch out."""
        if isinstance(log_expression, np.ndarray):
            return ((log_expression - np.asarray(self.gene_offset, np.float32))
                    / np.asarray(self.gene_scale, np.float32)).astype(np.float32)
        off, scale = self._vectors(log_expression)
        return (log_expression - off) / scale

    def to_expression(self, z, clip: bool = True):
        """Back to log1p-normalised expression; negative values are clipped to 0 by default."""
        if isinstance(z, np.ndarray):
            x = z * np.asarray(self.gene_scale, np.float32) + np.asarray(self.gene_offset, np.float32)
            return np.maximum(x, 0.0) if clip else x
        off, scale = self._vectors(z)
        x = z * scale + off
        return x.clamp_min(0.0) if clip else x

    def to_measured(self, z: torch.Tensor) -> torch.Tensor:
        """Measured cells in model space back to log1p expression, their zeros exact: a zero comes
        back from the standardisation's round trip within float32 rounding of it (below
        ``MEASURED_ZERO``), and the detection model counts exact zeros as not detected."""
        return exact_zeros(self.to_expression(z, clip=False))

    # -- covariates -----------------------------------------------------------------------------
    def _unknown_key(self, key):
        return KeyError(f"unknown condition key {key!r}; the model knows "
                        f"{sorted(self.categorical) + list(self.continuous) or 'no covariates'}")

    def encode_label(self, key: str, value) -> int:
        """Index of ``value`` in covariate ``key``'s vocabulary, or a clear error."""
        if key not in self.categorical:
            raise self._unknown_key(key)
        vocab = self.categorical[key]
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and str(value) not in vocab:
            if 0 <= int(value) < len(vocab):
                return int(value)
            raise ValueError(f"code {value} is out of range for condition {key!r} ({len(vocab)} values)")
        if str(value) not in vocab:
            raise ValueError(f"unknown value {value!r} for condition {key!r}; {known_values(value, vocab)}")
        return vocab.index(str(value))

    def is_control(self, label) -> bool:
        return str(label).strip() in set(self.control_labels)

    def label_parts(self, label) -> list[str]:
        """The single perturbations a label names, as written (``"A + ctrl"`` -> ``["A"]``)."""
        return [p.strip() for p in str(label).split(self.separator) if p.strip() and not self.is_control(p)]

    def perturbation_singles(self, key: str, label) -> list[int]:
        """Indices of the single perturbations in ``label`` (``"A+B"`` -> ``[iA, iB]``; control
        -> ``[]``); a single the model never saw is an error, never a guess."""
        vocab = self.categorical[key]
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            return [self.encode_label(key, label)]
        if self.is_control(label):
            return []
        parts = self.label_parts(label)
        unseen = [p for p in parts if p not in vocab]
        if unseen:
            what = ("a combination with an unseen single perturbation cannot be predicted"
                    if len(parts) > 1 else "unknown perturbation")
            raise ValueError(f"{what}: {unseen} in {str(label)!r} for condition {key!r} never appeared in "
                             f"training; {known_values(unseen[0], vocab, 'single perturbations')} (control: "
                             f"{self.control_labels})")
        return sorted({vocab.index(p) for p in parts if not self.is_control(p)})

    def perturbation_label(self, key: str, row) -> str:
        """Inverse of :meth:`perturbation_singles` for a multi-hot row."""
        vocab = self.categorical[key]
        row = [float(v) for v in row]
        if row[-1] > 0:
            return "<null>"
        singles = [vocab[i] for i, v in enumerate(row[:-1]) if v > 0]
        return self.separator.join(singles) if singles else self.control_labels[0]

    def _multi_hot(self, key: str, labels) -> torch.Tensor:
        n = len(self.categorical[key])
        rows = torch.zeros(len(labels), n + 1)
        for i, label in enumerate(labels):
            rows[i, self.perturbation_singles(key, label)] = 1.0
        return rows

    def encode_conditions(self, conditioning: dict | None, batch_size: int) -> dict[str, torch.Tensor]:
        """Labels, codes or tensors per covariate -> ``{key: LongTensor[B]}`` (categorical),
        ``FloatTensor[B, n + 1]`` (perturbation, multi-hot) or ``FloatTensor[B]`` (continuous),
        broadcast to ``batch_size``. Missing keys stay absent (the model then uses its null
        condition). A continuous value outside the training range warns, naming the range."""
        out: dict[str, torch.Tensor] = {}
        for key, value in (conditioning or {}).items():
            if isinstance(value, (pd.Series, pd.Index, pd.Categorical)):  # an obs column: its labels
                value = np.asarray(value, dtype=object if key in self.categorical else np.float32)
            if key in self.continuous:
                try:  # '2' failed as "new(): invalid data type 'str'", True was a time of 1
                    if isinstance(value, (str, bytes, bool, np.bool_)):
                        raise TypeError
                    t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
                except (TypeError, ValueError, RuntimeError):
                    raise ValueError(f"condition {key!r} is a numeric covariate: give a number (or one per cell), "
                                     f"got {value!r}") from None
                self._check_range(key, t)
            elif key in self.perturbation_keys:
                if isinstance(value, torch.Tensor):
                    t = perturbation_rows(value, len(self.categorical[key]))
                else:
                    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
                    t = self._multi_hot(key, values)
            elif key in self.categorical:
                if isinstance(value, torch.Tensor):
                    t = value.long().reshape(-1)
                    if t.numel() and (t.min() < 0 or t.max() >= len(self.categorical[key])):
                        raise ValueError(f"codes for condition {key!r} must lie in [0, "
                                         f"{len(self.categorical[key])}); got {t.tolist()}")
                else:
                    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
                    t = torch.tensor([self.encode_label(key, v) for v in values], dtype=torch.long)
            else:
                raise self._unknown_key(key)
            if t.shape[0] == 1:
                t = t.expand(batch_size, *t.shape[1:]).clone()
            elif t.shape[0] != batch_size:
                raise ValueError(f"condition {key!r} has {t.shape[0]} values for a batch of {batch_size}")
            out[key] = t
        return out

    def _check_range(self, key: str, values: torch.Tensor) -> None:
        lo, hi = self.continuous_range.get(key, (None, None))
        finite = values[torch.isfinite(values)]
        if lo is not None and finite.numel() and (float(finite.min()) < lo or float(finite.max()) > hi):
            warn(f"{key} {sorted(set(finite.tolist()))[:5]} is outside the range seen in training "
                 f"[{lo:g}, {hi:g}]; predictions there are extrapolations")

    def decode_conditions(self, codes: dict[str, torch.Tensor]) -> dict[str, list]:
        """Inverse of :meth:`encode_conditions`: codes -> labels (continuous values kept)."""
        out = {}
        for key, t in codes.items():
            if key in self.perturbation_keys:
                out[key] = [self.perturbation_label(key, row) for row in t.tolist()]
            elif key in self.categorical:
                vocab = self.categorical[key]
                out[key] = [vocab[i] for i in t.tolist()]
            else:
                out[key] = t.tolist()
        return out

    def count_labels(self, codes: dict) -> dict[str, dict[str, int]]:
        """Cells per value of each categorical covariate in ``codes`` (tensors, arrays, or a
        table of distinct rows with each cell's row number); a perturbation's values are its
        combination labels, control as ``control_labels[0]``."""
        out = {}
        for key in self.categorical:
            if key not in codes:
                continue
            t = codes[key]
            if hasattr(t, "table"):  # distinct rows + each cell's row number
                rows, counts = np.asarray(t.table), np.bincount(t.index, minlength=len(t.table))
            else:
                t = t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
                if key in self.perturbation_keys:
                    (rows,), _, counts = unique_rows(t)
                else:
                    n = len(self.categorical[key])
                    rows, counts = np.arange(n), np.bincount(t, minlength=n)
            out[key] = {}
            for row, c in zip(rows.tolist(), counts.tolist()):
                label = (self.perturbation_label(key, row) if key in self.perturbation_keys
                         else self.categorical[key][row])
                out[key][label] = out[key].get(label, 0) + int(c)
        return out

    def _values_of(self, key: str, t) -> tuple[list, np.ndarray]:
        """One covariate of ``codes`` as its distinct values (labels; numbers for a continuous
        covariate) and each cell's index into them."""
        if hasattr(t, "table"):  # distinct rows + each cell's row number
            return [self.perturbation_label(key, row) for row in np.asarray(t.table)], np.asarray(t.index)
        t = t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        if key in self.perturbation_keys:
            (rows,), inverse, _ = unique_rows(t)
            return [self.perturbation_label(key, row) for row in rows], inverse
        if key in self.categorical:
            return list(self.categorical[key]), t.astype(np.int64)
        values, inverse = np.unique(t, return_inverse=True)
        return [float(v) for v in values], inverse

    def count_groups(self, codes: dict) -> dict:
        """The training cells' distinct combinations of covariate values and how many cells
        carry each: ``{"keys": [...], "values": [[value per key], ...], "cells": [...]}``; empty
        without covariates, or where more than ``MAX_GROUPS`` combinations make each too thin to
        stand for a group (a covariate with a value per cell)."""
        keys = [k for k in list(self.categorical) + list(self.continuous) if k in codes]
        if not keys:
            return {}
        names, inverses = zip(*(self._values_of(k, codes[k]) for k in keys))
        groups, cells = np.unique(np.stack(inverses, axis=1), axis=0, return_counts=True)
        if len(groups) > MAX_GROUPS:
            return {}
        values = [[names[j][i] for j, i in enumerate(row)] for row in groups.tolist()]
        return {"keys": keys, "values": values, "cells": cells.tolist()}

    def _same_value(self, key: str, a, b) -> bool:
        if key in self.continuous:
            return float(a) == float(b)
        if key in self.perturbation_keys:
            return (canonical_label(a, self.separator, self.control_labels)
                    == canonical_label(b, self.separator, self.control_labels))
        return str(a) == str(b)

    def with_dose(self, condition: dict) -> dict:
        """``condition`` with its dose, where the model scales perturbations by one (``dose_key``)
        and ``condition`` sets a perturbation but no dose: the dose its training groups were
        measured at (a combination never measured together: its singles'), when they agree on
        one. A perturbation's response without a dose is none of its doses', so several doses, or
        none recorded, are an error that names them and says how to give one; so is the control
        asked for at a dose its training cells were not measured at (the vehicle at 100 nM)."""
        key = self.dose_key
        if key and key in condition:
            self._check_control_dose(condition)
        if not key or key in condition:
            return condition
        perturbed = {k: condition[k] for k in self.perturbation_keys if k in condition
                     and self.label_parts(condition[k])}
        if not perturbed:
            return condition
        groups = self.training_groups
        doses = set()
        if groups and key in groups["keys"]:
            at = groups["keys"].index(key)
            rows = carrying(groups, perturbed, self._same_value)
            for k, label in perturbed.items() if not rows else []:  # never measured together: its singles
                for part in self.label_parts(label):
                    rows += carrying(groups, {k: part}, self._same_value)
            doses = {float(values[at]) for values, _ in rows}
        asked = ", ".join(f"{k}={v}" for k, v in perturbed.items())
        if len(doses) == 1:
            return {**condition, key: doses.pop()}
        if doses:
            measured = sorted(doses)
            raise ValueError(f"{asked} was measured at {key} {[f'{d:g}' for d in measured]}: give the dose to "
                             f"predict, e.g. {asked},{key}={measured[-1]:g}")
        raise ValueError(f"the model scales perturbations by {key!r} and records no dose {asked} was measured "
                         f"at: give one, e.g. {asked},{key}=10")

    def _check_control_dose(self, condition: dict) -> None:
        """Refuse ``condition`` where it asks for the control (every perturbation key it sets names
        none) at a dose no control group of the training cells was measured at: a dose scales a
        perturbation, and control cells labelled 100 nM would be the vehicle's cells mislabelled."""
        asked = {k: condition[k] for k in self.perturbation_keys if k in condition}
        groups = self.training_groups
        if not asked or any(self.label_parts(v) for v in asked.values()) or not groups \
                or self.dose_key not in groups["keys"] or np.ndim(condition[self.dose_key]) != 0:
            return
        at = groups["keys"].index(self.dose_key)
        doses = {float(values[at]) for values, _ in carrying(groups, asked, self._same_value)}
        doses = sorted(d for d in doses if not np.isnan(d))
        dose = float(condition[self.dose_key])
        if doses and dose not in doses:
            said = ", ".join(f"{k}={v!r}" for k, v in asked.items())
            raise ValueError(f"{said} is the control, whose training cells were measured at {self.dose_key} "
                             f"{', '.join(f'{d:g}' for d in doses)} only, not {dose:g}; leave {self.dose_key} out")

    def training_mixture(self, n: int, condition: dict | None = None, seed: int | None = 0) -> list[tuple[dict, int]]:
        """``n`` cells shared out over the training groups (:meth:`count_groups`) that agree
        with ``condition`` (all of them without one), in their training proportions
        (:func:`scidiff.groups.mixture`, its rounding drawn from ``seed``): ``[(condition, cells),
        ...]``; empty where the groups are unknown, ``condition`` names every grouped covariate,
        or no group carries it."""
        return mixture(self.training_groups, n, condition, self._same_value, seed)

    def condition_prior(self, key: str, labels) -> np.ndarray:
        """The share of training cells under each of ``labels`` of covariate ``key`` (normalised
        over ``labels``; uniform when the counts are unknown, as in models saved without them)."""
        counts = self.label_counts.get(key)
        w = np.ones(len(labels)) if not counts else np.array([counts.get(str(v), 0) for v in labels], float)
        if w.sum() == 0:
            raise ValueError(f"no training cell has any of {list(labels)} for {key!r}")
        return w / w.sum()

    # -- gene names -----------------------------------------------------------------------------
    def model_genes(self, names) -> list[str | None]:
        """The model gene each of ``names`` names: a gene ID of :attr:`gene_names`, else a symbol
        exactly one model gene carries (:attr:`gene_symbols`); ``None`` otherwise."""
        known, symbols = set(self.gene_names), symbol_index(self.gene_names, self.gene_symbols)
        return [resolve_gene(n, known, symbols) for n in names]

    def model_gene(self, name) -> str | None:
        """:meth:`model_genes` of one name."""
        return self.model_genes([name])[0]

    def names_in(self, var_names, var: pd.DataFrame | None = None) -> list[str]:
        """Each model gene's name among another file's ``var_names`` (by ID, else by symbol either
        way; :func:`scidiff.data.gene_symbols.names_in`)."""
        return names_in(var_names, self.gene_names, self.gene_symbols, var)

    def var_frame(self, training_columns: bool = False) -> pd.DataFrame:
        """``var`` for cells over the model's genes: the gene IDs as index, with the symbols column
        of the training file where it had one, and with ``training_columns`` its other columns
        (:attr:`gene_var`: for cells drawn from the model, not read from a file of their own)."""
        var = pd.DataFrame(index=pd.Index([str(g) for g in self.gene_names]))
        if self.gene_symbol_column and self.gene_symbols:
            var[self.gene_symbol_column] = list(self.gene_symbols)
        for column, values in (self.gene_var.items() if training_columns else ()):
            values = pd.Series(values, index=var.index)
            var[column] = pd.Categorical(values) if values.dtype == object and values.isna().any() else values
        return var

    def check_same_genes(self, other: "DataSpec", what: str = "checkpoint") -> None:
        if list(other.gene_names) != list(self.gene_names):
            missing = [g for g in self.gene_names if g not in set(other.gene_names)][:10]
            raise ValueError(f"{what} was built for a different gene set ({other.n_genes} genes vs "
                             f"{self.n_genes}); first genes not in it: {missing}")


def record_symbols(spec: DataSpec, var: pd.DataFrame, requested: str | None = "auto", where: str = "var") -> None:
    """Set ``spec``'s gene symbols from the input's ``var`` (:func:`scidiff.data.gene_symbols.symbol_column`)."""
    column = symbol_column(var, requested, where)
    if column is not None:
        spec.gene_symbol_column, spec.gene_symbols = column, symbols_of(var, column, spec.gene_names)
    spec.gene_var = var_columns(var, spec.gene_names, skip={column})


def var_columns(var: pd.DataFrame, genes, skip=()) -> dict[str, list]:
    """Each column of ``var`` that holds booleans, numbers or text (Ensembl IDs, feature types,
    highly-variable flags) but not in ``skip``, as the plain values of ``genes`` (``None`` where
    missing): :attr:`DataSpec.gene_var`."""
    var = var[~var.index.duplicated()].set_axis(var.index[~var.index.duplicated()].astype(str))
    rows = var.reindex([str(g) for g in genes])
    out = {}
    for column in rows.columns:
        col = rows[column]
        values = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else col
        if column not in set(skip) and values.dtype.kind in "biufOSU":
            out[str(column)] = [_plain(v) for v in col.tolist()]
    return out


def covariate_keys(condition_keys, continuous_keys, perturbation_keys, dose_key) -> tuple[list[str], list[str]]:
    """The categorical keys (perturbations among them) and numeric keys (the dose among them) a
    set-up encodes, each once, in order. A key cannot be both (a column is read as labels or as
    numbers), and ``dose_key`` names one column: either is a ``ValueError`` naming the key."""
    if dose_key is not None and not isinstance(dose_key, str):
        raise ValueError(f"dose_key names one obs column (a string), got {dose_key!r}")
    categorical = list(dict.fromkeys(list(condition_keys) + list(perturbation_keys)))
    numeric = list(dict.fromkeys(list(continuous_keys) + ([dose_key] if dose_key else [])))
    both = [k for k in numeric if k in set(categorical)]
    if both:
        raise ValueError(f"obs key(s) {both} are given both as categorical (condition_keys / perturbation_keys) and "
                         f"numeric (continuous_keys / dose_key) covariates; a column is read as labels or as numbers: "
                         f"name each in one of them")
    return categorical, numeric


def label_type(column: pd.Series) -> str | None:
    """The type of an ``obs`` column of labels that holds booleans or numbers (its values' dtype,
    ``'category:'`` before it for a categorical column: ``'bool'``, ``'category:int64'``); ``None``
    for text."""
    categorical = isinstance(column.dtype, pd.CategoricalDtype)
    values = column.cat.categories if categorical else column
    if values.dtype.kind not in "biuf":
        return None
    return ("category:" if categorical else "") + str(values.dtype)


def typed_labels(labels, kind: str | None):
    """``labels`` (text, as the model reads ``obs``) as a column of type ``kind``
    (:func:`label_type`): ``'True'`` as ``True``, ``'2'`` as ``2`` (a column of both ``2`` and
    ``'2'`` cannot be written); categorical text without a type, or where a label is no value of
    it (``'1.5'`` of an integer column)."""
    text = pd.Categorical(labels)
    if not kind:
        return text
    categorical = kind.startswith("category:")
    dtype = pd.api.types.pandas_dtype(kind.removeprefix("category:"))
    read = {"b": {"True": True, "False": False}.get, "i": int, "u": int, "f": float}.get(dtype.kind)
    try:
        typed = [read(v) for v in labels] if read is not None else None
    except (TypeError, ValueError):
        typed = None
    if typed is None or any(v is None for v in typed):
        return text
    return pd.Categorical(typed) if categorical else pd.array(typed, dtype=dtype)


def known_values(value, vocab, what: str = "values", limit: int = 40) -> str:
    """The values a label could have been, for an error: the closest ones first (``did you mean
    'True'?`` for ``true``), then the vocabulary, cut to ``limit`` with a count."""
    import difflib  # lazy: only on the error's path

    vocab = [str(v) for v in vocab]
    folded = {v.casefold(): v for v in vocab}
    close = ([folded[str(value).casefold()]] if str(value).casefold() in folded
             else _same_number(value, vocab) or difflib.get_close_matches(str(value), vocab, n=3, cutoff=0.6))
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    shown = str(vocab) if len(vocab) <= limit else f"{vocab[:limit]}... ({len(vocab)} in all)"
    return f"{hint}known {what}: {shown}"


def _same_number(value, vocab) -> list[str]:
    """The labels of ``vocab`` that write the number ``value`` writes (``'1'`` for ``'1.0'``: an
    integer column read back as floats), for :func:`known_values`."""
    def number(v):
        try:
            return float(str(v).strip())
        except ValueError:
            return None

    want = number(value)
    if want is None or want != want:
        return []
    return [v for v in vocab if number(v) == want]


def _plain(value):
    """A JSON- and h5ad-safe scalar: numpy scalars as Python ones, missing values as ``None``."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, (str, bool, int, float)):
        return value
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def canonical_label(label, separator: str = "+", control_labels=("control", "ctrl")) -> str:
    """A perturbation label written one way whatever the notation: its singles sorted (``B+A`` ->
    ``A+B``), control parts dropped (GEARS' ``A+ctrl`` -> ``A``), any control label -> the first
    one, as :func:`scidiff.setup_anndata` reads labels (a control label that holds the separator,
    ``NTC_1`` at ``_``, too)."""
    if str(label).strip() in set(control_labels):
        return list(control_labels)[0]
    parts = sorted({p.strip() for p in str(label).split(separator) if p.strip()} - set(control_labels))
    return separator.join(parts) if parts else (list(control_labels) or ["control"])[0]


def perturbed_input_error(key: str, labels, controls) -> ValueError:
    """The refusal of input cells already perturbed: ``labels``, each input cell's label of
    ``key`` (``None`` for a control cell); predictions start from control cells, and a perturbed
    cell would keep its own perturbation's change on top of the target's."""
    perturbed = pd.Series([str(v) for v in labels if v is not None])
    counts = perturbed.value_counts()
    shown = ", ".join(f"{lab!r} ({n})" for lab, n in counts.head(5).items()) + (", ..." if len(counts) > 5 else "")
    return ValueError(f"{len(perturbed)} of the {len(labels)} input cells are perturbed in obs[{key!r}] ({shown}); "
                      f"predictions start from control cells: pass only the cells labelled {list(controls)}")


def _float32(text):
    """``text`` as a float32, or ``None`` where it is no number."""
    try:
        return np.float32(float(text))
    except (TypeError, ValueError):
        return None


def lookup_label(values: dict, label, separator: str = "+", control_labels=("control", "ctrl")):
    """``values[label]`` with ``label`` matched up to the order of its singles and the spelling of
    control; ``None`` when the label has no recorded value."""
    if isinstance(label, (int, float, np.number)) and not isinstance(label, bool):
        if str(float(label)) not in values:  # as the model reads a time: a float32 column's 1.2 is 1.2000000476837158
            return next((v for k, v in values.items() if _float32(k) == np.float32(label)), None)
        label = str(float(label))  # a time, recorded as its float's text
    if str(label) in values:
        return values[str(label)]
    want = canonical_label(label, separator, control_labels)
    for known, value in values.items():
        if canonical_label(known, separator, control_labels) == want:
            return value
    return None


def describing_columns(obs, key: str, exclude=(), contexts=(), separator: str | None = None,
                       control_labels=("control", "ctrl")) -> dict[str, dict]:
    """The ``obs`` columns that describe perturbation ``key`` in these cells, each with its value
    per label: ``{column: {label: value}}``.

    A column describes the perturbation when it takes at least two values and either it is a
    function of the label (every label's cells carry a single value: Papalexi's ``target`` for
    ``perturbation``) or, for a column of labels or integers with at most half as many values as
    cells, the label is a function of it (it refines the perturbation: Papalexi's ``grna``,
    several guides per target), or, with ``contexts`` (obs columns of the context covariates), it
    is a function of the context and label but not of the context alone, with at most half as
    many such groups as cells (a sample or treatment ID numbered per patient: Zhao's
    ``treatment_id``, 711 for one patient's panobinostat and another's vehicle). A label is
    recorded with its value only where its cells carry a single one (never for a guide column's
    targets), so a predicted cell gets that value or none, never its control's. ``key`` itself
    and ``exclude`` (the model's covariates: a cell keeps its own context) are never recorded;
    missing values count as a value (recorded as ``None``). With ``separator`` the labels are read
    in canonical form (:func:`canonical_label`): Norman's ``KLF1+ctrl`` and ``ctrl+KLF1`` are one
    label, whose value is recorded only where both spellings' cells carry it."""
    import pandas as pd
    from pandas.api.types import is_float_dtype

    if key not in obs.columns:
        return {}
    labels = obs[key].astype(str).str.strip().to_numpy()
    if separator is not None:
        written, distinct = pd.factorize(labels)
        labels = np.array([canonical_label(d, separator, control_labels) for d in distinct], dtype=object)[written]
    lab_codes, lab_uniques = pd.factorize(labels)
    n_labels, n_cells = len(lab_uniques), len(labels)
    contexts = [c for c in contexts if c in obs.columns and c != key]
    ctx_codes = (pd.MultiIndex.from_frame(obs[contexts].astype(str)).factorize()[0] if contexts
                 else np.zeros(n_cells, dtype=np.int64))
    group_codes, group_uniques = pd.factorize(ctx_codes.astype(np.int64) * n_labels + lab_codes)
    out = {}
    for column in obs.columns:
        if column == key or column in set(exclude):
            continue
        try:
            val_codes, val_uniques = pd.factorize(obs[column], use_na_sentinel=False)
        except TypeError:  # unhashable values
            continue
        n_values = len(val_uniques)
        if n_values < 2:
            continue
        pairs = np.unique(lab_codes.astype(np.int64) * n_values + val_codes)
        per_label = np.bincount(pairs // n_values, minlength=n_labels)
        per_value = np.bincount(pairs % n_values, minlength=n_values)
        discrete = not is_float_dtype(obs[column].dtype)  # labels, booleans, integers (a categorical's too)
        forward = bool((per_label == 1).all())
        refines = discrete and bool((per_value == 1).all()) and 2 * n_values <= n_cells
        if not (forward or refines or _within_contexts(ctx_codes, group_codes, len(group_uniques), val_codes)):
            continue
        single = {int(p // n_values): int(p % n_values) for p in pairs if per_label[p // n_values] == 1}
        out[str(column)] = {str(lab_uniques[li]): _plain(val_uniques[vi]) for li, vi in sorted(single.items())}
    return out


def _within_contexts(ctx_codes: np.ndarray, group_codes: np.ndarray, n_groups: int, val_codes: np.ndarray) -> bool:
    """Whether a column (``val_codes``) is a function of the (context, label) groups but not of
    the contexts alone, over groups of two cells or more on average (:func:`describing_columns`)."""
    if ctx_codes.max(initial=0) == 0 or 2 * n_groups > len(val_codes):
        return False
    n_values = int(val_codes.max()) + 1
    per_group = np.bincount(np.unique(group_codes * n_values + val_codes) // n_values, minlength=n_groups)
    per_context = np.bincount(np.unique(ctx_codes * n_values + val_codes) // n_values)
    return bool((per_group == 1).all() and (per_context > 1).any())


MAX_KNOTS = 32
MAX_GROUPS = 100_000  # more combinations of covariate values than this are not groups (see count_groups)


def knots_of(values) -> list[float]:
    """The values a numeric covariate's embedding interpolates between: each distinct value
    seen in training (a time course's measured days), or, with more than ``MAX_KNOTS`` of them
    (a pseudotime), that many quantiles."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = np.unique(v[np.isfinite(v)])
    if len(v) > MAX_KNOTS:
        v = np.unique(np.quantile(v, np.linspace(0, 1, MAX_KNOTS)))
    return [float(x) for x in v]


def _build_spec(genes, kind: str, target_sum, offset, scale, vocabs: dict, codes: dict, *, continuous_keys,
                layer, use_raw, perturbation_keys, control_labels, separator: str, dose_key, obs=None) -> DataSpec:
    """The :class:`DataSpec` of a set-up (in memory or streamed): chosen genes, input kind,
    normalisation and scaling, vocabularies, numeric ranges and label counts from ``codes``, and,
    from the training cells' ``obs`` (a DataFrame) where given, the columns that describe each
    perturbation and each time (a numeric covariate other than the dose with fewer than
    ``MAX_KNOTS`` values, read as floats; :func:`describing_columns`)."""
    if dose_key and dose_key in codes:
        doses = np.asarray(codes[dose_key], dtype=np.float64).reshape(-1)
        if (doses < 0).any():
            shown = sorted({float(v) for v in doses[doses < 0]})[:5]
            raise ValueError(f"obs[{dose_key!r}] (the dose_key) holds negative doses in {int((doses < 0).sum())} "
                             f"cells ({', '.join(f'{v:g}' for v in shown)}): a dose is a number >= 0 (a log dose "
                             f"is not a dose: pass the dose itself; control cells take 0)")
    spec = DataSpec(gene_names=list(genes), input_kind=kind, target_sum=target_sum,
                    gene_offset=[float(v) for v in offset], gene_scale=[float(v) for v in scale],
                    categorical=vocabs, continuous=list(continuous_keys),
                    source={"layer": layer, "use_raw": bool(use_raw)},
                    perturbation_keys=list(dict.fromkeys(perturbation_keys)), control_labels=list(control_labels),
                    separator=separator, dose_key=dose_key,
                    continuous_range={k: [float(codes[k].min()), float(codes[k].max())] for k in continuous_keys},
                    continuous_knots={k: knots_of(codes[k]) for k in continuous_keys})
    spec.label_counts = spec.count_labels(codes)
    spec.training_groups = spec.count_groups(codes)
    if obs is not None:
        spec.label_types = {k: t for k in vocabs if k in obs.columns and (t := label_type(obs[k])) is not None}
        covariates = set(vocabs) | set(continuous_keys) | set(perturbation_keys)
        contexts = [k for k in vocabs if k not in perturbation_keys]
        spec.perturbation_columns = {key: describing_columns(obs, key, exclude=covariates, contexts=contexts,
                                                             separator=separator, control_labels=control_labels)
                                     for key in perturbation_keys if key in obs.columns}
        for key in continuous_keys:  # a time course's measured days (Klein's day for day_num)
            if key != dose_key and key in obs.columns and len(spec.continuous_knots[key]) < MAX_KNOTS:
                import pandas as pd

                times = obs.assign(**{key: pd.to_numeric(obs[key], errors="coerce").astype(float)})
                spec.perturbation_columns[key] = describing_columns(times, key, exclude=covariates, contexts=contexts)
    return spec
