"""Sampler plans: the whole of a sampler's arithmetic as plain Python floats, and the one walker.

A *plan* is a list of :class:`PlanStep`: one denoiser evaluation each, followed by one linear
update of the state, the prediction and the previous prediction. DDIM, DDPM, DPM-Solver++(2M),
Euler-Maruyama and Heun are all plans (:data:`PLANS`); :func:`sampler_plan` builds any of them
from a schedule's ``alphas_cumprod``. ``"distilled"`` is deterministic DDIM on the halving grid a
progressively distilled student was trained for (:func:`halving_timesteps`); it is walked with the
student's parameters (:class:`scidiff.diffusion.distillation.Student`). Nothing here imports torch or numpy: the coefficients are
Python floats computed before the loop, and :func:`walk` (with :func:`step_update`) runs on
anything with ``*`` and ``+`` (torch tensors in :mod:`scidiff.diffusion.samplers` and the engine,
numpy arrays in :mod:`scidiff.export.runtime`), so every path walks the same plan.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Callable

# the default, from the quality-vs-steps curve on Kang (bench/results/sampler_quality.json): at 25
# steps DPM-Solver++(2M) matches DDPM at 1,000 (paired MMD difference +0.0000 [-0.0039, +0.0042])
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpmpp_2m", 25


def alphas_cumprod_of(schedule) -> list[float]:
    """``alpha_bar[t]`` as Python floats, from a schedule (anything with ``alphas_cumprod``) or
    the sequence itself (a list, a numpy array or a tensor)."""
    ab = getattr(schedule, "alphas_cumprod", schedule)
    return [float(v) for v in (ab.tolist() if hasattr(ab, "tolist") else ab)]


def check_steps(steps) -> int | None:
    """``steps`` as an int (a Python or numpy integer, or a float without a fractional part) or
    ``None`` (all timesteps), else a ValueError naming it: ``True`` is not one step, ``5.0`` is 5."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Real)
                              or not math.isfinite(steps) or steps != int(steps) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1 or None (all timesteps), got {steps!r}")
    return None if steps is None else int(steps)


