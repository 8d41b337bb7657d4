"""``ScIDiffModel``: score network + noise schedule + condition encoder, behind one denoiser call.

The network predicts clean expression with EDM-style preconditioning (Karras et al. 2022) moved
to the variance-preserving process (:mod:`scidiff.models.preconditioning`):

    x0_hat = c_skip x_t + c_out F(c_in x_t, t, cond).

At high noise ``F`` predicts expression directly; at low noise it only corrects the skip path,
so the network never has to carry thousands of genes' worth of noise (the failure mode of plain
eps-prediction in gene space).

With perturbation covariates the model diffuses the residual around the perturbation response
``m`` (:meth:`ConditionEncoder.response`: the dose-weighted sum of single responses plus a learned
combination term, zero for singles): ``x0_hat = m + D(x_t - a m)``, where ``D`` is the
preconditioned network, which also reads ``m``. A network that ignores ``m`` predicts exactly
``m``, so unseen combinations of seen perturbations start from the fitted combination model and
the network learns only departures from it.

With ``latent_dim`` set, diffusion runs in a fixed linear latent: the top ``latent_dim`` principal
axes of the training cells (as scDiffusion diffuses in an autoencoder's latent, Luo et al. 2024,
here with a linear, exactly invertible-on-its-span map). Decoding is one matrix product, so
gene-level objectives still differentiate through it. On Kang PBMCs this beats diffusion over
2,000 genes by a wide margin at the same CPU budget (``bench/bench_generation.py``).
"""
from __future__ import annotations


import torch
from torch import nn

from ..checks import choice, condition_mapping, generator_seed, real_number, warn, whole_number, yes_no
from ..data.moments import GeneMoments
from ..data.spec import perturbation_rows
from ..diffusion.distillation import distilled_student
from ..diffusion.guidance import classifier_free_guidance, guidance_weight
from ..diffusion.plans import DEFAULT_SAMPLER, DEFAULT_STEPS
from ..diffusion.samplers import SAMPLERS, run_plan
from ..diffusion.schedules import NoiseScheduler, get_scheduler
from .conditioning import ConditionEncoder
from .effects import PerturbationEffects, extra_axes
from .final_noise import fit_final_sigma
from .observation import DetectionModel
from .preconditioning import Preconditioning
from .score_network import ScoreNetwork, timestep_embedding


SVD_MAX_CELLS = 50_000  # above this many cells, principal axes come from the covariance (eigh) ...
COVARIANCE_MAX_GENES = 8_192  # ... of at most this many genes (a 512 MiB float64 matrix)
CHUNK = 16_384  # cells converted to float64 at a time on the covariance path
OBSERVED = "measured where the model can"  # what observed=None means


@torch.no_grad()
def principal_axes(x: torch.Tensor, k: int):
    """``(mean [G], axes [k, G], scale)``: the top ``k`` principal axes of cells ``x [N, G]`` and
    the standard deviation of all their scores (float64). By the SVD of the centred cells, except
    for more than ``SVD_MAX_CELLS`` cells of at most ``COVARIANCE_MAX_GENES`` genes: there from
    their covariance accumulated in float64 over chunks of cells (:func:`axes_from_moments`;
    scikit-learn's PCA solver 'covariance_eigh'), so no float64 copy of the cells is made and the
    cost is ``N G^2`` rather than an SVD's."""
    x = torch.as_tensor(x)
    if len(x) > SVD_MAX_CELLS and x.shape[1] <= COVARIANCE_MAX_GENES:
        return principal_axes_from_covariance(x, k)
    x = x.double()
    mean = x.mean(0)
    _, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
    axes = vt[:k]
    return mean, axes, float(((x - mean) @ axes.T).std().clamp_min(1e-6))


@torch.no_grad()
def principal_axes_from_covariance(x: torch.Tensor, k: int):
    """:func:`principal_axes` from the cells' covariance, accumulated in float64 over chunks of
    ``CHUNK`` cells by :class:`~scidiff.data.moments.GeneMoments` (the same axes, each up to its
    sign, and the same scale)."""
    x = torch.as_tensor(x)
    moments = GeneMoments(x.shape[1], products=torch.float64)
    for i in range(0, len(x), CHUNK):
        moments.update(x[i:i + CHUNK].cpu().numpy())
    axes, scale, _ = axes_from_moments(moments.cov, len(x), k)
    return torch.as_tensor(moments.mean), axes, scale


