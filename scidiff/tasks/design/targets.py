"""Design targets: what designed cells should look like, in the model's genes.

A :class:`PhenotypeTarget` is a set of gene constraints (levels to reach, markers up, genes
down, each met within a tolerance) and optionally a cell type; :meth:`PhenotypeTarget.parse`
reads the command line's ``"IL2RA>=5,FOXP3>=4,CD8A<=0.1"``. Unknown genes are errors that list
close matches (:class:`UnknownGeneError`).
"""
from __future__ import annotations

import difflib
import math
import numbers
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from ...textfiles import excel_date_hint

RELATIONS = (">=", "<=", "==")
# what a target pasted from a paper writes for an ASCII relation or sign (one meaning each; an en dash is refused)
TYPESET = {"\u2265": ">=", "\u2a7e": ">=", "\u2264": "<=", "\u2a7d": "<=", "\u2212": "-"}


def _typeset_character(part: str) -> str:
    """Where ``part`` holds a character other than ASCII: ``", it holds ... at character i"``, else ``""``."""
    for i, ch in enumerate(part, 1):
        if ord(ch) > 127 and not ch.isspace():
            name = unicodedata.name(ch, "unnamed character")
            return f"; it holds {ch!r} (U+{ord(ch):04X} {name}) at character {i}, write it in ASCII"
    return ""


