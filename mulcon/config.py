"""Typed configuration: frozen dataclasses mirroring the sections of `params.yaml`.

`load_config` is the one place a config is read. Unknown keys, wrong types and invalid values
are errors that name the key (`train.epochs`), so a typo never silently falls back to a default.
A value has one name everywhere: YAML key, dataclass field, CLI override and MLflow param.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from mulcon.errors import ConfigError

DATASETS = ("demo", "coco2014", "nuswide", "voc2007", "folder")
BACKBONES = ("resnet18", "resnet50", "resnet101")
VARIANTS = ("backbone_bce", "backbone_bce_scl", "mulcon_bce", "mulcon_no_pretrain", "mulcon_step2_bce", "mulcon")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "demo"  # demo | coco2014 | nuswide | voc2007 | folder: raw data in <root>/<dataset>
    root: str = "data"  # raw data folder, versioned by data.dvc
    name: str = ""  # dataset folder: raw data in <root>/<name>, manifests in <prepared_root>/folder/<name>
    test_fraction: float = 0.2  # dataset folder without a split column: seeded share of images made test
    prepared_root: str = "prepared"  # prepare writes manifests to <prepared_root>/<dataset>
    image_size: int = 448  # training and evaluation resolution (square)
    val_fraction: float = 0.1  # validation split carved from train; 0 disables it
    # Seeds the choice of val images (and of a folder dataset's test images); apart from train.seed,
    # so that every training seed of an ablation, and every model promotion compares, shares one val split.
    split_seed: int = 0
    num_workers: int = 2  # DataLoader worker processes
    randaugment: bool = True  # RandAugment in the training transform (paper section 4)
    cache: bool = False  # prepare also writes the image cache at image_size (3 S^2 bytes per image)
    # Where flip and RandAugment run: cpu (PIL, in the loader workers) | cuda (batched tensor ops on the
    # training device, mulcon.data.gpu_augment; on a CPU-only run the same batched path runs on the CPU).
    augment_device: str = "cpu"
    # Step 1 only: RandomResizedCrop's area range; (1.0, 1.0) is the plain resize of the paper,
    # the authors' code uses (0.875, 1.0). With `cache` the crop is cut from the cached s x s image.
    crop_scale: tuple[float, float] = (1.0, 1.0)

    @property
    def folder_name(self) -> str:
        """The raw data's folder under root: data.name for a folder dataset, else the dataset."""
        return self.name if self.dataset == "folder" else self.dataset

    @property
    def label(self) -> str:
        """The dataset's name in MLflow (experiment and registered model mulcon-<label>):
        folder-<name> for a folder dataset, else the dataset."""
        return f"folder-{self.name}" if self.dataset == "folder" else self.dataset

    @property
    def raw_dir(self) -> Path:
        return Path(self.root) / self.folder_name

    @property
    def prepared_dir(self) -> Path:
        """<prepared_root>/<dataset>, and <prepared_root>/folder/<name> for a folder dataset (inside the
        prepare stage's DVC output <prepared_root>/<dataset>)."""
        if self.dataset == "folder":
            return Path(self.prepared_root) / "folder" / self.name
        return Path(self.prepared_root) / self.dataset

    @property
    def cache_size(self) -> int | None:
        """The image-cache side the loaders read (`ManifestDataset(image_size=...)`); None: raw images."""
        return self.image_size if self.cache else None


