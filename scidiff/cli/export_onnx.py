"""``scidiff export-onnx``: a trained model as ONNX (with its sidecar) for serving without PyTorch."""
from __future__ import annotations

from ..diffusion.plans import DEFAULT_SAMPLER, DEFAULT_STEPS
from .common import check_out, nonnegative_float, positive_int, sampling_settings


def add(sub):
    p = sub.add_parser("export-onnx", help="export a trained model to ONNX for serving without PyTorch",
                       description="Write MODEL.onnx (the guided denoiser, dynamic batch), its sidecar MODEL.json "
                                   "(genes, normalisation, vocabularies, noise schedule, default sampler) and, for "
                                   "latent models, MODEL.decoder.npz.")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--sampler", default=None, choices=["ddim", "dpmpp_2m", "distilled"],
                   help=f"default sampler recorded for clients (default: the run's config, else {DEFAULT_SAMPLER}); "
                        "distilled exports the model's distilled student (scidiff distil), which then samples in "
                        "its own steps only")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"default steps (default: the run's config, else {DEFAULT_STEPS})")
    p.add_argument("--eta", type=nonnegative_float, default=None, help="DDIM eta in [0, 1]")
    p.add_argument("--guidance", type=nonnegative_float, default=None, help="default classifier-free guidance scale")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset, 18 or above (default: the exporter's)")


def run(args):
    from ..export.onnx import SAMPLER_NAMES, check_opset, export_onnx  # lazy: keeps --help light (torch, onnx)
    from ..training import load_model  # lazy: keeps --help light (torch)

    if not args.out.endswith(".onnx"):
        raise ValueError(f"--out must end with .onnx, got {args.out!r}")
    check_out(args.out)  # a folder in the way or no permission: refused before the model is traced
    try:
        check_opset(args.opset)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None
    model = load_model(args.model)
    settings = sampling_settings(args)  # the flags, else the run's config.yaml, else the defaults
    if settings["sampler"] not in SAMPLER_NAMES:
        settings["sampler"] = DEFAULT_SAMPLER  # a run configured for a sampler the ONNX runtime lacks
    result = export_onnx(model, args.out, opset=args.opset, **settings)
    for k in ("onnx", "sidecar", "decoder"):
        if k in result:
            print(f"wrote {result[k]}")
    if result.get("max_abs_error") is not None:
        print(f"onnxruntime vs torch max abs error: {result['max_abs_error']:.2e}")
