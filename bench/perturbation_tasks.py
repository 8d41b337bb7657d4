"""Task definitions of the perturbation-prediction suite (``bench/bench_perturbation.py``).

A task is a list of folds. A fold holds the training cells (``train``), the source cells every
prediction starts from (``control``: the held-out context's control cells) and one or more
targets, each with the real cells it is scored against. All expression is log1p-normalised
(counts: ``normalize_total`` to 1e4, then log1p, the normalisation of the data README's
baseline figures; Kang's X already is). Tasks:

- ``kang``: Kang et al. 2018 IFN-beta PBMCs, 7 folds, leave one cell type's stimulated cells out;
- ``zhao``: Zhao et al. 2021 glioblastoma slices, 5 folds, leave one patient's panobinostat
  cells out, predicted from the patient's DMSO (``ctrl``) cells;
- ``papalexi_seen``: Papalexi et al. 2021 THP-1 CRISPR screen (cells with ``grna_frac_top >=
  0.8``), one fold: a third of each knockout's cells (and of the controls, the source cells)
  held out, seed ``seed``;
- ``papalexi_unseen``: the same cells, 25 folds: each knockout with no cell of it in training,
  predicted from all control cells;
- ``papalexi_context``: the same cells, 3 folds, leave one replicate's knockout cells out, each
  knockout predicted from that replicate's control cells (a new context where every perturbation
  was seen in the other two: the shape of a screen run in several cell lines);
- ``klein``: Klein et al. 2015 mESC after LIF withdrawal, day 4 held out, predicted from the
  day-2 cells (the time in ``day_num``);
- ``combos_additive`` / ``combos_saturating``: a synthetic combination screen on real control
  cells (:func:`make_combo_screen`), one fold per generator seed.

:func:`predict_with_scidiff` is the one place that trains and runs a scidiff model for the suite.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "..", "..", "shared", "data")
FILES = {"kang": "kang_ifnb_pbmc.h5ad", "zhao": "zhao21_glioblastoma_panobinostat_lemur.h5ad",
         "papalexi": "papalexi21_thp1_sceptre_lowmoi.h5ad", "klein": "klein15_mesc_lif_timecourse_tmscc.h5ad"}
TASKS = ("kang", "zhao", "papalexi_seen", "papalexi_unseen", "papalexi_context", "klein", "combos_additive",
         "combos_saturating")

# The data README's baseline figures (normalize_total 1e4 + log1p, per-group means, all genes),
# checked by the suite: task -> method -> metric -> value (3 decimals).
README_FIGURES = {
    "zhao": {"no_change": {"rmse_all": 0.589}, "mean_shift": {"rmse_all": 0.562, "pearson_delta_all": 0.572}},
    "papalexi_unseen": {"no_change": {"rmse_all": 0.147}, "cell_mean": {"rmse_all": 0.160,
                                                                        "pearson_delta_all": 0.279}},
    "klein": {"no_change": {"rmse_all": 0.466}, "linear": {"rmse_all": 0.449, "pearson_delta_all": 0.599}},
    "kang": {"no_change": {"scgen_r2_all": 0.749, "scgen_r2_top100": 0.495},
             "mean_shift": {"scgen_r2_all": 0.898, "scgen_r2_top100": 0.838, "pearson_delta_all": 0.824}},
}


@dataclass
class Target:
    name: str            # the perturbation label scored (cell-eval's perturbation name)
    target: dict         # covariates to predict under, e.g. {"condition": "stimulated"}
    true: object         # AnnData: the real cells of the target


@dataclass
class Fold:
    name: str
    train: object        # AnnData: training cells
    control: object      # AnnData: source cells, the held-out context's controls
    targets: list[Target]
    info: dict = field(default_factory=dict)


@dataclass
class Task:
    """``baselines``: the baseline methods run, with the keyword arguments of
    :func:`scidiff.evaluation.perturbation.predict_baseline`; ``reference``: the baseline that
    cell-eval scores every method against; ``model_keys``: ``setup_anndata`` arguments, ``None``
    where the model cannot predict the targets; ``shared_control``: all folds predict from the
    same control cells, so cell-eval and the PDS rank all folds' targets together (otherwise the
    PDS of single-target folds ranks across folds, each against its own control)."""

    name: str
    data: str
    description: str
    folds: list[Fold]
    baselines: dict[str, dict]
    reference: str
    model_keys: dict | None
    model_note: str = ""
    shared_control: bool = False
    info: dict = field(default_factory=dict)


def load_log1p(name: str, data_dir: str = DATA_DIR):
    """The data file of ``name`` (a key of :data:`FILES`) with dense log1p-normalised X."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    a = ad.read_h5ad(os.path.join(data_dir, FILES[name]))
    x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    if name != "kang":  # counts; Kang's X is already log1p-normalised
        a.X = x.astype(np.float32)
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        x = np.asarray(a.X)
    a.X = x.astype(np.float32)
    a.obs_names_make_unique()
    return a


