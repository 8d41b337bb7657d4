"""``scidiff serve``: an exported model served over HTTP (onnxruntime, no PyTorch)."""
from __future__ import annotations

import os


def add(sub):
    p = sub.add_parser("serve", help="serve an exported model over HTTP (onnxruntime, no PyTorch)",
                       description="POST /generate {n, condition, seed, sampler, steps, guidance, eta, format}; "
                                   "GET /health; GET /model. Binds to 127.0.0.1 unless --host says otherwise. Requests "
                                   "run in slices of --slice-cell-steps, the one with the least work left first (none "
                                   "passed over more than 4 turns in a row), so short ones are not stuck behind long "
                                   "ones.")
    p.add_argument("--model", required=True, help="model.onnx written by `scidiff export-onnx`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    p.add_argument("--max-cells", type=int, default=10_000, help="cap on n per request")
    p.add_argument("--max-steps", type=int, default=1000,
                   help="cap on sampler steps per request (the model's timesteps cap them too)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted (413 above it; default 1 MiB)")
    p.add_argument("--max-batch-cells", type=int, default=4096,
                   help="stop merging waiting requests into one run at this many cells")
    p.add_argument("--slice-cell-steps", type=int, default=2048,
                   help="scheduler slice: at most this many cells x sampler steps run before the next request's turn")
    p.add_argument("--window-ms", type=float, default=2.0, help="how long the idle batcher waits for more requests")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")


def _check_serve_args(args):
    """Refuse nonsensical serve settings before anything is loaded or bound, naming the flag."""
    import math

    for flag in ("max_cells", "max_steps", "max_body_bytes", "max_batch_cells", "slice_cell_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must lie in [0, 65535], got {args.port}")
    if not (math.isfinite(args.window_ms) and args.window_ms >= 0):
        raise ValueError(f"--window-ms must be a finite number >= 0, got {args.window_ms}")


def run(args):
    from ..export.runtime import OnnxSampler  # lazy: keeps --help light (onnxruntime)
    from ..export.server import listen, serve  # lazy: keeps --help light (fastapi)

    _check_serve_args(args)
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"no ONNX model at {args.model!r}; write one with `scidiff export-onnx`")
    if os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is a folder; pass the model.onnx written by `scidiff export-onnx`")
    sock = listen(args.host, args.port)
    try:
        try:
            sampler = OnnxSampler(args.model, device=args.device, threads=args.threads)
        except (FileNotFoundError, KeyError, ValueError):
            raise
        except Exception as exc:  # onnxruntime's own errors (a file that is not an ONNX graph, no CUDA, ...)
            raise ValueError(f"cannot load --model {args.model!r}: {type(exc).__name__}: {str(exc)[:500]}") from None
        serve(sampler, args.host, args.port, max_cells=args.max_cells, max_batch_cells=args.max_batch_cells,
              window_ms=args.window_ms, max_body_bytes=args.max_body_bytes, max_steps=args.max_steps,
              slice_cell_steps=args.slice_cell_steps, sock=sock)
    finally:
        sock.close()
