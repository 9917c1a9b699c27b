"""`python -m pipeline {compile,submit,schedule,run-local}`: the Kubeflow pipeline from the shell.

    python -m pipeline compile -o mulcon-pipeline.yaml --image registry.example/mulcon:3f2a1c9
    python -m pipeline submit --host https://kfp.example --image registry.example/mulcon:3f2a1c9 \
        -p data_revision=v1.2 -p repo_url=https://git.example/team/mulcon.git -p gpus=4
    python -m pipeline schedule --host https://kfp.example --package mulcon-pipeline.yaml \
        -p data_revision=main -p repo_url=https://git.example/team/mulcon.git --cron "0 0 3 * * *"
    python -m pipeline run-local --tiny
    python -m pipeline run-local --tiny --runner docker --image localhost/mulcon:TAG \
        -p data_revision=v1.2 -p repo_url=git://127.0.0.1/mulcon

compile, and submit and schedule when they compile (no --package), need the project image:
--image or $MULCON_IMAGE. submit and schedule need a data version (-p data_revision, -p repo_url)
and read a bearer token from the environment variable named by --token-env (default KFP_TOKEN;
none for a port-forwarded API). run-local runs every component in this
interpreter (kfp.local.SubprocessRunner(use_venv=False)) on the working directory's data, with
MLflow at $MLFLOW_TRACKING_URI (default sqlite:///mlflow.db), outputs under --pipeline-root.
With --runner docker every task runs in the project image instead (kfp.local.DockerRunner,
pipeline.containers), on the data of a data revision, against an MLflow tracking server.

Every mistake and every failure of the API prints one line and exits 2, and is found before
anything is sent (pipeline.checks, pipeline.connection).
"""

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

from mulcon.config import TINY as TINY_TRAINING, TINY_DEMO
from mulcon.errors import MulconError
from pipeline.checks import (PipelineError, output_file, parse_arguments, pipeline_inputs, read_package,
                             require_cluster_arguments)
from pipeline.connection import DEFAULT_TIMEOUT, api_errors, check_host, connect

ROOT = Path(__file__).resolve().parents[1]
# --tiny: the demo pipeline shrunk to seconds per step (mulcon.config.TINY, as the tests run it).
TINY = [*TINY_TRAINING, *TINY_DEMO]
LOCAL_IMAGE = "mulcon:local"  # what run-local's tasks name; the subprocess runner runs this interpreter instead


def _image(args: argparse.Namespace) -> str:
    """The project image the compiled tasks run: --image, else $MULCON_IMAGE.

    Raises:
        PipelineError: neither given.
    """
    from components import IMAGE_ENV

    image = (args.image or os.environ.get(IMAGE_ENV, "")).strip()
    if not image:
        raise PipelineError(f"give --image (or set {IMAGE_ENV}): the project image the cluster pulls, as `make image` "
                            "tags it and you push it, e.g. --image registry.example/mulcon:3f2a1c9")
    return image


def _compile(args: argparse.Namespace, output: str | Path) -> Path:
    """Compile the pipeline into `output`, written whole or not at all."""
    from kfp import compiler

    from mulcon.io import write_text
    from pipeline.pipeline import build_pipeline

    image = _image(args)
    with tempfile.TemporaryDirectory() as folder:
        compiled = os.path.join(folder, "mulcon-pipeline.yaml")
        compiler.Compiler().compile(build_pipeline(image, args.parallelism, args.multinode), compiled)
        write_text(output, Path(compiled).read_text(encoding="utf-8"))
    return Path(output)


def compile_command(args: argparse.Namespace) -> None:
    print(_compile(args, output_file(args.output)))


