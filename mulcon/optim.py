"""Optimizers, learning-rate schedules and the weight EMA of the two-step policy (section 4).

Step 1 (pretrain): Adam with a one-cycle schedule peaking at `pretrain.lr` (the paper), or AdamW
with a linear warm-up from 0.1 x lr and a cosine decay (the authors' code); stepped every batch.
Step 2 (finetune): SGD with momentum, the learning rate multiplied by `lr_step_factor` every
`lr_step_epochs` epochs, stepped every epoch.
In both steps the parameters form two groups: the head at the stage's lr, and the slow part
(the backbone; in step 2 also the label attention) at lr x `backbone_lr_scale`. Every schedule
scales each group's lr by the same factor, a pure function of the (fractional) epoch.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from mulcon.config import Config

WARMUP_START = 0.1  # the authors' warm-up starts at 0.1 x lr


def parameter_groups(model: nn.Module, lr: float, backbone_lr_scale: float,
                     slow_prefixes: tuple[str, ...]) -> list[dict]:
    """[head at `lr`, parameters under `slow_prefixes` at lr x backbone_lr_scale]; the head first,
    so `param_groups[0]["lr"]` is the stage's own lr. A group with no parameter is left out."""
    head, slow = [], []
    for name, parameter in model.named_parameters():
        (slow if name.startswith(slow_prefixes) else head).append(parameter)
    groups = [{"params": head, "lr": lr}, {"params": slow, "lr": lr * backbone_lr_scale}]
    return [group for group in groups if group["params"]]


def kernel_options(model: nn.Module) -> dict[str, bool]:
    """How the optimizer updates the weights: one fused kernel on CUDA, else the multi-tensor
    (foreach) path; either way a handful of kernels per step instead of a few per parameter."""
    if all(parameter.is_cuda for parameter in model.parameters()):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(config: Config, stage: str, model: nn.Module) -> torch.optim.Optimizer:
    """Adam/AdamW (step 1) or SGD (step 2) over the two parameter groups of the stage."""
    if stage == "pretrain":
        step = config.pretrain
        groups = parameter_groups(model, step.lr, step.backbone_lr_scale, ("backbone.",))
        kind = torch.optim.AdamW if step.optimizer == "adamw" else torch.optim.Adam
        return kind(groups, lr=step.lr, weight_decay=step.weight_decay, **kernel_options(model))
    step = config.finetune
    # The authors slow down the label attention with the backbone in step 2: only the classifier
    # and the projector, which the contrastive loss reshapes, keep the full lr.
    groups = parameter_groups(model, step.lr, step.backbone_lr_scale, ("backbone.", "label_attention."))
    return torch.optim.SGD(groups, lr=step.lr, momentum=step.momentum, weight_decay=step.weight_decay,
                           **kernel_options(model))


def warmup_cosine(epoch: float, epochs: int, warmup_epochs: int) -> float:
    """The lr factor at fractional `epoch`: linear from WARMUP_START to 1 over `warmup_epochs`,
    then a cosine from 1 to 0 over the remaining epochs (1 throughout if none remain)."""
    if epoch < warmup_epochs:
        return WARMUP_START + (1.0 - WARMUP_START) * epoch / warmup_epochs
    remaining = epochs - warmup_epochs
    if remaining <= 0:
        return 1.0
    progress = min(1.0, (epoch - warmup_epochs) / remaining)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(config: Config, stage: str, optimizer: torch.optim.Optimizer, epochs: int,
                    steps_per_epoch: int) -> tuple[torch.optim.lr_scheduler.LRScheduler, bool]:
    """The schedule of `stage` and whether it steps per batch (True) or per epoch (False)."""
    if stage == "pretrain" and config.pretrain.schedule == "cosine":
        warmup, per_epoch = config.pretrain.warmup_epochs, max(1, steps_per_epoch)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step / per_epoch, epochs, warmup))
        return schedule, True
    if stage == "pretrain":
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=max(1, epochs * steps_per_epoch))
        return schedule, True
    schedule = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.finetune.lr_step_epochs, gamma=config.finetune.lr_step_factor)
    return schedule, False


class ModelEma(nn.Module):
    """An exponential moving average of a model's whole state dict, as the authors' code keeps one
    (decay 0.9997): weights and floating buffers (BatchNorm running means and variances) are
    averaged; integer buffers (BatchNorm's batch counters) are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged, current = [], []
        for mine, theirs in zip(self.module.state_dict().values(), model.state_dict().values()):
            if mine.is_floating_point():
                averaged.append(mine)
                current.append(theirs.detach())
            else:
                mine.copy_(theirs)
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay)
