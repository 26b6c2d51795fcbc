"""Self-supervised methods behind one interface (`base.Method`): DINO now, SiT later.

The engine builds a method through `build_method` and sees only `Method`, so a new method plugs in here
without touching the loop.
"""

from __future__ import annotations

import torch

from fastdino.methods.base import Method


def build_method(cfg, device: torch.device) -> Method:
    """The method the config asks for (DINO is the only one so far)."""
    from fastdino.methods.dino import DINO

    return DINO(cfg, device)
