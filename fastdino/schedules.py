"""Per-iteration schedules of DINO (Caron et al. 2021, Sec. 3.1 and App. "Implementation details").

Closed forms of the official `cosine_scheduler` arrays, evaluated at one iteration: nothing to store,
and a resumed run gets the same values as an uninterrupted one by construction.
"""

from __future__ import annotations

import math


def cosine_schedule(
    step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from warmup_start to base over warmup_steps (endpoint included, as np.linspace),
    then a half cosine from base down (or up) to final over the remaining steps.

    A one-step warm-up is np.linspace(warmup_start, base, 1) = [warmup_start]: its one step takes the
    start value, as in the official arrays."""
    if step < warmup_steps:
        if warmup_steps == 1:
            return warmup_start
        return warmup_start + (base - warmup_start) * step / (warmup_steps - 1)
    span = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, span) / span
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def teacher_temp_schedule(epoch: int, warmup_temp: float, final_temp: float, warmup_epochs: int) -> float:
    """Linear warm-up per epoch (endpoint included), then constant: the official DINO schedule.

    A one-epoch warm-up is np.linspace(warmup_temp, final_temp, 1) = [warmup_temp]: epoch 0 runs at the
    warm-up temperature."""
    if epoch >= warmup_epochs:
        return final_temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (final_temp - warmup_temp) * epoch / (warmup_epochs - 1)
