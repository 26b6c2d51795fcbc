"""PNG figures for the eval and report commands, drawn with matplotlib's object API (no pyplot state).

Figures are built on `matplotlib.figure.Figure` and saved through the Agg canvas, so nothing needs a
display and nothing touches pyplot's global figure list. Each section below belongs to one command;
keep a section's functions together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

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
