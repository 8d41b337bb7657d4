"""Perturbations described by prior knowledge: feature tables that let a model say something about
a perturbation it never saw (:mod:`scidiff.models.perturbation_prior` regresses the seen ones'
effects on them).

Three sources, each a :class:`FeatureBlock` (rows = labels, columns = features):

- **gene targets, from the data itself** (:func:`gene_target_blocks`), for a perturbation
  covariate whose labels are gene names (a CRISPR screen, :func:`labels_are_genes`): for each
  candidate target gene (every gene of the model, every label, seen or named in a user file, whose
  gene is measured in the input file, and every other gene of the input file while the table stays
  under ``GENE_TABLE_BUDGET`` values) its Pearson correlation with each of the model's genes
  over the control cells (``coexpression``, one column per model gene), its loadings on the top
  principal axes of the control cells (``pca_loadings``), and whether it is one of the model's
  genes (``in_model_genes``: its own knockdown is then visible). A label whose gene is not
  measured gets only what a user file gives.
- **a user table** (:func:`read_feature_tsv`, ``--perturbation-features FILE.tsv``): a
  tab-separated file with a header (or none); first column the perturbation label, then numeric
  features (a gene embedding, GO-term indicators, a row of a regulatory network).
- **drugs** (:func:`morgan_fingerprints`, ``--smiles FILE.csv``): a CSV of ``name,smiles`` rows
  (a header row, its second cell naming SMILES, is optional; further columns are ignored, as in
  sci-Plex's drug list) -> Morgan fingerprints, radius 2, 2,048 bits, computed by RDKit (the
  ``chem`` extra).

Every error names the file, the row (1-based line of the file) or the label.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch

from ..textfiles import encoding_error, separator_of
from .gene_symbols import symbol_index, symbols_of, var_of
from .preprocess import dense, expression_matrix, gene_columns, log_normalize

GENE_PCS = 10                # principal axes of the control cells whose loadings describe a target gene
MAX_CONTROL_CELLS = 10_000   # control cells the gene features are computed on (a seeded subsample beyond)
GENE_TABLE_BUDGET = 8_000_000  # co-expression values kept for every gene of the input when they fit in this
MORGAN_RADIUS, MORGAN_BITS = 2, 2048
DATA_SOURCE = "the training data's control cells"


def _fold(label: str) -> str:
    return str(label).strip().casefold()


@dataclass
class FeatureBlock:
    """One source of features: ``values[i]`` describes ``labels[i]``.

    ``name``: what the columns are (``coexpression``, ``pca_loadings``, ``in_model_genes``,
    ``user``, ``morgan``); ``source``: the file they came from (or the data); ``by``: ``"gene"``
    when rows are target genes (a label is looked up through the gene it names), ``"label"``
    otherwise. Look-ups match a label exactly, else case-insensitively when that is unambiguous."""

    name: str
    source: str
    labels: list[str]
    values: np.ndarray
    columns: list[str] | None = None
    by: str = "label"
    _index: dict = field(default=None, init=False, repr=False, compare=False)
    _folded: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.labels = [str(v) for v in self.labels]
        self.values = np.asarray(self.values, dtype=np.float32)
        if self.values.ndim != 2 or self.values.shape[0] != len(self.labels):
            raise ValueError(f"feature block {self.name!r} from {self.source}: {len(self.labels)} labels but values "
                             f"of shape {self.values.shape}")
        self._index = {lab: i for i, lab in enumerate(self.labels)}
        if len(self._index) != len(self.labels):
            dup = sorted({lab for lab in self.labels if self.labels.count(lab) > 1})[:5]
            raise ValueError(f"feature block {self.name!r} from {self.source} lists labels twice: {dup}")
        folded: dict[str, list[int]] = {}
        for i, lab in enumerate(self.labels):
            folded.setdefault(_fold(lab), []).append(i)
        self._folded = {k: v[0] for k, v in folded.items() if len(v) == 1}

    @property
    def dims(self) -> int:
        return self.values.shape[1]

    def index_of(self, label) -> int | None:
        """Row of ``label`` (exact, else case-insensitive when unique), or ``None``."""
        label = str(label).strip()
        i = self._index.get(label)
        return self._folded.get(_fold(label)) if i is None else i

    def to_state(self) -> dict:
        return {"name": self.name, "source": self.source, "labels": list(self.labels), "by": self.by,
                "values": torch.from_numpy(np.ascontiguousarray(self.values)),
                "columns": None if self.columns is None else list(self.columns)}

    @classmethod
    def from_state(cls, state: dict) -> "FeatureBlock":
        return cls(name=state["name"], source=state["source"], labels=list(state["labels"]),
                   values=state["values"].numpy(), columns=state.get("columns"), by=state.get("by", "label"))


@dataclass
class FeatureTable:
    """What is known about the labels of one perturbation covariate ``key``: its blocks, and for a
    covariate whose labels are gene names (``gene_targets``), which measured gene each label
    names (``target_genes``; labels that name no measured gene are absent)."""

    key: str
    blocks: list[FeatureBlock]
    gene_targets: bool = False
    target_genes: dict[str, str] = field(default_factory=dict)
    gene_symbols: dict[str, str] = field(default_factory=dict)  # symbol -> gene ID, where genes are IDs

    def gene_of(self, label) -> str | None:
        """The gene a label of a gene-target covariate names (exact, else case-insensitive, else by
        its symbol, exact, else case-insensitive when one symbol matches: a mouse ``Stat1`` named
        ``STAT1``), or ``None``."""
        if not self.gene_targets:
            return None
        label = str(label).strip()
        gene = self.target_genes.get(label)
        if gene is None:
            for block in self.blocks:
                if block.by == "gene" and block.index_of(label) is not None:
                    return block.labels[block.index_of(label)]
            gene = self.gene_symbols.get(label)
        if gene is None and self.gene_symbols:
            matches = {g for s, g in self.gene_symbols.items() if _fold(s) == _fold(label)}
            gene = matches.pop() if len(matches) == 1 else None
        return gene

    def _row(self, block: FeatureBlock, label) -> int | None:
        if block.by == "gene":
            gene = self.gene_of(label)
            return None if gene is None else block.index_of(gene)
        return block.index_of(label)

    def rows(self, label) -> dict[str, np.ndarray]:
        """``block name -> feature vector`` for each block that describes ``label``."""
        out = {}
        for block in self.blocks:
            i = self._row(block, label)
            if i is not None:
                out[block.name] = block.values[i]
        return out

    def describes(self, label) -> bool:
        return any(self._row(block, label) is not None for block in self.blocks)

    def labels(self) -> list[str]:
        """Every label some block describes (rows of gene blocks as gene names)."""
        return sorted({lab for block in self.blocks for lab in block.labels})

    def sources(self) -> list[str]:
        return list(dict.fromkeys(block.source for block in self.blocks))

    def to_state(self) -> dict:
        return {"key": self.key, "gene_targets": bool(self.gene_targets), "target_genes": dict(self.target_genes),
                "gene_symbols": dict(self.gene_symbols), "blocks": [b.to_state() for b in self.blocks]}

    @classmethod
    def from_state(cls, state: dict) -> "FeatureTable":
        return cls(key=state["key"], blocks=[FeatureBlock.from_state(b) for b in state["blocks"]],
                   gene_targets=bool(state.get("gene_targets")), target_genes=dict(state.get("target_genes") or {}),
                   gene_symbols=dict(state.get("gene_symbols") or {}))


# -- gene targets, from the data ------------------------------------------------------------------

def resolve_genes(labels, genes, symbols: dict[str, str] | None = None) -> dict[str, str]:
    """``label -> gene`` for each label that names one of ``genes`` (exactly, else by the symbol
    of one gene, ``symbols``: :func:`scidiff.data.gene_symbols.symbol_index`, else
    case-insensitively when only one gene or symbol matches)."""
    genes = [str(g) for g in genes]
    symbols = symbols or {}
    exact = set(genes)
    folded: dict[str, list[str]] = {}
    for g in genes:
        folded.setdefault(_fold(g), []).append(g)
    for symbol, g in symbols.items():
        if _fold(symbol) != _fold(g):
            folded.setdefault(_fold(symbol), []).append(g)
    out = {}
    for label in labels:
        label = str(label).strip()
        if label in exact:
            out[label] = label
        elif label in symbols:
            out[label] = symbols[label]
        elif len(set(folded.get(_fold(label), ()))) == 1:
            out[label] = folded[_fold(label)][0]
    return out


def labels_are_genes(labels, genes, min_share: float = 0.1, min_count: int = 2,
                     symbols: dict[str, str] | None = None) -> bool:
    """Whether a perturbation covariate's single labels name genes (a CRISPR screen): at least
    ``min_count`` of them, and ``min_share`` of them, are genes of the input file (by ID or by
    ``symbols``). (A screen measured on a gene panel names many genes outside it: Papalexi's 25
    targets, 9 in its panel.)"""
    labels = list(dict.fromkeys(str(v) for v in labels))
    hits = len(resolve_genes(labels, genes, symbols))
    return bool(labels) and hits >= min_count and hits >= min_share * len(labels)


def control_expression(adata, spec, control_mask, genes, *, max_cells: int = MAX_CONTROL_CELLS,
                       seed: int = 0) -> np.ndarray:
    """log1p-normalised expression ``[n, len(genes)]`` of the control cells of ``adata``
    (``control_mask``), read and normalised as the model's ``spec`` reads its input (same layer,
    same library-size normalisation, computed over all of each cell's genes), for ``genes`` of
    the input file; at most ``max_cells`` cells (a seeded subsample)."""
    rows = np.flatnonzero(np.asarray(control_mask, bool))
    if len(rows) == 0:
        raise ValueError("no control cells to compute gene-target features on")
    if len(rows) > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    layer, use_raw = spec.source.get("layer"), bool(spec.source.get("use_raw"))
    matrix, var_names, _ = expression_matrix(adata, layer, use_raw)
    matrix = matrix[rows]
    if spec.input_kind == "counts":
        matrix, _ = log_normalize(matrix, spec.target_sum)
    return dense(matrix[:, gene_columns([str(v) for v in var_names], genes)]).astype(np.float64)


def gene_target_blocks(control_log: np.ndarray, genes, model_genes, n_components: int = GENE_PCS,
                       source: str = DATA_SOURCE) -> list[FeatureBlock]:
    """Features of candidate target ``genes`` (the columns of ``control_log``, control cells x
    genes, log1p; the model's genes among them): their Pearson correlation with each of
    ``model_genes`` over the control cells (a gene constant in the controls correlates 0 with
    everything), their loadings on the top ``n_components`` principal axes of the controls (over
    ``genes``, centred; each axis signed so that its largest loading is positive) and whether they
    are model genes."""
    genes, model_genes = [str(g) for g in genes], [str(g) for g in model_genes]
    x = np.asarray(control_log, dtype=np.float64)
    if x.shape[1] != len(genes):
        raise ValueError(f"control expression has {x.shape[1]} genes, {len(genes)} names given")
    n = max(len(x), 1)
    centred = x - x.mean(0)
    cov = centred.T @ centred / n                       # [C, C]: one product gives both features
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    ok = sd > 1e-12
    inv = np.divide(1.0, sd, out=np.zeros_like(sd), where=ok)
    cols = gene_columns(genes, model_genes)
    coexpression = np.clip(cov[:, cols] * inv[:, None] * inv[cols][None, :], -1.0, 1.0)
    k = int(min(n_components, len(x) - 1, len(genes)))
    if k >= 1:
        _, vecs = scipy.linalg.eigh(cov, subset_by_index=[len(genes) - k, len(genes) - 1])
        loadings = vecs[:, ::-1]                        # principal axes, the largest first
        flip = np.sign(loadings[np.abs(loadings).argmax(0), np.arange(k)])
        loadings = loadings * np.where(flip == 0, 1.0, flip)
    else:
        loadings = np.zeros((len(genes), 0))
    in_model = np.isin(genes, model_genes).astype(np.float32)[:, None]
    return [FeatureBlock("coexpression", source, genes, coexpression, by="gene"),
            FeatureBlock("pca_loadings", source, genes, loadings, [f"PC{i + 1}" for i in range(k)], by="gene"),
            FeatureBlock("in_model_genes", source, genes, in_model, ["in_model_genes"], by="gene")]


# -- user files -----------------------------------------------------------------------------------

def _check_file(path, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such {what} file: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder, not a file")
    return path


def _text_rows(path: str, delimiter: str, what: str) -> list[list[str]]:
    wrong = encoding_error(path, f"{what} file")  # Excel's "Unicode Text": UTF-16
    if wrong is not None:
        raise wrong
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return [row for row in csv.reader(fh, delimiter=delimiter)]
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text ({what}) file") from None
    except csv.Error as exc:
        raise ValueError(f"{path}: not a readable {what} file ({exc})") from None


def _finite(cell: str) -> bool:
    try:
        return bool(np.isfinite(float(cell)))
    except ValueError:
        return False


def _is_header(row: list[str]) -> bool:
    """Whether the first row of a feature table names its columns: not when it reads as a row of
    values (a label, then numbers that are not the column numbers ``0..n-1`` or ``1..n`` a
    DataFrame without column names writes)."""
    cells = [c.strip() for c in row[1:]]
    missing = ("", "na", "nan", "null", "none", "inf", "-inf", "+inf")  # a row of values with a gap is still one
    if not row[0].strip() or not any(_finite(c) for c in cells) or \
            not all(_finite(c) or c.lower() in missing for c in cells):
        return True
    if not all(_finite(c) for c in cells):
        return False
    values = [float(c) for c in cells]
    return values in (list(map(float, range(len(cells)))), list(map(float, range(1, len(cells) + 1))))


def read_feature_tsv(path) -> FeatureBlock:
    """A user feature table: tab-separated, a header row (first cell: any name for the label
    column, then one name per feature; a file without one, whose first row is a label and its
    values, names its columns ``feature1``, ``feature2``, ...), then one row per perturbation
    label with numeric values. Empty lines are skipped, and so is a row repeated as is; a missing,
    non-numeric or non-finite value, a short or long row and a label given twice with other values
    are errors naming the file, line and label."""
    path = _check_file(path, "perturbation-features")
    rows = [(n, r) for n, r in enumerate(_text_rows(path, "\t", "tab-separated"), start=1)
            if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: empty; expected a header row (label, feature names) and one row per perturbation")
    if _is_header(rows[0][1]):
        (_, header), body = rows[0], rows[1:]
        columns = [c.strip() for c in header[1:]]
    else:  # no header: the first row is a label and its values
        body = rows
        columns = [f"feature{j + 1}" for j in range(len(rows[0][1]) - 1)]
    if not columns:
        found = separator_of(rows[0][1][0])
        raise ValueError(f"{path}: line 1 (the header) names no feature column; expected tab-separated "
                         f"'label<TAB>feature1<TAB>feature2...'"
                         + (f" (it looks {found}-separated)" if found else " (is the file comma-separated?)"))
    if not body:
        raise ValueError(f"{path}: a header but no perturbation rows")
    labels, values, seen = [], np.empty((len(body), len(columns)), dtype=np.float32), {}
    for line, row in body:
        if body is not rows and [c.strip() for c in row] == [c.strip() for c in rows[0][1]]:
            continue  # the header again (tables pasted one under another)
        label = row[0].strip()
        if not label:
            raise ValueError(f"{path}: line {line} has no label in its first column")
        if label in seen:
            first_line, first_row = seen[label]
            if [c.strip() for c in row[1:]] == [c.strip() for c in first_row[1:]]:
                continue  # listed twice alike (tables joined): once is enough
            raise ValueError(f"{path}: line {line}: label {label!r} already given on line {first_line} with other "
                             f"values")
        seen[label] = (line, row)
        i = len(labels)
        cells = row[1:]
        if len(cells) != len(columns):
            raise ValueError(f"{path}: line {line} ({label!r}) has {len(cells)} values for {len(columns)} feature "
                             f"columns")
        for j, cell in enumerate(cells):
            try:
                v = float(cell)
            except ValueError:
                raise ValueError(f"{path}: line {line} ({label!r}), column {columns[j]!r}: {cell!r} is not a "
                                 f"number") from None
            if not np.isfinite(v):
                raise ValueError(f"{path}: line {line} ({label!r}), column {columns[j]!r}: {cell!r} is not finite")
            values[i, j] = v
        labels.append(label)
    return FeatureBlock("user", path, labels, values[: len(labels)], columns)


def read_smiles_csv(path) -> list[tuple[int, str, str]]:
    """``(line, name, smiles)`` rows of a drug list: comma-separated ``name,smiles`` (further
    columns ignored; a first row whose second cell names SMILES, ``smiles`` or
    ``canonical_smiles``, is a header). A row without a
    name or a SMILES, and a name given twice with different SMILES, are errors naming the file
    and line (a row repeated as is counts once)."""
    path = _check_file(path, "SMILES")
    out, seen = [], {}
    for line, row in enumerate(_text_rows(path, ",", "CSV"), start=1):
        if not any(c.strip() for c in row):
            continue
        if (not out and not seen or "\0header" in seen) and len(row) >= 2 and "smiles" in row[1].strip().lower():
            # a header, or the header again ('smiles', 'SMILES', 'canonical_smiles': no SMILES holds these letters)
            seen["\0header"] = line
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            found = separator_of(row[0]) if len(row) == 1 else None
            raise ValueError(f"{path}: line {line}: expected 'name,smiles', got {','.join(row)[:80]!r}"
                             + (f" (it looks {found}-separated; the drug list is comma-separated)"
                                if found and found != "comma" else ""))
        name, smiles = row[0].strip(), row[1].strip()
        if name in seen:
            first = next(s for n, s in ((n, s) for _, n, s in out) if n == name)
            if first == smiles:  # listed twice alike (sci-Plex's list has 'control' twice): once is enough
                continue
            raise ValueError(f"{path}: line {line}: drug {name!r} already given on line {seen[name]} with another "
                             f"SMILES")
        seen[name] = line
        out.append((line, name, smiles))
    if not out:
        raise ValueError(f"{path}: no 'name,smiles' rows")
    return out


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdFingerprintGenerator
    except ImportError:
        raise ImportError("drug features from SMILES need RDKit: pip install 'scidiff[chem]' (or pip install "
                          "rdkit)") from None
    return Chem, RDLogger, rdFingerprintGenerator


def morgan_fingerprints(path, radius: int = MORGAN_RADIUS, n_bits: int = MORGAN_BITS) -> FeatureBlock:
    """Morgan (ECFP-like) fingerprints of the drugs of a SMILES file (:func:`read_smiles_csv`):
    one row of ``n_bits`` 0/1 values per drug, RDKit's Morgan generator with ``radius``. A SMILES
    RDKit cannot parse is an error naming the file, line and drug."""
    Chem, RDLogger, generators = _rdkit()
    rows = read_smiles_csv(path)
    gen = generators.GetMorganGenerator(radius=int(radius), fpSize=int(n_bits))
    values = np.zeros((len(rows), int(n_bits)), dtype=np.float32)
    RDLogger.DisableLog("rdApp.*")
    try:
        for i, (line, name, smiles) in enumerate(rows):
            mol = Chem.MolFromSmiles(smiles)
            if mol is None:
                raise ValueError(f"{os.fspath(path)}: line {line} ({name!r}): RDKit cannot parse the SMILES "
                                 f"{smiles!r}")
            values[i] = gen.GetFingerprintAsNumPy(mol)
    finally:
        RDLogger.EnableLog("rdApp.*")
    return FeatureBlock("morgan", os.fspath(path), [name for _, name, _ in rows], values)


# -- all of it, for a training set ----------------------------------------------------------------

def _covers(block: FeatureBlock, labels) -> list[str]:
    return [lab for lab in labels if block.index_of(lab) is not None]


def build_feature_tables(adata, spec, singles: dict[str, list[str]], control_mask, *, perturbation_features=None,
                         smiles=None, n_components: int = GENE_PCS, seed: int = 0) -> dict[str, FeatureTable]:
    """The feature table of each perturbation covariate of a training set.

    ``adata``: the input AnnData (its genes beyond the model's are used for target genes);
    ``spec``: the model's :class:`~scidiff.data.DataSpec`; ``singles``: per perturbation key, the
    single perturbations seen in training; ``control_mask``: the cells with no perturbation.
    Data-derived gene features are built for every covariate whose labels are gene names; a user
    table (``perturbation_features``, a TSV) and drug fingerprints (``smiles``, a CSV) go to the
    covariates whose seen labels they describe (a file that describes none of them is an error:
    the prior learns from seen perturbations' features)."""
    user = []
    if perturbation_features:
        user.append(("--perturbation-features", read_feature_tsv(perturbation_features)))
    if smiles:
        user.append(("--smiles", morgan_fingerprints(smiles)))
    use_raw = bool(spec.source.get("use_raw"))
    input_genes = [str(g) for g in expression_matrix(adata, spec.source.get("layer"), use_raw)[1]]
    var = var_of(adata, use_raw)
    column = spec.gene_symbol_column if spec.gene_symbol_column in var.columns else None
    symbols = symbol_index(input_genes, symbols_of(var, column, input_genes)) if column else {}
    tables: dict[str, FeatureTable] = {}
    gene_keys = [k for k, labs in singles.items() if labels_are_genes(labs, input_genes, symbols=symbols)]
    assigned = {id(b): [] for _, b in user}
    for key, labels in singles.items():
        blocks = []
        for _, block in user:
            if _covers(block, labels):
                blocks.append(block)
                assigned[id(block)].append(key)
        tables[key] = FeatureTable(key, blocks, gene_targets=key in gene_keys)
    for flag, block in user:
        if not assigned[id(block)]:
            shown = {k: v[:5] for k, v in singles.items()}
            raise ValueError(f"{block.source} ({flag}) describes none of the perturbations seen in training "
                             f"(its first labels: {block.labels[:5]}; the data's: {shown}); the prior learns from the "
                             f"seen perturbations' features, so it needs rows for some of them")
    if gene_keys:
        model_genes = list(spec.gene_names)
        wanted = set()
        for key in gene_keys:
            labels = list(singles[key]) + [lab for b in tables[key].blocks for lab in b.labels]
            tables[key].target_genes = resolve_genes(labels, input_genes, symbols)
            wanted.update(tables[key].target_genes.values())
        in_model = set(model_genes)
        extra = sorted(wanted - in_model)
        rest = [g for g in input_genes if g not in in_model and g not in wanted]
        if (len(model_genes) + len(extra) + len(rest)) * len(model_genes) <= GENE_TABLE_BUDGET:
            extra = sorted((wanted | set(rest)) - set(model_genes))  # every measured gene is a possible target
        candidates = model_genes + extra
        x = control_expression(adata, spec, control_mask, candidates, seed=seed)
        gene_blocks = gene_target_blocks(x, candidates, model_genes, n_components)
        known = set(candidates)
        for key in gene_keys:
            tables[key].blocks = gene_blocks + tables[key].blocks
            tables[key].gene_symbols = {s: g for s, g in symbols.items() if g in known}
    return tables
