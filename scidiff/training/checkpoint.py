"""Checkpoints: one file holds everything needed to sample (weights, model config, genes,
normalisation, scaling, covariate vocabularies). Files are written to a temporary name and
renamed, and read with ``torch.load(weights_only=True)``: nothing is unpickled."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil

import torch

from .. import __version__
from ..checks import warn
from ..data.io import atomic_path, remove_dead_writers_files, user_path
from ..data.spec import DataSpec
from ..diffusion.distillation import Student
from ..models import ScIDiffModel
from ..models.perturbation_prior import PerturbationPrior
from ..ops.device import resolve_device

FORMAT = "scidiff.checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_DIR = "checkpoints"
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"S{obj!r}".encode())


def payload_digest(payload: dict) -> str:
    """SHA-256 over a checkpoint's contents (every tensor's bytes, dtype and shape, and every
    plain value), leaving out the ``"digest"`` entry itself."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k not in ("digest", "path")})
    return h.hexdigest()


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed: a
    crash at any moment leaves either the old file or the complete new one at ``path``."""
    def write(tmp):
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_path(path, write)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


PRIOR_ENTRY = "perturbation_prior"
STUDENT_ENTRY = "student"


# the prefix a wrapper gives every key of its state dict: torch.compile's, (Distributed)DataParallel's
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def unwrap_model(model):
    """The model inside ``torch.compile``'s and (Distributed)DataParallel's wrappers (``model``
    itself when it is not wrapped)."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def unwrapped_state(state):
    """A state dict without the prefix a wrapper put on every key (``_orig_mod.``, ``module.``,
    nested ones too): the weights of the model inside, as its own ``state_dict`` names them."""
    while isinstance(state, dict) and state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(isinstance(k, str) and k.startswith(p) for k in state)),
                      None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def model_payload(model, state_dict=None) -> dict:
    """A model's checkpoint entries: config, data spec, weights and, when the model carries them,
    its perturbation prior (:class:`~scidiff.models.perturbation_prior.PerturbationPrior`, as
    tensors and plain values under ``"perturbation_prior"``) and its distilled student
    (:class:`~scidiff.diffusion.distillation.Student`, under ``"student"``). A ``torch.compile``'d
    or (Distributed)DataParallel model is saved as the model inside (no ``_orig_mod.`` or
    ``module.`` in the weights' names), so that it loads into a plain model anywhere."""
    model = unwrap_model(model)
    spec = model.data_spec.to_dict() if model.data_spec is not None else None
    state = unwrapped_state(state_dict or model.state_dict())
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "scidiff_version": __version__,
               "config": json.dumps(model.config()), "data_spec": json.dumps(spec),
               "state_dict": {k: v.detach().cpu() for k, v in state.items()}}
    prior = getattr(model, "perturbation_prior", None)
    if prior is not None:
        payload[PRIOR_ENTRY] = prior.to_state()
    student = getattr(model, "student", None)
    if student is not None:
        payload[STUDENT_ENTRY] = student.to_state()
    return payload


def save_model(model, path, state_dict=None, **extra) -> str:
    """Write ``model`` (or its weights ``state_dict``, e.g. EMA) to ``path``; a folder gets
    ``model.pt`` inside. Extra entries (training state) must be tensors or plain Python values."""
    path = user_path(path)
    if os.path.isdir(path) or not path.endswith((".pt", ".pth", ".ckpt")):
        path = os.path.join(path, MODEL_FILE)
    payload = {**model_payload(model, state_dict), **extra}
    payload["digest"] = payload_digest(payload)
    atomic_torch_save(payload, path)
    return path


def save_student(path, student: Student, out=None) -> str:
    """Store ``student`` in the checkpoint at ``path`` beside its teacher (replacing any student
    there), every other entry kept as it was; written atomically to ``out`` (default: ``path``
    itself). Returns the path written."""
    payload = read_checkpoint(path)
    out = os.fspath(out) if out is not None else payload["path"]
    payload = {k: v for k, v in payload.items() if k != "path"}
    payload[STUDENT_ENTRY] = student.to_state()
    payload["digest"] = payload_digest(payload)
    atomic_torch_save(payload, out)
    return out


UNTRUSTED_ADVICE = ("never load a checkpoint you do not trust with torch.load(weights_only=False): unpickling "
                    "it can run arbitrary code")


