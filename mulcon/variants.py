"""The variants of the ablation (paper Table 3, and one row of ours), as training plans with one epoch budget.

Every variant trains `pretrain_epochs + finetune_epochs` epochs in total:
- backbone_bce: Baseline, BCE only (step-1 recipe for the whole budget).
- backbone_bce_scl: Baseline, step 1 then step 2 with the image-level SupCon loss (the same
  two-step policy as MulCon, so the comparison isolates label-level against image-level CL).
- mulcon_bce: MulCon, BCE only ("MulCon with BCE only", the pretraining step for the whole budget).
- mulcon_no_pretrain: MulCon, BCE + L_con from the start (step-2 recipe for the whole budget).
- mulcon: MulCon, the two-step policy of section 2.3.
- mulcon_step2_bce: MulCon's two steps with gamma = 0 in step 2 (not in the paper): the same
  optimizer path, the same two views and batches as `mulcon`, only L_con left out of the gradient,
  so the difference to `mulcon` is what label-level contrast adds (Table 3's "BCE only" row trains
  another schedule). Its step 2 still computes L_con, which its history then shows untrained.
"""

from __future__ import annotations

from dataclasses import dataclass

from mulcon.config import VARIANTS, TrainConfig
from mulcon.errors import ConfigError

STAGES = ("pretrain", "finetune")


@dataclass(frozen=True)
class Step:
    stage: str  # "pretrain" (Adam + one-cycle) or "finetune" (SGD + step decay)
    epochs: int
    contrastive: str | None  # None, "label" (Eq. 8) or "image" (SupCon on image features)
    contrastive_weight: float | None = None  # gamma of Eq. 9 for this step; None: loss.contrastive_weight


@dataclass(frozen=True)
class Plan:
    variant: str
    label_level: bool  # MulCon (True) or the Baseline (False)
    steps: tuple[Step, ...]


def plan_variant(train: TrainConfig) -> Plan:
    """The training plan of `train.variant` under the epoch budget of `train`."""
    pre, fine = train.pretrain_epochs, train.finetune_epochs
    total = pre + fine
    plans = {
        "backbone_bce": Plan("backbone_bce", False, (Step("pretrain", total, None),)),
        "backbone_bce_scl": Plan("backbone_bce_scl", False, (Step("pretrain", pre, None), Step("finetune", fine, "image"))),
        "mulcon_bce": Plan("mulcon_bce", True, (Step("pretrain", total, None),)),
        "mulcon_no_pretrain": Plan("mulcon_no_pretrain", True, (Step("finetune", total, "label"),)),
        "mulcon": Plan("mulcon", True, (Step("pretrain", pre, None), Step("finetune", fine, "label"))),
        "mulcon_step2_bce": Plan("mulcon_step2_bce", True,
                                 (Step("pretrain", pre, None), Step("finetune", fine, "label", contrastive_weight=0.0))),
    }
    if train.variant not in plans:
        raise ConfigError(f"train.variant: {train.variant!r} is not one of {', '.join(VARIANTS)}")
    plan = plans[train.variant]
    steps = tuple(step for step in plan.steps if step.epochs > 0)
    if not steps:
        raise ConfigError("train.pretrain_epochs + train.finetune_epochs: the epoch budget is 0")
    return Plan(plan.variant, plan.label_level, steps)
