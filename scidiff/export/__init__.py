"""Deployment: ONNX export (:mod:`scidiff.export.onnx`, needs torch), a sampler on numpy +
onnxruntime alone (:mod:`scidiff.export.runtime`, never imports torch) and an HTTP generation
server (:mod:`scidiff.export.server`). Names are loaded on first use, so importing this package
(or the runtime) does not import torch."""
from __future__ import annotations

import importlib

_NAMES = {"export_onnx": "onnx", "sidecar_path": "onnx", "decoder_path": "onnx",
          "OnnxSampler": "runtime", "load_sidecar": "runtime", "ddim": "runtime", "dpmpp_2m": "runtime",
          "create_app": "server", "serve": "server"}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
