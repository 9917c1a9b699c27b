"""The Kubeflow pipeline: the DAG of dvc.yaml on a cluster, with GPUs, secrets and retries.

prepare -> pretrain -> finetune -> evaluate (the MulCon model, trained once, as in dvc.yaml);
the four other Table 3 variants in a ParallelFor (train_variant -> evaluate); report (Table 3 with
all five rows); promote (challenger, and champion when better). The multi-node pipeline
(`build_pipeline(multinode=True)`) trains the MulCon model with a PyTorchJob over several nodes
instead of pretrain -> finetune.

Training tasks request `gpus` GPUs (nvidia.com/gpu) and run one process per GPU under torchrun,
with CPU and memory requests, /dev/shm in memory for DataLoader workers, no caching and retries.
Every task gets the S3 and MLflow credentials from Kubernetes secrets (never from parameters):
`mulcon-s3` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; optional AWS_ENDPOINT_URL,
MLFLOW_S3_ENDPOINT_URL) and `mulcon-mlflow` (MLFLOW_TRACKING_URI; optional MLFLOW_TRACKING_USERNAME,
MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN). Locally (kfp.local) those settings are ignored.
"""

from typing import List

from kfp import dsl, kubernetes

from components import IMAGE
from components.evaluate import evaluate
from components.prepare import prepare
from components.promote import promote
from components.pytorchjob import WORKSPACE, train_multinode
from components.report import report
from components.train import finetune, pretrain, train_variant
from mulcon.config import VARIANTS

# The "mulcon" row of the ablation is the model of pretrain -> finetune, trained once (as in dvc.yaml).
ABLATION_VARIANTS = [variant for variant in VARIANTS if variant != "mulcon"]
SECRETS = {
    "mulcon-s3": ({"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
                  {"AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL"}),
    "mulcon-mlflow": ({"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"},
                      {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                       "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
                       "MLFLOW_TRACKING_TOKEN": "MLFLOW_TRACKING_TOKEN"}),
}
TRAINING_RESOURCES = {"cpu_request": "8", "cpu_limit": "16", "memory_request": "32G", "memory_limit": "64G"}
RETRIES = {"num_retries": 2, "backoff_duration": "60s", "backoff_factor": 2.0}


def _common(task: dsl.PipelineTask, image: str) -> dsl.PipelineTask:
    """The project image and the secrets, on every task."""
    task.set_container_image(image)
    for secret, (required, optional) in SECRETS.items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=required)
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=optional, optional=True)
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


def build_pipeline(image: str = IMAGE, parallelism: int = 4, multinode: bool = False):
    """The pipeline function, its tasks in `image`, at most `parallelism` ablation variants at once
    (1 for a local run whose MLflow store is SQLite, which takes one writer at a time).

    With `multinode`, the MulCon model is trained by a PyTorchJob on `nodes` nodes (parameters
    `nodes` and `workspace_pvc`) instead of the pretrain and finetune tasks.
    """

    def prepared(dataset, data_revision, repo_url, dvc_remote, params_file, overrides, pretrain_epochs,
                 finetune_epochs):
        task = prepare(dataset=dataset, data_revision=data_revision, repo_url=repo_url, dvc_remote=dvc_remote,
                       params_file=params_file, overrides=overrides, pretrain_epochs=pretrain_epochs,
                       finetune_epochs=finetune_epochs)
        # Not cached: a revision may be a branch, whose data changes under the same argument.
        return _common(task, image).set_caching_options(False).outputs["data"]

    @dsl.pipeline(name="mulcon", description="MulCon: prepare, two-step training, evaluation, the Table 3 "
                                             "ablation, report and champion/challenger promotion")
    def mulcon_pipeline(dataset: str = "demo", data_revision: str = "", repo_url: str = "", dvc_remote: str = "",
                        pretrain_epochs: int = 6, finetune_epochs: int = 4, gpus: int = 1,
                        params_file: str = "params.yaml", overrides: List[str] = [], promote_margin: float = 0.0):
        """Args: the dataset; the data version (`data_revision`, a git revision of `repo_url` whose
        DVC remote, `dvc_remote` or the default, holds the data; "" = the working directory's data);
        the epochs of the two steps; GPUs per training task; the params file in the image and
        `-S`-style overrides; the val mAP margin a new model needs to become champion."""
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        data = prepared(dataset, data_revision, repo_url, dvc_remote, params_file, overrides, pretrain_epochs,
                        finetune_epochs)
        first = _training(pretrain(data=data, pipeline_run=run_id, gpus=gpus), image, gpus)
        second = _training(finetune(data=data, pretrained=first.outputs["model"], pipeline_run=run_id, gpus=gpus),
                           image, gpus)
        _after_training(data, second.outputs["model"], second, image, parallelism, run_id, gpus, promote_margin)

    @dsl.pipeline(name="mulcon-multinode", description="MulCon with the model trained by a multi-node PyTorchJob")
    def mulcon_multinode_pipeline(dataset: str = "demo", data_revision: str = "", repo_url: str = "",
                                  dvc_remote: str = "", pretrain_epochs: int = 6, finetune_epochs: int = 4,
                                  gpus: int = 1, params_file: str = "params.yaml", overrides: List[str] = [],
                                  promote_margin: float = 0.0, nodes: int = 2, workspace_pvc: str = "mulcon-workspace"):
        """The arguments of `mulcon`, and: `nodes` x `gpus` GPUs train MulCon; `workspace_pvc`, a
        ReadWriteMany volume claim, holds its data, checkpoints and model."""
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        data = prepared(dataset, data_revision, repo_url, dvc_remote, params_file, overrides, pretrain_epochs,
                        finetune_epochs)
        job = train_multinode(data=data, pipeline_run=run_id, image=image, nodes=nodes, gpus=gpus,
                              workspace_pvc=workspace_pvc)
        _common(job, image).set_caching_options(False).set_retry(**RETRIES)
        kubernetes.mount_pvc(job, pvc_name=workspace_pvc, mount_path=WORKSPACE)
        _after_training(data, job.outputs["model"], job, image, parallelism, run_id, gpus, promote_margin)

    return mulcon_multinode_pipeline if multinode else mulcon_pipeline