def _lean(a, keep):
    """A copy with only the obs columns ``keep`` (labels as strings, numbers as numbers)."""
    import anndata as ad
    import pandas as pd
    from pandas.api.types import is_numeric_dtype

    obs = pd.DataFrame(index=a.obs_names.astype(str))
    for k in keep:
        col = a.obs[k]
        obs[k] = col.to_numpy(dtype=float) if is_numeric_dtype(col) else col.astype(str).to_numpy()
    out = ad.AnnData(X=np.asarray(a.X, dtype=np.float32), obs=obs)
    out.var_names = [str(g) for g in a.var_names]
    return out


def kang_task(data_dir=DATA_DIR, **_) -> Task:
    a = _lean(load_log1p("kang", data_dir), ["cell_type", "condition"])
    ct, cond = a.obs["cell_type"].to_numpy(), a.obs["condition"].to_numpy()
    folds = []
    for held in sorted(set(ct)):
        out = (ct == held) & (cond == "stimulated")
        folds.append(Fold(held, a[~out].copy(), a[(ct == held) & (cond == "control")].copy(),
                          [Target("stimulated", {"condition": "stimulated"}, a[out].copy())]))
    keys = dict(perturbation_key="condition", context_key="cell_type", control_label="control")
    return Task("kang", FILES["kang"], "Kang IFN-beta PBMCs: leave one cell type's stimulated cells out (7 folds)",
                folds, {"no_change": keys, "mean_shift": keys, "linear": keys}, "mean_shift",
                dict(condition_keys=["cell_type"], perturbation_keys=["condition"], control_labels=["control"]))


def zhao_task(data_dir=DATA_DIR, **_) -> Task:
    a = _lean(load_log1p("zhao", data_dir), ["patient_id", "condition"])
    pt, cond = a.obs["patient_id"].to_numpy(), a.obs["condition"].to_numpy()
    folds = []
    for held in sorted(set(pt)):
        out = (pt == held) & (cond == "panobinostat")
        folds.append(Fold(held, a[~out].copy(), a[(pt == held) & (cond == "ctrl")].copy(),
                          [Target("panobinostat", {"condition": "panobinostat"}, a[out].copy())]))
    keys = dict(perturbation_key="condition", context_key="patient_id", control_label="ctrl")
    return Task("zhao", FILES["zhao"], "Zhao glioblastoma: panobinostat in an unseen patient, from its DMSO cells "
                "(5 folds, leave one patient out)", folds, {"no_change": keys, "mean_shift": keys, "linear": keys},
                "mean_shift", dict(condition_keys=["patient_id"], perturbation_keys=["condition"],
                                   control_labels=["ctrl"]))


def _papalexi(data_dir):
    a = load_log1p("papalexi", data_dir)
    a = a[a.obs["grna_frac_top"].to_numpy() >= 0.8]
    return _lean(a, ["perturbation", "bio_rep"])