def _load_weights_only(path: str):
    """``torch.load(path, weights_only=True)``, or a ValueError in scidiff's own words: torch's
    message for a refused file advises ``weights_only=False``, which no user should follow for
    a file they did not write, so none of its text is passed on (nor chained)."""
    import pickle
    import zipfile

    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder, not a checkpoint file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not a readable scidiff checkpoint: not a complete torch file "
                         f"(truncated, corrupt, or another kind of file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        problem = ValueError(f"{path!r} is not a readable scidiff checkpoint: it holds Python objects beyond "
                             f"tensors and plain values (a foreign or tampered file), which scidiff refuses to "
                             f"unpickle; {UNTRUSTED_ADVICE}")
    except Exception as exc:  # a zip archive torch cannot read: damaged inside
        problem = ValueError(f"{path!r} is not a readable scidiff checkpoint: the torch archive is damaged "
                             f"({type(exc).__name__})")
    raise problem


def _no_model_hint(folder: str) -> str:
    """What to load from a folder without ``model.pt``: a run that has not finished (its newest
    training checkpoint, ``checkpoint.pt`` or, where only they were copied, ``checkpoints/step-*.pt``)
    or a run's ``checkpoints`` folder itself (its newest file, or the run folder)."""
    latest = os.path.join(folder, CHECKPOINT_FILE)
    steps = list_checkpoints(folder)
    if os.path.exists(latest) or steps:
        latest = latest if os.path.exists(latest) else steps[-1][1]
        return (f": the run has not finished; its latest training checkpoint is {latest!r} (load that file, or "
                f"resume the run)")
    steps = sorted((int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
                   for m in [_STEP_FILE.match(name)] if m)
    if not steps:
        return ""
    run = os.path.dirname(os.path.abspath(folder))
    finished = (f", or the run folder {run!r} for its finished model" if os.path.exists(os.path.join(run, MODEL_FILE))
                else "")
    return (f": {folder!r} holds a run's training checkpoints; give one of its files (the newest is "
            f"{steps[-1][1]!r}){finished}")


def read_checkpoint(path) -> dict:
    """Load and validate a checkpoint dict; clear errors for missing, corrupt or foreign files. ``~``
    is the home folder."""
    path = user_path(path)
    folder = path if os.path.isdir(path) else None
    if folder is not None:
        path = os.path.join(path, MODEL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}{_no_model_hint(folder) if folder is not None else ''}")
    payload = _load_weights_only(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a scidiff checkpoint (no '{FORMAT}' format tag)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path!r} was written by a newer scidiff (format {payload['format_version']})")
    if "digest" in payload and payload_digest(payload) != payload["digest"]:
        raise ValueError(f"{path!r} is corrupt: its contents do not match the SHA-256 digest written with it")
    payload["path"] = path
    return payload


def load_model(path, map_location="cpu", genes=None):
    """A :class:`scidiff.models.ScIDiffModel` from a checkpoint file or run folder, in eval mode.
    ``map_location``: the device it is put on (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a
    ``torch.device``; ``"auto"``: CUDA if present; CUDA or MPS where there is none: the CPU, with a
    warning). With ``genes``, the checkpoint must have been trained on exactly these genes."""
    payload = read_checkpoint(path)
    try:
        config = json.loads(payload["config"])
        spec = json.loads(payload["data_spec"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{payload['path']!r} lacks a readable model config or data spec") from None
    spec = DataSpec.from_dict(spec) if spec else None
    if genes is not None:
        if spec is None:
            raise ValueError(f"{payload['path']!r} carries no gene list to check against")
        DataSpec(gene_names=[str(g) for g in genes]).check_same_genes(spec, what=repr(payload["path"]))
    try:
        model = ScIDiffModel(**config, data_spec=spec)
    except TypeError as exc:  # a config with other keys: written by another (newer) scidiff
        raise ValueError(f"{payload['path']!r} holds a model config this scidiff cannot build ({exc})") from None
    # a file saved from a compiled or DDP-wrapped model by an older scidiff: its weights' names carry the prefix
    missing, unexpected = model.load_state_dict(unwrapped_state(payload["state_dict"]), strict=False)
    # saved before perturbation combinations had a learned term (its zero init is that model), or
    # before the detection model (left unfitted: observed expression then asks for fit_detection)
    missing = [k for k in missing if not k.startswith(("condition_encoder.interaction.", "detection."))]
    if missing or unexpected:
        raise ValueError(f"{payload['path']!r} does not match its own model config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.perturbation_prior = None  # a checkpoint written without one (or before priors existed)
    if payload.get(PRIOR_ENTRY) is not None:
        try:
            model.perturbation_prior = PerturbationPrior.from_state(payload[PRIOR_ENTRY])
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"{payload['path']!r} holds a perturbation prior this scidiff cannot read "
                             f"({type(exc).__name__}: {exc})") from None
        if spec is not None and model.perturbation_prior.genes != list(spec.gene_names):
            raise ValueError(f"{payload['path']!r} holds a perturbation prior over other genes than its model's")
    model.student = _read_student(payload, model)
    device = resolve_device(map_location)  # "auto"; "cuda" without CUDA falls back to the CPU with a warning
    model = model.to(device).eval()
    if model.student is not None:
        model.student = model.student.to(device)
    return model


def _read_student(payload: dict, model) -> Student | None:
    """The checkpoint's distilled student (``None`` for a checkpoint written without one)."""
    if payload.get(STUDENT_ENTRY) is None:
        return None
    try:
        student = Student.from_state(payload[STUDENT_ENTRY])
        student.check_fits(model)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{payload['path']!r} holds a distilled student this scidiff cannot use "
                         f"({type(exc).__name__}: {exc})") from None
    return student


# -- training checkpoints ------------------------------------------------------------------------
def write_training_checkpoint(payload: dict, folder, step: int, keep: int = 1) -> str:
    """Write a training checkpoint into run folder ``folder`` and return its path.

    ``keep == 1``: one file, ``folder/checkpoint.pt``, replaced atomically. ``keep > 1``: the
    file goes to ``folder/checkpoints/step-<step>.pt``, ``checkpoint.pt`` becomes a hard link to
    it (a copy where links are not supported), and only the newest ``keep`` step files remain.
    Every file carries a SHA-256 digest of its contents, checked on load.

    Step files this run cannot have written before this one are removed, so that resuming (which
    prefers step files, newest first) finds this checkpoint: those of a later step (a previous
    run trained into the same folder, or the steps after the checkpoint a run resumed from), and
    with ``keep == 1`` all of them (``checkpoint.pt`` is then the newest)."""
    folder = os.fspath(folder)
    payload = dict(payload)
    payload["digest"] = payload_digest(payload)
    latest = os.path.join(folder, CHECKPOINT_FILE)
    if keep <= 1:
        atomic_torch_save(payload, latest)
        for _, old in list_checkpoints(folder):
            os.remove(old)
        return latest
    path = os.path.join(folder, CHECKPOINT_DIR, f"step-{int(step):09d}.pt")
    atomic_torch_save(payload, path)
    tmp = os.path.join(folder, f".tmp-link-{os.getpid()}.pt")
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, latest)
    _fsync_dir(folder)
    ours = []
    for other, old in list_checkpoints(folder):
        if other > int(step):
            os.remove(old)
        else:
            ours.append(old)
    for old in ours[:-keep]:
        os.remove(old)
    return path


def list_checkpoints(folder) -> list[tuple[int, str]]:
    """``(step, path)`` of the step files in ``folder/checkpoints``, oldest first."""
    out = []
    for path in glob.glob(os.path.join(os.fspath(folder), CHECKPOINT_DIR, "step-*.pt")):
        m = _STEP_FILE.match(os.path.basename(path))
        if m:
            out.append((int(m.group(1)), path))
    return sorted(out)


def remove_partial_files(folder) -> list[str]:
    """Delete temporary files a killed writer left in run folder ``folder`` (never complete
    checkpoints, nor the temporaries of a writer still running); returns their paths."""
    folder = os.fspath(folder)
    return [path for where in (folder, os.path.join(folder, CHECKPOINT_DIR))
            for path in remove_dead_writers_files(where, lambda target: target.endswith(".pt"))]


def read_training_checkpoint(path) -> dict:
    """A validated training checkpoint (format tag, digest, training state present). ``path``: a
    checkpoint file, or a run folder: its newest readable checkpoint (step files newest first,
    then ``checkpoint.pt``); unreadable ones are skipped with a warning that names them."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidates = [p for _, p in reversed(list_checkpoints(path))]
        if os.path.exists(os.path.join(path, CHECKPOINT_FILE)):
            candidates.append(os.path.join(path, CHECKPOINT_FILE))
        if not candidates:
            raise FileNotFoundError(f"no training checkpoint in {path!r} (looked for {CHECKPOINT_FILE} and "
                                    f"{CHECKPOINT_DIR}/step-*.pt)")
        errors = []
        for candidate in candidates:
            try:
                return read_training_checkpoint(candidate)
            except ValueError as exc:
                errors.append(str(exc))
                warn(f"skipping unreadable checkpoint: {exc}")
        raise ValueError(f"no readable training checkpoint in {path!r}: " + "; ".join(errors))
    payload = read_checkpoint(path)
    missing = [k for k in ("trainer", "live_state_dict", "optimizer", "ema", "step", "epoch") if k not in payload]
    if missing:
        raise ValueError(f"{path!r} holds no training state to resume from (missing {missing}); "
                         f"it is a model file, or was written by an older scidiff")
    return payload
