"""Progressive distillation: the math of a few-step student (Salimans & Ho 2022, "Progressive
Distillation for Fast Sampling of Diffusion Models", ICLR).

A student denoiser is trained so that one deterministic DDIM step of the student matches two
DDIM steps of its teacher; each round halves the number of steps and the student becomes the next
round's teacher (the training loop is :func:`scidiff.training.distillation.distil`). Here:

- :func:`~scidiff.diffusion.plans.halving_timesteps` (in :mod:`.plans`, the ``"distilled"``
  sampler's grid): the grid of ``N`` steps whose every other point is the grid of ``N / 2``
  steps, from ``T - 1`` (pure noise) down to clean data;
- :func:`ddim_step`, :func:`two_teacher_steps`, :func:`x0_target`: the paper's target (Alg. 2):
  the teacher goes ``z_t -> z_t' -> z_t''`` and the student's target ``x~`` is the clean sample
  with which one DDIM step goes from ``z_t`` straight to that ``z_t''``;
- :func:`truncated_snr_weight`: the paper's loss weight ``max(SNR, 1)`` on the x0 error;
- :class:`Student`: the distilled parameters and their number of steps, as a denoiser and a plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch.func import functional_call

from .plans import DEFAULT_STEPS, PlanStep, alphas_cumprod_of, halving_timesteps, sampler_plan
from .samplers import Denoiser


def ddim_step(x_t: torch.Tensor, x0: torch.Tensor, ab_t: torch.Tensor, ab_s: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with ``eta = 0``) from ``alpha_bar`` ``ab_t`` to
    ``ab_s`` (float64 ``[B, 1]``; ``ab_s = 1`` is clean data):
    ``x_s = alpha_s x0 + (sigma_s / sigma_t) (x_t - alpha_t x0)``."""
    ratio = ((1 - ab_s) / (1 - ab_t)).sqrt().to(x_t)
    return ab_s.sqrt().to(x_t) * x0 + ratio * (x_t - ab_t.sqrt().to(x_t) * x0)


def x0_target(z_t: torch.Tensor, z_t2: torch.Tensor, ab_t: torch.Tensor, ab_t2: torch.Tensor) -> torch.Tensor:
    """The student's target ``x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' /
    sigma_t) alpha_t)`` (Salimans & Ho 2022, Alg. 2): the x0 with which :func:`ddim_step` from
    ``z_t`` lands exactly on the teacher's ``z_t''``."""
    ratio = ((1 - ab_t2) / (1 - ab_t)).sqrt()
    return (z_t2 - ratio.to(z_t) * z_t) / (ab_t2.sqrt() - ratio * ab_t.sqrt()).to(z_t)


def truncated_snr_weight(ab_t: torch.Tensor) -> torch.Tensor:
    """``max(SNR, 1) = max(alpha^2 / sigma^2, 1)``: the x0 loss weighted so that it equals
    ``max(|x - x_hat|^2, |eps - eps_hat|^2)`` (Salimans & Ho 2022, "truncated SNR weighting")."""
    return (ab_t / (1 - ab_t)).clamp_min(1.0)


class TeacherGrid(NamedTuple):
    """A round's teacher grid: ``timesteps`` ``LongTensor[2N]`` (:func:`halving_timesteps` of
    ``2N``) and ``alpha_bar`` float64 ``[2N + 1]``, the last entry 1 (clean data). Student step
    ``i`` goes from teacher point ``2i`` to ``2i + 2``."""

    timesteps: torch.Tensor
    alpha_bar: torch.Tensor

    @classmethod
    def of(cls, schedule, teacher_steps: int, device=None) -> "TeacherGrid":
        ab = alphas_cumprod_of(schedule)
        ts = halving_timesteps(len(ab), teacher_steps)
        return cls(torch.tensor(ts, dtype=torch.long, device=device),
                   torch.tensor([ab[t] for t in ts] + [1.0], dtype=torch.float64, device=device))

    @property
    def student_steps(self) -> int:
        return len(self.timesteps) // 2

    def alpha_bars(self, i: torch.Tensor):
        """``(ab_t, ab_t', ab_t'')`` of student steps ``i [B]``, each float64 ``[B, 1]``."""
        return tuple(self.alpha_bar[2 * i + j].unsqueeze(-1) for j in range(3))


