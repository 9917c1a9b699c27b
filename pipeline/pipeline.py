"""The Kubeflow pipeline: the DAG of dvc.yaml on a cluster, with GPUs, secrets and retries.

prepare -> pretrain -> finetune -> evaluate (the MulCon model, trained once, as in dvc.yaml);
the other variants (Table 3's four and mulcon_step2_bce) in a ParallelFor (train_variant -> evaluate); report (Table 3 with
all six rows); promote (challenger, and champion when better). The multi-node pipeline
(`build_pipeline(image, multinode=True)`, the same pipeline function) trains the MulCon model with a
PyTorchJob over several nodes instead of pretrain -> finetune.

The parameters' defaults (dataset, epochs) are read from params.yaml when the pipeline is built, so
the pipeline runs what `dvc repro` runs unless told otherwise.

Training tasks request `gpus` GPUs (nvidia.com/gpu) and run one process per GPU under torchrun,
with CPU and memory requests, /dev/shm in memory for DataLoader workers, no caching and retries.
Two volume claims (parameters `data_pvc`, `checkpoint_pvc`) carry what a task must not download
or lose: prepare writes the raw data, manifests and image cache of the run to the data volume
(/mnt/data), which the training and evaluation tasks mount; the training tasks keep their
checkpoints on the checkpoint volume (/mnt/checkpoints), so a retried task resumes. The Dataset
artifact between tasks holds only the resolved params file: report and promote read no images.
Every task gets the S3 and MLflow credentials from the Kubernetes secrets of `components.SECRETS`
(`mulcon-s3`, `mulcon-mlflow`), prepare also the optional `mulcon-git`, never from parameters.
Locally (kfp.local) those settings are ignored and the two roots are folders of the local run.
"""

import inspect
from pathlib import Path
from typing import List

from kfp import dsl, kubernetes

from components import CHECKPOINT_ROOT, DATA_ROOT, GIT_SECRET, SECRETS
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
MULTINODE_PARAMETERS = ("nodes", "workspace_pvc", "job_timeout_hours")
TRAINING_RESOURCES = {"cpu_request": "8", "cpu_limit": "16", "memory_request": "32G", "memory_limit": "64G"}
# prepare decodes every image once (the image cache) on its CPUs; its data goes to the data volume.
PREPARE_RESOURCES = {"cpu_request": "4", "cpu_limit": "16", "memory_request": "8G", "memory_limit": "32G"}
RETRIES = {"num_retries": 2, "backoff_duration": "60s", "backoff_factor": 2.0}


def _common(task: dsl.PipelineTask, image: str) -> dsl.PipelineTask:
    """The project image and the secrets, on every task."""
    task.set_container_image(image)
    for secret, (required, optional) in SECRETS.items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={key: key for key in required})
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={key: key for key in optional},
                                     optional=True)
    return task


def _training(task: dsl.PipelineTask, image: str, gpus, data_pvc, checkpoint_pvc) -> dsl.PipelineTask:
    """GPUs, CPU, memory, shared memory, the data and checkpoint volumes, no caching and retries
    for a training task."""
    _common(task, image)
    kubernetes.mount_pvc(task, pvc_name=data_pvc, mount_path=DATA_ROOT)
    kubernetes.mount_pvc(task, pvc_name=checkpoint_pvc, mount_path=CHECKPOINT_ROOT)
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    task.set_cpu_request(TRAINING_RESOURCES["cpu_request"]).set_cpu_limit(TRAINING_RESOURCES["cpu_limit"])
    task.set_memory_request(TRAINING_RESOURCES["memory_request"]).set_memory_limit(TRAINING_RESOURCES["memory_limit"])
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    return task.set_caching_options(False).set_retry(**RETRIES)


def _evaluation(task: dsl.PipelineTask, image: str, data_pvc) -> dsl.PipelineTask:
    """One GPU and the data volume (the test images) for an evaluation task."""
    _common(task, image).set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    kubernetes.mount_pvc(task, pvc_name=data_pvc, mount_path=DATA_ROOT)
    return task.set_caching_options(False)


def _prepare(task: dsl.PipelineTask, image: str, data_pvc) -> dsl.PipelineTask:
    """The data volume, CPU and memory requests and the optional git credentials for prepare."""
    _common(task, image)
    secret, keys = GIT_SECRET
    kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={key: key for key in keys}, optional=True)
    kubernetes.mount_pvc(task, pvc_name=data_pvc, mount_path=DATA_ROOT)
    task.set_cpu_request(PREPARE_RESOURCES["cpu_request"]).set_cpu_limit(PREPARE_RESOURCES["cpu_limit"])
    task.set_memory_request(PREPARE_RESOURCES["memory_request"]).set_memory_limit(PREPARE_RESOURCES["memory_limit"])
    # Not cached: a revision may be a branch, whose data changes under the same argument.
    return task.set_caching_options(False)


def _after_training(data, model, trained: dsl.PipelineTask, image: str, parallelism: int, run_id: str,
                    gpus, promote_margin, data_pvc, checkpoint_pvc) -> None:
    """evaluate MulCon's `model`; the ablation; report; promote."""
    scored = _evaluation(evaluate(data=data, model=model, variant="mulcon", pipeline_run=run_id), image, data_pvc)
    with dsl.ParallelFor(items=ABLATION_VARIANTS, parallelism=parallelism, name="ablation") as variant:
        variant_model = _training(train_variant(data=data, variant=variant, pipeline_run=run_id, gpus=gpus), image,
                                  gpus, data_pvc, checkpoint_pvc)
        # After MulCon's training, which creates the ablation's MLflow parent run: variants started
        # together would each create one.
        variant_model.after(trained)
        ablation = _evaluation(evaluate(data=data, model=variant_model.outputs["model"], variant=variant,
                                        pipeline_run=run_id), image, data_pvc)
    tables = _common(report(data=data, mulcon_reports=scored.outputs["reports"],
                            ablation_reports=dsl.Collected(ablation.outputs["reports"]), pipeline_run=run_id), image)
    tables.set_caching_options(False)
    decision = _common(promote(data=data, pipeline_run=run_id, margin=promote_margin), image)
    decision.set_caching_options(False).after(tables)


