"""``scidiff predict``: perturbation responses of control cells."""
from __future__ import annotations

from .common import check_out, finite_float, parse_conditioning, positive_int, sampling_settings, seed_value


def add(sub):
    p = sub.add_parser("predict", help="predict perturbation responses of control cells",
                       description="Map each control cell to its predicted perturbed state (DDIM inversion under "
                                   "its own condition, decoding under the target) and write an .h5ad that pairs "
                                   "every input cell with its prediction (X = predicted, layers['control'] = input).")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("--data", required=True, help="control cells (.h5ad)")
    p.add_argument("--target", required=True, help="key=value[,key=value], e.g. condition=stimulated or drug=A+B,dose=10")
    p.add_argument("--method", default="counterfactual", choices=["counterfactual", "population"])
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM inversion and decoding steps")
    p.add_argument("--config", default=None,
                   help="YAML whose sampling section gives the default of --guidance (default: the run's config.yaml)")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: sampling.guidance_scale of the config, else 1)")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--out", required=True, help="output .h5ad")


def run(args):
    from ..data import write_h5ad  # lazy: keeps --help light (torch, anndata)
    from ..tasks.perturb import perturb  # lazy: keeps --help light (torch, anndata)
    from ..training import load_model  # lazy: keeps --help light (torch, anndata)

    guidance = sampling_settings(args)["guidance_scale"]
    check_out(args.out)
    model = load_model(args.model)
    target = parse_conditioning(model, args.target, "--target")
    if not target:
        raise ValueError("--target is empty; give at least one covariate, e.g. condition=stimulated")
    out = perturb(model, args.data, target, method=args.method, steps=args.steps, guidance_scale=guidance,
                  seed=args.seed)
    write_h5ad(out, args.out)
    print(f"wrote {out.n_obs} predicted cells x {out.n_vars} genes to {args.out}")