@dataclass(frozen=True)
class DemoConfig:
    num_train: int = 800  # generated training images
    num_val: int = 300  # generated val2014 images (our test split)
    image_size: int = 128  # generated image side in pixels
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet101"  # resnet18 | resnet50 | resnet101 (torchvision) | timm:<name> (mulcon.backbones)
    pretrained: bool = True  # ImageNet weights through torchvision's or timm's own loader
    weights_file: str = ""  # a local state dict loaded into the backbone, or package:efficientnet_lite0; "" none
    embed_dim: int = 1024  # D, width of the label-level embeddings
    num_heads: int = 4  # h in Eq. 2
    projection_dim: int = 128  # d_z, output of the contrastive projector
    token_self_attention: int = 0  # authors' code: 2 self-attention blocks over image tokens
    label_self_attention: int = 0  # authors' code: 1 self-attention block over label embeddings
    layer_norm: bool = False  # authors' code: LayerNorm after each residual
    attention_scale: str = "none"  # none (Eq. 1) | head (1/sqrt(D/h)) | full (1/sqrt(D), authors' code)
    # paper (Eq. 2, 3: residual on the query, W^o, linear W^{q'}, normal U of L x C) | authors (their
    # block: residual on the projected query, no W^o, ReLU feed-forward, xavier U of L x D, weights
    # normal(0, 0.02)). The four keys above apply to both blocks; configs/authors-*.yaml set them.
    attention_block: str = "paper"


@dataclass(frozen=True)
class LossConfig:
    classification: str = "bce"  # bce (Eq. 7) | asl (asymmetric loss, Ben-Baruch et al.)
    bce_reduction: str = "sum"  # sum over labels, mean over images (Eq. 7) | mean over all B x L (authors' code)
    contrastive_weight: float = 0.1  # gamma in Eq. 9
    temperature: float = 0.2  # tau in Eq. 8
    asl_gamma_pos: float = 0.0
    asl_gamma_neg: float = 4.0
    asl_clip: float = 0.05


@dataclass(frozen=True)
class PretrainConfig:
    """Step 1: BCE only, Adam with a one-cycle schedule (the paper) or AdamW with warm-up and cosine."""

    lr: float = 2.0e-4  # peak learning rate of the schedule
    weight_decay: float = 0.0
    batch_size: int = 64
    optimizer: str = "adam"  # adam (the paper) | adamw (authors' code)
    schedule: str = "onecycle"  # onecycle (the paper) | cosine (authors' code: after warmup_epochs)
    warmup_epochs: int = 0  # cosine only: linear warm-up from 0.1 x lr (authors' code: 5)
    backbone_lr_scale: float = 1.0  # the backbone's lr as a fraction of lr (authors' code: 0.1)