class UnknownGeneError(KeyError, ValueError):
    """A gene the model does not have; the message lists close matches."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def unknown_gene_error(genes, known, what: str = "the model's genes", n_genes: int | None = None) -> UnknownGeneError:
    """An error naming each unknown gene with its closest known names (difflib); ``n_genes``: how
    many genes ``what`` has (default ``len(known)``; less where ``known`` also holds symbols)."""
    known = [str(g) for g in known]
    n_genes = len(known) if n_genes is None else int(n_genes)
    upper = {g.upper(): g for g in known}
    parts = []
    for g in genes:
        close = difflib.get_close_matches(str(g), known, n=5, cutoff=0.6)
        if str(g).upper() in upper and upper[str(g).upper()] not in close:
            close.insert(0, upper[str(g).upper()])
        parts.append(f"{g!r} (close matches: {', '.join(close) if close else 'none'})")
    return UnknownGeneError(f"gene(s) not in {what} ({n_genes} genes): " + "; ".join(parts) + excel_date_hint(genes))


def gene_index(gene_to_idx) -> dict[str, int]:
    """A gene -> column mapping from a dict or an ordered list of gene names."""
    if isinstance(gene_to_idx, dict):
        return {str(k): int(v) for k, v in gene_to_idx.items()}
    return {str(g): i for i, g in enumerate(gene_to_idx)}


# -- targets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneConstraint:
    """One gene-level target: ``gene relation value`` in log1p-normalised expression, met within
    ``tolerance`` (``>=``: ``x >= value - tol``; ``<=``: ``x <= value + tol``; ``==``:
    ``|x - value| <= tol``). ``kind`` says where it came from (gene_targets, marker_genes,
    suppressed_genes)."""

    gene: str
    relation: str
    value: float
    tolerance: float
    kind: str

    def __str__(self) -> str:
        return f"{self.gene}{self.relation}{self.value:g}"

    def bounds(self) -> tuple[float, float]:
        """The interval of values that meet the constraint (tolerance included)."""
        if self.relation == ">=":
            return self.value - self.tolerance, math.inf
        if self.relation == "<=":
            return -math.inf, self.value + self.tolerance
        return self.value - self.tolerance, self.value + self.tolerance

    def met(self, values) -> np.ndarray:
        lo, hi = self.bounds()
        v = np.asarray(values, dtype=np.float64)
        return (v >= lo - 1e-6) & (v <= hi + 1e-6)


def _level(gene, value, what: str) -> float:
    try:  # True read as the level 1.0, NaN as a level no cell meets
        level = float(value) if not isinstance(value, (bool, np.bool_)) else math.nan
    except (TypeError, ValueError):
        level = math.nan
    if not math.isfinite(level):
        raise ValueError(f"{what}: the level of {gene!r} must be a number (log1p-normalised, finite); got {value!r}")
    return level


def _level_map(genes, default: float | None, what: str) -> dict[str, float]:
    if genes is None:
        return {}
    if isinstance(genes, str):
        genes = [genes]
    if isinstance(genes, dict):
        return {str(g).strip(): _level(g, v, what) for g, v in genes.items()}
    if default is None:  # a list of gene_targets read as level 0, i.e. every gene switched off
        genes = list(genes)
        if genes:
            raise TypeError(f"{what} needs a level per gene, e.g. {{{str(genes[0])!r}: 2.0}}; got the list {genes!r}"
                            " (for genes up or down without a level use marker_genes / suppressed_genes)")
        return {}
    out = {}
    for g in genes:
        if not isinstance(g, str):
            raise TypeError(f"{what} must be gene names (or a dict gene -> level); got {g!r}")
        out[g.strip()] = float(default)  # a name pasted with a (non-breaking) space
    return out


class PhenotypeTarget:
    """What designed cells should look like, in the model's genes (log1p-normalised values).

    ``gene_targets``: gene -> level to reach (met within the tolerance). ``marker_genes``: genes
    that must be up, at least ``marker_level`` (a list) or at their own minimum (a dict).
    ``suppressed_genes``: genes that must be down, at most ``suppressed_level`` (list) or their own
    maximum (dict). ``cell_type``: a label of a trained :class:`CellTypeClassifier`.
    ``tolerance``: slack when checking a target (a number, or a dict gene -> number).
    """

    def __init__(self, gene_targets: dict | None = None, marker_genes=None, suppressed_genes=None,
                 cell_type: str | None = None, *, marker_level: float = 1.0, suppressed_level: float = 0.1,
                 tolerance=0.1):
        self.gene_targets = _level_map(gene_targets, None, "gene_targets")
        self.marker_genes = _level_map(marker_genes, marker_level, "marker_genes")
        self.suppressed_genes = _level_map(suppressed_genes, suppressed_level, "suppressed_genes")
        self.cell_type = None if cell_type is None else str(cell_type)
        self.marker_level, self.suppressed_level = float(marker_level), float(suppressed_level)
        self.tolerance = tolerance

    # -- parsing -----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, cell_type: str | None = None, tolerance=0.1) -> "PhenotypeTarget":
        """``"IL2RA>=5,FOXP3>=4,CD8A<=0.1,GATA3=2"``: ``>=`` makes a marker with that minimum,
        ``<=`` a suppressed gene with that maximum, ``=`` (or ``==``) a level to reach."""
        if text is not None and not isinstance(text, str):
            raise TypeError(f"a target is text such as 'IL2RA>=5,FOXP3>=4,CD8A<=0.1' or a PhenotypeTarget; got "
                            f"{type(text).__name__} {text!r}")
        markers, suppressed, levels = {}, {}, {}
        for part in (text or "").split(","):
            part = part.strip()
            if not part:
                continue
            ascii_part = "".join(TYPESET.get(ch, ch) for ch in part)  # a paper's >= and minus sign
            m = re.fullmatch(r"\s*([^<>=\s]+)\s*(>=|<=|==|=)\s*([-+0-9.eE]+)\s*", ascii_part)
            if m is None:
                raise ValueError(f"cannot read target {part!r}: write GENE>=value, GENE<=value or GENE=value, "
                                 "comma-separated (e.g. 'IL2RA>=5,FOXP3>=4,CD8A<=0.1')"
                                 + _typeset_character(ascii_part))
            gene, rel, value = m.group(1), m.group(2), m.group(3)
            try:
                v = float(value)
            except ValueError:
                raise ValueError(f"target {part!r}: {value!r} is not a number") from None
            book = {">=": markers, "<=": suppressed}.get(rel, levels)
            if gene in book and book[gene] != v:
                raise ValueError(f"target {part!r}: {gene} is given twice with {rel} ({book[gene]:g} and {v:g})")
            book[gene] = v
        return cls(gene_targets=levels, marker_genes=markers, suppressed_genes=suppressed, cell_type=cell_type,
                   tolerance=tolerance)

    # -- views -------------------------------------------------------------------------------------
    def tolerance_of(self, gene: str) -> float:
        if isinstance(self.tolerance, dict):
            return float(self.tolerance.get(gene, 0.1))
        return float(self.tolerance)

    @property
    def constraints(self) -> list[GeneConstraint]:
        out = [GeneConstraint(g, "==", v, self.tolerance_of(g), "gene_targets") for g, v in self.gene_targets.items()]
        out += [GeneConstraint(g, ">=", v, self.tolerance_of(g), "marker_genes") for g, v in self.marker_genes.items()]
        out += [GeneConstraint(g, "<=", v, self.tolerance_of(g), "suppressed_genes")
                for g, v in self.suppressed_genes.items()]
        return out

    @property
    def genes(self) -> list[str]:
        return list(dict.fromkeys(c.gene for c in self.constraints))

    def is_empty(self) -> bool:
        return not self.constraints and self.cell_type is None

    def __repr__(self) -> str:
        parts = [str(c) for c in self.constraints] + ([f"cell_type={self.cell_type}"] if self.cell_type else [])
        return f"PhenotypeTarget({', '.join(parts) or 'empty'})"

    def to_dict(self) -> dict:
        return {"gene_targets": dict(self.gene_targets), "marker_genes": dict(self.marker_genes),
                "suppressed_genes": dict(self.suppressed_genes), "cell_type": self.cell_type,
                "tolerance": self.tolerance, "constraints": [str(c) for c in self.constraints]}

    def use_gene_ids(self, model_gene) -> "PhenotypeTarget":
        """Name each gene as the model does, in place: ``model_gene(name)`` gives the model gene a
        name stands for (a gene ID named by its symbol, :meth:`scidiff.data.DataSpec.model_gene`);
        a name it does not resolve stays, for :meth:`check` to report. One gene named twice (by
        symbol and by ID) with different values is an error (the last one silently won)."""
        def renamed(levels: dict, what: str) -> dict:
            out, named = {}, {}
            for g, v in levels.items():
                gene = model_gene(g) or g
                if gene in out and out[gene] != v:
                    raise ValueError(f"{what}: {named[gene]!r} and {g!r} name the same gene {gene} with different "
                                     f"values ({out[gene]!r} and {v!r}); give it once")
                out[gene], named[gene] = v, named.get(gene, g)
            return out

        self.gene_targets = renamed(self.gene_targets, "gene_targets (GENE=v)")
        self.marker_genes = renamed(self.marker_genes, "marker_genes (GENE>=v)")
        self.suppressed_genes = renamed(self.suppressed_genes, "suppressed_genes (GENE<=v)")
        if isinstance(self.tolerance, dict):
            self.tolerance = renamed(self.tolerance, "tolerance")
        return self

    def check_in(self, spec) -> "PhenotypeTarget":
        """:meth:`check` against a model's genes (its :class:`~scidiff.data.DataSpec`), each gene
        named by ID or by symbol and renamed to the ID (:meth:`use_gene_ids`)."""
        return self.use_gene_ids(spec.model_gene).check(list(spec.gene_names) + [s for s in spec.gene_symbols if s],
                                                        n_genes=len(spec.gene_names))

    # -- validation --------------------------------------------------------------------------------
    def check(self, gene_names=None, *, n_genes: int | None = None) -> "PhenotypeTarget":
        """Raise on an empty target, contradictory targets for one gene (e.g. the same gene up and
        down), levels no log1p expression can meet (below 0), a tolerance that is not a finite
        number >= 0 or names a gene the target does not have, and genes not in ``gene_names``
        (``n_genes``: the model's gene count, where ``gene_names`` also lists symbols)."""
        if self.is_empty():
            raise ValueError("the target is empty: give gene_targets, marker_genes, suppressed_genes or a cell_type "
                             "(e.g. PhenotypeTarget(marker_genes=['CD8A'], suppressed_genes=['CD4']))")
        if isinstance(self.tolerance, dict):
            stray = [g for g in self.tolerance if g not in set(self.genes)]
            if stray:  # a misspelt gene's tolerance was silently the default
                raise ValueError(f"tolerance names gene(s) {stray} that the target does not have; its genes: "
                                 f"{self.genes}")
        elif not isinstance(self.tolerance, numbers.Real) or isinstance(self.tolerance, bool):
            raise TypeError(f"tolerance must be a number or a dict gene -> number; got {self.tolerance!r}")
        by_gene: dict[str, list[GeneConstraint]] = {}
        for c in self.constraints:
            if not math.isfinite(c.value) or not math.isfinite(c.tolerance) or c.tolerance < 0:
                raise ValueError(f"target {c}: the level must be finite and the tolerance >= 0")
            by_gene.setdefault(c.gene, []).append(c)
        for gene, cs in by_gene.items():
            lo = max(c.bounds()[0] for c in cs)
            hi = min(c.bounds()[1] for c in cs)
            kinds = {c.kind for c in cs}
            if {"marker_genes", "suppressed_genes"} <= kinds and lo > hi:
                raise ValueError(f"contradictory targets for {gene}: up ({', '.join(str(c) for c in cs if c.relation == '>=')})"
                                 f" and down ({', '.join(str(c) for c in cs if c.relation == '<=')}) cannot both hold "
                                 f"(tolerance {cs[0].tolerance:g})")
            if lo > hi:
                raise ValueError(f"contradictory targets for {gene}: {', '.join(str(c) for c in cs)} cannot all hold "
                                 f"(tolerance {cs[0].tolerance:g})")
            if hi < 0:
                raise ValueError(f"target {', '.join(str(c) for c in cs)} asks for negative expression; log1p-"
                                 "normalised expression is >= 0")
        if gene_names is not None:
            known = set(str(g) for g in gene_names)
            unknown = [g for g in self.genes if g not in known]
            if unknown:
                raise unknown_gene_error(unknown, gene_names, n_genes=n_genes)
        return self


def met_every_target(met: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Per cell, whether it meets every target of ``met`` (target -> per-cell bool); all ``True``
    for no target."""
    return np.all(np.stack(list(met.values())), axis=0) if met else np.ones(n, bool)


def constraint_hits(expression: np.ndarray, gene_names, target: PhenotypeTarget) -> dict[str, np.ndarray]:
    """Constraint text -> per-cell bool (met within its tolerance)."""
    index = gene_index(gene_names)
    return {str(c): c.met(expression[:, index[c.gene]]) for c in target.constraints}
