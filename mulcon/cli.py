"""Command line: `python -m mulcon {make-demo,prepare,train,evaluate,report,analyze,predict,promote,export,study} --params params.yaml [-S key=value ...]`.

DVC stages and Kubeflow components call these same verbs. Bad input (a mistyped key, a missing
dataset, a corrupt annotation file) prints one line naming the file, line or key, and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mulcon.config import VARIANTS, Config, load_config
from mulcon.errors import ConfigError, MulconError, redact
from mulcon.mlflow_client import redact_logs

logger = logging.getLogger("mulcon")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -S train.pretrain_epochs=3 (repeatable)")


def make_demo(config: Config, args: argparse.Namespace) -> None:
    from mulcon.data.demo import make_demo as generate

    out_dir = Path(args.out or Path(config.data.root) / "demo")
    summary = generate(out_dir, num_train=config.demo.num_train, num_val=config.demo.num_val,
                       image_size=config.demo.image_size, seed=config.demo.seed)
    logger.info("demo dataset in %s: %s", out_dir, json.dumps(summary.get("counts", summary), default=str))


def prepare(config: Config, args: argparse.Namespace) -> None:
    from mulcon.data.preparation import prepare as run

    report = run(config.data.dataset, config.data.raw_dir, config.data.prepared_dir,
                 val_fraction=config.data.val_fraction, seed=config.data.split_seed,
                 test_fraction=config.data.test_fraction)
    logger.info("prepared %s in %s: %s", config.data.dataset, config.data.prepared_dir,
                json.dumps(report.get("counts", {})))
    if config.data.cache:
        from mulcon.data.cache import build_cache

        build_cache(config.data.prepared_dir, config.data.image_size)


def train(config: Config, args: argparse.Namespace) -> None:
    from mulcon.train import run_training

    stages = None if args.stage == "all" else (args.stage,)

    def run(callback=None) -> Path:
        return run_training(config, out_dir=args.out_dir, checkpoint_dir=args.checkpoint_dir, stages=stages,
                            resume=args.resume, callback=callback)

    if config.tracking.enabled:
        from mulcon.tracking import track_training

        path = track_training(config, args.stage, run)
    else:
        path = run()
    logger.info("model: %s", path)


def evaluate(config: Config, args: argparse.Namespace) -> None:
    from mulcon.evaluate import evaluate_model, format_table

    variant = config.train.variant
    model_path = args.model or Path(config.train.out_root) / variant / "model.pt"
    out_dir = Path(args.out_dir or Path(config.evaluate.out_root) / variant)
    metrics = evaluate_model(config, model_path, out_dir)
    if config.tracking.enabled:
        from mulcon.tracking import track_evaluation

        track_evaluation(config, metrics, sorted(out_dir.iterdir()))
    print(f"{variant} on {config.data.dataset}/{metrics['split']} ({metrics['num_images']} images, "
          f"model selected on: {metrics['selected_on']})")
    print(format_table(metrics))


def report(config: Config, args: argparse.Namespace) -> None:
    from mulcon.report import aggregate_metrics, write_report

    files = write_report(config.evaluate.out_root, config.data.dataset, seeds=[config.train.seed, *config.train.seeds])
    if config.tracking.enabled:
        from mulcon.tracking import track_report

        track_report(config, files, aggregate_metrics(Path(config.evaluate.out_root) / "ablation.csv"))
    print(files[0].read_text(), end="")


def analyze(config: Config, args: argparse.Namespace) -> None:
    from mulcon.analysis import run_analysis

    runs = Path(config.train.out_root)
    models = {"BCE only": args.bce_model or runs / "mulcon_bce" / "model.pt",
              "MulCon": args.model or runs / "mulcon" / "model.pt"}
    for name, model in models.items():
        if not Path(model).is_file() and ":/" in str(model):  # a registered model: loaded without pickles
            from mulcon.serving import load_network

            models[name] = load_network(str(model)).network
        else:
            models[name] = Path(model)
    out_dir = Path(args.out_dir or Path(config.evaluate.out_root) / "analysis")
    metrics = run_analysis(config, models, out_dir)
    if config.tracking.enabled:
        from mulcon.tracking import track_analysis

        track_analysis(config, metrics, sorted(out_dir.iterdir()))
    print(json.dumps(metrics, indent=2))


def predict(config: Config, args: argparse.Namespace) -> None:
    model = args.model or Path(config.train.out_root) / config.train.variant / "model.pt"
    threshold = config.evaluate.threshold if args.threshold is None else args.threshold  # a number or "calibrated"
    if threshold != "calibrated" and not 0.0 <= float(threshold) <= 1.0:  # refused before anything loads
        raise ConfigError(f"--threshold {threshold:g}: expected a probability in [0, 1] or 'calibrated'")
    from mulcon.serving import ImageClassifier, load_scorer

    answers = ImageClassifier(load_scorer(model), local=True).predict(args.images, {"threshold": threshold})
    if args.json:
        print(json.dumps([{"image": image, "labels": row.labels, "scores": row.scores}
                          for image, row in zip(args.images, answers.itertuples())], indent=2))
        return
    for image, row in zip(args.images, answers.itertuples()):
        print(image)
        for label, score in zip(row.labels, row.scores):
            print(f"  {label:<20} {score:.3f}")
        if not row.labels:
            print(f"  (no label scores >= {'its calibrated threshold' if threshold == 'calibrated' else threshold})")


def promote(config: Config, args: argparse.Namespace) -> None:
    from mulcon.mlflow_client import tracking_errors
    from mulcon.registry import promote_trained

    with tracking_errors("promotion"):
        decision = promote_trained(config, args.margin)
    print(json.dumps(decision, indent=2))


def export(config: Config, args: argparse.Namespace) -> None:
    from mulcon.export import export_onnx, register_onnx

    model = args.model or Path(config.train.out_root) / config.train.variant / "model.pt"
    result = export_onnx(model, args.out, images=args.images)
    print(f"wrote {result['path']}: {len(result['classes'])} labels at {result['image_size']} px, dynamic batch; "
          f"onnxruntime vs PyTorch on {result['checked_images']} images: largest |difference| "
          f"{result['max_abs_difference']:.2e} (limit 1e-04)")
    if args.register:
        from mulcon.mlflow_client import tracking_errors

        with tracking_errors("registration"):
            registered = register_onnx(str(model), result["path"])
        print(f"attached to {registered['model']} version {registered['version']}: {registered['onnx']}")


def study(config: Config, args: argparse.Namespace) -> None:
    from mulcon.study import run_study

    variants = tuple(args.variant) if args.variant else VARIANTS
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"--variant {unknown[0]}: not one of {', '.join(VARIANTS)}")
    chosen = run_study(args.params, args.overrides, args.out, args.work, variants=variants, phase=args.phase)
    if args.phase == "status":
        print((Path(args.out) / "val_grid.md").read_text(), end="")
        return
    for variant, record in chosen.items():
        print(f"{variant}: {record['trial']} (val mAP {record['val_mAP']:.1f})")
    print(f"tables in {args.out}")


COMMANDS = {
    "make-demo": (make_demo, "generate the demo dataset (COCO format) under <data.root>/demo"),
    "prepare": (prepare, "read the raw dataset, check images, write manifests to <data.prepared_root>/<dataset>"),
    "train": (train, "train train.variant (both steps of its plan, or one with --stage)"),
    "evaluate": (evaluate, "score a model on evaluate.split and write metrics, per-class AP and PR curves"),
    "report": (report, "the ablation table (Table 3) and Tables 1-2 from the variants' metrics"),
    "predict": (predict, "label names and scores of images, from a model file or an MLflow model URI"),
    "analyze": (analyze, "t-SNE, retrieval and attention figures and retrieval precision@k (section 4.4)"),
    "promote": (promote, "make the registered model of train.variant challenger, and champion when its val mAP "
                         "beats the champion's by --margin points"),
    "export": (export, "write the model as ONNX (images -> probabilities, dynamic batch), checked with onnxruntime"),
    "study": (study, "the demo study: each variant's setting chosen on val (same trial budget), then tested "
                     "over 3 seeds; resumes from the trial records in --out"),
}


def _threshold(text: str) -> float | str:
    if text == "calibrated":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'calibrated', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mulcon", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _common(sub)
        if name == "make-demo":
            sub.add_argument("--out", help="output folder (default: <data.root>/demo)")
        if name == "train":
            sub.add_argument("--stage", choices=("all", "pretrain", "finetune"), default="all",
                             help="run one stage of the variant's plan (default: all)")
            sub.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
            sub.add_argument("--out-dir", help="default: <train.out_root>/<train.variant>")
            sub.add_argument("--checkpoint-dir", help="default: <train.checkpoint_root>/<train.variant>")
        if name == "predict":
            sub.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG/PNG files")
            sub.add_argument("--model", help="model.pt or MLflow URI such as models:/mulcon-demo@champion "
                                             "(default: <train.out_root>/<train.variant>/model.pt)")
            sub.add_argument("--threshold", type=_threshold,
                             help="a probability, or 'calibrated' for the per-class thresholds chosen on val "
                                  "and saved with the model (default: evaluate.threshold)")
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "analyze":
            sub.add_argument("--model", help="MulCon model (default: <train.out_root>/mulcon/model.pt)")
            sub.add_argument("--bce-model", help="BCE-only model (default: <train.out_root>/mulcon_bce/model.pt)")
            sub.add_argument("--out-dir", help="default: <evaluate.out_root>/analysis")
        if name == "promote":
            sub.add_argument("--margin", type=float, default=0.0, help="val mAP points a new model must gain")
        if name == "export":
            sub.add_argument("--model", help="model.pt or MLflow URI such as models:/mulcon-demo/1 "
                                             "(default: <train.out_root>/<train.variant>/model.pt)")
            sub.add_argument("--format", choices=("onnx",), default="onnx", help="only onnx")
            sub.add_argument("--out", default="model.onnx", help="output file (default: model.onnx)")
            sub.add_argument("--images", nargs="+", metavar="IMAGE",
                             help="image files to check on (default: seeded noise batches of 1 and 3)")
            sub.add_argument("--register", action="store_true",
                             help="attach the file to the registered version --model names (models:/name/version)")
        if name == "study":
            sub.add_argument("--out", default="docs/study", help="records and tables (default: docs/study)")
            sub.add_argument("--work", default="study", help="the trials' models and checkpoints (default: study)")
            sub.add_argument("--variant", action="append", help="study only this variant (repeatable; default: all)")
            sub.add_argument("--phase", choices=("select", "all", "status"), default="all",
                             help="select: the val trials and the choice only; all: then the 3-seed test; "
                                  "status: the grid of the trials recorded so far, training nothing")
        if name == "evaluate":
            sub.add_argument("--model", help="model file (default: <train.out_root>/<train.variant>/model.pt)")
            sub.add_argument("--out-dir", help="default: <evaluate.out_root>/<train.variant>")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    redact_logs()  # and again once MLflow, which has its own handler, is imported (mlflow_client.connect)
    try:
        config = load_config(args.params, args.overrides)
        COMMANDS[args.command][0](config, args)
    except MulconError as error:
        print(f"error: {redact(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    return 0
