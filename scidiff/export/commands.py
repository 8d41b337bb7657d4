"""The ``scidiff export-onnx`` and ``scidiff serve`` subcommands (registered by :mod:`scidiff.cli`)."""
from __future__ import annotations

import os


def add_export_onnx(sub):
    p = sub.add_parser("export-onnx", help="export a trained model to ONNX for serving without PyTorch",
                       description="Write MODEL.onnx (the guided denoiser, dynamic batch), its sidecar MODEL.json "
                                   "(genes, normalisation, vocabularies, noise schedule, default sampler) and, for "
                                   "latent models, MODEL.decoder.npz.")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--sampler", default=None, choices=["ddim", "dpmpp_2m"],
                   help="default sampler recorded for clients (default: the run's config, else dpmpp_2m)")
    p.add_argument("--steps", type=int, default=None, help="default steps (default: the run's config, else 25)")
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--guidance", type=float, default=None, help="default classifier-free guidance scale")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")


def add_serve(sub):
    p = sub.add_parser("serve", help="serve an exported model over HTTP (onnxruntime, no PyTorch)",
                       description="POST /generate {n, condition, seed, sampler, steps, guidance, format}; "
                                   "GET /health; GET /model. Binds to 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--model", required=True, help="model.onnx written by `scidiff export-onnx`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-cells", type=int, default=10_000, help="cap on n per request")
    p.add_argument("--max-batch-cells", type=int, default=4096,
                   help="stop merging waiting requests into one run at this many cells")
    p.add_argument("--window-ms", type=float, default=2.0, help="how long the batcher waits for more requests")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")


def _run_sampling_defaults(model_path) -> dict:
    """``sampling`` section of the run folder's config.yaml, when there is one."""
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    cfg = os.path.join(folder, "config.yaml")
    if not os.path.exists(cfg):
        return {}
    from ..config import load_config

    s = load_config(cfg).sampling
    return {"sampler": s.sampler, "steps": s.steps, "eta": s.eta, "guidance_scale": s.guidance_scale}


def cmd_export_onnx(args):
    from ..training import load_model
    from .onnx import export_onnx

    model = load_model(args.model)
    defaults = _run_sampling_defaults(args.model)
    sampler = args.sampler or defaults.get("sampler", "dpmpp_2m")
    if sampler not in ("ddim", "dpmpp_2m"):
        sampler = "dpmpp_2m"  # a run configured for a sampler the ONNX runtime lacks
    result = export_onnx(model, args.out, sampler=sampler,
                         steps=args.steps if args.steps is not None else defaults.get("steps", 25),
                         eta=args.eta if args.eta is not None else defaults.get("eta", 0.0),
                         guidance_scale=args.guidance if args.guidance is not None else defaults.get("guidance_scale", 1.0),
                         opset=args.opset)
    for k in ("onnx", "sidecar", "decoder"):
        if k in result:
            print(f"wrote {result[k]}")
    if result.get("max_abs_error") is not None:
        print(f"onnxruntime vs torch max abs error: {result['max_abs_error']:.2e}")


def cmd_serve(args):
    from .server import serve

    if not os.path.exists(args.model):
        raise FileNotFoundError(f"no ONNX model at {args.model!r}; write one with `scidiff export-onnx`")
    serve(args.model, args.host, args.port, max_cells=args.max_cells, max_batch_cells=args.max_batch_cells,
          window_ms=args.window_ms, device=args.device, threads=args.threads)
