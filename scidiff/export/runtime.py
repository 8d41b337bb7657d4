"""Sampling from an exported model on numpy + onnxruntime alone: this module never imports torch.

``OnnxSampler("model.onnx")`` reads the graph, its sidecar ``model.json`` and, for latent models,
``model.decoder.npz`` (see :mod:`scidiff.export.onnx` for the format), and generates cells by
label with DDIM or DPM-Solver++(2M), classifier-free guidance and a seed. The samplers are plain
functions over a numpy denoiser ``denoiser(x, t) -> x0_hat``, the same seam as
:mod:`scidiff.diffusion.samplers`, and walk the same plans (:mod:`scidiff.diffusion.plans`, torch-
free: the same grid and coefficients, the same walker), so the same ``x_T`` gives the same cells.
Where the export carries a fitted detection model, cells come back measured (sparse) by default,
through :func:`measure`, the numpy twin of
:meth:`~scidiff.models.observation.DetectionModel.measure`; ``observed=False`` gives the smooth
expression.

Execution provider: CUDA with IO binding when onnxruntime-gpu *and* a working GPU are present,
CPU otherwise. onnxruntime-gpu lists ``CUDAExecutionProvider`` even on machines without a GPU, so
the GPU is detected by asking the NVIDIA driver for devices and then checking which provider the
created session actually uses.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import operator
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..diffusion.plans import (DEFAULT_SAMPLER, DEFAULT_STEPS, PlanStep, logsnr_timesteps, sampler_plan, step_update,
                               timesteps, walk)
from ..groups import carrying, mixture

MAX_KEPT_CONDITIONS = 1024  # conditions whose training groups a sampler keeps between requests

__all__ = ["Batch", "OnnxSampler", "Plan", "Trajectory", "ddim", "dpmpp_2m", "load_sidecar", "logsnr_timesteps",
           "make_session", "measure", "sampler_name", "timesteps"]

SIDECAR_FORMAT = "scidiff.onnx"
SAMPLERS = ("ddim", "dpmpp_2m", "distilled")  # an export offers ddim + dpmpp_2m (teacher) or distilled (student)
_ALIASES = {"dpm-solver++": "dpmpp_2m", "dpmpp": "dpmpp_2m", "dpm_solver_pp": "dpmpp_2m"}

NumpyDenoiser = Callable[[np.ndarray, int], np.ndarray]
MAX_SEED = 2**63 - 1  # seeds are int64 in the server's npz and the h5ad's uns


# -- arguments -----------------------------------------------------------------------------------
def _shown(value) -> str:
    """``repr(value)`` cut to 60 characters (errors never echo a long input back)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int, refused (naming ``name``) unless an integer (a Python or numpy
    integer; not a bool, a float such as ``2.5`` or ``2.0``, nor a string) in ``[low, high]``."""
    if isinstance(value, (bool, np.bool_)) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an integer, got {_shown(value)}")
    try:
        value = operator.index(value)
    except TypeError:  # an integer array of more than one value
        raise ValueError(f"{name} must be an integer, got {_shown(value)}") from None
    if high is None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def _number(name: str, value) -> float:
    """``value`` as a float, refused (naming ``name``) unless a real number (not a bool or a string)."""
    try:
        if isinstance(value, (bool, np.bool_, str, bytes)):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {_shown(value)}") from None


def _as_condition(condition) -> dict:
    """A condition as a dict (``None``: none), each value one label or a list of labels (a 0-d
    array is one label; a numpy array, pandas Series or Categorical of labels a list)."""
    if condition is None:
        return {}
    if not isinstance(condition, Mapping):
        raise ValueError(f"condition must be a dict of covariate -> label (e.g. {{'cell_type': 'B'}}), "
                         f"got {_shown(condition)}")
    out = {}
    for key, value in condition.items():
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        elif isinstance(value, (str, bytes, Mapping)) or not (hasattr(value, "__len__") and hasattr(value, "__iter__")):
            pass  # one label (or code, or number)
        elif np.ndim(value) > 1:
            raise ValueError(f"condition {key!r} must be one label or a list of labels, one per cell; "
                             f"got an array of shape {np.shape(value)}")
        else:
            value = [v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v for v in value]
        out[key] = value
    return out


# -- samplers: diffusion's plans, walked over numpy arrays ----------------------------------------
def _sample(name: str, denoiser: NumpyDenoiser, x_T: np.ndarray, alphas_cumprod, steps: int | None, eta: float = 0.0,
            noise: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
    plan = Plan(name, alphas_cumprod, steps, eta)
    if plan.eta > 0 and noise is None:
        raise ValueError("DDIM with eta > 0 needs a noise source")
    return walk(plan.steps, x_T, lambda x, t, i: denoiser(x, t),
                noise=None if noise is None else (lambda i, like: noise(i)))


def ddim(denoiser: NumpyDenoiser, x_T: np.ndarray, alphas_cumprod, steps: int | None = 50, *,
         eta: float = 0.0, noise: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) over an x0-predicting denoiser
    (:func:`~scidiff.diffusion.plans.ddim_plan`). ``eta=0`` is the deterministic probability-flow
    sampler; ``noise(i)`` supplies the step-``i`` noise when ``eta > 0``."""
    return _sample("ddim", denoiser, x_T, alphas_cumprod, steps, eta, noise)


