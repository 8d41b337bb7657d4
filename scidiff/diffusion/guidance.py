"""Guidance as denoiser wrappers: each takes a denoiser and returns one."""
from __future__ import annotations

import torch

from .samplers import Denoiser


def classifier_free_guidance(denoiser: Denoiser, guidance_scale: float, null_cond: dict | None = None) -> Denoiser:
    """``u + w (c - u)`` with ``c`` the conditional and ``u`` the unconditional prediction
    (Ho & Salimans 2022). ``w = 1`` is the plain conditional model, ``w = 0`` unconditional.
    Both halves run in one batched call. Predictions are x0 here; the combine is linear, so it
    equals the same combine on eps."""
    w = float(guidance_scale)
    if w == 1.0:
        return denoiser

    def guided(x: torch.Tensor, t: torch.Tensor, cond: dict | None) -> torch.Tensor:
        b = x.shape[0]
        cond = cond or {}
        null = null_cond or {}
        keys = set(cond) | set(null)
        both = {}
        for k in keys:
            c, u = cond.get(k), null.get(k)
            if c is None or u is None:
                raise ValueError(f"classifier-free guidance needs condition {k!r} in both the "
                                 "condition and the null condition")
            both[k] = torch.cat([c.expand(b, *c.shape[1:]), u.expand(b, *u.shape[1:])])
        out = denoiser(torch.cat([x, x]), torch.cat([t, t]), both)
        cond_out, uncond_out = out[:b], out[b:]
        return uncond_out + w * (cond_out - uncond_out)

    return guided
