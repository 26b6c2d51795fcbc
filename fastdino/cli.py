"""Command line: `fastdino train | demo | knn | finetune`. Bad input ends with one clear line, not a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from fastdino.config import load_config
from fastdino.engine.checkpoint import CheckpointError
from fastdino.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIGS = {"dino": "demo.yaml", "sit": "sit_demo.yaml"}


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

    cfg = load_config(CONFIG_DIR / DEMO_CONFIGS[args.method], args.overrides)
    data_dir = Path(cfg.data.path)
    print(f"demo data set: {make_demo_dataset(data_dir)}")
    result = train(cfg)
    print(f"trained {result.steps_done} iterations in {result.output_dir}; last loss {result.last_loss:.4f}")
    _print_health(result)
    _print_knn(result)
    for picture in sorted(result.output_dir.glob("*_start.png")) + sorted(result.output_dir.glob("*_end.png")):
        print(f"picture: {picture}")
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


def _finetune(args: argparse.Namespace) -> int:
    from fastdino.config import ConfigError, config_from_dict
    from fastdino.engine.checkpoint import load_checkpoint
    from fastdino.engine.trainer import resolve_device
    from fastdino.eval.finetune import finetune
    from fastdino.methods import build_method

    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--num-workers", args.num_workers, 0), ("--image-size", args.image_size, 0)):
        if value < low:
            raise ConfigError(f"{flag}={value} must be >= {low}")
    for flag, value in (("--lr", args.lr), ("--weight-decay", args.weight_decay)):
        if not value >= 0 or (flag == "--lr" and value == 0):
            raise ConfigError(f"{flag}={value} must be {'> 0' if flag == '--lr' else '>= 0'}")
    state = load_checkpoint(args.checkpoint)
    cfg = config_from_dict(state["config"])
    device = resolve_device(args.device)
    method = build_method(cfg, device)
    if args.random_init:
        print("backbone: random initialisation (the baseline; the checkpoint's weights are not loaded)")
    else:
        try:
            method.teacher.load_state_dict(state["teacher"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {args.checkpoint}: teacher weights do not load ({exc})") from exc
    result = finetune(
        method.feature_backbone(), args.train, args.val, args.image_size or cfg.data.global_size, device,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
        num_workers=args.num_workers, seed=args.seed, report=print,
    )
    print(f"fine-tuned top-1 ({len(result.classes)} classes, {args.epochs} epochs): {result.top1:.2f}%")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdino", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain with DINO: fastdino train CONFIG.yaml [section.key=value ...]")
    p.add_argument("config", help="YAML config (only what differs from the defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="generate the embedded demo data set, pretrain on it, print k-NN before/after")
    p.add_argument("--method", default="dino", choices=tuple(DEMO_CONFIGS),
                   help="dino: configs/demo.yaml; sit: configs/sit_demo.yaml (also draws reconstructions)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo's config")
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

    p = sub.add_parser("finetune", help="fine-tune a checkpoint's backbone + a linear head end to end, print top-1")
    p.add_argument("checkpoint", help="a fastdino checkpoint (DINO or SiT); its k-NN backbone is fine-tuned")
    p.add_argument("--train", required=True, help="labelled folder (class sub-folders) to train on")
    p.add_argument("--val", required=True, help="labelled folder with the same classes: top-1 is measured on it")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW) for this batch size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--image-size", type=int, default=0, help="crop size; 0 = the checkpoint's global crop")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-init", action="store_true",
                   help="ignore the checkpoint's weights (same architecture, random init): the baseline")
    p.set_defaults(func=_finetune)
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
