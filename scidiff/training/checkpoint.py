"""Checkpoints: one file holds everything needed to sample (weights, model config, genes,
normalisation, scaling, covariate vocabularies). Files are written to a temporary name and
renamed, and read with ``torch.load(weights_only=True)``: nothing is unpickled."""
from __future__ import annotations

import json
import os

import torch

from ..data.io import atomic_path

FORMAT = "scidiff.checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.pt"


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename."""
    atomic_path(path, lambda tmp: torch.save(obj, tmp))


def model_payload(model, state_dict=None) -> dict:
    from .. import __version__

    spec = model.data_spec.to_dict() if model.data_spec is not None else None
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "scidiff_version": __version__,
            "config": json.dumps(model.config()), "data_spec": json.dumps(spec),
            "state_dict": {k: v.detach().cpu() for k, v in (state_dict or model.state_dict()).items()}}


def save_model(model, path, state_dict=None, **extra) -> str:
    """Write ``model`` (or its weights ``state_dict``, e.g. EMA) to ``path``; a folder gets
    ``model.pt`` inside. Extra entries (training state) must be tensors or plain Python values."""
    path = os.fspath(path)
    if os.path.isdir(path) or not path.endswith((".pt", ".pth", ".ckpt")):
        path = os.path.join(path, MODEL_FILE)
    atomic_torch_save({**model_payload(model, state_dict), **extra}, path)
    return path


def read_checkpoint(path) -> dict:
    """Load and validate a checkpoint dict; clear errors for missing, corrupt or foreign files."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path!r} is not a readable scidiff checkpoint (corrupt or not a torch file): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a scidiff checkpoint (no '{FORMAT}' format tag)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path!r} was written by a newer scidiff (format {payload['format_version']})")
    payload["path"] = path
    return payload


def load_model(path, map_location="cpu", genes=None):
    """A :class:`scidiff.models.ScIDiffModel` from a checkpoint file or run folder, in eval mode.
    With ``genes``, the checkpoint must have been trained on exactly these genes."""
    from ..data.spec import DataSpec
    from ..models import ScIDiffModel

    payload = read_checkpoint(path)
    config = json.loads(payload["config"])
    spec = json.loads(payload["data_spec"])
    spec = DataSpec.from_dict(spec) if spec else None
    if genes is not None:
        if spec is None:
            raise ValueError(f"{payload['path']!r} carries no gene list to check against")
        DataSpec(gene_names=[str(g) for g in genes]).check_same_genes(spec, what=repr(payload["path"]))
    model = ScIDiffModel(**config, data_spec=spec)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{payload['path']!r} does not match its own model config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(map_location).eval()
