"""Command line: `fastdino train | demo | knn | export`. Bad input ends with one clear line, not a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from fastdino.config import load_config
from fastdino.engine.interop import EXPORT_FORMATS
from fastdino.errors import UserError
from fastdino.models.vit import model_names

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class _Parser(argparse.ArgumentParser):
    """argparse whose every refusal (unknown flag, bad value, missing argument) is one line and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _flag_type(convert, check, what: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _flag_type(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _flag_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _flag_type(float, lambda v: v > 0 and v != float("inf"), "a positive number")


def _folder(text: str) -> Path:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return Path(text)


def _train(args: argparse.Namespace) -> int:
    from fastdino.engine.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if result.already_complete:
        print(result.complete_line(cfg))
        return 0
    print(f"trained {result.steps_done} iterations; last loss {result.last_loss:.4f}; "
          f"checkpoint {result.output_dir / 'last.pt'}")
    if result.skipped_images:
        print(f"skipped {result.skipped_images} unreadable images (their paths are in the log above)")
    _print_health(result)
    _print_knn(result, cfg)
    return 0


def _print_health(result) -> None:
    from fastdino.engine.health import summary_line

    print(summary_line(result.health))


def _print_knn(result, cfg) -> None:
    start = "train.init_from teacher" if cfg.train.init_from else "random-init teacher"
    if result.knn_init is not None:
        print(f"k-NN top-1, {start}: {result.knn_init:.2f}%")
    if result.knn_trained is not None:
        print(f"k-NN top-1, {'trained teacher:':<{len(start) + 1}} {result.knn_trained:.2f}%")


def _demo(args: argparse.Namespace) -> int:
    from fastdino.data.demo import make_demo_dataset
    from fastdino.engine.trainer import train

    cfg = load_config(CONFIG_DIR / "demo.yaml", args.overrides)
    data_dir = Path(cfg.data.path)
    print(f"demo data set: {make_demo_dataset(data_dir)}")
    result = train(cfg)
    if result.already_complete:
        print(result.complete_line(cfg))
        return 0
    print(f"trained {result.steps_done} iterations in {result.output_dir}; last loss {result.last_loss:.4f}")
    _print_health(result)
    _print_knn(result, cfg)
    return 0


def _knn(args: argparse.Namespace) -> int:
    from fastdino.config import EvalConfig
    from fastdino.engine.interop import load_teacher_backbone
    from fastdino.engine.trainer import resolve_device
    from fastdino.eval.knn import knn_evaluate

    device = resolve_device(args.device, key="--device")
    loaded = load_teacher_backbone(args.checkpoint, arch=args.arch, patch_size=args.patch_size)
    if args.image_size % loaded.model.patch_size:
        raise UserError(f"--image-size {args.image_size} is not a multiple of the checkpoint's patch size "
                        f"{loaded.model.patch_size}")
    eval_cfg = EvalConfig(knn_k=args.k, knn_temperature=args.temperature)
    result = knn_evaluate(loaded.model.to(device), args.train, args.val, args.image_size or loaded.image_size,
                          eval_cfg, device, args.num_workers)
    print(f"k-NN top-1 (k={args.k}, T={args.temperature}): {result.top1:.2f}% of {result.n_val} images")
    if result.skipped_images:
        print(f"skipped {result.skipped_images} unreadable images (not scored; their paths are in the log above)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fastdino.engine.interop import export_official

    out = export_official(args.checkpoint, args.out, args.format)
    print(f"wrote {out} ({args.format} layout)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastdino", description=__doc__)
    # the DeepSpeed launcher passes --local_rank=N before the command; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain with DINO: fastdino train CONFIG.yaml [section.key=value ...]")
    p.add_argument("config", help="YAML config (only what differs from the defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="generate the embedded demo data set, pretrain on it, print k-NN before/after")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of configs/demo.yaml")
    p.set_defaults(func=_demo)

    p = sub.add_parser("knn", help="weighted k-NN top-1 of a checkpoint's teacher backbone")
    p.add_argument("--checkpoint", required=True, help="fastdino checkpoint or official DINO file (full or backbone)")
    p.add_argument("--arch", help=f"one of {', '.join(model_names())}; checked against the file's tensors "
                                  "(inferred when left out)")
    p.add_argument("--patch-size", type=positive_int,
                   help="checked against the file's tensors (inferred when left out)")
    p.add_argument("--train", required=True, type=_folder, help="labelled folder (class sub-folders): the memory bank")
    p.add_argument("--val", required=True, type=_folder, help="labelled folder with the same classes: the queries")
    p.add_argument("--k", type=positive_int, default=20)
    p.add_argument("--temperature", type=positive_float, default=0.07)
    p.add_argument("--image-size", type=nonnegative_int, default=0,
                   help="eval crop size, a multiple of the patch size; 0 = the checkpoint's global crop (official "
                        "files: their stored grid, 224)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-workers", type=nonnegative_int, default=4)
    p.set_defaults(func=_knn)

    p = sub.add_parser("export", help="write a checkpoint in the official DINO layout: fastdino export CKPT")
    p.add_argument("checkpoint", help="fastdino checkpoint (or an official file, to change its layout)")
    p.add_argument("--format", default="official", choices=EXPORT_FORMATS,
                   help="official: full training checkpoint (student, teacher, dino_loss.center); "
                        "official-backbone: the teacher's ViT state dict, as the released *_pretrain.pth files")
    p.add_argument("--out", default="", help="output file; default <checkpoint stem>_<format>.pth beside it")
    p.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a refused flag (2, one line already printed)
        return int(exc.code or 0)
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
    except KeyboardInterrupt:
        print("fastdino: interrupted; the last checkpoint written is intact (train.resume=auto continues from it)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
