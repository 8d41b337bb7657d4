"""ONNX export of a trained :class:`~scidiff.models.ScIDiffModel` for serving without PyTorch.

The exported graph is the guided denoiser: score network, condition encoder and the
classifier-free guidance combine (Ho & Salimans 2022), traced with ``torch.onnx.export(dynamo=True)``
from the pure-torch reference ops. Its conditioning is a small *condition table*: ``K`` rows of
(timestep, covariates, guidance scale), and ``cond_index [B]`` says which row each of the ``B``
cells uses. Everything that depends only on the condition (time embedding, condition encoder, the
adaLN modulation of every block, the preconditioning coefficients) is computed once per table
row and gathered, so a batch of cells that share a condition pays for it once. With
``K = B`` and ``cond_index = arange(B)`` the graph is exactly ``denoiser(x_t, t, cond)``.

Graph inputs (``B`` and ``K`` are dynamic):

- ``x_t``: float32 ``[B, D]`` (``D`` = latent or gene dimension)
- ``t``: int64 ``[K]`` timesteps
- ``cond_index``: int64 ``[B]`` row of the table for each cell
- ``guidance``: float32 ``[K]`` guidance scale per row (1 = conditional model only; when every
  row is 1 the graph skips the unconditional half)
- one input per covariate, ``[K]``: int64 codes (code ``n`` = null) for a categorical covariate,
  float32 multi-hot ``[K, n + 1]`` for a perturbation (last column = null), float32 for a
  numeric one (NaN = null)

Output ``x0``: float32 ``[B, D]``, the guided prediction of the clean sample.

With ``sampler="distilled"`` the graph carries the model's distilled student (progressive
distillation) and the export samples with it alone, in its own steps.

Beside ``model.onnx`` the exporter writes ``model.json`` (the sidecar: genes, normalisation and
scaling, vocabularies, the noise schedule, input names, default sampler and steps, versions and
checksums) and, for latent models, ``model.decoder.npz`` (``mean [G]``, ``basis [L, G]``,
``scale [L]``: ``genes = (z * scale) @ basis + mean``; with a fitted detection model also its
tables, ``detection_edges [G, bins + 1]``, ``detection_centres [G, bins]``, ``detection_rate [G, bins]``,
``detection_levels [G, bins, quantiles]`` and the capture factor's correlation ``detection_capture``
(a scalar), from which the runtime measures cells, as
:class:`~scidiff.models.observation.DetectionModel` does). Every file is written to a temporary
name and renamed; the sidecar is written last.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import warnings
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..checks import warn
from ..data.io import staged_files
from ..diffusion.plans import DEFAULT_SAMPLER, DEFAULT_STEPS
from ..diffusion.guidance import cfg_combine, classifier_free_guidance, double_rows
from ..models.preconditioning import Preconditioning
from ..training.checkpoint import load_model
from .runtime import SAMPLERS as SAMPLER_NAMES
from .runtime import SIDECAR_FORMAT, sha256_of

SIDECAR_VERSION = 1



def sidecar_path(onnx_path) -> str:
    """``model.onnx`` -> ``model.json``."""
    return os.path.splitext(os.fspath(onnx_path))[0] + ".json"


def decoder_path(onnx_path) -> str:
    """``model.onnx`` -> ``model.decoder.npz`` (latent models only)."""
    return os.path.splitext(os.fspath(onnx_path))[0] + ".decoder.npz"


@contextlib.contextmanager
def reference_ops():
    """Force ``scidiff.ops`` onto its pure-torch references (``SCIDIFF_KERNELS=torch``) while
    tracing, so no Triton kernel ends up in (or breaks) the exported graph."""
    old = os.environ.get("SCIDIFF_KERNELS")
    os.environ["SCIDIFF_KERNELS"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SCIDIFF_KERNELS", None)
        else:
            os.environ["SCIDIFF_KERNELS"] = old


def covariate_layout(model) -> list[dict]:
    """One entry per condition input, in graph order: ``{key, kind, size}``; ``kind`` is
    ``categorical`` (``size`` values, code ``size`` = null), ``perturbation`` (multi-hot over
    ``size`` singles + null column) or ``continuous`` (NaN = null)."""
    enc = model.condition_encoder
    out = [{"key": k, "kind": "categorical", "size": int(n)} for k, n in enc.categorical.items()]
    out += [{"key": k, "kind": "perturbation", "size": int(n)}
            for k, n in getattr(enc, "perturbations", {}).items()]
    numeric = list(enc.continuous)
    dose = getattr(enc, "dose_key", None)
    if dose and dose not in numeric:
        numeric.append(dose)
    out += [{"key": k, "kind": "continuous", "size": 1} for k in numeric]
    names = {"x_t", "t", "cond_index", "guidance", "x0"}
    for c in out:
        name = "cond_" + re.sub(r"\W", "_", c["key"])
        while name in names:
            name += "_"
        names.add(name)
        c["input"] = name
    return out


def null_row(c: dict, k, like: torch.Tensor) -> torch.Tensor:
    """The null value of covariate ``c`` for ``k`` table rows."""
    if c["kind"] == "categorical":
        return torch.full_like(like, c["size"])
    if c["kind"] == "perturbation":
        return F.pad(torch.zeros_like(like[:, :-1]), (0, 1), value=1.0)
    return torch.full_like(like, float("nan"))


class ConditionTableDenoiser(nn.Module):
    """``ScIDiffModel.forward`` with its conditioning factored into a table of ``K`` rows and the
    classifier-free guidance combine, as traced into ONNX (see the module docstring).

    The per-row terms are computed for the conditional and the null table (``2K`` rows, cheap)
    outside the branch; ``torch.cond`` then picks between the conditional trunk over ``B`` cells
    (every guidance scale 1) and the guided trunk over ``2B``, and becomes an ONNX ``If``. The
    formula is the model's own: its preconditioning (:class:`Preconditioning`), embedding,
    response and score network, with the modulations given per cell."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layout = covariate_layout(model)
        self.has_response = False

    def table_terms(self, t, cond: dict) -> list[torch.Tensor]:
        """Everything that depends only on a table row (timestep + condition): the
        preconditioning (``c_in``, ``c_skip``, ``c_out``, ``sqrt(alpha_bar)``), each block's adaLN
        modulation and the final one, and the additive perturbation response of models that have
        one."""
        m = self.model
        mods = m.score.modulations(m.embed(t, cond))
        response = m.response(cond, t.shape[0], t.device)
        self.has_response = response is not None
        return [*m.precondition(t), *mods] + ([response] if response is not None else [])

    def apply(self, x_t, cond_index, terms: list[torch.Tensor]) -> torch.Tensor:
        """The x0 prediction of :meth:`ScIDiffModel.forward` for cells ``x_t`` whose table rows
        are ``cond_index``, from :meth:`table_terms` (gathered per cell)."""
        terms = [v[cond_index] for v in terms]
        n_mods = len(self.model.score.blocks) + 1
        mods = terms[4:4 + n_mods]
        response = terms[4 + n_mods] if self.has_response else None
        return Preconditioning(*terms[:4]).apply(
            x_t, lambda x, r: self.model.score(x, response=r, modulations=mods), response)

    def denoise(self, x_t, t, cond_index, cond: dict) -> torch.Tensor:
        """Unguided x0 prediction on a condition table."""
        return self.apply(x_t, cond_index, self.table_terms(t, cond))

    def forward(self, x_t, t, cond_index, guidance, *covariates):
        k = t.shape[0]
        cond = dict(zip((c["key"] for c in self.layout), covariates))
        null = {c["key"]: null_row(c, k, v) for c, v in zip(self.layout, covariates)}
        terms = self.table_terms(torch.cat([t, t]), double_rows(cond, null, k))

        def conditional(x_t, cond_index, guidance, *terms):
            return self.apply(x_t, cond_index, list(terms))

        def guided(x_t, cond_index, guidance, *terms):
            b, rows = x_t.shape[0], terms[0].shape[0] // 2
            out = self.apply(torch.cat([x_t, x_t]), torch.cat([cond_index, cond_index + rows]), list(terms))
            return cfg_combine(out[:b], out[b:], guidance[cond_index].unsqueeze(-1))

        return torch.cond(torch.all(guidance == 1.0), conditional, guided, (x_t, cond_index, guidance, *terms))


