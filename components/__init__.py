"""Kubeflow Pipelines components: one lightweight Python component per pipeline step.

Each component is a thin wrapper: typed inputs and outputs (Dataset, Model, Metrics artifacts), a
body that resolves paths and calls the `python -m mulcon` verb that the matching `dvc.yaml` stage
runs (through `mulcon.launch.launch`, under torchrun for several GPUs) or one library
function. Bodies import inside the function, as KFP lightweight components must; they run in the
project image (`Dockerfile`), whose working directory holds `params.yaml` and this package, or,
with `kfp.local.SubprocessRunner(use_venv=False)`, in this interpreter (`python -m pipeline run-local`).

| Module | Components |
|---|---|
| `prepare` | `prepare`: the raw data of a data version (DVC) and its manifests on the data volume, the resolved params |
| `train` | `pretrain`, `finetune` (MulCon's two steps), `train_variant` (one ablation variant) |
| `evaluate` | `evaluate`: test-split metrics and reports of one variant |
| `report` | `report`: Table 3 (and our sixth row) and Tables 1-2 from the six variants |
| `promote` | `promote`: the run's model becomes challenger, and champion if better |
| `pytorchjob` | `train_multinode`: MulCon on several nodes as a Kubeflow Training Operator PyTorchJob |
| `entrypoint` | the check a PyTorchJob pod runs first: its required secret keys are set |
| `gitauth` | the `mulcon-git` credentials for DVC and git, through GIT_ASKPASS |
"""

import os

IMAGE_ENV = "MULCON_IMAGE"
# The image the components name until `pipeline.pipeline.build_pipeline` sets the project image on
# every task. No default names an image: `python -m pipeline compile` wants --image or $MULCON_IMAGE.
IMAGE = os.environ.get(IMAGE_ENV, "")
# Where the tasks mount the two volume claims (pipeline parameters data_pvc and checkpoint_pvc):
# the raw data, manifests and image cache of each run, written by prepare and read by the training
# and evaluation tasks; the training tasks' checkpoints, so that a retried task resumes.
DATA_ROOT = "/mnt/data"
CHECKPOINT_ROOT = "/mnt/checkpoints"
# The Kubernetes secrets every task (and every pod of a PyTorchJob) gets as environment variables:
# secret name -> (keys it must hold, keys it may hold). Credentials never travel as parameters.
SECRETS = {
    "mulcon-s3": (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")),
    "mulcon-mlflow": (("MLFLOW_TRACKING_URI",),
                      ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")),
}
# The optional secret that gives DVC and git the credentials of a private repo_url (prepare only).
GIT_SECRET = ("mulcon-git", ("MULCON_GIT_USERNAME", "MULCON_GIT_PASSWORD"))
