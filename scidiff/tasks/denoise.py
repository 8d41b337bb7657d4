"""Denoising scRNA-seq with the model as a prior.

``method="sdedit"`` (Meng et al. 2022, SDEdit): bring each cell to noise level ``strength``
(a fraction of the schedule) by the forward process, then run the reverse process back to clean
data under the cell's own covariates. ``method="posterior"`` adds guidance by the Poisson
log-likelihood of the cell's observed counts given the predicted clean expression and its
library size (diffusion posterior sampling, Chung et al. 2023), so the reverse process stays
consistent with what was measured. Several posterior samples can be averaged; with DDIM
(``eta=0``) and a fixed seed the result is deterministic, each cell's noise keyed by its row in
the input (:mod:`scidiff.models.cell_draws`), so the batch size does not change it. The default
strength is the one chosen by molecular cross-validation in ``bench/bench_denoise.py``.
"""
from __future__ import annotations

import copy
import math
import numbers

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from ..checks import choice, said_once, warn, whole_number, yes_no
from ..data.gene_symbols import var_of
from ..data.dataset import USE_RAW, source_like
from ..data.preprocess import _name, dense, detect_input, expression_matrix, gene_columns
from ..data.spec import scanpy_log1p
from ..diffusion.plans import timesteps
from ..diffusion.samplers import ddim
from ..models.cell_draws import cell_normals, check_seed
from .cells import keep_var_columns, model_cells, model_spec, read_cells

DEFAULT_STRENGTH = 0.3
NOISE_STREAM = 9  # the forward process's noise (scidiff.models.cell_draws)


def binomial_split(counts, p: float = 0.5, seed: int = 0):
    """Molecular cross-validation split (Batson et al. 2019): each molecule goes to half A with
    probability ``p``; returns ``(A, B)`` with ``A ~ Binomial(counts, p)`` and ``B = counts - A``,
    two independent Poisson-thinned views of the same cells (sparse stays sparse)."""
    rng = np.random.default_rng(seed)
    if sp.issparse(counts):
        c = sp.csr_matrix(counts)
        if c.data.size and not _counts(c.data):
            raise ValueError("binomial thinning needs non-negative integer counts")
        a = c.copy()
        a.data = rng.binomial(c.data.astype(np.int64), p).astype(c.dtype)
        b = c - a
        a.eliminate_zeros()
        b.eliminate_zeros()
        return a, b
    c = np.asarray(counts)
    if not _counts(c):
        raise ValueError("binomial thinning needs non-negative integer counts")
    a = rng.binomial(c.astype(np.int64), p).astype(c.dtype)
    return a, c - a


def _counts(values: np.ndarray) -> bool:
    """Whether ``values`` are all finite non-negative integers (inf passes ``x == round(x)``)."""
    return bool(np.all(np.isfinite(values)) and np.all(values >= 0) and np.all(values == np.round(values)))


