"""``ScIDiffTrainer``: AdamW, gradient clipping, EMA, early stopping, resumable checkpoints, and
the scale-out options: DDP over several processes, bf16 autocast, gradient accumulation,
gradient checkpointing and ``torch.compile``.

Effective batch and learning rate: one optimizer step sees ``batch_size x world_size x
gradient_accumulation`` cells (the loss is the mean over them: DDP averages gradients over ranks,
accumulation divides each micro-batch's loss by the number of micro-batches). The learning rate
is used as given, never rescaled for the larger batch; scale it yourself (for example linearly
with the effective batch, with a longer warm-up) when you add processes.

Randomness: the timesteps, noise and condition dropout of micro-batch ``a`` on rank ``r`` come
from the generator of stream ``a * world_size + r`` (stream 0 is seeded with ``seed`` itself).
Together with the sharding of :class:`~scidiff.data.InMemoryLoader`, ``W`` processes with
accumulation ``A`` compute the same steps as one process with accumulation ``W * A``.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time

import torch

from . import distributed
from ..checks import warn, whole_number, yes_no
from ..data.io import atomic_path
from ..data.spec import DataSpec
from ..models.final_noise import HELD_OUT_CELLS, REFERENCE_CELLS
from .checkpoint import (CHECKPOINT_FILE, atomic_torch_save, list_checkpoints, model_payload, payload_digest,
                         read_training_checkpoint, remove_partial_files, resolve_device, save_model, unwrap_model,
                         write_training_checkpoint)
from .ema import EMA
from .losses import BiologicalConstraints, denoising_loss
from .rng import capture_rng_state, restore_rng_state


def split_batch(batch, model) -> tuple[torch.Tensor, dict]:
    """A batch dict (``"x"`` + covariates), a tensor, or a ``(tensor, ...)`` tuple ->
    ``(x, cond)`` with only the covariates the model knows."""
    if isinstance(batch, torch.Tensor):
        return batch, {}
    if isinstance(batch, (list, tuple)):
        return batch[0], {}
    keys = set(model.condition_encoder.keys)
    return batch["x"], {k: v for k, v in batch.items() if k in keys}


def _batch_cells(batch) -> int:
    x = batch["x"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(x.shape[0])


def _collect_cells(loader, model, most: int) -> tuple[torch.Tensor, dict]:
    """Up to ``most`` cells of ``loader`` and their conditions (``(x, cond)``, on the CPU)."""
    xs, conds, n = [], [], 0
    for batch in loader:
        x, cond = split_batch(batch, model)
        xs.append(x.detach().cpu())
        conds.append({k: v.detach().cpu() for k, v in cond.items()})
        n += len(x)
        if n >= most:
            break
    if not xs:
        return torch.zeros(0), {}
    cond = {k: torch.cat([c[k] for c in conds])[:most] for k in conds[0]}
    return torch.cat(xs)[:most], cond


def enable_determinism() -> None:
    """Make this process's torch kernels deterministic (needed for bit-exact resume on GPU; CPU
    kernels are deterministic for a fixed thread count already)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


# early stopping keeps the best weights; when they come from this early in the run (or earlier), say so
EARLY_BEST_FRACTION = 0.5
SUMMARY_FILE = "training.json"


class DivergedError(ValueError):
    """The training loss is no longer a number: the weights have left the finite range (a learning
    rate too high for the data), so training stops before a checkpoint keeps them."""


class EarlyBestWarning(UserWarning):
    """The weights early stopping kept come from early in the run: validation stopped improving
    long before training did (see :meth:`ScIDiffTrainer.train`)."""


class _Denoiser:
    """The model as :func:`denoising_loss` sees it: calls go through the wrapped module (DDP
    and/or compiled), attributes (schedule, encode, loss_scale) come from the model."""

    def __init__(self, wrapped, model):
        self._wrapped, self._model = wrapped, model

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _loader_state(loader):
    """What restores a loader's order for the coming epoch: its own ``state_dict`` (the
    in-memory loader's generator), or the epoch of a loader that has ``set_epoch`` (streaming)."""
    if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict"):
        return {"state_dict": loader.state_dict()}
    if hasattr(loader, "set_epoch") and hasattr(loader, "epoch"):
        return {"epoch": int(loader.epoch)}
    return None


def _restore_loader(loader, state) -> None:
    if state is None:
        return
    if "state_dict" in state:
        loader.load_state_dict(state["state_dict"])
    else:
        loader.set_epoch(state["epoch"])


# what a data spec holds that gives the weights their meaning (not provenance, counts or symbols)
_DATA_FIELDS = ("input_kind", "target_sum", "gene_offset", "gene_scale", "categorical", "continuous",
                "continuous_knots", "perturbation_keys", "control_labels", "separator", "dose_key")


