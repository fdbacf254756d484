"""Exponential moving average of model weights, evaluated and saved alongside the trained weights.

Averaging the weights over the last few hundred steps smooths out the noise of the final SGD/AdamW
iterates; on short schedules it is worth several mAP points for the cost of one extra copy of the model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """`ema = decay * ema + (1 - decay) * weights` after every step; buffers (BN statistics) are copied.

    The effective decay ramps up as `min(decay, (1 + n) / (10 + n))` over the first updates so the
    average is not dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"config key 'train.ema_decay' must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - self.current_decay()
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, weight)
        ema_buffers, buffers = list(self.module.buffers()), list(model.buffers())
        if buffers:  # the foreach ops refuse empty lists
            torch._foreach_copy_(ema_buffers, buffers)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
