"""The prepare step: the raw data of one data version, its manifests and the resolved params."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(dataset: str, data_revision: str, repo_url: str, dvc_remote: str, params_file: str,
            overrides: List[str], pretrain_epochs: int, finetune_epochs: int, data: Output[Dataset]):
    """Fetch `<data.root>/<dataset>` at git revision `data_revision` of `repo_url` through DVC
    (the working directory's data when the revision is ""), then `python -m mulcon prepare`.

    `data` holds `data/<dataset>` (raw), `prepared/<dataset>` (manifests) and `params.yaml`: the
    params file with the overrides, the dataset and the epochs applied and the paths pointing here,
    which every later step reads. Metadata: data_version (the md5 of `data.dvc`), revision, counts.
    """
    import json
    import os

    import yaml

    from components.data import fetch_dataset
    from mulcon.config import load_config, to_dict
    from mulcon.launch import launch

    settings = [*overrides, f"data.dataset={dataset}", f"train.pretrain_epochs={pretrain_epochs}",
                f"train.finetune_epochs={finetune_epochs}"]
    source = load_config(params_file, settings).data
    version = fetch_dataset(f"{source.root}/{dataset}", os.path.join(data.path, "data", dataset), repo_url=repo_url,
                            revision=data_revision, remote=dvc_remote)
    paths = [f"data.root={data.path}/data", f"data.prepared_root={data.path}/prepared"]
    params = os.path.join(data.path, "params.yaml")
    with open(params, "w") as handle:
        yaml.safe_dump(to_dict(load_config(params_file, [*settings, *paths])), handle, sort_keys=False)
    launch(["prepare", "--params", params])
    with open(os.path.join(data.path, "prepared", dataset, "info.json")) as handle:
        counts = json.load(handle)["counts"]
    data.metadata.update(data_version=version, revision=data_revision or "working tree", dataset=dataset, **counts)
