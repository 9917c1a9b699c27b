"""The evaluate step: one variant's model on the test split (the dvc.yaml stage `evaluate`)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE
from components.shared import run_settings


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_settings])
def evaluate(data: Input[Dataset], model: Input[Model], variant: str, pipeline_run: str,
             metrics: Output[Metrics], reports: Output[Dataset]):
    """`python -m mulcon evaluate` of `variant`'s model: `reports` holds metrics.json, per-class AP,
    PR curves and history.csv; `metrics` shows mAP, CP, CR, CF1, OP, OR, OF1 (percent) in the UI.
    The numbers are also logged to the variant's MLflow run."""
    import json
    import os

    from mulcon.launch import launch

    params, _ = run_settings(data, pipeline_run, variant)
    launch(["evaluate", "--params", params, "-S", f"train.variant={variant}",
            "--model", os.path.join(model.path, "model.pt"), "--out-dir", reports.path])
    with open(os.path.join(reports.path, "metrics.json")) as handle:
        values = json.load(handle)
    for key in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"):
        metrics.log_metric(key, values[key])
    reports.metadata.update(variant=variant, split=values["split"])
