"""MLflow tracking of training, evaluation, analysis and report (through `mulcon.mlflow_client`).

A training run of a variant is found again by a key (the resolved config without the
variant, the git commit and the data version), so the pretrain and finetune stages, a resumed run
and the evaluation all log into one MLflow run; the variants of one ablation are nested runs of
one parent run with the same key.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator
import warnings

import yaml

from mulcon import distributed
from mulcon.config import RESULT_INDEPENDENT, Config, to_dict, to_flat_dict
from mulcon.inference import load_model
from mulcon.io import dvc_file_md5, read_json
from mulcon.errors import redact
from mulcon.mlflow_client import TrackingError, connect, tracking_errors, tracking_uri
from mulcon.serving import Scorer, log_model
from mulcon.variants import plan_variant

logger = logging.getLogger(__name__)

# Set by the Kubeflow components (components/): the pipeline run, which then gets runs of its own;
# the md5 of the data fetched at a git revision; the commit the image was built from (no .git in it).
PIPELINE_RUN_ENV, DATA_VERSION_ENV, GIT_COMMIT_ENV = "MULCON_PIPELINE_RUN", "MULCON_DATA_VERSION", "MULCON_GIT_COMMIT"
# The val mAP of the model a training run saved (its selected or final epoch): what promotion compares.
MODEL_METRIC = "model_val_mAP"


def git_state(root: str | Path = ".") -> dict[str, str]:
    """The commit of the working tree and whether it has uncommitted changes ("unknown" outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10).stdout
    try:
        return {"git_commit": git("rev-parse", "HEAD").strip(),
                "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no").strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": os.environ.get(GIT_COMMIT_ENV) or "unknown", "git_dirty": "unknown"}


def data_version(config: Config, root: str | Path = ".") -> str:
    """The md5 that `data.dvc` records for the raw data folder (or $MULCON_DATA_VERSION), or "untracked"."""
    if os.environ.get(DATA_VERSION_ENV):
        return os.environ[DATA_VERSION_ENV]
    try:
        return dvc_file_md5((Path(root) / "data.dvc").read_text())
    except OSError:
        return "untracked"


