"""The launcher the Kubeflow components call: `python -m mulcon ...` in this process or under torchrun.

It sits at the top of the library, beside the CLI it runs; nothing in the library imports it.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Sequence

from mulcon.cli import main


def launch(argv: Sequence[str], processes: int = 1) -> None:
    """Run `python -m mulcon *argv`: in this process, or under torchrun with `processes` processes
    on this node (one per GPU).

    Raises:
        RuntimeError: the command failed (its message is on stderr).
    """
    if processes <= 1:
        code = main(list(argv))
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", "-m", "mulcon", *argv]
        code = subprocess.run(command, check=False).returncode
    if code != 0:
        raise RuntimeError(f"python -m mulcon {' '.join(argv)} failed with exit status {code}")
