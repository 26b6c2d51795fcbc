"""Self-supervised methods behind one interface (`base.Method`): DINO and SiT.

The engine builds a method through `build_method` and sees only `Method`, so a new method plugs in here
without touching the loop: add its name to `fastdino.config.METHODS` and its class to `_classes`.
"""

from __future__ import annotations

import torch

from fastdino.config import METHODS, Config
from fastdino.methods.base import Method


def _classes() -> dict[str, type[Method]]:
    from fastdino.methods.dino import DINO
    from fastdino.methods.sit import SiT

    classes = {"dino": DINO, "sit": SiT}
    assert tuple(classes) == METHODS, "fastdino.config.METHODS and the method classes disagree"
    return classes


def method_class(cfg: Config) -> type[Method]:
    """The class train.method names (the config has already refused unknown names)."""
    return _classes()[cfg.train.method]


def build_method(cfg: Config, device: torch.device) -> Method:
    """The method the config asks for (train.method)."""
    return method_class(cfg)(cfg, device)
