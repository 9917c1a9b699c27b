"""Training steps: MulCon's two steps (pretrain, finetune) and one ablation variant, each the
`python -m mulcon train` of its dvc.yaml stage, under torchrun with one process per GPU."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE
from components.shared import run_settings


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_settings])
def pretrain(data: Input[Dataset], pipeline_run: str, gpus: int, model: Output[Model]):
    """Step 1 of MulCon (BCE only, Adam, one-cycle) on `gpus` GPUs: `model` holds `pretrain/`
    (model.pt, history.json), as `python -m mulcon train --stage pretrain` writes it."""
    from mulcon.launch import launch

    params, checkpoints = run_settings(data, pipeline_run, "mulcon")
    launch(["train", "--params", params, "--stage", "pretrain", "--resume", "-S", "train.variant=mulcon",
            "--out-dir", model.path, "--checkpoint-dir", checkpoints], gpus)
    model.metadata.update(variant="mulcon", stage="pretrain", framework="pytorch")


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_settings])
def finetune(data: Input[Dataset], pretrained: Input[Model], pipeline_run: str, gpus: int, model: Output[Model]):
    """Step 2 of MulCon (BCE + gamma L_con on two views, SGD) from the pretrained model, on `gpus`
    GPUs: `model` holds `pretrain/`, `finetune/` and the final `model.pt`; the model is registered
    in MLflow as a version of mulcon-<dataset>."""
    import os
    import shutil

    from mulcon.launch import launch

    params, checkpoints = run_settings(data, pipeline_run, "mulcon")
    shutil.copytree(os.path.join(pretrained.path, "pretrain"), os.path.join(model.path, "pretrain"))
    launch(["train", "--params", params, "--stage", "finetune", "--resume", "-S", "train.variant=mulcon",
            "--out-dir", model.path, "--checkpoint-dir", checkpoints], gpus)
    model.metadata.update(variant="mulcon", stage="finetune", framework="pytorch")


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_settings])
def train_variant(data: Input[Dataset], variant: str, pipeline_run: str, gpus: int, model: Output[Model]):
    """All steps of one Table 3 variant (the dvc.yaml stage `ablation@<variant>`) on `gpus` GPUs:
    `model` holds its stage folders and final `model.pt`, registered in MLflow."""
    from mulcon.launch import launch

    params, checkpoints = run_settings(data, pipeline_run, variant)
    launch(["train", "--params", params, "--resume", "-S", f"train.variant={variant}", "--out-dir", model.path,
            "--checkpoint-dir", checkpoints], gpus)
    model.metadata.update(variant=variant, framework="pytorch")
