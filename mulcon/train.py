"""Two-step training of MulCon and of the Table 3 variants (paper section 2.3 and section 4).

`run_training` runs the plan of `train.variant` (see `mulcon.variants`): each step is a stage,
`pretrain` or `finetune`, with its own folder `<out_dir>/<stage>` holding `history.json` (one
record per epoch) and, once the stage is done, `model.pt`; the variant's final model is
`<out_dir>/model.pt`. Resume state lives apart, in `<checkpoint_dir>/<stage>/checkpoint.pt`
(written atomically every epoch), so a pipeline tool that clears a stage's outputs before running
it again does not lose it. A killed run continues from its last checkpoint with `resume=True` and,
on CPU, ends with the weights of an uninterrupted run. Checkpoints and stage models record the
resolved config, the fingerprint of the training code and the versions of the libraries that
compute it (`mulcon.fingerprint`), and the identity of the data (`mulcon.data.identity`); one made
under another config, other code, other libraries or on other data is neither resumed nor skipped:
the stage starts over, and says which part changed.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mulcon import checkpoint, distributed
from mulcon.config import RESULT_INDEPENDENT, Config, config_from_dict, to_dict, to_flat_dict
from mulcon.data.dataset import ManifestDataset, load_classes
from mulcon.data.identity import data_identity, identity_changes
from mulcon.data.gpu_augment import SampledAugmentation, prefetch, to_device
from mulcon.data.sampling import EpochSampler, SeededDataset
from mulcon.data.transforms import train_transform
from mulcon.errors import CheckpointError, ConfigError, TrainingError
from mulcon.fingerprint import code_changes, code_fingerprint, library_versions
from mulcon.inference import eval_loader, predict_scores
from mulcon.runtime import autocast, resolve_device
from mulcon.io import atomic_path, write_json
from mulcon.losses import asymmetric_loss, bce_loss, image_contrastive_loss, label_contrastive_loss
from mulcon.metrics import calibrate_thresholds, multilabel_metrics
from mulcon.model import build_model
from mulcon.optim import ModelEma, build_optimizer, build_scheduler
from mulcon.variants import Plan, Step, plan_variant

logger = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any]], None]


class Objective:
    """BCE (or ASL) + contrastive_weight * contrastive loss (Eq. 9) for one step of a plan.

    Args:
        contrastive_weight: gamma; None takes `loss.contrastive_weight`. With 0 the contrastive term
            is still computed and reported, but adds nothing to the gradient (`mulcon_step2_bce`).
    """

    def __init__(self, config: Config, contrastive: str | None, contrastive_weight: float | None = None):
        self.loss, self.contrastive = config.loss, contrastive
        self.weight = config.loss.contrastive_weight if contrastive_weight is None else contrastive_weight

    def __call__(self, output, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.loss.classification == "asl":
            classification = asymmetric_loss(output.logits, targets, self.loss.asl_gamma_pos,
                                             self.loss.asl_gamma_neg, self.loss.asl_clip,
                                             reduction=self.loss.bce_reduction)
        else:
            classification = bce_loss(output.logits, targets, reduction=self.loss.bce_reduction)
        terms = {"classification": classification}
        if self.contrastive is not None:
            # Anchors, positives and denominators span the global batch of all training processes.
            projections = distributed.all_gather_with_grad(output.projections)
            targets = distributed.all_gather(targets)
        if self.contrastive == "label":
            terms["contrastive"] = label_contrastive_loss(projections, targets, self.loss.temperature)
        elif self.contrastive == "image":
            terms["contrastive"] = image_contrastive_loss(projections, targets, self.loss.temperature)
        terms["total"] = classification + self.weight * terms.get("contrastive", 0.0)
        return terms


def train_loader(config: Config, step: Step) -> DataLoader:
    """Shuffled, augmented batches; two independent views per image when the step is contrastive.
    With several training processes each loads its share of every (global) batch."""
    batch_size = config.pretrain.batch_size if step.stage == "pretrain" else config.finetune.batch_size
    batch_size = distributed.local_batch_size(batch_size)
    views = 2 if step.contrastive else 1
    crop_scale = config.data.crop_scale if step.stage == "pretrain" else (1.0, 1.0)  # the authors: no crop in step 2
    if config.data.augment_device == "cuda":  # workers sample the augmentation, the device applies it
        if crop_scale != (1.0, 1.0):
            raise ConfigError("data.crop_scale: the batched augmentation of data.augment_device=cuda has no crop; "
                              "set data.crop_scale=[1.0,1.0] or data.augment_device=cpu")
        transform = SampledAugmentation(config.data.image_size, config.data.randaugment)
    else:
        transform = train_transform(config.data.image_size, config.data.randaugment, crop_scale)
    dataset = ManifestDataset(config.data.prepared_dir, "train", transform, views=views,
                              image_size=config.data.cache_size)
    sampler = EpochSampler(len(dataset), config.train.seed, batch_size=batch_size, drop_last=True,
                           rank=distributed.rank(), world_size=distributed.world_size())
    workers = config.data.num_workers
    return DataLoader(SeededDataset(dataset, config.train.seed), batch_size=batch_size, sampler=sampler,
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())


def batch_rows(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch on `device` (augmented there with `data.augment_device: cuda`), the views stacked as
    rows (view 1 of every image, then view 2) with their targets."""
    images, targets = to_device(batch[0], device), batch[1].to(device, non_blocking=True)
    if isinstance(images, list):
        targets = targets.repeat(len(images), 1)
        images = torch.cat(images)
    return images, targets


