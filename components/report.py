"""The report step: Table 3 (the ablation) and Tables 1-2 (the dvc.yaml stage `report`)."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from components import IMAGE
from components.shared import run_settings


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_settings])
def report(data: Input[Dataset], mulcon_reports: Input[Dataset], ablation_reports: Input[List[Dataset]],
           pipeline_run: str, tables: Output[Dataset], ablation: Output[Markdown]):
    """`python -m mulcon report` over the evaluations of the six variants: `tables` holds
    ablation.md, ablation.csv and metrics.md (also attached to the MLflow ablation run);
    `ablation` is Table 3 for the UI."""
    import json
    import os
    import shutil

    from mulcon.launch import launch

    params, _ = run_settings(data, pipeline_run, "mulcon")
    for reports in (mulcon_reports, *ablation_reports):  # into <evaluate.out_root>/<variant>, as DVC lays them out
        with open(os.path.join(reports.path, "metrics.json")) as handle:
            shutil.copytree(reports.path, os.path.join(tables.path, json.load(handle)["variant"]))
    launch(["report", "--params", params, "-S", f"evaluate.out_root={tables.path}"])
    shutil.copy(os.path.join(tables.path, "ablation.md"), ablation.path)
