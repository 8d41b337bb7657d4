"""The condition encoder: categorical covariates, perturbations (single or combined, with a
dose), numeric covariates (time) and the null condition used for classifier-free guidance
(Ho & Salimans 2022).

A numeric covariate such as time is embedded piecewise-linearly between the values training
measured (:class:`PiecewiseLinearEmbedding`, a linear B-spline basis): the embedding at a
measured day is that day's own, learned as a category's would be, and an unmeasured day between
two measured ones gets the straight mix of theirs, so the condition moves monotonically from one
to the next. A network of the value (an MLP of ``log1p(t)``, kept for checkpoints saved before
the knots) is free to do anything between three measured days, and did: on Klein's time course
(days 0, 2, 7 seen, day 4 asked for) it put day 3 on day 2 and its day-4 RMSE ranged 0.39-0.53
over six seeds, the knots 0.39-0.44 (the linear-in-time baseline 0.449).

Perturbations are encoded as in CPA (Lotfollahi et al. 2023): a cell's perturbation embedding
is the sum of the embeddings of the single perturbations it received, each weighted by a learned
sigmoid of its log dose, so ``A+B`` is representable from ``A`` and ``B`` alone. Each single
perturbation also owns a response vector in the diffusion space, initialised from its gene-level
effect fitted in closed form (:mod:`scidiff.models.effects`, whose directions the latent holds
exactly); a combination's response is the dose-weighted sum of its singles' (the additive model
of CPA and GEARS). Where cross-validation over the seen combinations finds a non-additive term,
it is applied at the gene level by :func:`scidiff.tasks.perturb.perturb`, not here.

``m`` is the centre the model diffuses around and an input of the network. Responses and
coefficients are fitted by least squares to the training cells in a model of their mean, a mean
per covariate value plus ``m`` (:meth:`ConditionEncoder.additive_mean`), not by the denoising
loss; the network learns departures from ``m`` (e.g. cell-type-specific responses).

In a batch a perturbation covariate is a multi-hot ``FloatTensor[B, n + 1]``: one column per
single perturbation, all zeros for control, and the last column set for the null ("dropped") value.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.spec import perturbation_rows  # noqa: F401  (re-exported: the encoder's input format)


class PiecewiseLinearEmbedding(nn.Module):
    """``e(v) = sum_k B_k(v) E_k``: one learned vector ``E_k`` per knot ``t_k`` (the covariate's
    values seen in training) mixed by the hat functions of a linear B-spline (de Boor 1978),
    ``B_k(v) = clip(min(1 + (v - t_k) / (t_k - t_{k-1}), 1 - (v - t_k) / (t_{k+1} - t_k)), 0, 1)``:
    at a knot its own vector, between two knots their straight mix, beyond the ends the end's
    vector (the data spec warns outside the training range). Elementwise operations only, so it
    exports to ONNX and replays in CUDA graphs."""

    def __init__(self, knots, dim: int):
        super().__init__()
        t = torch.as_tensor(sorted({float(k) for k in knots}), dtype=torch.float32)
        gaps = t.diff()
        inv = torch.where(gaps > 0, 1 / gaps.clamp_min(1e-12), torch.zeros_like(gaps))
        self.register_buffer("knots", t)
        self.register_buffer("inv_before", torch.cat([torch.zeros(1), inv]))  # 0: no knot before the first
        self.register_buffer("inv_after", torch.cat([inv, torch.zeros(1)]))   # 0: none after the last
        self.table = nn.Parameter(0.02 * torch.randn(len(t), dim))

    def basis(self, v: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` hat-function weights of the values ``v [B]`` (each row sums to 1)."""
        d = v.to(self.knots.dtype).unsqueeze(-1) - self.knots
        return torch.minimum(1 + d * self.inv_before, 1 - d * self.inv_after).clamp(0, 1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.basis(v) @ self.table


class ConditionEncoder(nn.Module):
    """Sum of one embedding per covariate, ``[B, dim]``.

    Each categorical covariate with ``n`` values has ``n + 1`` embeddings; index ``n`` is its
    null value. Each perturbation covariate has one embedding per single perturbation and a null
    embedding (control is the zero vector); with ``dose_key`` the summed embedding is multiplied
    by ``2 * sigmoid(MLP(log1p(dose)))`` (1 at initialisation). A numeric covariate ``v`` (time)
    with ``knots`` (the values seen in training) is embedded by a
    :class:`PiecewiseLinearEmbedding` of them, one without by a small MLP of ``log1p(v)``; its
    null value is a learned vector. A covariate absent from the ``cond`` dict is null, so
    ``cond={}`` is the unconditional model.
    """

    def __init__(self, categorical: dict[str, int] | None = None, continuous=(), dim: int = 128,
                 perturbations: dict[str, int] | None = None, dose_key: str | None = None, response_dim: int = 0,
                 knots: dict[str, list[float]] | None = None):
        super().__init__()
        self.categorical = dict(categorical or {})
        self.perturbations = dict(perturbations or {})
        self.dose_key = dose_key if self.perturbations else None
        self.continuous = [k for k in continuous if k != self.dose_key]
        self.dim = dim
        self.embeddings = nn.ModuleDict({k: nn.Embedding(n + 1, dim) for k, n in self.categorical.items()})
        for emb in self.embeddings.values():
            nn.init.normal_(emb.weight, std=0.02)
        self.perturbation_embeddings = nn.ParameterDict(
            {k: nn.Parameter(0.02 * torch.randn(n + 1, dim)) for k, n in self.perturbations.items()})
        self.dose_response = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros(2, n)) for k, n in self.perturbations.items()} if self.dose_key else {})
        self.response_dim = int(response_dim) if self.perturbations else 0
        self.responses = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros(n, self.response_dim)) for k, n in self.perturbations.items()}
            if self.response_dim else {})
        # the model the responses are fitted in: a mean per covariate value plus the response
        self.response_base = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros(n + 1, self.response_dim)) for k, n in self.categorical.items()}
            if self.response_dim else {})
        self.response_bias = nn.Parameter(torch.zeros(self.response_dim)) if self.response_dim else None
        knots = knots or {}
        self.numeric = nn.ModuleDict({k: PiecewiseLinearEmbedding(knots[k], dim) if knots.get(k) else
                                      nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
                                      for k in self.continuous})
        self.numeric_null = nn.ParameterDict({k: nn.Parameter(torch.zeros(dim)) for k in self.continuous})

    @property
    def keys(self) -> list[str]:
        """Every batch key the encoder reads."""
        return list(self.categorical) + list(self.perturbations) + self.continuous + (
            [self.dose_key] if self.dose_key else [])

    def null_condition(self, batch_size: int, device=None) -> dict[str, torch.Tensor]:
        """A condition that selects every covariate's null value."""
        out = {k: torch.full((batch_size,), n, dtype=torch.long, device=device) for k, n in self.categorical.items()}
        for k, n in self.perturbations.items():
            rows = torch.zeros(batch_size, n + 1, device=device)
            rows[:, n] = 1.0
            out[k] = rows
        for k in self.continuous + ([self.dose_key] if self.dose_key else []):
            out[k] = torch.full((batch_size,), float("nan"), device=device)
        return out

    def drop(self, cond: dict[str, torch.Tensor], p: float, generator=None) -> dict[str, torch.Tensor]:
        """Replace each covariate by its null value independently with probability ``p`` (a
        perturbation and its dose are dropped together)."""
        out = dict(cond)
        for k, v in cond.items():
            if k == self.dose_key:
                continue
            mask = torch.rand(v.shape[:1], device=v.device, generator=generator) < p
            if k in self.categorical:
                out[k] = torch.where(mask, torch.full_like(v, self.categorical[k]), v)
            elif k in self.perturbations:
                null = torch.zeros_like(v)
                null[:, -1] = 1.0
                out[k] = torch.where(mask.unsqueeze(-1), null, v)
                if self.dose_key in cond:
                    out[self.dose_key] = torch.where(mask, torch.full_like(cond[self.dose_key], float("nan")),
                                                     cond[self.dose_key])
            else:
                out[k] = torch.where(mask, torch.full_like(v, float("nan")), v)
        return out

    def _numeric(self, v, batch_size, device):
        return v.to(device=device, dtype=torch.float32).reshape(-1).expand(batch_size)

    def single_weights(self, key: str, rows: torch.Tensor, cond: dict, batch_size: int, device) -> torch.Tensor:
        """``[B, n]`` weight of each single perturbation: the multi-hot times its dose response."""
        n = self.perturbations[key]
        w = rows[:, :n]
        if self.dose_key and cond.get(self.dose_key) is not None:
            dose = self._numeric(cond[self.dose_key], batch_size, device)
            known = torch.isfinite(dose).unsqueeze(-1)
            slope, bias = self.dose_response[key]
            gate = 2 * torch.sigmoid(slope * torch.log1p(torch.where(known, dose.unsqueeze(-1), 0).clamp_min(0)) + bias)
            w = w * torch.where(known, gate, torch.ones_like(gate))
        return w

    def _rows(self, cond, key, batch_size, device):
        rows = cond.get(key)
        if rows is None:
            return None
        return rows.to(device=device, dtype=torch.float32).expand(batch_size, self.perturbations[key] + 1)

    def response(self, cond: dict[str, torch.Tensor] | None, batch_size: int, device) -> torch.Tensor | None:
        """The perturbation response ``m`` in the diffusion space (the dose-weighted sum of the singles'),
        ``[B, response_dim]`` (zero for control and null), or ``None`` without perturbations."""
        if not self.response_dim:
            return None
        cond = cond or {}
        out = torch.zeros(batch_size, self.response_dim, device=device)
        for k in self.perturbations:
            rows = self._rows(cond, k, batch_size, device)
            if rows is not None:
                w = self.single_weights(k, rows, cond, batch_size, device)
                out = out + w @ self.responses[k]
        return out

    def additive_mean(self, cond: dict[str, torch.Tensor], batch_size: int, device) -> torch.Tensor:
        """``bias + sum_k base_k[code_k] + response(cond)``: the model of the clean sample's mean
        (additive in the covariates and the perturbations) in which the
        responses are fitted (a least-squares loss against the training cells, see
        :func:`scidiff.training.losses.response_loss`)."""
        out = self.response(cond, batch_size, device) + self.response_bias
        for k, n in self.categorical.items():
            codes = cond.get(k)
            if codes is None:
                codes = torch.full((batch_size,), n, dtype=torch.long, device=device)
            out = out + self.response_base[k][codes.to(device).long().expand(batch_size)]
        return out

    def forward(self, cond: dict[str, torch.Tensor] | None, batch_size: int, device) -> torch.Tensor:
        cond = cond or {}
        unknown = [k for k in cond if k not in self.keys]
        if unknown:
            raise KeyError(f"unknown condition key(s) {unknown}; the model knows {self.keys or 'no covariates'}")
        out = torch.zeros(batch_size, self.dim, device=device)
        for k, n in self.categorical.items():
            codes = cond.get(k)
            if codes is None:
                codes = torch.full((batch_size,), n, dtype=torch.long, device=device)
            out = out + self.embeddings[k](codes.to(device).long().expand(batch_size))
        for k, n in self.perturbations.items():
            table = self.perturbation_embeddings[k]
            rows = self._rows(cond, k, batch_size, device)
            if rows is None:
                out = out + table[n]
                continue
            if self.response_dim:  # singles reach the network through their response only
                out = out + rows[:, n:] * table[n]
            else:
                out = out + self.single_weights(k, rows, cond, batch_size, device) @ table[:n] + rows[:, n:] * table[n]
        for k in self.continuous:
            v = cond.get(k)
            if v is None:
                out = out + self.numeric_null[k]
                continue
            v = self._numeric(v, batch_size, device)
            known = torch.isfinite(v)
            embed, value = self.numeric[k], torch.where(known, v, 0)
            h = embed(value) if isinstance(embed, PiecewiseLinearEmbedding) else \
                embed(torch.log1p(value.clamp_min(0)).unsqueeze(-1))
            out = out + torch.where(known.unsqueeze(-1), h, self.numeric_null[k])
        return out
