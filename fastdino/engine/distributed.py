"""torchrun / DDP set-up. Models never see this: the engine wraps the student here."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, timeout_s: int = 600) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); single process otherwise.

    timeout_s (train.dist_timeout): how long a collective waits for a missing peer before it raises."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    if info.world_size == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def sync_batchnorm(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """BatchNorm layers computed over the global batch on CUDA (torch's SyncBatchNorm is GPU-only).

    On CPU processes (gloo) each process keeps its own batch statistics. Call before TeacherEMA is built:
    the conversion replaces modules.
    """
    if info.world_size == 1 or device.type != "cuda":
        return module
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
