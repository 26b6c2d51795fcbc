"""PNG figures people would rather look at than read: image grids, attention maps, run curves, the profile's
phase bars; one section per command, a section's functions together.

matplotlib through `matplotlib.figure.Figure` (the Agg canvas behind `savefig`), never `pyplot`: no global
backend switch, no display needed, no figure left open. Floor 2: inputs are files, arrays and plain numbers;
the engine and eval/ call these functions, never the other way round.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fastdino.config import HealthConfig
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("fastdino")

# ---------------------------------------------------------------------------------------------------------
# Image grids (generic) and attention maps (`fastdino attention`, fastdino/eval/attention.py)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GridCell:
    """One panel of an image grid.

    image: (H, W, 3) RGB, float in [0, 1] or uint8; or (H, W) scalar map drawn with `cmap`, scaled to
    [vmin, vmax] (None: the map's own min / max, so each panel uses its full colour range).
    """

    image: np.ndarray
    title: str = ""
    cmap: str = "viridis"
    vmin: float | None = None
    vmax: float | None = None


def save_image_grid(
    rows: Sequence[Sequence[GridCell | None]], path: str | Path, title: str = "", cell_inches: float = 1.8,
    dpi: int = 100,
) -> Path:
    """Draw `rows` of panels (None leaves a blank slot) as one PNG at `path`; returns the path.

    Pixels are drawn with nearest interpolation so patch-level maps keep their blocks. The figure is
    len(rows) x (longest row) panels of `cell_inches` square (at `dpi`), laid out by matplotlib's
    constrained layout so titles never overlap; parent folders are created.
    """
    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("save_image_grid needs at least one panel")
    height = n_rows * (cell_inches + 0.25) + (0.3 if title else 0.0)
    fig = Figure(figsize=(n_cols * cell_inches, height), dpi=dpi, layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_axis_off()
            cell = rows[r][c] if c < len(rows[r]) else None
            if cell is None:
                continue
            if cell.image.ndim == 2:
                ax.imshow(cell.image, cmap=cell.cmap, vmin=cell.vmin, vmax=cell.vmax, interpolation="nearest")
            else:
                ax.imshow(cell.image, interpolation="nearest")
            ax.set_title(cell.title, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


_DROPPED_TINT = np.array([0.12, 0.22, 0.6])  # navy: what a mask leaves out, distinct from dark image parts


def save_attention_grid(
    image: np.ndarray, maps: np.ndarray, masks: np.ndarray, patch_size: int, path: str | Path, title: str = "",
    mass: float = 0.6,
) -> Path:
    """One image's attention grid. Row 1: the image, each head's map, the mean over heads (the `inferno`
    colour scale spans each map's own range). Row 2, under each map: the image where the map's `mass` mask
    keeps it, tinted blue elsewhere, titled with the number of patches kept.

    image: (H, W, 3) uint8; maps: (n_heads + 1, H, W) float, the heads then their mean, upsampled to the
    image; masks: (n_heads + 1, H, W) bool, same order; patch_size: pixels per patch side (to count patches).
    """
    n = maps.shape[0]
    rgb = image.astype(np.float32) / 255.0
    grid_h, grid_w = image.shape[0] // patch_size, image.shape[1] // patch_size
    names = [f"head {h}" for h in range(1, n)] + ["mean of heads"]
    top = [GridCell(image, f"image {image.shape[1]}x{image.shape[0]} ({grid_w}x{grid_h} patches)")]
    bottom: list[GridCell | None] = [None]
    for name, m, keep in zip(names, maps, masks):
        top.append(GridCell(m, name, cmap="inferno"))
        kept = keep[..., None]
        shown = np.where(kept, rgb, 0.3 * rgb + 0.7 * _DROPPED_TINT)
        n_kept = int(keep.sum()) // patch_size**2
        bottom.append(GridCell(shown, f"{mass:.0%} of mass: {n_kept}/{grid_h * grid_w} patches"))
    return save_image_grid([top, bottom], path, title)


def _save(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# -- run curves and profile phases (issue 16, reports) -------------------------------------------------
TROUBLE = "#d62728"  # red: a health threshold or a collapse zone


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl -> (training records, evaluation records), each sorted by iteration.

    Training records carry `loss`; evaluation records carry `knn_top1` (written by the trainer's k-NN
    passes). A resumed run appends again the iterations logged after its checkpoint: the later record of an
    iteration wins. A line that is not a JSON record (a write cut short by a full disk or a kill) is skipped,
    with one warning. Raises FileNotFoundError when `path` does not exist.
    """
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    damaged = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, TypeError, KeyError):
            damaged += 1
            continue
        if "knn_top1" in record:
            evals[int(record["step"])] = record
        elif "loss" in record:
            train[int(record["step"])] = record
    if damaged:
        log.warning("%s: skipped %d damaged line(s) (a write cut short, e.g. by a full disk)", path, damaged)
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(iterations, values) of the records holding a finite number under `key`."""
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_run_curves(
    metrics_path: str | Path, out_path: str | Path, health: HealthConfig | None = None, title: str = ""
) -> Path:
    """A grid of the run's curves against the iteration, from metrics.jsonl: loss (with log K, the loss of a
    uniform teacher), k-NN top-1 when evaluated, img/s, learning rate, teacher momentum and temperature,
    gradient norm, the collapse signals of engine/health.py with the `health` thresholds drawn in red, and the
    NVML counters on a GPU. Panels without data are left out. Returns `out_path` (PNG); raises ValueError when
    the file holds no training record.
    """
    train, evals = read_metrics(metrics_path)
    if not train:
        raise ValueError(f"{metrics_path} holds no logged iteration to plot")
    panels = []

    def panel(draw, needs: str | None = None):
        if needs is None or _series(train, needs)[0]:
            panels.append(draw)

    def loss(ax):
        ax.plot(*_series(train, "loss"), label="loss")
        xs, ent = _series(train, "teacher_entropy")
        _, ratio = _series(train, "teacher_entropy_ratio")
        if ent and len(ent) == len(ratio) and ratio[0] > 0:
            log_k = ent[0] / ratio[0]  # entropy / (entropy / log K)
            ax.axhline(log_k, color="grey", ls="--", lw=1, label=f"log K = {log_k:.2f} (uniform teacher)")
        ax.set_title("loss")
        ax.legend(fontsize=8)

    def knn(ax):
        xs, ys = _series(evals, "knn_top1")
        ax.plot(xs, ys, marker="o")
        ax.margins(y=0.2)  # room for the value labels
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
        ax.set_title("k-NN top-1 (%), teacher")

    def throughput(ax):
        ax.plot(*_series(train, "img_per_s"))
        ax.set_title("throughput (img/s)")
        ax.set_ylim(bottom=0)

    def lr(ax):
        ax.plot(*_series(train, "lr"))
        ax.set_title("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    def right_axis(ax, key: str, label: str):
        """A second series on the right-hand axis of `ax`, one legend for both; None when it was not logged."""
        xs, ys = _series(train, key)
        if not xs:
            return None
        right = ax.twinx()
        right.plot(xs, ys, color="C1", label=label)
        ax.legend(handles=ax.get_lines() + right.get_lines(), fontsize=8, loc="lower right")
        return right

    def teacher(ax):
        ax.plot(*_series(train, "momentum"), color="C0", label="momentum (left)")
        ax.set_title("teacher momentum and temperature")
        if (right := right_axis(ax, "teacher_temp", "temperature (right)")) is not None:
            right.tick_params(labelsize=8)

    def grad_norm(ax):
        xs, ys = _series(train, "grad_norm")
        ax.plot(xs, ys)
        if min(ys) > 0 and max(ys) > 20 * min(ys):  # a log scale only where it spans orders of magnitude
            ax.set_yscale("log")
        ax.set_title("gradient norm (before clipping)")

    def entropy(ax):
        ax.plot(*_series(train, "teacher_entropy_ratio"), label="per image")
        ax.plot(*_series(train, "teacher_mean_entropy_ratio"), label="batch mean")
        if health is not None:
            ax.axhline(health.uniform_entropy_ratio, color=TROUBLE, ls="--", lw=1, label="collapse lines")
            ax.axhline(health.one_dim_entropy_ratio, color=TROUBLE, ls="--", lw=1)
        ax.set_ylim(0, 1.05)
        ax.set_title("teacher entropy / log K")
        ax.legend(fontsize=8)

    def kl(ax):
        ax.plot(*_series(train, "kl_student_teacher"))
        ax.set_ylim(bottom=0)
        ax.set_title("KL(teacher || student)")

    def spread(ax):
        ax.plot(*_series(train, "feature_std_ratio"))
        if health is not None:
            ax.axhline(health.feature_std_ratio, color=TROUBLE, ls="--", lw=1, label="feature collapse")
            ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
        ax.set_title("feature spread (std ratio)")

    def loss_scale(ax):
        ax.plot(*_series(train, "loss_scale"))
        ax.set_yscale("log")
        ax.set_title("fp16 loss scale")

    def gpu(ax):
        ax.plot(*_series(train, "gpu_util_pct"), color="C0", label="utilisation % (left)")
        ax.set_ylim(0, 105)
        ax.set_title("GPU (NVML)")
        if (right := right_axis(ax, "gpu_mem_used_gib", "memory GiB (right)")) is not None:
            right.set_ylim(bottom=0)

    panel(loss, "loss")
    if _series(evals, "knn_top1")[0]:
        panels.append(knn)
    panel(throughput, "img_per_s")
    panel(lr, "lr")
    panel(teacher, "momentum")
    panel(grad_norm, "grad_norm")
    panel(entropy, "teacher_entropy_ratio")
    panel(kl, "kl_student_teacher")
    panel(spread, "feature_std_ratio")
    panel(loss_scale, "loss_scale")
    panel(gpu, "gpu_util_pct")

    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.4 * cols, 3.0 * rows))
    fig.subplots_adjust(left=0.06, right=0.94, bottom=0.07, top=0.9, wspace=0.3, hspace=0.45)
    fig.suptitle(f"{title + ': ' if title else ''}{train[-1]['step'] + 1} iterations", fontsize=12)
    for i, draw in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        draw(ax)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.title.set_fontsize(10)
        if i >= len(panels) - cols:
            ax.set_xlabel("iteration", fontsize=9)
    return _save(fig, out_path)


def _ms(value: float) -> str:
    """Milliseconds to read at a glance: 2915, 90.3, 0.0547."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def plot_phases(phases_ms: dict[str, float], out_path: str | Path, step_ms: float, title: str, clock: str) -> Path:
    """Horizontal bars of the milliseconds per step of each phase, in step order, labelled with their share of
    the step (`step_ms`); `clock` says how they were timed (e.g. 'CUDA events'). Returns `out_path` (PNG)."""
    names = list(phases_ms)
    values = [phases_ms[n] for n in names]
    data_phases = ("data wait", "copy to device")
    colors = ["#9e9e9e" if n == "other" else "C1" if n in data_phases else "C0" for n in names]
    fig = Figure(figsize=(8, 0.45 * len(names) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.barh(names, values, color=colors)
    ax.invert_yaxis()  # the step reads top to bottom
    for bar, v in zip(bars, values):
        share = 100 * v / step_ms if step_ms > 0 else 0.0
        label = f"{_ms(v)} ms ({share:.0f}%)" if share >= 1 else f"{_ms(v)} ms (<1%)"
        ax.annotate(label, (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=9)
    ax.set_xlim(0, max(values, default=1.0) * 1.3 or 1.0)
    ax.set_xlabel(f"ms per step ({clock})")
    ax.set_title(f"{title}\none step: {_ms(step_ms)} ms", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out_path)


# -- SiT reconstructions (issue 15) ------------------------------------------------------------------------
def unnormalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(n, 3, H, W) normalised -> (n, H, W, 3) float32 in [0, 1] on the CPU, ready for imshow."""
    x = images.detach().float().cpu()
    x = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def reconstruction_grid(rows: dict[str, torch.Tensor], path: str | Path, title: str | None = None,
                        cell_inches: float = 1.3, dpi: int = 100) -> Path:
    """One row per entry of `rows` (label -> (n, 3, H, W) ImageNet-normalised images, the same n in every
    row), one column per image, pixels shown unsmoothed; writes the PNG at `path` and returns it.
    Raises ValueError when the rows differ in length or are empty."""
    counts = {label: images.shape[0] for label, images in rows.items()}
    if not counts or len(set(counts.values())) != 1 or 0 in counts.values():
        raise ValueError(f"rows must hold the same non-zero number of images, got {counts}")
    n = next(iter(counts.values()))
    fig = Figure(figsize=(cell_inches * n + 0.9, cell_inches * len(rows) + (0.45 if title else 0.1)), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        pictures = unnormalize(images)
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(pictures[c].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
