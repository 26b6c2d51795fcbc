"""Figures for users (matplotlib, Agg: no display needed). Each drawing function takes tensors or numbers and
writes one PNG; they build a `Figure` directly (no pyplot global state), so they are safe in any process.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD


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
