"""Multi-node training: MulCon's two steps as a PyTorchJob of the Kubeflow Training Operator.

The pipeline task `train_multinode` runs with the data volume at /mnt/data and a ReadWriteMany
volume (`workspace_pvc`) at /workspace. It copies the run's prepared data to the workspace, creates
a PyTorchJob (kubeflow.org/v1) of `nodes` pods (one Master, nodes - 1 Workers) that each check
their secrets (`components.entrypoint`) and run `torchrun --nproc_per_node=<gpus> -m mulcon train`
with the workspace mounted at the same place, waits for it (at most `job_timeout_hours`), and
copies the trained model back into its Model output. The operator (v1.7 or later,
`spec.nprocPerNode`) gives torchrun the node count, node rank and rendezvous address (PET_*
variables); the data-parallel training itself is that of one node (`mulcon.distributed`): global
batches, gathered contrastive loss, rank 0 writes and logs. Checkpoints live on the workspace, so
a retried task, whose job is created again after a failure, resumes from its last epoch.
"""

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE, SECRETS

WORKSPACE = "/workspace"  # where the launcher task and the job's pods mount the volume
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
JOBS = {"group": "kubeflow.org", "version": "v1", "plural": "pytorchjobs"}
DELETE_TIMEOUT = 600.0  # seconds a deleted job may take to go, its pods first
logger = logging.getLogger(__name__)


def pytorchjob_manifest(name: str, namespace: str, image: str, nodes: int, gpus_per_node: int, command: list[str],
                        workspace_pvc: str, env: dict[str, str]) -> dict[str, Any]:
    """A kubeflow.org/v1 PyTorchJob: one Master and `nodes - 1` Workers, each with `gpus_per_node`
    GPUs, the volume at /workspace, shared memory for DataLoader workers, and the S3 and MLflow
    secrets (components.SECRETS) as environment variables: a required key `optional: false`, so a
    pod whose secret lacks it does not start, the others `optional: true`."""
    variables = [{"name": key, "value": value} for key, value in env.items()]
    variables += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key,
                                                               "optional": key not in required}}}
                  for secret, (required, optional) in SECRETS.items() for key in (*required, *optional)]
    pod = {
        "metadata": {"annotations": {"sidecar.istio.io/inject": "false"}},
        "spec": {
            "containers": [{
                "name": "pytorch",  # the operator finds the training container by this name
                "image": image, "command": command, "env": variables,
                "resources": {"limits": {"nvidia.com/gpu": gpus_per_node}},
                "volumeMounts": [{"name": "workspace", "mountPath": WORKSPACE}, {"name": "dshm", "mountPath": "/dev/shm"}],
            }],
            "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": workspace_pvc}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        },
    }
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": pod}}
    if nodes > 1:
        replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": "OnFailure", "template": pod}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": "mulcon"}},
            "spec": {"nprocPerNode": str(gpus_per_node), "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3},
                     "pytorchReplicaSpecs": replicas}}