def check_eta(eta) -> float:
    """``eta`` as a float in [0, 1], else a ValueError naming it: beyond 1 the step's variance exceeds
    what the schedule leaves (NaN cells); ``True`` is not a number, and a numpy float32 ``eta`` made
    the coefficients float32 (other cells than the same ``eta`` as a float)."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's ancestral step), got {eta!r}")
    return float(eta)


def _grid_ends(num_timesteps: int, steps: int | None) -> list[int] | None:
    """The grids every spacing shares: all timesteps (``steps`` None or at least ``T``) or the
    last one alone (``steps == 1``); ``None`` otherwise. ``steps < 1`` is an error."""
    if steps is None or steps >= num_timesteps:
        return list(range(num_timesteps - 1, -1, -1))
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [num_timesteps - 1] if steps == 1 else None


def timesteps(num_timesteps: int, steps: int | None) -> list[int]:
    """``steps`` timesteps evenly spaced over ``[0, T-1]``, descending, always from ``T-1`` to 0
    ("trailing" spacing, Lin et al. 2024), so few-step sampling starts from pure noise."""
    steps = check_steps(steps)
    ends = _grid_ends(num_timesteps, steps)
    if ends is not None:
        return ends
    ts = [round(i * (num_timesteps - 1) / (steps - 1)) for i in range(steps)]
    return sorted(set(ts), reverse=True)


def ddim_coefficients(ab: list[float], ts: list[int], eta: float = 0.0, a_end: float = 1.0) -> list[tuple]:
    """Per step ``(t, c_x0, c_eps, sigma)`` of ``x_s = c_x0 x0 + c_eps eps + sigma z`` (Song et
    al. 2021, eq. 12); the step after the last timestep lands on ``ab = a_end`` (1: clean data)."""
    coefs = []
    for i, t in enumerate(ts):
        a_t = ab[t]
        a_s = ab[ts[i + 1]] if i + 1 < len(ts) else a_end
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) if a_s < 1.0 else 0.0
        c_eps = math.sqrt(max(1 - a_s - sigma**2, 0.0))
        coefs.append((t, math.sqrt(a_s), c_eps, sigma))
    return coefs


def ddpm_coefficients(ab: list[float], ts: list[int], a_end: float = 1.0) -> list[tuple]:
    """Per step ``(t, c_x0, c_xt, sigma)`` of the posterior ``q(x_s | x_t, x0)`` mean
    ``c_x0 x0 + c_xt x_t`` and its standard deviation (Ho et al. 2020, eq. 7), on grid ``ts``."""
    coefs = []
    for i, t in enumerate(ts):
        a_t, a_s = ab[t], (ab[ts[i + 1]] if i + 1 < len(ts) else a_end)
        beta = 1.0 - a_t / a_s
        coefs.append((t, math.sqrt(a_s) * beta / (1 - a_t), math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t),
                      math.sqrt((1 - a_s) / (1 - a_t) * beta)))
    return coefs


# -- samplers as linear plans ----------------------------------------------------------------------
# Every sampler is a list of network evaluations, each followed by one linear update of x, the
# prediction x0 and the previous prediction. The plain samplers (:mod:`scidiff.diffusion.samplers`),
# the fast engine (:mod:`scidiff.engine`), SMC (:mod:`scidiff.diffusion.smc`) and the numpy runtime
# (:mod:`scidiff.export.runtime`) all walk the same plan with :func:`walk`, so they produce the
# same samples.


@dataclass(frozen=True)
class PlanStep:
    """One denoiser call at timestep ``t`` and the update after it::

        out = x_coef * x + x0_coef * x0 + prev_coef * x0_prev + noise_coef * z

    ``x`` is the current state, ``x0`` the prediction at ``(mid if from_mid else x, t)``,
    ``x0_prev`` the prediction of the previous step and ``z`` standard normal noise; ``out``
    replaces ``mid`` (a second-order method's trial point) if ``to_mid`` else ``x``."""

    t: int
    x_coef: float
    x0_coef: float
    prev_coef: float = 0.0
    noise_coef: float = 0.0
    from_mid: bool = False
    to_mid: bool = False


def logsnr_timesteps(ab: list[float], steps: int | None) -> list[int]:
    """``steps`` descending integer timesteps from ``T-1`` to 0, evenly spaced in log-SNR
    ``lambda = log(sqrt(ab / (1 - ab)))`` (the spacing DPM-Solver recommends, Lu et al. 2022):
    each is the timestep nearest its target, moved down by one where it would repeat the previous."""
    ab = alphas_cumprod_of(ab)
    n = len(ab)
    ends = _grid_ends(n, steps)
    if ends is not None:
        return ends
    lam = [0.5 * math.log(a / (1.0 - a)) for a in ab]
    ts = []
    for i in range(steps):
        target = lam[-1] + i * (lam[0] - lam[-1]) / (steps - 1)
        # lambda decreases with t: the first timestep whose lambda is at or below the target
        lo, hi = 0, n - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if lam[mid] > target:
                lo = mid + 1
            else:
                hi = mid
        t = lo if lo == 0 or abs(lam[lo] - target) <= abs(lam[lo - 1] - target) else lo - 1
        t = min(t, ts[-1] - 1) if ts else n - 1
        ts.append(max(t, steps - 1 - i))
    return ts


def halving_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``round(k T / steps) - 1`` for ``k = steps, ..., 1``, descending from ``T - 1``; the DDIM step
    after the last one lands on clean data. For even ``steps`` the points of ``steps // 2`` are
    exactly every other point of ``steps`` (from the first), so the rounds of progressive
    distillation nest (Salimans & Ho 2022)."""
    if steps is None or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}] (the schedule's timesteps), got {steps}")
    return [(2 * k * num_timesteps + steps) // (2 * steps) - 1 for k in range(steps, 0, -1)]


SPACINGS = {"trailing": lambda ab, steps: timesteps(len(ab), steps), "logsnr": logsnr_timesteps,
            "halving": lambda ab, steps: halving_timesteps(len(ab), steps)}


def ddim_plan(ab: list[float], ts: list[int], eta: float = 0.0, a_end: float = 1.0) -> list[PlanStep]:
    """:func:`ddim` as a plan: ``x_s = c_x0 x0 + c_eps (x - sqrt(ab_t) x0) / sqrt(1 - ab_t) + sigma z``."""
    plan = []
    for t, c_x0, c_eps, sigma in ddim_coefficients(ab, ts, eta, a_end):
        k = c_eps / math.sqrt(1.0 - ab[t])
        plan.append(PlanStep(t, k, c_x0 - k * math.sqrt(ab[t]), noise_coef=sigma))
    return plan


def ddpm_plan(ab: list[float], ts: list[int], a_end: float = 1.0) -> list[PlanStep]:
    """:func:`ddpm` as a plan."""
    return [PlanStep(t, c_xt, c_x0, noise_coef=sigma) for t, c_x0, c_xt, sigma in ddpm_coefficients(ab, ts, a_end)]


def dpmpp_2m_plan(ab: list[float], ts: list[int], a_end: float = 1.0) -> list[PlanStep]:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2) in log-SNR time
    ``lambda = log(alpha / sigma)``: ``x_s = (sigma_s / sigma_t) x + alpha_s (1 - e^-h) D`` with
    ``D = (1 + 1/2r) x0 - (1/2r) x0_prev``, ``r = h_prev / h``. The first step is first order
    (it equals DDIM) and so is the last, onto clean data, where ``h`` is infinite."""
    plan, h_prev = [], None
    for i, t in enumerate(ts):
        a_s = ab[ts[i + 1]] if i + 1 < len(ts) else a_end
        if a_s >= 1.0:
            plan.append(PlanStep(t, 0.0, 1.0))
            continue
        alpha_t, sigma_t = math.sqrt(ab[t]), math.sqrt(1.0 - ab[t])
        alpha_s, sigma_s = math.sqrt(a_s), math.sqrt(1.0 - a_s)
        h = math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)
        phi = alpha_s * -math.expm1(-h)
        if h_prev is None:
            plan.append(PlanStep(t, sigma_s / sigma_t, phi))
        else:
            half_r_inv = h / (2.0 * h_prev)
            plan.append(PlanStep(t, sigma_s / sigma_t, phi * (1.0 + half_r_inv), -phi * half_r_inv))
        h_prev = h
    return plan