def dpmpp_2m(denoiser: NumpyDenoiser, x_T: np.ndarray, alphas_cumprod, steps: int | None = 20, **_) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) on timesteps evenly spaced in log-SNR
    (:func:`~scidiff.diffusion.plans.dpmpp_2m_plan`)."""
    return _sample("dpmpp_2m", denoiser, x_T, alphas_cumprod, steps)


class Plan:
    """A sampler's plan (:func:`~scidiff.diffusion.plans.sampler_plan`) for one run: its steps,
    their timesteps ``ts``, and :meth:`update`, which applies step ``i`` to any subset of the
    cells (every operation is per cell), so a run can be advanced a step, or a block of cells of
    a step, at a time (:class:`Trajectory`) and give the same points as the whole walk
    (:func:`ddim`, :func:`dpmpp_2m`)."""

    def __init__(self, name: str, alphas_cumprod, steps: int | None, eta: float = 0.0, final_sigma: float = 0.0):
        self.name = sampler_name(name)
        self.eta = float(eta) if self.name == "ddim" else 0.0
        self.steps: list[PlanStep] = sampler_plan(self.name, alphas_cumprod, steps, eta=self.eta,
                                                  final_sigma=final_sigma)
        self.ts = [st.t for st in self.steps]

    def __len__(self) -> int:
        return len(self.steps)

    def needs_noise(self, i: int) -> bool:
        """Whether step ``i`` adds fresh noise (DDIM with ``eta > 0``, every step but the last)."""
        return self.steps[i].noise_coef > 0

    def update(self, i: int, x: np.ndarray, x0: np.ndarray, x0_prev: np.ndarray | None,
               noise: np.ndarray | None) -> np.ndarray:
        """Step ``i`` for cells ``x`` given the network's ``x0`` for them (and, for DPM-Solver++,
        their previous step's ``x0``; for DDIM with ``eta > 0``, their step noise)."""
        return step_update(self.steps[i], x, x0, x0_prev, noise)


SAMPLER_FUNCTIONS = {"ddim": ddim, "dpmpp_2m": dpmpp_2m}


def sampler_name(name: str | None, default: str = DEFAULT_SAMPLER) -> str:
    """Canonical sampler name, accepting ``dpm-solver++`` for ``dpmpp_2m``."""
    name = _ALIASES.get(str(name).lower(), str(name).lower()) if name else default
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)} (or 'dpm-solver++')")
    return name


# -- measured cells -----------------------------------------------------------------------------
def measure(tables: dict[str, np.ndarray], smooth: np.ndarray, detect_u: np.ndarray,
            level_u: np.ndarray) -> np.ndarray:
    """:meth:`DetectionModel.measure <scidiff.models.observation.DetectionModel.measure>` in
    numpy, in the same float32 operations: the measured profile ``[N, G]`` of smooth expression
    ``[N, G]`` given uniforms ``detect_u`` and ``level_u`` ``[N, G]``, from the exported
    ``tables`` (``detection_centres``, ``detection_rate``, ``detection_levels``; an export
    without centres, written before they were kept, reads between the midpoints of
    ``detection_edges``)."""
    rate, levels = tables["detection_rate"], tables["detection_levels"]
    centres = tables.get("detection_centres")
    if centres is None:
        edges = tables["detection_edges"]
        centres = (edges[:, :-1] + edges[:, 1:]) * np.float32(0.5)
    centres, smooth = np.asarray(centres, np.float32), np.asarray(smooth, np.float32)
    bins, q = rate.shape[1], levels.shape[2]
    genes = np.arange(smooth.shape[1])
    count = np.zeros(smooth.shape, np.int64)  # the centres at or below each value
    for k in range(bins):
        count += smooth >= centres[:, k]
    k = np.clip(count - 1, 0, max(bins - 2, 0))
    k1 = np.minimum(k + 1, bins - 1)
    c0 = centres[genes, k]
    gap = centres[genes, k1] - c0
    with np.errstate(invalid="ignore"):
        t = (smooth - c0) / np.where(gap > 0, gap, np.float32(1))
        w = np.where(gap > 0, np.where(t < 0, np.float32(0), np.where(t > 1, np.float32(1), t)), np.float32(0))
    r0 = rate[genes, k]
    p = r0 + w * (rate[genes, k1] - r0)
    v = np.asarray(level_u, np.float32) * np.float32(q - 1)
    lo = np.minimum(np.floor(v).astype(np.int64), q - 2)
    frac = v - lo.astype(np.float32)

    def level_of(b):
        left, right = levels[genes, b, lo], levels[genes, b, lo + 1]
        return left + frac * (right - left)

    l0 = level_of(k)
    level = l0 + w * (level_of(k1) - l0)
    with np.errstate(invalid="ignore"):
        return np.where(np.asarray(detect_u, np.float32) < p, level, np.float32(0)).astype(np.float32)


