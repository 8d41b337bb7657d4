"""Where a Kang model's generated cells lose within-group variance: the diagnostic behind the
generation section's "variance kept" figures.

Takes a model written by ``bench_generation.py --save-model PATH`` (same split seed) and, per
Kang cell type x condition group:

- **variance kept**: the variance of the generated smooth cells (``observed=False``, the default
  sampler, 50 steps) over that of the group's real training cells' own latent projections
  (``decode(encode(x))``), per PC of the real training cells (the 30 the generation scores use),
  averaged over the top 10 and over all 30; and the total variance over the 30 PCs of the group's
  *held-out* cells' projections, the fair reference: the principal axes and the PCs were fitted on the training
  cells, whose projections carry the part of their noise those axes fitted (in-sample), so new
  cells from the same distribution hold less variance on them (``held_out_over_training``);
- **local structure** in the latent, at the held-out group's size (random subsets of the larger
  sets): the median distance from a cell to its nearest neighbour within its own set (training,
  held-out, generated: lower = locally tighter) and from a generated or held-out cell to its
  nearest training cell (generated below held-out = drawn toward the training cells);
- **along the reverse process**: DDIM (eta 0, 50 steps) from pure noise, by hand in the latent; at
  each step the variance of ``x_t`` on the group's top 5 latent directions over the forward
  process's own, ``alpha_bar Var(z0) + 1 - alpha_bar`` (1 all the way down for an exact score),
  so the noise levels where the variance goes are seen;
- **denoiser slope**: at each of these noise levels, the regression slope of the denoised training
  cells on their noisy input along the same directions over a Gaussian's exact one,
  ``sqrt(alpha_bar) v / (alpha_bar v + 1 - alpha_bar)`` (v: the direction's variance): below 1, the
  denoiser answers its input too little there and the sampler contracts.

    python bench/bench_generation.py --save-model /tmp/kang.pt
    python bench/bench_dispersion.py --model /tmp/kang.pt [--out bench/results/dispersion_kang.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DATA = os.path.join(HERE, "..", "..", "shared", "data", "kang_ifnb_pbmc.h5ad")
KEYS = ["cell_type", "condition"]
REPORT_STEPS = (0, 5, 10, 15, 20, 25, 30, 40, 49)  # plan steps whose ratios are kept (of 50)


LOCAL_KEYS = ("nn_within_training", "nn_within_held_out", "nn_within_generated",
              "generated_to_training", "held_out_to_training")


def local_structure(train, held, gen, rng, repeats: int = 20) -> dict:
    """Median nearest-neighbour distances (module docstring), the within-set ones on subsets of
    the held-out set's size (averaged over ``repeats`` draws for the larger sets)."""
    from scipy.spatial.distance import cdist, pdist, squareform
    import numpy as np

    def within(a, draws):
        meds = []
        for _ in range(draws):
            d = squareform(pdist(a[rng.choice(len(a), len(held), replace=False)]))
            np.fill_diagonal(d, np.inf)
            meds.append(np.median(d.min(1)))
        return float(np.mean(meds))

    return dict(zip(LOCAL_KEYS, (within(train, repeats), within(held, 1), within(gen, repeats),
                                 float(np.median(cdist(gen, train).min(1))),
                                 float(np.median(cdist(held, train).min(1))))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a checkpoint from bench_generation.py --save-model")
    p.add_argument("--data", default=DATA)
    p.add_argument("--seed", type=int, default=0, help="the split seed the model was trained with")
    p.add_argument("--cells", type=int, default=1000, help="trajectories per group")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "dispersion_kang.json"))
    args = p.parse_args(argv)
    if not os.path.exists(args.data):
        sys.exit(f"no Kang data at {args.data} (the shared data folder is not beside this checkout)")

    import numpy as np
    import torch

    import machine_info
    import scidiff
    from bench_generation import held_out_split
    from scidiff.evaluation import fit_pca
    from scidiff.training.checkpoint import load_model

    torch.set_num_threads(args.threads)
    adata = scidiff.data.read_h5ad(args.data)
    groups, train_mask, test_mask = held_out_split(adata, KEYS, args.seed)
    model = load_model(args.model)
    spec, ab = model.data_spec, model.alphas_cumprod.double()
    cells = scidiff.transform_like(spec, adata)
    project = fit_pca(cells.log_expression()[train_mask], 30, args.seed)
    ts = np.linspace(model.num_timesteps - 1, 0, 51).round().astype(int)
    out = {"model": os.path.basename(args.model), "groups": {}}
    for gi, g in enumerate(np.unique(groups)):
        rows = torch.as_tensor(np.flatnonzero(train_mask & (groups == g)))
        held = torch.as_tensor(np.flatnonzero(test_mask & (groups == g)))
        cond = dict(zip(KEYS, g.split(" | ")))
        with torch.no_grad():
            z0 = model.encode(cells.x[rows].float()).double()
            z_held = model.encode(cells.x[held].float()).double()
            own, own_held = (project(spec.to_expression(model.decode(z.float()), clip=False).numpy())
                             for z in (z0, z_held))
            smooth = model.sample(len(rows), cond, steps=50, seed=args.seed + gi, return_expression=False)
            gen, z_gen = project(spec.to_expression(smooth).numpy()), model.encode(smooth).double()
            directions = torch.linalg.svd(z0 - z0.mean(0), full_matrices=False)[2][:5].T  # [D, 5]
            v = ((z0 - z0.mean(0)) @ directions).var(0)
            gen_cond = model.encode_conditioning(cond, args.cells)
            real_cond = model.encode_conditioning(cond, len(rows))
            x = torch.randn(args.cells, z0.shape[1], generator=torch.Generator().manual_seed(gi)).double()
            noise = torch.Generator().manual_seed(10_000 + gi)
            steps = []
            for i in range(len(ts) - 1):
                t, a = int(ts[i]), ab[int(ts[i])]
                if i in REPORT_STEPS:
                    x_t = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(z0.shape, generator=noise, dtype=z0.dtype)
                    d = model(x_t.float(), torch.full((len(rows),), t), real_cond).double()
                    xp, dp = (x_t - x_t.mean(0)) @ directions, (d - d.mean(0)) @ directions
                    slope = ((xp * dp).mean(0) / xp.var(0)) / (a.sqrt() * v / (a * v + 1 - a))
                    steps.append({"t": t, "alpha_bar": float(a),
                                  "variance_over_forward": (((x - x.mean(0)) @ directions).var(0) / (a * v + 1 - a)).tolist(),
                                  # at pure noise the Gaussian slope is 0 and the ratio means nothing
                                  "denoiser_slope_over_gaussian": slope.tolist() if a > 1e-3 else None})
                x0 = model(x.float(), torch.full((args.cells,), t), gen_cond).double()
                eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
                a_next = ab[int(ts[i + 1])]
                x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
            x0 = model(x.float(), torch.zeros(args.cells, dtype=torch.long), gen_cond).double()
            final = (((x0 - x0.mean(0)) @ directions).var(0) / v).tolist()
        ratio = gen.var(0) / own.var(0)
        # totals over the 30 PCs: a ratio per PC over 11-71 held-out cells is biased up (E[1/s^2] > 1/sigma^2)
        held_ratio, gen_held = own_held.var(0).sum() / own.var(0).sum(), gen.var(0).sum() / own_held.var(0).sum()
        kept = ratio[:10]
        local = local_structure(z0.numpy(), z_held.numpy(), z_gen.numpy(), np.random.default_rng(args.seed + gi))
        out["groups"][g] = {"variance_kept_top10_pcs": kept.tolist(), "variance_kept_30_pcs": float(ratio.mean()),
                            "held_out_over_training_total_30_pcs": float(held_ratio),
                            "generated_over_held_out_total_30_pcs": float(gen_held),
                            "n_held_out": len(held), "local_structure": local, "reverse_process": steps,
                            "final_over_real_top5_directions": final}
        print(f"{g:24s} variance kept (top 10 PCs) {kept.mean():.3f}; over 30 PCs {ratio.mean():.3f} of the "
              f"training cells', held-out cells' total {held_ratio:.3f}; nearest neighbour within (train / held-out "
              f"/ generated) {local['nn_within_training']:.2f} / {local['nn_within_held_out']:.2f} / "
              f"{local['nn_within_generated']:.2f}; DDIM end / real on the group's top 5 directions "
              f"{np.round(final, 2).tolist()}", flush=True)
    kept_all = [np.mean(r["variance_kept_top10_pcs"]) for r in out["groups"].values()]
    def mean_of(key, *inner):
        return float(np.mean([r[key][inner[0]] if inner else r[key] for r in out["groups"].values()]))

    out["summary"] = {"variance_kept_top10_pcs": float(np.mean(kept_all)),
                      "variance_kept_30_pcs": mean_of("variance_kept_30_pcs"),
                      "held_out_over_training_total_30_pcs": mean_of("held_out_over_training_total_30_pcs"),
                      "generated_over_held_out_total_30_pcs": mean_of("generated_over_held_out_total_30_pcs"),
                      "local_structure": {k: mean_of("local_structure", k) for k in LOCAL_KEYS},
                      "final_over_real_top5_directions": float(np.mean(
                          [r["final_over_real_top5_directions"] for r in out["groups"].values()]))}
    for k in REPORT_STEPS:
        rows_k = [r["reverse_process"][REPORT_STEPS.index(k)] for r in out["groups"].values()]
        slopes = [r["denoiser_slope_over_gaussian"] for r in rows_k if r["denoiser_slope_over_gaussian"] is not None]
        out["summary"][f"t={rows_k[0]['t']}"] = {
            "variance_over_forward": float(np.mean([r["variance_over_forward"] for r in rows_k])),
            "denoiser_slope_over_gaussian": float(np.mean(slopes)) if slopes else None}
    out["machine"] = machine_info.machine(scidiff=scidiff.__version__)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(args.out + ".tmp", args.out)
    summary = out["summary"]
    print(f"variance kept {summary['variance_kept_top10_pcs']:.3f} (top 10 PCs), "
          f"{summary['variance_kept_30_pcs']:.3f} (30 PCs) of the training cells'; total over 30 PCs, held-out "
          f"over training {summary['held_out_over_training_total_30_pcs']:.3f}, generated over held-out "
          f"{summary['generated_over_held_out_total_30_pcs']:.3f}; DDIM end / real "
          f"{summary['final_over_real_top5_directions']:.3f}")
    print("local structure (latent, median distances at the held-out size): " +
          ", ".join(f"{k} {v:.3f}" for k, v in summary["local_structure"].items()))
    print("| t | alpha_bar | Var(x_t) / forward | denoiser slope / Gaussian |\n|---|---|---|---|")
    for k in REPORT_STEPS:
        s = out["summary"][f"t={ts[k]}"]
        slope = "-" if s["denoiser_slope_over_gaussian"] is None else f"{s['denoiser_slope_over_gaussian']:.3f}"
        print(f"| {ts[k]} | {float(ab[ts[k]]):.3f} | {s['variance_over_forward']:.3f} | {slope} |")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
