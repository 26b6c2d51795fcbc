"""Run budgets (`fastdino budget`): wall-clock hours and GPU-hours of a training run, from a measured img/s.

A run on G GPUs sees `train.epochs` x the whole global batches (data.batch_size x G) of the N images in data.path,
at most train.max_steps of them: I images. With each GPU running at X img/s alone and a scaling efficiency s (the
share of the solo rate each GPU keeps when G > 1: all-reduce, stragglers), the run takes I / (X * G * s) seconds,
and G times that in GPU-hours; one GPU has no scaling loss.
The question is only how long that takes: warm-ups longer than train.epochs (config.schedule_errors), which
training refuses, are reported beside the answer, not refused.
The paper's reference (Caron et al. 2021, its table of training time and memory): DINO ViT-S/16, 300 epochs
on ImageNet-1k, 72.6 h on two 8-GPU V100 nodes.

Where X comes from when the user gives none: `perf/bench_train.py` appends one JSON line per run to
`perf/bench_train.jsonl` (BENCH_RESULTS); the last line whose step shape (SHAPE_KEYS: architecture,
crops, per-GPU batch, head, precision) equals the config's is used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fastdino.config import Config
from fastdino.data.batch import steps_per_epoch
from fastdino.data.files import DataError
from fastdino.data.shards import index_images, is_shard_set
from fastdino.engine.trainer import data_roots
from fastdino.errors import ConfigError

IMAGENET_1K_TRAIN = 1_281_167
"""Images in ImageNet-1k's training split (ILSVRC 2012), the default data set size."""
PAPER_RUN = {"what": "paper: DINO ViT-S/16, 300 epochs, ImageNet-1k, 16 V100s", "gpus": 16, "hours": 72.6}
BENCH_RESULTS = Path(__file__).resolve().parents[2] / "perf" / "bench_train.jsonl"

# What sets the img/s of one training step: a bench_train record matches a config when all of these agree.
SHAPE_KEYS = {
    "model": ("arch", "patch_size", "depth"),
    "data": ("global_size", "local_size", "local_crops_number", "batch_size"),
    "dino": ("out_dim", "hidden_dim", "bottleneck_dim", "head_bn"),
    "train": ("method", "precision"),
}


def step_shape(cfg: Config) -> dict:
    """The config's SHAPE_KEYS as a flat {"section.key": value} dict (what bench_train records).

    train.precision=auto is recorded as bf16, what it means on the GPUs a budget is for."""
    shape = {f"{s}.{k}": getattr(getattr(cfg, s), k) for s, keys in SHAPE_KEYS.items() for k in keys}
    if shape["train.precision"] == "auto":
        shape["train.precision"] = "bf16"
    return shape


def last_bench_img_per_s(cfg: Config, results: Path | None = None) -> tuple[float, dict]:
    """(img/s per GPU, the record) of the last bench_train line in `results` (default BENCH_RESULTS) whose
    shape equals the config's.

    Raises ConfigError naming --img-per-s when the file is missing or holds no matching line.
    """
    results = results or BENCH_RESULTS
    shape = step_shape(cfg)
    found = None
    if results.is_file():
        for line in results.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: the others still count
            if isinstance(record, dict) and record.get("shape") == shape and record.get("img_per_s"):
                found = record
    if found is None:
        what = ", ".join(f"{k}={v}" for k, v in shape.items())
        raise ConfigError(f"--img-per-s not given and {results} holds no perf/bench_train.py result for this config "
                          f"({what}): run perf/bench_train.py with this config, or pass --img-per-s X", "--img-per-s")
    return float(found["img_per_s"]), found


def count_images(data_path: str) -> tuple[int, Path]:
    """(images, where they were indexed) of data.path as training indexes it: its train/ when present; a folder or
    a shard set (fastdino.data.shards.is_shard_set: a folder of .tar files, a shard list, a brace pattern).

    Raises ConfigError naming data.path when it does not exist (the images of data that is elsewhere are given
    with --images), DataError naming data.path for what indexing refuses (no image, a missing shard, ...).
    """
    if not (os.path.exists(data_path) or is_shard_set(data_path)):
        raise ConfigError(f"data.path {data_path} does not exist: budget counts its images; fix the path, or pass "
                          "--images N for data that is not on this machine", "data.path")
    train_dir, _ = data_roots(data_path)
    try:
        return len(index_images(train_dir)), train_dir
    except DataError as exc:
        raise DataError(f"data.path {data_path}: {exc}") from None


@dataclass(frozen=True)
class BudgetRow:
    gpus: int
    img_per_s: float
    """Throughput of the whole run (all GPUs)."""
    hours: float
    """Wall-clock hours."""
    gpu_hours: float


def budget(epochs: int, n_images: int, img_per_s: float, gpus: list[int], scaling: float, max_steps: int = 0,
           batch_size: int = 0) -> list[BudgetRow]:
    """One row per GPU count: total img/s = X * G * (scaling if G > 1 else 1), hours = images / that / 3600.

    images: with batch_size (per GPU) > 0, what training runs: whole global batches of batch_size * G per epoch
    (drop_last: N // (batch_size * G) steps, 0 when N is less than one global batch), for train.epochs, stopped
    after max_steps > 0 (train.max_steps) steps; else epochs * N. img_per_s: one GPU's rate (img/s); scaling in
    (0, 1]. Raises ConfigError for values out of range.
    """
    if not img_per_s > 0:
        raise ConfigError(f"--img-per-s {img_per_s} must be positive", "--img-per-s")
    if not 0 < scaling <= 1:
        raise ConfigError(f"--scaling {scaling} must be in (0, 1] (the share of one GPU's rate each GPU keeps)",
                          "--scaling")
    rows = []
    for g in gpus:
        rate = img_per_s * g * (scaling if g > 1 else 1.0)
        hours = run_steps(epochs, n_images, batch_size, g, max_steps) * batch_size * g / rate / 3600 if batch_size \
            else epochs * n_images / rate / 3600
        rows.append(BudgetRow(g, rate, hours, hours * g))
    return rows


def run_steps(epochs: int, n_images: int, batch_size: int, gpus: int, max_steps: int = 0) -> int:
    """Iterations a run takes on `gpus` GPUs (data/batch.steps_per_epoch with drop_last, x epochs, capped by
    max_steps > 0); 0 when n_images is less than one global batch, which training refuses."""
    steps = epochs * steps_per_epoch(n_images, batch_size, gpus)
    return min(steps, max_steps) if max_steps else steps


def duration(hours: float) -> str:
    """Hours as the unit a person reads: seconds under a minute, minutes under an hour, hours beyond."""
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    return f"{hours * 60:.1f} min" if hours < 1 else f"{hours:.1f} h"


def format_table(rows: list[BudgetRow]) -> list[str]:
    """Text lines: the rows (short runs in minutes or seconds), then the paper's reference run."""
    lines = [f"{'GPUs':>5} {'img/s':>10} {'wall clock':>12} {'GPU time':>12}"]
    lines += [f"{r.gpus:>5} {r.img_per_s:>10.1f} {duration(r.hours):>12} {duration(r.gpu_hours):>12}" for r in rows]
    p = PAPER_RUN
    lines.append(f"{p['what']}: {p['hours']:.1f} h wall clock, {p['hours'] * p['gpus']:.1f} GPU-hours "
                 f"({300 * IMAGENET_1K_TRAIN / (p['hours'] * 3600):.0f} img/s in all)")
    return lines