# -- GPU detection ----------------------------------------------------------------------------
def cuda_device_count() -> int:
    """GPUs the NVIDIA driver reports (``cuInit`` + ``cuDeviceGetCount`` through libcuda); 0 when
    there is no driver or no device. Independent of what onnxruntime claims to support."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return int(count.value)
        except AttributeError:
            return 0
    return 0


def make_session(path: str, device: str = "auto", threads: int | None = None):
    """An onnxruntime session on CUDA when a GPU is really usable, else on CPU; returns
    ``(session, device_type)`` with ``device_type`` ``"cuda"`` or ``"cpu"``.

    CUDA is tried only when the driver reports a device and the installed onnxruntime has the
    CUDA provider, and kept only if the created session actually runs on it (a missing CUDA or
    cuDNN library makes onnxruntime fall back to CPU silently)."""
    import onnxruntime as ort

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {_shown(device)}")
    threads = None if threads is None else _integer("threads", threads, 0)
    so = ort.SessionOptions()
    if threads:  # 0 or None: onnxruntime's choice
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    why = None
    if device in ("auto", "cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            why = "this onnxruntime has no CUDA provider (install scidiff[gpu], i.e. onnxruntime-gpu)"
        elif cuda_device_count() < 1:
            why = "the NVIDIA driver reports no GPU"
        else:
            sess = ort.InferenceSession(path, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            if sess.get_providers()[0] == "CUDAExecutionProvider":
                return sess, "cuda"
            why = "onnxruntime could not start its CUDA provider (CUDA/cuDNN libraries missing?)"
    if device == "cuda":
        raise RuntimeError(f"device='cuda' requested but {why}")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]), "cpu"


# -- the exported model -----------------------------------------------------------------------
def load_sidecar(path) -> dict:
    """The sidecar of ``model.onnx`` (``model.json``), or of the given ``.json``; checked."""
    path = os.fspath(path)
    if path.endswith((".pt", ".pth")) or os.path.isdir(path):
        raise ValueError(f"{path!r} is a PyTorch model or its run folder, not an ONNX export: export it first "
                         f"(scidiff export-onnx --model {path} --out model.onnx) and serve model.onnx")
    side = os.path.splitext(path)[0] + ".json" if path.endswith(".onnx") else path
    if not os.path.exists(side):
        raise FileNotFoundError(f"no sidecar {side!r} beside the ONNX model; export with `scidiff export-onnx`")
    try:
        with open(side) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{side!r} is not a readable scidiff ONNX sidecar: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{side!r} is not a scidiff ONNX sidecar (no '{SIDECAR_FORMAT}' format tag)")
    for key in ("onnx_file", "genes", "normalisation", "schedule", "covariates", "sampling", "inputs",
                "diffusion_dim"):
        if key not in meta:
            raise ValueError(f"{side!r} lacks the key {key!r}")
    _check_sidecar(meta, side)
    meta["_path"] = side
    return meta


def _check_sidecar(meta: dict, side: str) -> None:
    """The sidecar's parts the runtime reads, each present and of its kind: a hand-edited
    sidecar is refused naming the key, not a ``KeyError`` mid-sampling."""
    def need(where: str, value, kind, what: str):
        if not isinstance(value, kind):
            raise ValueError(f"{side!r}: {where} must be {what}, got {_shown(value)}; export the model again")

    need("'genes'", meta["genes"], list, "a list of gene names")
    for key in ("normalisation", "schedule", "sampling", "inputs"):
        need(repr(key), meta[key], dict, "an object")
    need("'covariates'", meta["covariates"], list, "a list")
    for part, keys in (("normalisation", ("gene_offset", "gene_scale")), ("schedule", ("alphas_cumprod",)),
                       ("inputs", ("x_t", "t", "cond_index", "guidance"))):
        for key in keys:
            if key not in meta[part]:
                raise ValueError(f"{side!r} lacks the key {part}.{key}; export the model again")
    for key in ("gene_offset", "gene_scale"):
        value = meta["normalisation"][key]
        if not isinstance(value, list) or len(value) != len(meta["genes"]):
            raise ValueError(f"{side!r}: normalisation.{key} must hold one value per gene ({len(meta['genes'])}), "
                             f"got {_shown(value)}; export the model again")
    need("'schedule.alphas_cumprod'", meta["schedule"]["alphas_cumprod"], list, "a list")
    if not meta["schedule"]["alphas_cumprod"]:
        raise ValueError(f"{side!r}: schedule.alphas_cumprod is empty; export the model again")
    for i, c in enumerate(meta["covariates"]):
        need(f"covariates[{i}]", c, dict, "an object")
        for key in ("key", "kind", "input", "size") + (("labels",) if c.get("kind") != "continuous" else ()):
            if key not in c:
                raise ValueError(f"{side!r}: covariates[{i}] ({c.get('key', '?')!r}) lacks the key {key!r}; "
                                 "export the model again")
        if c["kind"] not in ("categorical", "perturbation", "continuous"):
            raise ValueError(f"{side!r}: covariates[{i}] ({c['key']!r}) has the unknown kind {_shown(c['kind'])}")
        if c["kind"] != "continuous" and (not isinstance(c["labels"], list) or len(c["labels"]) != c["size"]):
            raise ValueError(f"{side!r}: covariates[{i}] ({c['key']!r}) must have {c['size']} labels (its size), "
                             f"got {_shown(c['labels'])}; export the model again")
    if meta.get("latent") and "file" not in meta["latent"]:
        raise ValueError(f"{side!r} lacks the key latent.file (the decoder's file); export the model again")


def sha256_of(path) -> str:
    """The SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Batch:
    """One sampling call's conditioning: a table of ``K`` distinct conditions, each cell's row
    ``index [B]``, per-row guidance, the ``B`` starting points and step noise, and the generator
    ``rng`` they come from (which then draws the cells' measurements)."""

    x_T: np.ndarray
    index: np.ndarray
    table: dict[str, np.ndarray]
    guidance: np.ndarray
    noise: Callable[[int], np.ndarray] | None = None
    obs: dict[str, list] = field(default_factory=dict)
    rng: np.random.Generator | None = None