def build_pipeline(image: str, parallelism: int = 4, multinode: bool = False, params: str | Path = PARAMS, *,
                   data_root: str = DATA_ROOT, checkpoint_root: str = CHECKPOINT_ROOT):
    """The pipeline, its tasks in `image`, at most `parallelism` ablation variants at once (1 for a
    local run whose MLflow store is SQLite, which takes one writer at a time), its defaults for
    the dataset and the epochs read from the params file `params`.

    With `multinode`, the MulCon model is trained by a PyTorchJob on `nodes` nodes (parameters
    `nodes`, `workspace_pvc` and `job_timeout_hours`) instead of the pretrain and finetune tasks.
    `data_root` and `checkpoint_root` are where the tasks find the two volumes: the mount points
    on a cluster; folders of a local run (kfp.local mounts nothing).

    Raises:
        ValueError: no image.
        ConfigError: `params` is not a valid params file.
    """
    if not image:
        raise ValueError("build_pipeline needs the project image (as python -m pipeline compile --image gives it)")
    defaults = load_config(params)

    def mulcon_pipeline(dataset: str = defaults.data.dataset, data_revision: str = "", repo_url: str = "",
                        dvc_remote: str = "", pretrain_epochs: int = defaults.train.pretrain_epochs,
                        finetune_epochs: int = defaults.train.finetune_epochs, gpus: int = 1,
                        params_file: str = "params.yaml", overrides: List[str] = [], promote_margin: float = 0.0,
                        data_pvc: str = "mulcon-data", checkpoint_pvc: str = "mulcon-checkpoints",
                        nodes: int = 2, workspace_pvc: str = "mulcon-workspace", job_timeout_hours: float = 72.0):
        """MulCon: prepare, two-step training, evaluation, the Table 3 ablation, report and promotion.

        Args:
            dataset: the dataset, as data.dataset names it; default: the params file's data.dataset.
            data_revision: the data version, a git revision of repo_url (submit and schedule want one;
                "": the working directory's data, for run-local).
            repo_url: this repository as the cluster can clone it (credentials: the mulcon-git secret).
            dvc_remote: the DVC remote holding the data ("": the revision's default remote).
            pretrain_epochs: epochs of step 1; default: the params file's train.pretrain_epochs.
            finetune_epochs: epochs of step 2; default: the params file's train.finetune_epochs.
            gpus: GPUs per training task (per node with a PyTorchJob).
            params_file: the params file in the image, e.g. configs/paper-coco2014.yaml.
            overrides: -S style overrides of the params file, e.g. ["train.seed=1"].
            promote_margin: the val mAP points a new model needs over the champion's to replace it.
            data_pvc: the volume claim for each run's raw data, manifests and image cache (mounted by
                prepare, read-write, and the training and evaluation tasks; ReadWriteMany for parallel tasks).
            checkpoint_pvc: the volume claim for the training tasks' checkpoints (ReadWriteMany too).
            nodes: the PyTorchJob's nodes (multi-node pipeline only).
            workspace_pvc: a ReadWriteMany volume claim for the job's data, checkpoints and model (multi-node only).
            job_timeout_hours: how long the launcher waits for the PyTorchJob (multi-node only).
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        prepared = _prepare(prepare(dataset=dataset, data_revision=data_revision, repo_url=repo_url,
                                    dvc_remote=dvc_remote, params_file=params_file, overrides=overrides,
                                    pretrain_epochs=pretrain_epochs, finetune_epochs=finetune_epochs,
                                    pipeline_run=run_id, data_root=data_root, checkpoint_root=checkpoint_root),
                            image, data_pvc)
        data = prepared.outputs["data"]
        if multinode:
            trained = train_multinode(data=data, pipeline_run=run_id, image=image, nodes=nodes, gpus=gpus,
                                      workspace_pvc=workspace_pvc, job_timeout_hours=job_timeout_hours)
            _common(trained, image).set_caching_options(False).set_retry(**RETRIES)
            kubernetes.mount_pvc(trained, pvc_name=data_pvc, mount_path=DATA_ROOT)
            kubernetes.mount_pvc(trained, pvc_name=workspace_pvc, mount_path=WORKSPACE)
        else:
            first = _training(pretrain(data=data, pipeline_run=run_id, gpus=gpus), image, gpus, data_pvc, checkpoint_pvc)
            trained = _training(finetune(data=data, pretrained=first.outputs["model"], pipeline_run=run_id, gpus=gpus),
                                image, gpus, data_pvc, checkpoint_pvc)
        _after_training(data, trained.outputs["model"], trained, image, parallelism, run_id, gpus, promote_margin,
                        data_pvc, checkpoint_pvc)

    if not multinode:  # kfp takes the parameters from the signature: leave out the multi-node ones
        signature = inspect.signature(mulcon_pipeline)
        mulcon_pipeline.__signature__ = signature.replace(parameters=[
            parameter for name, parameter in signature.parameters.items() if name not in MULTINODE_PARAMETERS])
    description = ("MulCon: prepare, two-step training, evaluation, the Table 3 ablation, report and "
                   "champion/challenger promotion" + (", the model trained by a multi-node PyTorchJob" if multinode else ""))
    return dsl.pipeline(name="mulcon-multinode" if multinode else "mulcon", description=description)(mulcon_pipeline)