def example_inputs(model, b: int = 5, k: int = 3, guidance: float = 1.5, seed: int = 0) -> tuple:
    """A probe batch for tracing and checks: ``b`` cells over ``k`` table rows, every covariate
    present with some null rows."""
    g = torch.Generator().manual_seed(seed)
    d = model.diffusion_dim
    x = torch.randn(b, d, generator=g)
    t = torch.randint(0, model.num_timesteps, (k,), generator=g)
    index = torch.arange(b) % k
    covs = []
    for c in covariate_layout(model):
        if c["kind"] == "categorical":
            covs.append(torch.randint(0, c["size"] + 1, (k,), generator=g))
        elif c["kind"] == "perturbation":
            rows = (torch.rand(k, c["size"] + 1, generator=g) < 0.3).float()
            rows[:, -1] = 0.0
            rows[-1] = 0.0
            rows[-1, -1] = 1.0
            covs.append(rows)
        else:
            v = torch.rand(k, generator=g) * 10
            v[-1] = float("nan")
            covs.append(v)
    return (x, t, index, torch.full((k,), float(guidance)), *covs)


def torch_reference(model, inputs: tuple) -> torch.Tensor:
    """What the graph must compute, through the model's own seam: ``model(x_t, t, cond)`` on
    per-cell conditions, guided by :func:`~scidiff.diffusion.guidance.classifier_free_guidance` per row."""
    x, t, index, guidance, *covs = inputs
    layout = covariate_layout(model)
    cond = {c["key"]: v[index] for c, v in zip(layout, covs)}
    null = {c["key"]: null_row(c, len(index), v) for c, v in zip(layout, cond.values())}
    out = torch.empty_like(x)
    with torch.no_grad():
        for w in torch.unique(guidance).tolist():
            rows = (guidance[index] == w).nonzero().squeeze(-1)
            den = classifier_free_guidance(model, w, {k: v[rows] for k, v in null.items()})
            out[rows] = den(x[rows], t[index][rows], {k: v[rows] for k, v in cond.items()})
    return out


