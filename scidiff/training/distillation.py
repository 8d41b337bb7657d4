"""Progressive distillation of a trained model into a few-step student (Salimans & Ho 2022,
"Progressive Distillation for Fast Sampling of Diffusion Models", ICLR, Alg. 2).

Round by round, a student initialised from its teacher learns to reach in one deterministic DDIM
step where the teacher gets in two (the target of :mod:`scidiff.diffusion.distillation`, with the
truncated-SNR weight), on the training cells and their conditions, with the teacher's condition
dropout (so the student keeps an unconditional mode for guidance). Each round halves the steps,
``start_steps -> ... -> steps``, and its student is the next round's teacher. The student is the
teacher's network with other parameters: ``model.student`` (a
:class:`~scidiff.diffusion.distillation.Student`), stored in the checkpoint beside the teacher
and sampled by ``model.sample(..., sampler="distilled")`` (also the engine, ONNX export and server).
"""
from __future__ import annotations

import numbers
import time

import anndata as ad
import torch
from tqdm.auto import tqdm

from ..data import CellData, transform_like
from ..diffusion.distillation import Student, TeacherGrid, student_target, truncated_snr_weight
from .trainer import split_batch


def halving_rounds(steps: int, start_steps: int, num_timesteps: int) -> list[int]:
    """The students' steps, round by round: ``start_steps / 2, ..., steps`` (``start_steps`` must be
    ``steps`` times a power of two, at most the schedule's ``num_timesteps``)."""
    for name, value in (("steps", steps), ("start_steps", start_steps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be a whole number of sampling steps, got {value!r}")
    steps, start_steps = int(steps), int(start_steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if 2 * steps > num_timesteps:
        raise ValueError(f"steps={steps}: a student halves its teacher's steps, and the schedule has only "
                         f"{num_timesteps} timesteps (steps can be at most {num_timesteps // 2})")
    if start_steps > num_timesteps:
        raise ValueError(f"start_steps={start_steps} exceeds the schedule's {num_timesteps} timesteps; "
                         f"e.g. start_steps={_largest_start(steps, num_timesteps)}")
    ratio = start_steps // steps
    if start_steps % steps or ratio < 2 or ratio & (ratio - 1):
        raise ValueError(f"start_steps must be steps times a power of two (at least 2 x): halving "
                         f"{start_steps} steps never reaches {steps}; e.g. "
                         f"start_steps={_largest_start(steps, num_timesteps, 16)}")
    rounds = [start_steps // 2]
    while rounds[-1] > steps:
        rounds.append(rounds[-1] // 2)
    return rounds


def _largest_start(steps: int, num_timesteps: int, ratio: int | None = None) -> int:
    """``steps`` times the largest power of two (at most ``ratio``) within ``num_timesteps``."""
    start = 2 * steps
    while 2 * start <= num_timesteps and (ratio is None or 2 * start <= ratio * steps):
        start *= 2
    return start


def _batches(data, batch_size: int, seed: int):
    """Batches without end: epochs of a :class:`CellData`'s loader, or of any loader of batch dicts."""
    loader = data.loader(batch_size=batch_size, shuffle=True, seed=seed) if isinstance(data, CellData) else data
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data to distil on yields no batches")


def distillation_loss(model, teacher, student, batch, grid: TeacherGrid, generator: torch.Generator) -> torch.Tensor:
    """Alg. 2 of Salimans & Ho (2022) on one batch: cells diffused to a random student timestep,
    the student's x0 against the two-teacher-step target, weighted by ``max(SNR, 1)``."""
    x0, cond = split_batch(batch, model)
    device = grid.alpha_bar.device
    z0 = model.encode(x0.to(device).float())
    cond = {k: v.to(device) for k, v in cond.items()}
    if cond and model.cond_dropout > 0:
        cond = model.condition_encoder.drop(cond, model.cond_dropout, generator)
    i = torch.randint(0, grid.student_steps, (z0.shape[0],), device=device, generator=generator)
    t = grid.timesteps[2 * i]
    eps = torch.randn(z0.shape, device=device, dtype=z0.dtype, generator=generator)
    z_t = model.scheduler.add_noise(z0, eps, t)
    target = student_target(teacher, z_t, i, grid, cond)
    x0_hat = student(z_t, t, cond)
    return (truncated_snr_weight(grid.alpha_bars(i)[0]).to(z0) * (x0_hat - target) ** 2).mean()


def distil_round(model, teacher: dict, batches, student_steps: int, *, iterations: int, learning_rate: float,
                 gradient_clip_val: float, generator: torch.Generator, bar=None) -> tuple[dict, dict]:
    """One round: a student of ``student_steps`` steps, initialised from the ``teacher``'s
    parameters and trained for ``iterations`` Adam steps (learning rate annealed linearly to
    zero). Returns its parameters and the round's report."""
    start = time.perf_counter()
    grid = TeacherGrid.of(model.scheduler, 2 * student_steps, device=model.alphas_cumprod.device)
    teach = Student(2 * student_steps, teacher).denoiser(model)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in teacher.items()}
    learn = Student(student_steps, params).denoiser(model)
    optimizer = torch.optim.Adam(list(params.values()), lr=learning_rate)
    annealing = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 - k / iterations)
    losses = []
    for _ in range(iterations):
        loss = distillation_loss(model, teach, learn, next(batches), grid, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if gradient_clip_val > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), gradient_clip_val)
        optimizer.step()
        annealing.step()
        losses.append(loss.detach())
        if bar is not None and not bar.disable:
            bar.update(1)
            bar.set_postfix({"steps": student_steps, "loss": f"{float(losses[-1]):.4g}"}, refresh=False)
    tail = torch.stack(losses[-max(1, iterations // 10):])
    report = {"steps": student_steps, "teacher_steps": 2 * student_steps, "iterations": iterations,
              "final_loss": float(tail.mean()), "seconds": time.perf_counter() - start}
    return {k: v.detach() for k, v in params.items()}, report


def distil(model, data, *, steps: int = 4, start_steps: int = 64, iterations_per_round: int = 2000,
           batch_size: int = 256, learning_rate: float = 1e-4, gradient_clip_val: float = 1.0, seed: int = 0,
           progress: bool = True, initial: Student | None = None) -> Student:
    """Progressive distillation of ``model`` (a trained :class:`~scidiff.models.ScIDiffModel`, on
    its device) on ``data`` (the training cells: a :class:`~scidiff.data.CellData`, an AnnData read
    like the model's training cells, or a loader of batch dicts in model space) from DDIM with
    ``start_steps`` steps down to ``steps``, halving each round (Salimans & Ho 2022). Returns the
    final :class:`Student` (``rounds``: the report); assign it to ``model.student`` to sample with
    it and to save it with the model. The model's own weights are not changed. ``initial``: a
    student of this model to go on from (its steps replace ``start_steps``; its rounds head the
    report), e.g. a 4-step student halved to 2 and 1."""
    if not isinstance(iterations_per_round, numbers.Integral) or iterations_per_round < 1:
        raise ValueError(f"iterations_per_round must be a whole number >= 1, got {iterations_per_round!r}")
    if initial is not None:
        if not isinstance(initial, Student):
            raise ValueError(f"initial must be a distilled Student (model.student), got {type(initial).__name__}")
        initial.check_fits(model)
        start_steps = initial.steps
        try:
            rounds = halving_rounds(steps, start_steps, model.num_timesteps)
        except ValueError:
            raise ValueError(f"the initial student samples in {initial.steps} steps: steps must be that halved one "
                             f"or more times, got steps={steps!r}") from None
    else:
        rounds = halving_rounds(steps, start_steps, model.num_timesteps)
    if isinstance(data, ad.AnnData):  # the training cells as read: into the model's genes and normalisation
        if model.data_spec is None:
            raise ValueError("this model carries no DataSpec to read an AnnData with; pass a CellData or a "
                             "loader of batch dicts in model space")
        data = transform_like(model.data_spec, data)
    if isinstance(data, CellData) and data.x.shape[1] != model.gene_dim:
        raise ValueError(f"the data has {data.x.shape[1]} genes, the model {model.gene_dim}")
    device = model.alphas_cumprod.device
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = _batches(data, batch_size, seed)
    if initial is None:
        teacher = {k: p.detach() for k, p in model.named_parameters()}
    else:
        teacher = {k: initial.parameters[k].detach().to(p.device) for k, p in model.named_parameters()}
    report = [] if initial is None else [dict(r) for r in initial.rounds]
    done = len(report)
    was_training = model.training
    model.eval()  # a deterministic teacher (no dropout), and the student in the mode it samples in
    bar = tqdm(total=len(rounds) * iterations_per_round, desc=f"distilling {start_steps} -> {steps} steps",
               unit="it", disable=not progress)
    try:
        for student_steps in rounds:
            teacher, row = distil_round(model, teacher, batches, student_steps, iterations=iterations_per_round,
                                        learning_rate=learning_rate, gradient_clip_val=gradient_clip_val,
                                        generator=generator, bar=bar)
            report.append(row)
            if progress:
                bar.write(f"round {len(report) - done}/{len(rounds)}: {row['teacher_steps']} -> {row['steps']} steps, "
                          f"{row['iterations']} iterations, loss {row['final_loss']:.4g}, {row['seconds']:.1f} s")
    finally:
        bar.close()
        model.train(was_training)
    return Student(steps, teacher, report)
