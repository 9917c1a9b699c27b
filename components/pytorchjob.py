"""Multi-node training: MulCon's two steps as a PyTorchJob of the Kubeflow Training Operator.

The pipeline task `train_multinode` runs with a ReadWriteMany volume (`workspace_pvc`) mounted at
/workspace. It copies the prepared data there, creates a PyTorchJob (kubeflow.org/v1) of `nodes`
pods (one Master, nodes - 1 Workers) that each run `torchrun --nproc_per_node=<gpus> -m mulcon
train` with the volume mounted at the same place, waits for it, and copies the trained model back
into its Model output. The operator (v1.7 or later, `spec.nprocPerNode`) gives torchrun the node
count, node rank and rendezvous address (PET_* variables); the data-parallel training itself is
that of one node (`mulcon.distributed`): global batches, gathered contrastive loss, rank 0 writes
and logs. Checkpoints live on the volume, so a retried job resumes from its last epoch.
"""

import json
import shutil
import time
from pathlib import Path
from typing import Any

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE, SECRETS

WORKSPACE = "/workspace"  # where the launcher task and the job's pods mount the volume
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def pytorchjob_manifest(name: str, namespace: str, image: str, nodes: int, gpus_per_node: int, command: list[str],
                        workspace_pvc: str, env: dict[str, str]) -> dict[str, Any]:
    """A kubeflow.org/v1 PyTorchJob: one Master and `nodes - 1` Workers, each with `gpus_per_node`
    GPUs, the volume at /workspace, shared memory for DataLoader workers, and the S3 and MLflow
    secrets (components.SECRETS, each key optional) as environment variables."""
    variables = [{"name": key, "value": value} for key, value in env.items()]
    variables += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
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


def stage_data(data_path: str, workspace: Path) -> list[str]:
    """Copy the prepare step's Dataset to `workspace/data` and return the overrides that point
    the params there (its manifests then name the images under the new place)."""
    target = workspace / "data"
    if not target.exists():
        shutil.copytree(data_path, target)
    for info in target.glob("prepared/*/info.json"):
        values = json.loads(info.read_text())
        values["image_root"] = str(target / "data" / info.parent.name)
        info.write_text(json.dumps(values, indent=2) + "\n")
    return [f"data.root={target / 'data'}", f"data.prepared_root={target / 'prepared'}"]


def run_pytorchjob(manifest: dict[str, Any], poll_seconds: float = 30.0) -> None:
    """Create the PyTorchJob (or find it again, when this task is retried) and wait for it.

    Raises:
        RuntimeError: the job failed.
    """
    from kubernetes import client, config

    config.load_incluster_config()
    api = client.CustomObjectsApi()
    where = {"group": "kubeflow.org", "version": "v1", "namespace": manifest["metadata"]["namespace"],
             "plural": "pytorchjobs"}
    try:
        api.create_namespaced_custom_object(body=manifest, **where)
    except client.ApiException as error:
        if error.status != 409:  # 409: it exists, made by an earlier try of this task
            raise
    while True:
        job = api.get_namespaced_custom_object(name=manifest["metadata"]["name"], **where)
        conditions = [c for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"]
        state = conditions[-1]["type"] if conditions else "Created"
        if state == "Succeeded":
            return
        if state == "Failed":
            raise RuntimeError(f"PyTorchJob {manifest['metadata']['name']} failed: {conditions[-1].get('message', '')}")
        time.sleep(poll_seconds)


def train_on_nodes(data_path: str, data_version: str, model_path: str, *, pipeline_run: str, image: str, nodes: int,
                   gpus_per_node: int, workspace_pvc: str) -> None:
    """Stage the data, run MulCon's whole plan as a PyTorchJob, copy its output to `model_path`."""
    from mulcon.tracking import DATA_VERSION_ENV, PIPELINE_RUN_ENV

    workspace = Path(WORKSPACE) / pipeline_run
    overrides = stage_data(data_path, workspace)
    command = ["python", "-m", "torch.distributed.run", f"--nproc_per_node={gpus_per_node}", "-m", "mulcon", "train",
               "--params", str(workspace / "data" / "params.yaml"), "--resume", "-S", "train.variant=mulcon",
               *[part for override in overrides for part in ("-S", override)],
               "--out-dir", str(workspace / "model"), "--checkpoint-dir", str(workspace / "checkpoints")]
    namespace = Path(NAMESPACE_FILE).read_text().strip()
    env = {PIPELINE_RUN_ENV: pipeline_run, DATA_VERSION_ENV: data_version}
    manifest = pytorchjob_manifest(f"mulcon-{pipeline_run[:40]}".lower(), namespace, image, nodes, gpus_per_node,
                                   command, workspace_pvc, env)
    run_pytorchjob(manifest)
    shutil.copytree(workspace / "model", model_path, dirs_exist_ok=True)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_multinode(data: Input[Dataset], pipeline_run: str, image: str, nodes: int, gpus: int, workspace_pvc: str,
                    model: Output[Model]):
    """MulCon's two steps on `nodes` nodes x `gpus` GPUs as a PyTorchJob (needs the Kubeflow Training
    Operator and the ReadWriteMany volume `workspace_pvc`, mounted here at /workspace): `model`
    holds what `finetune` would (stage folders, final model.pt, registered in MLflow)."""
    from components.pytorchjob import train_on_nodes

    train_on_nodes(data.path, data.metadata.get("data_version", ""), model.path, pipeline_run=pipeline_run,
                   image=image, nodes=nodes, gpus_per_node=gpus, workspace_pvc=workspace_pvc)
    model.metadata.update(variant="mulcon", stage="finetune", framework="pytorch", nodes=nodes)
