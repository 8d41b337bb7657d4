"""The denoiser's preconditioning, written once (EDM, Karras et al. 2022, on the variance-preserving
process): for ``x_t = a x0 + s eps`` (``a = sqrt(alpha_bar)``, ``s = sqrt(1 - alpha_bar)``) and
data scale ``sd``,

    x0_hat = c_skip x_t + c_out F(c_in x_t),
    c_in = 1 / sqrt(a^2 sd^2 + s^2),  c_skip = a sd^2 c_in^2,  c_out = sd s c_in;

``sd`` is one number, or one per axis of the diffusion space (principal-axes models: each axis's
own standard deviation, so that ``c_skip x_t`` is the exact posterior mean of a Gaussian with the
data's per-axis variances and the network's input and target have unit variance on every axis,
EDM's aim applied per axis; with one shared ``sd`` the top axes' ``c_skip`` is a fraction of
their Gaussian slope and the network has to learn the rest);

with a perturbation response ``m`` the model diffuses the residual around it,
``x0_hat = m + D(x_t - a m)``, and the network also reads ``m``.

:meth:`Preconditioning.at` gives the coefficients (per row, ``[B, 1]``; the engine keeps them as
Python floats per plan step) and :meth:`Preconditioning.apply` the formula around any network
call: :meth:`ScIDiffModel.forward <scidiff.models.ScIDiffModel.forward>`, the sampling engine and
the ONNX export all go through it.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Preconditioning(NamedTuple):
    """``c_in``, ``c_skip``, ``c_out`` and ``sqrt_ab`` (``sqrt(alpha_bar)``) of some timesteps:
    tensors ``[B, 1]`` or Python floats."""

    c_in: torch.Tensor | float
    c_skip: torch.Tensor | float
    c_out: torch.Tensor | float
    sqrt_ab: torch.Tensor | float

    @classmethod
    def at(cls, alphas_cumprod: torch.Tensor, t: torch.Tensor, sigma_data) -> "Preconditioning":
        """The coefficients at integer timesteps ``t [B]``: each ``[B, 1]`` for one ``sigma_data``
        (a float); ``c_in``, ``c_skip`` and ``c_out`` ``[B, D]`` for one per axis (a tensor ``[D]``)."""
        ab = alphas_cumprod[t].unsqueeze(-1)
        a2, s2, sd2 = ab, 1.0 - ab, sigma_data ** 2
        c_in = torch.rsqrt(a2 * sd2 + s2)
        return cls(c_in, a2.sqrt() * sd2 * c_in**2, sigma_data * s2.sqrt() * c_in, ab.sqrt())

    def rows(self) -> list["Preconditioning"]:
        """Each row (each plan step's coefficients, for the engine): Python floats, or a tensor
        ``[D]`` for a coefficient with one value per axis."""
        return [Preconditioning(*row) for row in zip(*(v.flatten().tolist() if v.shape[-1] == 1 else list(v)
                                                       for v in self))]

    def take(self, index: torch.Tensor) -> "Preconditioning":
        """The rows ``index`` (each cell's table row)."""
        return Preconditioning(*(v[index] for v in self))

    def apply(self, x_t: torch.Tensor, network: Callable, response: torch.Tensor | None = None) -> torch.Tensor:
        """``x0_hat`` for ``x_t``; ``network(x_in, response)`` is the raw network output at the
        scaled input ``x_in`` (``response`` is ``None`` without a perturbation response)."""
        if response is None:
            return self.c_skip * x_t + self.c_out * network(self.c_in * x_t, None)
        x_res = x_t - self.sqrt_ab * response
        return response + self.c_skip * x_res + self.c_out * network(self.c_in * x_res, response)