@dataclass(frozen=True)
class FinetuneConfig:
    """Step 2: BCE + contrastive_weight * L_con on two views, SGD with step decay."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    lr_step_epochs: int = 20  # divide the learning rate by lr_step_factor every this many epochs
    lr_step_factor: float = 0.1
    batch_size: int = 32  # images; two views make 2 x batch_size rows
    # lr of the backbone and the label attention as a fraction of lr (the classifier and projector
    # train at lr); the authors' code: 0.1
    backbone_lr_scale: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    variant: str = "mulcon"  # one of VARIANTS: the five Table 3 variants and mulcon_step2_bce
    pretrain_epochs: int = 20  # step-1 epochs; every variant trains pretrain + finetune epochs
    finetune_epochs: int = 20  # step-2 epochs
    seed: int = 0
    # Further seeds of the ablation's spread: each trains every variant into
    # <out_root>/seed<k>/<variant>, evaluated into <evaluate.out_root>/<variant>/seed<k>.
    seeds: list[int] = field(default_factory=list)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "bf16"  # bf16 | fp16 | fp32: autocast dtype on CUDA (CPU always runs fp32)
    ema_decay: float = 0.0  # exponential moving average of the weights; 0 disables it
    grad_clip: float = 0.0  # maximum gradient norm; 0 disables clipping
    select_on_val: bool = False  # keep the epoch with the best val mAP instead of the last one
    compile: bool = False  # torch.compile the training forward (GPU: 1.39x on an H100; minutes to compile)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    out_root: str = "runs"  # models and histories in <out_root>/<variant>/<stage>
    checkpoint_root: str = "checkpoints"  # resume state in <checkpoint_root>/<variant>/<stage>


@dataclass(frozen=True)
class EvaluateConfig:
    split: str = "test"  # train | val | test
    threshold: float = 0.5  # probability threshold of CP/CR/CF1/OP/OR/OF1
    calibrate: bool = False  # also report CF1/OF1 at per-class thresholds chosen on val (max F1); saves thresholds.json
    batch_size: int = 64
    out_root: str = "reports"  # metrics and per-class AP in <out_root>/<variant>


@dataclass(frozen=True)
class AnalysisConfig:
    """Section 4.4: t-SNE, retrieval and attention maps of `mulcon` against `mulcon_bce`."""

    split: str = "test"  # the images embedded and searched
    tsne_images: int = 1000  # images sampled for the t-SNE (the paper: 1,000)
    precision_k: int = 10  # k of the label-conditioned retrieval precision@k
    seed: int = 0


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True  # log runs to MLflow at MLFLOW_TRACKING_URI (default sqlite:///mlflow.db)
    register_model: bool = True  # register each variant's final model as mulcon-<dataset>
    system_metrics: bool = True  # CPU, memory (and GPU) usage during training


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# The demo shrunk to seconds per step: 32 px, tiny heads, 1 + 1 epochs, a 24 + 12 image demo set.
# `python -m pipeline run-local --tiny` and the tests run it.
TINY = ["data.image_size=32", "data.num_workers=0", "data.val_fraction=0.2", "model.embed_dim=32",
        "model.projection_dim=16", "pretrain.batch_size=8", "finetune.batch_size=4", "train.pretrain_epochs=1",
        "train.finetune_epochs=1", "evaluate.batch_size=16"]
TINY_DEMO = ["demo.num_train=24", "demo.num_val=12", "demo.image_size=48"]

CHOICES = {
    "data.dataset": DATASETS,
    "data.augment_device": ("cpu", "cuda"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "model.attention_scale": ("none", "head", "full"),
    "model.attention_block": ("paper", "authors"),
    "loss.classification": ("bce", "asl"),
    "loss.bce_reduction": ("sum", "mean"),
    "pretrain.optimizer": ("adam", "adamw"),
    "pretrain.schedule": ("onecycle", "cosine"),
    "train.variant": VARIANTS,
    "train.precision": ("bf16", "fp16", "fp32"),
    "evaluate.split": ("train", "val", "test"),
    "analysis.split": ("train", "val", "test"),
}
# Keys that change where or how fast a run goes, not what it computes.
RESULT_INDEPENDENT = {
    "data.num_workers", "data.root", "data.prepared_root", "data.cache", "train.device", "train.compile", "train.compile_mode", "train.out_root",
    "train.checkpoint_root", "train.seeds", "evaluate.split", "evaluate.threshold", "evaluate.batch_size", "evaluate.out_root",
    "tracking.enabled", "tracking.register_model", "tracking.system_metrics", "analysis.split",
    "analysis.tsne_images", "analysis.precision_k", "analysis.seed",
}
POSITIVE = {
    "data.image_size", "demo.num_train", "demo.num_val", "demo.image_size", "model.embed_dim",
    "model.num_heads", "model.projection_dim", "loss.temperature", "pretrain.lr", "pretrain.batch_size",
    "finetune.lr", "finetune.lr_step_epochs", "finetune.batch_size", "evaluate.batch_size",
    "pretrain.backbone_lr_scale", "finetune.backbone_lr_scale",
    "analysis.tsne_images", "analysis.precision_k",
}


def _check_scale_range(key: str, value: Any) -> tuple[float, float]:
    """A (low, high) area range with 0 < low <= high <= 1, from a YAML list of two numbers."""
    numbers = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(item, (int, float)) and not isinstance(item, bool) for item in value)
    if not numbers:
        raise ConfigError(f"{key}: expected a list of two numbers [low, high], got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not 0 < low <= high <= 1:
        raise ConfigError(f"{key}: expected 0 < low <= high <= 1, got [{low}, {high}]")
    return low, high


def _check_value(key: str, value: Any, kind: type) -> Any:
    """Return `value` as `kind`, or raise ConfigError naming `key`."""
    if typing.get_origin(kind) is tuple:
        return _check_scale_range(key, value)
    if typing.get_origin(kind) is list:  # list[int]: each item checked as the item type
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(f"{key}[{index}]", item, typing.get_args(kind)[0]) for index, item in enumerate(value)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(CHOICES[key])}")
    if key in POSITIVE and value <= 0:
        raise ConfigError(f"{key}: must be positive, got {value!r}")
    if kind in (int, float) and key not in POSITIVE and value < 0:
        raise ConfigError(f"{key}: must not be negative, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a mapping, got {type(value).__name__}")
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", value, kind)
    return cls(**kwargs)


def _apply_override(values: dict[str, Any], override: str) -> None:
    """Set `section.key=value` in the nested dict; the value is parsed as YAML (3, 0.1, true, text)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.pretrain_epochs=3")
    parts = key.strip().split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({error})") from error