class Trajectory:
    """One sampler run over a :class:`Batch` that can be advanced a slice at a time.

    ``advance(budget)`` runs whole steps over all cells while they fit in ``budget`` cell-steps (at
    least one network call); a step over more than ``budget`` cells is done in blocks of ``budget``
    cells, one block per call of ``advance``. Every update is per cell and each step's noise is
    drawn once, in step order, from the batch's own source, so the points at the end do not depend
    on how the run was sliced: ``advance(None)`` (what :meth:`OnnxSampler.run` does) runs it whole.
    """

    def __init__(self, sampler: "OnnxSampler", batch: Batch, name: str, steps: int | None, eta: float = 0.0):
        self.sampler, self.batch = sampler, batch
        self.plan = Plan(name, sampler.alphas_cumprod, steps, eta, sampler.final_sigma)
        if self.plan.eta > 0 and batch.noise is None:
            raise ValueError("DDIM with eta > 0 needs a noise source")
        self.x = batch.x_T
        self.n = len(batch.x_T)
        self.step = 0    # the step in progress
        self.first = 0   # its first cell not yet updated
        self.calls = 0   # network calls so far
        self._x0_prev = None
        self._x0_next = None
        self._noise = None
        self._denoisers: dict[tuple[int, int], NumpyDenoiser] = {}

    @property
    def done(self) -> bool:
        return self.step >= len(self.plan)

    def _denoiser(self, lo: int, hi: int) -> NumpyDenoiser:
        if (lo, hi) not in self._denoisers:
            b = self.batch
            part = b if (lo, hi) == (0, self.n) else Batch(b.x_T[lo:hi], b.index[lo:hi], b.table, b.guidance)
            self._denoisers[(lo, hi)] = self.sampler._denoiser(part)
        return self._denoisers[(lo, hi)]

    def advance(self, budget: int | None = None) -> int:
        """Run about ``budget`` cell-steps (all that are left when ``None``); returns the network calls made."""
        if budget is not None:
            budget = _integer("budget", budget, 1)
        block = self.n if budget is None else min(self.n, budget)
        spent, calls = 0, 0
        while not self.done:
            lo = self.first
            hi = min(self.n, lo + block)
            if budget is not None and spent and spent + (hi - lo) > budget:
                break
            i, plan = self.step, self.plan
            if lo == 0 and plan.needs_noise(i):
                self._noise = np.asarray(self.batch.noise(i), np.float32)
            x = self.x[lo:hi] if hi - lo < self.n else self.x
            x0 = self._denoiser(lo, hi)(x, plan.ts[i])
            prev = None if self._x0_prev is None else self._x0_prev[lo:hi]
            new = plan.update(i, x, x0, prev, None if self._noise is None else self._noise[lo:hi])
            if hi - lo == self.n:  # the whole step at once
                self.x, x0_all = new, x0
            else:
                if lo == 0:  # a step in blocks: write into our own copies
                    self.x = np.array(self.x, np.float32, copy=True)
                    self._x0_next = np.empty((self.n,) + x0.shape[1:], x0.dtype)
                self.x[lo:hi] = new
                self._x0_next[lo:hi] = x0
                x0_all = self._x0_next if hi == self.n else None
            spent += hi - lo
            calls += 1
            if hi < self.n:
                self.first = hi
                continue
            self.first, self.step, self._noise = 0, i + 1, None
            self._x0_prev = x0_all
            self._x0_next = None
        self.calls += calls
        return calls