def _same_spec_value(a, b) -> bool:
    """Equal, numbers to float rounding (a normalisation computed with another thread count)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_spec_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_spec_value(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
        return numbers and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    return a == b


def epoch_count(num_epochs) -> int:
    """``num_epochs`` as an int (``3.0`` is 3); anything else (``2.5``, ``0``, ``'3'``, ``True``) is a
    ``ValueError`` naming it."""
    return whole_number("the number of epochs", num_epochs, 1, what="a whole number >= 1")


def _iterate_from(loader, start: int):
    """An iterator over ``loader`` that begins at batch ``start`` of the epoch."""
    if start and hasattr(loader, "resume_at"):
        loader.resume_at(start)
        return iter(loader)
    it = iter(loader)
    for _ in range(start):  # loaders without resume_at: read and drop the batches already trained on
        next(it)
    return it


class ScIDiffTrainer:
    """Train a :class:`~scidiff.models.ScIDiffModel`.

    Args:
        model, train_loader, val_loader: loaders yield batch dicts (see :mod:`scidiff.data`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` (falls back to CPU with a warning); with
            ``use_ddp``, ``"auto"``/``"cuda"`` mean ``cuda:LOCAL_RANK``.
        learning_rate, weight_decay: AdamW; the rate warms up linearly over ``warmup_steps`` and
            decays along a cosine to 10% by the last step.
        gradient_clip_val: global gradient-norm clip (0 = off).
        ema_decay: EMA of weights; the EMA weights are what sampling and checkpoints use.
        mixed_precision: ``"auto"`` (bf16 autocast on CUDA, off on CPU), ``"bf16"`` (also on the
            CPU) or ``"no"``.
        constraints: :class:`BiologicalConstraints` weights (all off by default).
        early_stopping_patience: stop after this many epochs without a better validation loss
            (needs ``val_loader``); the best EMA weights are then restored, with an
            :class:`EarlyBestWarning` when they come from the first ``EARLY_BEST_FRACTION`` of
            the run. ``None`` (default) = off: the last EMA weights are kept. The validation
            denoising loss turns up long before samples stop improving (bench/README.md,
            conditional generation), so it is a monitor by default, not a stopping rule.
        checkpoint_dir, checkpoint_every: write ``checkpoint.pt`` every N epochs and
            ``model.pt`` + ``history.csv`` + ``training.json`` (which weights were kept) at the end.
        checkpoint_every_steps: also checkpoint every N optimizer steps, mid-epoch too (0 = off).
        keep_checkpoints: keep the newest N checkpoints (N > 1: ``checkpoints/step-*.pt``, with
            ``checkpoint.pt`` the newest).
        use_ddp: wrap the model in ``DistributedDataParallel`` (joins the process group
            ``torchrun`` describes if none exists yet). Each rank must get its own shard of the
            data (``CellData.loader(..., rank=, world_size=)``); only rank 0 writes files.
        gradient_accumulation: micro-batches per optimizer step.
        gradient_checkpointing: recompute the score network's blocks in the backward pass.
        compile: run the model's forward and backward through ``torch.compile`` (``True``:
            inductor; otherwise the ``backend`` given to ``torch.compile``, a name or a callable).
        log_every_steps: append loss, cells/s and learning rate every N steps to
            ``checkpoint_dir/steps.csv`` (0 = off; ``history.csv`` holds the per-epoch rows).
    """

    def __init__(self, model, train_loader, val_loader=None, device="auto", learning_rate: float = 1e-3,
                 weight_decay: float = 1e-4, gradient_clip_val: float = 1.0, ema_decay: float = 0.999,
                 warmup_steps: int = 200, mixed_precision: str = "auto",
                 constraints: BiologicalConstraints | None = None, early_stopping_patience: int | None = None,
                 checkpoint_dir=None, checkpoint_every: int = 10, seed: int = 0, progress: bool = True, *,
                 checkpoint_every_steps: int = 0, keep_checkpoints: int = 1, use_ddp: bool = False,
                 gradient_accumulation: int = 1, gradient_checkpointing: bool = False, compile=False,
                 log_every_steps: int = 0, find_unused_parameters: bool = False, final_sigma=0.0):
        if mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError("mixed_precision must be 'auto', 'bf16' or 'no'")
        if gradient_accumulation < 1:
            raise ValueError(f"gradient_accumulation must be >= 1, got {gradient_accumulation}")
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
        progress, use_ddp, gradient_checkpointing, find_unused_parameters = (  # 'no' read as true
            yes_no(name, value) for name, value in (("progress", progress), ("use_ddp", use_ddp),
                                                    ("gradient_checkpointing", gradient_checkpointing),
                                                    ("find_unused_parameters", find_unused_parameters)))
        self.use_ddp = use_ddp
        self.device = distributed.init_distributed(device) if self.use_ddp else resolve_device(device)
        self.rank = distributed.rank() if self.use_ddp else 0
        self.world_size = distributed.world_size() if self.use_ddp else 1
        # a torch.compile'd model given: trained through its compiled forward, its weights kept, averaged and
        # saved by the model's own names (no '_orig_mod.' prefix: the run's files load into a plain model)
        given, model = model, unwrap_model(model)
        if given is not model and (self.use_ddp or compile):
            raise ValueError(f"the model is already wrapped ({type(given).__name__}); with use_ddp or compile, pass "
                             f"the model itself: the trainer wraps it in DDP, then compiles")
        self.model = model.to(self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        if gradient_checkpointing:
            score = getattr(model, "score", None)
            if score is None or not hasattr(score, "gradient_checkpointing"):
                raise ValueError("gradient_checkpointing needs a model whose score network has blocks "
                                 "(ScIDiffModel.score)")
            score.gradient_checkpointing = True
        self.gradient_accumulation = int(gradient_accumulation)
        net = model
        if self.use_ddp:
            from torch.nn.parallel import DistributedDataParallel

            # the constructor broadcasts rank 0's parameters and buffers, so every rank starts equal;
            # the buffers (schedule, latent axes) are constants, so they need no sync at each forward
            import inspect

            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                              else {"broadcast_buffers": False})
            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                          find_unused_parameters=find_unused_parameters, **no_buffer_sync)
        self._ddp = net if self.use_ddp else None
        if compile:
            net = torch.compile(net) if compile is True else torch.compile(net, backend=compile)
        elif given is not model:
            net = given.to(self.device)
        self._net = net
        self._denoiser = _Denoiser(net, model) if net is not model else model
        groups = (model.parameter_groups(learning_rate) if hasattr(model, "parameter_groups")
                  else [{"params": list(model.parameters()), "lr_scale": 1.0}])
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate,
                                           weight_decay=weight_decay)
        self.learning_rate, self.warmup_steps = float(learning_rate), int(warmup_steps)
        self.gradient_clip_val = float(gradient_clip_val)
        self.ema = EMA(model, ema_decay)
        self.autocast = (mixed_precision == "bf16") or (mixed_precision == "auto" and self.device.type == "cuda")
        self.constraints = constraints or BiologicalConstraints()
        spec = getattr(model, "data_spec", None)
        self.gene_sets = self.constraints.resolve(spec.gene_names if spec else None, self.device)
        self.early_stopping_patience = early_stopping_patience
        if checkpoint_dir is not None and os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
            raise NotADirectoryError(f"checkpoint_dir {os.fspath(checkpoint_dir)!r} is a file, not a folder to write "
                                     f"checkpoints into")
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, int(checkpoint_every)
        self.checkpoint_every_steps, self.keep_checkpoints = int(checkpoint_every_steps), int(keep_checkpoints)
        self.log_every_steps = int(log_every_steps)
        if final_sigma != "auto" and not float(final_sigma) >= 0:
            raise ValueError(f"final_sigma must be 'auto' or a noise level >= 0, got {final_sigma!r}")
        self.final_sigma = final_sigma
        # one noise stream per micro-batch slot of this rank (see the module docstring)
        self.generators = [torch.Generator(device=self.device).manual_seed(
            distributed.derived_seed(seed, a * self.world_size + self.rank)) for a in range(self.gradient_accumulation)]
        self.generator = self.generators[0]
        self.seed, self.progress = seed, progress
        self.step, self.epoch = 0, 0
        self.history: list[dict] = []
        self.best_val, self.best_state = math.inf, None
        self.weights_kept: dict | None = None  # set by train(): which epoch's weights the model holds
        self.report: dict = {}  # more entries of training.json (e.g. the perturbation fits), set by the caller
        self._bad_epochs = 0
        self._batch_in_epoch = 0
        self._batches_per_epoch = None
        self._epoch_loader_state = None
        self._epoch_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self._epoch_cells, self._epoch_seconds = 0, 0.0
        self._schedule: dict | None = None
        self._resume: dict | None = None
        self._raw_state = None
        self._own_checkpoints: set[str] = set()  # training checkpoints this trainer wrote
        self._checkpoint_step = None  # the step of the run folder's newest checkpoint, written or resumed
        self._resumed = False

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def resumed(self) -> bool:
        """Whether :meth:`resume` loaded a checkpoint into this trainer."""
        return self._resumed

    # -- one step --------------------------------------------------------------------------------
    def _lr(self, total_steps: int) -> float:
        if self.step < self.warmup_steps:
            return self.learning_rate * (self.step + 1) / self.warmup_steps
        frac = min(1.0, (self.step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        return self.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def _expression(self, z):
        spec = self.model.data_spec
        return spec.to_expression(z, clip=False) if spec is not None else z

    def _forward_backward(self, batch, slot: int = 0, scale: float = 1.0, sync: bool = True) -> dict:
        """Loss of one micro-batch, backpropagated with weight ``scale``; with DDP, gradients are
        all-reduced only when ``sync``."""
        x0, cond = split_batch(batch, self.model)
        x0 = x0.to(self.device, non_blocking=True).float()
        cond = {k: v.to(self.device) for k, v in cond.items()}
        no_sync = self._ddp.no_sync() if self._ddp is not None and not sync else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss, x0_hat = denoising_loss(self._denoiser, x0, cond, self.generators[slot])
            terms = {"denoising": loss.detach()}
            if self.constraints.active:
                extra = self.constraints(self._expression(x0_hat.float()), self._expression(x0), self.gene_sets)
                terms.update({k: v.detach() for k, v in extra.items()})
                loss = loss + sum(extra.values())
            (loss * scale if scale != 1.0 else loss).backward()
        terms["loss"] = loss.detach()
        return terms

    def _set_lr(self, total_steps: int) -> None:
        lr = self._lr(total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def _optimizer_step(self) -> None:
        if self.gradient_clip_val > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.gradient_clip_val)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1

    def training_step(self, batch, total_steps: int) -> dict:
        """One optimizer step on one batch; returns the loss terms (detached)."""
        self._set_lr(total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        terms = self._forward_backward(batch)
        self._optimizer_step()
        return terms

    @torch.no_grad()
    def validation_loss(self, loader=None, state_dict=None) -> float:
        """Mean denoising loss over ``loader`` of the EMA weights (or of ``state_dict``), with a
        fixed noise seed so epochs are comparable. With DDP the mean is over all ranks' shards
        (every rank must call it)."""
        loader = loader or self.val_loader
        live = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(state_dict if state_dict is not None else self.ema.state_dict_for(self.model))
        self.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(12345)
        total, n = 0.0, 0
        try:
            for batch in loader:
                x0, cond = split_batch(batch, self.model)
                x0 = x0.to(self.device).float()
                cond = {k: v.to(self.device) for k, v in cond.items()}
                loss, _ = denoising_loss(self.model, x0, cond, gen)
                total += float(loss) * x0.shape[0]
                n += x0.shape[0]
        finally:
            self.model.load_state_dict(live)
            self.model.train()
        if self.use_ddp:
            total, n = distributed.all_reduce([total, n], device=self.device)
        return total / max(n, 1)

    # -- the loop --------------------------------------------------------------------------------
    def _plan(self, num_epochs: int, micro: int, steps_per_epoch: int) -> int:
        """Set ``self._schedule`` for this call; returns the batch of the epoch to start at."""
        r, self._resume = self._resume, None
        if r is None:
            self._bad_epochs = 0  # a new call counts its own epochs without improvement
        if r is None or r["schedule"] is None:
            if self._raw_state is not None:  # continue from live weights, not EMA
                self.model.load_state_dict(self._raw_state)
                self._raw_state = None
            self._schedule = {"call_start_epoch": self.epoch, "call_start_step": self.step,
                              "end_epoch": self.epoch + num_epochs,
                              "total_steps": self.step + num_epochs * steps_per_epoch}
            return r["batch_in_epoch"] if r is not None else 0
        old = r["schedule"]
        if r["batch_in_epoch"] and r["batches_per_epoch"] != micro:
            raise ValueError(f"{r['path']!r} stopped mid-epoch with {r['batches_per_epoch']} batches per epoch, "
                             f"but the loader now gives {micro}: resume with the same data, batch size and "
                             f"number of processes")
        end_epoch = old["call_start_epoch"] + num_epochs
        if end_epoch < self.epoch:
            raise ValueError(f"{r['path']!r} has trained {self.epoch - old['call_start_epoch']} epochs of this run "
                             f"already, more than the {num_epochs} asked for: give the number of epochs the "
                             f"interrupted run was given ({old['end_epoch'] - old['call_start_epoch']}), or more "
                             f"to train on")
        total = old["call_start_step"] + num_epochs * steps_per_epoch
        if end_epoch == old["end_epoch"] and total != old["total_steps"]:
            raise ValueError(f"{r['path']!r}: the run planned {old['total_steps']} steps but the loader now "
                             f"gives {total}")
        if end_epoch != old["end_epoch"]:
            warn(f"resuming a run planned for {old['end_epoch']} epochs with {end_epoch}: the learning-rate "
                 f"schedule is stretched to the new length")
        self._schedule = {**old, "end_epoch": end_epoch, "total_steps": total}
        return r["batch_in_epoch"]

    def _epoch_batches(self) -> int:
        micro = len(self.train_loader)
        if self.use_ddp:  # every rank must take the same number of steps
            micro = int(distributed.all_reduce([micro], "min", device=self.device)[0])
        return micro

    def train(self, num_epochs: int) -> list[dict]:
        """Train for ``num_epochs`` (or until early stopping). Afterwards the model holds the
        EMA weights: the best ones by validation loss when early stopping is on (a validation
        loader and a patience), else the last ones; :attr:`weights_kept` (and, with a
        ``checkpoint_dir``, ``training.json`` and ``model.pt``) records which.
        After :meth:`resume`, ``num_epochs`` is the same number the interrupted call was given,
        and training continues from where the checkpoint stopped. Returns the per-epoch history."""
        from tqdm.auto import tqdm

        num_epochs = epoch_count(num_epochs)
        micro = self._epoch_batches()
        if micro == 0:
            raise ValueError("the training loader yields no batches")
        accum = self.gradient_accumulation
        steps_per_epoch = -(-micro // accum)
        self._batches_per_epoch = micro
        resumed_from = self._resume["path"] if self._resume is not None else None
        start_batch = self._plan(num_epochs, micro, steps_per_epoch)
        total_steps, end_epoch = self._schedule["total_steps"], self._schedule["end_epoch"]
        self.model.train()
        bar = tqdm(total=total_steps, initial=self.step, desc="training", unit="step",
                   disable=not self.progress or not self.is_main_process)
        log = _StepLog(self, total_steps) if self.log_every_steps > 0 else None
        stopped = self._early_stop_due()  # a resumed run that had already stopped early
        if resumed_from is not None and self.progress and self.is_main_process:
            done = self.epoch - self._schedule["call_start_epoch"]
            left = ("it had stopped early: nothing left to train" if stopped else
                    f"{end_epoch - self.epoch} epoch(s) left" if self.epoch < end_epoch else
                    "all trained already: nothing left to train")
            bar.write(f"resuming {resumed_from}: {done} of {end_epoch - self._schedule['call_start_epoch']} epochs "
                      f"done (step {self.step} of {total_steps}), {left}")
        while self.epoch < end_epoch and not stopped:
            if start_batch == 0:
                self._epoch_loader_state = _loader_state(self.train_loader)
                self._epoch_loss.zero_()
                self._epoch_cells, self._epoch_seconds = 0, 0.0
            i, start_batch = start_batch, 0
            t0 = time.perf_counter()
            batches = _iterate_from(self.train_loader, i)
            try:
                while i < micro:
                    batch = next(batches, None)
                    if batch is None:
                        raise RuntimeError(f"the training loader stopped after {i} batches of the {micro} "
                                           f"it announced (len)")
                    g0 = i - i % accum
                    g1 = min(g0 + accum, micro)
                    if i == g0:
                        self._set_lr(total_steps)
                        self.optimizer.zero_grad(set_to_none=True)
                    terms = self._forward_backward(batch, slot=i - g0, scale=1.0 / (g1 - g0), sync=i == g1 - 1)
                    b = _batch_cells(batch)
                    self._epoch_loss += terms["loss"].double() * b
                    self._epoch_cells += b
                    if log is not None:
                        log.add(terms["loss"], b)
                    i += 1
                    if i == g1:
                        self._optimizer_step()
                        self._batch_in_epoch = i
                        bar.update(1)
                        if log is not None and self.step % self.log_every_steps == 0:
                            bar.set_postfix(log.flush(), refresh=False)
                        if (self.checkpoint_dir and self.checkpoint_every_steps > 0 and i < micro
                                and self.step % self.checkpoint_every_steps == 0):
                            self._epoch_seconds += time.perf_counter() - t0
                            self.save_checkpoint()
                            t0 = time.perf_counter()
            finally:
                if hasattr(batches, "close"):
                    batches.close()
            self._epoch_seconds += time.perf_counter() - t0
            self.epoch += 1
            self._batch_in_epoch = 0
            stopped = self._end_epoch(bar, total_steps)
        if (self.checkpoint_dir and (self.checkpoint_every > 0 or self.checkpoint_every_steps > 0)
                and self._checkpoint_step != self.step):  # the end too, or a resume would read an older state
            self.save_checkpoint()
        bar.close()
        self._raw_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.weights_kept = {**self._weights_to_keep(), "seed": None if self.seed is None else int(self.seed)}
        self.model.load_state_dict(self.best_state if self.weights_kept["weights"] == "best"
                                   else self.ema.state_dict_for(self.model))
        self.model.eval()
        self._set_final_sigma()
        if self.checkpoint_dir and self.is_main_process:
            save_model(self.model, self.checkpoint_dir, training=self.weights_kept)
            self._remove_foreign_checkpoints()
            self.write_history(os.path.join(self.checkpoint_dir, "history.csv"))
            self._write_summary(os.path.join(self.checkpoint_dir, SUMMARY_FILE))
        if self.use_ddp:
            distributed.barrier()
        return self.history

    def _remove_foreign_checkpoints(self) -> None:
        """After a run that did not resume: training checkpoints in ``checkpoint_dir`` that this
        trainer did not write belong to an earlier run in the same folder; left beside the new
        ``model.pt`` a resume would continue that other run, so they are removed."""
        if self._resumed:
            return
        d = self.checkpoint_dir
        found = [p for _, p in list_checkpoints(d)] + [os.path.join(d, CHECKPOINT_FILE)]
        for path in found:
            if os.path.exists(path) and os.path.abspath(path) not in self._own_checkpoints:
                os.remove(path)

    def _set_final_sigma(self) -> None:
        """Where the trained model's generation ends (:mod:`scidiff.models.final_noise`): the
        level given, or with ``"auto"`` fitted on the validation cells against the training cells
        (left at 0 without validation cells), recorded with :attr:`weights_kept`."""
        if not hasattr(self.model, "fit_final_sigma"):
            return
        if self.final_sigma != "auto":
            self.model.final_sigma.fill_(float(self.final_sigma))
            return
        if self.val_loader is None:
            return
        training, _ = _collect_cells(self.train_loader, self.model, REFERENCE_CELLS)
        held_out, cond = _collect_cells(self.val_loader, self.model, HELD_OUT_CELLS)
        if len(held_out) < 2:
            return
        sigma = self.model.fit_final_sigma(training, held_out, cond, seed=self.seed)
        self.weights_kept["final_sigma"] = {"fitted": sigma, "validation_cells": len(held_out),
                                            "training_cells": len(training)}

    def _weights_to_keep(self) -> dict:
        """Which EMA weights the trained model keeps: the best by validation loss when early
        stopping is on, else the last. Best weights from the first ``EARLY_BEST_FRACTION`` of the
        run are reported (an :class:`EarlyBestWarning` on the main process, and ``"warning"``)."""
        kept = {"weights": "last", "epoch": self.epoch, "epochs_trained": self.epoch,
                "early_stopping_patience": self.early_stopping_patience}
        vals = [(int(r["epoch"]), float(r["val_loss"])) for r in self.history if "val_loss" in r]
        if not vals:
            return kept
        best_epoch, best = min(vals, key=lambda r: r[1])
        kept.update(best_epoch=best_epoch, best_val_loss=best, last_val_loss=vals[-1][1])
        if self.early_stopping_patience is None or self.best_state is None:
            return kept
        kept.update(weights="best", epoch=best_epoch)
        if best_epoch < self.epoch and best_epoch <= EARLY_BEST_FRACTION * self.epoch:
            kept["warning"] = (
                f"validation loss was lowest at epoch {best_epoch} of {self.epoch} ({best:.4g}; {vals[-1][1]:.4g} "
                f"at epoch {vals[-1][0]}), so the saved model holds the weights of epoch {best_epoch}, from the "
                f"first {100 * best_epoch / self.epoch:.0f}% of training: validation never improved after that "
                f"(too few cells for the model, or overfitting). Check history.csv; train on more cells or a "
                f"smaller model, or set training.early_stopping_patience: null to keep the last weights")
            if self.is_main_process:
                warn(kept["warning"], EarlyBestWarning)
        return kept

    def _write_summary(self, path: str) -> None:
        def write(tmp):
            with open(tmp, "w") as fh:
                json.dump({**self.weights_kept, **self.report}, fh, indent=1, default=float)
        atomic_path(path, write)

    def _end_epoch(self, bar, total_steps: int) -> bool:
        """Epoch bookkeeping: history row, validation, checkpoint; True to stop early."""
        loss_sum, cells, seconds = float(self._epoch_loss), self._epoch_cells, self._epoch_seconds
        if self.use_ddp:
            loss_sum, cells, seconds = distributed.all_reduce([loss_sum, cells, seconds], device=self.device)
            seconds /= self.world_size
        row = {"epoch": self.epoch, "step": self.step, "train_loss": loss_sum / max(cells, 1),
               "cells_per_s": cells / max(seconds, 1e-9), "lr": self._lr(total_steps)}
        if not math.isfinite(row["train_loss"]):
            self.history.append(row)
            if self.checkpoint_dir and self.is_main_process:
                self.write_history(os.path.join(self.checkpoint_dir, "history.csv"))
            saved = self.checkpoint_dir and os.path.exists(os.path.join(self.checkpoint_dir, CHECKPOINT_FILE))
            kept = f"; the checkpoint in {self.checkpoint_dir!r} holds finite weights of before" if saved else ""
            raise DivergedError(f"training diverged: the training loss is {row['train_loss']} at epoch {self.epoch} "
                                f"(step {self.step}, learning rate {row['lr']:.3g}); lower training.learning_rate "
                                f"or set training.gradient_clip_val{kept}")
        if self.val_loader is not None:
            row["val_loss"] = self.validation_loss()
            if row["val_loss"] < self.best_val:
                self.best_val, self._bad_epochs = row["val_loss"], 0
                self.best_state = self.ema.state_dict_for(self.model)
            else:
                self._bad_epochs += 1
        self.history.append(row)
        bar.set_postfix({"epoch": self.epoch, **{k: f"{v:.4g}" for k, v in row.items()
                                                  if k in ("train_loss", "val_loss", "cells_per_s")}})
        if self.checkpoint_dir and (
                (self.checkpoint_every > 0 and self.epoch % self.checkpoint_every == 0)
                or (self.checkpoint_every_steps > 0 and self.step % self.checkpoint_every_steps == 0)):
            self.save_checkpoint()
        if self._early_stop_due():
            bar.write(f"early stopping after epoch {self.epoch}: no better validation loss "
                      f"for {self._bad_epochs} epochs (best {self.best_val:.4g})")
            return True
        return False

    def _early_stop_due(self) -> bool:
        return (self.early_stopping_patience is not None and self.val_loader is not None
                and self._bad_epochs >= self.early_stopping_patience)

    # -- files -----------------------------------------------------------------------------------
    def _training_state(self) -> dict:
        """Everything :meth:`resume` needs beyond weights, optimizer and EMA (collective under DDP)."""
        mine = {"rng": capture_rng_state(self.generators), "epoch_loss": float(self._epoch_loss),
                "epoch_cells": int(self._epoch_cells), "epoch_seconds": float(self._epoch_seconds)}
        ranks = distributed.all_gather_object(mine) if self.use_ddp else [mine]
        mid_epoch = self._batch_in_epoch > 0
        return {"batch_in_epoch": int(self._batch_in_epoch),
                "batches_per_epoch": self._batches_per_epoch,
                "loader": self._epoch_loader_state if mid_epoch else _loader_state(self.train_loader),
                "schedule": dict(self._schedule) if self._schedule else None,
                "history": [dict(r) for r in self.history], "best_val": float(self.best_val),
                "best_state": ({k: v.detach().cpu() for k, v in self.best_state.items()}
                               if self.best_state is not None else None),
                "bad_epochs": int(self._bad_epochs), "world_size": int(self.world_size),
                "gradient_accumulation": int(self.gradient_accumulation), "seed": int(self.seed),
                "ranks": ranks}

    def save_checkpoint(self, path=None) -> str | None:
        """Model (EMA weights) plus the whole training state (live weights, optimizer, EMA,
        schedule position, step, epoch, RNG states, data-order position), written atomically
        with a digest. Under DDP every rank must call it; rank 0 writes and returns the path,
        the others return ``None``."""
        state = self._training_state()
        if path is None:
            self._checkpoint_step = self.step
        if not self.is_main_process:
            return None
        payload = model_payload(self.model, self.ema.state_dict_for(self.model))
        live = self._raw_state if self._raw_state is not None else self.model.state_dict()  # after train(): EMA in model
        payload.update({"live_state_dict": {k: v.detach().cpu() for k, v in live.items()},
                        "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict(),
                        "step": self.step, "epoch": self.epoch, "trainer": state})
        if path is None:
            path = write_training_checkpoint(payload, self.checkpoint_dir, self.step, self.keep_checkpoints)
            self._own_checkpoints.update(os.path.abspath(p) for p in
                                         (path, os.path.join(self.checkpoint_dir, CHECKPOINT_FILE)))
            if self.history:
                self.write_history(os.path.join(self.checkpoint_dir, "history.csv"))
        else:
            payload["digest"] = payload_digest(payload)
            atomic_torch_save(payload, path)
        return path

    def _check_same_data(self, payload: dict, where: str) -> None:
        """Raise when ``payload`` was trained on other data than this model was set up on (other
        genes, normalisation or labels): its weights would be saved beside this data's spec."""
        mine = getattr(self.model, "data_spec", None)
        saved = json.loads(payload["data_spec"]) if isinstance(payload.get("data_spec"), str) else None
        if mine is None or not saved:
            return
        saved = DataSpec.from_dict(saved)
        mine.check_same_genes(saved, what=where)
        differ = [f for f in _DATA_FIELDS if not _same_spec_value(getattr(saved, f), getattr(mine, f))]
        if differ:
            raise ValueError(f"{where} was trained on other data: its {', '.join(differ)} differ from this data's; "
                             f"resume with the data (cells, genes, labels, set-up) the run started on")

    def _check_resumable(self, payload: dict) -> None:
        """Raise before anything is loaded when ``payload`` does not fit this trainer."""
        where = repr(payload["path"])
        self._check_same_data(payload, where)
        if hasattr(self.model, "config"):
            saved, mine = json.loads(payload["config"]), json.loads(json.dumps(self.model.config()))
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            if diff:
                raise ValueError(f"{where} was written for another model: config differs in {diff} "
                                 f"(checkpoint {[saved.get(k) for k in diff]}, this model {[mine.get(k) for k in diff]})")
        own = self.model.state_dict()
        for name in ("live_state_dict", "state_dict"):
            sd = payload[name]
            if set(sd) != set(own):
                raise ValueError(f"{where}: {name} does not match the model (missing "
                                 f"{sorted(set(own) - set(sd))[:5]}, unexpected {sorted(set(sd) - set(own))[:5]})")
            bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
            if bad:
                raise ValueError(f"{where}: {name} has other shapes for {bad[:5]}")
        opt, mine = payload["optimizer"], self.optimizer.state_dict()
        sizes = [len(g["params"]) for g in opt.get("param_groups", [])]
        if sizes != [len(g["params"]) for g in mine["param_groups"]]:
            raise ValueError(f"{where}: the optimizer holds parameter groups of sizes {sizes}, this trainer "
                             f"{[len(g['params']) for g in mine['param_groups']]}")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for idx, st in opt.get("state", {}).items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st and tuple(st[key].shape) != tuple(params[int(idx)].shape):
                    raise ValueError(f"{where}: optimizer state {key} of parameter {idx} has shape "
                                     f"{tuple(st[key].shape)}, the parameter {tuple(params[int(idx)].shape)}")
        shadow = payload["ema"].get("shadow", {})
        if set(shadow) != set(self.ema.shadow):
            raise ValueError(f"{where}: the EMA weights do not match the model")
        t = payload["trainer"]
        if t.get("seed", self.seed) != self.seed:
            raise ValueError(f"{where} was trained with seed {t['seed']}, this trainer has seed {self.seed}: resume "
                             f"with the same seed (training.seed, --seed; it also chose the validation cells)")
        missing = [k for k in ("batch_in_epoch", "batches_per_epoch", "loader", "schedule", "history", "best_val",
                               "best_state", "bad_epochs", "world_size", "gradient_accumulation", "ranks") if k not in t]
        if missing:
            raise ValueError(f"{where}: training state lacks {missing}")
        if t["batch_in_epoch"] and (t["world_size"] != self.world_size
                                    or t["gradient_accumulation"] != self.gradient_accumulation):
            raise ValueError(f"{where} stopped mid-epoch under {t['world_size']} process(es) with gradient "
                             f"accumulation {t['gradient_accumulation']}; resume it with the same (this trainer: "
                             f"{self.world_size}, {self.gradient_accumulation})")
        ranks = t["ranks"]
        if not ranks or any(set(r) != {"rng", "epoch_loss", "epoch_cells", "epoch_seconds"} for r in ranks):
            raise ValueError(f"{where}: the per-process training state is malformed")
        if (t["world_size"] == self.world_size and t["gradient_accumulation"] == self.gradient_accumulation
                and len(ranks[min(self.rank, len(ranks) - 1)]["rng"]["generators"]) != len(self.generators)):
            raise ValueError(f"{where}: the noise-generator states do not match this trainer")
        if t["loader"] is not None:
            mine_l = _loader_state(self.train_loader)
            if mine_l is None or set(mine_l) != set(t["loader"]):
                raise ValueError(f"{where}: the data-order state {sorted(t['loader'])} does not fit this training "
                                 f"loader ({type(self.train_loader).__name__})")

    def _streams_fit(self, states) -> bool:
        """Whether saved noise-generator states fit this trainer's generators (a CUDA generator's
        state is another size than a CPU one's)."""
        return len(states) == len(self.generators) and all(
            tuple(s.shape) == tuple(g.get_state().shape) for s, g in zip(states, self.generators))

    def resume(self, path) -> int:
        """Restore weights, optimizer, EMA, schedule, step, epoch, RNG states and the position in
        the data from a training checkpoint (a file, or a run folder: its newest readable one),
        so that :meth:`train` continues exactly where it stopped. Everything is checked before
        anything is loaded. Returns the step."""
        if self.checkpoint_dir and self.is_main_process and os.path.isdir(self.checkpoint_dir):
            remove_partial_files(self.checkpoint_dir)
        payload = read_training_checkpoint(path)
        self._check_resumable(payload)
        t = payload["trainer"]
        self.model.load_state_dict(payload["live_state_dict"])
        weight_decay = [g["weight_decay"] for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(payload["optimizer"])
        for group, wd in zip(self.optimizer.param_groups, weight_decay):  # as the learning rate: this trainer's
            group["weight_decay"] = wd
        decay = self.ema.decay
        self.ema.load_state_dict(payload["ema"])
        self.ema.decay = decay
        self.step, self.epoch = int(payload["step"]), int(payload["epoch"])
        self.history = [dict(r) for r in t["history"]]
        self.best_val, self._bad_epochs = float(t["best_val"]), int(t["bad_epochs"])
        self.best_state = ({k: v.to(self.device) for k, v in t["best_state"].items()}
                           if t["best_state"] is not None else None)
        same_layout = (t["world_size"] == self.world_size and t["gradient_accumulation"] == self.gradient_accumulation)
        mine = t["ranks"][self.rank] if self.rank < len(t["ranks"]) else t["ranks"][0]
        if not same_layout:
            warn(f"{payload['path']!r} was written under {t['world_size']} process(es) with gradient "
                 f"accumulation {t['gradient_accumulation']}; the noise streams restart from the seed")
        elif not self._streams_fit(mine["rng"]["generators"]):
            same_layout = False
            warn(f"{payload['path']!r} was written on another kind of device than {self.device.type} (its "
                 f"noise-generator states do not fit this trainer's); the noise streams restart from the seed")
        rng = mine["rng"] if same_layout else {**mine["rng"], "generators": []}
        restore_rng_state(rng, self.generators if same_layout else ())
        self._epoch_loss.fill_(mine["epoch_loss"] if t["batch_in_epoch"] else 0.0)
        self._epoch_cells = int(mine["epoch_cells"]) if t["batch_in_epoch"] else 0
        self._epoch_seconds = float(mine["epoch_seconds"]) if t["batch_in_epoch"] else 0.0
        _restore_loader(self.train_loader, t["loader"])
        self._epoch_loader_state = t["loader"]
        self._batch_in_epoch = int(t["batch_in_epoch"])
        self._resume = {"path": payload["path"], "schedule": t["schedule"], "batch_in_epoch": self._batch_in_epoch,
                        "batches_per_epoch": t["batches_per_epoch"]}
        self._raw_state = None
        self._checkpoint_step = self.step
        self._resumed = True
        if self.log_every_steps > 0 and self.checkpoint_dir and self.is_main_process:
            _StepLog.truncate(os.path.join(self.checkpoint_dir, "steps.csv"), self.step)
        return self.step

    def write_history(self, path) -> None:
        if not self.history:
            return
        keys = list(dict.fromkeys(k for row in self.history for k in row))

        def write(tmp):
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(self.history)
        atomic_path(path, write)


class _StepLog:
    """Loss and throughput every ``log_every_steps`` steps: summed over ranks, appended by rank 0
    to ``steps.csv`` and shown on the progress bar."""

    FIELDS = ["step", "epoch", "loss", "cells_per_s", "lr"]

    def __init__(self, trainer: ScIDiffTrainer, total_steps: int):
        self.trainer, self.total_steps = trainer, total_steps
        self.loss = torch.zeros((), dtype=torch.float64, device=trainer.device)
        self.cells, self.t0 = 0, time.perf_counter()
        d = trainer.checkpoint_dir
        self.path = os.path.join(d, "steps.csv") if d and trainer.is_main_process else None
        if self.path:
            os.makedirs(d, exist_ok=True)
            # rows of a later step were logged by another run into this folder (or by the steps a
            # resumed run repeats): this run's rows follow its own step
            self.truncate(self.path, trainer.step)

    def add(self, loss: torch.Tensor, cells: int) -> None:
        self.loss += loss.double() * cells
        self.cells += cells

    def flush(self) -> dict:
        tr = self.trainer
        loss, cells = float(self.loss), self.cells
        seconds = time.perf_counter() - self.t0
        if tr.use_ddp:
            loss, cells = distributed.all_reduce([loss, cells], device=tr.device)
        row = {"step": tr.step, "epoch": tr.epoch, "loss": loss / max(cells, 1),
               "cells_per_s": cells / max(seconds, 1e-9), "lr": tr._lr(self.total_steps)}
        if self.path:
            new = not os.path.exists(self.path)
            with open(self.path, "a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=self.FIELDS)
                if new:
                    writer.writeheader()
                writer.writerow(row)
        self.loss.zero_()
        self.cells, self.t0 = 0, time.perf_counter()
        return {"loss": f"{row['loss']:.4g}", "cells/s": f"{row['cells_per_s']:.0f}"}

    @staticmethod
    def truncate(path: str, step: int) -> None:
        """Drop the rows a killed run logged after the checkpoint it resumes from."""
        if not os.path.exists(path):
            return
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= step]

        def write(tmp):
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=_StepLog.FIELDS)
                writer.writeheader()
                writer.writerows(rows)
        atomic_path(path, write)
