"""``scidiff denoise``: cells denoised with a trained model as the prior."""
from __future__ import annotations

from .common import add_expression_source, check_out, nonnegative_float, positive_int, seed_value, unit_interval


def add(sub):
    p = sub.add_parser("denoise", help="denoise cells with a trained model as the prior",
                       description="Denoise scRNA-seq (SDEdit, or posterior sampling with the Poisson likelihood of "
                                   "the counts); denoised log1p values go to layers['scidiff_denoised'], cells and "
                                   "genes keep their order.")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("--data", required=True, help="cells to denoise (.h5ad)")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--method", default="sdedit", choices=["sdedit", "posterior"])
    p.add_argument("--strength", type=unit_interval, default=None,
                   help="noise level in (0, 1] (default 0.3, chosen by molecular cross-validation on Kang)")
    p.add_argument("--likelihood-weight", type=nonnegative_float, default=1.0)
    p.add_argument("--samples", type=positive_int, default=1, help="posterior samples to average")
    add_expression_source(p)
    p.add_argument("--seed", type=seed_value, default=0)


def run(args):
    from ..data import write_h5ad  # lazy: keeps --help light (torch, anndata)
    from ..tasks.denoise import DEFAULT_STRENGTH, denoise  # lazy: keeps --help light (torch, anndata)
    from ..training import load_model  # lazy: keeps --help light (torch, anndata)

    check_out(args.out, reads={"--data": args.data, "--model": args.model})
    model = load_model(args.model)
    strength = args.strength if args.strength is not None else DEFAULT_STRENGTH
    out = denoise(model, args.data, method=args.method, strength=strength,
                  likelihood_weight=args.likelihood_weight, n_samples=args.samples, layer=args.layer,
                  use_raw=True if args.use_raw else None, seed=args.seed)  # neither flag: as the model was trained
    write_h5ad(out, args.out)
    print(f"wrote {out.n_obs} denoised cells x {out.n_vars} genes to {args.out} (layers['scidiff_denoised'])")
