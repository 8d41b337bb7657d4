"""Gene symbols beside gene IDs.

CELLxGENE files (``var['feature_name']``), Cell Ranger's read with ``var_names='gene_ids'``
(``gene_symbols``), and the Perturb-seq screens of GEARS and Replogle et al. 2022
(``gene_name``) index their genes by Ensembl ID and keep the symbol in a column of ``var``,
while perturbation labels (``STAT1``), design targets and regulatory networks name genes by
symbol. :func:`symbol_column` finds that column (scanpy's ``gene_symbols=`` argument, by name,
or among the usual names), and a name resolves to a gene by its ID first, else by a symbol that
exactly one gene carries (:func:`symbol_index`, :func:`resolve_gene`). Two files whose genes are
named unalike (by ID and by symbol, or by ID with and without GENCODE's version suffix) are
matched gene for gene by :func:`names_in`.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .validate import rna_var

_VERSIONED = re.compile(r"(ENS[A-Z]*G\d{11})\.\d+")
KNOWN_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "gene_names", "symbol",
                 "gene_short_name")
ID_COLUMNS = ("gene_ids", "gene_id", "feature_id", "ensembl_id")  # IDs beside symbols (scanpy's read_10x_h5)


def symbol_column(var: pd.DataFrame, requested: str | None = "auto", where: str = "var") -> str | None:
    """The ``var`` column holding gene symbols. ``requested``: a column name (an error naming
    ``where`` and its columns when absent), ``"auto"`` (the first of :data:`KNOWN_COLUMNS` that
    holds text differing from the index for at least half the genes: symbols beside IDs, not the
    same symbols before ``var_names_make_unique``; ``None`` when none does) or ``None`` /
    ``"none"`` (no symbols)."""
    if requested is None or str(requested).lower() == "none":
        return None
    if requested != "auto":
        if requested not in var.columns:
            raise KeyError(f"gene symbols column {requested!r} is not in {where} (its columns: "
                           f"{list(map(str, var.columns))}); name one of them, or 'none'")
        return str(requested)
    index = var.index.astype(str)
    for column in KNOWN_COLUMNS:
        if column not in var.columns or pd.api.types.is_numeric_dtype(var[column]) \
                or pd.api.types.is_bool_dtype(var[column]):
            continue
        if np.mean(var[column].astype(str).to_numpy() != index.to_numpy()) >= 0.5:
            return column
    return None


def symbols_of(var: pd.DataFrame, column: str | None, genes=None) -> list[str]:
    """The symbol of each of ``genes`` (default: every gene of ``var``); ``""`` where missing."""
    genes = list(map(str, var.index if genes is None else genes))
    if column is None:
        return [""] * len(genes)
    values = var[column].astype(object).where(var[column].notna(), "").astype(str)
    values.index = var.index.astype(str)
    return [values.get(g, "") for g in genes]


def symbol_index(genes, symbols) -> dict[str, str]:
    """``symbol -> gene`` for each symbol that exactly one of ``genes`` carries (a symbol shared by
    several IDs, as Ensembl has a few, names none of them; empty symbols are skipped)."""
    seen: dict[str, list[str]] = {}
    for g, s in zip(map(str, genes), map(str, symbols)):
        if s and s.lower() != "nan":
            seen.setdefault(s, []).append(g)
    return {s: gs[0] for s, gs in seen.items() if len(gs) == 1}


def resolve_gene(name, genes, symbols: dict[str, str] | None = None) -> str | None:
    """The gene ``name`` names among ``genes`` (a set or list of IDs): itself, else the one gene
    carrying it as symbol (``symbols``: :func:`symbol_index`), else ``None``."""
    name = str(name).strip()
    if name in genes:
        return name
    return (symbols or {}).get(name)


def readable_names(var: pd.DataFrame, genes) -> list[str]:
    """``genes`` (IDs of ``var``) by symbol where ``var`` has a symbols column (auto) and the symbol
    is carried by one of them only, else by ID: unique names, as cell-eval matches a knockout's
    label against them to leave its own gene out."""
    genes = [str(g) for g in genes]
    column = symbol_column(var)
    if column is None:
        return genes
    index, ids = symbol_index(genes, symbols_of(var, column, genes)), set(genes)
    by_gene = {g: s for s, g in index.items() if s not in ids}
    return [by_gene.get(g, g) for g in genes]


def names_in(var_names, gene_names, gene_symbols=(), var: pd.DataFrame | None = None) -> list[str]:
    """The name in ``var_names`` (another file's genes) of each of a model's ``gene_names``: the
    model's own names, else the model's ``gene_symbols`` (a model trained on a file indexed by ID,
    cells read by scanpy's ``read_10x_h5``, indexed by symbol), else the model's names looked up
    in the file's own symbols column of ``var`` (a model indexed by symbol, cells indexed by ID),
    else in an ID column of ``var`` (:data:`ID_COLUMNS`: a model indexed by ID without symbols,
    cells indexed by symbol as ``read_10x_h5`` reads them), else the IDs without their version
    (``ENSG00000115415.19`` as GENCODE writes it, for ``ENSG00000115415``; in an ID column too):
    whichever finds the most genes, the model's own names on a tie (a caller's error then names
    the genes still missing, as that file would name them)."""
    gene_names = [str(g) for g in gene_names]
    names = [str(v) for v in var_names]
    have = set(names)
    candidates = [gene_names]
    symbols = [str(s) for s in gene_symbols]
    if len(symbols) == len(gene_names):
        candidates.append([s if s else g for s, g in zip(symbols, gene_names)])
    column = symbol_column(var) if var is not None else None
    if column is not None:
        index = symbol_index(names, symbols_of(var, column, names))
        candidates.append([g if g in have else index.get(g, g) for g in gene_names])
    for column in [c for c in ID_COLUMNS if var is not None and c in var.columns
                   and not pd.api.types.is_numeric_dtype(var[c])]:
        index = symbol_index(names, [_unversioned(i) for i in symbols_of(var, column, names)])
        candidates.append([g if g in have else index.get(_unversioned(g), g) for g in gene_names])
    unversioned = symbol_index(names, [_unversioned(n) for n in names])
    candidates.append([g if g in have else unversioned.get(_unversioned(g), g) for g in gene_names])
    found = [sum(n in have for n in c) if len(set(c)) == len(c) else -1 for c in candidates]
    return candidates[int(np.argmax(found))]


def _unversioned(gene_id: str) -> str:
    """An Ensembl gene ID without its version (``ENSG00000115415.19`` -> ``ENSG00000115415``,
    any species' prefix); other names as they are."""
    match = _VERSIONED.fullmatch(gene_id)
    return match.group(1) if match else gene_id


def with_var_columns(raw_var: pd.DataFrame, var: pd.DataFrame | None) -> pd.DataFrame:
    """``raw.var`` with the columns of ``var`` it lacks, for the genes both hold (``.raw`` often
    keeps only the gene IDs while ``var`` has their symbols); ``""`` for genes only in ``.raw``."""
    if var is None:
        return raw_var
    extra = [c for c in var.columns if c not in raw_var.columns and not pd.api.types.is_numeric_dtype(var[c])]
    if not extra:
        return raw_var
    out = raw_var.copy()
    index = var.index.astype(str)
    for c in extra:
        values = pd.Series(var[c].astype(object).to_numpy(), index=index)
        out[c] = values.reindex(out.index.astype(str)).fillna("").to_numpy()
    return out


def var_of(adata, use_raw: bool = False, *, every_feature: bool = False) -> pd.DataFrame:
    """The ``var`` of the matrix read: ``adata.var``, or with ``use_raw`` ``adata.raw.var`` with
    ``var``'s text columns it lacks (:func:`with_var_columns`), on its RNA features alone as
    :func:`~scidiff.data.preprocess.expression_matrix` reads them (:func:`~scidiff.data.validate.rna_var`:
    a CITE-seq ADT or a guide named like a gene, ``CD4`` beside the gene ``CD4``, is no gene to
    look a name up in); ``every_feature``: all of them (to pick the RNA ones from)."""
    var = with_var_columns(adata.raw.var, adata.var) if use_raw else adata.var
    return var if every_feature else rna_var(var)


def genes_of_in(source, target, what: str) -> list[str]:
    """The name in ``target`` (an AnnData) of each gene of ``source`` (another): the same name,
    else through gene symbols either way (:func:`names_in`); ``what`` says, in the error naming
    the genes found neither way, which genes are missing from where (``"genes of --train are not
    in --data"``)."""
    genes = [str(g) for g in source.var_names]
    column = symbol_column(source.var)
    found = names_in(target.var_names, genes, symbols_of(source.var, column) if column else (), target.var)
    known = set(map(str, target.var_names))
    missing = [g for g in found if g not in known]
    if missing:
        raise KeyError(f"{len(missing)} {what}: {missing[:20]}")
    return found