def run_key(config: Config, *parts: str) -> str:
    """A short hash of the config (without `train.variant` and RESULT_INDEPENDENT keys) and `parts`."""
    values = {k: v for k, v in to_flat_dict(config).items() if k not in RESULT_INDEPENDENT and k != "train.variant"}
    text = json.dumps(values, sort_keys=True, default=str) + "|".join(parts)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _search(client, experiment_id: str, tags: dict[str, str], params: dict[str, str] | None = None):
    """The newest run in `experiment_id` carrying all `tags` (and `params`), or None."""
    query = " and ".join([f"tags.`{key}` = '{value}'" for key, value in tags.items()]
                         + [f"params.`{key}` = '{value}'" for key, value in (params or {}).items()])
    found = client.search_runs([experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def _find_or_create(client, experiment_id: str, tags: dict[str, str], name: str, also: dict[str, str] | None = None,
                    finish: bool = False) -> str:
    """The id of the run in `experiment_id` carrying all `tags`; created (with the `also` tags too)
    when there is none, and marked FINISHED at once with `finish` (a run nothing logs to now)."""
    found = _search(client, experiment_id, tags)
    if found is not None:
        return found.info.run_id
    run_id = client.create_run(experiment_id, tags={**tags, **(also or {})}, run_name=name).info.run_id
    if finish:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def _keys(config: Config) -> tuple[dict[str, str], str, str]:
    """The run tags of `config` (dataset, data version, git state, pipeline run), its run key (config,
    commit, data version, pipeline run) and its config key (the same without the commit)."""
    tags = {"dataset": config.data.dataset, "data_version": data_version(config), **git_state()}
    parts = [tags["data_version"]]
    if os.environ.get(PIPELINE_RUN_ENV):
        tags["pipeline_run"] = os.environ[PIPELINE_RUN_ENV]
        parts.append(tags["pipeline_run"])
    return tags, run_key(config, tags["git_commit"], *parts), run_key(config, *parts)


def training_run(config: Config):
    """The MLflow run (with its tags) that trained `config.train.variant`: the one of the current
    git commit, else the newest trained from the same config and data at an earlier commit (a
    commit of dvc.lock after `dvc repro` retrains nothing). A training run has logged the config
    as params; an evaluation or analysis alone at a later commit has not. Only reads the store.

    Raises:
        TrackingError: no such run (not trained under this config and data version).
    """
    _, client = connect()
    experiment = client.get_experiment_by_name(f"mulcon-{config.data.label}")
    if experiment is not None:
        _, key, config_key = _keys(config)
        variant = {"mulcon.kind": "variant", "variant": config.train.variant}
        for tags in ({**variant, "mulcon.key": key}, {**variant, "mulcon.config_key": config_key}):
            found = _search(client, experiment.experiment_id, tags, {"train.variant": config.train.variant})
            if found is not None:
                return found
    raise TrackingError(f"no MLflow run of {config.train.variant} on {config.data.label} trained under this config and "
                        f"data version in {redact(tracking_uri())}: train it first")


class Tracker:
    """The MLflow run of one variant under `config`: find it, log to it, register its model."""

    def __init__(self, config: Config, stage: str):
        self.config, self.stage = config, stage
        self.mlflow, self.client = connect()
        experiment = f"mulcon-{config.data.label}"
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.tags, key, config_key = _keys(config)
        parent_tags = {"mulcon.kind": "ablation", "mulcon.key": key}
        self.parent_id = _find_or_create(self.client, self.experiment_id, parent_tags,
                                         f"ablation-{config.data.label}-{key[:8]}", finish=True)
        variant = config.train.variant
        self.run_id = _find_or_create(self.client, self.experiment_id,
                                      {"mulcon.kind": "variant", "mulcon.key": key, "variant": variant},
                                      f"{variant}-{config.data.label}", also={"mulcon.config_key": config_key})

    @contextlib.contextmanager
    def active(self, system_metrics: bool = False) -> Iterator[Any]:
        """Make this run the active one (nested in the ablation parent) for the `with` block."""
        tags = {**self.tags, "stage": self.stage, "variant": self.config.train.variant,
                "mlflow.parentRunId": self.parent_id}
        with self.mlflow.start_run(run_id=self.run_id, log_system_metrics=system_metrics) as run:
            self.mlflow.set_tags(tags)
            yield run

    def tags_now(self) -> dict[str, str]:
        return self.client.get_run(self.run_id).data.tags

    def log_config(self) -> None:
        """The resolved config as params (dotted names, as in params.yaml) and as an artifact."""
        flat = {key: str(value) for key, value in to_flat_dict(self.config).items()}
        existing = self.client.get_run(self.run_id).data.params
        self.mlflow.log_params({k: v for k, v in flat.items() if k not in existing})
        self.mlflow.log_text(yaml.safe_dump(to_dict(self.config), sort_keys=False), "config/params.yaml")

    def log_dataset(self, context: str) -> None:
        """The prepared dataset as the run's MLflow dataset input (the UI's Dataset column): its
        name, where it lies and, as its digest, the data version (the md5 of data.dvc)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # a local path matches two registered local-file sources
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source = resolve_dataset_source(str(Path(self.config.data.prepared_dir).resolve()))
        dataset = MetaDataset(source, name=self.config.data.folder_name, digest=self.tags["data_version"][:36])
        self.mlflow.log_input(dataset, context=context)

    def log_epoch(self, record: dict[str, Any], step: int) -> None:
        self.mlflow.log_metrics(epoch_metrics(record), step=step)

    def log_missing_epochs(self, records: list[dict[str, Any]], offsets: dict[str, int]) -> int:
        """Log each metric of each epoch record that the run lacks at the record's step (an epoch
        trained while the server was down); returns how many epochs were completed so."""
        logged: dict[str, set[int]] = {}
        completed = 0
        for record in records:
            step = offsets[record["stage"]] + record["epoch"]
            metrics = epoch_metrics(record)
            for name in metrics:
                if name not in logged:
                    logged[name] = {point.step for point in self.client.get_metric_history(self.run_id, name)}
            missing = {name: value for name, value in metrics.items() if step not in logged[name]}
            if missing:
                self.mlflow.log_metrics(missing, step=step)
                completed += 1
        return completed

    def log_artifacts(self, paths: list[Path], folder: str) -> None:
        for path in paths:
            if Path(path).exists():
                self.mlflow.log_artifact(str(path), folder)

    def log_model(self, network, state: dict[str, Any]) -> str:
        """Log the trained network (plain artifacts, `mulcon.serving.log_model`) and register it as
        mulcon-<dataset> (mulcon-folder-<name>); `state` is its model file's content (config, classes,
        thresholds).

        Returns:
            The registered model version.
        """
        name = f"mulcon-{self.config.data.label}"
        scorer = Scorer(network.cpu().eval(), state["classes"], self.config.data.image_size, state.get("thresholds"))
        info = log_model(scorer, name="model", registered_model_name=name, config=state["config"],
                         label_level=state["label_level"],
                         metadata={"classes": state["classes"], "variant": self.config.train.variant})
        version = str(info.registered_model_version)
        self.client.set_model_version_tag(name, version, "variant", self.config.train.variant)
        return version

def epoch_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of one epoch record of a stage's history (losses, lr, val metrics)."""
    names = {"classification": "loss_classification", "contrastive": "loss_contrastive", "total": "loss_total"}
    return {names.get(key, key): float(value) for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"}


def epoch_offsets(config: Config) -> dict[str, int]:
    """Epochs run before each stage of the variant's plan: MLflow steps count across stages."""
    offsets, total = {}, 0
    for step in plan_variant(config.train).steps:
        offsets[step.stage], total = total, total + step.epochs
    return offsets


def _histories(out_dir: Path, config: Config, stage: str) -> list[dict[str, Any]]:
    """The epoch records of the stages the command ran (`stage`: "all", or one stage of the plan)
    that have a history.json in `out_dir`. Another stage's file may be older than this run (`dvc
    repro` reruns a stage while the next one's outputs, of the data before, are still there): its
    epochs are not this run's."""
    records = []
    for step in plan_variant(config.train).steps:
        path = out_dir / step.stage / "history.json"
        if stage not in ("all", step.stage):
            continue
        if path.is_file():
            records += read_json(path, missing=f"{path}: missing")
    return records


def track_training(config: Config, stage: str, train: Callable[[Callable], Path]) -> Path:
    """Run `train(callback)` inside the variant's MLflow run: params, tags, per-epoch metrics,
    system metrics; once the variant's last stage is done, its histories and its model.

    A tracking call that fails mid-run ends the command (`tracking_errors`) after the epoch's
    checkpoint was written; on `--resume`, every epoch of the stages' histories that the run lacks
    is logged, so each epoch's metrics are in the run exactly once.

    Args:
        stage: the CLI's --stage ("all", "pretrain" or "finetune").
        train: runs the training with the epoch callback it is given; returns the final model path.
    """
    if not distributed.is_main():  # under torchrun the other processes train and rank 0 logs
        return train(None)
    with tracking_errors("training", resume_hint=True):
        tracker = Tracker(config, stage)
        offsets = epoch_offsets(config)
        plan = plan_variant(config.train)
        with tracker.active(system_metrics=config.tracking.system_metrics):
            tracker.log_config()
            tracker.log_dataset("train")
            final = train(lambda record: tracker.log_epoch(record, offsets[record["stage"]] + record["epoch"]))
            completed = tracker.log_missing_epochs(_histories(final.parent, config, stage), offsets)
            if completed:
                logger.info("logged %d epochs trained while the tracking server did not answer", completed)
            finished = final.exists() and stage in ("all", plan.steps[-1].stage)
            if finished:
                network, state = load_model(final)
                saved_val = (state.get("val") or {}).get("val_mAP")
                if saved_val is not None:  # what promotion compares: the saved model's, not the history's best
                    tracker.mlflow.log_metric(MODEL_METRIC, float(saved_val))
            if finished and config.tracking.register_model and "model_version" not in tracker.tags_now():
                tracker.log_artifacts([final.parent / step.stage / "history.json" for step in plan.steps], "history")
                version = tracker.log_model(network, state)
                tracker.mlflow.set_tag("model_version", version)
                logger.info("registered mulcon-%s version %s (run %s)", config.data.label, version, tracker.run_id)
    return final


def track_evaluation(config: Config, metrics: dict[str, Any], files: list[Path]) -> None:
    """Log an evaluation's metrics (prefixed with the split) and report files to the variant's run."""
    with tracking_errors("evaluation"):
        tracker = Tracker(config, "evaluate")
        split = metrics["split"]
        with tracker.active():
            tracker.log_dataset(split)
            tracker.mlflow.log_metrics({f"{split}_{key}": float(value) for key, value in metrics.items()
                                        if isinstance(value, float)})
            tracker.log_artifacts(files, f"evaluation/{split}")


def track_analysis(config: Config, metrics: dict[str, Any], files: list[Path]) -> None:
    """Log the analysis figures and retrieval precision@k to the run of the `mulcon` variant."""
    with tracking_errors("analysis"):
        tracker = Tracker(replace(config, train=replace(config.train, variant="mulcon")), "analyze")
        with tracker.active():
            tracker.mlflow.log_metrics({key: float(value) for key, value in metrics.items()
                                        if key.startswith("precision_at_")})
            tracker.log_artifacts(files, "analysis")


def track_report(config: Config, files: list[Path], metrics: dict[str, float] | None = None) -> None:
    """Attach the ablation tables and figures to the parent run of the ablation (that of train.seed),
    with the per-variant means and spread over seeds (`mulcon.report.aggregate_metrics`) as metrics."""
    with tracking_errors("report"):
        tracker = Tracker(config, "report")
        with tracker.mlflow.start_run(run_id=tracker.parent_id):  # ends the parent run as FINISHED
            tracker.mlflow.set_tags({**tracker.tags, "stage": "report", "seeds": str(len(config.train.seeds) + 1)})
            tracker.log_artifacts(files, "report")
            if metrics:
                tracker.mlflow.log_metrics(metrics)