def _real(name: str, value, test, rule: str) -> float:
    """``value`` as a float passing ``test`` (a real number, not a bool), else a ValueError: ``name`` must ``rule``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not test(float(value)):
        raise ValueError(f"{name} must {rule}, got {value!r}")
    return float(value)


class _PoissonGuided:
    """Denoiser wrapper moving the prediction along ``grad_{x_t} log p(counts | x0_hat(x_t))``
    (diffusion posterior sampling, Chung et al. 2023) with Poisson rates ``library * share``,
    ``share = expm1(x0_hat) / sum(expm1(x0_hat))``. The gradient is normalised per cell (its RMS
    over dimensions) and the step is ``weight * (1 - alpha_bar)``: strong while the sample is
    still noisy, vanishing as it becomes clean, and independent of library size."""

    def __init__(self, model, counts: torch.Tensor, library: torch.Tensor, weight: float):
        self.model, self.counts, self.library, self.weight = model, counts, library, weight

    def __call__(self, x_t, t, cond):
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            x0 = self.model(x, t, cond)
            expr = self.model.data_spec.to_expression(self.model.decode(x0), clip=False)
            share = torch.expm1(expr.clamp(0, 20))
            rates = self.library[:, None] * share / share.sum(-1, keepdim=True).clamp_min(1e-8) + 1e-8
            loglik = (self.counts * torch.log(rates) - rates).sum(-1)
            (grad,) = torch.autograd.grad(loglik.sum(), x)
        rms = grad.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        ab = float(self.model.alphas_cumprod[int(t[0])])
        return (x0 + self.weight * (1 - ab) * grad / rms).detach()


def _keep_input(result: ad.AnnData, adata: ad.AnnData, spec, use_raw: bool) -> None:
    """What the output keeps of the input beside its ``obs``: its ``var`` columns
    (:func:`~scidiff.tasks.cells.keep_var_columns`), ``obsm`` (embeddings) and ``obsp`` (the
    neighbour graph ``uns['neighbors']`` describes), cells in the same order, and ``uns``."""
    keep_var_columns(result, adata, spec, use_raw=use_raw)
    for key in adata.obsm.keys():
        result.obsm[key] = adata.obsm[key].copy()
    for key in adata.obsp.keys():
        result.obsp[key] = adata.obsp[key].copy()
    result.uns.update(copy.deepcopy({k: v for k, v in adata.uns.items() if k != "scidiff_source"}))


@torch.no_grad()
def denoise(model, adata, *, strength: float = DEFAULT_STRENGTH, method: str = "sdedit", n_samples: int = 1,
            likelihood_weight: float = 1.0, steps: int = 50, seed: int = 0, layer: str | None = None,
            use_raw: bool | None = None, key_added: str = "scidiff_denoised", batch_size: int = 2048,
            progress: bool = True) -> ad.AnnData:
    """Denoise the cells of ``adata`` with ``model`` as the prior.

    ``strength`` in (0, 1]: how far along the noise schedule each cell is taken before the
    reverse process (0 keeps it, 1 forgets it). ``method``: ``"sdedit"`` or ``"posterior"``
    (Poisson likelihood guidance, weight ``likelihood_weight``; needs raw counts). ``n_samples``
    posterior samples are averaged (DDIM, deterministic for a fixed ``seed``; each cell's noise is
    keyed by its row in the input, so the batch size does not change it).

    Returns a copy of ``adata`` restricted to the model's genes, cells in their order, with the
    denoised log1p-normalised expression in ``layers[key_added]`` and the input's log1p values in
    ``X``. Cells with zero counts are kept (their denoised values come from the prior alone).
    """
    strength = _real("strength", strength, lambda v: 0.0 < v <= 1.0, "be in (0, 1]")
    likelihood_weight = _real("likelihood_weight", likelihood_weight, lambda v: 0.0 <= v < math.inf,
                              "be finite and >= 0")
    n_samples, steps, batch_size = (whole_number(name, v, 1, what="an integer >= 1") for name, v in
                                    (("n_samples", n_samples), ("steps", steps), ("batch_size", batch_size)))
    seed = check_seed(seed)
    choice("method", method, ("sdedit", "posterior"))
    progress, use_raw = yes_no("progress", progress), yes_no("use_raw", use_raw, USE_RAW)  # 'no' read as true
    if not isinstance(key_added, str) or not key_added or "/" in key_added:  # such a layer's .h5ad cannot be read
        raise ValueError(f"key_added must be a layer name (non-empty text without '/'), got {key_added!r}")
    spec, adata = model_spec(model), read_cells(adata)
    # the matrix the cells are read from, the model's own by default (its training layer or .raw)
    layer, use_raw = source_like(spec, adata, layer, use_raw)
    said = set()  # the features left out (ADTs, guides): said reading the cells, not again reading their counts
    with said_once(said):
        spec, adata, cells = model_cells(model, adata, layer=layer, use_raw=use_raw)
    missing = [k for k in (*spec.categorical, *spec.continuous) if k not in adata.obs]
    if missing:
        warn(f"obs of {_name(adata)} has no column {missing} of the model's covariates: its cells are "
             "denoised under the model's null condition for them (add the column to condition on it)")
    counts = library = None
    if method == "posterior":
        with said_once(said):
            matrix, var_names, where = expression_matrix(adata, layer, use_raw)
        if detect_input(matrix, f"{where} of {_name(adata)}") != "counts":
            raise ValueError(f"{where} of {_name(adata)} holds log-normalised values; the posterior method needs raw "
                             f"counts: pass the counts' layer (--layer NAME / layer=...; layers in the file: "
                             f"{list(adata.layers) or 'none'}) or .raw (--use-raw / use_raw=True), or use "
                             "--method sdedit / method='sdedit'")
        library = torch.from_numpy(np.asarray(matrix.sum(1, dtype=np.float64)).ravel().astype(np.float32))
        var = var_of(adata, use_raw)
        counts = torch.from_numpy(dense(matrix[:, gene_columns(var_names, spec.names_in(var_names, var))]))
    model.eval()
    device = next(model.parameters()).device
    ts = timesteps(model.num_timesteps, steps)
    t_start = int(round(strength * (model.num_timesteps - 1)))
    grid = [t for t in ts if t <= t_start]
    if not grid or grid[0] != t_start:
        grid = [t_start] + grid
    ab_start = float(model.alphas_cumprod[t_start])
    # DDIM over the sub-grid from t_start: a schedule truncated at t_start walks exactly these steps
    sub_ab = model.alphas_cumprod.double()[: t_start + 1]
    n = len(cells)
    out = np.zeros((n, spec.n_genes), dtype=np.float32)
    for start in tqdm(range(0, n, batch_size), desc=f"denoising ({method})", disable=not progress):
        sl = slice(start, min(start + batch_size, n))
        cond = {k: v[sl].to(device) for k, v in cells.covariates.items() if k in model.condition_encoder.keys}
        z0 = model.encode(cells.x[sl].to(device))
        den = model
        if method == "posterior":
            den = _PoissonGuided(model, counts[sl].to(device), library[sl].to(device), likelihood_weight)
        acc = torch.zeros(sl.stop - sl.start, spec.n_genes, device=device)
        # each cell's noise keyed by its row and sample: the result does not depend on the batching
        noise = cell_normals(seed, torch.arange(sl.start, sl.stop), n_samples * z0.shape[1], NOISE_STREAM)
        for draw in noise.to(device).reshape(len(z0), n_samples, -1).unbind(1):
            z_t = math.sqrt(ab_start) * z0 + math.sqrt(1 - ab_start) * draw
            z = ddim(den, z_t, sub_ab, len(grid), cond=cond)
            acc += spec.to_expression(model.decode(z))
        out[sl] = (acc / n_samples).cpu().numpy()
    result = cells.to_anndata()
    result.obs_names = adata.obs_names
    _keep_input(result, adata, spec, use_raw)
    result.layers[key_added] = out
    result.uns["log1p"] = scanpy_log1p()  # X (read from counts, a layer or raw) is log1p, as scanpy records it
    result.uns["scidiff_denoise"] = {"method": method, "strength": strength, "n_samples": n_samples,
                                     "likelihood_weight": likelihood_weight, "steps": steps, "seed": seed,
                                     "input": "raw/X" if use_raw else f"layers/{layer}" if layer else "X",
                                     "key_added": key_added}
    return result