def euler_maruyama_plan(ab: list[float], ts: list[int], a_end: float = 1.0) -> list[PlanStep]:
    """Euler-Maruyama on the reverse-time VP SDE (Song et al. 2021, "Score-based generative
    modeling through SDEs", eq. 6): ``x_s = x + beta (x / 2 + score) + sqrt(beta) z`` with
    ``beta = 1 - ab_t / ab_s`` the step's integrated noise rate and
    ``score = (sqrt(ab_t) x0 - x) / (1 - ab_t)``. The last step returns the denoised ``x0``
    (the usual noise-free final step)."""
    plan = []
    for i, t in enumerate(ts):
        a_t, a_s = ab[t], (ab[ts[i + 1]] if i + 1 < len(ts) else a_end)
        if a_s >= 1.0:
            plan.append(PlanStep(t, 0.0, 1.0))
            continue
        beta = 1.0 - a_t / a_s
        plan.append(PlanStep(t, 1.0 + beta / 2 - beta / (1.0 - a_t), beta * math.sqrt(a_t) / (1.0 - a_t),
                             noise_coef=math.sqrt(beta)))
    return plan


def heun_plan(ab: list[float], ts: list[int], a_end: float = 1.0) -> list[PlanStep]:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, EDM, Alg. 1)
    in ``x / alpha`` against ``sigma = sqrt((1 - ab) / ab)``: an Euler step to ``sigma_s`` (which
    is DDIM), then the trapezoidal correction with the denoiser re-evaluated there. The last step,
    onto ``sigma = 0`` (or the walk's final level), is Euler. ``2 * len(ts) - 1`` network evaluations."""
    plan = []
    for i, t in enumerate(ts):
        last = i + 1 == len(ts)
        a_s = a_end if last else ab[ts[i + 1]]
        alpha_t, alpha_s = math.sqrt(ab[t]), math.sqrt(a_s)
        r = math.sqrt((1.0 - a_s) / a_s) / math.sqrt((1.0 - ab[t]) / ab[t])  # sigma_s / sigma_t
        if last:  # Euler (DDIM) onto the end: sigma = 0, or the walk's final noise level
            plan.append(PlanStep(t, alpha_s * r / alpha_t, alpha_s * (1.0 - r)))
            continue
        plan.append(PlanStep(t, alpha_s * r / alpha_t, alpha_s * (1.0 - r), to_mid=True))
        plan.append(PlanStep(ts[i + 1], alpha_s * r / alpha_t, alpha_s * (1.0 - r) / (2.0 * r),
                             alpha_s * (1.0 - r) * (2.0 - 1.0 / r) / 2.0, from_mid=True))
    return plan


PLANS = {"ddim": ddim_plan, "ddpm": ddpm_plan, "dpmpp_2m": dpmpp_2m_plan,
         "euler_maruyama": euler_maruyama_plan, "heun": heun_plan, "distilled": ddim_plan}
SAMPLER_NAMES = tuple(PLANS)
# the timestep spacing each sampler walks by default; the second-order solvers lose their order on
# the trailing grid's large final log-SNR steps and use even log-SNR steps instead
DEFAULT_SPACING = {"ddim": "trailing", "ddpm": "trailing", "dpmpp_2m": "logsnr", "euler_maruyama": "trailing",
                   "heun": "logsnr", "distilled": "halving"}


def sampler_plan(sampler: str, schedule, steps: int | None, *, eta: float = 0.0,
                 spacing: str | None = None, final_sigma: float = 0.0) -> list[PlanStep]:
    """The plan of any registered sampler on ``steps`` timesteps (``eta`` applies to DDIM only;
    ``spacing``: ``"trailing"``, ``"logsnr"`` or ``"halving"``, default per sampler,
    :data:`DEFAULT_SPACING`). ``"distilled"`` is DDIM (``eta = 0``) on the halving grid only.

    ``final_sigma > 0`` ends the walk at that noise level instead of on clean data: the grid
    spans the timesteps above it, the last step lands on ``alpha_bar = 1 / (1 + final_sigma^2)``
    and the plan returns ``x / sqrt(alpha_bar)``, a draw of the model's distribution at that noise
    (``x0 + final_sigma eps``); the distilled student keeps its own grid and lands there. The
    model's fitted level (:meth:`ScIDiffModel.fit_final_sigma
    <scidiff.models.ScIDiffModel.fit_final_sigma>`) is where it stops generalising to new cells."""
    if sampler not in PLANS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(PLANS)}")
    if sampler == "distilled" and (eta != 0.0 or spacing not in (None, "halving")):
        raise ValueError(f"the distilled sampler is deterministic DDIM on its halving grid (eta=0, spacing "
                         f"'halving'), got eta={eta}, spacing={spacing!r}")
    eta, steps = check_eta(eta), check_steps(steps)
    spacing = spacing or DEFAULT_SPACING[sampler]
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {sorted(SPACINGS)}")
    if not final_sigma >= 0.0:
        raise ValueError(f"final_sigma must be >= 0, got {final_sigma}")
    ab = alphas_cumprod_of(schedule)
    a_end = 1.0 / (1.0 + final_sigma ** 2)
    # the grid spans the timesteps noisier than the end (all of them for final_sigma = 0)
    first = next((t for t, a in enumerate(ab) if a < a_end), len(ab) - 1) if final_sigma > 0 else 0
    if spacing == "halving" or first == 0:
        ts = SPACINGS[spacing](ab, steps)
    else:
        ts = [first + t for t in SPACINGS[spacing](ab[first:], steps)]
    plan = PLANS[sampler](ab, ts, eta=eta, a_end=a_end) if sampler == "ddim" else PLANS[sampler](ab, ts, a_end=a_end)
    if final_sigma > 0:  # return x / sqrt(a_end): the last step's coefficients scaled
        st, k = plan[-1], 1.0 / math.sqrt(a_end)
        plan[-1] = replace(st, x_coef=k * st.x_coef, x0_coef=k * st.x0_coef, prev_coef=k * st.prev_coef,
                           noise_coef=k * st.noise_coef)
    return plan



