"""What drives a designed phenotype, per gene and per transcription factor.

- :func:`gene_attribution`: integrated gradients (Sundararajan et al. 2017) of the objective
  along the straight path from each source cell to its designed cell. With ``through_model`` the
  objective is read on the model's denoised view of each point on the path, so genes that move
  the cell along directions the model couples to the targets get credit, not only the target
  genes themselves. Attributions sum to the objective's change (completeness).
- :func:`tf_activity_change`: transcription-factor activity from a TF -> target network (TSV with
  ``source``, ``target``, ``weight``; decoupler/CollecTRI layout) scored per cell by decoupler's
  univariate linear model (ULM: the t-value of the slope of expression on the TF's edge weights
  across genes, Badia-i-Mompel et al. 2022) or its weighted mean (WMEAN), then compared between
  source and designed cells; TFs are ranked by the change.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ...checks import choice, warn, whole_number, yes_no
from ...data.gene_symbols import resolve_gene, symbol_index
from ...textfiles import encoding_error, excel_date_hint, is_blank, separator_of
from .targets import PhenotypeTarget

def integrated_gradients(fn, baseline: torch.Tensor, inputs: torch.Tensor, steps: int = 32) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al. 2017) of ``fn: [N, G] -> [N]`` from ``baseline``
    to ``inputs`` along the straight line, by the midpoint rule with ``steps`` points:
    ``(x - x') * mean_k grad fn(x' + a_k (x - x'))``. Rows sum to ``fn(x) - fn(x')`` up to the
    quadrature error."""
    baseline, inputs = baseline.detach().float(), inputs.detach().float()
    if baseline.shape != inputs.shape:
        raise ValueError(f"baseline {tuple(baseline.shape)} and inputs {tuple(inputs.shape)} differ in shape")
    total = torch.zeros_like(inputs)
    delta = inputs - baseline
    with torch.enable_grad():
        for k in range(steps):
            a = (k + 0.5) / steps
            point = (baseline + a * delta).requires_grad_(True)
            (g,) = torch.autograd.grad(fn(point).sum(), point)
            total += g
    return delta * total / steps


def _cells_array(cells, what: str) -> np.ndarray:
    """``cells`` (log1p expression, ``[cells, genes]``) as an array; a clear error for ``None``
    (a design from noise has no source cells) or something that is not an array of numbers."""
    if cells is None:
        raise ValueError(f"{what} is None: a design started from noise has no source cells (result.source). Design "
                         "from source= cells, or compare with unguided cells of the same noise: "
                         "designer.design(target, n, objective_scale=0, resample=False, eta=result.settings['eta'], "
                         "seed=...).expression[result.ancestors] (with the design's n, steps and seed)")
    if hasattr(cells, "obs") and hasattr(cells, "var_names"):
        raise TypeError(f"{what} must be a [cells, genes] array of log1p expression in the model's genes "
                        "(result.source, result.expression); got an AnnData")
    try:
        return np.asarray(cells, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be a [cells, genes] array of log1p expression; got {type(cells).__name__} "
                        f"({exc})") from None


