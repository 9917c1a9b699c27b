"""The prepare step: the raw data of one data version and its manifests on the data volume, the resolved params."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(dataset: str, data_revision: str, repo_url: str, dvc_remote: str, params_file: str,
            overrides: List[str], pretrain_epochs: int, finetune_epochs: int, pipeline_run: str, data_root: str,
            checkpoint_root: str, data: Output[Dataset]):
    """Fetch `<data.root>/<folder>` (the dataset, or data.name for a folder dataset) at git revision
    `data_revision` of `repo_url` through DVC (the working directory's data when the revision is "")
    into `<data_root>/<pipeline_run>/data` on the data volume, then `python -m mulcon prepare` there
    (manifests and image cache in `<data_root>/<pipeline_run>/prepared`). A private repository's
    credentials come from the optional secret `mulcon-git` (`components.gitauth`).

    `data` holds only `params.yaml`, which every later step reads: the params file with the
    overrides, the dataset and the epochs applied, the data paths on the volume and
    train.checkpoint_root at `checkpoint_root` (the checkpoint volume). No image travels as an
    artifact. Metadata: data_version (the md5 of `data.dvc`), revision, data_dir, counts.
    """
    import json
    import os
    import shutil
    import tempfile

    import yaml

    from components.data import fetch_dataset
    from components.gitauth import git_credentials
    from mulcon.config import load_config, to_dict
    from mulcon.launch import launch

    settings = [*overrides, f"data.dataset={dataset}", f"train.pretrain_epochs={pretrain_epochs}",
                f"train.finetune_epochs={finetune_epochs}"]
    source = load_config(params_file, settings).data
    run_dir = os.path.join(data_root, pipeline_run)
    shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted earlier try of this task left
    scratch = os.path.join(run_dir, "tmp")
    os.makedirs(scratch)
    tempfile.tempdir = scratch  # DVC's clone of the repository: on the volume too, not on the pod's disk
    try:
        with git_credentials():  # the optional secret mulcon-git, for a private repo_url
            version = fetch_dataset(str(source.raw_dir), os.path.join(run_dir, "data", source.folder_name),
                                    repo_url=repo_url, revision=data_revision, remote=dvc_remote)
    finally:
        tempfile.tempdir = None
    shutil.rmtree(scratch)
    paths = [f"data.root={run_dir}/data", f"data.prepared_root={run_dir}/prepared",
             f"train.checkpoint_root={checkpoint_root}"]
    params = os.path.join(data.path, "params.yaml")
    os.makedirs(data.path, exist_ok=True)
    resolved = load_config(params_file, [*settings, *paths])
    with open(params, "w") as handle:
        yaml.safe_dump(to_dict(resolved), handle, sort_keys=False)
    launch(["prepare", "--params", params])
    with open(os.path.join(resolved.data.prepared_dir, "info.json")) as handle:
        counts = json.load(handle)["counts"]
    data.metadata.update(data_version=version, revision=data_revision or "working tree", dataset=dataset,
                         data_dir=run_dir, **counts)
