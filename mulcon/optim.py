"""Optimizers, learning-rate schedules and the weight EMA of the two-step policy (section 4).

Step 1 (pretrain): Adam with a one-cycle schedule peaking at `pretrain.lr`, stepped every batch.
Step 2 (finetune): SGD with momentum, the learning rate divided by 1/`lr_step_factor` every
`lr_step_epochs` epochs, stepped every epoch.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mulcon.config import Config


def kernel_options(model: nn.Module) -> dict[str, bool]:
    """How the optimizer updates the weights: one fused kernel on CUDA, else the multi-tensor
    (foreach) path; either way a handful of kernels per step instead of a few per parameter."""
    if all(parameter.is_cuda for parameter in model.parameters()):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(config: Config, stage: str, model: nn.Module) -> torch.optim.Optimizer:
    if stage == "pretrain":
        return torch.optim.Adam(model.parameters(), lr=config.pretrain.lr, weight_decay=config.pretrain.weight_decay,
                                **kernel_options(model))
    return torch.optim.SGD(model.parameters(), lr=config.finetune.lr, momentum=config.finetune.momentum,
                           weight_decay=config.finetune.weight_decay, **kernel_options(model))


def build_scheduler(config: Config, stage: str, optimizer: torch.optim.Optimizer, epochs: int,
                    steps_per_epoch: int) -> tuple[torch.optim.lr_scheduler.LRScheduler, bool]:
    """The schedule of `stage` and whether it steps per batch (True) or per epoch (False)."""
    if stage == "pretrain":
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.pretrain.lr, total_steps=max(1, epochs * steps_per_epoch))
        return schedule, True
    schedule = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.finetune.lr_step_epochs, gamma=config.finetune.lr_step_factor)
    return schedule, False


class ModelEma(nn.Module):
    """An exponential moving average of a model's weights (the authors' code keeps one, decay 0.9997).

    Buffers (BatchNorm statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged = list(self.module.parameters())
        current = [parameter.detach() for parameter in model.parameters()]
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