class OnnxSampler:
    """Generate cells from an exported scidiff model with onnxruntime (no torch).

    Args:
        path: ``model.onnx`` written by :func:`scidiff.export.export_onnx` (sidecar beside it).
        device: ``"auto"`` (CUDA when really usable, else CPU), ``"cpu"`` or ``"cuda"``.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        io_binding: bind inputs and outputs to the device (default: on for CUDA).
        verify: check the files against the sidecar's SHA-256 sums.
    """

    def __init__(self, path, device: str = "auto", threads: int | None = None, io_binding: bool | None = None,
                 verify: bool = True):
        path = os.fspath(path)
        self.meta = meta = load_sidecar(path)
        folder = os.path.dirname(os.path.abspath(meta["_path"]))
        self.onnx_path = os.path.join(folder, meta["onnx_file"]) if path.endswith(".json") else path
        if not os.path.exists(self.onnx_path):
            raise FileNotFoundError(f"no ONNX model at {self.onnx_path!r}")
        if verify and meta.get("onnx_sha256") and sha256_of(self.onnx_path) != meta["onnx_sha256"]:
            raise ValueError(f"{self.onnx_path!r} does not match its sidecar {meta['_path']!r} (SHA-256 differs); "
                             "export the model again")
        self.genes = list(meta["genes"])
        self._carrying: dict = {}  # condition (encoded) -> the training groups that carry it
        norm = meta["normalisation"]
        self.gene_offset = np.asarray(norm["gene_offset"], np.float32)
        self.gene_scale = np.asarray(norm["gene_scale"], np.float32)
        self.alphas_cumprod = np.asarray(meta["schedule"]["alphas_cumprod"], np.float64)
        self.num_timesteps = len(self.alphas_cumprod)
        self.covariates = list(meta["covariates"])
        self.by_key = {c["key"]: c for c in self.covariates}
        pert = meta.get("perturbation") or {}
        self.control_labels = [str(v) for v in pert.get("control_labels", ["control", "ctrl"])]
        self.separator = pert.get("separator", "+")
        self.dim = _integer(f"{meta['_path']!r}: diffusion_dim", meta["diffusion_dim"], 1)
        self.decoder = self.detection = None
        if meta.get("latent"):
            dec = os.path.join(folder, meta["latent"]["file"])
            if not os.path.exists(dec):
                raise FileNotFoundError(f"the latent decoder {dec!r} named in {meta['_path']!r} is missing")
            if verify and meta["latent"].get("sha256") and sha256_of(dec) != meta["latent"]["sha256"]:
                raise ValueError(f"{dec!r} does not match its sidecar {meta['_path']!r} (SHA-256 differs)")
            with np.load(dec) as z:
                self.decoder = {k: np.ascontiguousarray(z[k], dtype=np.float32) for k in ("mean", "basis", "scale")}
                self.detection = self._detection_tables(z, dec)
            if self.decoder["basis"].shape != (self.dim, len(self.genes)):
                raise ValueError(f"the latent decoder {dec!r} has a basis of shape {self.decoder['basis'].shape}, "
                                 f"not ({self.dim}, {len(self.genes)}) as {meta['_path']!r} says; export again")
            self.decoder["scaled_basis"] = self.decoder["scale"][:, None] * self.decoder["basis"]
        elif self.dim != len(self.genes):
            raise ValueError(f"{meta['_path']!r}: diffusion_dim {self.dim} of a gene-space model must be its "
                             f"{len(self.genes)} genes; export the model again")
        self.session, self.device_type = make_session(self.onnx_path, device, threads)
        self.io_binding = (self.device_type == "cuda") if io_binding is None else bool(io_binding)
        names = {i.name for i in self.session.get_inputs()}
        wanted = ([meta["inputs"][k] for k in ("x_t", "t", "cond_index", "guidance")]
                  + [c["input"] for c in self.covariates])
        missing = [n for n in wanted if n not in names]
        if missing:
            raise ValueError(f"{self.onnx_path!r} lacks the inputs {missing} named in its sidecar")
        self.defaults = dict(meta["sampling"])
        self.final_sigma = float(self.defaults.pop("final_sigma", 0.0))  # exported before it existed: 0
        self.samplers = [sampler_name(v) for v in self.defaults.get("samplers", ("ddim", "dpmpp_2m"))]

    def _detection_tables(self, npz, path) -> dict[str, np.ndarray] | None:
        """The detection model's tables the sidecar names, from the decoder file (``None``
        when the export has none: a model without a fitted detection model, or an older export)."""
        names = (self.meta.get("detection") or {}).get("arrays")
        if not names:
            return None
        missing = [k for k in names if k not in npz]
        if missing:
            raise ValueError(f"{path!r} lacks the detection tables {missing} named in {self.meta['_path']!r}; "
                             "export the model again")
        return {k: np.ascontiguousarray(npz[k], dtype=np.float32) for k in names}

    # -- description ------------------------------------------------------------------------
    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def describe(self) -> dict:
        """Genes, vocabularies, defaults and versions (what ``GET /model`` returns)."""
        return {"genes": self.genes, "n_genes": len(self.genes),
                "conditions": {c["key"]: c["labels"] for c in self.covariates if c["kind"] != "continuous"},
                "continuous": [c["key"] for c in self.covariates if c["kind"] == "continuous"],
                "perturbations": [c["key"] for c in self.covariates if c["kind"] == "perturbation"],
                "samplers": list(self.samplers),
                "defaults": {k: v for k, v in self.defaults.items() if k != "samplers"},
                "num_timesteps": self.num_timesteps, "latent_dim": (self.meta.get("latent") or {}).get("dim"),
                "observed_available": self.detection is not None,
                "expression": self.expression_note(self.resolve_observed()),
                "version": self.meta.get("scidiff_version"), "providers": self.providers}

    # -- conditions -------------------------------------------------------------------------
    def _unknown_key(self, key):
        return KeyError(f"unknown condition key {key!r}; the model knows {list(self.by_key) or 'no covariates'}")

    def null_value(self, key: str):
        c = self.by_key[key]
        if c["kind"] == "categorical":
            return np.int64(c["size"])
        if c["kind"] == "perturbation":
            row = np.zeros(c["size"] + 1, np.float32)
            row[-1] = 1.0
            return row
        return np.float32("nan")

    def encode_value(self, key: str, value):
        """One label (or code, or number) of covariate ``key`` -> the graph's value, or a clear
        error naming the key and the known labels."""
        if key not in self.by_key:
            raise self._unknown_key(key)
        c = self.by_key[key]
        if value is None:
            return self.null_value(key)
        if c["kind"] == "continuous":  # a number (NaN: the null condition, as None)
            try:
                number = _number(key, value)
            except ValueError:
                raise ValueError(f"condition {key!r} is numeric; got {_shown(value)}") from None
            if math.isinf(number) or (math.isfinite(number) and abs(number) > float(np.finfo(np.float32).max)):
                raise ValueError(f"condition {key!r} must be a finite number (or None), got {number}")
            return np.float32(number)
        labels = c["labels"]
        if c["kind"] == "categorical":
            return np.int64(self._code(key, labels, value))
        row = np.zeros(c["size"] + 1, np.float32)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            row[self._code(key, labels, value)] = 1.0
            return row
        if str(value).strip() in self.control_labels:
            return row
        parts = [p.strip() for p in str(value).split(self.separator) if p.strip()]
        unseen = [p for p in parts if p not in labels and p not in self.control_labels]
        if unseen or not parts:
            raise ValueError(f"unknown perturbation {unseen or value!r} in {str(value)!r} for condition {key!r}; "
                             f"known single perturbations: {labels} (control: {self.control_labels})")
        for p in parts:
            if p in labels:
                row[labels.index(p)] = 1.0
        return row

    @staticmethod
    def _code(key, labels, value) -> int:
        """A label's code; an integer is taken as a code, and refused when it is also a different
        label (``3`` where the vocabulary has ``'3'`` elsewhere): pass the label as a string."""
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if 0 <= int(value) < len(labels) and str(value) in labels and labels.index(str(value)) != int(value):
                raise ValueError(f"ambiguous value {value} for condition {key!r}: it is the label {str(value)!r} and "
                                 f"the code of another label; pass labels as strings. Known values: {labels}")
            if 0 <= int(value) < len(labels):
                return int(value)
            if str(value) in labels:
                raise ValueError(f"{value} is no code for condition {key!r} ({len(labels)} values) but its label "
                                 f"{str(value)!r}: pass labels as strings. Known values: {labels}")
            raise ValueError(f"code {value} is out of range for condition {key!r} ({len(labels)} values)")
        if str(value) not in labels:
            folded = [v for v in labels if isinstance(value, str) and v.casefold() == value.strip().casefold()]
            hint = f"; did you mean {folded[0]!r}? (labels are case-sensitive)" if folded else ""
            raise ValueError(f"unknown value {_shown(value)} for condition {key!r}{hint}; known values: {labels}")
        return labels.index(str(value))

    def like_training(self, condition: dict | None, n: int, seed: int | None = 0) -> dict:
        """A condition that leaves covariates out (or none) as per-cell labels over the training
        groups that carry it, in their training proportions (:func:`scidiff.groups.mixture`,
        rounded from ``seed``), as ``scidiff sample`` draws them; as given where it names every
        covariate, holds per-cell lists, or the export carries no groups (older exports: the null
        condition fills in)."""
        condition = _as_condition(condition)
        if any(isinstance(v, list) for v in condition.values()):
            return condition
        groups = self.meta.get("training_groups") or {}
        asked = {k: self.encode_value(k, v).tobytes() for k, v in condition.items()}
        key = tuple(sorted(asked.items()))
        rows = self._carrying.get(key)  # kept in a local: another thread may clear the cache meanwhile
        if rows is None:  # the groups a condition keeps are read once (100,000 groups: 0.1 s)
            seen: dict = {}  # each distinct group value encoded once (a screen repeats its labels)

            def same(k, value, _) -> bool:
                if (k, value) not in seen:
                    seen[k, value] = self.encode_value(k, value).tobytes() == asked[k]
                return seen[k, value]

            if len(self._carrying) >= MAX_KEPT_CONDITIONS:
                self._carrying.clear()
            rows = self._carrying[key] = carrying(groups, condition, same)
        shares = mixture(groups, n, condition, None, seed, rows=rows)
        return {k: [c[k] for c, m in shares for _ in range(m)] for k in shares[0][0]} if shares else condition

    def _obs_label(self, key: str, value):
        """What ``obs`` records for a value: the number for a numeric covariate, else the label
        (the label a code stands for, never the code itself)."""
        c = self.by_key[key]
        if c["kind"] == "continuous":
            return None if value is None else float(value)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= int(value) < len(c["labels"]):
            return str(c["labels"][int(value)])
        return str(value)

    def condition_table(self, condition: dict | None, n: int):
        """Labels per covariate (one value, or a list of ``n``) -> ``(table, index, obs)``: the
        distinct conditions as graph inputs (``K`` rows), each cell's row, and labels per cell."""
        condition = _as_condition(condition)
        for key in condition:
            if key not in self.by_key:
                raise self._unknown_key(key)
        per_cell, obs = {}, {}
        for key, value in condition.items():
            values = value if isinstance(value, list) else [value]
            if len(values) not in (1, n):
                raise ValueError(f"condition {key!r} has {len(values)} values for {n} cells")
            encoded = [self.encode_value(key, v) for v in values]
            per_cell[key] = encoded if len(values) == n else encoded * n
            obs[key] = [self._obs_label(key, v) for v in (values if len(values) == n else values * n)]
        rows, index = {}, np.empty(n, np.int64)
        for i in range(n):
            sig = tuple(np.asarray(per_cell[k][i]).tobytes() for k in per_cell)
            index[i] = rows.setdefault(sig, len(rows))
        firsts = np.zeros(len(rows), np.int64)
        for i in range(n - 1, -1, -1):
            firsts[index[i]] = i
        table = {}
        for c in self.covariates:
            key = c["key"]
            if key in per_cell:
                table[key] = np.stack([np.asarray(per_cell[key][i]) for i in firsts])
            else:
                table[key] = np.stack([self.null_value(key)] * len(rows))
            table[key] = table[key].astype(np.int64 if c["kind"] == "categorical" else np.float32)
        return table, index, obs

    # -- the denoiser -----------------------------------------------------------------------
    def denoise(self, x: np.ndarray, t, index: np.ndarray, table: dict[str, np.ndarray],
                guidance: np.ndarray) -> np.ndarray:
        """One graph call: guided x0 for ``x [B, D]`` at timestep ``t`` (shared) or ``t [K]``."""
        k = len(guidance)
        t = np.full(k, int(t), np.int64) if np.ndim(t) == 0 else np.asarray(t, np.int64)
        feed = self._feed(index, table, guidance)
        feed[self.meta["inputs"]["x_t"]] = np.ascontiguousarray(x, np.float32)
        feed[self.meta["inputs"]["t"]] = t
        return self._run(feed)

    def _feed(self, index, table, guidance) -> dict:
        names = self.meta["inputs"]
        feed = {names["cond_index"]: np.ascontiguousarray(index, np.int64),
                names["guidance"]: np.ascontiguousarray(guidance, np.float32)}
        for c in self.covariates:
            feed[c["input"]] = np.ascontiguousarray(table[c["key"]])
        return feed

    def _run(self, feed: dict) -> np.ndarray:
        out = self.meta.get("output", "x0")
        if not self.io_binding:
            return self.session.run([out], feed)[0]
        import onnxruntime as ort

        io = self.session.io_binding()
        for name, arr in feed.items():
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, self.device_type, 0))
        io.bind_output(out, self.device_type)
        self.session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0]

    def _denoiser(self, batch: Batch) -> NumpyDenoiser:
        """The batch's constant inputs fixed once (on the device with IO binding): a
        ``denoiser(x, t)`` for the samplers."""
        names = self.meta["inputs"]
        feed = self._feed(batch.index, batch.table, batch.guidance)
        k = len(batch.guidance)
        if not self.io_binding:
            def run(x, t):
                return self.session.run([self.meta.get("output", "x0")],
                                        {**feed, names["x_t"]: np.ascontiguousarray(x, np.float32),
                                         names["t"]: np.full(k, int(t), np.int64)})[0]
            return run
        import onnxruntime as ort

        bound = {n: ort.OrtValue.ortvalue_from_numpy(a, self.device_type, 0) for n, a in feed.items()}
        out_name = self.meta.get("output", "x0")

        def run_bound(x, t):
            io = self.session.io_binding()
            for n, v in bound.items():
                io.bind_ortvalue_input(n, v)
            io.bind_cpu_input(names["x_t"], np.ascontiguousarray(x, np.float32))
            io.bind_cpu_input(names["t"], np.full(k, int(t), np.int64))
            io.bind_output(out_name, self.device_type)
            self.session.run_with_iobinding(io)
            return io.copy_outputs_to_cpu()[0]
        return run_bound

    # -- sampling ---------------------------------------------------------------------------
    def resolve_observed(self, observed: bool | None = None) -> bool:
        """Whether cells come back measured: ``observed`` when given; by default (``None``)
        when the export carries a detection model."""
        if observed is None:
            return self.detection is not None
        if not isinstance(observed, (bool, np.bool_)):  # 'false' would read as True
            raise ValueError(f"observed must be True, False or None (measured where the export can), "
                             f"got {_shown(observed)}")
        if observed and self.detection is None:
            side = os.path.basename(self.meta["_path"])
            raise ValueError(f"observed (measured) cells need a detection model, and the export {side!r} has none: "
                             "export a principal-axes model with a fitted detection model, or ask for smooth cells")
        return bool(observed)

    def resolve(self, sampler=None, steps=None, eta=None, guidance=None, observed=None) -> dict:
        """Defaults from the sidecar, validated; ``observed`` resolved by :meth:`resolve_observed`."""
        d = self.defaults
        side = os.path.basename(self.meta["_path"])
        try:
            name = sampler_name(sampler, d.get("sampler", DEFAULT_SAMPLER))
        except ValueError:  # name the samplers this export offers, not every one an export can have
            if not sampler:
                raise ValueError(f"the default sampler {_shown(d.get('sampler'))} in {side!r} is unknown; "
                                 f"pass sampler= one of {self.samplers}") from None
            raise ValueError(f"unknown sampler {str(sampler)[:60]!r}; this export offers {self.samplers}") from None
        if name not in self.samplers:
            what = ("a distilled student's export samples with 'distilled' only (export the model without "
                    "sampler='distilled' for the others)" if self.samplers == ["distilled"] else
                    "this export has no distilled student (export with sampler='distilled' for it)")
            raise ValueError(f"unknown sampler {name!r} for this export; choose one of {self.samplers}: {what}")
        if steps is not None:
            steps = _integer("steps", steps, 1, self.num_timesteps)
        if name == "distilled" and steps is not None and steps != int(d["steps"]):
            raise ValueError(f"the distilled student samples in exactly {d['steps']} steps, not {steps}")
        if steps is None:
            try:
                steps = _integer("steps", d.get("steps", DEFAULT_STEPS), 1, self.num_timesteps)
            except ValueError as exc:
                raise ValueError(f"the default steps in {side!r} are unusable ({exc}); pass steps=") from None
        eta = None if eta is None else _number("eta", eta)
        if name != "ddim" and eta is not None and eta != 0.0:  # as scidiff sample --eta refuses it
            raise ValueError(f"eta applies to the ddim sampler only, not {name!r}; got eta={eta}")
        eta = float(d.get("eta", 0.0) if eta is None or name != "ddim" else eta)
        if name != "ddim":
            eta = 0.0
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        guidance = _number("guidance", d.get("guidance_scale", 1.0) if guidance is None else guidance)
        if not abs(guidance) <= float(np.finfo(np.float32).max):  # the graph takes float32
            raise ValueError(f"guidance must be a finite number, got {guidance}")
        return {"sampler": name, "steps": steps, "eta": eta, "guidance": guidance,
                "observed": self.resolve_observed(observed)}

    def prepare(self, n: int, condition: dict | None = None, *, seed: int | None = None, guidance: float = 1.0,
                eta: float = 0.0, x_T: np.ndarray | None = None) -> Batch:
        """The inputs of one request: its condition table (covariates left out shared over the
        training groups, rounded from ``seed``: :meth:`like_training`) and, from ``seed``, its
        starting noise ``x_T``, step noise and then measurements (drawn in order from one
        ``numpy.random.default_rng(seed)``)."""
        n = _integer("n", n, 1)
        seed = None if seed is None else _integer("seed", seed, 0, MAX_SEED)
        if x_T is not None:
            x_T = np.asarray(x_T)
            if x_T.dtype.kind not in "iuf":
                raise ValueError(f"x_T must be an array of real numbers, got dtype {x_T.dtype}")
            if x_T.shape != (n, self.dim):
                raise ValueError(f"x_T must have shape {(n, self.dim)} (n cells x the model's {self.dim} dimensions), "
                                 f"got {x_T.shape}")
            with np.errstate(over="ignore"):  # values beyond float32 become infinite, refused below
                x_T = x_T.astype(np.float32)
            if not np.isfinite(x_T).all():
                raise ValueError("x_T must be finite: it holds NaN or infinite values (or values beyond float32)")
        table, index, obs = self.condition_table(self.like_training(condition, n, seed), n)
        rng = np.random.default_rng(seed)
        if x_T is None:
            x_T = rng.standard_normal((n, self.dim), dtype=np.float32)
        noise = (lambda i: rng.standard_normal((n, self.dim), dtype=np.float32)) if eta > 0 else None
        return Batch(x_T, index, table, np.full(int(index.max()) + 1, guidance, np.float32), noise, obs, rng)

    def grid(self, sampler: str, steps: int) -> list[int]:
        """The timesteps ``sampler`` evaluates the network at (one graph call each)."""
        steps = _integer("steps", steps, 1, self.num_timesteps)
        return Plan(sampler, self.alphas_cumprod, steps, final_sigma=self.final_sigma).ts

    def run(self, batch: Batch, sampler: str, steps: int, eta: float = 0.0) -> np.ndarray:
        """Sample one (possibly merged) batch; returns points in diffusion space ``[B, D]``."""
        trajectory = self.trajectory(batch, sampler, steps, eta)
        trajectory.advance(None)
        return trajectory.x

    def trajectory(self, batch: Batch, sampler: str, steps: int, eta: float = 0.0) -> Trajectory:
        """A run of ``batch`` to advance a slice at a time (the server's scheduler; see :class:`Trajectory`)."""
        if steps is not None:
            steps = _integer("steps", steps, 1, self.num_timesteps)
        return Trajectory(self, batch, sampler, steps, eta)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Diffusion space -> model space (the latent decoder, or the identity)."""
        if self.decoder is None:
            return np.asarray(z, np.float32)
        return z.astype(np.float32) @ self.decoder["scaled_basis"] + self.decoder["mean"]

    def to_expression(self, x: np.ndarray, clip: bool = True) -> np.ndarray:
        """Model space -> log1p-normalised expression, clipped at 0 (unless ``clip=False``)."""
        x = x * self.gene_scale + self.gene_offset
        return (np.maximum(x, 0.0) if clip else x).astype(np.float32)

    def express(self, z: np.ndarray, observed: bool | None = None,
                rng: np.random.Generator | None = None) -> np.ndarray:
        """Samples in diffusion space -> the cells' log1p-normalised expression: measured
        (:func:`measure`, its uniforms drawn from ``rng``) or smooth, as :meth:`resolve_observed`
        decides."""
        x = self.decode(z)
        if not self.resolve_observed(observed):
            return self.to_expression(x)
        rng = np.random.default_rng() if rng is None else rng
        smooth = self.to_expression(x, clip=False)
        rho = float(np.ravel(self.detection.get("detection_capture", 0.0))[0])
        if rho > 0:  # the capture factor's copula (DetectionModel.sample): one normal per cell, then per value
            from scipy.special import ndtr

            shared = rng.standard_normal(smooth.shape[0], dtype=np.float32)[:, None]
            own = rng.standard_normal(smooth.shape, dtype=np.float32)
            detect_u = ndtr(np.float32(rho ** 0.5) * shared + np.float32((1 - rho) ** 0.5) * own).astype(np.float32)
        else:
            detect_u = rng.random(smooth.shape, dtype=np.float32)
        level_u = rng.random(smooth.shape, dtype=np.float32)
        return measure(self.detection, smooth, detect_u, level_u)

    def expression_note(self, observed: bool) -> str:
        """What the expression holds (``uns['scidiff']['expression']``, the server's ``expression``)."""
        norm = self.meta["normalisation"]
        what = norm.get("expression", "log1p-normalised")
        if norm.get("target_sum") and "target_sum" not in what:  # as scidiff sample says it
            what += f" (target_sum {float(norm['target_sum']):g})"
        return what + (", measured through the detection model" if observed else ", smooth")

    def sample(self, n: int, condition: dict | None = None, *, seed: int | None = None, sampler: str | None = None,
               steps: int | None = None, eta: float | None = None, guidance: float | None = None,
               x_T: np.ndarray | None = None, observed: bool | None = None, output: str = "anndata"):
        """Generate ``n`` cells.

        ``n``, ``steps`` and ``seed`` are integers (Python or numpy; not ``2.0``, ``"10"`` or
        ``True``), ``seed`` in [0, 2**63) as the server takes it; ``eta`` and ``guidance`` numbers;
        ``observed`` ``True``, ``False`` or ``None``; anything else is refused naming the argument.
        ``condition``: a dict of covariate -> label (``{"cell_type": "B", "condition": "stimulated"}``),
        a list (numpy array, pandas Series) of ``n`` labels, an integer code (``obs`` records the
        label it stands for; refused where the vocabulary also has it as a different label), a
        finite number for a numeric covariate, or ``None`` for the null condition; a covariate
        left out is drawn like the training data (:meth:`like_training`).
        (The HTTP server takes labels only.) ``x_T``: the ``[n, D]`` start points, real and finite.
        ``sampler``: ``"ddim"`` or ``"dpmpp_2m"`` (``"distilled"`` for an export of a distilled
        student, in its own steps); ``steps``, ``eta`` (DDIM), ``guidance``
        (classifier-free guidance scale) default to the sidecar's. ``observed``: measured cells,
        the default where the export has a detection model, or smooth ones (``False``); ``uns``
        (or the arrays) record which. ``output``: ``"anndata"``
        (falls back to ``"arrays"`` when anndata is not installed), ``"arrays"`` (a dict with
        ``X``, ``genes``, ``obs``, ``seed``) or ``"latent"`` (the raw ``[n, D]`` samples).
        """
        if output not in ("anndata", "arrays", "latent"):  # before the sampling, not after it
            raise ValueError(f"output must be 'anndata', 'arrays' or 'latent', got {_shown(output)}")
        opts = self.resolve(sampler, steps, eta, guidance, observed)
        seed = int(secrets.randbits(63)) if seed is None else _integer("seed", seed, 0, MAX_SEED)
        batch = self.prepare(n, condition, seed=seed, guidance=opts["guidance"], eta=opts["eta"], x_T=x_T)
        z = self.run(batch, opts["sampler"], opts["steps"], opts["eta"])
        if output == "latent":
            return z
        return self.package(self.express(z, opts["observed"], batch.rng), batch.obs, seed, opts, output)

    def package(self, x: np.ndarray, obs: dict, seed: int, opts: dict, output: str = "anndata"):
        """Expression + labels -> AnnData (when importable and asked for) or a dict of arrays;
        ``opts`` as :meth:`resolve` gives them."""
        if output not in ("anndata", "arrays"):
            raise ValueError(f"output must be 'anndata', 'arrays' or 'latent', got {_shown(output)}")
        target_sum = self.meta["normalisation"].get("target_sum")
        info = {**opts, "seed": int(seed), "expression": self.expression_note(opts["observed"]),
                "target_sum": float(target_sum) if target_sum else None,
                "scidiff_version": self.meta.get("scidiff_version")}
        if output == "anndata":
            try:
                import anndata as ad
                import pandas as pd
            except ImportError:
                output = "arrays"
            else:
                frame = pd.DataFrame({k: (v if self.by_key[k]["kind"] == "continuous" else pd.Categorical(v))
                                      for k, v in obs.items()}, index=[f"generated_{i}" for i in range(len(x))])
                out = ad.AnnData(X=x, obs=frame)
                out.var_names = self.genes
                symbols = self.meta.get("gene_symbols")  # as scidiff.generate writes var (sidecars of 0.x lack it)
                if symbols:
                    out.var[symbols["column"]] = list(symbols["values"])
                out.uns["log1p"] = {"base": None}  # X is natural-log log1p, as scanpy records it
                # uns in scidiff sample's words: the guidance is its guidance_scale
                uns = {("guidance_scale" if k == "guidance" else k): v for k, v in info.items()}
                out.uns["scidiff"] = {k: v for k, v in uns.items() if v is not None}
                return out
        return {"X": x, "genes": self.genes, "obs": obs, **info}
