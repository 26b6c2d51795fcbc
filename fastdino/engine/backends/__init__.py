"""Training backends behind one interface (base.py's `Backend`): `ddp.py` (torchrun / DDP, and the single
process) and `deepspeed.py` (ZeRO stage 1 and 2); `train.engine=ddp|deepspeed` chooses (`build_backend`).
The package imports its modules only inside `build_backend`, and they import base.py, never this file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastdino.config import Config
from fastdino.engine.backends.base import Backend
from fastdino.engine.distributed import DistInfo


def build_backend(cfg: Config, dist: DistInfo, device: torch.device, precision: str) -> Backend:
    """The backend `train.engine` names; DeepSpeed's settings are read and checked here, before any work.

    Raises MissingDependencyError (deepspeed not installed) or ConfigError (its JSON file) for DeepSpeed.
    """
    output_dir = Path(cfg.train.output_dir)
    if cfg.train.engine == "deepspeed":
        from fastdino.engine.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, dist, device, precision, output_dir)
    from fastdino.engine.backends.ddp import DDPBackend

    return DDPBackend(cfg, dist, device, precision, output_dir)