def stage_data(data_dir: str, params_file: str, workspace: Path) -> list[str]:
    """Copy the run's data folder (prepare's `data/` and `prepared/` on the data volume) to
    `workspace/data` and the params file to `workspace/params.yaml`; return the overrides that
    point the params there (its manifests then name the images under the new place).

    The copy goes to `workspace/data.partial` and is renamed once whole: a retry after an
    interrupted copy copies again, never trains on half a dataset.
    """
    target, partial = workspace / "data", workspace / "data.partial"
    if not target.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(data_dir, partial)
        for info in partial.glob("prepared/**/info.json"):  # the images' folder, under the copy
            values = json.loads(info.read_text())
            values["image_root"] = str(target / Path(values["image_root"]).relative_to(data_dir))
            info.write_text(json.dumps(values, indent=2) + "\n")
        partial.rename(target)
    shutil.copyfile(params_file, workspace / "params.yaml")
    return [f"data.root={target / 'data'}", f"data.prepared_root={target / 'prepared'}"]


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """The state of a PyTorchJob (its last true condition: Created, Running, Succeeded, Failed,
    ...; "Created" before any) and that condition's message."""
    conditions = [c for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"]
    return (conditions[-1]["type"], conditions[-1].get("message", "")) if conditions else ("Created", "")


def _delete(api, name: str, where: dict[str, str], clock: Callable[[], float], sleep: Callable[[float], None],
            poll_seconds: float) -> None:
    """Delete the job, its pods first, and wait until it is gone."""
    from kubernetes.client import ApiException

    api.delete_namespaced_custom_object(name=name, propagation_policy="Foreground", **where)
    deadline = clock() + DELETE_TIMEOUT
    while clock() < deadline:
        try:
            api.get_namespaced_custom_object(name=name, **where)
        except ApiException as error:
            if error.status == 404:
                return
            raise
        sleep(poll_seconds)
    raise RuntimeError(f"PyTorchJob {name} was deleted but is still there after {DELETE_TIMEOUT:g} s")


def run_pytorchjob(manifest: dict[str, Any], api=None, *, poll_seconds: float = 30.0,
                   timeout_seconds: float = 72 * 3600.0, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> None:
    """Create the PyTorchJob and wait for it, at most `timeout_seconds`.

    A retried task finds the job of its earlier try (409): it waits for it when it still runs or
    has succeeded, and deletes and creates it again when it failed (it resumes from the
    checkpoints on the workspace).

    Args:
        manifest: the job (`pytorchjob_manifest`).
        api: a kubernetes CustomObjectsApi; None: one of the cluster this task runs in.
    Raises:
        RuntimeError: the job failed.
        TimeoutError: it did not finish in time (it is then deleted, so it holds no GPUs).
    """
    from kubernetes.client import ApiException

    if api is None:
        from kubernetes import client, config

        config.load_incluster_config()
        api = client.CustomObjectsApi()
    name, where = manifest["metadata"]["name"], {**JOBS, "namespace": manifest["metadata"]["namespace"]}
    try:
        api.create_namespaced_custom_object(body=manifest, **where)
    except ApiException as error:
        if error.status != 409:  # 409: it exists, made by an earlier try of this task
            raise
        state, _ = job_state(api.get_namespaced_custom_object(name=name, **where))
        if state == "Failed":
            logger.info("PyTorchJob %s of an earlier try failed: deleting it and creating it again", name)
            _delete(api, name, where, clock, sleep, poll_seconds)
            api.create_namespaced_custom_object(body=manifest, **where)
    deadline = clock() + timeout_seconds
    while True:
        state, message = job_state(api.get_namespaced_custom_object(name=name, **where))
        if state == "Succeeded":
            return
        if state == "Failed":
            raise RuntimeError(f"PyTorchJob {name} failed: {message}")
        if clock() >= deadline:
            _delete(api, name, where, clock, sleep, poll_seconds)
            raise TimeoutError(f"PyTorchJob {name} did not finish within {timeout_seconds / 3600:g} h (state: "
                               f"{state}); deleted it, a retry of this task starts it again from its checkpoints")
        sleep(poll_seconds)


def train_on_nodes(data_dir: str, params_file: str, data_version: str, model_path: str, *, pipeline_run: str,
                   image: str, nodes: int, gpus_per_node: int, workspace_pvc: str, timeout_hours: float,
                   api=None, workspace_root: str = WORKSPACE, namespace: str | None = None,
                   poll_seconds: float = 30.0) -> None:
    """Stage the data, run MulCon's whole plan as a PyTorchJob, copy its output to `model_path`.

    `api`, `workspace_root` and `namespace` (None: this pod's) are the cluster's; tests give others.
    """
    from mulcon.tracking import DATA_VERSION_ENV, PIPELINE_RUN_ENV

    workspace = Path(workspace_root) / pipeline_run
    workspace.mkdir(parents=True, exist_ok=True)
    overrides = stage_data(data_dir, params_file, workspace)
    command = ["python", "-m", "components.entrypoint",
               "python", "-m", "torch.distributed.run", f"--nproc_per_node={gpus_per_node}", "-m", "mulcon", "train",
               "--params", str(workspace / "params.yaml"), "--resume", "-S", "train.variant=mulcon",
               *[part for override in overrides for part in ("-S", override)],
               "--out-dir", str(workspace / "model"), "--checkpoint-dir", str(workspace / "checkpoints")]
    namespace = namespace or Path(NAMESPACE_FILE).read_text().strip()
    env = {PIPELINE_RUN_ENV: pipeline_run, DATA_VERSION_ENV: data_version}
    manifest = pytorchjob_manifest(f"mulcon-{pipeline_run[:40]}".lower(), namespace, image, nodes, gpus_per_node,
                                   command, workspace_pvc, env)
    run_pytorchjob(manifest, api, poll_seconds=poll_seconds, timeout_seconds=timeout_hours * 3600)
    shutil.copytree(workspace / "model", model_path, dirs_exist_ok=True)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_multinode(data: Input[Dataset], pipeline_run: str, image: str, nodes: int, gpus: int, workspace_pvc: str,
                    job_timeout_hours: float, model: Output[Model]):
    """MulCon's two steps on `nodes` nodes x `gpus` GPUs as a PyTorchJob (needs the Kubeflow Training
    Operator and the ReadWriteMany volume `workspace_pvc`, mounted here at /workspace), given up
    after `job_timeout_hours`: `model` holds what `finetune` would (stage folders, final model.pt,
    registered in MLflow)."""
    import os

    from components.pytorchjob import train_on_nodes

    train_on_nodes(data.metadata["data_dir"], os.path.join(data.path, "params.yaml"),
                   data.metadata.get("data_version", ""), model.path, pipeline_run=pipeline_run, image=image,
                   nodes=nodes, gpus_per_node=gpus, workspace_pvc=workspace_pvc, timeout_hours=job_timeout_hours)
    model.metadata.update(variant="mulcon", stage="finetune", framework="pytorch", nodes=nodes)
