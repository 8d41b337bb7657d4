"""Samplers against an analytic case: a Gaussian target whose exact denoiser is known."""
import pytest
import torch

from scidiff.models.noise_scheduler import CosineNoiseScheduler, LinearNoiseScheduler
from scidiff.diffusion.guidance import classifier_free_guidance
from scidiff.diffusion.plans import timesteps
from scidiff.diffusion.samplers import ddim, ddim_invert, ddpm
from gaussian_target import MU, SD, gaussian_denoiser


@pytest.mark.parametrize("schedule", [CosineNoiseScheduler(1000), LinearNoiseScheduler(1000)])
def test_ddpm_recovers_gaussian(schedule):
    g = torch.Generator().manual_seed(0)
    x = ddpm(gaussian_denoiser(schedule), torch.randn(4000, 8, generator=g, dtype=torch.float64), schedule,
             generator=g)
    assert float(x.mean()) == pytest.approx(MU, abs=0.02)
    assert float(x.std()) == pytest.approx(SD, rel=0.03)


@pytest.mark.parametrize("eta,steps", [(0.0, 100), (1.0, None)])
def test_ddim_recovers_gaussian(eta, steps):
    """The deterministic sampler converges fast; the stochastic one (eta=1) plugs in E[x0|x_t]
    and so loses Var[x0|x_t] per step (Bao et al. 2022): it is exact only on the fine grid."""
    schedule = CosineNoiseScheduler(1000)
    g = torch.Generator().manual_seed(1)
    x = ddim(gaussian_denoiser(schedule), torch.randn(4000, 8, generator=g, dtype=torch.float64), schedule, steps,
             eta=eta, generator=g)
    assert float(x.mean()) == pytest.approx(MU, abs=0.02)
    assert float(x.std()) == pytest.approx(SD, rel=0.03)


@pytest.mark.parametrize("schedule", [CosineNoiseScheduler(1000), LinearNoiseScheduler(1000)])
def test_ddim_round_trip_is_near_exact(schedule):
    den = gaussian_denoiser(schedule)
    x0 = MU + SD * torch.randn(256, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errors = {}
    for steps in (100, 1000):
        x_T = ddim_invert(den, x0, schedule, steps)
        errors[steps] = float((ddim(den, x_T, schedule, steps) - x0).abs().max())
    # on the fine grid the latent is standard normal, as the forward process promises
    assert float(x_T.mean()) == pytest.approx(0.0, abs=0.05)
    assert float(x_T.std()) == pytest.approx(1.0, rel=0.05)
    assert errors[1000] < 0.02 * SD * 2  # within 2% of the data's spread, cell by cell
    assert errors[1000] < errors[100] / 5  # and first order: shrinks with the step size


def test_noise_can_be_passed_in_for_reproducibility():
    schedule = CosineNoiseScheduler(100)
    den = gaussian_denoiser(schedule)
    x_T = torch.randn(10, 3, dtype=torch.float64)
    noise = torch.randn(100, 10, 3, dtype=torch.float64)
    a = ddpm(den, x_T, schedule, noise=noise)
    b = ddpm(den, x_T, schedule, noise=noise)
    torch.testing.assert_close(a, b)
    c = ddim(den, x_T, schedule, 20, eta=1.0, noise=noise)
    d = ddim(den, x_T, schedule, 20, eta=1.0, noise=noise)
    torch.testing.assert_close(c, d)


def test_ddim_with_eta_one_equals_ddpm_on_the_same_grid():
    schedule = CosineNoiseScheduler(1000)
    den = gaussian_denoiser(schedule)
    x_T = torch.randn(50, 4, dtype=torch.float64)
    noise = torch.randn(25, 50, 4, dtype=torch.float64)
    torch.testing.assert_close(ddim(den, x_T, schedule, 25, eta=1.0, noise=noise),
                               ddpm(den, x_T, schedule, 25, noise=noise))


def test_timesteps_grid():
    assert timesteps(1000, 5) == [999, 749, 500, 250, 0]
    assert timesteps(10, None) == list(range(9, -1, -1))
    with pytest.raises(ValueError):
        timesteps(10, 0)


def test_classifier_free_guidance_combine():
    calls = []

    def den(x, t, cond):
        calls.append(x.shape[0])
        return x * 0 + cond["c"].unsqueeze(-1).to(x.dtype)

    guided = classifier_free_guidance(den, 3.0, {"c": torch.tensor([0.5])})
    out = guided(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), {"c": torch.tensor([2.0])})
    # u + w (c - u) = 0.5 + 3 * 1.5
    torch.testing.assert_close(out, torch.full((4, 2), 5.0))
    assert calls == [8]  # both halves in one batched call
    assert classifier_free_guidance(den, 1.0) is den
