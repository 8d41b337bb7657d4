"""``scidiff evaluate``: generated cells scored against real ones (metrics.json and plots)."""
from __future__ import annotations

import json

from .common import check_out


def add(sub):
    p = sub.add_parser("evaluate", help="score generated cells against real ones",
                       description="Write metrics.json and PNG plots comparing generated to real cells.")
    p.add_argument("--real", required=True)
    p.add_argument("--generated", required=True)
    p.add_argument("--groupby", default=None, help="obs key present in both files, e.g. cell_type")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--no-plots", action="store_true")


def run(args):
    from ..tasks.evaluate import evaluate_files  # lazy: keeps --help light (torch, anndata)

    check_out(args.out, folder=True)
    metrics = evaluate_files(args.real, args.generated, args.out, args.groupby, plots=not args.no_plots)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=1, default=float))