@contextlib.contextmanager
def _kubeflow(args: argparse.Namespace) -> Iterator[tuple]:
    """(client, package, arguments) for submit and schedule, after every check: the host, the
    package (--package, or compiled now), the arguments against its inputs, then the endpoint.
    An error answer of the API inside the block becomes one line (a PipelineError)."""
    if not args.host:
        raise PipelineError("give --host (or set KF_PIPELINES_ENDPOINT), e.g. --host http://localhost:8080")
    host = check_host(args.host)
    if args.package and args.image:
        raise PipelineError(f"--image {args.image} with --package: the package names its image already; compile it "
                            "again with --image, or leave --package out to compile one now")
    with tempfile.TemporaryDirectory() as folder:
        package = args.package or _compile(args, os.path.join(folder, "mulcon-pipeline.yaml"))
        inputs = pipeline_inputs(read_package(package))
        arguments = parse_arguments(args.param, inputs, args.multinode)
        require_cluster_arguments(arguments, inputs)
        token = os.environ.get(args.token_env) or None
        client = connect(host, args.namespace, args.token_env, token, args.timeout)
        with api_errors(host, args.token_env, token, args.timeout):
            yield client, str(package), arguments


def submit_command(args: argparse.Namespace) -> None:
    with _kubeflow(args) as (client, package, arguments):
        result = client.create_run_from_pipeline_package(
            package, arguments=arguments, run_name=args.run_name, experiment_name=args.experiment,
            namespace=args.namespace)
    print(f"run {result.run_id}")


def schedule_command(args: argparse.Namespace) -> None:
    if len(args.cron.split()) != 6:
        raise PipelineError(f"--cron {args.cron!r}: Kubeflow wants 6 fields, seconds first "
                            "(second minute hour day-of-month month day-of-week), e.g. '0 0 3 * * *'")
    with _kubeflow(args) as (client, package, arguments):
        experiment = client.create_experiment(args.experiment, namespace=args.namespace)  # gets it when it exists
        job = client.create_recurring_run(
            experiment.experiment_id, args.name, cron_expression=args.cron, pipeline_package_path=package,
            params=arguments, max_concurrency=1, no_catchup=True, enable_caching=False)
    print(f"recurring run {job.recurring_run_id} ({args.cron})")


def run_local_command(args: argparse.Namespace) -> None:
    from google.protobuf import json_format
    from kfp import local

    from mulcon.config import load_config
    from mulcon.data.demo import make_demo
    from pipeline.pipeline import build_pipeline

    if args.runner != "docker" and (args.image or args.user):
        raise PipelineError("--image and --user are for --runner docker: the subprocess runner runs every task here")
    overrides = [*(TINY if args.tiny else []), *args.overrides]
    config = load_config(args.params, overrides)
    # kfp.local mounts no volume claim: the volumes are folders of the pipeline root (which the docker
    # runner mounts, at the same path, in every task's container).
    volumes = Path(args.pipeline_root).resolve() / "volumes"
    image, environment = LOCAL_IMAGE, None
    if args.runner == "docker":
        from components import IMAGE
        from pipeline.containers import docker_client, forwarded_environment, local_image

        environment = forwarded_environment()
        image = local_image(docker_client(), args.image or IMAGE)
    mulcon_pipeline = build_pipeline(image, parallelism=args.parallelism, params=args.params,
                                     data_root=str(volumes / "data"), checkpoint_root=str(volumes / "checkpoints"))
    given = parse_arguments(args.param, pipeline_inputs(json_format.MessageToDict(mulcon_pipeline.pipeline_spec)))
    if args.runner == "docker":
        from pipeline.containers import check_data_source, docker_runner, image_params, shared_root

        check_data_source(given)
        params_file = image_params(args.params)
        runner, pipeline_root = docker_runner(environment, args.user), shared_root(args.pipeline_root)
    else:
        raw = config.data.raw_dir
        if config.data.dataset == "demo" and not raw.is_dir():
            make_demo(raw, num_train=config.demo.num_train, num_val=config.demo.num_val,
                      image_size=config.demo.image_size, seed=config.demo.seed)
        # The components' subprocesses import `components` and `mulcon` from this checkout, from any directory.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        runner, pipeline_root = local.SubprocessRunner(use_venv=False), args.pipeline_root
        params_file = str(Path(args.params).resolve())
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # the project image runs this Python
    local.init(runner=runner, pipeline_root=pipeline_root)
    arguments = {"dataset": config.data.dataset, "pretrain_epochs": config.train.pretrain_epochs,
                 "finetune_epochs": config.train.finetune_epochs, "gpus": 1, "params_file": params_file,
                 "overrides": overrides, **given}
    mulcon_pipeline(**arguments)
    if args.runner == "docker":
        from pipeline.containers import check_outputs

        tables = [check_outputs(pipeline_root)]
    else:
        tables = sorted(Path(pipeline_root).glob("mulcon-*/report/ablation"), key=os.path.getmtime)
    if tables:
        print(tables[-1].read_text(), end="")


