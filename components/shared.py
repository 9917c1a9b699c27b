"""A helper the components embed (`additional_funcs`): it must import what it uses inside."""


def run_settings(data, pipeline_run: str, variant: str) -> tuple:
    """Point `mulcon.tracking` at this pipeline run and the data version of `data` (the prepare
    step's Dataset), and return the run's params file and the checkpoint folder of `variant`.

    Checkpoints live in `<train.checkpoint_root>/<pipeline_run>/<variant>`, apart from the task's
    outputs; prepare sets train.checkpoint_root to where the pipeline mounts the checkpoint volume
    (`components.CHECKPOINT_ROOT`), so a retried task, in a new pod, resumes from its last epoch.
    """
    import os

    from mulcon.config import load_config
    from mulcon.tracking import DATA_VERSION_ENV, PIPELINE_RUN_ENV

    os.environ[PIPELINE_RUN_ENV] = pipeline_run
    os.environ[DATA_VERSION_ENV] = data.metadata.get("data_version", "")
    params = os.path.join(data.path, "params.yaml")
    return params, os.path.join(load_config(params).train.checkpoint_root, pipeline_run, variant)
