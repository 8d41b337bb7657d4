"""Where generation ends (scidiff.models.final_noise): a model that memorises its training cells
is stopped at the noise level where its cells lie as far from the training cells as new cells
do; a model that generalises is left to end on clean data. Closed-form denoisers, known truth."""
import pytest
import torch

from scidiff.diffusion.plans import sampler_plan
from scidiff.diffusion.samplers import run_plan
from scidiff.models.final_noise import fit_final_sigma, nearest_distance
from scidiff.models.noise_scheduler import CosineNoiseScheduler

DIM = 6


class ClosedFormModel(torch.nn.Module):
    """What fit_final_sigma reads of a model (encode, sample, a device), around a closed-form
    denoiser: of N(0, I), or of the training cells themselves (the empirical distribution's
    exact denoiser, which draws back the training cells: a memorising model)."""

    def __init__(self, training: torch.Tensor | None):
        super().__init__()
        self.training_cells = training
        self.schedule = CosineNoiseScheduler(200)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return x

    def denoise(self, x, t, cond):
        ab = self.schedule.alphas_cumprod[t].to(x.dtype).unsqueeze(-1)
        if self.training_cells is None:  # N(0, I): E[x0 | x_t] = sqrt(ab) x_t
            return ab.sqrt() * x
        data = self.training_cells.to(x.dtype)
        logits = -torch.cdist(x, ab[:1].sqrt() * data) ** 2 / (2 * (1 - ab[:1]))
        return torch.softmax(logits, 1) @ data

    def sample(self, n, cond, *, sampler, steps, seed, return_expression, final_sigma, device):
        x_T = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return run_plan(self.denoise, x_T, sampler_plan(sampler, self.schedule, steps, final_sigma=final_sigma))


def cells(n, seed):
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_a_memorising_model_ends_where_its_cells_lie_as_far_from_training_as_new_cells():
    train, held = cells(400, 100), cells(1000, 101)
    model = ClosedFormModel(train)
    clean = model.sample(1000, None, sampler="dpmpp_2m", steps=25, seed=0, return_expression=False,
                         final_sigma=0.0, device=None)
    assert float(nearest_distance(clean, train).median()) < 0.1  # it draws back the training cells
    sigma = fit_final_sigma(model, train, held)
    assert 0.3 < sigma < 1.0
    ended = model.sample(1000, None, sampler="dpmpp_2m", steps=25, seed=0, return_expression=False,
                         final_sigma=sigma, device=None)
    target = float(nearest_distance(held, train).median())
    assert float(nearest_distance(ended, train).median()) == pytest.approx(target, rel=0.01)


def test_a_model_that_generalises_ends_on_clean_data():
    train, held = cells(400, 100), cells(1000, 101)
    assert fit_final_sigma(ClosedFormModel(None), train, held) == 0.0


def test_fitting_needs_cells():
    with pytest.raises(ValueError, match="held-out cells"):
        fit_final_sigma(ClosedFormModel(None), cells(10, 0), cells(1, 1))


def test_training_with_validation_cells_fits_where_generation_ends(kang_small, tmp_path):
    import scidiff
    from scidiff.models import ScIDiffModel
    from scidiff.training import ScIDiffTrainer

    data = scidiff.setup_anndata(kang_small, n_top_genes=100, condition_keys=["cell_type", "condition"])
    train, val = data.split(0.2, seed=0)
    for final_sigma in ("auto", 0.0):
        torch.manual_seed(0)
        model = ScIDiffModel.from_data(data, hidden_dim=32, num_layers=2, num_timesteps=100, conditioning_dim=16,
                                       latent_dim=8)
        trainer = ScIDiffTrainer(model, train.loader(64), val.loader(64, shuffle=False), device="cpu",
                                 checkpoint_dir=tmp_path / str(final_sigma), progress=False, final_sigma=final_sigma)
        trainer.train(3)
        saved = scidiff.load_model(tmp_path / str(final_sigma))
        assert float(saved.final_sigma) == float(model.final_sigma)
        if final_sigma == "auto":
            record = trainer.weights_kept["final_sigma"]
            assert record["fitted"] == pytest.approx(float(model.final_sigma))
            assert record["validation_cells"] == len(val) and record["training_cells"] == len(train)
        else:
            assert float(model.final_sigma) == 0.0 and "final_sigma" not in trainer.weights_kept
    with pytest.raises(ValueError, match="final_sigma"):
        ScIDiffTrainer(model, train.loader(64), device="cpu", progress=False, final_sigma=-1)