def papalexi_seen_task(data_dir=DATA_DIR, seed=0, **_) -> Task:
    a = _papalexi(data_dir)
    pert = a.obs["perturbation"].to_numpy()
    rng = np.random.default_rng(seed)
    held = np.zeros(a.n_obs, bool)
    for label in sorted(set(pert)):
        idx = np.flatnonzero(pert == label)
        held[rng.choice(idx, len(idx) // 3, replace=False)] = True
    kos = sorted(set(pert) - {"control"})
    fold = Fold("seen", a[~held].copy(), a[held & (pert == "control")].copy(),
                [Target(k, {"perturbation": k}, a[held & (pert == k)].copy()) for k in kos],
                {"held_out_fraction": "1/3 of each knockout and of the controls", "split_seed": seed})
    keys = dict(perturbation_key="perturbation", control_label="control")
    return Task("papalexi_seen", FILES["papalexi"], "Papalexi THP-1 screen: each knockout with a third of its cells "
                "held out (seen perturbation, new cells); cells with grna_frac_top >= 0.8", [fold],
                {"no_change": keys, "mean_shift": keys, "cell_mean": keys, "linear": keys}, "mean_shift",
                dict(condition_keys=["bio_rep"], perturbation_keys=["perturbation"], control_labels=["control"]))


def papalexi_unseen_task(data_dir=DATA_DIR, seed=0, **_) -> Task:
    from scidiff.evaluation.perturbation import pca_gene_embedding

    a = _papalexi(data_dir)
    pert = a.obs["perturbation"].to_numpy()
    genes = [str(g) for g in a.var_names]
    control = a[pert == "control"].copy()
    folds = []
    for k in sorted(set(pert) - {"control"}):
        train = a[pert != k].copy()
        # linear baseline on unseen knockouts: the target gene's PCA embedding (Ahlmann-Eltze et al. 2025),
        # from this fold's training cells; only knockouts of genes in the panel have one
        emb = pca_gene_embedding(train.X, 10, seed)
        feats = {g: emb[genes.index(g)] for g in set(pert) - {"control"} if g in genes}
        folds.append(Fold(k, train, control, [Target(k, {"perturbation": k}, a[pert == k].copy())],
                          {"linear_features": feats}))
    keys = dict(perturbation_key="perturbation", control_label="control")
    return Task("papalexi_unseen", FILES["papalexi"], "Papalexi THP-1 screen: each knockout predicted with no data "
                "of it (25 folds); cells with grna_frac_top >= 0.8", folds,
                {"no_change": keys, "cell_mean": keys, "linear": {**keys, "features": "fold"}}, "cell_mean",
                dict(condition_keys=["bio_rep"], perturbation_keys=["perturbation"], control_labels=["control"]),
                shared_control=True,
                info={"linear": "ridge on the knocked-out gene's loadings on 10 PCs of the fold's training cells; "
                                "only the 9 knockouts of panel genes have one (the others: n/a)"})


def papalexi_context_task(data_dir=DATA_DIR, **_) -> Task:
    a = _papalexi(data_dir)
    pert, rep = a.obs["perturbation"].to_numpy(), a.obs["bio_rep"].to_numpy()
    kos = sorted(set(pert) - {"control"})
    folds = []
    for held in sorted(set(rep)):
        out = (rep == held) & (pert != "control")
        folds.append(Fold(held, a[~out].copy(), a[(rep == held) & (pert == "control")].copy(),
                          [Target(k, {"perturbation": k}, a[out & (pert == k)].copy()) for k in kos]))
    keys = dict(perturbation_key="perturbation", context_key="bio_rep", control_label="control")
    return Task("papalexi_context", FILES["papalexi"], "Papalexi THP-1 screen: leave one replicate's knockout cells "
                "out (3 folds), each knockout predicted from that replicate's control cells; cells with "
                "grna_frac_top >= 0.8", folds, {"no_change": keys, "mean_shift": keys, "cell_mean": keys,
                                                "linear": keys}, "mean_shift",
                dict(condition_keys=["bio_rep"], perturbation_keys=["perturbation"], control_labels=["control"]))


def klein_task(data_dir=DATA_DIR, **_) -> Task:
    a = _lean(load_log1p("klein", data_dir), ["day", "day_num"])
    day = a.obs["day_num"].to_numpy()
    fold = Fold("d4", a[day != 4].copy(), a[day == 2].copy(), [Target("d4", {"day_num": 4.0}, a[day == 4].copy())],
                {"source": "day-2 cells"})
    a_keys = dict(time_key="day_num")
    return Task("klein", FILES["klein"], "Klein mESC LIF withdrawal: day 4 held out, predicted from the day-2 cells",
                [fold], {"no_change": a_keys, "linear": a_keys}, "linear", dict(continuous_keys=["day_num"]))


# -- the synthetic combination screen --------------------------------------------------------------

def _base_cells(base: str, data_dir: str, n_genes: int):
    """Real control cells for the synthetic screen: raw counts on ``n_genes`` genes (the most
    expressed; all of Papalexi's 299-gene panel), their library sizes over all genes, and names."""
    import anndata as ad
    import scipy.sparse as sp

    if base == "kang":
        a = ad.read_h5ad(os.path.join(data_dir, FILES["kang"]))
        a = a[a.obs["condition"].astype(str).to_numpy() == "control"]
        counts = a.layers["counts"]
    elif base == "papalexi":
        a = ad.read_h5ad(os.path.join(data_dir, FILES["papalexi"]))
        a = a[(a.obs["grna_frac_top"].to_numpy() >= 0.8) & (a.obs["perturbation"].astype(str) == "control")]
        counts = a.X
    else:
        raise ValueError(f"base must be 'kang' or 'papalexi', got {base!r}")
    counts = (counts.toarray() if sp.issparse(counts) else np.asarray(counts)).astype(np.float64)
    lib = counts.sum(1)
    keep = np.sort(np.argsort(-counts.mean(0), kind="stable")[:n_genes])
    return counts[:, keep], lib, np.array([str(g) for g in a.var_names])[keep]


def make_combo_screen(kind: str = "additive", seed: int = 0, data_dir: str = DATA_DIR, base: str = "papalexi",
                      n_genes: int = 1000, n_singles: int = 8, n_seen_doubles: int = 4, cells_per_group: int = 300,
                      n_train_control: int = 1000, pool_genes: int = 60, genes_per_single: int = 20,
                      n_real_deltas: int = 60, cap: float = 0.5, min_expression: float = 0.5):
    """A combination screen with a known truth, built from real control cells.

    Cells: Papalexi et al. 2021's THP-1 non-targeting cells (``base='papalexi'``, the default:
    ``grna_frac_top >= 0.8``, 1,923 cells of one cell line, the 299-gene panel, about 200 UMIs a
    cell) or Kang et al. 2018's control PBMCs (``'kang'``: raw counts on the ``n_genes`` most
    expressed genes, about 870 UMIs; a mixture of cell types, so a group's mean carries
    composition noise), split at random into a pool for the screen's groups (2/3) and one for the
    source control cells the predictions start from (1/3).

    Effects (seeded by ``seed``): real response sizes, the ``n_real_deltas`` largest of Kang's
    per-gene IFN-beta deltas (stimulated - control mean of log1p expression over all 6,998
    genes; the top 60 span 0.27-2.86), permuted across genes: ``pool_genes`` responsive genes
    are drawn among the expressed genes (control mean log1p >= 0.5), each with the sign of a
    random real delta (a shared program, so perturbations overlap and saturation can bite);
    each of ``n_singles`` singles ``A, B, ...`` moves ``genes_per_single`` of them by the
    magnitude of a random real delta.

    Truth of a group ``S`` (log1p units): ``u = sum_{p in S} e_p``; additive: ``u``; saturating:
    ``cap * tanh(u / cap)`` (singles saturate too, so the singles seen in training carry it).
    Responsive genes are the ones measured most consistently (the highest 10th percentile of
    log1p, all those at or above ``min_expression`` and at least ``pool_genes``), and a single's
    decrease is at most half that percentile, so the clip at 0 below seldom binds and the additive
    truth is nearly additive in the measured means.

    Measurement: each cell of a group resamples a pool cell ``i`` (its log1p expression ``x_i``
    normalised to 1e4) and takes ``max(x_i + truth, 0)``: the group's cells carry the real cells'
    heterogeneity and sparsity, shifted by the truth; the control cells are resampled unchanged. Groups: ``n_train_control`` control
    cells, every single and ``n_seen_doubles`` random doubles (training, ``cells_per_group``
    each), the other doubles (held out, as many cells), and the whole second pool as source
    control cells.

    Returns an AnnData (log1p X, ``obs['perturbation']``, ``obs['split']`` in train / source /
    test) with the generator's settings and the singles' effects in ``uns``.
    """
    import anndata as ad
    import pandas as pd

    if kind not in ("additive", "saturating"):
        raise ValueError(f"kind must be 'additive' or 'saturating', got {kind!r}")
    rng = np.random.default_rng(seed)
    counts, lib, genes = _base_cells(base, data_dir, n_genes)
    x = np.log1p(counts / lib[:, None] * 1e4)
    kang = load_log1p("kang", data_dir)
    stim = kang.obs["condition"].astype(str).to_numpy() == "stimulated"
    kd = kang.X[stim].mean(0) - kang.X[~stim].mean(0)
    tail = kd[np.argsort(-np.abs(kd), kind="stable")[:n_real_deltas]].astype(np.float64)

    floor = np.quantile(x, 0.1, axis=0)  # a decrease stays above 90% of the cells' values
    expressed = np.argsort(-floor, kind="stable")[:max(pool_genes, int(np.sum(floor >= min_expression)))]
    pool = rng.choice(expressed, min(pool_genes, len(expressed)), replace=False)
    sign = np.sign(rng.choice(tail, len(pool)))
    singles = [chr(ord("A") + i) for i in range(n_singles)]
    effects = {}
    for s in singles:
        e = np.zeros(len(genes))
        which = rng.choice(len(pool), genes_per_single, replace=False)
        size = np.abs(rng.choice(tail, genes_per_single))
        genes_hit = pool[which]
        e[genes_hit] = np.where(sign[which] < 0, -np.minimum(size, floor[genes_hit] / 2), size)
        effects[s] = e

    def truth(label):
        u = np.sum([effects[p] for p in label.split("+")], axis=0)
        return u if kind == "additive" else cap * np.tanh(u / cap)

    doubles = ["+".join(p) for p in itertools.combinations(singles, 2)]
    seen = sorted(rng.choice(doubles, n_seen_doubles, replace=False).tolist())
    held = [d for d in doubles if d not in seen]
    order = rng.permutation(len(x))
    screen_pool, source_pool = order[: 2 * len(x) // 3], order[2 * len(x) // 3:]

    def measure(i, effect):
        return np.maximum(x[i] + effect, 0.0)

    def draw(n):
        return rng.choice(screen_pool, n, replace=True)

    blocks, labels, splits = [], [], []
    plan = [("control", "train", draw(n_train_control)), ("control", "source", source_pool)]
    plan += [(s, "train", draw(cells_per_group)) for s in singles + seen]
    plan += [(d, "test", draw(cells_per_group)) for d in held]
    for label, split, idx in plan:
        blocks.append(measure(idx, 0.0 if label == "control" else truth(label)))
        labels += [label] * len(idx)
        splits += [split] * len(idx)
    obs = pd.DataFrame({"perturbation": labels, "split": splits}, index=[f"cell{i}" for i in range(len(labels))])
    out = ad.AnnData(X=np.vstack(blocks).astype(np.float32), obs=obs)
    out.var_names = list(genes)
    out.uns["generator"] = {"kind": kind, "seed": seed, "base": base, "n_genes": int(len(genes)),
                            "singles": singles, "seen_doubles": seen, "held_out_doubles": held,
                            "cap": cap if kind == "saturating" else None,
                            "pool_genes": [str(g) for g in genes[pool]], "genes_per_single": genes_per_single,
                            "cells_per_group": cells_per_group, "n_train_control": n_train_control,
                            "n_source_control": int(len(source_pool))}
    out.uns["effects"] = {s: effects[s].astype(np.float32) for s in singles}
    return out


def combos_task(kind: str, data_dir=DATA_DIR, combo_seeds=(0, 1, 2), **_) -> Task:
    folds = []
    for s in combo_seeds:
        a = make_combo_screen(kind, s, data_dir)
        split, pert = a.obs["split"].to_numpy(), a.obs["perturbation"].to_numpy()
        lean = _lean(a, ["perturbation"])
        held = a.uns["generator"]["held_out_doubles"]
        folds.append(Fold(f"seed{s}", lean[split == "train"].copy(), lean[split == "source"].copy(),
                          [Target(d, {"perturbation": d}, lean[(split == "test") & (pert == d)].copy()) for d in held],
                          {"generator": dict(a.uns["generator"])}))
    keys = dict(perturbation_key="perturbation", control_label="control")
    desc = {"additive": "effect(A+B) = eA + eB", "saturating": "effect(S) = c tanh(sum e / c), c = 0.5"}[kind]
    return Task(f"combos_{kind}", f"synthetic from {FILES['papalexi']} controls and {FILES['kang']} deltas",
                f"Synthetic combination screen ({desc}): 8 singles, 4 seen doubles, 24 held-out doubles; "
                f"one fold per generator seed", folds,
                {"no_change": keys, "cell_mean": keys, "additive": keys, "linear": keys}, "additive",
                dict(perturbation_keys=["perturbation"], control_labels=["control"]),
                info={"generator": make_combo_screen.__doc__.split("\n\n")[0]})


def build_task(name: str, **kw) -> Task:
    if name == "kang":
        return kang_task(**kw)
    if name == "zhao":
        return zhao_task(**kw)
    if name == "papalexi_seen":
        return papalexi_seen_task(**kw)
    if name == "papalexi_unseen":
        return papalexi_unseen_task(**kw)
    if name == "papalexi_context":
        return papalexi_context_task(**kw)
    if name == "klein":
        return klein_task(**kw)
    if name in ("combos_additive", "combos_saturating"):
        return combos_task(name.split("_", 1)[1], **kw)
    raise ValueError(f"unknown task {name!r}; tasks: {list(TASKS)}")


# -- the model --------------------------------------------------------------------------------------

def train_scidiff(train_adata, keys: dict, seed: int = 0, epochs: int = 200, *, hidden_dim: int = 512,
                  num_layers: int = 6, latent_dim: int = 64, batch_size: int = 256, model_path: str | None = None):
    """``(model, training seconds)``: a scidiff model trained on ``train_adata`` (``keys`` and the
    rest as :func:`predict_with_scidiff` takes them), with the perturbation prior ``scidiff train``
    fits; read from ``model_path`` instead where that checkpoint exists, else written there."""
    import time

    import torch

    import scidiff
    from scidiff.models.perturbation_prior import PerturbationPrior
    from scidiff.training.checkpoint import load_model, read_checkpoint, save_model

    if model_path is not None and os.path.exists(model_path):
        return load_model(model_path), float(read_checkpoint(model_path)["train_seconds"])
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    data = scidiff.setup_anndata(train_adata.copy(), n_top_genes=None, **keys)
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=hidden_dim, num_layers=num_layers,
                                           latent_dim=latent_dim or None)
    if data.spec.perturbation_keys:  # unseen perturbations: the prior, as `scidiff train` fits it
        model.perturbation_prior = PerturbationPrior.from_cells(data, train_adata, seed=seed)
    scidiff.ScIDiffTrainer(model, data.loader(batch_size, seed=seed), device="cpu", early_stopping_patience=None,
                           seed=seed, progress=False).train(epochs)
    train_s = time.perf_counter() - t0
    if model_path is not None:
        save_model(model, model_path, train_seconds=train_s)
    return model, train_s


def predict_with_scidiff(train_adata, control_adata, target, keys: dict, seed: int = 0, epochs: int = 200,
                         method="counterfactual", *, hidden_dim: int = 512, num_layers: int = 6, latent_dim: int = 64,
                         steps: int = 50, batch_size: int = 256, model_path: str | None = None):
    """Train a scidiff model on ``train_adata`` and predict ``control_adata``'s cells under
    ``target`` (a dict of covariates, or a list of them: one model, every target).

    ``keys``: :func:`scidiff.setup_anndata` arguments (``condition_keys``, ``perturbation_keys``,
    ``continuous_keys``, ``control_labels``); all genes are kept. ``method``: ``"counterfactual"``
    or ``"population"`` (:func:`scidiff.tasks.perturb.perturb`) or a tuple of them.
    Returns the predicted AnnData for one target and one method; otherwise ``{method: [AnnData
    per target]}``, where a target the model refuses (an unseen perturbation nothing describes)
    is the refusal's message instead. The training time is in each prediction's ``.uns['train_seconds']``; each
    prediction carries ``perturb``'s ``obs['scidiff_confidence']`` and ``obs['scidiff_route']``
    (:func:`prediction_record` summarises them). ``model_path``: a checkpoint the trained model is
    written to, and read from instead of training where it already exists (the caller keys it by
    everything the training depends on).
    """
    from scidiff.tasks.perturb import perturb

    targets = [target] if isinstance(target, dict) else list(target)
    methods = (method,) if isinstance(method, str) else tuple(method)
    model, train_s = train_scidiff(train_adata, keys, seed, epochs, hidden_dim=hidden_dim, num_layers=num_layers,
                                   latent_dim=latent_dim, batch_size=batch_size, model_path=model_path)
    out = {m: [] for m in methods}
    store = {}  # the control cells' inversions, shared by the targets (identical predictions)
    for m in methods:
        for t in targets:
            try:
                pred = perturb(model, control_adata.copy(), t, method=m, steps=steps, seed=seed, progress=False,
                               store=store)
            except ValueError as exc:  # refused: e.g. an unseen perturbation nothing describes
                out[m].append(str(exc))
                continue
            pred.uns["train_seconds"] = train_s
            out[m].append(pred)
    if isinstance(target, dict) and isinstance(method, str):
        return out[method][0]
    return out


def prediction_record(pred) -> dict:
    """What a model's prediction says about itself, for the results JSON: the mean of
    ``obs['scidiff_confidence']`` over the predicted cells (``None`` where it is absent or never
    assessed, NaN throughout), the number of cells per ``obs['scidiff_route']`` and, where an
    effect was transferred, how far the cells lie within each context read (the share of the
    network's per-cell deviation kept)."""
    out = {"confidence_mean": None, "routes": {}}
    if "scidiff_confidence" in pred.obs.columns:
        conf = np.asarray(pred.obs["scidiff_confidence"], dtype=np.float64)
        if np.isfinite(conf).any():
            out["confidence_mean"] = float(np.nanmean(conf))
        out["confidence_assessed_fraction"] = float(np.isfinite(conf).mean()) if len(conf) else 0.0
    if "scidiff_route" in pred.obs.columns:
        routes = pred.obs["scidiff_route"].astype(str).value_counts()
        out["routes"] = {str(k): int(v) for k, v in routes.items()}
    inside = pred.uns.get("scidiff_prediction", {}).get("transferred_inside")
    if inside:
        out["transferred_inside"] = {c: dict(v) for c, v in inside.items()}
    return out