def config_from_dict(values: dict[str, Any], overrides: Iterable[str] = ()) -> Config:
    """Build a validated Config from nested dicts plus `key=value` overrides."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for override in overrides:
        _apply_override(values, override)
    config = _build(Config, values, "")
    if config.model.embed_dim % config.model.num_heads:
        raise ConfigError(
            f"model.embed_dim: {config.model.embed_dim} is not divisible by model.num_heads "
            f"{config.model.num_heads}"
        )
    backbone = config.model.backbone
    if backbone not in BACKBONES and not (backbone.startswith("timm:") and len(backbone) > len("timm:")):
        raise ConfigError(f"model.backbone: {backbone!r} is not one of {', '.join(BACKBONES)} or timm:<name>")
    seeds = config.train.seeds
    if len(set(seeds)) != len(seeds) or config.train.seed in seeds:
        raise ConfigError(f"train.seeds: {seeds} repeats a seed or train.seed {config.train.seed} "
                          f"(train.seeds are the seeds besides train.seed)")
    if config.train.select_on_val and config.data.val_fraction == 0:
        raise ConfigError("train.select_on_val: needs a validation split, but data.val_fraction is 0")
    if not 0 <= config.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {config.data.val_fraction}")
    if config.pretrain.warmup_epochs and config.pretrain.schedule != "cosine":
        raise ConfigError(f"pretrain.warmup_epochs: {config.pretrain.warmup_epochs} needs pretrain.schedule=cosine "
                          "(the one-cycle schedule has its own warm-up)")
    if not 0 < config.data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction: must be in (0, 1), got {config.data.test_fraction}")
    name = config.data.name
    if config.data.dataset == "folder" and (not name or name in (".", "..") or "/" in name or "\\" in name):
        raise ConfigError(f"data.name: dataset folder needs the name of a folder under data.root "
                          f"(as in -S data.name=my_photos), got {name!r}")
    return config


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read `params.yaml` at `path`, apply `overrides` (like `train.pretrain_epochs=3`), validate.

    Raises:
        ConfigError: the file is missing or not YAML, or a key is unknown, mistyped or invalid;
            the message names the file and the key.
    """
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise ConfigError(f"{path}: cannot read params file ({error.strerror})") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        reason = getattr(error, "problem", None) or error
        raise ConfigError(f"{path}: not valid YAML{where}: {reason}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return config_from_dict(values, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def to_flat_dict(config: Config) -> dict[str, Any]:
    """Dotted names (`train.seed`) to values: the MLflow params and the resolved config on disk."""
    return {
        f"{section.name}.{item.name}": getattr(getattr(config, section.name), item.name)
        for section in dataclasses.fields(config)
        for item in dataclasses.fields(getattr(config, section.name))
    }


def to_dict(config: Config) -> dict[str, Any]:
    """Nested plain dicts; tuples (data.crop_scale) become lists, so YAML writes them as in params.yaml."""
    return {section: {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
            for section, values in dataclasses.asdict(config).items()}
