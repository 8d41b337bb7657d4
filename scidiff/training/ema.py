"""Exponential moving average of weights (Polyak averaging), used for sampling."""
from __future__ import annotations

import torch


class EMA:
    """Shadow copy of a model's floating-point parameters and buffers.

    ``decay`` warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early
    weights do not dominate a short run.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        state = model.state_dict()
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [state[k].detach() for k in keys], 1.0 - d)

    def state_dict_for(self, model: torch.nn.Module) -> dict:
        """The model's full state dict with EMA values in place of the live ones."""
        return {k: self.shadow.get(k, v).clone() for k, v in model.state_dict().items()}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