def _spec_dict(model) -> dict:
    spec = model.data_spec
    if spec is None:
        raise ValueError("this model carries no DataSpec (genes, vocabularies); train it through "
                         "scidiff.setup_anndata / scidiff train to export it")
    return spec.to_dict()


def build_sidecar(model, onnx_file: str, *, sampler: str, steps: int, eta: float, guidance_scale: float,
                  opset: int | None) -> dict:
    """Everything an onnxruntime sampler needs besides the graph."""
    spec = _spec_dict(model)
    layout = covariate_layout(model)
    vocab = spec.get("categorical", {})
    for c in layout:
        if c["kind"] != "continuous":
            c["labels"] = list(vocab.get(c["key"], []))
            if len(c["labels"]) != c["size"]:
                raise ValueError(f"covariate {c['key']!r}: the model has {c['size']} values but the data spec "
                                 f"lists {len(c['labels'])} labels")
    return {
        "format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION, "scidiff_version": __version__,
        "onnx_file": os.path.basename(onnx_file), "opset": opset,
        "torch_version": torch.__version__.split("+")[0],
        "inputs": {"x_t": "x_t", "t": "t", "cond_index": "cond_index", "guidance": "guidance"},
        "output": "x0", "prediction": "x0",
        "covariates": layout,
        "perturbation": {"control_labels": list(spec.get("control_labels", ["control", "ctrl"])),
                         "separator": spec.get("separator", "+")},
        "diffusion_dim": int(model.diffusion_dim),
        "genes": [str(g) for g in spec["gene_names"]],
        "gene_symbols": ({"column": spec["gene_symbol_column"], "values": [str(v) for v in spec["gene_symbols"]]}
                         if spec.get("gene_symbol_column") and spec.get("gene_symbols") else None),
        "normalisation": {"input_kind": spec.get("input_kind"), "target_sum": spec.get("target_sum"),
                          "expression": "log1p-normalised", "clip_min": 0.0,
                          "gene_offset": [float(v) for v in spec["gene_offset"]],
                          "gene_scale": [float(v) for v in spec["gene_scale"]]},
        "continuous_range": spec.get("continuous_range", {}),
        "training_groups": spec.get("training_groups", {}),
        "schedule": {"config": model.scheduler.config(),
                     "alphas_cumprod": [float(v) for v in model.scheduler.alphas_cumprod.double()]},
        "sampling": {"sampler": sampler, "steps": int(steps), "eta": float(eta),
                     "guidance_scale": float(guidance_scale), "final_sigma": float(model.final_sigma),
                     "samplers": ["distilled"] if sampler == "distilled" else ["ddim", "dpmpp_2m"]},
        "latent": None, "detection": None,
        "model_config": model.config(),
    }


