"""The design report: did designed cells meet the target, are they realistic, are they diverse.

- targets: per gene target, the fraction of designed cells that meet it within its tolerance,
  with the same fraction for the source cells and for the real cells of the nearest type;
- realism, against real cells, in a PCA fitted on real cells and cross-fitted over two halves of
  them (as :mod:`scidiff.evaluation.metrics`, so that real and designed cells are both new to the
  PCA): the nearest type (the most common label among the designed cells' nearest real
  neighbours), a random-forest classifier AUC of designed cells against the real cells of that
  type (0.5 = indistinguishable), the distance from each designed cell to its nearest real cell
  against the same distance for held-out real cells of that type, and scPerturb's E-distance;
- diversity: the mean pairwise distance among designed cells over that among real cells of the
  nearest type (1 = as diverse as real cells; near 0 = collapsed onto one profile).
"""
from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist

from .metrics import _halves, classifier_auc, fit_pca
from .perturbation import e_distance
from .plots import _pyplot, _save


def _mean_pairwise(x: np.ndarray, max_n: int = 1000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    if len(x) > max_n:
        x = x[rng.choice(len(x), max_n, replace=False)]
    if len(x) < 2:
        return float("nan")
    d = cdist(x, x)
    return float(d.sum() / (len(x) * (len(x) - 1)))


def _majority(labels: np.ndarray) -> str:
    """The most common label (ties go to the first in sorted order, so that the result does not
    depend on Python's string hashing)."""
    values, counts = np.unique(labels, return_counts=True)
    return values[np.argmax(counts)]


def target_table(designed: np.ndarray, gene_names, target, *, met: dict | None = None, source=None,
                 reference=None) -> list[dict]:
    """Per gene target: ``fraction_met`` of designed cells (within tolerance), value quantiles,
    and the same fraction for ``source`` and ``reference`` (e.g. real cells of the nearest type)."""
    index = {str(g): i for i, g in enumerate(gene_names)}
    rows = []
    for c in target.constraints:
        v = designed[:, index[c.gene]]
        row = {"target": str(c), "gene": c.gene, "relation": c.relation, "value": c.value,
               "tolerance": c.tolerance, "kind": c.kind,
               "fraction_met": float((met[str(c)] if met and str(c) in met else c.met(v)).mean()),
               "designed_mean": float(v.mean()),
               "designed_quantiles": [float(q) for q in np.percentile(v, [10, 50, 90])]}
        for name, cells in (("source", source), ("reference", reference)):
            if cells is not None and len(cells):
                w = np.asarray(cells)[:, index[c.gene]]
                row[f"{name}_fraction_met"] = float(c.met(w).mean())
                row[f"{name}_mean"] = float(w.mean())
        rows.append(row)
    return rows


def realism(designed: np.ndarray, real: np.ndarray, real_labels, *, reference_label: str | None = None,
            n_pcs: int = 30, k: int = 15, seed: int = 0) -> dict:
    """Realism and diversity of ``designed`` against ``real`` cells labelled ``real_labels``
    (see the module notes). ``reference_label`` fixes the type to compare with (default: the
    nearest type)."""
    real = np.asarray(real, dtype=np.float64)
    designed = np.asarray(designed, dtype=np.float64)
    labels = np.asarray(real_labels).astype(str)
    if len(labels) != len(real):
        raise ValueError(f"{len(labels)} labels for {len(real)} real cells")
    folds = []
    for fit, score in (lambda h: (h, h[::-1]))(_halves(len(real), labels, seed)):
        project = fit_pca(real[fit], n_pcs, seed)
        rp, dp, sp_ = project(real[fit]), project(designed), project(real[score])
        nn = np.argsort(cdist(dp, rp), axis=1)[:, :k]
        votes = labels[fit][nn]
        majority = np.array([_majority(row) for row in votes])
        folds.append((fit, score, rp, dp, sp_, majority))
    majority = np.concatenate([f[5] for f in folds])
    types, counts = np.unique(majority, return_counts=True)
    composition = {str(t): float(c / counts.sum()) for t, c in zip(types, counts)}
    ref = reference_label or str(types[np.argmax(counts)])
    if ref not in set(labels):
        raise ValueError(f"reference_label {ref!r} is not a label of the real cells: {sorted(set(labels))}")
    aucs, e_d, nn_d, nn_r, div_d, div_r = [], [], [], [], [], []
    for fit, score, rp, dp, sp_, _ in folds:
        ref_score = sp_[labels[score] == ref]
        if len(ref_score) < 3:
            continue
        aucs.append(classifier_auc(dp, ref_score, seed=seed))
        e_d.append(e_distance(dp, ref_score))
        nn_d.append(float(np.median(cdist(dp, rp).min(1))))
        nn_r.append(float(np.median(cdist(ref_score, rp).min(1))))
        div_d.append(_mean_pairwise(dp, seed=seed))
        div_r.append(_mean_pairwise(ref_score, seed=seed))
    if not aucs:
        raise ValueError(f"too few real cells of type {ref!r} to score realism (need >= 6)")
    nn_d, nn_r, div_d, div_r = map(lambda v: float(np.mean(v)), (nn_d, nn_r, div_d, div_r))
    return {"nearest_type": ref, "nearest_type_composition": composition,
            "fraction_nearest_type": composition.get(ref, 0.0),
            "classifier_auc": float(np.mean(aucs)), "e_distance": float(np.mean(e_d)),
            "nn_distance_median": nn_d, "nn_distance_median_real": nn_r,
            "nn_distance_ratio": nn_d / nn_r if nn_r > 0 else float("nan"),
            "diversity": {"mean_pairwise_distance": div_d, "real_mean_pairwise_distance": div_r,
                          "ratio": div_d / div_r if div_r > 0 else float("nan")},
            "n_pcs": int(min(n_pcs, len(real) // 2 - 1, real.shape[1])), "k": k}


def design_report(designed: np.ndarray, gene_names, target, *, met: dict | None = None, source=None, real=None,
                  real_labels=None, reference_label: str | None = None, n_pcs: int = 30, seed: int = 0) -> dict:
    """The report of one design run (a JSON-ready dict): ``targets`` (:func:`target_table`),
    ``fraction_met_all``, and with real cells ``realism`` (:func:`realism`)."""
    designed = np.asarray(designed, dtype=np.float64)
    out = {"n_designed": int(len(designed)), "target": repr(target)}
    if met:
        all_met = np.all(np.stack([np.asarray(v) for v in met.values()]), axis=0)
        out["fraction_met_all"] = float(all_met.mean())
        out["fraction_met"] = {k: float(np.mean(v)) for k, v in met.items()}
    reference = None
    if real is not None:
        if real_labels is None:
            real_labels = np.array(["real"] * len(real))
        out["realism"] = realism(designed, real, real_labels, reference_label=reference_label, n_pcs=n_pcs, seed=seed)
        reference = np.asarray(real)[np.asarray(real_labels).astype(str) == out["realism"]["nearest_type"]]
    out["targets"] = target_table(designed, gene_names, target, met=met, source=source, reference=reference)
    if "fraction_met_all" not in out:
        hits = [c.met(designed[:, list(map(str, gene_names)).index(c.gene)]) for c in target.constraints]
        out["fraction_met_all"] = float(np.all(np.stack(hits), axis=0).mean()) if hits else float("nan")
    if source is not None:
        src = np.asarray(source, dtype=np.float64)
        out["source_fraction_met_all"] = float(np.all(np.stack(
            [c.met(src[:, list(map(str, gene_names)).index(c.gene)]) for c in target.constraints]), axis=0).mean()
        ) if target.constraints else float("nan")
    out["diversity_designed_mean_pairwise_genes"] = _mean_pairwise(designed, seed=seed)
    return out


def design_plot(designed: np.ndarray, gene_names, target, path, *, source=None, reference=None,
                reference_name: str = "real") -> str:
    """A PNG with one panel per target gene: the gene's values in designed, source and real
    (reference) cells, with the target level and its tolerance band."""
    plt = _pyplot()
    index = {str(g): i for i, g in enumerate(gene_names)}
    genes = list(dict.fromkeys(c.gene for c in target.constraints))
    if not genes:
        raise ValueError("the target has no gene targets to plot")
    fig, axes = plt.subplots(1, len(genes), figsize=(2.6 * len(genes) + 0.6, 3.4), squeeze=False)
    groups = [("designed", designed, "#d62728"), ("source", source, "#7f7f7f"), (reference_name, reference, "#1f77b4")]
    groups = [(n, np.asarray(x), c) for n, x, c in groups if x is not None and len(x)]
    for ax, gene in zip(axes[0], genes):
        data = [x[:, index[gene]] for _, x, _ in groups]
        parts = ax.violinplot(data, showmedians=True, showextrema=False)
        for body, (_, _, color) in zip(parts["bodies"], groups):
            body.set_facecolor(color)
            body.set_alpha(0.5)
        ymin, ymax = ax.get_ylim()
        for c in target.constraints:
            if c.gene == gene:
                lo, hi = c.bounds()
                ax.axhline(c.value, color="k", lw=0.8, ls="--")
                ax.axhspan(lo if np.isfinite(lo) else min(ymin, 0.0), hi if np.isfinite(hi) else max(ymax, lo),
                           color="#2ca02c", alpha=0.1)
        ax.set_ylim(min(ymin, 0.0), ymax)
        ax.set_xticks(range(1, len(groups) + 1), [n for n, _, _ in groups], rotation=30)
        ax.set_title(" & ".join(str(c) for c in target.constraints if c.gene == gene), fontsize=9)
    axes[0][0].set_ylabel("log1p expression")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return str(path)


# -- baselines ------------------------------------------------------------------------------------


def direct_gradient_baseline(designer, target, start_expression, *, steps: int = 300, lr: float = 0.05) -> np.ndarray:
    """Inverse design without the diffusion prior: gradient descent (Adam) on the objective
    directly over each cell's expression, from ``start_expression`` (clipped at 0 after every
    step). It meets gene targets by moving only the targeted genes, so it shows what leaving the
    manifold looks like."""
    import torch

    designer.check(target)
    loss_fn = designer.loss_fn(target)
    x = torch.as_tensor(np.asarray(start_expression), dtype=torch.float32).clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(x, None)
            if float(loss.max()) == 0.0:
                break
            loss.sum().backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(min=0.0)
    return x.detach().numpy()


def rejection_baseline(model, hits_fn, n_samples: int, conditioning: dict | None = None, *, steps: int = 50,
                       seed: int = 0, chunk: int = 512, observed: bool = False) -> dict:
    """Unguided sampling + rejection: draw ``n_samples`` cells from ``model`` under
    ``conditioning`` (measured cells with ``observed``) and count those ``hits_fn(expression) ->
    bool [N]`` accepts. Returns the hit rate and samples per hit (``inf`` when nothing was hit:
    then at least ``n_samples`` per hit)."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    hits = 0
    for start in range(0, n_samples, chunk):
        b = min(chunk, n_samples - start)
        x = model.sample(b, conditioning, steps=steps, generator=gen, observed=observed).cpu().numpy()
        hits += int(np.asarray(hits_fn(x)).sum())
    rate = hits / n_samples
    return {"n_samples": int(n_samples), "hits": int(hits), "hit_rate": float(rate),
            "samples_per_hit": float(1.0 / rate) if rate > 0 else float("inf"),
            "samples_per_hit_lower_bound": float(n_samples if rate == 0 else 1.0 / rate)}