@torch.no_grad()
def two_teacher_steps(teacher: Denoiser, z_t: torch.Tensor, i: torch.Tensor, grid: TeacherGrid,
                      cond: dict | None) -> torch.Tensor:
    """``z_t''``: the teacher's two DDIM steps ``t -> t' -> t''`` from ``z_t`` at student steps ``i``."""
    ab_t, ab_t1, ab_t2 = grid.alpha_bars(i)
    z_t1 = ddim_step(z_t, teacher(z_t, grid.timesteps[2 * i], cond), ab_t, ab_t1)
    return ddim_step(z_t1, teacher(z_t1, grid.timesteps[2 * i + 1], cond), ab_t1, ab_t2)


def student_target(teacher: Denoiser, z_t: torch.Tensor, i: torch.Tensor, grid: TeacherGrid,
                   cond: dict | None) -> torch.Tensor:
    """:func:`x0_target` of :func:`two_teacher_steps`: what the student predicts at ``(z_t, t)``."""
    ab_t, _, ab_t2 = grid.alpha_bars(i)
    return x0_target(z_t, two_teacher_steps(teacher, z_t, i, grid, cond), ab_t, ab_t2)


@dataclass
class Student:
    """A denoiser distilled to ``steps`` deterministic DDIM steps on :func:`halving_timesteps`: its
    teacher's network with other ``parameters`` (name -> tensor, every parameter of the network;
    the buffers, such as the schedule and the latent map, stay the teacher's). ``rounds``: the
    distillation report (per round: steps, iterations, final loss, seconds)."""

    steps: int
    parameters: dict[str, torch.Tensor]
    rounds: list[dict] = field(default_factory=list)

    def check_fits(self, network: torch.nn.Module) -> None:
        """Raise unless the parameters are exactly ``network``'s (names and shapes)."""
        own = dict(network.named_parameters())
        missing, unexpected = sorted(set(own) - set(self.parameters)), sorted(set(self.parameters) - set(own))
        wrong = [k for k in own if k in self.parameters and tuple(own[k].shape) != tuple(self.parameters[k].shape)]
        if missing or unexpected or wrong:
            raise ValueError(f"the distilled student does not fit this network (missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}, other shapes for {wrong[:5]})")

    def denoiser(self, network: torch.nn.Module) -> Denoiser:
        """``denoiser(x_t, t, cond)``: ``network`` called with the student's parameters."""
        self.check_fits(network)
        own = dict(network.named_parameters())
        params = {k: v.to(own[k].device) for k, v in self.parameters.items()}
        return lambda x_t, t, cond=None: functional_call(network, params, (x_t, t, cond))

    def plan(self, schedule, final_sigma: float = 0.0) -> list[PlanStep]:
        """The student's sampler, ``"distilled"``: DDIM (``eta = 0``) on ``halving_timesteps(T, steps)``
        (ending at ``final_sigma``, :func:`~scidiff.diffusion.plans.sampler_plan`)."""
        return sampler_plan("distilled", schedule, self.steps, final_sigma=final_sigma)

    def to(self, device) -> "Student":
        return replace(self, parameters={k: v.to(device) for k, v in self.parameters.items()})

    def to_state(self) -> dict:
        """Tensors and plain values, for a checkpoint (:meth:`from_state` reads it back)."""
        return {"steps": int(self.steps), "parameters": {k: v.detach().cpu() for k, v in self.parameters.items()},
                "rounds": [dict(r) for r in self.rounds]}

    @classmethod
    def from_state(cls, state: dict) -> "Student":
        steps, params = int(state["steps"]), state["parameters"]
        if steps < 1 or not params or not all(isinstance(v, torch.Tensor) for v in params.values()):
            raise ValueError(f"a student needs steps >= 1 and tensors for its parameters (steps={steps})")
        return cls(steps, dict(params), [dict(r) for r in state.get("rounds", [])])


def distilled_student(student: Student | None, steps: int | None = None, eta: float = 0.0) -> Student:
    """``student``, checked for the ``"distilled"`` sampler with ``steps`` and DDIM ``eta``; errors
    say what to do. ``steps``: the student's own; ``None`` and the samplers' default
    (:data:`~scidiff.diffusion.plans.DEFAULT_STEPS`) stand for it, any other number is an error."""
    if student is None:
        raise ValueError("this model has no distilled student for sampler='distilled': distil one with "
                         "`scidiff distil --model RUN/model.pt --data TRAIN.h5ad --steps 4`, or in Python "
                         "`model.student = scidiff.training.distillation.distil(model, cells, steps=4)`")
    if steps not in (None, DEFAULT_STEPS, student.steps):
        raise ValueError(f"the distilled student samples in exactly {student.steps} steps, not {steps}: leave steps "
                         f"at its default or pass {student.steps} (distil again for another number of steps)")
    if eta != 0.0:
        raise ValueError(f"the distilled student samples with deterministic DDIM (eta=0), got eta={eta}")
    return student
