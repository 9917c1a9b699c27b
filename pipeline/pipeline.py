"""The Kubeflow pipeline: the DAG of dvc.yaml on a cluster, with GPUs, secrets and retries.

prepare -> pretrain -> finetune -> evaluate (the MulCon model, trained once, as in dvc.yaml);
the four other Table 3 variants in a ParallelFor (train_variant -> evaluate); report (Table 3 with
all five rows); promote (challenger, and champion when better). The multi-node pipeline
(`build_pipeline(multinode=True)`, the same pipeline function) trains the MulCon model with a
PyTorchJob over several nodes instead of pretrain -> finetune.

The parameters' defaults (dataset, epochs) are read from params.yaml when the pipeline is built, so
the pipeline runs what `dvc repro` runs unless told otherwise.

Training tasks request `gpus` GPUs (nvidia.com/gpu) and run one process per GPU under torchrun,
with CPU and memory requests, /dev/shm in memory for DataLoader workers, no caching and retries.
Every task gets the S3 and MLflow credentials from the Kubernetes secrets of `components.SECRETS`
(`mulcon-s3`, `mulcon-mlflow`), never from parameters. Locally (kfp.local) those settings are ignored.
"""

import inspect
from pathlib import Path
from typing import List

from kfp import dsl, kubernetes

from components import IMAGE, SECRETS
from components.evaluate import evaluate
from components.prepare import prepare
from components.promote import promote
from components.pytorchjob import WORKSPACE, train_multinode
from components.report import report
from components.train import finetune, pretrain, train_variant
from mulcon.config import VARIANTS, load_config

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"  # the defaults; the image holds the same file

# The "mulcon" row of the ablation is the model of pretrain -> finetune, trained once (as in dvc.yaml).
ABLATION_VARIANTS = [variant for variant in VARIANTS if variant != "mulcon"]
# Parameters of the multi-node pipeline only: the single-node one has no nodes or volume to set.
MULTINODE_PARAMETERS = ("nodes", "workspace_pvc")
TRAINING_RESOURCES = {"cpu_request": "8", "cpu_limit": "16", "memory_request": "32G", "memory_limit": "64G"}
RETRIES = {"num_retries": 2, "backoff_duration": "60s", "backoff_factor": 2.0}


def _common(task: dsl.PipelineTask, image: str) -> dsl.PipelineTask:
    """The project image and the secrets, on every task."""
    task.set_container_image(image)
    for secret, (required, optional) in SECRETS.items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={key: key for key in required})
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={key: key for key in optional},
                                     optional=True)
    return task


def _training(task: dsl.PipelineTask, image: str, gpus) -> dsl.PipelineTask:
    """GPUs, CPU, memory, shared memory, no caching and retries for a training task."""
    _common(task, image)
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    task.set_cpu_request(TRAINING_RESOURCES["cpu_request"]).set_cpu_limit(TRAINING_RESOURCES["cpu_limit"])
    task.set_memory_request(TRAINING_RESOURCES["memory_request"]).set_memory_limit(TRAINING_RESOURCES["memory_limit"])
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    return task.set_caching_options(False).set_retry(**RETRIES)


def _evaluation(task: dsl.PipelineTask, image: str) -> dsl.PipelineTask:
    _common(task, image).set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    return task.set_caching_options(False)


def _after_training(data, model, trained: dsl.PipelineTask, image: str, parallelism: int, run_id: str,
                    gpus, promote_margin) -> None:
    """evaluate MulCon's `model`; the ablation; report; promote."""
    scored = _evaluation(evaluate(data=data, model=model, variant="mulcon", pipeline_run=run_id), image)
    with dsl.ParallelFor(items=ABLATION_VARIANTS, parallelism=parallelism, name="ablation") as variant:
        variant_model = _training(train_variant(data=data, variant=variant, pipeline_run=run_id, gpus=gpus), image, gpus)
        # After MulCon's training, which creates the ablation's MLflow parent run: variants started
        # together would each create one.
        variant_model.after(trained)
        ablation = _evaluation(evaluate(data=data, model=variant_model.outputs["model"], variant=variant,
                                        pipeline_run=run_id), image)
    tables = _common(report(data=data, mulcon_reports=scored.outputs["reports"],
                            ablation_reports=dsl.Collected(ablation.outputs["reports"]), pipeline_run=run_id), image)
    tables.set_caching_options(False)
    decision = _common(promote(data=data, pipeline_run=run_id, margin=promote_margin), image)
    decision.set_caching_options(False).after(tables)