def seconds(text: str) -> float:
    """A --timeout: a number of seconds above 0 (argparse reports anything else)."""
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    compiling = commands.add_parser("compile", help="write the pipeline YAML")
    compiling.add_argument("-o", "--output", default="mulcon-pipeline.yaml")
    for sub, help_text in (("submit", "start a run on a Kubeflow Pipelines cluster"),
                           ("schedule", "create a recurring run (scheduled retraining)")):
        command = commands.add_parser(sub, help=help_text, description=help_text)
        command.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"),
                             help="the Kubeflow Pipelines API (default: $KF_PIPELINES_ENDPOINT)")
        command.add_argument("--token-env", default="KFP_TOKEN", help="environment variable holding the bearer token")
        command.add_argument("--namespace", default="kubeflow", help="the profile namespace of a multi-user cluster")
        command.add_argument("--experiment", default="mulcon")
        command.add_argument("--package", help="a compiled pipeline YAML (default: compile now)")
        command.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT,
                             help=f"seconds to wait for each answer of the API (default: {DEFAULT_TIMEOUT:g})")
        command.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                             help="a pipeline argument, e.g. -p data_revision=v1.2 -p gpus=4 (repeatable)")
        if sub == "submit":
            command.add_argument("--run-name")
        else:
            command.add_argument("--cron", required=True, help="6 fields, seconds first, e.g. '0 0 3 * * *' (03:00 daily)")
            command.add_argument("--name", default="mulcon-retraining", help="the recurring run's name")
    for command in (compiling, commands.choices["submit"], commands.choices["schedule"]):
        command.add_argument("--image", help="the project image, e.g. registry.example/mulcon:3f2a1c9 (default: "
                             "$MULCON_IMAGE; one of them is needed to compile)")
        command.add_argument("--parallelism", type=int, default=4, help="ablation variants trained at once")
        command.add_argument("--multinode", action="store_true",
                             help="train MulCon with a PyTorchJob (pipeline arguments nodes, workspace_pvc)")
    local_run = commands.add_parser("run-local", help="run the whole pipeline here with kfp.local (no cluster)")
    local_run.add_argument("--params", default="params.yaml")
    local_run.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a param, as for python -m mulcon (repeatable)")
    local_run.add_argument("--tiny", action="store_true", help="shrink to seconds per step (32 px, 1 + 1 epochs)")
    local_run.add_argument("--pipeline-root", default="kfp-local", help="where task outputs go (default: kfp-local)")
    local_run.add_argument("--parallelism", type=int, default=1,
                           help="ablation variants at once (default 1: SQLite takes one writer; more with a tracking server)")
    local_run.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                           help="a pipeline argument, e.g. -p promote_margin=1 (repeatable)")
    local_run.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                           help="subprocess: every task in this interpreter (default); docker: in the project "
                                "image through the Docker API at $DOCKER_HOST (docker, or podman system service)")
    local_run.add_argument("--image", help="with --runner docker: the project image (default: $MULCON_IMAGE or "
                                           "components.IMAGE), e.g. the tag make image printed")
    local_run.add_argument("--user", help="with --runner docker: UID[:GID] the tasks run as (default: the image's, 1000)")
    return parser


COMMANDS = {"compile": compile_command, "submit": submit_command, "schedule": schedule_command,
            "run-local": run_local_command}


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input, or an API that cannot take the request, prints one line and gives 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        COMMANDS[args.command](args)
    except MulconError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
