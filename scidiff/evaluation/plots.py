"""Report figures: real vs generated cells in a shared embedding, gene means and variances."""
from __future__ import annotations

import os

import numpy as np

from ..data.io import atomic_path
from .metrics import fit_pca


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    atomic_path(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))


def embedding_plot(real_emb, gen_emb, path, title="PCA", xlabel="PC1", ylabel="PC2"):
    plt = _pyplot()
    real_emb, gen_emb = (np.column_stack([e, np.zeros(len(e))]) if e.shape[1] < 2 else e  # one gene: one PC
                         for e in (np.asarray(real_emb), np.asarray(gen_emb)))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(real_emb[:, 0], real_emb[:, 1], s=4, alpha=0.5, label=f"real ({len(real_emb)})", c="#1f77b4")
    ax.scatter(gen_emb[:, 0], gen_emb[:, 1], s=4, alpha=0.5, label=f"generated ({len(gen_emb)})", c="#d62728")
    ax.set(title=f"{title}: real vs generated", xlabel=xlabel, ylabel=ylabel)
    ax.legend(markerscale=3, frameon=False)
    _save(fig, path)
    plt.close(fig)


def gene_stat_plot(real_stat, gen_stat, path, what="mean"):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(real_stat, gen_stat, s=4, alpha=0.5)
    hi = float(max(real_stat.max(), gen_stat.max(), 1e-6))
    ax.plot([0, hi], [0, hi], "k--", lw=0.8)
    r = np.corrcoef(real_stat, gen_stat)[0, 1] if real_stat.std() > 0 and gen_stat.std() > 0 else float("nan")
    ax.set(title=f"gene {what}: Pearson r = {r:.3f}", xlabel=f"real {what}", ylabel=f"generated {what}")
    _save(fig, path)
    plt.close(fig)


REPORT_PLOTS = ("pca.png", "umap.png", "gene_means.png", "gene_variances.png")


def remove_report_plots(out_dir, keep=()) -> None:
    """Remove the plots an earlier report left in ``out_dir`` (:data:`REPORT_PLOTS`, but those
    named in ``keep``: this report's), so that the folder shows this report's alone."""
    for name in REPORT_PLOTS:
        path = os.path.join(out_dir, name)
        if name not in keep and os.path.isfile(path):
            os.remove(path)


def report_plots(real: np.ndarray, gen: np.ndarray, out_dir, umap: bool = True, seed: int = 0,
                 stage=None) -> list[str]:
    """Write ``pca.png``, ``umap.png`` (scanpy's UMAP on a PCA fitted on the real cells),
    ``gene_means.png`` and ``gene_variances.png`` into ``out_dir`` (an earlier report's removed
    first); returns the paths. ``stage``: the function of :func:`scidiff.data.io.staged_files`,
    which then writes the plots, to be renamed into place with the rest of a report (an earlier
    report's plots are left to the caller, :func:`remove_report_plots`)."""
    os.makedirs(out_dir, exist_ok=True)
    if stage is None:
        remove_report_plots(out_dir)
    put = stage or (lambda path, write: write(path))
    project = fit_pca(real, 30, seed)
    rp, gp = project(real), project(gen)
    paths = [os.path.join(out_dir, "pca.png")]
    put(paths[-1], lambda path: embedding_plot(rp, gp, path))
    if umap and len(real) + len(gen) > 20:
        import anndata as ad
        import scanpy as sc

        both = ad.AnnData(X=np.vstack([rp, gp]).astype(np.float32))
        sc.pp.neighbors(both, n_neighbors=15, use_rep="X", random_state=seed)
        sc.tl.umap(both, random_state=seed)
        emb = both.obsm["X_umap"]
        paths.append(os.path.join(out_dir, "umap.png"))
        put(paths[-1], lambda path: embedding_plot(emb[: len(rp)], emb[len(rp):], path, "UMAP", "UMAP1", "UMAP2"))
    paths.append(os.path.join(out_dir, "gene_means.png"))
    put(paths[-1], lambda path: gene_stat_plot(real.mean(0), gen.mean(0), path, "mean"))
    paths.append(os.path.join(out_dir, "gene_variances.png"))
    put(paths[-1], lambda path: gene_stat_plot(real.var(0), gen.var(0), path, "variance"))
    return paths
