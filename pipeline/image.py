"""`python -m pipeline.image {build,base}`: the project image, built with docker or podman.

    python -m pipeline.image build                  # on PyTorch's CUDA image (the clusters' image)
    python -m pipeline.image build --base local     # on a Debian 12 base built here (no registry needed)
    python -m pipeline.image base                   # only that Debian base (make base-image)

`make image` and `make base-image` call these. The engine is docker, else podman: the first whose
`info` answers. Every wheel comes from a wheelhouse that `pip download` fills on this host with
this host's pip settings (index, find-links, constraints), so the build itself runs with
`--network none`. The wheelhouse, the base's root file system and the image are each keyed by a
hash of what goes into them: the wheelhouse lives under $MULCON_CACHE (default ~/.cache/mulcon),
the images are tagged `localhost/mulcon-base:bookworm-<hash>` and `localhost/mulcon:<hash>`, and
a build whose inputs did not change reuses them. Every failure prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from mulcon.errors import MulconError

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MULCON_CACHE", Path.home() / ".cache" / "mulcon"))
ENGINES = ("docker", "podman")  # the first that answers builds
# The local base: Debian 12 with Python 3.11, venv, pip and git (DVC clones the repository).
BASE_PACKAGES = "python3,python3-venv,python3-pip,git,ca-certificates"
BASE_SUITE = "bookworm"
# What reaches the build (beside the Dockerfile and .dockerignore): the image's tag hashes these.
BUILD_INPUTS = ("pyproject.toml", "README.md", "mulcon", "params.yaml", "data.dvc", "configs", "components", "pipeline")


class ImageError(MulconError):
    """The image cannot be built: no engine, or a step failed."""


def _run(command: list[str], what: str, **options) -> subprocess.CompletedProcess:
    """Run `command`; its failure is an ImageError naming `what` and the last line it printed."""
    result = subprocess.run(command, text=True, capture_output=True, **options)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
        raise ImageError(f"{what} failed ({' '.join(command[:3])} ... exited {result.returncode}): {lines[-1]}")
    return result


def find_engine() -> str:
    """docker or podman, the first whose `info` answers (a daemon, or podman's own storage)."""
    for name in ENGINES:
        if shutil.which(name) is None:
            continue
        try:
            if subprocess.run([name, "info"], capture_output=True, timeout=60).returncode == 0:
                return name
        except subprocess.TimeoutExpired:
            continue
    raise ImageError("neither docker nor podman answers here (`docker info`, `podman info`): install one "
                     "(.ci/run installs podman) or start the Docker daemon")


def image_exists(engine: str, name: str) -> bool:
    return subprocess.run([engine, "image", "inspect", name], capture_output=True).returncode == 0


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def _files(paths: tuple[str, ...]) -> list[Path]:
    """The files under `paths` that git tracks or would track (not ignored), sorted."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *paths],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:
        names = set(listed.stdout.split())
    else:  # no git checkout (an exported tree): every file but byte code
        names = {str(path.relative_to(ROOT)) for name in paths for path in
                 ([ROOT / name] if (ROOT / name).is_file() else (ROOT / name).rglob("*")) if path.is_file()}
    return [ROOT / name for name in sorted(names) if (ROOT / name).is_file() and "__pycache__" not in name]


def wheelhouse() -> Path:
    """A folder holding the wheel of every dependency of pyproject.toml and of its build backend,
    as this host's pip resolves them (its index, find-links and constraints): filled once per
    pyproject.toml and pip configuration, then reused."""
    settings = _run([sys.executable, "-m", "pip", "config", "list"], "pip config list").stdout
    constraints = [Path(line.split("=", 1)[1].strip("'\"")) for line in settings.splitlines()
                   if line.split("=", 1)[0].endswith(".constraint")]
    key = _digest((ROOT / "pyproject.toml").read_bytes(), settings.encode(),
                  *(path.read_bytes() for path in constraints if path.is_file()))[:16]
    folder = CACHE / f"wheels-{key}"
    if folder.is_dir():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    import tomllib

    build_requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    partial = tempfile.mkdtemp(dir=CACHE, prefix="partial-wheels-")
    try:
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", partial, str(ROOT), *build_requirements],
             "pip download of the wheelhouse")
        os.rename(partial, folder)  # whole or not at all
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def base_image(engine: str) -> str:
    """`localhost/mulcon-base:bookworm-<hash>`: Debian 12 with BASE_PACKAGES, written by mmdebstrap
    and imported into `engine`; built once, then reused."""
    name = f"localhost/mulcon-base:{BASE_SUITE}-{_digest(BASE_SUITE.encode(), BASE_PACKAGES.encode())[:12]}"
    if image_exists(engine, name):
        return name
    if shutil.which("mmdebstrap") is None:
        raise ImageError("mmdebstrap is not installed: the local base is built with it (apt-get install mmdebstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="base-") as folder:
        rootfs = os.path.join(folder, "rootfs.tar")
        _run(["mmdebstrap", "--quiet", "--variant=apt", f"--include={BASE_PACKAGES}", BASE_SUITE, rootfs],
             "mmdebstrap of the Debian base")
        _run([engine, "import", rootfs, name], f"{engine} import of the Debian base")
    return name


def image_tag(base: str) -> str:
    """`localhost/mulcon:<hash>` of the base, the Dockerfile, .dockerignore and the BUILD_INPUTS."""
    files = _files(BUILD_INPUTS)
    parts = [base.encode(), (ROOT / "Dockerfile").read_bytes(), (ROOT / ".dockerignore").read_bytes()]
    for path in files:
        parts += [str(path.relative_to(ROOT)).encode(), path.read_bytes()]
    return f"localhost/mulcon:{_digest(*parts)[:16]}"


# podman (buildah) keys a COPY layer by a tar of the files, their times included: a fresh clone
# would rebuild the dependency layer. The build context is a copy with the same time on every file.
FIXED_TIME = 946684800  # 2000-01-01


@contextlib.contextmanager
def _build_context() -> Iterator[Path]:
    """A copy of the Dockerfile, .dockerignore and BUILD_INPUTS, every file and folder dated FIXED_TIME."""
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="context-") as folder:
        context = Path(folder)
        for path in [ROOT / "Dockerfile", ROOT / ".dockerignore", *_files(BUILD_INPUTS)]:
            target = context / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            target.chmod(0o755 if os.access(path, os.X_OK) else 0o644)
        for path in sorted(context.rglob("*"), key=lambda item: len(item.parts), reverse=True):
            if path.is_dir():
                path.chmod(0o755)
            os.utime(path, (FIXED_TIME, FIXED_TIME))
        yield context


def _git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


@contextlib.contextmanager
def _exclusive() -> Iterator[None]:
    """One build at a time on this machine (two pytest workers, two checkouts): the others wait."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_image(base: str = "cuda", tags: tuple[str, ...] = (), engine: str | None = None) -> str:
    """Build the project image (or reuse the one of the same inputs) and return its hash tag.

    Args:
        base: "cuda" (the Dockerfile's default, PyTorch's CUDA image), "local" (base_image) or an image name.
        tags: further names for the image, e.g. ("mulcon:0.1.0",).
        engine: docker or podman; default: find_engine().
    Raises:
        ImageError: no engine, or a step of the build failed.
    """
    engine = engine or find_engine()
    with _exclusive():
        return _build(engine, base, tags)


def _build(engine: str, base: str, tags: tuple[str, ...]) -> str:
    base_name = {"cuda": "", "local": None}.get(base, base)
    if base_name is None:
        base_name = base_image(engine)
    tag = image_tag(base_name or "cuda")
    if not image_exists(engine, tag):
        command = [engine, "build", "--network", "none", "--build-context", f"wheels={wheelhouse()}",
                   "--build-arg", f"GIT_COMMIT={_git_commit()}", "--tag", tag]
        if base_name:
            command += ["--build-arg", f"BASE_IMAGE={base_name}"]
        with _build_context() as context:
            # The build's own output is what a person waits on: it goes to the terminal (stderr).
            built = subprocess.run([*command, str(context)], stdout=sys.stderr, env={**os.environ, "DOCKER_BUILDKIT": "1"})
        if built.returncode != 0:
            raise ImageError(f"{engine} build of {tag} failed (its output is above)")
    for name in tags:
        _run([engine, "tag", tag, name], f"{engine} tag {name}")
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.image", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    building = commands.add_parser("build", help="build the project image (reused when its inputs are unchanged)")
    building.add_argument("--base", default="cuda",
                          help="cuda (PyTorch's CUDA image, default), local (the Debian base of `base`) or an image")
    building.add_argument("--tag", action="append", default=[], help="a further name for the image (repeatable)")
    commands.add_parser("base", help="build the local Debian 12 base image with mmdebstrap")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build_image(args.base, tuple(args.tag)))
        else:
            with _exclusive():
                print(base_image(find_engine()))
    except MulconError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
