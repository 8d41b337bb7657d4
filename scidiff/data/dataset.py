"""In-memory cells in the model's space, and a loader that yields whole batches at once.

A batch is ``dict[str, Tensor]``: ``"x"`` ``[B, G]`` (expression in model space) plus one entry
per covariate (``LongTensor[B]`` codes, or ``FloatTensor[B]`` for dose/time). Every data path
(in memory here, streaming from disk elsewhere) yields this same dict.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..checks import real_number, warn, whole_number, yes_no
from .preprocess import (check_log_base, dense, detect_input, expression_matrix, gene_columns, log_normalize,
                         warn_empty_cells, select_genes, _name)
from .gene_symbols import symbol_column, symbol_index, symbols_of, var_of
from .io import in_memory
from .spec import DataSpec, _build_spec, covariate_keys, exact_zeros, known_values, record_symbols
from .validate import check_labelled


@dataclass
class CellData:
    """Cells in model space: ``x [N, G]`` float32, covariates, the :class:`DataSpec` and ``obs``."""

    x: torch.Tensor
    covariates: dict[str, torch.Tensor]
    spec: DataSpec
    obs: pd.DataFrame

    def __len__(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:  # one line, as AnnData's (the dataclass's printed every tensor and the DataSpec)
        covariates = ", ".join(f"{k} ({len(self.spec.categorical[k])} labels)" if k in self.spec.categorical else k
                               for k in self.covariates) or "none"
        return f"CellData of {len(self)} cells x {self.x.shape[1]} genes; covariates: {covariates}"

    def subset(self, index) -> "CellData":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return CellData(self.x[index], {k: v[index] for k, v in self.covariates.items()}, self.spec,
                        self.obs.iloc[index.numpy()])

    def log_expression(self) -> np.ndarray:
        """log1p-normalised expression ``[N, G]`` (numpy), the measured zeros exact (the round
        trip from model space leaves them within float32 rounding, some below zero)."""
        return exact_zeros(self.spec.to_expression(self.x.numpy(), clip=False))

    def to_anndata(self) -> ad.AnnData:
        out = ad.AnnData(X=self.log_expression(), obs=self.obs.copy())
        out.var = self.spec.var_frame()
        return out

    def loader(self, batch_size: int = 256, shuffle: bool = True, seed: int = 0,
               drop_last: bool = False, rank: int = 0, world_size: int = 1) -> "InMemoryLoader":
        return InMemoryLoader(self, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                              rank=rank, world_size=world_size)

    def split(self, val_fraction: float = 0.1, seed: int = 0, stratify: str | None = None):
        """Random train/validation split (stratified by a covariate when given)."""
        rng = np.random.default_rng(seed)
        n = len(self)
        groups = (self.covariates[stratify].numpy() if stratify else np.zeros(n, dtype=np.int64))
        val = []
        for g in np.unique(groups):
            idx = np.flatnonzero(groups == g)
            rng.shuffle(idx)
            val.extend(idx[: int(round(len(idx) * val_fraction))])
        val = np.sort(np.asarray(val, dtype=np.int64))
        train = np.setdiff1d(np.arange(n), val)
        return self.subset(train), self.subset(val)


class InMemoryLoader:
    """Yields batch dicts by indexing whole tensors (no per-cell collate), reproducible from
    ``seed``; each epoch draws a new permutation from the loader's own generator.

    Sharding (``rank`` of ``world_size`` processes, e.g. under DDP): every rank draws the same
    permutation (same ``seed``), cuts it into batches of ``batch_size`` and takes the batches
    ``rank, rank + world_size, ...``. The shards are disjoint and together cover the epoch, and
    ``world_size`` ranks step through the same cells as one process taking ``world_size``
    consecutive batches per optimizer step (gradient accumulation).
    """

    def __init__(self, data: CellData, batch_size: int = 256, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size); got rank={rank}, world_size={world_size}")
        self.data, self.batch_size, self.shuffle, self.drop_last = data, batch_size, shuffle, drop_last
        self.rank, self.world_size = int(rank), int(world_size)
        self.generator = torch.Generator().manual_seed(seed)
        self._start = 0

    def _global_batches(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return max(0, -(-(self._global_batches() - self.rank) // self.world_size))

    def state_dict(self) -> dict:
        """The generator state: restoring it makes the next iteration draw the same permutation."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def resume_at(self, batch: int) -> None:
        """Start the next iteration at this rank's batch ``batch`` of the epoch (the epoch's
        permutation is drawn as usual; the batches before it are skipped without being built)."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"cannot resume at batch {batch} of an epoch of {len(self)} batches")
        self._start = int(batch)

    def __iter__(self):
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        start, self._start = self._start, 0
        for j in range(self.rank + start * self.world_size, self._global_batches(), self.world_size):
            idx = order[j * self.batch_size:(j + 1) * self.batch_size]
            batch = {"x": self.data.x[idx]}
            for k, v in self.data.covariates.items():
                batch[k] = v[idx]
            yield batch


DEFAULT_CONTROLS = ("control", "ctrl")
PARTIAL_TOTAL = 2.0  # counts of a counts-trained model this far above its share on the model's genes: a warning
SCALE_TOLERANCE = 1.5  # counts for a log1p-trained model (log1p for a counts one): rescaled beyond this factor off


# how screens name their unperturbed cells (CRISPR guides that target nothing, a drug's vehicle), by
# label folded to lower case without separators: named in the error, never taken without being asked
USUAL_CONTROLS = {"control", "ctrl", "nontargeting", "nt", "ntc", "safetargeting", "intergenic", "vehicle",
                  "dmso", "unperturbed", "untreated", "mock", "scramble", "scrambled", "negctrl", "negativecontrol"}


def control_hint(labels, flag: str = "--control-labels") -> str:
    """`` ('non-targeting' reads as a control label: --control-labels non-targeting)`` for the
    labels among ``labels`` that read as a control (:data:`USUAL_CONTROLS`), else ``""``."""
    usual = [str(lab) for lab in labels if "".join(ch for ch in str(lab).lower() if ch.isalnum()) in USUAL_CONTROLS]
    if not usual:
        return ""
    return f" ({', '.join(map(repr, usual[:3]))} reads as a control label: {flag} {','.join(usual[:3])})"


def check_controls(key: str, labels, counts, control_labels, separator: str, source: str) -> None:
    """A perturbation covariate being set up for training must have control cells: refuse when
    no cell of ``key`` carries any of ``control_labels`` (naming the most frequent values), and
    warn about given labels that no cell carries. ``labels``/``counts``: distinct labels and their
    numbers of cells."""
    controls = [str(c) for c in control_labels]
    carried = set()
    for lab in labels:
        lab = str(lab).strip()
        carried.update(p for p in [lab] + [q.strip() for q in lab.split(separator)] if p in controls)
    if not carried:
        order = np.argsort(-np.asarray(counts), kind="stable")[:8]
        common = ", ".join(f"{str(labels[i])!r} ({int(counts[i])} cells)" for i in order)
        raise ValueError(f"no cell of obs[{key!r}] in {source} carries a control label {controls} "
                         f"(--control-labels / control_labels=); its most frequent values: {common}. "
                         f"Pass the label of the unperturbed cells{control_hint(labels)}")
    unused = [c for c in controls if c not in carried]
    if unused and tuple(controls) != DEFAULT_CONTROLS:
        warn(f"control label(s) {unused} of obs[{key!r}] in {source} match no cell "
             f"(those that do: {sorted(carried)})")
    _separator_hint(key, labels, controls, separator, source)


FEW_CELLS = 10  # a condition with fewer training cells than this is learnt from too few examples


def _thin_labels(key: str, labels: np.ndarray, source: str) -> None:
    """Warn where a condition key cannot teach the model much: one value for every cell (it
    conditions on nothing), or values carried by fewer than ``FEW_CELLS`` cells (their generated
    cells rest on that few examples)."""
    values, counts = np.unique(labels, return_counts=True)
    if len(values) == 1:
        warn(f"obs[{key!r}] of {source} has one value ({str(values[0])!r}) for every cell: conditioning on "
             f"it changes nothing; leave it out of the condition keys")
        return
    few = np.argsort(counts, kind="stable")[: int((counts < FEW_CELLS).sum())]
    if len(few):
        shown = ", ".join(f"{str(values[i])!r} ({int(counts[i])} cell{'s' if counts[i] > 1 else ''})" for i in few[:5])
        warn(f"obs[{key!r}] of {source}: {len(few)} value(s) with fewer than {FEW_CELLS} cells ({shown}"
             f"{' ...' if len(few) > 5 else ''}); cells generated under them rest on that few examples")


MISSING_TEXT = ("nan", "NaN", "None", "<NA>", "NA")  # what str() or R writes for a missing value


def _missing_as_text(key: str, labels: np.ndarray, source: str) -> None:
    """Warn where cells carry a missing value written as text (``'nan'``: ``astype(str)`` of a
    column with missing values, ``'NA'`` from R): read as a label (or a perturbation) of its
    own, not as missing."""
    values, counts = np.unique(labels, return_counts=True)
    found = [(v, int(n)) for v, n in zip(values, counts) if v in MISSING_TEXT]
    if found:
        shown = ", ".join(f"{v!r} ({n} cells)" for v, n in found)
        warn(f"obs[{key!r}] of {source} holds {shown}: a missing value written as text (as "
             f"`.astype(str)` writes NaN) is read as a label of its own; if those cells have no label, "
             f"drop them or name what they are")


def _lookalike_labels(key: str, labels: np.ndarray, source: str) -> None:
    """Warn where distinct labels of a plain covariate differ only by surrounding whitespace or
    their Unicode form (``'B cell'`` beside ``'B cell '``, a composed ``'é'`` beside ``e`` plus an
    accent): each is a condition of its own, though they read as one."""
    groups: dict[str, list[str]] = {}
    for lab in np.unique(labels):
        groups.setdefault(unicodedata.normalize("NFC", str(lab)).strip(), []).append(str(lab))
    alike = [sorted(v) for v in groups.values() if len(v) > 1]
    if alike:
        shown = "; ".join(" vs ".join(map(ascii, v)) for v in alike[:3])
        warn(f"obs[{key!r}] of {source}: {len(alike)} label(s) are written in more than one way that "
             f"differ only by surrounding whitespace or Unicode form ({shown}), and each way is a condition "
             f"of its own; write each label one way (`adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)"
             f".str.strip().str.normalize('NFC')`)")


OTHER_SEPARATORS = ("_", "|", ";", "+", "&", ",")  # how other tools join the singles of a combination


def joined_otherwise(labels, known, separator: str, controls=()) -> tuple[str, str, list[str]] | None:
    """``(label, its separator, its parts)`` for the first of ``labels`` that joins labels of
    ``known`` (and control labels: GEARS' ``A|ctrl``) with another separator than ``separator``
    (scPerturb's ``KLF1_CEBPA`` on ``+`` data), else ``None``."""
    controls = set(controls)
    for label in labels:
        for other in OTHER_SEPARATORS:
            parts = [p.strip() for p in str(label).split(other) if p.strip()] if other != separator else []
            if len(parts) > 1 and any(p in known for p in parts) and all(p in known or p in controls for p in parts):
                return str(label), other, parts
    return None


def _fragment_hint(key: str, labels: set, controls, separator: str, source: str) -> None:
    """Warn about labels read as combinations none of whose parts is a perturbation on its own
    anywhere in the data (a drug named ``(+)-JQ1`` split at ``+``): likely one perturbation whose
    name holds the separator."""
    controls = set(controls)
    parts_of = {lab: [p.strip() for p in lab.split(separator) if p.strip() and p.strip() not in controls]
                for lab in labels}
    alone = {ps[0] for ps in parts_of.values() if len(ps) == 1}
    split = sorted(lab for lab, ps in parts_of.items() if len(ps) > 1 and not alone.intersection(ps))
    if split:
        shown = " + ".join(repr(p) for p in parts_of[split[0]])
        warn(f"obs[{key!r}] in {source}: {len(split)} label(s) such as {split[0]!r} are read as combinations "
             f"({shown}) none of whose parts is a perturbation on its own in the data; if such a label "
             f"names one perturbation, pass a separator it does not hold (--separator, data.separator, "
             f"separator=)")


def _separator_hint(key: str, labels, controls, separator: str, source: str) -> None:
    """Warn when no label holds ``separator`` but some join two or more other labels (or control
    labels) with another one (scPerturb's ``A_B``; a single written with a control label, GEARS'
    ``A|ctrl``, stands alone too): read as single perturbations of their own, they would be
    neither additive nor predictable from their parts."""
    labels = {str(lab).strip() for lab in labels}
    if any(separator in lab for lab in labels):
        _fragment_hint(key, labels, controls, separator, source)
        return
    for other in OTHER_SEPARATORS:
        if other == separator:
            continue
        parts = {lab: [p.strip() for p in lab.split(other) if p.strip()] for lab in labels}
        alone = labels | set(controls) | {p for ps in parts.values() for p in ps  # A|ctrl: A stands alone
                                          if len(ps) > 1 and set(ps) - {p} <= set(controls)}
        joined = sorted(lab for lab, ps in parts.items() if len(ps) > 1 and all(p in alone for p in ps))
        if joined:
            warn(f"obs[{key!r}] in {source}: {len(joined)} label(s) such as {joined[0]!r} join labels that "
                 f"also stand alone with {other!r}, not the separator {separator!r}, so each is read as a "
                 f"perturbation of its own; if they are combinations, pass --separator {other!r} "
                 f"(data.separator, separator=)")
            return


def _perturbation_hint(key: str, labels: set, controls: set, separator: str, source: str) -> None:
    """Warn when a plain covariate's labels read as a perturbation screen's (GEARS' ``A+ctrl``, or
    ``A+B`` beside ``A`` and ``B``): without ``--perturbation-keys`` each label is a category of
    its own, and combinations, new contexts and unseen perturbations cannot be predicted."""
    for lab in sorted(labels):
        parts = [p.strip() for p in lab.split(separator) if p.strip()]
        if len(parts) > 1 and (set(parts) & controls or set(parts) <= labels):
            warn(f"obs[{key!r}] in {source} reads as a perturbation screen ({lab!r} joins "
                 f"{' and '.join(repr(p) for p in parts)}), but it is a plain covariate: each label is a "
                 f"category of its own. To predict combinations, new contexts and unseen perturbations, "
                 f"pass it as a perturbation (--perturbation-keys {key}, perturbation_keys=)")
            return


def _encode_obs(adata: ad.AnnData, categorical_keys, continuous_keys, vocab=None, perturbation_keys=(),
                control_labels=DEFAULT_CONTROLS, separator="+", check_control=True, dose_key=None):
    """obs columns -> tensors and vocabularies. Categorical: ``LongTensor`` codes; perturbation:
    multi-hot ``FloatTensor[N, n + 1]`` over single perturbations (see
    :mod:`scidiff.models.conditioning`); continuous: ``FloatTensor``. With ``vocab`` (a model's),
    labels it does not know are errors that list the known ones; without it (training), a
    perturbation needs control cells (:func:`check_controls`, unless ``check_control`` is off)."""
    perturbation_keys = [k for k in perturbation_keys if k in categorical_keys]
    missing = [k for k in list(categorical_keys) + list(continuous_keys) if k not in adata.obs.columns]
    if missing:
        raise KeyError(f"obs key(s) {missing} not in {_name(adata)}; available obs keys: "
                       f"{list(adata.obs.columns)}")
    controls = set(control_labels)
    codes, vocabs = {}, {}
    for key in categorical_keys:
        col = adata.obs[key]
        control = (list(control_labels) or [None])[0] if key in perturbation_keys else None
        check_labelled(col, key, _name(adata), control,
                       known=vocab[key] if vocab is not None and key in vocab else None)
        labels = col.astype(str).to_numpy()
        if vocab is None and check_control:  # (off where a streamed set-up passes one row per label)
            _missing_as_text(key, labels, _name(adata))
        if key in perturbation_keys and vocab is None and check_control:
            check_controls(key, *np.unique(labels, return_counts=True), control_labels, separator, _name(adata))
        if key in perturbation_keys:
            parts = [[p.strip() for p in lab.split(separator) if p.strip() and p.strip() not in controls]
                     for lab in labels]
            seen = sorted({p for ps in parts for p in ps})
            known_list = list(vocab[key]) if vocab is not None and key in vocab else seen
            unknown = sorted(set(seen) - set(known_list))
            if unknown:
                raise ValueError(f"obs[{key!r}] has perturbations the model never saw: {unknown[:10]} (in "
                                 f"{_name(adata)}); known "
                                 f"single perturbations: {known_list}")
            index = {p: i for i, p in enumerate(known_list)}
            rows = torch.zeros(len(labels), len(known_list) + 1)
            for i, ps in enumerate(parts):
                rows[i, [index[p] for p in ps]] = 1.0
            vocabs[key], codes[key] = known_list, rows
            continue
        if vocab is not None and key in vocab:
            known = {v: i for i, v in enumerate(vocab[key])}
            unknown = sorted(set(labels) - set(known))
            if unknown:
                raise ValueError(f"obs[{key!r}] has values the model does not know: {unknown[:10]} (in "
                                 f"{_name(adata)}); {known_values(unknown[0], vocab[key])}")
            vocabs[key] = list(vocab[key])
        else:
            _perturbation_hint(key, set(labels), controls, separator, _name(adata))
            _thin_labels(key, labels, _name(adata))
            _lookalike_labels(key, labels, _name(adata))
            cats = (list(col.cat.categories.astype(str)) if isinstance(col.dtype, pd.CategoricalDtype)
                    else sorted(set(labels)))
            vocabs[key] = [c for c in cats if c in set(labels)]
            known = {v: i for i, v in enumerate(vocabs[key])}
        codes[key] = torch.tensor([known[v] for v in labels], dtype=torch.long)
    for key in continuous_keys:
        vals = pd.to_numeric(adata.obs[key], errors="coerce").to_numpy(dtype=np.float32)
        if not np.isfinite(vals).all():
            if key == dose_key and perturbation_keys:
                _undosed_controls(adata.obs, key, vals, perturbation_keys, controls, separator, _name(adata))
            raise _not_numeric(adata.obs, key, vals, _name(adata))
        if vocab is None and len(vals) and (vals == vals[0]).all():
            warn(f"obs[{key!r}] of {_name(adata)} has one value ({float(vals[0]):g}) for every cell: "
                 f"conditioning on it changes nothing; leave it out of the numeric keys")
        codes[key] = torch.from_numpy(vals)
    return codes, vocabs


def _undosed_controls(obs: pd.DataFrame, key: str, vals: np.ndarray, perturbation_keys, controls, separator: str,
                      source: str) -> None:
    """Where the cells without a dose (NaN) are all control cells of the perturbation keys (a
    screen leaves its vehicle undosed): the error that says to give them dose 0."""
    bad = ~np.isfinite(vals)
    for pk in perturbation_keys:
        labels = obs[pk].astype(str).to_numpy()[bad]
        if any(p.strip() and p.strip() not in controls for lab in labels for p in lab.split(separator)):
            return
    if np.isnan(vals[bad]).all():
        raise ValueError(f"obs[{key!r}] of {source} (the dose_key) has no dose for {int(bad.sum())} cells, all "
                         f"of them control cells: a control cell's dose is 0; set it "
                         f"(`adata.obs[{key!r}] = adata.obs[{key!r}].astype(float).fillna(0)`)")


def _not_numeric(obs: pd.DataFrame, key: str, vals: np.ndarray, source: str) -> ValueError:
    """The error for a numeric covariate (time, dose) with values that are not finite numbers:
    how many, which, and a numeric column that groups the cells the same way where there is one
    (Klein's ``day`` = ``d0, d2, ...`` beside ``day_num`` = ``0, 2, ...``)."""
    bad = ~np.isfinite(vals)
    shown = list(dict.fromkeys(str(v) for v in obs[key].to_numpy()[bad]))[:5]
    text = obs[key].astype(str)

    def same_groups(c) -> bool:
        pairs = pd.DataFrame({"a": text, "b": obs[c]})
        return bool((pairs.groupby("a", observed=True)["b"].nunique() == 1).all()
                    and (pairs.groupby("b", observed=True)["a"].nunique() == 1).all())

    same = [c for c in obs.columns if c != key and pd.api.types.is_numeric_dtype(obs[c])
            and not pd.api.types.is_bool_dtype(obs[c]) and np.isfinite(obs[c].to_numpy(np.float64)).all()
            and same_groups(c)]
    hint = (f"; obs[{same[0]!r}] holds the same groups as numbers: pass {same[0]!r} instead" if same
            else "; write its values as numbers (e.g. days or hours, a dose in one unit)")
    return ValueError(f"obs[{key!r}] of {source} must be numeric and finite: {int(bad.sum())} cells hold "
                      f"{shown}{hint}")


def _log_expression(adata, layer, use_raw, input_kind, target_sum, check_cells: bool = False):
    """The chosen matrix of ``adata`` as log1p values (counts normalised to ``target_sum``), its
    genes, its input kind and the target sum; ``check_cells``: warn about empty cells (training)."""
    matrix, var_names, key = expression_matrix(adata, layer, use_raw)
    where = f"{key} of {_name(adata)}"
    kind = detect_input(matrix, where, input_kind)
    if kind == "log1p" and input_kind == "auto":
        check_log_base(adata, key, where)  # scanpy's log1p(base=2) on the highly variable genes alone
    if check_cells:
        warn_empty_cells(matrix, where, adata.obs_names)
    if kind == "counts":
        matrix, target_sum = log_normalize(matrix, target_sum)
    else:
        target_sum = None
    return matrix, var_names, kind, target_sum


def as_names(value):
    """A list argument of names (keys, labels, genes): one name given as a string is that name
    alone, not its characters (``condition_keys="cell_type"`` means ``["cell_type"]``); a set, whose
    order changes from one Python process to the next (string hashing), is taken sorted, so that the
    same set gives the same genes and covariates in the same order every run."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return [value] if isinstance(value, str) else value


def _gene_count(n_top_genes) -> int | None:
    """``n_top_genes`` as an int (``10.0``, as a YAML or CSV may give it, is 10), or ``None``;
    anything else (``10.5``, ``'10'``, ``True``) is a ``ValueError`` naming it."""
    return None if n_top_genes is None else whole_number("n_top_genes", n_top_genes, 1,
                                                         what="a whole number of genes (or None for all)")


def _gene_list(genes):
    """``genes=`` as a list of names, or ``None``: an empty list, or a boolean mask (a
    ``var['highly_variable']`` column), is a ``ValueError`` that says what to pass."""
    if genes is None:
        return None
    values = np.asarray(list(genes) if not isinstance(genes, np.ndarray) else genes, dtype=object)
    if len(values) == 0:
        raise ValueError("genes= is an empty list: name the genes to keep, or pass genes=None to choose "
                         "n_top_genes highly variable ones")
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        raise ValueError(f"genes= takes gene names, got a boolean mask of {len(values)} values; pass the names it "
                         f"selects, e.g. genes=adata.var_names[adata.var['highly_variable']]")
    return [str(g) for g in values]


def _by_id(genes: list[str], var_names, var: pd.DataFrame, gene_symbols) -> list[str]:
    """``genes`` with each name that is not one of ``var_names`` but the symbol of exactly one of
    them (``var``'s symbols column, :func:`scidiff.data.gene_symbols.symbol_column`) as that
    gene's ID: a list may name genes by symbol where the file is indexed by ID."""
    names = [str(g) for g in var_names]
    have = set(names)
    if all(g in have for g in genes):
        return genes
    try:
        column = symbol_column(var, gene_symbols)
    except KeyError:
        return genes  # the set-up names the missing column itself (record_symbols)
    if column is None:
        return genes
    index = symbol_index(names, symbols_of(var, column, names))
    return [g if g in have else index.get(g, g) for g in genes]


def key_names(value) -> list:
    """A list argument of obs keys: ``None`` (scvi-tools' default) is none, one string is that key
    alone; numpy strings are plain ones (the keys name the spec's covariates)."""
    if value is None:
        return []
    return [str(k) if isinstance(k, str) else k for k in as_names(value)]


def label_names(control_labels) -> list[str]:
    """``control_labels`` as text, as obs labels are read: ``None`` is the default labels, one
    label (a string, or a number such as a guide column's 0) is that label alone."""
    if control_labels is None:
        return list(DEFAULT_CONTROLS)
    if isinstance(control_labels, (str, bytes, int, float, np.generic)):
        control_labels = [control_labels]
    return [str(c).strip() for c in control_labels]  # labels are read stripped: a label with spaces matches none


def _separator(separator) -> str:
    """The separator of combination labels: a non-empty string, else a ``ValueError``."""
    if not isinstance(separator, str) or not separator:
        raise ValueError(f"separator (what joins the singles of a combination label, '+' by default) must be a "
                         f"non-empty string, got {separator!r}")
    return separator


def setup_arguments(genes, n_top_genes, condition_keys, continuous_keys, perturbation_keys, control_labels,
                    separator) -> tuple:
    """A set-up's arguments as it reads them, the same in memory and streamed: ``genes`` a list of
    names or ``None``, ``n_top_genes`` an int or ``None``, the keys lists (``None``: none), the
    control labels text (``None``: the defaults), the separator a non-empty string; errors name
    the argument."""
    return (_gene_list(as_names(genes)), _gene_count(n_top_genes),
            *map(key_names, (condition_keys, continuous_keys, perturbation_keys)),
            label_names(control_labels), _separator(separator))


def setup_anndata(adata, *, layer: str | None = None, use_raw: bool = False, genes=None,
                  n_top_genes: int | None = 2000, condition_keys=(), continuous_keys=(),
                  input_kind: str = "auto", target_sum: float | None = 1e4,
                  scaling: str = "global", perturbation_keys=(), control_labels=("control", "ctrl"),
                  dose_key: str | None = None, separator: str = "+", gene_symbols: str | None = "auto") -> CellData:
    """Read cells into the model's space and record how (scvi-tools' ``setup_anndata`` idea).

    ``adata``: an AnnData or a path to ``.h5ad``. Expression comes from ``X``, ``layers[layer]``
    or ``raw.X``; counts are normalised (``target_sum``, ``None`` = median) and log1p'd; genes are
    ``genes`` or the ``n_top_genes`` most variable. ``scaling``: ``"global"`` centres each gene
    and divides by one shared standard deviation (keeps rare genes small); ``"gene"`` z-scores
    each gene; ``"none"`` keeps log1p values.

    Covariates: ``condition_keys`` are categorical obs columns; those also in
    ``perturbation_keys`` are perturbations (``A+B`` combinations, ``control_labels`` for none);
    ``continuous_keys`` are numeric (time); ``dose_key`` is numeric and scales its perturbation.
    ``gene_symbols``: the ``var`` column with gene symbols where ``var_names`` are IDs (scanpy's
    argument; ``"auto"`` finds ``feature_name``, ``gene_symbols``, ``gene_name``...; ``None``:
    none), so that perturbation labels and design targets may name genes by symbol.
    """
    genes, n_top_genes, condition_keys, continuous_keys, perturbation_keys, control_labels, separator = \
        setup_arguments(genes, n_top_genes, condition_keys, continuous_keys, perturbation_keys, control_labels,
                        separator)
    use_raw = yes_no("use_raw", use_raw)  # 'no' read raw.X, as any non-empty text is true
    if target_sum is not None:  # True normalised to 1 count per cell, -1 to NaN
        target_sum = real_number("target_sum", target_sum, lambda v: v > 0,
                                 what="a positive number of counts per cell (None: the median)")
    adata = in_memory(adata)  # a path, or a backed AnnData, read
    matrix, var_names, kind, target_sum = _log_expression(adata, layer, use_raw, input_kind, target_sum,
                                                          check_cells=True)
    if genes is not None:
        genes = _by_id(genes, var_names, var_of(adata, use_raw), gene_symbols)
        twice = [g for g, n in pd.Series(genes).value_counts(sort=False).items() if n > 1]
        if twice:
            raise ValueError(f"genes= names {len(twice)} gene(s) more than once (by ID or symbol): {twice[:10]}")
    chosen = select_genes(matrix, var_names, genes, n_top_genes)
    x = dense(matrix[:, gene_columns(var_names, chosen)])
    if scaling == "none":
        offset, scale = np.zeros(x.shape[1]), np.ones(x.shape[1])
    elif scaling == "global":
        offset = x.mean(0)
        scale = np.full(x.shape[1], max(float((x - offset).std()), 1e-6))
    elif scaling == "gene":
        offset, scale = x.mean(0), np.maximum(x.std(0), 1e-3)
    else:
        raise ValueError(f"scaling must be 'global', 'gene' or 'none', got {scaling!r}")
    condition_keys, continuous_keys = covariate_keys(condition_keys, continuous_keys, perturbation_keys, dose_key)
    codes, vocabs = _encode_obs(adata, condition_keys, continuous_keys, perturbation_keys=perturbation_keys,
                                control_labels=control_labels, separator=separator, dose_key=dose_key)
    spec = _build_spec(chosen, kind, target_sum, offset, scale, vocabs, codes, continuous_keys=continuous_keys,
                       layer=layer, use_raw=use_raw, perturbation_keys=perturbation_keys,
                       control_labels=control_labels, separator=separator, dose_key=dose_key, obs=adata.obs)
    spec.log_total = log_total(x)
    record_symbols(spec, var_of(adata, use_raw), gene_symbols,
                   f"{'raw.var' if use_raw else 'var'} of {_name(adata)}")
    return CellData(torch.from_numpy(spec.to_model_space(x)), codes, spec, adata.obs.copy())


def log_total(x, rows: int = 65536) -> float | None:
    """The mean ``log`` of the cells' total normalised expression, from their log1p values ``x [N,
    G]`` (dense, by blocks of ``rows`` cells, or sparse), over the cells with any (``None`` without
    one): counts normalised to ``c`` times the total move it by exactly ``log(c)``."""
    if sp.issparse(x):
        totals = np.asarray(x.expm1().sum(1), np.float64).ravel()
    else:
        totals = np.concatenate([np.expm1(x[i:i + rows].astype(np.float64)).sum(1)
                                 for i in range(0, len(x), rows)]) if len(x) else np.zeros(0)
    totals = totals[totals > 0]
    return float(np.log(totals).mean()) if len(totals) else None


USE_RAW = "where the model's training cells were read"  # what use_raw=None means for new cells


def source_like(spec: DataSpec, adata: ad.AnnData, layer: str | None = None,
                use_raw: bool | None = None) -> tuple[str | None, bool]:
    """Where new cells' expression is read, ``(layer, use_raw)``: as given, or, with neither
    given, where the model's training cells were read (``spec.source``) where ``adata`` has it,
    else ``X``."""
    use_raw = yes_no("use_raw", use_raw, USE_RAW)  # 'no' read .raw: any non-empty text is true
    if layer is None and use_raw is None:
        layer, use_raw = spec.source.get("layer"), spec.source.get("use_raw", False)
        if layer and layer not in adata.layers:
            layer = None
        if use_raw and adata.raw is None:
            use_raw = False
    return layer, bool(use_raw)


def _raw_hint(spec: DataSpec, adata: ad.AnnData, use_raw: bool) -> str:
    """Where genes the model needs are missing from ``X`` but ``.raw`` (scanpy's layout: ``X`` on
    the highly variable genes, ``.raw`` on all) holds them all: how to read it."""
    if use_raw or adata.raw is None:
        return ""
    raw_var = var_of(adata, True)
    names, have = spec.names_in(raw_var.index, raw_var), set(map(str, raw_var.index))
    return "; the file's .raw holds them all: pass --use-raw / use_raw=True" if set(names) <= have else ""


def training_scale(spec: DataSpec, x, kind: str, where: str, exact: str) -> float | None:
    """The factor that brings new cells' log1p values ``x`` (on the model's genes; ``kind``: what
    the file held) to the scale of the model's training cells, with a warning naming ``where``
    they came from, or ``None`` where the kinds agree or it is within ``SCALE_TOLERANCE``: counts
    for a model trained on log1p values, or log1p values normalised to a total of their own for a
    model trained on counts (from the cells' mean log total, :attr:`DataSpec.log_total`).
    ``exact``: how to pass the raw counts instead. Counts for a model trained on counts are only
    checked: normalised to a total far above the training cells' on the model's genes
    (``PARTIAL_TOTAL``), they were likely normalised by the total of the model's genes alone (a
    file of only those genes), which a warning says."""
    new_total = log_total(x) if spec.log_total is not None else None
    if new_total is None:
        return None
    if kind == spec.input_kind:
        if kind == "counts" and new_total - spec.log_total > np.log(PARTIAL_TOTAL):
            warn(f"the cells of {where} hold {np.exp(new_total - spec.log_total):.2g} times the training "
                 "cells' share of their counts on the model's genes: each cell is normalised by its own "
                 "total, so a file of only some of the genes (the model's) normalises them too high; pass "
                 "the cells with all their genes")
        return None
    factor, target_sum = float(np.exp(spec.log_total - new_total)), spec.target_sum or 1e4
    if abs(np.log(factor)) <= np.log(SCALE_TOLERANCE):
        return None
    if kind == "counts":
        warn(f"the counts of {where} are normalised to {target_sum * factor:,.0f} per cell, not "
             f"{target_sum:,.0f}: the model was trained on log1p values of that scale (their totals on its "
             "genes)")
    else:
        warn(f"the log1p values of {where} look normalised to about {target_sum / factor:,.0f} per cell "
             f"(their totals on the model's genes), not the {target_sum:,.0f} of the model's training "
             f"counts: rescaled {factor:.3g}-fold to that scale; pass their raw counts ({exact}) to read "
             "them exactly")
    return factor


def transform_like(spec: DataSpec, adata, *, layer: str | None = None, use_raw: bool | None = None,
                   condition_keys=None, input_kind: str = "auto") -> CellData:
    """Bring new cells into an existing model's gene space (same genes, normalisation, scaling,
    vocabularies). Missing genes and unknown covariate values are errors that name them. Counts
    for a model trained on log1p values are normalised to those values' scale (their mean log
    total on the model's genes, :attr:`DataSpec.log_total`), with a warning, where 10,000 per
    cell would put them more than ``SCALE_TOLERANCE`` times off it; log1p values for a model
    trained on counts are rescaled to the counts' scale alike (normalised to another total than
    ``target_sum``, as scanpy's ``normalize_total`` does by default: the median)."""
    adata = in_memory(adata)  # a path, or a backed AnnData, read
    layer, use_raw = source_like(spec, adata, layer, use_raw)
    target_sum = spec.target_sum or 1e4
    matrix, var_names, kind, _ = _log_expression(adata, layer, bool(use_raw), input_kind, target_sum)
    var = var_of(adata, bool(use_raw))
    try:
        columns = gene_columns(var_names, spec.names_in(var_names, var))
    except KeyError as exc:
        raise KeyError(f"{exc.args[0]} (read from {'raw/X' if use_raw else f'layers/{layer}' if layer else 'X'} of "
                       f"{_name(adata)}){_raw_hint(spec, adata, use_raw)}") from None
    x = dense(matrix[:, columns])
    factor = training_scale(spec, x, kind, _name(adata), "--layer NAME / layer=..., or --use-raw / use_raw=True")
    if factor is not None:  # the normalisation is linear in its target: the values rescaled, not the file read again
        x = np.log1p(np.expm1(x) * np.float32(factor))
    if condition_keys is not None:
        condition_keys = list(as_names(condition_keys))
        unknown = [k for k in condition_keys if k not in spec.categorical]
        if unknown:
            raise KeyError(f"condition key(s) {unknown} are not covariates of the model; it knows "
                           f"{sorted(spec.categorical) or 'no categorical covariates'}")
        absent = [k for k in condition_keys if k not in adata.obs.columns]
        if absent:
            raise KeyError(f"obs key(s) {absent} not in {_name(adata)}; available obs keys: "
                           f"{list(adata.obs.columns)}")
    keys = [k for k in (spec.categorical if condition_keys is None else condition_keys) if k in adata.obs]
    cont = [k for k in spec.continuous if k in adata.obs]
    codes, _ = _encode_obs(adata, keys, cont, vocab=spec.categorical, perturbation_keys=spec.perturbation_keys,
                           control_labels=spec.control_labels, separator=spec.separator, dose_key=spec.dose_key)
    return CellData(torch.from_numpy(spec.to_model_space(x)), codes, spec, adata.obs.copy())