def detection_arrays(detection) -> dict:
    """A fitted :class:`~scidiff.models.observation.DetectionModel`'s tables as the decoder file
    holds them (empty for ``None`` or an unfitted one)."""
    if detection is None or not bool(detection.fitted):
        return {}
    return {"detection_edges": detection.edges.cpu().numpy().astype(np.float32),
            "detection_centres": detection.centres.cpu().numpy().astype(np.float32),
            "detection_rate": detection.detection.cpu().numpy().astype(np.float32),
            "detection_levels": detection.levels.cpu().numpy().astype(np.float32),
            "detection_capture": detection.capture.cpu().numpy().astype(np.float32)}


def export_onnx(model, path, *, sampler: str = DEFAULT_SAMPLER, steps: int | None = None, eta: float = 0.0,
                guidance_scale: float = 1.0, opset: int | None = None, check: bool = True,
                verbose: bool = False) -> dict:
    """Export ``model`` (a :class:`ScIDiffModel` or a checkpoint path) to ``path`` (``.onnx``),
    with the sidecar ``.json`` and, for latent models, the ``.decoder.npz`` beside it (with the
    detection model's tables when it is fitted: the runtime then returns measured cells by
    default).

    ``sampler``/``steps``/``eta``/``guidance_scale`` are the defaults recorded for samplers
    (``steps``: ``None`` is the samplers' default, 25, or the student's own for ``"distilled"``).
    ``sampler="distilled"`` exports the model's distilled student instead (the same graph with the
    student's parameters; the export then samples with ``"distilled"`` in the student's steps
    only, and ``ddim``/``dpmpp_2m`` need an export of the teacher). ``opset``: the ONNX opset the
    graph is written in, from 18 (the exporter's lowest) to what the installed onnx knows; an
    opset the exporter cannot write is refused before any file is written.
    With ``check`` the saved graph is loaded by onnxruntime and compared with torch on a probe
    batch (``max_abs_error`` in the result and the sidecar). Returns the paths and the check.
    """
    if not isinstance(model, nn.Module):
        model = load_model(model)
    path = os.fspath(path)
    if not path.endswith(".onnx"):
        raise ValueError(f"the output path must end with .onnx, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"the output path {path!r} is a folder; give the path of the .onnx file to write")
    _check_defaults(eta, guidance_scale)
    _spec_dict(model)
    _check_beside(path, model)
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; the ONNX runtime has {list(SAMPLER_NAMES)}")
    opset = check_opset(opset)
    distilled = sampler == "distilled"
    if distilled:
        own = model.sampling_steps(sampler, None, eta)  # the student's (an error naming the fix without one)
        if steps is not None and int(steps) != own:
            raise ValueError(f"the distilled student samples in exactly {own} steps, not {steps}: leave steps "
                             f"at its default or pass {own} (distil again for another number of steps)")
        steps = own
    elif steps is None:
        steps = DEFAULT_STEPS
    if not 1 <= int(steps) <= model.num_timesteps:
        raise ValueError(f"steps must lie in [1, {model.num_timesteps}], got {steps}")
    student = model.student
    model = copy.deepcopy(model).float().cpu().eval()
    model.student = None
    if distilled:  # the student is the same network with other parameters
        student.check_fits(model)
    for name, p in model.named_parameters():
        p.requires_grad_(False)
        if distilled:
            p.copy_(student.parameters[name])
    wrapper = ConditionTableDenoiser(model).eval()
    sidecar = build_sidecar(model, path, sampler=sampler, steps=steps, eta=eta, guidance_scale=guidance_scale,
                            opset=opset)
    probe = example_inputs(model)
    with torch.no_grad(), reference_ops():
        expected = torch_reference(model, probe)
        err = float((wrapper(*probe) - expected).abs().max())
        if not err <= 1e-4 * max(1.0, float(expected.abs().max())):
            raise RuntimeError(f"the exporter's factored denoiser differs from ScIDiffModel.forward by {err:.3g}; "
                               "scidiff/export/onnx.py must follow the model's forward")
        program = _trace(wrapper, probe, sidecar, opset, verbose)
    sidecar["opset"] = next((int(o.version) for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")),
                            opset)
    if opset is not None and sidecar["opset"] != opset:  # the exporter fell back to another opset, silently
        raise ValueError(f"opset {opset}: the exporter could not write the graph in it (it wrote opset "
                         f"{sidecar['opset']}); choose an opset from {MIN_OPSET} to {_max_opset()} or leave it unset")

    written = {}
    check_error = None

    def write_graph(tmp):  # checked under its temporary name: a graph that fails replaces no earlier export
        nonlocal check_error
        program.save(tmp, external_data=False)
        _readable(tmp)
        if check:
            check_error = _check_saved(tmp, wrapper, model, name=path)
        sidecar["onnx_sha256"] = sha256_of(tmp)

    # the files renamed into place together at the end, the sidecar last: an export that fails or is
    # interrupted leaves an earlier one's files as they were (never a new graph beside an old sidecar)
    with staged_files() as stage:
        written["onnx"] = stage(path, write_graph)
        if model.latent_dim:
            dec = decoder_path(path)
            arrays = {"mean": model.latent_mean.numpy().astype(np.float32),
                      "basis": model.latent_basis.numpy().astype(np.float32),
                      "scale": model.latent_scale.numpy().astype(np.float32), **detection_arrays(model.detection)}

            def write_decoder(tmp):
                _savez(tmp, arrays)
                sidecar["latent"] = {"dim": int(model.latent_dim), "file": os.path.basename(dec),
                                     "sha256": sha256_of(tmp), "decode": "genes = (z * scale) @ basis + mean"}

            written["decoder"] = stage(dec, write_decoder)
            if "detection_rate" in arrays:  # its tables are in the decoder file
                sidecar["detection"] = {"bins": model.detection.bins, "quantiles": model.detection.quantiles,
                                        "arrays": ["detection_edges", "detection_centres", "detection_rate",
                                                   "detection_levels", "detection_capture"],
                                        "measure": "scidiff.models.observation.DetectionModel.measure"}
        if check:
            sidecar["export_check"] = {"max_abs_error": check_error}
        written["sidecar"] = stage(sidecar_path(path), lambda tmp: _write_json(tmp, sidecar))
    return {**written, **({"max_abs_error": sidecar["export_check"]["max_abs_error"]} if check else {})}


def _check_beside(path: str, model) -> None:
    """Refuse, before the trace, an export whose sidecar (``.json``) or decoder (``.decoder.npz``)
    would replace a file that is not an earlier export's: ``--out RUN/training.onnx`` replaced the
    run's ``training.json``."""
    side = sidecar_path(path)
    others = [(side, "sidecar")] + ([(decoder_path(path), "decoder")] if model.latent_dim else [])
    for other, role in others:
        if not os.path.lexists(other):
            continue
        ours = False
        if os.path.isfile(other) and role == "sidecar":
            try:
                with open(other) as fh:
                    ours = json.load(fh).get("format") == SIDECAR_FORMAT
            except (OSError, ValueError, AttributeError):
                ours = False
        elif os.path.isfile(other):
            ours = zipfile.is_zipfile(other)
        if not ours:
            raise ValueError(f"the export writes its {role} to {other!r}, which exists and is not an earlier "
                             f"export's; choose another name for {os.path.basename(path)!r}")


MIN_OPSET = 18  # torch.onnx.export(dynamo=True) has implementations from opset 18; lower ones are converted, or not


def _max_opset() -> int:
    """The newest opset the installed onnx knows."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_opset(opset):
    """``opset`` (``None``: the exporter's default) as an int the exporter can write, else a ValueError
    naming the range: below 18 the exporter converts its graph down, which fails or falls back to 18
    without telling (opset 13 gave 18; 17 an invalid graph)."""
    if opset is None:
        return None
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise ValueError(f"opset must be a whole number, got {opset!r}")
    top = _max_opset()
    if not MIN_OPSET <= int(opset) <= top:
        raise ValueError(f"opset {opset} cannot be exported: the exporter writes opsets {MIN_OPSET} to {top} "
                         f"(the installed onnx's newest); leave it unset for the exporter's default")
    return int(opset)


def _check_defaults(eta, guidance_scale):
    """The sampling defaults recorded for clients must be ones the runtime and the server accept
    (a JSON sidecar holds no NaN or infinity): ``eta`` in [0, 1], a finite ``guidance_scale`` >= 0."""
    for name, value, lo, hi in (("eta", eta, 0.0, 1.0), ("guidance_scale", guidance_scale, 0.0, math.inf)):
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
        if not (math.isfinite(v) and lo <= v <= hi):
            where = "in [0, 1]" if hi == 1.0 else ">= 0"
            raise ValueError(f"{name} must be a finite number {where} (the default recorded for clients), "
                             f"got {value!r}")


def _trace(wrapper, probe, sidecar, opset, verbose):
    batch, table = torch.export.Dim("batch", min=1), torch.export.Dim("table", min=1)
    names = ["x_t", "t", "cond_index", "guidance"] + [c["input"] for c in sidecar["covariates"]]
    shapes = {"x_t": {0: batch}, "t": {0: table}, "cond_index": {0: batch}, "guidance": {0: table}}
    if sidecar["covariates"]:  # a model without covariates has no *covariates argument to name
        shapes["covariates"] = tuple({0: table} for _ in sidecar["covariates"])
    kwargs = {"opset_version": opset} if opset else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(wrapper, probe, dynamo=True, input_names=names, output_names=["x0"],
                                 dynamic_shapes=shapes, verbose=verbose, **kwargs)


def _check_saved(path, wrapper, model, name=None) -> float:
    """Load the saved file with onnx and onnxruntime; max |onnx - torch| over probe batches with
    and without guidance and with a table smaller and as large as the batch. ``name``: the path
    the errors name (the file's final one, where ``path`` is a temporary)."""
    import onnx

    name = path if name is None else name
    try:
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as exc:
        raise RuntimeError(f"{name}: the exported graph is not valid ONNX ({str(exc).splitlines()[0]})") from None
    try:
        import onnxruntime as ort
    except ImportError:
        warn("onnxruntime is not installed: the exported graph was checked by onnx but not run; "
             "install scidiff[serve] (or [gpu]) to compare it with torch")
        return None
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    worst, scale = 0.0, 1.0
    for b, k, w in ((7, 3, 1.0), (6, 6, 2.0), (4, 2, 0.0)):
        probe = example_inputs(model, b, k, w, seed=b)
        with torch.no_grad():
            ref = wrapper(*probe).numpy()
        out = sess.run(["x0"], {n: v.numpy() for n, v in zip(names, probe)})[0]
        worst = max(worst, float(np.abs(out - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    if not math.isfinite(worst) or worst > 1e-4 * scale:  # a broken graph, not rounding (~1e-6 here)
        raise RuntimeError(f"{name}: onnxruntime output differs from torch by {worst:.3g} "
                           f"(outputs up to {scale:.3g})")
    return worst


def _readable(tmp, _=None):
    """Give a temporary file (created 0600) the usual permissions before it is renamed."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def _savez(tmp, arrays):
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    _readable(tmp)


def _write_json(tmp, obj):
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")
    _readable(tmp)
