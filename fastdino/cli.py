"""Command line: `fastdino train | demo | knn | export | linear | attention | profile | budget | finetune | shards`.

Bad input ends with one clear line, not a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import torch

from fastdino.config import load_config
from fastdino.errors import UserError
from fastdino.interop.export import EXPORT_FORMATS, FOLDER_FORMATS
from fastdino.models.backbones import TORCHVISION_RESNETS
from fastdino.models.vit import model_names

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)  # data-loading processes of the evaluation commands
DEMO_CONFIGS = {"dino": "demo.yaml", "sit": "sit_demo.yaml"}
DEMO_CONVNET_CONFIG = "demo_convnet.yaml"  # `fastdino demo model.arch=resnet18` (or timm/<name>)
ARCH_HELP = (f"{', '.join(model_names())}, a torchvision ResNet ({', '.join(TORCHVISION_RESNETS)}) or timm/<name>; "
             "checked against the file (read from it when left out; timm/resnetN and resnetN are one network)")
"""--arch of the evaluation commands: what the file holds, never a choice (interop.official._check_flags)."""


class OneLineParser(argparse.ArgumentParser):
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
_nonneg_float = _flag_type(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
positive_float = _flag_type(float, lambda v: v > 0 and v != float("inf"), "a positive number")


def _comma_list(convert, check, what: str):
    """A flag type for a comma-separated list, e.g. `--lr 0.01,0.1`; every item must pass `check`."""
    def parse(text: str) -> list:
        try:
            items = [convert(x) for x in text.split(",") if x.strip()]
        except ValueError:
            items = []
        if not items or not all(check(x) for x in items):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return items
    return parse


def output_file(text: str) -> str:
    """A flag type for a file to be written: its folder must exist (refused before any work otherwise)."""
    if not Path(text).parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: its folder {Path(text).parent} does not exist")
    return text


def _images(text: str) -> Path:
    """A flag type for labelled images: a folder, or tar shards (a folder of .tar files, a shard list, a brace
    pattern: fastdino.data.shards); what they hold is checked when they are indexed."""
    from fastdino.data.shards import is_shard_set

    if not (Path(text).is_dir() or is_shard_set(text)):
        raise argparse.ArgumentTypeError(f"{text} is not a folder, nor tar shards (a shard list, a .tar file or a "
                                         "pattern such as train-{000000..000099}.tar)")
    return Path(text)


def _size(text: str) -> int:
    from fastdino.data.shards import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _is_main_process() -> bool:
    """Rank 0 of a torchrun / DeepSpeed launch (RANK in the environment), or a single process: the one that
    prints a run's summary lines."""
    return os.environ.get("RANK", "0") == "0"


def _train(args: argparse.Namespace) -> int:
    from fastdino.engine.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if not _is_main_process():
        return 0
    if result.already_complete:
        print(result.complete_line(cfg))
        return 0
    done = (f"trained {result.steps_done - result.resumed_at} iterations ({result.resumed_at} to "
            f"{result.steps_done})" if result.resumed_at else f"trained {result.steps_done} iterations")
    print(f"{done}; last loss {result.last_loss:.4f}; checkpoint {result.output_dir / 'last.pt'}")
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
    from fastdino.engine.trainer import resolve_device, resolve_precision, train

    cfg = load_config(CONFIG_DIR / _demo_config(args), args.overrides)
    resolve_precision(cfg.train.precision, resolve_device(cfg.train.device))  # refuse before writing any data
    data_dir = Path(cfg.data.path)
    print(f"demo data set: {make_demo_dataset(data_dir)}")
    result = train(cfg)
    if not _is_main_process():
        return 0
    if result.already_complete:
        print(result.complete_line(cfg))
        return 0
    print(f"trained {result.steps_done} iterations in {result.output_dir}; last loss {result.last_loss:.4f}")
    _print_health(result)
    _print_knn(result, cfg)
    for picture in sorted(result.output_dir.glob("*_start.png")) + sorted(result.output_dir.glob("*_end.png")):
        print(f"picture: {picture}")
    return 0


