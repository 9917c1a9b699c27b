"""What a PyTorchJob pod runs first: `python -m components.entrypoint COMMAND ...`.

It checks that every required key of the secrets (`components.SECRETS`) is set and not empty, then
runs COMMAND in its place. A pod without MLFLOW_TRACKING_URI would otherwise train and log to
`sqlite:///mlflow.db` inside itself, and the run's metrics would vanish with the pod; here it
fails at start with one line. (The pod spec also marks those keys `optional: false`, so Kubernetes
refuses to start a pod whose secret lacks one; this check covers a key that is there but empty.)
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

from components import SECRETS


def missing_keys(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(secret, key) of each required key that `environ` lacks or holds empty."""
    return [(secret, key) for secret, (required, _) in SECRETS.items() for key in required if not environ.get(key)]


def main(argv: list[str] | None = None) -> int:
    """Check the environment, then exec `argv` (returns only on an error: 2, one line on stderr)."""
    argv = sys.argv[1:] if argv is None else argv
    missing = missing_keys(os.environ)
    if missing:
        names = ", ".join(f"{key} (secret {secret})" for secret, key in missing)
        print(f"error: {names} not set in this pod; create the secret with that key in the job's namespace "
              "(README, What a cluster run needs)", file=sys.stderr)
        return 2
    if not argv:
        print("error: no command to run: python -m components.entrypoint COMMAND ...", file=sys.stderr)
        return 2
    os.execvp(argv[0], argv)
    return 2  # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(main())
