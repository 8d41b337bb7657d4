"""DPM-Solver++(2M), the reverse SDE (Euler-Maruyama) and the probability-flow ODE (Heun) against
an analytic case: a Gaussian target, whose exact denoiser and exact ODE solution are known."""
import math

import pytest
import torch

from scidiff.models import ScIDiffModel
from scidiff.models.noise_scheduler import CosineNoiseScheduler, LinearNoiseScheduler
from scidiff.diffusion.plans import DEFAULT_SPACING, ddim_plan, ddpm_plan, logsnr_timesteps, sampler_plan, timesteps
from scidiff.diffusion.samplers import SAMPLERS, ddim, ddpm, dpmpp_2m, euler_maruyama, heun, run_plan
from gaussian_target import MU, SD, gaussian_denoiser

SCHEDULES = [CosineNoiseScheduler(1000), LinearNoiseScheduler(1000)]


def exact_ode_endpoint(schedule, x_T):
    """The probability-flow ODE moves every marginal quantile along: for Gaussian data the map
    from x_T to x_0 is affine, ``mu + sd (x_T - a_T mu) / std_T``."""
    a2 = schedule.alphas_cumprod[-1]
    return MU + SD * (x_T - a2.sqrt() * MU) / (a2 * SD**2 + 1 - a2).sqrt()


