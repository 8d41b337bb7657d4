"""``scidiff demo``: train, sample and evaluate on PBMCs bundled with scanpy."""
from __future__ import annotations

from .common import check_out, positive_int, seed_value


def add(sub):
    p = sub.add_parser("demo", help="train, sample and evaluate on PBMCs bundled with scanpy",
                       description="Train on scanpy's pbmc68k_reduced conditioned on bulk_labels, generate "
                                   "every cell type, evaluate and write a report (about 2 minutes on 2 cores: "
                                   "121 s measured).")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--epochs", type=positive_int, default=400)
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--smooth", action="store_true",
                   help="generate each cell's smooth expression instead of measured (sparse) cells")


def run(args):
    from ..tasks.demo import run_demo  # lazy: keeps --help light (torch, anndata)

    check_out(args.out, folder=True)
    run_demo(args.out, epochs=args.epochs, seed=args.seed, observed=False if args.smooth else None)