def build_pipeline(image: str = IMAGE, parallelism: int = 4, multinode: bool = False, params: str | Path = PARAMS):
    """The pipeline, its tasks in `image`, at most `parallelism` ablation variants at once (1 for a
    local run whose MLflow store is SQLite, which takes one writer at a time), its defaults for
    the dataset and the epochs read from the params file `params`.

    With `multinode`, the MulCon model is trained by a PyTorchJob on `nodes` nodes (parameters
    `nodes` and `workspace_pvc`) instead of the pretrain and finetune tasks.

    Raises:
        ConfigError: `params` is not a valid params file.
    """
    defaults = load_config(params)

    def mulcon_pipeline(dataset: str = defaults.data.dataset, data_revision: str = "", repo_url: str = "",
                        dvc_remote: str = "", pretrain_epochs: int = defaults.train.pretrain_epochs,
                        finetune_epochs: int = defaults.train.finetune_epochs, gpus: int = 1,
                        params_file: str = "params.yaml", overrides: List[str] = [], promote_margin: float = 0.0,
                        nodes: int = 2, workspace_pvc: str = "mulcon-workspace"):
        """MulCon: prepare, two-step training, evaluation, the Table 3 ablation, report and promotion.

        Args:
            dataset: the dataset, as data.dataset names it; default: the params file's data.dataset.
            data_revision: the data version, a git revision of repo_url ("": the image's working directory).
            repo_url: this repository as the cluster can clone it (needed with a data revision).
            dvc_remote: the DVC remote holding the data ("": the revision's default remote).
            pretrain_epochs: epochs of step 1; default: the params file's train.pretrain_epochs.
            finetune_epochs: epochs of step 2; default: the params file's train.finetune_epochs.
            gpus: GPUs per training task (per node with a PyTorchJob).
            params_file: the params file in the image, e.g. configs/paper-coco2014.yaml.
            overrides: -S style overrides of the params file, e.g. ["train.seed=1"].
            promote_margin: the val mAP points a new model needs over the champion's to replace it.
            nodes: the PyTorchJob's nodes (multi-node pipeline only).
            workspace_pvc: a ReadWriteMany volume claim for the job's data, checkpoints and model (multi-node only).
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        prepared = _common(prepare(dataset=dataset, data_revision=data_revision, repo_url=repo_url,
                                   dvc_remote=dvc_remote, params_file=params_file, overrides=overrides,
                                   pretrain_epochs=pretrain_epochs, finetune_epochs=finetune_epochs), image)
        # Not cached: a revision may be a branch, whose data changes under the same argument.
        data = prepared.set_caching_options(False).outputs["data"]
        if multinode:
            trained = train_multinode(data=data, pipeline_run=run_id, image=image, nodes=nodes, gpus=gpus,
                                      workspace_pvc=workspace_pvc)
            _common(trained, image).set_caching_options(False).set_retry(**RETRIES)
            kubernetes.mount_pvc(trained, pvc_name=workspace_pvc, mount_path=WORKSPACE)
        else:
            first = _training(pretrain(data=data, pipeline_run=run_id, gpus=gpus), image, gpus)
            trained = _training(finetune(data=data, pretrained=first.outputs["model"], pipeline_run=run_id, gpus=gpus),
                                image, gpus)
        _after_training(data, trained.outputs["model"], trained, image, parallelism, run_id, gpus, promote_margin)

    if not multinode:  # kfp takes the parameters from the signature: leave out the multi-node ones
        signature = inspect.signature(mulcon_pipeline)
        mulcon_pipeline.__signature__ = signature.replace(parameters=[
            parameter for name, parameter in signature.parameters.items() if name not in MULTINODE_PARAMETERS])
    description = ("MulCon: prepare, two-step training, evaluation, the Table 3 ablation, report and "
                   "champion/challenger promotion" + (", the model trained by a multi-node PyTorchJob" if multinode else ""))
    return dsl.pipeline(name="mulcon-multinode" if multinode else "mulcon", description=description)(mulcon_pipeline)
