"""The credentials of a private `repo_url`, for DVC and git, from the optional secret `mulcon-git`.

Its keys MULCON_GIT_USERNAME and MULCON_GIT_PASSWORD (a token, for most hosts) reach git and DVC's
own git client (scmrepo) through GIT_ASKPASS: a small program that answers the "Username for ..."
and "Password for ..." prompts of an HTTPS remote from those variables. The credentials never go
into a URL, a pipeline parameter, a command line or a log line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from components import GIT_SECRET

USERNAME, PASSWORD = GIT_SECRET[1]
DEFAULT_USERNAME = "git"  # hosts that take a token as the password accept any user name; GitLab wants oauth2
# The program git runs with the prompt as its argument; it holds no credential, it reads them.
ASKPASS = """#!{python}
import os
import sys

prompt = sys.argv[1].lower() if len(sys.argv) > 1 else ""
print(os.environ.get({username!r}) or {default!r} if prompt.startswith("username") else os.environ.get({password!r}, ""))
"""


@contextlib.contextmanager
def git_credentials() -> Iterator[None]:
    """Inside the block, git and DVC answer a remote's credential prompts from the mulcon-git keys.

    Without MULCON_GIT_PASSWORD in the environment (no secret, or a public repository) nothing
    changes. Prompts on the terminal are off inside the block: a refused credential fails at once.
    """
    if not os.environ.get(PASSWORD):
        yield
        return
    from scmrepo.git.credentials import memory_helper

    saved = {name: os.environ.get(name) for name in ("GIT_ASKPASS", "GIT_TERMINAL_PROMPT")}
    with tempfile.TemporaryDirectory(prefix="mulcon-git-") as folder:
        program = Path(folder) / "askpass"
        program.write_text(ASKPASS.format(python=sys.executable, username=USERNAME, password=PASSWORD,
                                          default=DEFAULT_USERNAME))
        program.chmod(0o700)
        os.environ.update(GIT_ASKPASS=str(program), GIT_TERMINAL_PROMPT="0")
        memory_helper.__dict__.pop("askpass", None)  # scmrepo reads GIT_ASKPASS once, at its first prompt
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            memory_helper.__dict__.pop("askpass", None)
