import math

import numpy as np
import pytest
import torch

from scidiff.models.noise_scheduler import (BiologicalNoiseScheduler, CosineNoiseScheduler, LinearNoiseScheduler,
                                            get_scheduler)


def test_linear_schedule_closed_form():
    s = LinearNoiseScheduler(100, 1e-4, 0.02)
    betas = np.linspace(1e-4, 0.02, 100)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)


def test_cosine_schedule_closed_form():
    T, s_ = 1000, 0.008
    s = CosineNoiseScheduler(T, s_)
    f = lambda u: math.cos((u + s_) / (1 + s_) * math.pi / 2) ** 2
    expected = np.array([f((t + 1) / T) / f(0) for t in range(T)])
    # betas are clipped at 0.999 only at the very end
    np.testing.assert_allclose(s.alphas_cumprod.numpy()[:-1], expected[:-1], rtol=1e-9)
    assert s.alphas_cumprod[-1] < 1e-4


def test_biological_schedule_is_time_warped_cosine():
    T = 1000
    cos = CosineNoiseScheduler(T)
    same = BiologicalNoiseScheduler(T, sparsity_factor=0.0)
    torch.testing.assert_close(same.alphas_cumprod, cos.alphas_cumprod)
    bio = BiologicalNoiseScheduler(T, sparsity_factor=0.8)
    s_ = 0.008
    f = lambda u: math.cos((u + s_) / (1 + s_) * math.pi / 2) ** 2
    expected = np.array([f(((t + 1) / T) ** 1.8) / f(0) for t in range(T)])
    np.testing.assert_allclose(bio.alphas_cumprod.numpy()[:-1], expected[:-1], rtol=1e-9)
    # same end points, strictly more signal in between
    assert bool((bio.alphas_cumprod[:-1] >= cos.alphas_cumprod[:-1]).all())
    assert abs(float(bio.alphas_cumprod[-1]) - float(cos.alphas_cumprod[-1])) < 1e-6


def test_biological_schedule_spends_more_steps_where_counts_are_resolved(kang):
    """On real sparse data: the share of timesteps whose noise is below a one-count step.

    A gene going from 0 to 1 count moves log1p-normalised expression by log1p(1e4/library) on
    this data set; while the noise standard deviation (relative to the signal scale) is below that
    step, the zero/non-zero pattern of a cell is still readable from x_t. The biological schedule,
    with its factor set from the data's zero fraction, keeps that regime for many more timesteps.
    """
    import scipy.sparse as sp

    x = kang.X
    zero_fraction = 1 - x.nnz / (x.shape[0] * x.shape[1]) if sp.issparse(x) else float((x == 0).mean())
    assert zero_fraction > 0.8  # real scRNA-seq is sparse
    step = float(np.median(x.data[x.data > 0]))  # a typical smallest non-zero value: about one count
    cos = CosineNoiseScheduler(1000)
    bio = BiologicalNoiseScheduler.from_sparsity(zero_fraction, 1000)
    assert bio.sparsity_factor == pytest.approx(zero_fraction)

    def resolved_steps(s):
        ab = s.alphas_cumprod
        noise_to_signal = ((1 - ab) / ab).sqrt()
        return int((noise_to_signal < step / 2).sum())

    assert resolved_steps(bio) > 1.3 * resolved_steps(cos)


def test_forward_process_moments():
    s = CosineNoiseScheduler(1000)
    x0 = torch.full((20000, 1), 2.0, dtype=torch.float64)
    t = torch.full((20000,), 500)
    xt = s.add_noise(x0, torch.randn_like(x0), t)
    ab = float(s.alphas_cumprod[500])
    assert float(xt.mean()) == pytest.approx(2 * math.sqrt(ab), abs=0.03)
    assert float(xt.var()) == pytest.approx(1 - ab, rel=0.05)


def test_get_scheduler_config_round_trip_and_errors():
    for s in (LinearNoiseScheduler(50), CosineNoiseScheduler(50), BiologicalNoiseScheduler(50, 0.3)):
        again = get_scheduler(s.config())
        torch.testing.assert_close(again.alphas_cumprod, s.alphas_cumprod)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_scheduler("quadratic")
    with pytest.raises(ValueError, match="sparsity_factor"):
        BiologicalNoiseScheduler(10, -1)