def axes_from_moments(cov, n_cells: int, k: int):
    """``(axes [k, G], scale, variances [k])`` from the population covariance ``[G, G]`` of
    ``n_cells`` cells: the top ``k`` eigenvectors, the unbiased standard deviation of all
    ``n_cells x k`` scores (whose mean is 0) and each axis's population variance."""
    cov = torch.as_tensor(cov, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    top = torch.argsort(evals, descending=True)[:k]
    lam = evals[top].clamp_min(0)
    var = n_cells * float(lam.sum()) / max(n_cells * k - 1, 1)
    return evecs[:, top].T, max(var ** 0.5, 1e-6), lam


def _latent_width(kwargs: dict, n_cells: int, n_genes: int) -> int | None:
    """``kwargs['latent_dim']``, at most the number of cells and of genes (``kwargs`` set to it)."""
    latent = kwargs.get("latent_dim")
    if latent and latent > min(n_cells, n_genes):
        kwargs["latent_dim"] = latent = min(n_cells, n_genes)
    return latent


def _new_effects(spec) -> PerturbationEffects | None:
    """Unfitted effects for a spec's perturbation covariates (the other categorical covariates
    their contexts), or ``None`` without any."""
    if not spec.perturbation_keys:
        return None
    return PerturbationEffects(spec.perturbation_keys, [k for k in spec.categorical if k not in spec.perturbation_keys])


def _with_effect_axes(axes: torch.Tensor, effects, response_axes: int, n_genes: int, kwargs: dict) -> torch.Tensor:
    """The principal ``axes`` widened by up to ``response_axes`` directions so that the latent
    holds every fitted single effect exactly (``kwargs['latent_dim']`` set to the width)."""
    if effects is None:
        return axes
    singles = torch.cat([effects.of(k).single for k in effects.keys]).double()
    extra = extra_axes(singles.numpy(), axes.numpy(), min(response_axes, n_genes - len(axes)))
    axes = torch.cat([axes, torch.as_tensor(extra)])
    kwargs["latent_dim"] = len(axes)
    return axes


def axis_variance(x: torch.Tensor, mean: torch.Tensor, axes: torch.Tensor, scale: float) -> torch.Tensor:
    """The unbiased variance of cells ``x [N, G]`` on each latent coordinate
    ``(x - mean) @ axes.T / scale`` (``[k]``, float64; the cells are read in chunks)."""
    x, mean, axes = torch.as_tensor(x), mean.double(), axes.double()
    z = torch.cat([(x[i:i + CHUNK].double() - mean) @ axes.T / scale for i in range(0, max(len(x), 1), CHUNK)])
    return z.var(0) if len(z) > 1 else torch.ones(z.shape[1], dtype=torch.float64)


class ScIDiffModel(nn.Module):
    """Single-cell score-based diffusion model.

    Args:
        gene_dim: number of genes.
        hidden_dim, num_layers: width and depth of the residual MLP.
        num_timesteps: length of the discrete schedule (ignored if ``noise_scheduler`` is given).
        conditioning_dim: width of the timestep + condition embedding.
        noise_scheduler: a :class:`NoiseScheduler`, a name (``"cosine"``, ``"linear"``,
            ``"biological"``) or a config dict; default cosine.
        covariates: categorical covariate name -> number of values.
        continuous_covariates: numeric covariate names (dose, time).
        cond_dropout: probability of dropping each covariate in training (classifier-free guidance).
        sigma_data: standard deviation of the (scaled) data, for the preconditioning.
        axis_sigma_data: principal-axes models only: precondition each latent axis with its own
            standard deviation (fitted with the latent; :mod:`scidiff.models.preconditioning`)
            rather than one ``sigma_data`` for all, and weight the loss by :meth:`loss_scale`.
            Off by default: on Kang it lowers MMD and energy distance at the same AUC, but the
            perturbation suite loses Klein's unseen day 4 with it (``bench/README.md``,
            generation); checkpoints from before it load without.
        data_spec: the :class:`scidiff.data.DataSpec` (genes, normalisation, vocabularies); sets
            ``covariates`` and ``continuous_covariates`` when given.
        latent_dim: diffuse in this many principal axes of the training cells instead of in
            gene space (fitted by :meth:`fit_latent`; :meth:`from_data` does it).
        perturbations: perturbation covariate name -> number of single perturbations (combinations
            are sums of singles); ``dose_key``: the numeric covariate that scales them.
    """

    def __init__(self, gene_dim: int, hidden_dim: int = 512, num_layers: int = 6, num_timesteps: int = 1000,
                 conditioning_dim: int = 128, noise_scheduler=None, dropout: float = 0.0,
                 covariates: dict[str, int] | None = None, continuous_covariates=(), cond_dropout: float = 0.1,
                 sigma_data: float = 1.0, data_spec=None, latent_dim: int | None = None,
                 perturbations: dict[str, int] | None = None, dose_key: str | None = None,
                 axis_sigma_data: bool = False):
        super().__init__()
        if data_spec is not None:
            if data_spec.n_genes != gene_dim:
                raise ValueError(f"gene_dim={gene_dim} but the data has {data_spec.n_genes} genes")
            perturbations = {k: len(data_spec.categorical[k]) for k in data_spec.perturbation_keys}
            covariates = {k: len(v) for k, v in data_spec.categorical.items() if k not in perturbations}
            continuous_covariates = list(data_spec.continuous)
            dose_key = data_spec.dose_key
        if noise_scheduler is None or isinstance(noise_scheduler, (str, dict)):
            noise_scheduler = get_scheduler(noise_scheduler or "cosine", num_timesteps)
        if not isinstance(noise_scheduler, NoiseScheduler):
            raise TypeError("noise_scheduler must be a NoiseScheduler, a schedule name or a config dict")
        self.scheduler = noise_scheduler
        self.gene_dim, self.hidden_dim, self.num_layers = gene_dim, hidden_dim, num_layers
        self.conditioning_dim, self.dropout = conditioning_dim, dropout
        self.cond_dropout, self.sigma_data = float(cond_dropout), float(sigma_data)
        self.data_spec = data_spec
        self.latent_dim = int(latent_dim) if latent_dim else None
        knots = data_spec.continuous_knots if data_spec is not None else None
        self.condition_encoder = ConditionEncoder(covariates, continuous_covariates, conditioning_dim,
                                                  perturbations, dose_key, response_dim=self.diffusion_dim,
                                                  knots=knots)
        self.time_mlp = nn.Sequential(nn.Linear(conditioning_dim, conditioning_dim), nn.SiLU(),
                                      nn.Linear(conditioning_dim, conditioning_dim))
        self.score = ScoreNetwork(self.diffusion_dim, hidden_dim, num_layers, conditioning_dim, dropout,
                                  response_dim=self.condition_encoder.response_dim)
        if self.latent_dim:
            self.register_buffer("latent_mean", torch.zeros(gene_dim))
            self.register_buffer("latent_basis", torch.zeros(self.latent_dim, gene_dim))
            self.register_buffer("latent_scale", torch.ones(self.latent_dim))
        self.axis_sigma_data = bool(axis_sigma_data and self.latent_dim)
        if self.axis_sigma_data:  # each axis's standard deviation, set with the latent
            self.register_buffer("sigma_data_axes", torch.full((self.latent_dim,), self.sigma_data))
        # what a measurement looks like given the smooth (principal-axes) expression
        self.detection = DetectionModel(gene_dim) if self.latent_dim else None
        # the perturbations' gene-level effects, combination term and seen contexts (closed form)
        self.effects = (PerturbationEffects(list(perturbations), [k for k in (covariates or {})])
                        if perturbations else None)
        # unseen perturbations from prior knowledge (scidiff.models.perturbation_prior), if fitted
        self.perturbation_prior = None
        # a few-step student (scidiff.training.distillation.distil), if distilled
        self.student = None
        self.register_buffer("alphas_cumprod", noise_scheduler.alphas_cumprod.float(), persistent=False)
        # the noise level generation ends at (0: clean data; fit_final_sigma sets it)
        self.register_buffer("final_sigma", torch.zeros(()))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As :meth:`torch.nn.Module.load_state_dict`; a checkpoint's learned combination term
        (``condition_encoder.interaction``, before the term was chosen by cross-validation) is
        dropped: its combinations are then additive; a checkpoint from before the closed-form
        effects loads with them unfitted (:func:`scidiff.tasks.perturb.perturb` then decodes
        under the target directly)."""
        old = [k for k in state_dict if k.startswith("condition_encoder.interaction.")]
        if "final_sigma" not in state_dict:  # saved before generation could end above clean data
            state_dict = {**state_dict, "final_sigma": torch.zeros(())}
        if self.effects is not None and not any(k.startswith("effects.") for k in state_dict):
            state_dict = {**state_dict, **{f"effects.{k}": v for k, v in self.effects.state_dict().items()}}
        if old:
            state_dict = {k: v for k, v in state_dict.items() if k not in old}
            warn("this checkpoint's learned combination term is not used any more: combinations are "
                 "additive (retrain to have the term chosen by cross-validation)")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- configuration ---------------------------------------------------------------------------
    @property
    def diffusion_dim(self) -> int:
        """Width of the space diffusion runs in: ``latent_dim`` or the number of genes."""
        return self.latent_dim or self.gene_dim

    @property
    def num_timesteps(self) -> int:
        return self.scheduler.num_timesteps

    def config(self) -> dict:
        return {"gene_dim": self.gene_dim, "hidden_dim": self.hidden_dim, "num_layers": self.num_layers,
                "num_timesteps": self.num_timesteps, "conditioning_dim": self.conditioning_dim,
                "noise_scheduler": self.scheduler.config(), "dropout": self.dropout,
                "covariates": dict(self.condition_encoder.categorical),
                "continuous_covariates": list(self.condition_encoder.continuous),
                "perturbations": dict(self.condition_encoder.perturbations),
                "dose_key": self.condition_encoder.dose_key,
                "cond_dropout": self.cond_dropout, "sigma_data": self.sigma_data, "latent_dim": self.latent_dim,
                "axis_sigma_data": self.axis_sigma_data}

    @classmethod
    def from_data(cls, data, response_axes: int = 64, **kwargs) -> "ScIDiffModel":
        """A model sized for a :class:`scidiff.data.CellData` (genes, covariates, spec); with
        ``latent_dim`` its principal axes are fitted on ``data``.

        With perturbation covariates, their gene-level effects are fitted first
        (:class:`~scidiff.models.effects.PerturbationEffects`: single effects, the combination
        term chosen by cross-validation, the seen contexts; the report is in
        ``model.effects_report``), the latent gains up to ``response_axes`` directions beyond
        the ``latent_dim`` principal axes so that it holds every single's effect exactly, and each
        single's response starts at its effect."""
        latent = _latent_width(kwargs, len(data), data.spec.n_genes)
        effects = _new_effects(data.spec)
        report = effects.fit(data.x, data.covariates, data.spec.dose_key) if effects is not None else None
        if latent:
            mean, axes, scale = principal_axes(data.x, latent)
            axes = _with_effect_axes(axes, effects, response_axes, data.spec.n_genes, kwargs)
        model = cls(gene_dim=data.spec.n_genes, data_spec=data.spec, **kwargs)
        if latent:
            model.set_latent(mean, axes, scale, axis_variance=axis_variance(data.x, mean, axes, scale))
            model.fit_detection(data.x)
        if effects is not None:
            model._attach_effects(effects, report, data.covariates, lambda rows: data.x[torch.as_tensor(rows)])
        return model

    @classmethod
    def from_streamed(cls, cells, response_axes: int = 64, seed: int = 0, progress: bool = False,
                      **kwargs) -> "ScIDiffModel":
        """:meth:`from_data` for cells streamed from a file (the :class:`scidiff.data.StreamedCells`
        :func:`scidiff.data.setup_streaming` returns, with the mean and covariance of all the
        file's cells, which are the cells set up on): the
        principal axes from the covariance, the perturbation effects from one streamed pass
        (:meth:`~scidiff.models.effects.PerturbationEffects.fit_streamed`), the detection model
        from a subsample of whole blocks and the reference control cells read one by one, so
        ``X`` is never loaded. ``seed`` draws the detection model's subsample."""
        spec, moments = cells.spec, cells.moments or {}
        latent = _latent_width(kwargs, len(cells), spec.n_genes)
        if latent and moments.get("cov") is None:
            raise ValueError("a latent model needs the cells' covariance: setup_streaming(..., covariance=True)")
        effects = _new_effects(spec)
        report = effects.fit_streamed(cells, spec.dose_key, progress) if effects is not None else None
        if latent:
            n = int(moments["n"])
            mean = torch.as_tensor(moments["mean"], dtype=torch.float64)
            axes, scale, _ = axes_from_moments(moments["cov"], n, latent)
            axes = _with_effect_axes(axes, effects, response_axes, spec.n_genes, kwargs)
            cov = torch.as_tensor(moments["cov"], dtype=torch.float64)
            # each axis's unbiased variance in latent coordinates, as axis_variance gives it from the cells
            variance = torch.einsum("kg,gh,kh->k", axes, cov, axes) * n / max(n - 1, 1) / scale**2
        model = cls(gene_dim=spec.n_genes, data_spec=spec, **kwargs)
        if latent:
            model.set_latent(mean, axes, scale, axis_variance=variance)
            model.fit_detection(cells.sample_x(model.detection_cells(), seed=seed))
        if effects is not None:
            model._attach_effects(effects, report, cells.covariates, cells.read_x)
        return model

    def _attach_effects(self, effects: PerturbationEffects, report: dict, covariates: dict, read) -> None:
        """Take fitted effects: responses started at them, the reference control cells kept
        (``read(rows)``: those cells in model space)."""
        self.effects = effects
        self.effects_report = report
        self.init_responses()
        self.effects.fit_reference(covariates, read, lambda x: self.encode(x.to(torch.float32)))

    @torch.no_grad()
    def init_responses(self) -> None:
        """Start each single perturbation's response at its fitted gene-level effect, carried into
        the diffusion space (exactly, when the latent holds the effects' directions)."""
        enc = self.condition_encoder
        for key in enc.perturbations:
            single = self.effects.of(key).single.to(enc.responses[key])
            enc.responses[key].copy_(self.encode(single) - self.encode(torch.zeros_like(single[:1])))

    def parameter_groups(self, learning_rate: float, response_lr_scale: float = 10.0) -> list[dict]:
        """Optimizer groups: the response model (a small least-squares problem) learns
        ``response_lr_scale`` times faster than the network, without weight decay."""
        fast = ("condition_encoder.responses", "condition_encoder.response_base",
                "condition_encoder.response_bias", "condition_encoder.dose_response")
        groups = {"network": [], "responses": []}
        for name, p in self.named_parameters():
            groups["responses" if name.startswith(fast) else "network"].append(p)
        return [{"params": groups["network"], "lr": learning_rate, "lr_scale": 1.0},
                {"params": groups["responses"], "lr": learning_rate * response_lr_scale, "lr_scale": response_lr_scale,
                 "weight_decay": 0.0}]

    # -- the latent map --------------------------------------------------------------------------
    @torch.no_grad()
    def fit_latent(self, x: torch.Tensor) -> None:
        """Principal axes of cells ``x [N, G]`` (model space); the latent is scaled by one shared
        standard deviation so its coordinates have unit mean variance (axes keep their ratios)."""
        if not self.latent_dim:
            raise ValueError("this model diffuses in gene space (latent_dim=None)")
        mean, axes, scale = principal_axes(x, self.latent_dim)
        self.set_latent(mean, axes, scale, axis_variance=axis_variance(x, mean, axes, scale))

    @torch.no_grad()
    def set_latent(self, mean: torch.Tensor, axes: torch.Tensor, scale: float,
                   axis_variance: torch.Tensor | None = None) -> None:
        """The latent map: ``mean [G]``, orthonormal ``axes [latent_dim, G]``, one ``scale``;
        ``axis_variance [latent_dim]``: the cells' variance on each latent coordinate, for
        per-axis preconditioning (``axis_sigma_data``; left as it is when not given)."""
        if axes.shape != self.latent_basis.shape:
            raise ValueError(f"{tuple(axes.shape)} axes for a latent of shape {tuple(self.latent_basis.shape)}")
        self.latent_mean.copy_(mean.float())
        self.latent_basis.copy_(axes.float())
        self.latent_scale.fill_(float(scale))
        if self.axis_sigma_data and axis_variance is not None:
            self.sigma_data_axes.copy_(torch.as_tensor(axis_variance).double().clamp_min(1e-6).sqrt().float())

    @torch.no_grad()
    def fit_latent_from_moments(self, mean, cov, n_cells: int) -> None:
        """:meth:`fit_latent` from streamed moments of ``n_cells`` cells in model space: the mean
        ``[G]`` and population covariance ``[G, G]`` (as ``scidiff.data.setup_streaming`` gives
        them). Same axes (each up to its sign) and scale as :meth:`fit_latent` on those cells."""
        if not self.latent_dim:
            raise ValueError("this model diffuses in gene space (latent_dim=None)")
        axes, scale, lam = axes_from_moments(cov, n_cells, self.latent_dim)
        # each axis's unbiased variance in latent coordinates, as axis_variance gives it
        self.set_latent(torch.as_tensor(mean, dtype=torch.float64), axes, scale,
                        axis_variance=lam * n_cells / max(n_cells - 1, 1) / scale**2)

    def detection_cells(self, max_cells: int = 20_000, max_entries: int = 50_000_000) -> int:
        """How many cells :meth:`fit_detection` reads: at most ``max_cells`` and ``max_entries``
        cell-gene values, at least 1,000 cells."""
        return min(max_cells, max(1_000, max_entries // self.gene_dim))

    @torch.no_grad()
    def fit_detection(self, x: torch.Tensor, max_cells: int = 20_000, max_entries: int = 50_000_000,
                      seed: int = 0) -> None:
        """Fit the detection model (:class:`~scidiff.models.observation.DetectionModel`) on
        cells ``x [N, G]`` in model space (at most ``max_cells`` of them and ``max_entries``
        cell-gene values, drawn at random, at least 1,000 cells): each cell's smooth expression
        is its projection on the principal axes, its measurement the cell itself. ``x`` may be
        the cells as :func:`~scidiff.data.transform_like` gives them (their ``.x``)."""
        if self.detection is None or self.data_spec is None:
            raise ValueError("the detection model belongs to principal-axes models with a data spec (latent_dim)")
        x = torch.as_tensor(getattr(x, "x", x), dtype=torch.float32, device=self.latent_basis.device)
        keep = self.detection_cells(max_cells, max_entries)
        if len(x) > keep:
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:keep].to(x.device)]
        measured = self.data_spec.to_measured(x)
        smooth = self.data_spec.to_expression(self.decode(self.encode(x)), clip=False)
        self.detection.fit(smooth, measured)

    def observe(self, x: torch.Tensor, generator: torch.Generator | None = None,
                within: dict[int, tuple[float, float]] | None = None) -> torch.Tensor:
        """A measured (sparse, log1p-normalised) profile for each generated cell ``x [B, G]`` in
        model space: its smooth expression through the detection model (``within``: gene index
        -> interval the measurement is conditioned on, see
        :meth:`~scidiff.models.observation.DetectionModel.sample`)."""
        if self.detection is None or self.data_spec is None:
            raise ValueError("observed expression needs a principal-axes model with a data spec (latent_dim)")
        return self.detection.sample(self.data_spec.to_expression(x, clip=False), generator, within)

    def resolve_observed(self, observed: bool | None = None, return_expression: bool = True) -> bool:
        """Whether generation returns measured cells (:meth:`observe`) rather than smooth
        expression: ``observed`` when given; by default (``None``) measured cells when the model
        has a fitted detection model and expression is asked for (``return_expression``)."""
        if yes_no("observed", observed, OBSERVED) is not None:  # 'false' read as True
            return bool(observed)
        fitted = self.detection is not None and bool(self.detection.fitted) and self.data_spec is not None
        return bool(return_expression and fitted)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Cells in model space ``[B, G]`` -> diffusion space ``[B, diffusion_dim]``."""
        if not self.latent_dim:
            return x
        return ((x - self.latent_mean) @ self.latent_basis.T) / self.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> cells in model space (the identity without a latent)."""
        if not self.latent_dim:
            return z
        return (z * self.latent_scale) @ self.latent_basis + self.latent_mean

    # -- the denoiser seam -----------------------------------------------------------------------
    def precondition(self, t: torch.Tensor) -> Preconditioning:
        """The preconditioning at timesteps ``t [B]`` (``c_in``, ``c_skip``, ``c_out``,
        ``sqrt_ab``, each ``[B, 1]``; with ``axis_sigma_data`` the first three ``[B, D]``)."""
        return Preconditioning.at(self.alphas_cumprod, t,
                                  self.sigma_data_axes if self.axis_sigma_data else self.sigma_data)

    def loss_scale(self, t: torch.Tensor) -> torch.Tensor:
        """What the denoising loss divides the error ``z0_hat - z0`` by at timesteps ``t [B]``:
        ``c_out`` (EDM's weighting, Karras et al. 2022), ``[B, 1]``; with per-axis
        preconditioning the geometric mean of each axis's ``c_out`` and the shared one's,
        ``[B, D]``. Each axis's own ``c_out`` alone gives the top axes ``1 / sd_k^2`` of the weight
        at high noise, and on Kang it cost the DE slope (0.903 -> 0.874); the shared one alone
        lost the realism per-axis preconditioning gains (one classifier draw: AUC 0.591);
        halfway kept both (DE slope 0.899, MMD 0.0084 against the default's 0.0103;
        bench/README.md)."""
        shared = Preconditioning.at(self.alphas_cumprod, t, self.sigma_data).c_out
        return (self.precondition(t).c_out * shared).sqrt() if self.axis_sigma_data else shared

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep part of the embedding, ``[B, conditioning_dim]``."""
        return self.time_mlp(timestep_embedding(t.float() * (1000.0 / self.num_timesteps), self.conditioning_dim))

    def embed(self, t: torch.Tensor, cond: dict | None) -> torch.Tensor:
        """Timestep + condition embedding ``[B, conditioning_dim]``."""
        return self.time_embedding(t) + self.condition_encoder(cond, t.shape[0], t.device)

    def response(self, cond: dict | None, batch_size: int, device) -> torch.Tensor | None:
        """The perturbation response ``m`` the model diffuses around (``None`` without one); fitted
        by the response model's loss, not by denoising (detached)."""
        response = self.condition_encoder.response(cond, batch_size, device)
        return None if response is None else response.detach()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        """The denoiser: predicted clean sample for ``x_t [B, diffusion_dim]`` at timesteps
        ``t [B]`` (gene space, or the latent when ``latent_dim`` is set; see :meth:`decode`)."""
        t = t.to(x_t.device).long().expand(x_t.shape[0])
        emb = self.embed(t, cond)
        return self.precondition(t).apply(x_t, lambda x, response: self.score(x, emb, response).to(x_t.dtype),
                                          self.response(cond, x_t.shape[0], x_t.device))

    # -- conditions ------------------------------------------------------------------------------
    def fit_final_sigma(self, training: torch.Tensor, held_out: torch.Tensor, conditioning: dict | None = None,
                        **kwargs) -> float:
        """Set :attr:`final_sigma` from training cells and held-out cells (model space) and the
        held-out cells' conditions: :func:`scidiff.models.final_noise.fit_final_sigma`."""
        sigma = fit_final_sigma(self, training, held_out, conditioning, **kwargs)
        self.final_sigma.fill_(sigma)
        return sigma

    def encode_conditioning(self, conditioning: dict | None, batch_size: int) -> dict[str, torch.Tensor]:
        """Labels (``{'cell_type': 'B'}``), codes or tensors -> code tensors of length ``batch_size``."""
        conditioning = condition_mapping(conditioning, "conditioning")  # "B" is not a dict
        if not conditioning:
            return {}
        if self.data_spec is not None:
            return self.data_spec.encode_conditions(conditioning, batch_size)
        enc, out = self.condition_encoder, {}
        for k, v in conditioning.items():
            if k not in enc.keys:
                raise KeyError(f"unknown condition key {k!r}; the model knows {enc.keys}")
            if k in enc.perturbations:
                t = perturbation_rows(v, enc.perturbations[k])
            else:
                t = torch.as_tensor(v).reshape(-1)
            if k in enc.categorical:
                t = t.long()
                if t.numel() and (t.min() < 0 or t.max() >= enc.categorical[k]):
                    raise ValueError(f"codes for {k!r} must lie in [0, {enc.categorical[k]}), got {t.tolist()}")
            out[k] = (t.expand(batch_size, *t.shape[1:]) if t.shape[0] == 1 else t).clone()
        return out

    # -- sampling --------------------------------------------------------------------------------
    def sampling_steps(self, sampler: str, steps: int | None, eta: float = 0.0) -> int | None:
        """The steps ``sampler`` walks for a requested ``steps``: ``steps`` itself, except for
        ``"distilled"``, which walks its student's own (``None`` and the default stand for them;
        another number, a model without a student or ``eta != 0`` is an error naming the fix)."""
        return distilled_student(self.student, steps, eta).steps if sampler == "distilled" else steps

    @torch.no_grad()
    def sample(self, batch_size: int, conditioning: dict | None = None, *, sampler: str = DEFAULT_SAMPLER,
               steps: int | None = DEFAULT_STEPS, eta: float = 0.0, guidance_scale: float = 1.0,
               seed: int | None = None,
               generator: torch.Generator | None = None, return_expression: bool = True,
               observed: bool | None = None, progress: bool = False, device=None,
               final_sigma: float | None = None) -> torch.Tensor:
        """Generate ``batch_size`` cells ``[B, G]``.

        ``conditioning``: covariate -> label, code or per-cell tensor (absent = unconditional).
        ``sampler``: ``"dpmpp_2m"`` (DPM-Solver++(2M), the default: at 25 steps it matches DDPM at
        1,000 on Kang, ``bench/bench_sampler_quality.py``), ``"ddim"`` (``eta``), ``"ddpm"``,
        ``"heun"`` (2 network evaluations a step) or ``"euler_maruyama"``; ``steps=None`` = all T.
        ``"distilled"``: the model's few-step student (``model.student``, progressive distillation,
        :func:`scidiff.training.distillation.distil`) in deterministic DDIM on its own grid, in
        its own number of steps (:meth:`sampling_steps`).
        For many cells, :class:`scidiff.engine.SamplingEngine` gives the same cells faster.
        ``guidance_scale``: classifier-free guidance weight (1 = conditional model only).
        Returns log1p-normalised expression when the model carries a data spec and
        ``return_expression``; otherwise values in the model's space. The expression is measured
        by default where the model can measure it (:meth:`resolve_observed`: principal-axes
        models with a fitted detection model): a measurement of each cell (:meth:`observe`:
        sparse, with the data's detection rates). ``observed=False``: each cell's smooth
        expression (clipped at 0); ``observed=True``: measured, or an error where the model
        cannot measure. ``final_sigma``: the noise level the walk ends at (``None``: the model's
        own, :meth:`fit_final_sigma`; 0: clean data).
        """
        whole_number("batch_size (the number of cells)", batch_size, 1, what="an integer >= 1", integral_floats=False)
        choice("sampler", sampler, sorted([*SAMPLERS, "distilled"]))
        progress, return_expression = yes_no("progress", progress), yes_no("return_expression", return_expression)
        observed = self.resolve_observed(observed, return_expression)  # 'no' refused before the walk
        guidance_scale = guidance_weight(guidance_scale)
        student = distilled_student(self.student, steps, eta) if sampler == "distilled" else None
        device = torch.device(device) if device is not None else next(self.parameters()).device
        cond = {k: v.to(device) for k, v in self.encode_conditioning(conditioning, batch_size).items()}
        if generator is None:
            generator = torch.Generator(device=device)
            seed = generator_seed(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item())
            generator.manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            x_T = torch.randn(batch_size, self.diffusion_dim, generator=generator, device=device)
            denoiser = self if student is None else student.denoiser(self)
            if guidance_scale != 1.0:
                null = self.condition_encoder.null_condition(batch_size, device)
                cond = {**null, **cond}
                denoiser = classifier_free_guidance(denoiser, guidance_scale, null)
            kwargs = {"eta": eta} if sampler == "ddim" else {}
            end = float(self.final_sigma) if final_sigma is None else real_number(  # True was 1.0
                "final_sigma", final_sigma, lambda v: v >= 0, what="a number >= 0 (None: the model's own)")
            if student is not None:
                x = run_plan(denoiser, x_T, student.plan(self.scheduler, end), cond=cond, progress=progress,
                             desc=f"distilled ({student.steps} steps)")
            else:
                x = SAMPLERS[sampler](denoiser, x_T, self.scheduler, steps, cond=cond, generator=generator,
                                      progress=progress, final_sigma=end, **kwargs)
            x = self.decode(x)
        finally:
            self.train(was_training)
        if observed:
            return self.observe(x, generator)
        if return_expression and self.data_spec is not None:
            return self.data_spec.to_expression(x)
        return x