def train_one_epoch(model: nn.Module, loader: DataLoader, objective: Objective, optimizer, scheduler,
                    step_per_batch: bool, device: torch.device, config: Config, scaler, ema, epoch: int) -> dict[str, float]:
    """One pass over `loader`; returns the mean of each loss term and the throughput."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    started, images_seen = time.perf_counter(), 0
    batches = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=None)
    # On CUDA the next batch is copied (and augmented) on a side stream while this one trains.
    for index, (images, targets) in enumerate(prefetch(batches, lambda batch: batch_rows(batch, device), device)):
        with autocast(device, config.train.precision):
            terms = objective(model(images, need_projections=objective.contrastive is not None), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["total"]).backward()
        if config.train.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if step_per_batch:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        images_seen += len(images)
        # Checked every 20 batches (not every batch, which would sync the GPU) and always before
        # the epoch's checkpoint, so non-finite weights never reach the disk.
        if (index + 1) % 20 == 0 or index + 1 == len(loader):
            if not math.isfinite(float(sums["total"])):
                raise TrainingError(f"non-finite loss in epoch {epoch + 1} by batch {index + 1}; "
                                    "lower the learning rate or enable train.grad_clip")
    seconds = time.perf_counter() - started
    means = {name: float(distributed.mean(value)) / max(1, len(loader)) for name, value in sums.items()}
    images_seen *= distributed.world_size()
    return {**means, "seconds": seconds, "images_per_second": images_seen / max(seconds, 1e-9)}


def _validate(model: nn.Module, val: DataLoader | None, device: torch.device,
              config: Config) -> tuple[dict[str, float], list[float] | None]:
    """Val mAP, CF1 and OF1, and the per-class thresholds that maximise each class's F1 on val
    (saved with the model for `predict --threshold calibrated`); ({}, None) without a val split."""
    if val is None:
        return {}, None
    scores, targets = predict_scores(model, val, device, config.train.precision)
    metrics = multilabel_metrics(scores, targets, config.evaluate.threshold)
    thresholds = calibrate_thresholds(scores, targets, default=config.evaluate.threshold)
    return {f"val_{key}": metrics[key] for key in ("mAP", "CF1", "OF1")}, [float(value) for value in thresholds]


def training_splits(config: Config) -> tuple[str, ...]:
    """The splits a training stage reads: train, and val when the config carves one."""
    return ("train", "val") if config.data.val_fraction > 0 else ("train",)


def provenance(config: Config) -> dict[str, dict[str, str]]:
    """What a training result depends on besides its config: the training code, the libraries that
    compute it and the data it reads. Recorded in every checkpoint and stage model."""
    return {"code": code_fingerprint("train"), "libraries": library_versions(),
            "data": data_identity(config.data.prepared_dir, training_splits(config), config.data.cache_size)}


def _model_file(model: nn.Module, config: Config, plan: Plan, step: Step, classes: list[str],
                epoch: int, selected_on: str, val: dict[str, float],
                thresholds: list[float] | None, made_from: dict[str, dict[str, str]]) -> dict[str, Any]:
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}  # a snapshot
    return {"model": weights, "config": to_dict(config), **made_from, "classes": classes,
            "label_level": plan.label_level, "variant": plan.variant, "stage": step.stage,
            "epoch": epoch, "selected_on": selected_on, "val": val, "thresholds": thresholds}


class StageRun:
    """The objects of one stage (model, optimizer, schedule, scaler, EMA) and their checkpointing."""

    def __init__(self, config: Config, plan: Plan, step: Step, model: nn.Module, device: torch.device,
                 steps_per_epoch: int, num_labels: int, made_from: dict[str, dict[str, str]]):
        self.config, self.plan, self.step, self.model, self.num_labels = config, plan, step, model, num_labels
        self.made_from = made_from
        self.optimizer = build_optimizer(config, step.stage, model)
        self.scheduler, self.step_per_batch = build_scheduler(config, step.stage, self.optimizer, step.epochs, steps_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and config.train.precision == "fp16")
        self.ema = ModelEma(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None

    def state(self, epoch: int) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "epoch": epoch, "rng": checkpoint.rng_states(),
                "history": self.history, "best": self.best, "config": to_dict(self.config), **self.made_from,
                "variant": self.plan.variant, "stage": self.step.stage, "num_labels": self.num_labels}

    def restore(self, state: dict[str, Any], path: Path) -> int:
        if state.get("num_labels") != self.num_labels or state.get("variant") != self.plan.variant:
            raise CheckpointError(f"{path}: made for variant {state.get('variant')} with {state.get('num_labels')} "
                                  f"labels, cannot resume {self.plan.variant} with {self.num_labels} labels")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.history, self.best = state["history"], state["best"]
        checkpoint.set_rng_states(state["rng"])
        return state["epoch"]

    def evaluated_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


def same_result_config(saved: dict[str, Any], config: Config, stage: str) -> bool:
    """Whether a config saved with a checkpoint of `stage` computes what `config` computes there
    (the finetune section cannot change a pretrain stage)."""
    try:
        saved_config = config_from_dict(saved)
    except ConfigError:
        return False
    ignored = ("finetune.",) if stage == "pretrain" else ()

    def relevant(values: Config) -> dict[str, Any]:
        return {key: value for key, value in to_flat_dict(values).items()
                if key not in RESULT_INDEPENDENT and not key.startswith(ignored)}
    return relevant(saved_config) == relevant(config)


def _listed(names: list[str]) -> str:
    return f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''} changed"


def stale_reason(state: dict[str, Any], config: Config, stage: str,
                 made_from: dict[str, dict[str, str]] | None = None) -> str | None:
    """Why a checkpoint or stage model of `stage` cannot stand for a run of `config` now, or None
    when it can: "under another config", "under other code (...)", "with other libraries (...)"
    or "on other data (...)", naming what changed.

    Args:
        made_from: `provenance(config)`, computed when not given.
    """
    if not same_result_config(state.get("config", {}), config, stage):
        return "under another config"
    made_from = made_from or provenance(config)
    changed = code_changes(state.get("code"), made_from["code"])
    if changed:
        return f"under other code ({_listed(changed)})"
    saved, now = state.get("libraries"), made_from["libraries"]
    changed = identity_changes(saved, now)
    if changed:
        was = saved if isinstance(saved, dict) else {}
        versions = [f"{name} {was.get(name, 'unrecorded')} -> {now.get(name, 'absent')}" for name in changed]
        return f"with other libraries ({_listed(versions)})"
    changed = identity_changes(state.get("data"), made_from["data"])
    if changed:
        return f"on other data ({_listed(changed)})"
    return None


def train_stage(config: Config, plan: Plan, step: Step, model: nn.Module, out_dir: Path, *, resume: bool,
                device: torch.device, classes: list[str], checkpoint_dir: Path,
                callback: EpochCallback | None = None,
                made_from: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Train `model` for one step of `plan`: history and model in `out_dir`, a checkpoint every
    epoch in `checkpoint_dir`. With several training processes, rank 0 validates and writes.

    Returns:
        The content of the stage's `model.pt` (weights of the final or the val-selected epoch).
    """
    loader = train_loader(config, step)
    validates = config.data.val_fraction > 0 and distributed.is_main()
    val = eval_loader(config, "val", config.evaluate.batch_size) if validates else None
    made_from = made_from or provenance(config)
    run = StageRun(config, plan, step, model, device, len(loader), len(classes), made_from)
    path, start = checkpoint_dir / "checkpoint.pt", 0
    if resume and path.exists():
        state = checkpoint.load(path)
        reason = stale_reason(state, config, step.stage, made_from)
        if reason is None:
            start = run.restore(state, path)
            logger.info("resuming %s/%s from epoch %d", plan.variant, step.stage, start)
            if distributed.is_main():  # the stage's outputs may have been cleared (dvc repro does)
                write_json(out_dir / "history.json", run.history)
        else:
            logger.warning("%s was made %s: %s/%s starts over", path, reason, plan.variant, step.stage)
    # DDP starts every process from rank 0's weights; a BCE-only step leaves the projector idle.
    network = distributed.wrap(model, device, find_unused_parameters=step.contrastive is None)
    if config.train.compile:  # the forward only: `model` keeps its parameters and state-dict keys
        network = torch.compile(network, mode=config.train.compile_mode)
    objective = Objective(config, step.contrastive, step.contrastive_weight)
    thresholds = None  # those of the last validated epoch
    for epoch in range(start, step.epochs):
        loader.sampler.set_epoch(epoch)
        lr = run.optimizer.param_groups[0]["lr"]
        record = train_one_epoch(network, loader, objective, run.optimizer, run.scheduler, run.step_per_batch,
                                 device, config, run.scaler, run.ema, epoch)
        if not run.step_per_batch:
            run.scheduler.step()
        val_metrics, thresholds = _validate(run.evaluated_model(), val, device, config)
        record = {"stage": step.stage, "epoch": epoch + 1, "lr": lr, **record, **val_metrics}
        run.history.append(record)
        if config.train.select_on_val and val is not None and (run.best is None or record["val_mAP"] > run.best["val"]["val_mAP"]):
            run.best = _model_file(run.evaluated_model(), config, plan, step, classes, epoch + 1, "val", record,
                                   thresholds, made_from)
        if not distributed.is_main():
            continue  # the other processes hold the same weights
        checkpoint.save(path, run.state(epoch + 1))
        write_json(out_dir / "history.json", run.history)
        logger.info("%s/%s epoch %d/%d: %s", plan.variant, step.stage, epoch + 1, step.epochs,
                    ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
        if callback is not None:
            callback(record)
    last = run.history[-1] if run.history else {}
    if run.best is None and thresholds is None and val is not None:  # resumed after the last epoch
        thresholds = _validate(run.evaluated_model(), val, device, config)[1]
    result = run.best or _model_file(run.evaluated_model(), config, plan, step, classes, step.epochs, "final", last,
                                     thresholds, made_from)
    if distributed.is_main():
        checkpoint.save(out_dir / "model.pt", result)
    distributed.barrier()
    return result


def _clean_temporary_files(folder: Path) -> None:
    """Remove what a killed atomic write left behind (hidden `*.tmp` files)."""
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def run_training(config: Config, *, out_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                 stages: tuple[str, ...] | None = None, resume: bool = False,
                 callback: EpochCallback | None = None) -> Path:
    """Train `config.train.variant` and return the path of its final `model.pt`.

    Args:
        out_dir: defaults to `<train.out_root>/<variant>`.
        checkpoint_dir: defaults to `<train.checkpoint_root>/<variant>`.
        stages: run only these stages of the plan (e.g. ("finetune",)); a later stage starts from
            the `model.pt` of the stage before it, which must exist.
        resume: continue each stage from its checkpoint and skip stages already done under the
            same config.
        callback: called with each epoch's record (stage, epoch, losses, lr, val metrics).

    Under torchrun (`mulcon.distributed`) every process trains its share of each batch with
    DistributedDataParallel; rank 0 alone validates, writes files and calls `callback`.
    """
    with distributed.process_group(resolve_device(config.train.device)) as device:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels once
        return _run_plan(config, device, out_dir=out_dir, checkpoint_dir=checkpoint_dir, stages=stages,
                         resume=resume, callback=callback)


def _run_plan(config: Config, device: torch.device, *, out_dir: str | Path | None, checkpoint_dir: str | Path | None,
              stages: tuple[str, ...] | None, resume: bool, callback: EpochCallback | None) -> Path:
    plan = plan_variant(config.train)
    out_dir = Path(out_dir or Path(config.train.out_root) / plan.variant)
    checkpoint_dir = Path(checkpoint_dir or Path(config.train.checkpoint_root) / plan.variant)
    torch.manual_seed(config.train.seed)
    classes = load_classes(config.data.prepared_dir)
    model = build_model(config.model, len(classes), plan.label_level).to(device)
    made_from = provenance(config)
    wanted = stages or tuple(step.stage for step in plan.steps)
    for position, step in enumerate(plan.steps):
        done = out_dir / step.stage / "model.pt"
        if step.stage not in wanted or (resume and _finished(done, config, step.stage, made_from)):
            if any(later.stage in wanted for later in plan.steps[position + 1:]):
                _load_stage(done, model, len(classes))  # the start of a later stage
            continue
        for folder in (out_dir / step.stage, checkpoint_dir / step.stage):
            folder.mkdir(parents=True, exist_ok=True)
            if distributed.is_main():
                _clean_temporary_files(folder)
        if not resume and distributed.is_main():
            for stale in (checkpoint_dir / step.stage / "checkpoint.pt", done, out_dir / step.stage / "history.json"):
                stale.unlink(missing_ok=True)
        result = train_stage(config, plan, step, model, out_dir / step.stage, resume=resume, device=device,
                             classes=classes, checkpoint_dir=checkpoint_dir / step.stage, callback=callback,
                             made_from=made_from)
        model.load_state_dict(result["model"])  # the next step starts from this stage's model
    last = out_dir / plan.steps[-1].stage / "model.pt"
    final = out_dir / "model.pt"
    if last.exists() and distributed.is_main():
        with atomic_path(final) as temporary:
            shutil.copyfile(last, temporary)
    return final


def _finished(path: Path, config: Config, stage: str, made_from: dict[str, dict[str, str]]) -> bool:
    """A stage's model file exists and was trained under the same config, code and libraries, on
    the same data."""
    if not path.exists():
        return False
    reason = stale_reason(checkpoint.load(path), config, stage, made_from)
    if reason is not None:
        logger.info("%s was made %s: training the stage again", path, reason)
    return reason is None


def _load_stage(path: Path, model: nn.Module, num_labels: int) -> dict[str, Any]:
    """Load a finished stage's model file into `model` (the start of the next stage)."""
    if not path.exists():
        raise CheckpointError(f"{path}: missing; run the earlier stage first (python -m mulcon train --stage ...)")
    state = checkpoint.load(path)
    if len(state["classes"]) != num_labels:
        raise CheckpointError(f"{path}: made for {len(state['classes'])} labels, the data has {num_labels}")
    model.load_state_dict(state["model"])
    return state
