"""The register/promote step: champion and challenger of the registered model (`mulcon.registry`)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components import IMAGE
from components.shared import run_settings


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_settings])
def promote(data: Input[Dataset], pipeline_run: str, margin: float, decision: Output[Metrics]) -> str:
    """The model this pipeline run registered (variant mulcon) becomes `challenger` of
    mulcon-<dataset>, and `champion` when its val mAP beats the champion's by more than `margin`
    points. Returns "promoted" or "kept champion"; `decision` holds both numbers."""
    from mulcon.config import load_config
    from mulcon.registry import promote_trained

    params, _ = run_settings(data, pipeline_run, "mulcon")
    result = promote_trained(load_config(params, ["train.variant=mulcon"]), margin)
    decision.log_metric("challenger_val_mAP", result["challenger_value"])
    if result["champion_value"] is not None:  # None: no champion yet, or not comparable
        decision.log_metric("champion_val_mAP", result["champion_value"])
    decision.log_metric("promoted", float(result["promoted"]))
    decision.metadata.update(model=result["model"], version=result["version"], reason=result["reason"])
    return "promoted" if result["promoted"] else "kept champion"