def step_update(st: PlanStep, x, x0, prev=None, noise=None):
    """The update after plan step ``st``: ``x_coef x + x0_coef x0 + prev_coef x0_prev + noise_coef z``
    (``prev`` is read only when ``prev_coef`` is set, ``noise`` only when ``noise_coef > 0``)."""
    out = st.x_coef * x + st.x0_coef * x0
    if st.prev_coef:
        out = out + st.prev_coef * prev
    if st.noise_coef > 0:
        out = out + st.noise_coef * noise
    return out


@dataclass
class WalkState:
    """Where a walk is: the state ``x``, a second-order method's trial point ``mid`` and the
    previous step's prediction ``prev`` (a hook may replace them, e.g. to resample the batch)."""

    x: object
    mid: object = None
    prev: object = None


def walk(plan: list[PlanStep], x, predict: Callable, *, noise: Callable | None = None, update: Callable | None = None,
         hook: Callable | None = None, progress: bool = False, desc: str = "sampling"):
    """Walk ``plan`` from ``x``; returns the final state. The one loop every sampler runs.

    ``predict(x_in, t, i) -> x0``: the prediction at plan step ``i`` (timestep ``t``) for
    ``x_in``, the state or, for a step ``from_mid``, the trial point. ``noise(i, like) -> z``:
    the step's noise, called only at steps with ``noise_coef > 0``, after ``predict``.
    ``update(i, st, x, pred, prev, z) -> (out, x0)``: replaces :func:`step_update` (the engine's
    fused step: it gets ``predict``'s raw output and returns the update and the prediction kept as
    ``prev``). ``hook(i, st, state, x_in, x0)``: called after each update with the
    :class:`WalkState`, which it may change."""
    state = WalkState(x)
    for i, st in enumerate(_progress(plan, progress, desc)):
        x_in = state.mid if st.from_mid else state.x
        pred = predict(x_in, st.t, i)
        z = noise(i, state.x) if noise is not None and st.noise_coef > 0 else None
        if update is None:
            out, x0 = step_update(st, state.x, pred, state.prev, z), pred
        else:
            out, x0 = update(i, st, state.x, pred, state.prev, z)
        if st.to_mid:
            state.mid = out
        else:
            state.x = out
        state.prev = x0
        if hook is not None:
            hook(i, st, state, x_in, x0)
    return state.x


def _progress(seq, enabled: bool, desc: str):
    if not enabled:
        return seq
    from tqdm.auto import tqdm

    return tqdm(seq, desc=desc, leave=False)