def x_T_of(n=2000, d=1, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("solver", [dpmpp_2m, heun])
def test_second_order_solvers_converge_at_second_order_to_the_exact_ode(schedule, solver):
    den, x_T = gaussian_denoiser(schedule), x_T_of()
    exact = exact_ode_endpoint(schedule, x_T)

    def err(fn, steps):
        return float((fn(den, x_T, schedule, steps) - exact).abs().max())

    e50, e100 = err(solver, 50), err(solver, 100)
    assert e50 < 0.03 and e100 < 0.006
    assert e50 / e100 > 3.0  # halving the step quarters the error (first order would halve it)
    assert e50 < err(ddim, 50) / 2  # and beats the first-order DDIM at the same number of steps


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dpmpp_2m_recovers_the_gaussian_in_25_steps(schedule):
    x = dpmpp_2m(gaussian_denoiser(schedule), x_T_of(4000, 8, seed=1), schedule, 25)
    assert float(x.mean()) == pytest.approx(MU, abs=0.02)
    assert float(x.std()) == pytest.approx(SD, rel=0.03)


@pytest.mark.parametrize("schedule,steps", [(SCHEDULES[0], 250), (SCHEDULES[1], None)])
def test_euler_maruyama_recovers_the_gaussian(schedule, steps):
    g = torch.Generator().manual_seed(2)
    x = euler_maruyama(gaussian_denoiser(schedule), x_T_of(4000, 8, seed=3), schedule, steps, generator=g)
    assert float(x.mean()) == pytest.approx(MU, abs=0.02)
    assert float(x.std()) == pytest.approx(SD, rel=0.03)


def test_euler_maruyama_is_stochastic_and_reproducible_with_passed_noise():
    schedule = CosineNoiseScheduler(100)
    den, x_T = gaussian_denoiser(schedule), x_T_of(10, 3)
    noise = torch.randn(100, 10, 3, dtype=torch.float64)
    a = euler_maruyama(den, x_T, schedule, noise=noise)
    torch.testing.assert_close(a, euler_maruyama(den, x_T, schedule, noise=noise))
    assert not torch.allclose(a, euler_maruyama(den, x_T, schedule, noise=torch.randn_like(noise)))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_plans_reproduce_the_plain_ddim_and_ddpm_loops(eta):
    """The engine walks plans; a DDIM or DDPM plan must be the same sampler as the loops."""
    schedule = CosineNoiseScheduler(1000)
    ab = schedule.alphas_cumprod.tolist()
    den, x_T = gaussian_denoiser(schedule), x_T_of(50, 4)
    noise = torch.randn(30, 50, 4, dtype=torch.float64)
    torch.testing.assert_close(run_plan(den, x_T, ddim_plan(ab, timesteps(1000, 30), eta), noise=noise),
                               ddim(den, x_T, schedule, 30, eta=eta, noise=noise))
    torch.testing.assert_close(run_plan(den, x_T, ddpm_plan(ab, timesteps(1000, 30)), noise=noise),
                               ddpm(den, x_T, schedule, 30, noise=noise))


def test_dpmpp_2m_first_step_is_ddim_and_heun_costs_two_evaluations_per_step():
    schedule = CosineNoiseScheduler(1000)
    den, x_T = gaussian_denoiser(schedule), x_T_of(20, 3)
    # two timesteps: one first-order step and the final one, which is DDIM on the same grid
    torch.testing.assert_close(dpmpp_2m(den, x_T, schedule, 2), ddim(den, x_T, schedule, 2))
    plan = sampler_plan("heun", schedule, 10)
    assert len(plan) == 2 * 10 - 1
    assert [st.t for st in plan if not st.from_mid] == logsnr_timesteps(schedule.alphas_cumprod.tolist(), 10)


@pytest.mark.parametrize("steps", [2, 10, 25, 50, 999])
def test_logsnr_grid(steps):
    ab = CosineNoiseScheduler(1000).alphas_cumprod.tolist()
    ts = logsnr_timesteps(ab, steps)
    assert len(ts) == steps and ts[0] == 999 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    if 10 <= steps <= 50:  # away from the pure-noise end, where timesteps are too coarse, gaps are even
        lam = [0.5 * math.log(ab[t] / (1 - ab[t])) for t in ts]
        gaps = [b - a for a, b in zip(lam, lam[1:])][steps // 2:]
        target = (lam[-1] - math.log(ab[-1] / (1 - ab[-1])) / 2) / (steps - 1)
        assert max(abs(g - target) for g in gaps) < 0.25 * target


def test_every_sampler_is_registered_with_a_plan_and_runs_through_the_model():
    assert set(SAMPLERS) == {"ddim", "ddpm", "dpmpp_2m", "euler_maruyama", "heun"}
    # and the distilled student's plan, walked with the student's parameters (tests/test_distillation.py)
    assert set(DEFAULT_SPACING) == set(SAMPLERS) | {"distilled"}
    model = ScIDiffModel(gene_dim=12, hidden_dim=16, num_layers=1, num_timesteps=50)
    for name in SAMPLERS:
        x = model.sample(5, sampler=name, steps=6, seed=0)
        assert x.shape == (5, 12) and torch.isfinite(x).all()
        torch.testing.assert_close(x, model.sample(5, sampler=name, steps=6, seed=0))
    # the default, picked by bench/bench_sampler_quality.py
    torch.testing.assert_close(model.sample(5, seed=1), model.sample(5, sampler="dpmpp_2m", steps=25, seed=1))


def test_cli_offers_every_sampler():
    from scidiff.cli import build_parser

    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    choices = next(a.choices for a in sample._actions if a.dest == "sampler")
    assert sorted(choices) == sorted([*SAMPLERS, "distilled"])


@pytest.mark.parametrize("sampler,steps", [("ddim", 200), ("dpmpp_2m", 100), ("heun", 100), ("euler_maruyama", 500),
                                           ("ddpm", 500)])
def test_a_walk_that_ends_at_a_noise_level_draws_the_noised_distribution(sampler, steps):
    """Ended at ``final_sigma`` the walk returns ``x / sqrt(alpha_bar)`` there: for Gaussian data,
    N(mu, sd^2 + final_sigma^2); the probability-flow ODE's map onto it is the affine quantile map.
    A plan ended at 0 is the plan as before."""
    schedule, sigma = SCHEDULES[0], 0.3
    plan = sampler_plan(sampler, schedule, steps, final_sigma=sigma)
    x_T = x_T_of(4000, 8, seed=4)
    x = run_plan(gaussian_denoiser(schedule), x_T, plan, generator=torch.Generator().manual_seed(5))
    assert float(x.mean()) == pytest.approx(MU, abs=0.02)
    assert float(x.std()) == pytest.approx(math.sqrt(SD**2 + sigma**2), rel=0.03)
    if sampler in ("ddim", "dpmpp_2m", "heun"):
        a2 = schedule.alphas_cumprod[-1]
        exact = MU + math.sqrt(SD**2 + sigma**2) * (x_T - a2.sqrt() * MU) / (a2 * SD**2 + 1 - a2).sqrt()
        assert float((x - exact).abs().max()) < 0.02
    assert sampler_plan(sampler, schedule, steps, final_sigma=0.0) == sampler_plan(sampler, schedule, steps)
    ab = schedule.alphas_cumprod.tolist()
    assert min(ab[st.t] for st in plan) < 1 / (1 + sigma**2)  # every evaluation above the final level
    assert max(ab[st.t] for st in plan) < 1 / (1 + sigma**2)
    with pytest.raises(ValueError, match="final_sigma"):
        sampler_plan(sampler, schedule, steps, final_sigma=-0.1)


def test_the_distilled_plan_is_deterministic_ddim_on_its_grid_and_can_end_above_clean_data():
    schedule = SCHEDULES[0]
    ab = schedule.alphas_cumprod.tolist()
    grid = [999, 749, 499, 249]
    assert sampler_plan("distilled", schedule, 4) == ddim_plan(ab, grid)
    ended = sampler_plan("distilled", schedule, 4, final_sigma=0.2)
    assert [st.t for st in ended] == grid and all(st.noise_coef == 0 for st in ended)
    assert ended[:-1] == ddim_plan(ab, grid)[:-1]
