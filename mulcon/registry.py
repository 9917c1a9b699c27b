"""Champion and challenger: which registered model version serves (scheduled retraining).

Every training run registers its model as a version of `mulcon-<dataset>` (`mulcon.tracking`).
`promote` gives a new version the alias `challenger`, then compares its validation mAP with that of
the version holding `champion` and moves `champion` to it only when it is better by more than a
margin (or when there is no champion yet). Both numbers and the decision are logged on the
challenger's run (tags `promotion.*`, metrics `promotion/*`) and on its model version (tags).

The number compared is `model_val_mAP`: the validation mAP of the model the run saved and registered
(the selected epoch of its last stage with `train.select_on_val`, else its final epoch), which
`mulcon.tracking` logs once training is done. The two numbers are comparable only on the same
validation split: the registered model fixes the dataset, and the params that carve the split from
the training set (`SPLIT_PARAMS`) must match, otherwise the champion is kept. The training seed may
differ (`data.split_seed` carves the split), and so may the data version (new images), which is logged.
"""

from __future__ import annotations

import logging
from typing import Any

from mulcon.config import Config
from mulcon.errors import MulconError
from mulcon.mlflow_client import connect
from mulcon.tracking import MODEL_METRIC, training_run

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
SPLIT_PARAMS = ("data.dataset", "data.name", "data.val_fraction", "data.test_fraction", "data.split_seed")


class RegistryError(MulconError):
    """A model version without the run or the metric a promotion needs."""


def model_metric(client, run_id: str, metric: str = MODEL_METRIC) -> float:
    """The latest value of `metric` on a run: by default the val mAP of the model it saved.

    A run registered before `model_val_mAP` existed, trained without `train.select_on_val`, saved
    its final epoch: its last `val_mAP` stands for it.

    Raises:
        RegistryError: the run never logged `metric` (trained with data.val_fraction=0, or an older
            run that kept its best epoch, whose saved model's val mAP was not logged).
    """
    history = client.get_metric_history(run_id, metric)
    if not history and metric == MODEL_METRIC:
        if client.get_run(run_id).data.params.get("train.select_on_val") != "True":
            history = client.get_metric_history(run_id, "val_mAP")
    if not history:
        raise RegistryError(f"run {run_id} has no metric {metric}; train with a validation split "
                            "(data.val_fraction > 0) to compare models")
    return max(history, key=lambda point: (point.timestamp, point.step)).value


def _champion(client, model_name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(error).lower():
            return None
        raise


def _split_difference(client, challenger_run: str, champion_run: str) -> list[str]:
    mine, theirs = (client.get_run(run).data.params for run in (challenger_run, champion_run))
    return [key for key in SPLIT_PARAMS if mine.get(key) != theirs.get(key)]


def _decide(client, model_name: str, challenger, value: float, margin: float, metric: str) -> dict[str, Any]:
    """The decision, without acting on it: promoted, reason, and the champion's number."""
    champion = _champion(client, model_name)
    if champion is None:
        return {"promoted": True, "reason": "no champion yet", "champion_version": None, "champion_value": None}
    decision = {"champion_version": str(champion.version), "champion_value": None}
    if str(champion.version) == str(challenger.version):
        return {**decision, "promoted": False, "reason": "already the champion"}
    differs = _split_difference(client, challenger.run_id, champion.run_id)
    if differs:
        return {**decision, "promoted": False,
                "reason": f"not comparable: the champion's validation split differs in {', '.join(differs)}"}
    decision["champion_value"] = model_metric(client, champion.run_id, metric)
    promoted = value > decision["champion_value"] + margin
    relation = "beats" if promoted else "does not beat"
    return {**decision, "promoted": promoted,
            "reason": f"{metric} {value:.4g} {relation} the champion's {decision['champion_value']:.4g} + margin {margin:g}"}


def _log(client, challenger, decision: dict[str, Any]) -> None:
    verdict = "promoted" if decision["promoted"] else "kept champion"
    client.set_tag(challenger.run_id, "promotion.decision", verdict)
    client.set_tag(challenger.run_id, "promotion.reason", decision["reason"])
    client.set_tag(challenger.run_id, "promotion.champion_version", str(decision["champion_version"]))
    client.log_metric(challenger.run_id, f"promotion/challenger_{decision['metric']}", decision["challenger_value"])
    if decision["champion_value"] is not None:
        client.log_metric(challenger.run_id, f"promotion/champion_{decision['metric']}", decision["champion_value"])
    for key, value in (("promotion", verdict), ("promotion_reason", decision["reason"]),
                       (decision["metric"], f"{decision['challenger_value']:.4f}")):
        client.set_model_version_tag(decision["model"], decision["version"], key, value)


def promote(model_name: str, version: str | int, margin: float = 0.0, metric: str = MODEL_METRIC,
            client=None) -> dict[str, Any]:
    """Make `version` the challenger, and the champion when its `metric` beats the champion's by
    more than `margin` (in the metric's unit: mAP points) or when there is no champion.

    Returns:
        model, version, metric, margin, challenger_value, champion_version (before, or None),
        champion_value (None when not compared), promoted (bool), reason.
    Raises:
        RegistryError: a run without `metric`.
    """
    if client is None:
        _, client = connect()
    version = str(version)
    challenger = client.get_model_version(model_name, version)
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    value = model_metric(client, challenger.run_id, metric)
    decision = {"model": model_name, "version": version, "metric": metric, "margin": margin, "challenger_value": value,
                **_decide(client, model_name, challenger, value, margin, metric)}
    if decision["promoted"]:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    _log(client, challenger, decision)
    logger.info("%s version %s: %s (%s)", model_name, version,
                "now the champion" if decision["promoted"] else "not promoted", decision["reason"])
    return decision


def promote_trained(config: Config, margin: float = 0.0, metric: str = MODEL_METRIC) -> dict[str, Any]:
    """`promote` the model version registered by the training run of `config`
    (`mulcon.tracking.training_run`: the run `train.variant` was logged to under this config and
    data version).

    Raises:
        TrackingError: no such run (not trained under this config and data version).
        RegistryError: that run registered no model (tracking.register_model=false).
    """
    run = training_run(config)
    version = run.data.tags.get("model_version")
    if version is None:
        raise RegistryError(f"MLflow run {run.info.run_id} ({config.train.variant} on {config.data.label}) has no "
                            "registered model: train it first, with tracking.register_model=true")
    return promote(f"mulcon-{config.data.label}", version, margin, metric)
