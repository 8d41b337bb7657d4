"""``ScIDiffTrainer``: AdamW, gradient clipping, EMA, early stopping, checkpoints."""
from __future__ import annotations

import csv
import math
import os
import time
import warnings

import torch

from .checkpoint import atomic_torch_save, model_payload, save_model
from .ema import EMA
from .losses import BiologicalConstraints, denoising_loss


def resolve_device(device) -> torch.device:
    """``"auto"`` -> CUDA if present else CPU; a CUDA request without CUDA warns and uses CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("CUDA was requested but is not available; training on the CPU", stacklevel=3)
        return torch.device("cpu")
    return device


def split_batch(batch, model) -> tuple[torch.Tensor, dict]:
    """A batch dict (``"x"`` + covariates), a tensor, or a ``(tensor, ...)`` tuple ->
    ``(x, cond)`` with only the covariates the model knows."""
    if isinstance(batch, torch.Tensor):
        return batch, {}
    if isinstance(batch, (list, tuple)):
        return batch[0], {}
    keys = set(model.condition_encoder.keys)
    return batch["x"], {k: v for k, v in batch.items() if k in keys}


class ScIDiffTrainer:
    """Train a :class:`~scidiff.models.ScIDiffModel`.

    Args:
        model, train_loader, val_loader: loaders yield batch dicts (see :mod:`scidiff.data`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` (falls back to CPU with a warning).
        learning_rate, weight_decay: AdamW; the rate warms up linearly over ``warmup_steps`` and
            decays along a cosine to 10% by the last step.
        gradient_clip_val: global gradient-norm clip (0 = off).
        ema_decay: EMA of weights; the EMA weights are what sampling and checkpoints use.
        mixed_precision: ``"auto"`` (bf16 autocast on CUDA, off on CPU), ``"bf16"`` or ``"no"``.
        constraints: :class:`BiologicalConstraints` weights (all off by default).
        early_stopping_patience: stop after this many epochs without a better validation loss
            (needs ``val_loader``; ``None`` = off); the best EMA weights are restored.
        checkpoint_dir, checkpoint_every: write ``checkpoint.pt`` every N epochs and
            ``model.pt`` + ``history.csv`` at the end.
    """

    def __init__(self, model, train_loader, val_loader=None, device="auto", learning_rate: float = 1e-3,
                 weight_decay: float = 1e-4, gradient_clip_val: float = 1.0, ema_decay: float = 0.999,
                 warmup_steps: int = 200, mixed_precision: str = "auto",
                 constraints: BiologicalConstraints | None = None, early_stopping_patience: int | None = 20,
                 checkpoint_dir=None, checkpoint_every: int = 10, seed: int = 0, progress: bool = True):
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        groups = (model.parameter_groups(learning_rate) if hasattr(model, "parameter_groups")
                  else [{"params": list(model.parameters()), "lr_scale": 1.0}])
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate,
                                           weight_decay=weight_decay)
        self.learning_rate, self.warmup_steps = float(learning_rate), int(warmup_steps)
        self.gradient_clip_val = float(gradient_clip_val)
        self.ema = EMA(model, ema_decay)
        if mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError("mixed_precision must be 'auto', 'bf16' or 'no'")
        self.autocast = (mixed_precision == "bf16") or (mixed_precision == "auto" and self.device.type == "cuda")
        self.constraints = constraints or BiologicalConstraints()
        spec = model.data_spec
        self.gene_sets = self.constraints.resolve(spec.gene_names if spec else None, self.device)
        self.early_stopping_patience = early_stopping_patience
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, int(checkpoint_every)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.seed, self.progress = seed, progress
        self.step, self.epoch = 0, 0
        self.history: list[dict] = []
        self.best_val, self.best_state = math.inf, None

    # -- one step --------------------------------------------------------------------------------
    def _lr(self, total_steps: int) -> float:
        if self.step < self.warmup_steps:
            return self.learning_rate * (self.step + 1) / self.warmup_steps
        frac = min(1.0, (self.step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        return self.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def _expression(self, z):
        spec = self.model.data_spec
        return spec.to_expression(z, clip=False) if spec is not None else z

    def training_step(self, batch, total_steps: int) -> dict:
        x0, cond = split_batch(batch, self.model)
        x0 = x0.to(self.device, non_blocking=True).float()
        cond = {k: v.to(self.device) for k, v in cond.items()}
        lr = self._lr(total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, x0_hat = denoising_loss(self.model, x0, cond, self.generator)
        terms = {"denoising": loss.detach()}
        if self.constraints.active:
            extra = self.constraints(self._expression(x0_hat.float()), self._expression(x0), self.gene_sets)
            terms.update({k: v.detach() for k, v in extra.items()})
            loss = loss + sum(extra.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.gradient_clip_val > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.gradient_clip_val)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        terms["loss"] = loss.detach()
        return terms

    @torch.no_grad()
    def validation_loss(self, loader=None, state_dict=None) -> float:
        """Mean denoising loss over ``loader`` of the EMA weights (or of ``state_dict``), with a
        fixed noise seed so epochs are comparable."""
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
        return total / max(n, 1)

    # -- the loop --------------------------------------------------------------------------------
    def train(self, num_epochs: int) -> list[dict]:
        """Train for ``num_epochs`` (or until early stopping). Afterwards the model holds the
        EMA weights (the best ones by validation loss when a validation loader is given).
        Returns the per-epoch history."""
        from tqdm.auto import tqdm

        steps_per_epoch = len(self.train_loader)
        if steps_per_epoch == 0:
            raise ValueError("the training loader yields no batches")
        total_steps = self.step + num_epochs * steps_per_epoch
        if getattr(self, "_raw_state", None) is not None:  # continue from live weights, not EMA
            self.model.load_state_dict(self._raw_state)
        self.model.train()
        bad_epochs = 0
        bar = tqdm(range(num_epochs), desc="training", unit="epoch", disable=not self.progress)
        for _ in bar:
            t0, cells, total = time.perf_counter(), 0, 0.0
            for batch in self.train_loader:
                terms = self.training_step(batch, total_steps)
                b = (batch["x"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch).shape[0]
                cells += b
                total += float(terms["loss"]) * b
            self.epoch += 1
            row = {"epoch": self.epoch, "step": self.step, "train_loss": total / max(cells, 1),
                   "cells_per_s": cells / max(time.perf_counter() - t0, 1e-9), "lr": self._lr(total_steps)}
            if self.val_loader is not None:
                row["val_loss"] = self.validation_loss()
                if row["val_loss"] < self.best_val:
                    self.best_val, bad_epochs = row["val_loss"], 0
                    self.best_state = self.ema.state_dict_for(self.model)
                else:
                    bad_epochs += 1
            self.history.append(row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("train_loss", "val_loss")})
            if self.checkpoint_dir and self.checkpoint_every > 0 and self.epoch % self.checkpoint_every == 0:
                self.save_checkpoint()
            if (self.early_stopping_patience is not None and self.val_loader is not None
                    and bad_epochs >= self.early_stopping_patience):
                bar.write(f"early stopping after epoch {self.epoch}: no better validation loss "
                          f"for {bad_epochs} epochs (best {self.best_val:.4g})")
                break
        self._raw_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.best_state if self.best_state is not None
                                   else self.ema.state_dict_for(self.model))
        self.model.eval()
        if self.checkpoint_dir:
            save_model(self.model, self.checkpoint_dir)
            self.write_history(os.path.join(self.checkpoint_dir, "history.csv"))
        return self.history

    # -- files -----------------------------------------------------------------------------------
    def save_checkpoint(self, path=None) -> str:
        """Model (EMA weights) plus the training state, written atomically."""
        path = path or os.path.join(self.checkpoint_dir, "checkpoint.pt")
        payload = model_payload(self.model, self.ema.state_dict_for(self.model))
        payload.update({"live_state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                        "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict(),
                        "step": self.step, "epoch": self.epoch})
        atomic_torch_save(payload, path)
        return path

    def write_history(self, path) -> None:
        if not self.history:
            return
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
        os.replace(tmp, path)
