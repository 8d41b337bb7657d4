"""The condition encoder: categorical covariates, numeric ones (dose, time) and the null
condition used for classifier-free guidance (Ho & Salimans 2022)."""
from __future__ import annotations

import torch
from torch import nn


class ConditionEncoder(nn.Module):
    """Sum of one embedding per covariate, ``[B, dim]``.

    Each categorical covariate with ``n`` values has ``n + 1`` embeddings; index ``n`` is its
    null ("unknown / dropped") value. A numeric covariate ``v`` is embedded by a small MLP of
    ``log1p(v)`` (doses span orders of magnitude); its null value is a learned vector. A covariate
    absent from the ``cond`` dict is null, so ``cond={}`` is the unconditional model.
    """

    def __init__(self, categorical: dict[str, int] | None = None, continuous=(), dim: int = 128):
        super().__init__()
        self.categorical = dict(categorical or {})
        self.continuous = list(continuous)
        self.dim = dim
        self.embeddings = nn.ModuleDict({k: nn.Embedding(n + 1, dim) for k, n in self.categorical.items()})
        self.numeric = nn.ModuleDict({k: nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
                                      for k in self.continuous})
        self.numeric_null = nn.ParameterDict({k: nn.Parameter(torch.zeros(dim)) for k in self.continuous})
        for emb in self.embeddings.values():
            nn.init.normal_(emb.weight, std=0.02)

    def null_condition(self, batch_size: int, device=None) -> dict[str, torch.Tensor]:
        """Codes that select every covariate's null value."""
        return {k: torch.full((batch_size,), n, dtype=torch.long, device=device)
                for k, n in self.categorical.items()}

    def drop(self, cond: dict[str, torch.Tensor], p: float, generator=None) -> dict[str, torch.Tensor]:
        """Replace each covariate by its null value independently with probability ``p``."""
        out = {}
        for k, v in cond.items():
            mask = torch.rand(v.shape, device=v.device, generator=generator) < p
            if k in self.categorical:
                out[k] = torch.where(mask, torch.full_like(v, self.categorical[k]), v)
            else:
                out[k] = torch.where(mask, torch.full_like(v, float("nan")), v)
        return out

    def forward(self, cond: dict[str, torch.Tensor] | None, batch_size: int, device) -> torch.Tensor:
        cond = cond or {}
        unknown = [k for k in cond if k not in self.categorical and k not in self.continuous]
        if unknown:
            raise KeyError(f"unknown condition key(s) {unknown}; the model knows "
                           f"{list(self.categorical) + self.continuous or 'no covariates'}")
        out = torch.zeros(batch_size, self.dim, device=device)
        for k, n in self.categorical.items():
            codes = cond.get(k)
            if codes is None:
                codes = torch.full((batch_size,), n, dtype=torch.long, device=device)
            out = out + self.embeddings[k](codes.to(device).long().expand(batch_size))
        for k in self.continuous:
            v = cond.get(k)
            if v is None:
                out = out + self.numeric_null[k]
                continue
            v = v.to(device=device, dtype=torch.float32).expand(batch_size)
            known = torch.isfinite(v)
            h = self.numeric[k](torch.log1p(torch.where(known, v, 0).clamp_min(0)).unsqueeze(-1))
            out = out + torch.where(known.unsqueeze(-1), h, self.numeric_null[k])
        return out
