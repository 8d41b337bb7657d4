"""The sampling engine: a trained :class:`~scidiff.models.ScIDiffModel` as a fast generator.

It walks the same plan as the plain samplers (:func:`~scidiff.diffusion.plans.sampler_plan`),
with the same walker (:func:`~scidiff.diffusion.plans.walk`) and the model's own preconditioning
(:class:`~scidiff.models.preconditioning.Preconditioning`), and does less work per step:

- The condition embedding, the perturbation response and the timestep embeddings are computed
  once per batch / once per plan, not once per step and cell. Each block's modulation
  (``shift, scale, gate``) depends only on the condition and the timestep, so it is computed for
  the batch's *distinct* conditions only (one row when all cells share a condition, the common
  case) and broadcast: about 45% of the default network's FLOPs per cell disappear.
- The network runs in bf16 where the device has bf16 matrix units (CUDA; CPUs with AVX512-BF16
  or AMX), the sampler state in fp32.
- Each update is one fused pass (:func:`scidiff.ops.sampler_step`: guidance combine, clamp,
  the linear update and the noise).
- With one condition for all cells (the common case; with guidance, one conditional and the
  null half) on the Triton path, each layer's LayerNorm and modulation are folded into its
  weight for every step of the plan, once per batch and condition
  (:meth:`~scidiff.models.score_network.ScoreNetwork.fold`): a step is then, per layer, one GEMM
  with the normalisation, SiLU, gate and residual in its epilogue, which also writes the next
  layer's row statistics (the first layer's come from their own kernel).
- On CUDA the blocks run as the fused Triton kernels, and the whole N-step loop is captured once
  per batch shape in a CUDA graph and replayed per batch: coefficients live in a device table,
  noise is drawn in the kernel from a seed held in device memory, so nothing in the loop waits
  on the host.

Large ``n`` is generated in chunks (:meth:`SamplingEngine.stream`), with a progress bar;
:func:`scidiff.tasks.generate.generate_to_file` writes them to an ``.h5ad`` chunk by chunk.

On CPU in fp32 the engine reproduces ``model.sample`` (same seed, same sampler) to float
rounding: the same ``x_T`` and noise draws, in the same order. bf16 changes the samples by the
rounding of the network (about 0.1% of their norm on the default model, under 1% in the tests),
not their quality (``bench/bench_sampler_quality.py``). On CUDA, noise comes from the kernel's Philox stream, so
stochastic samplers give different (equally distributed) draws than ``model.sample``.
"""
from __future__ import annotations

import copy
import math
import platform
import warnings
from typing import Iterator

import torch

from . import ops
from .checks import generator_seed, warn, whole_number, yes_no
from .diffusion.guidance import double_rows, guidance_weight
from .diffusion.plans import (DEFAULT_SAMPLER, DEFAULT_SPACING, DEFAULT_STEPS, PlanStep, check_eta, check_steps,
                              sampler_plan, walk)
from .ops.device import resolve_device


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX, via oneDNN).
    oneDNN's own check also says yes for plain AVX-512, where bf16 is emulated and slower than
    fp32, so on x86 the instructions themselves are asked for."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        if _x86():
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return True  # Arm: oneDNN's check is the bf16 extension itself
    except (AttributeError, RuntimeError):
        return False


