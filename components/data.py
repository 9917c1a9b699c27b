"""The raw dataset of one data version, as the prepare component fetches it.

A data version is a git revision of this repository: its `data.dvc` names the content of the raw
data folder, and its DVC remote (the default one, or `remote`) holds that content. `fetch_dataset`
downloads exactly those files with DVC (S3 remotes through boto3, credentials from the usual AWS_*
variables) and returns the md5 `data.dvc` records, the `data_version` tag of the MLflow runs.
An empty revision takes the working directory's data instead (local runs on the generated demo).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mulcon.errors import redact
from mulcon.io import dvc_file_md5

WORKING_TREE = ""  # the revision that means "the data folder of the working directory"


def fetch_dataset(path: str, out_dir: str | Path, *, repo_url: str = "", revision: str = WORKING_TREE,
                  remote: str = "") -> str:
    """Put the raw dataset at `path` (e.g. "data/demo") of the data version into `out_dir`.

    Args:
        path: the dataset folder, relative to the repository root.
        out_dir: where its files go (created; must not exist).
        repo_url: a git URL (or local path) of this repository; needed with a revision.
        revision: a git revision (commit, tag, branch), or "" for the working directory.
        remote: the DVC remote to download from; "" for the revision's default remote.
    Returns:
        The md5 of the raw data folder that `data.dvc` records ("untracked" without one).
    Raises:
        FileNotFoundError: no dataset at `path` in the working directory.
        ValueError: a revision without a repository URL.
        RuntimeError: DVC or git could not fetch it (the message has passwords and tokens redacted).
    """
    out_dir = Path(out_dir)
    if revision == WORKING_TREE:
        source = Path(path)
        if not source.is_dir():
            raise FileNotFoundError(f"{source.resolve()}: no dataset in the working directory; generate it "
                                    "(python -m mulcon make-demo) or give a data revision and the repository URL")
        shutil.copytree(source, out_dir)
        dvc_file = Path("data.dvc")
        return dvc_file_md5(dvc_file.read_text()) if dvc_file.exists() else "untracked"
    if not repo_url:
        raise ValueError(f"data revision {revision!r} needs the repository URL to fetch it from")
    import dvc.api
    from dvc.repo import Repo

    try:
        Repo.get(repo_url, path, out=str(out_dir), rev=revision, remote=remote or None)
        return dvc_file_md5(dvc.api.read("data.dvc", repo=repo_url, rev=revision))
    except Exception as error:  # DVC's and git's errors quote the URL, credentials included
        raise RuntimeError(f"fetching {path} at {revision!r} of {redact(repo_url)}: "
                           f"{type(error).__name__}: {redact(error)}") from None