def gene_attribution(designer, target: PhenotypeTarget, source_expression, designed_expression, *,
                     cond: dict | None = None, through_model: bool = True, t: int | None = None,
                     steps: int = 32) -> pd.DataFrame:
    """Rank genes by their integrated-gradients attribution of the objective's change from each
    source cell to its designed cell (rows paired). ``through_model``: the objective is read on
    the model's denoised view ``D(sqrt(ab_t) z, t)`` of each point (``t`` default ``T / 10``).

    Columns: ``gene``, ``attribution`` (mean over cells; negative = the gene's change lowered the
    objective, i.e. drove the cells toward the target), ``mean_change`` (designed - source),
    ``rank`` (1 = most negative attribution). ``uns``-like totals are in ``table.attrs``."""
    through_model = yes_no("through_model", through_model)  # 'no' read through the model: non-empty text is true
    model, spec = designer.model, designer.model.data_spec
    designer.check(target)
    src = torch.as_tensor(_cells_array(source_expression, "source_expression"), dtype=torch.float32)
    dst = torch.as_tensor(_cells_array(designed_expression, "designed_expression"), dtype=torch.float32)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != spec.n_genes:
        raise ValueError(f"source and designed cells must be paired [cells, {spec.n_genes}] arrays; got "
                         f"{tuple(src.shape)} and {tuple(dst.shape)}")
    loss = designer.loss_fn(target, include_constraints=False)
    device = next(model.parameters()).device
    # labels ({'cell_type': 'B'}) failed as "'str' object has no attribute 'to'"; codes and tensors as before
    cond = {k: v.to(device) for k, v in model.encode_conditioning(cond, len(src)).items()}
    steps = whole_number("steps", steps, 1, what="an integer >= 1")  # True was one step
    tt = int(t if t is not None else max(1, model.num_timesteps // 10))
    a = float(model.alphas_cumprod[tt]) ** 0.5

    def fn(expr):
        if not through_model:
            return loss(expr, cond)
        z = model.encode(spec.to_model_space(expr))
        z0 = model(a * z, torch.full((len(z),), tt, dtype=torch.long, device=z.device), cond)
        return loss(designer.to_expression(z0), cond)

    was_training = model.training
    model.eval()
    try:
        attr = integrated_gradients(fn, src.to(device), dst.to(device), steps).cpu().numpy()
        with torch.no_grad():
            change = (fn(dst.to(device)) - fn(src.to(device))).cpu().numpy()
    finally:
        model.train(was_training)
    table = pd.DataFrame({"gene": spec.gene_names, "attribution": attr.mean(0),
                          "mean_change": (dst - src).mean(0).numpy()})
    if spec.gene_symbols:
        table.insert(1, "symbol", spec.gene_symbols)
    table = table.sort_values("attribution", kind="mergesort").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table.attrs["objective_change"] = float(change.mean())
    table.attrs["attribution_sum"] = float(attr.sum(1).mean())
    return table


# -- transcription-factor activity -------------------------------------------------------------


NETWORK_COLUMNS = ("source", "target", "weight")


def _network_columns(net: pd.DataFrame) -> pd.DataFrame:
    """``net`` with its columns named as the network needs: ``Source``/``TARGET``/... in any case,
    decoupler's older ``mor`` for ``weight``, DoRothEA's ``tf`` for ``source``."""
    lower = {str(c).strip().lower(): c for c in net.columns}
    rename = {lower[c]: c for c in NETWORK_COLUMNS if c in lower and c not in net.columns}
    for column, alias in (("weight", "mor"), ("source", "tf")):  # decoupler's older mor, DoRothEA's tf
        if column not in net.columns and column not in lower and alias in lower:
            rename[lower[alias]] = column
    return net.rename(columns=rename) if rename else net


def _edges(net: pd.DataFrame, where: str) -> pd.DataFrame:
    """The source, target and weight of ``net``: TF and target names as text without surrounding
    blanks, weights as finite numbers (:func:`_finite_weights`). An error naming ``where`` and the
    first edges (rows counted after the header, if any) that lack a TF or a target name."""
    net = net.reset_index(drop=True)
    names = {c: net[c].astype(object).where(net[c].notna(), "").astype(str).str.strip() for c in ("source", "target")}
    bad = ((names["source"] == "") | (names["target"] == "")).to_numpy()
    if bad.any():
        rows = "; ".join(f"row {i + 1}: {names['source'][i] or '(missing)'} -> {names['target'][i] or '(missing)'}"
                         for i in np.flatnonzero(bad)[:3])
        raise ValueError(f"{where} has {int(bad.sum())} edge(s) without a TF (source) or target name: {rows}")
    net = net.assign(**names)
    return net.assign(weight=_finite_weights(net, where))[list(NETWORK_COLUMNS)]


def _headerless(net: pd.DataFrame) -> bool:
    """Whether a table read with a header is a headerless ``source, target, weight`` file: no
    column is named source or target and the third column's name (the first row's weight) is a
    number."""
    names = {str(c).strip().lower() for c in net.columns}
    if len(net.columns) < 3 or names & {"source", "target"}:
        return False
    try:
        float(str(net.columns[2]))
    except ValueError:
        return False
    return True


def _finite_weights(net: pd.DataFrame, where: str) -> pd.Series:
    """The weights of ``net`` as numbers; an error naming ``where`` and the first bad edges (as
    written, rows counted after the header, if any) where one is not a finite number."""
    weight = pd.to_numeric(net["weight"], errors="coerce").astype(np.float64)
    bad = ~np.isfinite(weight.to_numpy())
    if bad.any():
        what = "non-numeric, missing or infinite" if np.isinf(weight.to_numpy()).any() else "non-numeric or missing"
        edges = net.loc[bad, ["source", "target", "weight"]].head(3)

        def shown(i, w):  # as written; an infinite one as the number (a file's 'inf' is read as text)
            return float(weight.iloc[i]) if np.isinf(weight.iloc[i]) else w if pd.notna(w) else "(missing)"

        rows = "; ".join(f"row {i + 1}: {s} -> {t}, weight {shown(i, w)!r}"
                         for i, (s, t, w) in zip(np.flatnonzero(bad), edges.itertuples(index=False)))
        raise ValueError(f"{where} has {int(bad.sum())} {what} weight(s): {rows}")
    return weight


def read_tf_network(path) -> pd.DataFrame:
    """A TF -> target network from a TSV with columns ``source``, ``target`` and ``weight`` (in
    any case, or decoupler's older ``mor``, DoRothEA's ``tf``); extra columns are ignored. A file
    without a header is read as ``source, target, weight`` when its first row's third field is a
    number. Names are kept as written (:func:`_edges`). Errors name the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such TF network file: {path!r}")
    wrong = None if os.path.isdir(path) else encoding_error(path, "TF network")  # Excel's "Unicode Text"
    if wrong is not None:
        raise wrong
    if os.path.isfile(path) and is_blank(path):
        raise ValueError(f"TF network {path!r} is empty; it needs tab-separated source, target and weight columns")
    try:
        # names as written: a gene '7' was read as '7.0' beside a '2.5', an empty TF field as the TF 'nan'
        text = dict(sep="\t", dtype=str, keep_default_na=False, na_values=[""])
        net = pd.read_csv(path, **text)
        if _headerless(net):
            net = pd.read_csv(path, header=None, **text)
            net = net.rename(columns=dict(zip(net.columns[:3], NETWORK_COLUMNS)))
        else:  # the header again (tables pasted one under another): not an edge
            cells = net.apply(lambda col: col.fillna("").astype(str).str.strip())
            net = net[~cells.eq([str(c).strip() for c in net.columns]).all(axis=1)]
    except Exception as exc:
        raise ValueError(f"could not read {path!r} as a tab-separated table: {exc}") from exc
    net = _network_columns(net)
    missing = [c for c in NETWORK_COLUMNS if c not in net.columns]
    if missing:
        found = separator_of(str(net.columns[0])) if len(net.columns) == 1 else None
        hint = f" (it looks {found}-separated; the network is a tab-separated file)" if found else ""
        raise ValueError(f"TF network {path!r} lacks column(s) {missing}; it needs source, target and weight "
                         f"(decoupler/CollecTRI layout; or no header and those three columns first); found "
                         f"{list(net.columns)}{hint}")
    net = _edges(net, f"TF network {path!r}")
    net.attrs["path"] = path
    return net


def _case_hint(network: pd.DataFrame, index: dict, gene_symbols=None, matched: int = 0) -> str:
    """A sentence for when more of the network's edges (than ``matched``, those named exactly)
    reach the model's genes only in another case (``STAT1`` for a mouse ``Stat1``: a human network
    on mouse genes, or the reverse); ``""`` otherwise."""
    folded: dict[str, set] = {}
    for name in list(index) + [str(s) for s in (gene_symbols if gene_symbols is not None else ()) if s]:
        folded.setdefault(name.casefold(), set()).add(name)
    targets = network["target"].astype(str)
    outside = targets[~targets.isin(index)]
    close = [(t, next(iter(folded[t.casefold()]))) for t in outside if len(folded.get(t.casefold(), ())) == 1]
    if len(close) <= matched:
        return ""
    t, g = close[0]
    return (f"; {len(close)} of its edges name a model gene in another case (e.g. target {t!r} for the model's "
            f"{g!r}): the network is likely of another species (human upper-case symbols on mouse genes, or the "
            "reverse); use a network of the data's species")


def tf_weight_matrix(network: pd.DataFrame, gene_names, min_targets: int = 5, gene_symbols=None):
    """``(W [G, F], tfs, n_targets)``: edge weights of each TF over the model's genes, for TFs
    with at least ``min_targets`` targets among them. ``gene_symbols``: each gene's symbol (``""``
    where none; a model's ``data_spec.gene_symbols``), so that a network naming targets by symbol
    matches genes named by Ensembl ID. Duplicate edges are an error; a network that shares no (or
    too few) targets with the genes is an error that says so."""
    where = f"TF network {network.attrs['path']!r}" if network.attrs.get("path") else "the TF network"
    network = _network_columns(network)
    for col in NETWORK_COLUMNS:
        if col not in network.columns:
            raise ValueError(f"{where} lacks column {col!r} (needs source, target, weight); found "
                             f"{list(network.columns)}")
    network = _edges(network, where)  # a NaN weight scored its TF as unchanged; a numeric TF name failed
    gene_names = [str(g) for g in gene_names]
    if gene_symbols is not None and len(gene_symbols):
        if len(gene_symbols) != len(gene_names):
            raise ValueError(f"gene_symbols has {len(gene_symbols)} symbols for {len(gene_names)} genes")
        known, symbols = set(gene_names), symbol_index(gene_names, gene_symbols)
        targets = network["target"].astype(str)
        network = network.assign(target=[resolve_gene(t, known, symbols) or t for t in targets])
    dup = network.duplicated(["source", "target"])
    if dup.any():
        raise ValueError(f"{where} has {int(dup.sum())} duplicate source-target edges, e.g. "
                         f"{network[dup].head(3)[['source', 'target']].to_dict('records')}")
    index = {str(g): i for i, g in enumerate(gene_names)}
    inside = network[network["target"].astype(str).isin(index)]
    dates = excel_date_hint(network.loc[~network["target"].astype(str).isin(index), "target"].astype(str).unique())
    if dates:  # Excel's 2-Sep for SEPT2: the TF lost that target without a word
        warn(f"{where}: target(s) that match none of the model's genes{dates}")
    if inside.empty:
        examples = list(network["target"].astype(str).unique()[:5])
        raise ValueError(f"{where} shares no target genes with the model's {len(index)} genes (network targets "
                         f"such as {examples}; model genes such as {list(index)[:5]}); check gene naming (symbols "
                         "vs Ensembl IDs, species" + ("; gene_symbols= matches symbols to IDs)" if gene_symbols is None
                                                      else ")") + _case_hint(network, index, gene_symbols))
    counts = inside.groupby("source")["target"].size()
    tfs = sorted(counts[counts >= min_targets].index.astype(str))
    if not tfs:
        raise ValueError(f"no TF in {where} has >= {min_targets} targets among the model's genes (most: "
                         f"{int(counts.max())}, {counts.idxmax()}); lower min_targets or use more genes"
                         + _case_hint(network, index, gene_symbols))
    hint = _case_hint(network, index, gene_symbols, len(inside))
    if hint:  # a human network on mouse genes: the few genes named alike in both (numbers, IDs) scored alone
        warn(f"{where}: only {len(inside)} of its edges reach the model's genes" + hint)
    col = {tf: j for j, tf in enumerate(tfs)}
    w = np.zeros((len(index), len(tfs)), dtype=np.float64)
    for s, tg, wt in inside[inside["source"].isin(col)][["source", "target", "weight"]].itertuples(index=False):
        w[index[str(tg)], col[str(s)]] = float(wt)
    return w, tfs, counts[tfs].to_numpy().astype(int)


def ulm(expression: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """decoupler's univariate linear model: per cell and TF, regress the cell's expression over
    genes on the TF's weight column (zero for non-targets) with an intercept; the activity is the
    slope's t-value, from the correlation ``r`` over ``G - 2`` degrees of freedom as decoupler
    computes it, ``r sqrt(df / ((1 - r + 1e-16) (1 + r + 1e-16)))`` (a cell that is exactly the
    TF's program scores its largest value, not 0); 0 where the cell or the weights are constant.
    ``expression [N, G]``, ``weights [G, F]`` -> ``[N, F]``."""
    y = np.asarray(expression, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    g = y.shape[1]
    if w.shape[0] != g:
        raise ValueError(f"weights have {w.shape[0]} rows for {g} genes")
    wc = w - w.mean(0)
    yc = y - y.mean(1, keepdims=True)
    scale = np.sqrt((yc ** 2).sum(1, keepdims=True) * (wc ** 2).sum(0))  # [N, F]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.clip(np.where(scale > 0, (yc @ wc) / scale, 0.0), -1.0, 1.0)
    df = max(g - 2, 1)
    return r * np.sqrt(df / ((1.0 - r + 1e-16) * (1.0 + r + 1e-16)))


def wmean(expression: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """decoupler's weighted mean: ``x @ W / sum_g |W_g|`` per cell and TF."""
    w = np.asarray(weights, dtype=np.float64)
    return np.asarray(expression, dtype=np.float64) @ w / np.abs(w).sum(0)


TF_METHODS = {"ulm": ulm, "wmean": wmean}


def tf_activity_change(source_expression, designed_expression, network, gene_names, *, method: str = "ulm",
                       min_targets: int = 5, paired: bool | None = None, gene_symbols=None) -> pd.DataFrame:
    """Score TF activities in source and designed cells and rank TFs by the change.

    ``network``: a DataFrame (source, target, weight) or a TSV path (:func:`read_tf_network`).
    ``gene_symbols``: the genes' symbols beside IDs (``model.data_spec.gene_symbols``), for a
    network naming genes by symbol (:func:`tf_weight_matrix`).
    ``paired``: rows of the two sets are the same cells before and after (default: when the
    counts match); the test is then a paired t-test, otherwise Welch's. Columns: ``tf``,
    ``n_targets``, ``source_activity``, ``designed_activity`` (means), ``change``,
    ``t``, ``p_value``, ``rank`` (1 = largest absolute change)."""
    choice("TF scoring method", method, sorted(TF_METHODS))
    paired = yes_no("paired", paired, "when the counts match")  # 'no' paired them: non-empty text is true
    if not isinstance(network, pd.DataFrame):
        network = read_tf_network(network)
    src = _cells_array(source_expression, "source_expression")
    dst = _cells_array(designed_expression, "designed_expression")
    if src.ndim != 2 or dst.ndim != 2 or src.shape[1] != len(gene_names) or dst.shape[1] != len(gene_names):
        raise ValueError(f"source and designed cells must be [cells, {len(gene_names)} genes]")
    w, tfs, n_targets = tf_weight_matrix(network, gene_names, min_targets, gene_symbols)
    a_src, a_dst = TF_METHODS[method](src, w), TF_METHODS[method](dst, w)
    paired = (len(src) == len(dst)) if paired is None else paired
    with np.errstate(divide="ignore", invalid="ignore"):
        if paired:
            if len(src) != len(dst):
                raise ValueError("paired=True needs as many source as designed cells")
            test = stats.ttest_rel(a_dst, a_src, axis=0)
        else:
            test = stats.ttest_ind(a_dst, a_src, axis=0, equal_var=False)
    table = pd.DataFrame({"tf": tfs, "n_targets": n_targets, "source_activity": a_src.mean(0),
                          "designed_activity": a_dst.mean(0), "change": a_dst.mean(0) - a_src.mean(0),
                          "t": np.nan_to_num(test.statistic), "p_value": np.nan_to_num(test.pvalue, nan=1.0)})
    table = table.reindex(table["change"].abs().sort_values(ascending=False, kind="mergesort").index)
    table = table.reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table.attrs["method"] = method
    return table
