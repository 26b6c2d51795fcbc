"""Command line: `fastdino train | demo | knn | profile`. Bad input ends with one clear line, not a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from fastdino.config import load_config
from fastdino.engine.checkpoint import CheckpointError
from fastdino.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _train(args: argparse.Namespace) -> int:
    from fastdino.engine.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    print(f"trained {result.steps_done} iterations; last loss {result.last_loss:.4f}; "
          f"checkpoint {result.output_dir / 'last.pt'}")
    if result.skipped_images:
        print(f"skipped {result.skipped_images} unreadable images (their paths are in the log above)")
    _print_health(result)
    _print_knn(result)
    return 0


def _print_health(result) -> None:
    from fastdino.engine.health import summary_line

    print(summary_line(result.health))


def _print_knn(result) -> None:
    if result.knn_init is not None:
        print(f"k-NN top-1, random-init teacher: {result.knn_init:.2f}%")
    if result.knn_trained is not None:
        print(f"k-NN top-1, trained teacher:     {result.knn_trained:.2f}%")


def _demo(args: argparse.Namespace) -> int:
    from fastdino.data.demo import make_demo_dataset
    from fastdino.engine.trainer import train

    cfg = load_config(CONFIG_DIR / "demo.yaml", args.overrides)
    data_dir = Path(cfg.data.path)
    print(f"demo data set: {make_demo_dataset(data_dir)}")
    result = train(cfg)
    print(f"trained {result.steps_done} iterations in {result.output_dir}; last loss {result.last_loss:.4f}")
    _print_health(result)
    _print_knn(result)
    return 0


def _knn(args: argparse.Namespace) -> int:
    from fastdino.config import config_from_dict
    from fastdino.engine.checkpoint import load_checkpoint
    from fastdino.engine.trainer import resolve_device
    from fastdino.eval.knn import knn_evaluate
    from fastdino.methods import build_method

    state = load_checkpoint(args.checkpoint)
    cfg = config_from_dict(state["config"])
    device = resolve_device(args.device)
    method = build_method(cfg, device)
    try:
        method.teacher.load_state_dict(state["teacher"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {args.checkpoint}: teacher weights do not load ({exc})") from exc
    cfg.eval.knn_k, cfg.eval.knn_temperature = args.k, args.temperature
    backbone = method.feature_backbone().to(device)
    top1 = knn_evaluate(backbone, args.train, args.val, args.image_size or cfg.data.global_size, cfg.eval, device,
                        args.num_workers)
    print(f"k-NN top-1 (k={args.k}, T={args.temperature}): {top1:.2f}%")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from fastdino.engine.profile import profile_training

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.train.output_dir) / "profile"
    report = profile_training(cfg, out, steps=args.steps, warmup=args.warmup, trace_steps=args.trace_steps,
                              real_data=args.real_data)
    figures = json.loads((out / "profile.json").read_text())
    phases = sorted(figures["phases_ms"].items(), key=lambda kv: -kv[1])[:3]
    print(f"one step: {figures['step_ms']:.2f} ms ({figures['img_per_s']:.1f} img/s, {figures['data']} data); "
          "most time: " + ", ".join(f"{k} {v:.2f} ms" for k, v in phases))
    print(f"report: {report} (with phases.png, trace.json, profile.json)")
    return 0


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdino", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain with DINO: fastdino train CONFIG.yaml [section.key=value ...]")
    p.add_argument("config", help="YAML config (only what differs from the defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="generate the embedded demo data set, pretrain on it, print k-NN before/after")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of configs/demo.yaml")
    p.set_defaults(func=_demo)

    p = sub.add_parser("knn", help="weighted k-NN top-1 of a checkpoint's teacher backbone")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--train", required=True, help="labelled folder (class sub-folders): the memory bank")
    p.add_argument("--val", required=True, help="labelled folder with the same classes: the queries")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--image-size", type=int, default=0, help="eval crop size; 0 = the checkpoint's global crop")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-workers", type=int, default=4)
    p.set_defaults(func=_knn)

    p = sub.add_parser("profile", help="time a few training steps of a config: report.md with the time per phase, "
                                       "top ops, TFLOP/s, memory, a phase chart and a Chrome trace")
    p.add_argument("config", help="YAML config (only what differs from the defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--out", default="", help="report folder (default: <train.output_dir>/profile)")
    p.add_argument("--steps", type=_count(1), default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=_count(0), default=3, help="untimed steps first (default 3)")
    p.add_argument("--trace-steps", type=_count(1), default=2, help="steps under torch.profiler (default 2)")
    p.add_argument("--real-data", action="store_true",
                   help="read data.path through the training loader (default: synthetic crops, no data pipeline)")
    p.set_defaults(func=_profile)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_float32_matmul_precision("high")
    from fastdino.engine.health import TrainingHealthError
    from fastdino.engine.trainer import NonFiniteLossError

    try:
        return args.func(args)
    except UserError as exc:
        print(f"fastdino: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"fastdino: training stopped: {exc}", file=sys.stderr)
        return 3
    except TrainingHealthError as exc:
        print(f"fastdino: training stopped: {exc}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