def _demo_config(args: argparse.Namespace) -> str:
    """The demo's config: configs/demo_convnet.yaml (no ViT settings) when model.arch names a convnet, else the
    method's (DEMO_CONFIGS)."""
    from fastdino.models.backbones import is_vit

    arch = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("model.arch=")), None)
    if args.method == "dino" and arch is not None and not is_vit(arch):
        return DEMO_CONVNET_CONFIG
    return DEMO_CONFIGS[args.method]


def _knn(args: argparse.Namespace) -> int:
    from fastdino.config import EvalConfig
    from fastdino.engine.trainer import resolve_device
    from fastdino.eval.knn import knn_evaluate
    from fastdino.interop.official import load_teacher_backbone
    from fastdino.models.backbones import check_crop_sizes

    device = resolve_device(args.device, key="--device")
    loaded = load_teacher_backbone(args.checkpoint, arch=args.arch, patch_size=args.patch_size)
    if loaded.spec.patch_size and args.image_size % loaded.model.patch_size:
        raise UserError(f"--image-size {args.image_size} is not a multiple of the checkpoint's patch size "
                        f"{loaded.model.patch_size}")
    eval_cfg = EvalConfig(knn_k=args.k, knn_temperature=args.temperature)
    image_size = args.image_size or loaded.image_size
    check_crop_sizes(loaded.model.to(device), loaded.spec.arch, {"--image-size": image_size})
    result = knn_evaluate(loaded.model, args.train, args.val, image_size, eval_cfg, device, args.num_workers)
    print(f"k-NN top-1 (k={args.k}, T={args.temperature}): {result.top1:.2f}% of {result.n_val} images")
    if result.skipped_images:
        print(f"skipped {result.skipped_images} unreadable images (not scored; their paths are in the log above)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fastdino.interop.export import CHECK_ATOL, export

    out = export(args.checkpoint, args.out or None, args.format)
    print(f"wrote {out} ({args.format} format; loaded back, its features match fastdino's within {CHECK_ATOL:g})")
    return 0


def _load_teacher_backbone(path: str, arch: str | None, patch_size: int | None, device: torch.device):
    """Checkpoint path (fastdino, official DINO, timm or transformers) -> interop.official.TeacherBackbone whose
    model is the frozen teacher backbone (eval mode, on `device`), a ViT with sdpa attention (`linear` needs no
    xformers, and attention maps always take the explicit-softmax path) or a convnet."""
    from fastdino.interop.official import load_teacher_backbone

    loaded = load_teacher_backbone(path, arch=arch, patch_size=patch_size, attention="sdpa")
    loaded.model.eval().requires_grad_(False).to(device)
    return loaded


def _linear(args: argparse.Namespace) -> int:
    from fastdino.engine.trainer import resolve_device
    from fastdino.eval.linear import linear_probe
    from fastdino.models.backbones import check_crop_sizes

    device = resolve_device(args.device, key="--device")
    loaded = _load_teacher_backbone(args.checkpoint, args.arch, args.patch_size, device)
    backbone = loaded.model
    # 0: the crop the position embeddings were stored for (model.img_size, the training global crop); a convnet:
    # the training global crop (fastdino checkpoints) or 224 (official files).
    patch = getattr(backbone, "patch_size", None)
    image_size = args.image_size or (math.isqrt(backbone.pos_embed.shape[1] - 1) * patch if patch else
                                     loaded.image_size)
    if patch and image_size % patch:
        raise UserError(f"--image-size {image_size} is not a multiple of the checkpoint's patch size "
                        f"{backbone.patch_size}")
    check_crop_sizes(backbone, loaded.spec.arch, {"--image-size": image_size})
    r = linear_probe(backbone, args.train, args.val, image_size=image_size, features=args.features,
                     mode=args.mode, lrs=args.lr, epochs=args.epochs, batch_size=args.batch_size, device=device,
                     num_workers=args.num_workers, seed=args.seed)
    feed = "cached centre-crop features" if r.mode == "cached" else "random-resized-crop + flip every epoch"
    print(f"linear probe: {r.feature_mode} features ({r.feature_dim} wide), {feed}, {args.epochs} epochs, "
          f"{r.n_train - r.skipped_train} train / {r.n_val - r.skipped_val} val images")
    print("lr (per 256)   top-1    top-5")
    for lr, t1, t5 in zip(r.lrs, r.top1, r.top5):
        print(f"{lr:<12g} {t1:7.2f}% " + (f"{t5:7.2f}%" if t5 is not None else "    n/a"))
    b = r.best
    top5 = f", top-5 {r.top5[b]:.2f}%" if r.top5[b] is not None else ""
    print(f"best lr {r.lrs[b]:g} (picked on --val): top-1 {r.top1[b]:.2f}%{top5}")
    if r.skipped_train or r.skipped_val:
        print(f"skipped {r.skipped_train} train and {r.skipped_val} val unreadable images (paths in the log above)")
    return 0


def _attention(args: argparse.Namespace) -> int:
    from fastdino.data.files import DataError
    from fastdino.engine.trainer import resolve_device
    from fastdino.errors import ConfigError
    from fastdino.eval.attention import write_attention_maps

    if not 0.0 < args.mass <= 1.0:
        raise ConfigError(f"--mass {args.mass} must be in (0, 1]")
    for path in args.images:  # before the checkpoint loads: a typo should not cost a model load
        if not Path(path).is_file():
            raise DataError(f"image {path} does not exist")
    device = resolve_device(args.device, key="--device")
    loaded = _load_teacher_backbone(args.checkpoint, args.arch, args.patch_size, device)
    if loaded.spec.patch_size is None:
        raise UserError(f"fastdino attention draws a ViT's class-token attention; checkpoint {args.checkpoint} holds a "
                        f"{loaded.spec.arch} (a convnet, no attention): use a ViT checkpoint")
    backbone = loaded.model
    for path in write_attention_maps(backbone, args.images, args.out, args.image_size, args.mass, device):
        print(f"wrote {path}")
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


def _budget(args: argparse.Namespace) -> int:
    from fastdino.config import schedule_errors
    from fastdino.engine.budget import (
        IMAGENET_1K_TRAIN,
        budget,
        count_images,
        format_table,
        last_bench_img_per_s,
        run_steps,
    )

    # the question is how long train.epochs takes: a warm-up longer than that is reported below, not refused
    cfg = load_config(args.config, args.overrides, schedules=False)
    if args.images is not None:
        n_images, images = args.images, "--images"
    elif cfg.data.path:
        n_images, train_dir = count_images(cfg.data.path)
        images = f"indexed in {train_dir}"
    else:
        n_images = IMAGENET_1K_TRAIN
        images = "ImageNet-1k's training split, the default: data.path is not set; --images N to change"
    if args.img_per_s is not None:
        img_per_s, source = args.img_per_s, "--img-per-s"
    else:
        img_per_s, record = last_bench_img_per_s(cfg, Path(args.results) if args.results else None)
        source = (f"last perf/bench_train.py result for this config ({record.get('date', '?')}, "
                  f"{record.get('device', '?')}, engine {record.get('engine', 'ddp')})")
    rows = budget(cfg.train.epochs, n_images, img_per_s, args.gpus, args.scaling, cfg.train.max_steps,
                  cfg.data.batch_size)
    print(f"{args.config}: {cfg.train.epochs} epochs x {n_images:,} images ({images}) = "
          f"{cfg.train.epochs * n_images:,} images")
    print(f"one GPU: {img_per_s:.1f} img/s ({source}); scaling {args.scaling} per GPU beyond one")
    print("\n".join(format_table(rows)))
    batch, epochs = cfg.data.batch_size, cfg.train.epochs
    for g in args.gpus:  # the rows count what training runs: whole global batches, up to train.max_steps
        steps = run_steps(epochs, n_images, batch, g)
        if steps == 0:
            print(f"note: on {g} GPU(s) {n_images:,} images are fewer than one global batch of {batch} x {g}: "
                  "`fastdino train` refuses it")
        elif cfg.train.max_steps and cfg.train.max_steps < steps:
            print(f"note: on {g} GPU(s) train.max_steps={cfg.train.max_steps} stops the run after "
                  f"{cfg.train.max_steps} of its {steps} iterations")
        elif steps * batch * g < 0.99 * epochs * n_images:
            print(f"note: on {g} GPU(s) an epoch is {steps // epochs} whole global batches of {batch} x {g} = "
                  f"{steps // epochs * batch * g:,} images: the other {n_images - steps // epochs * batch * g:,} of "
                  "each epoch's shuffle are left out")
    for error in schedule_errors(cfg):
        print(f"note: `fastdino train` refuses this config as it stands: {error}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from fastdino.config import config_from_dict
    from fastdino.engine.trainer import resolve_device
    from fastdino.eval.finetune import finetune
    from fastdino.interop.official import load_teacher_backbone, read_weights_file
    from fastdino.methods import build_method
    from fastdino.models.backbones import build_backbone, check_crop_sizes

    path = Path(args.checkpoint)
    device = resolve_device(args.device, key="--device")
    state = read_weights_file(path) if path.is_file() and path.suffix != ".safetensors" else None
    torch.manual_seed(args.seed)  # the --random-init weights follow --seed (torch seeds itself randomly at start)
    if isinstance(state, dict) and "config" in state:  # a fastdino run (DINO or SiT): its method's k-NN backbone
        cfg = config_from_dict(state["config"])
        method = build_method(cfg, device)
        if not args.random_init:
            try:
                method.teacher.load_state_dict(state["teacher"])
            except RuntimeError as exc:
                raise UserError(f"checkpoint {args.checkpoint}: teacher weights do not load ({exc})") from exc
        backbone, image_size, arch = method.feature_backbone().to(device), cfg.data.global_size, cfg.model.arch
    else:  # an official, timm or transformers ViT or convnet: its backbone, at the crop the folder declares
        loaded = load_teacher_backbone(path)
        backbone, image_size, s = loaded.model, loaded.image_size, loaded.spec
        arch = s.arch
        if args.random_init:
            vit = {"img_size": s.img_size, "patch_size": s.patch_size, "depth": s.depth} if s.patch_size else {}
            backbone, _ = build_backbone(s.arch, **vit)
        backbone = backbone.to(device)
    if args.random_init:
        print("backbone: random initialisation (the baseline; the checkpoint's weights are not loaded)")
    image_size = args.image_size or image_size
    check_crop_sizes(backbone, arch, {"--image-size": image_size})
    result = finetune(
        backbone, args.train, args.val, image_size, device,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
        num_workers=args.num_workers, seed=args.seed, per_class=args.per_class, report=print,
    )
    labels = f", {args.per_class} labelled images per class" if args.per_class else ""
    print(f"fine-tuned top-1 ({len(result.classes)} classes, {args.epochs} epochs{labels}): {result.top1:.2f}%")
    if result.skipped_val:
        print(f"skipped {result.skipped_val} unreadable validation images (not scored; paths in the log above)")
    return 0


def _shards(args: argparse.Namespace) -> int:
    from fastdino.data.shards import write_shards

    for split in write_shards(args.image_folder, args.out_dir, args.shard_size, args.seed, progress=True):
        print(f"wrote {split.images} images in {split.shards} shard{'s' * (split.shards != 1)} "
              f"({split.bytes / 1e6:.1f} MB) to {split.folder}")
        if split.unreadable:
            print(f"kept {len(split.unreadable)} files that could not be read as empty members (named in the log "
                  "above): training skips them, on the shards as on the folder")
        if split.corrupt:
            print(f"kept {len(split.corrupt)} corrupt images (named in the log above): training skips them, on the "
                  "shards as on the folder; fix or remove them in the folder and convert again to be rid of them")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fastdino", description=__doc__)
    # the DeepSpeed launcher passes --local_rank=N before the command; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
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
    p.add_argument("--checkpoint", required=True, help="fastdino checkpoint, official DINO file (full or backbone), "
                                                       "or a timm or transformers model folder")
    p.add_argument("--arch", help=ARCH_HELP)
    p.add_argument("--patch-size", type=positive_int,
                   help="checked against the file's tensors (inferred when left out)")
    p.add_argument("--train", required=True, type=_images, help="labelled folder (class sub-folders): the memory bank")
    p.add_argument("--val", required=True, type=_images, help="labelled folder with the same classes: the queries")
    p.add_argument("--k", type=positive_int, default=20)
    p.add_argument("--temperature", type=positive_float, default=0.07)
    p.add_argument("--image-size", type=nonnegative_int, default=0,
                   help="eval crop size, a multiple of the patch size; 0 = the checkpoint's global crop (timm / hf "
                        "folders: the crop their preprocessing declares; official files: their stored grid, 224)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-workers", type=nonnegative_int, default=DEFAULT_WORKERS)
    p.set_defaults(func=_knn)

    p = sub.add_parser("export", help="write a checkpoint's teacher for timm, transformers, torch.hub or the "
                                      "official DINO code, checked by loading it back: fastdino export CKPT")
    p.add_argument("checkpoint", help="fastdino checkpoint, or any file / model folder `knn` reads")
    p.add_argument("--format", default="official", choices=EXPORT_FORMATS,
                   help="official: full training checkpoint (student, teacher, dino_loss.center); "
                        "official-backbone, or its alias hub: the teacher backbone's state dict (ViT or ResNet), as "
                        "the released *_pretrain.pth files torch.hub loads (other timm/<name> backbones: use timm or "
                        "hf); timm: a folder for timm.create_model('local-dir:DIR', "
                        "pretrained=True); hf: a folder for transformers' AutoModel (ViTModel, ResNetModel, "
                        "TimmWrapperModel for timm/<name>) / AutoImageProcessor")
    p.add_argument("--out", default="", help="output file (official formats) or a new or empty folder, not "
                                             f"named like a file ({', '.join(FOLDER_FORMATS)}); default <checkpoint "
                                             "stem>_<format>[.pth] beside the checkpoint")
    p.set_defaults(func=_export)

    p = sub.add_parser("linear", help="linear-probe top-1/top-5 of a checkpoint's frozen teacher backbone")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--train", required=True, type=_images,
                   help="labelled folder (class sub-folders) to train the probe on")
    p.add_argument("--val", required=True, type=_images, help="labelled folder with the same classes to measure it on")
    p.add_argument("--features", default="auto", choices=("auto", "cls4", "cls_avgpool", "pooled"),
                   help="cls4: class tokens of the last 4 blocks (ViT-S rule); cls_avgpool: last class token + mean "
                        "patch token (ViT-B rule); pooled: the backbone's output (a convnet's pooled features); "
                        "auto: cls4 below width 768, pooled for a convnet")
    p.add_argument("--mode", default="cached", choices=("cached", "augment"),
                   help="cached: backbone once on centre crops, fast (default); augment: the paper's protocol, "
                        "random-resized-crop + flip through the backbone every epoch")
    p.add_argument("--lr", default=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3],
                   type=_comma_list(float, lambda lr: 0 < lr < float("inf"),
                                    "one or more positive numbers separated by commas, e.g. 0.01,0.1"),
                   help="learning rates per 256 images, comma-separated: one probe each, trained in one pass")
    p.add_argument("--epochs", type=positive_int, default=100)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--image-size", type=nonnegative_int, default=0,
                   help="crop size; 0 = a ViT's stored position grid, a convnet's global crop (timm / hf folders: "
                        "the crop they declare; official files: 224)")
    p.add_argument("--arch", default=None, help=ARCH_HELP)
    p.add_argument("--patch-size", type=positive_int, default=None, help="checked against the file's tensors")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-workers", type=nonnegative_int, default=DEFAULT_WORKERS)
    p.set_defaults(func=_linear)

    p = sub.add_parser("attention", help="PNG grids of the last block's class-token attention per head")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="attention", help="folder for the PNGs (<image stem>_attention.png)")
    p.add_argument("--image-size", type=nonnegative_int, default=480,
                   help="resize the short side to this (then crop to the patch grid); 0 keeps each image's size")
    p.add_argument("--mass", type=float, default=0.6, help="share of each map's attention the masks keep")
    p.add_argument("--arch", default=None, help="official backbone-only files: checked against the file's tensors")
    p.add_argument("--patch-size", type=positive_int, default=None, help="checked against the file's tensors")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=_attention)
    p = sub.add_parser("profile", help="time a few training steps of a config: report.md with the time per phase, "
                                       "top ops, TFLOP/s, memory, a phase chart and a Chrome trace")
    p.add_argument("config", help="YAML config (only what differs from the defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--out", default="", help="report folder (default: <train.output_dir>/profile)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--trace-steps", type=positive_int, default=2, help="steps under torch.profiler (default 2)")
    p.add_argument("--real-data", action="store_true",
                   help="read data.path through the training loader (default: synthetic crops, no data pipeline)")
    p.set_defaults(func=_profile)

    p = sub.add_parser("budget", help="wall-clock hours and GPU-hours of a run at a measured img/s, beside the "
                                      "paper's 300-epoch ViT-S/16 run")
    p.add_argument("config", help="YAML config: train.epochs, data.path (its images are counted) and the step shape")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--img-per-s", type=positive_float, default=None,
                   help="one GPU's training img/s (default: the last perf/bench_train.py result for this config)")
    p.add_argument("--gpus", default=[1, 8, 16], help="GPU counts, comma-separated (default 1,8,16)",
                   type=_comma_list(int, lambda g: g >= 1, "a comma-separated list of GPU counts, e.g. 1,8,16"))
    p.add_argument("--scaling", type=float, default=0.9,
                   help="share of one GPU's img/s each GPU keeps when there are several (default 0.9)")
    p.add_argument("--images", type=positive_int, default=None,
                   help="data set size (default: data.path's images, else ImageNet-1k's 1,281,167)")
    p.add_argument("--results", default="", help=argparse.SUPPRESS)  # tests: another bench_train.jsonl
    p.set_defaults(func=_budget)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint's backbone + a linear head end to end, print top-1")
    p.add_argument("checkpoint", help="a fastdino checkpoint (DINO or SiT; its k-NN backbone is fine-tuned), or any "
                                      "file / model folder `knn` reads (official, timm, transformers)")
    p.add_argument("--train", required=True, type=_images, help="labelled folder (class sub-folders) to train on")
    p.add_argument("--val", required=True, type=_images,
                   help="labelled folder with the same classes: top-1 is measured on it")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--lr", type=positive_float, default=5e-4, help="peak learning rate (AdamW) for this batch size")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.05)
    p.add_argument("--image-size", type=nonnegative_int, default=0, help="crop size; 0 = the checkpoint's global crop")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-workers", type=nonnegative_int, default=DEFAULT_WORKERS)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--per-class", type=nonnegative_int, default=0,
                   help="train on at most N images of each class (a seeded pick; 0 = all): the low-label regime")
    p.add_argument("--random-init", action="store_true",
                   help="ignore the checkpoint's weights (same architecture, random init): the baseline")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("shards", help="write an image folder as WebDataset tar shards (train/ and val/ kept apart), "
                                      "for data.path, knn, linear and finetune")
    p.add_argument("image_folder", metavar="IMAGE_FOLDER",
                   help="class sub-folders of images (or train/ and val/ holding them)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty folder")
    p.add_argument("--shard-size", type=_size, default=10**9, help="bytes per shard at most, e.g. 1GB (default), 500MB")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="the one shuffle that mixes classes in each shard")
    p.set_defaults(func=_shards)
    return parser