def cpu_has_fp16() -> bool:
    """Whether this CPU runs fp16 matrix products natively (AVX512-FP16 or AMX-FP16, via oneDNN)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


CPU_CHUNK = 1024  # cells per batch on CPU: the activations stay in cache (bf16: 2-12% faster than 4,096)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
          "fp64": torch.float64, "float64": torch.float64, "double": torch.float64}


def _engine_device(device, model) -> torch.device:
    """The engine's device: the model's where ``device`` is unset, else ``device``, refused
    where it is absent here (an explicit request to be fast on it)."""
    return next(model.parameters()).device if device is None else resolve_device(device, strict=True)


def _engine_dtype(dtype, device: torch.device) -> torch.dtype:
    """The network's dtype for ``dtype`` (``"auto"``, a name such as ``"bf16"``, or a torch float
    dtype); a warning where the CPU would emulate it (slower than fp32)."""
    if isinstance(dtype, str):
        key = dtype.strip().lower().replace("torch.", "")
        if key == "auto":
            return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16() else torch.float32
        if key not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose 'auto', one of {sorted(DTYPES)} or a torch float dtype")
        dtype = DTYPES[key]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r}; choose 'auto', one of {sorted(DTYPES)} or a torch float dtype")
    if device.type == "cpu" and ((dtype == torch.bfloat16 and not cpu_has_bf16())
                                 or (dtype == torch.float16 and not cpu_has_fp16())):
        warn(f"dtype={str(dtype).replace('torch.', '')} on a CPU without native units for it: the "
             f"network runs emulated, several times slower than fp32 (dtype='auto' picks fp32 here)")
    return dtype


def _check_clip(clip):
    """``clip`` as ``(min, max)`` (either may be ``None``), checked."""
    if clip is None:
        return None
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise ValueError(f"clip must be a pair (min, max) or None, got {clip!r}")
    lo, hi = (None if c is None else float(c) for c in clip)
    if any(c is not None and math.isnan(c) for c in (lo, hi)) or (lo is not None and hi is not None and lo > hi):
        raise ValueError(f"clip must be (min, max) with min <= max, got {clip!r}")
    return lo, hi


class SamplingEngine:
    """Generate cells from ``model`` with ``sampler`` on ``steps`` timesteps.

    Args:
        model: a trained ScIDiffModel (its weights are copied; later changes to it are not seen).
        sampler, steps, eta, spacing: as in :func:`~scidiff.diffusion.plans.sampler_plan`;
            ``"distilled"`` runs the model's distilled student (its parameters in the network, its
            own steps: :meth:`~scidiff.models.ScIDiffModel.sampling_steps`), CUDA graph included.
        guidance_scale: classifier-free guidance weight (1 = the conditional model).
        clip: optional ``(min, max)`` clamp of each prediction (in diffusion space; either may be
            ``None``).
        device: default the model's device; ``"cuda"`` without CUDA is an error.
        dtype: ``"auto"`` (bf16 on CUDA and on CPUs with bf16 units, else fp32), or the network's
            dtype as a torch dtype or a name (``"bf16"``, ``"fp16"``, ``"fp32"``, ...); bf16 or fp16
            on a CPU without units for them runs emulated (several times slower), with a warning.
            The sampler state is always fp32.
        chunk_size: cells per batch, a positive integer (default 1,024 on CPU, where it keeps
            activations in cache; 65,536 on CUDA).
        cuda_graph: capture the loop in a CUDA graph (default on CUDA; an error off CUDA).
        threads: set ``torch.set_num_threads`` (process-wide) before sampling.
    """

    def __init__(self, model, sampler: str = DEFAULT_SAMPLER, steps: int | None = DEFAULT_STEPS, *,
                 eta: float = 0.0, spacing: str | None = None, guidance_scale: float = 1.0,
                 clip: tuple[float, float] | None = None, device=None, dtype="auto", chunk_size: int | None = None,
                 cuda_graph: bool | None = None, threads: int | None = None):
        if threads is not None:
            threads = whole_number("threads", threads, 1,
                                   what="a positive integer (torch.set_num_threads; None leaves it as it is)")
        self.device = _engine_device(device, model)
        self.dtype = _engine_dtype(dtype, self.device)
        steps = check_steps(model.sampling_steps(sampler, steps, eta))  # 5.0 steps: 5; True: an error
        self.sampler, self.steps, self.eta = sampler, steps, check_eta(eta)
        self.spacing = spacing or DEFAULT_SPACING.get(sampler)
        self.guidance_scale = guidance_weight(guidance_scale)
        self.clip = _check_clip(clip)
        self.chunk_size = (65_536 if self.device.type == "cuda" else CPU_CHUNK) if chunk_size is None else \
            whole_number("chunk_size", chunk_size, 1,
                         what="a positive integer (cells per batch; None for the device's default)")
        cuda_graph = yes_no("cuda_graph", cuda_graph, "captured on CUDA")  # 'no' read as True
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, and this engine runs on {self.device}: "
                             f"leave cuda_graph unset (or False) off CUDA")
        if threads is not None:
            torch.set_num_threads(threads)

        self.model = copy.deepcopy(model).to(self.device).eval()
        if sampler == "distilled":  # the student is the same network with other parameters
            model.student.check_fits(self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_(False)
            if sampler == "distilled":
                p.copy_(model.student.parameters[name])
        self.score = self.model.score.to(self.dtype)
        self.plan: list[PlanStep] = sampler_plan(sampler, self.model.scheduler, steps, eta=self.eta,
                                                 spacing=self.spacing, final_sigma=float(model.final_sigma))
        self._precompute_plan()
        self._graphs: dict = {}

    # -- set-up ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _precompute_plan(self):
        """Per plan step: the model's preconditioning as Python floats, the update coefficients as
        a device table ``[n, 4]`` and the timestep embeddings ``[n, C]``."""
        m, dev = self.model, self.device
        t = torch.tensor([st.t for st in self.plan], device=dev)
        self.pre = m.precondition(t).rows()
        self.coef = torch.tensor([[st.x_coef, st.x0_coef, st.prev_coef, st.noise_coef] for st in self.plan],
                                 dtype=torch.float32, device=dev)
        self.temb = m.time_embedding(t)

    @torch.no_grad()
    def _conditions(self, cond: dict, b: int):
        """Rows the network sees for one batch (``2b`` with guidance: conditional, then null),
        as distinct condition embeddings ``[U, C]``, each row's index into them (``None`` when
        ``U = 1``), the perturbation response ``[rows, D]`` (``None`` without one) and, when the
        rows fall into equal contiguous blocks of one condition each (one condition; or, with
        guidance, one conditional and the null half), each block's index into the embeddings."""
        enc, dev = self.model.condition_encoder, self.device
        if self.guidance_scale != 1.0:
            null = enc.null_condition(b, dev)
            cond = double_rows({**null, **cond}, null, b)
            rows = 2 * b
        else:
            rows = b
        cemb = enc(cond, rows, dev)
        response = self.model.response(cond, rows, dev)
        if bool((cemb == cemb[:1]).all()):  # one condition (the common case): no sort
            return cemb[:1], None, response, (0,)
        unique, inverse = torch.unique(cemb, dim=0, return_inverse=True)
        groups = None
        if rows == 2 * b:
            halves = inverse.view(2, b)
            if bool((halves == halves[:, :1]).all()):
                groups = (int(halves[0, 0]), int(halves[1, 0]))
        return unique, inverse, response, groups

    # -- the loop ----------------------------------------------------------------------------------
    def _fold(self, cemb: torch.Tensor, groups):
        """With the rows in blocks of one condition each (``groups``), on the Triton path: per
        block, every step's network weights with LayerNorm and modulation folded in
        (:meth:`ScoreNetwork.fold`), computed once per batch for the whole plan; else ``None``."""
        if groups is None or not ops.use_triton(cemb):
            return None
        return [self.score.fold(self.score.modulations((self.temb + cemb[g:g + 1]).to(self.dtype))) for g in groups]

    def _network(self, i: int, x: torch.Tensor, cemb, inverse, response, folded) -> torch.Tensor:
        """The network's raw output (fp32) at plan step ``i``, its modulations computed once per
        distinct condition (or taken from ``folded``)."""
        x = x.to(self.dtype)
        response = None if response is None else response.to(self.dtype)
        if folded is not None:  # one block of rows per folded condition
            responses = [None] * len(folded) if response is None else response.chunk(len(folded))
            return torch.cat([self.score.forward_folded(xb, fb, i, rb, out_dtype=torch.float32)
                              for xb, fb, rb in zip(x.chunk(len(folded)), folded, responses)])
        mods = self.score.modulations((self.temb[i] + cemb).to(self.dtype))
        if inverse is not None:
            mods = [m.index_select(0, inverse) for m in mods]
        return self.score(x, response=response, modulations=mods).float()

    def _denoise(self, i: int, x_in: torch.Tensor, cemb: torch.Tensor, inverse, response, folded=None):
        """Predicted clean sample(s) at plan step ``i``: ``model(x_in, t_i, cond)`` (the model's
        preconditioning around the network) with the per-step work done once per distinct
        condition."""
        if self.guidance_scale != 1.0:
            x_in = torch.cat([x_in, x_in])
        x0 = self.pre[i].apply(x_in, lambda x, r: self._network(i, x, cemb, inverse, r, folded), response)
        if self.guidance_scale == 1.0:
            return x0, None
        b = x0.shape[0] // 2
        return x0[:b], x0[b:]

    def _loop(self, x: torch.Tensor, cemb, inverse, response, groups=None, *, generator=None,
              seed=None) -> torch.Tensor:
        """The whole plan on one batch. Noise: drawn from ``generator`` (the plain samplers'
        order) or, with ``seed`` (an int64 device tensor), in the step kernel."""
        lo, hi = self.clip if self.clip is not None else (None, None)
        folded = self._fold(cemb, groups)

        def predict(x_in, t, i):
            return self._denoise(i, x_in, cemb, inverse, response, folded)

        def update(i, st, x, pred, prev, _):
            noise, step_seed = None, None
            if st.noise_coef > 0:
                if seed is None:
                    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                elif ops.use_triton(x):
                    step_seed = seed
                else:  # the reference step would read the seed on the host: draw in the graph instead
                    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)
            return ops.sampler_step(x, pred[0], pred[1], prev if st.prev_coef else None, self.coef[i],
                                    self.guidance_scale, lo, hi, noise, step_seed, i)

        return walk(self.plan, x, predict, update=update)

    @torch.no_grad()
    def _run(self, x_T: torch.Tensor, cond: dict, generator) -> torch.Tensor:
        cemb, inverse, response, groups = self._conditions(cond, x_T.shape[0])
        if not self.cuda_graph:
            return self._loop(x_T, cemb, inverse, response, groups, generator=generator)
        seed = 0
        if any(st.noise_coef > 0 for st in self.plan):  # a fresh key per batch, after its x_T
            seed = int(torch.randint(0, 2**62, (), generator=generator, device=self.device))
        return self._replay(x_T, cemb, inverse, response, groups, seed)

    def _replay(self, x_T, cemb, inverse, response, groups, seed: int) -> torch.Tensor:
        """Run the loop through a CUDA graph captured once per (batch, distinct conditions,
        response, row blocks) shape; inputs are copied into the graph's static buffers."""
        key = (x_T.shape[0], cemb.shape[0], inverse is not None, response is not None, groups)
        entry = self._graphs.get(key)
        if entry is None:
            static = {"x": x_T.clone(), "cemb": cemb.clone(),
                      "seed": torch.zeros(1, dtype=torch.int64, device=self.device),
                      "inverse": inverse.clone() if inverse is not None else None,
                      "response": response.clone() if response is not None else None}

            def run():
                return self._loop(static["x"], static["cemb"], static["inverse"], static["response"], groups,
                                  seed=static["seed"])

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: Triton compiles and the allocator settles
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
            entry = self._graphs[key] = (graph, static, out)
        graph, static, out = entry
        static["x"].copy_(x_T)
        static["cemb"].copy_(cemb)
        static["seed"].fill_(int(seed))
        if inverse is not None:
            static["inverse"].copy_(inverse)
        if response is not None:
            static["response"].copy_(response)
        graph.replay()
        return out.clone()

    def _encode(self, conditioning, n: int):
        """``(shared, codes)``: labels that every cell shares encoded once, as one row
        (``shared``), so that memory stays at one chunk for any ``n``; per-cell labels as ``n``
        rows."""
        m = self.model
        if n > 1 and conditioning:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    one = m.encode_conditioning(conditioning, 1)
                except ValueError:  # one value per cell: encoded below, for all n (warnings again)
                    one = None
            if one is not None and all(v.shape[0] == 1 for v in one.values()):
                for w in caught:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                return True, {k: v.to(self.device) for k, v in one.items()}
        return False, {k: v.to(self.device) for k, v in m.encode_conditioning(conditioning, n).items()}

    # -- public API --------------------------------------------------------------------------------
    def stream(self, n: int, conditioning: dict | None = None, *, seed: int | None = None,
               generator: torch.Generator | None = None, return_expression: bool = True,
               progress: bool = False, to_cpu: bool = True, observed: bool | None = None) -> Iterator[torch.Tensor]:
        """Yield ``n`` generated cells as fp32 tensors of at most ``chunk_size`` rows, on the CPU
        (``to_cpu=False``: left on the engine's device, for consumers that stay on the GPU).
        ``observed``: measured or smooth cells, by default measured where the model can
        (:meth:`~scidiff.models.ScIDiffModel.resolve_observed`), as ``model.sample``.

        ``x_T`` (and, off CUDA graphs, the noise) come from ``generator`` (else one seeded with
        ``seed``) in the order ``model.sample`` would draw them for the same chunks; in a CUDA
        graph a stochastic sampler's noise is keyed by one more draw per chunk."""
        n = whole_number("n", n, 1, what="an integer number of cells >= 1", integral_floats=False)
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both (the generator would win and seed be ignored)")
        progress, return_expression, to_cpu = (yes_no(name, value) for name, value in (  # 'no' read as true
            ("progress", progress), ("return_expression", return_expression), ("to_cpu", to_cpu)))
        m = self.model
        observed = m.resolve_observed(observed, return_expression)
        shared, cond_all = self._encode(conditioning, n)
        if generator is None:
            generator = torch.Generator(device=self.device)
            seed = generator_seed(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item())
            generator.manual_seed(seed)
        from tqdm.auto import tqdm

        with tqdm(total=n, desc=f"sampling ({self.sampler}, {len(self.plan)} evaluations)", unit="cell",
                  disable=not progress) as bar:
            for start in range(0, n, self.chunk_size):
                b = min(self.chunk_size, n - start)
                cond = ({k: v.expand(b, *v.shape[1:]).contiguous() for k, v in cond_all.items()} if shared
                        else {k: v[start:start + b] for k, v in cond_all.items()})
                x_T = torch.randn(b, m.diffusion_dim, generator=generator, device=self.device)
                x = m.decode(self._run(x_T, cond, generator))
                if observed:
                    x = m.observe(x, generator)
                elif return_expression and m.data_spec is not None:
                    x = m.data_spec.to_expression(x)
                yield x.float().cpu() if to_cpu else x.float()
                bar.update(b)

    def sample(self, n: int, conditioning: dict | None = None, **kwargs) -> torch.Tensor:
        """``n`` generated cells ``[n, G]`` (see :meth:`stream` for the arguments)."""
        return torch.cat(list(self.stream(n, conditioning, **kwargs)))