def one_line(exc: BaseException) -> str:
    """The exception's message as one line. A DataLoader worker re-raises a user error with the worker's
    traceback appended: keep the original message (its last line, after `module.Class: `)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Original Traceback" in text and lines:
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


_RESUMABLE = "; the last checkpoint written is intact (train.resume=auto continues from it)"
INTERRUPTED = {  # what Ctrl-C leaves, by command: only training writes checkpoints; export and shards publish
    # their output by one rename when complete; the rest write nothing, or files of their own as they go
    "train": _RESUMABLE, "demo": _RESUMABLE, "export": "; nothing was written",
    "shards": "; nothing was written (the shard folder appears only when complete)"}


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code: 0 done, 2 a user mistake (one line, before any work), 3 a non-finite loss,
    4 a health stop (health.on_collapse=stop), 5 a file of the run that could not be written (disk full), 6 another
    process of the run died or stopped responding (the line names its rank), 7 out of memory, 8 training images gone
    mid-run, 130 Ctrl-C, 128 + n a stop signal n of train.stop_signals (143 SIGTERM, 138 SIGUSR1; README "Preemption
    and schedulers"). Training stops end in one line naming what `last.pt` holds; any other error is a bug in
    fastdino and keeps its traceback."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # section.key=value overrides may come after the flags too (`budget CFG --gpus 1 train.epochs=100`)
        if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help (0) or a refused flag (2, one line already printed)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_float32_matmul_precision("high")
    from fastdino.engine.checkpoint import CheckpointWriteError
    from fastdino.engine.distributed import PeerLostError, Terminated
    from fastdino.engine.health import TrainingHealthError
    from fastdino.engine.preempt import Stopped
    from fastdino.engine.trainer import DataVanishedError, NonFiniteLossError, OutOfMemory

    try:
        return args.func(args)
    except OutOfMemory as exc:
        print(f"fastdino: training stopped: {exc}", file=sys.stderr)
        return 7
    except DataVanishedError as exc:
        print(f"fastdino: training stopped: {exc}", file=sys.stderr)
        return 8
    except UserError as exc:
        print(f"fastdino: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave that cannot be read or written (a folder, no permission, ...)
        print(f"fastdino: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:  # every process stops at the same iteration: rank 0 says so
        if _is_main_process():
            print(f"fastdino: training stopped: {exc}", file=sys.stderr)
        return 3
    except TrainingHealthError as exc:
        if _is_main_process():
            print(f"fastdino: training stopped: {exc}", file=sys.stderr)
        return 4
    except CheckpointWriteError as exc:
        print(f"fastdino: training stopped: {exc}", file=sys.stderr)
        return 5
    except PeerLostError as exc:
        print(f"fastdino: training stopped: {exc}", file=sys.stderr)
        return 6
    except Stopped as exc:  # every process stops at the same iteration: rank 0 says so
        if _is_main_process():
            print(f"fastdino: {exc}", file=sys.stderr)
        # the process is ending: a launcher's SIGTERM (torchrun's, once a peer has exited) must not turn the code into
        # -15 during the interpreter's teardown, which resets Python handlers but keeps ignored signals ignored
        exc.ignore_signals()
        return exc.exit_code
    except Terminated as exc:
        print(f"fastdino: training stopped: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"fastdino: interrupted{INTERRUPTED.get(args.command, '')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
