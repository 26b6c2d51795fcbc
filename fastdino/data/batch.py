"""One epoch's batches: the batch type every data backend yields, the seeded resumable sampler, and the CPU
backend's DataLoader. The GPU backends (gpu_augment.py, dali.py) build on these; loader.py chooses among them.

The order depends only on (seed, epoch, rank, world_size) and each item's augmentation only on
(seed, epoch, index) (see `files.py`), so a run resumed at step s of an epoch sees exactly the batches
the uninterrupted run saw from step s on, with any number of workers. Every backend keeps that contract
and yields the same batch: `(views, labels, unreadable)`, views a list of 2 + V float32 (B, 3, S, S)
tensors (global crops first, ImageNet-normalised), labels (B,) int64, unreadable the batch's
`(path, reason)` pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fastdino.data.files import DataError, collate_views

Batch = tuple[list[torch.Tensor], torch.Tensor, list[tuple[str, str]]]


def steps_per_epoch(n_images: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Batches each rank sees per epoch: whole global batches only with drop_last, else a ragged last one."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
    if drop_last:
        return n_images // (batch_size * world_size)
    return math.ceil(math.ceil(n_images / world_size) / batch_size)


class ResumableShardedSampler(Sampler[int]):
    """This rank's indices for one epoch, from `start_step` on.

    The permutation (torch.Generator seeded with seed + epoch, as DistributedSampler) is cut to whole global
    batches (drop_last) or padded by wrapping around (not drop_last) so all ranks take the same number of
    steps; rank r takes every world_size-th index from r, so global step s consumes one contiguous slice
    of the permutation. The first start_step * batch_size indices of the shard are skipped.
    """

    def __init__(
        self,
        n_images: int,
        batch_size: int,
        seed: int,
        epoch: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        n_steps = steps_per_epoch(n_images, batch_size, world_size, drop_last)
        if not 0 <= start_step <= n_steps:
            raise ValueError(f"start_step {start_step} is outside the epoch's {n_steps} steps")
        self.n_images, self.batch_size, self.seed, self.epoch = n_images, batch_size, seed, epoch
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.shuffle = shuffle
        self._shard = n_steps * batch_size if drop_last else math.ceil(n_images / world_size)
        self._length = max(self._shard - start_step * batch_size, 0)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_images))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n_images, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        total = self.world_size * self._shard  # <= n_images with drop_last, else padded by wrapping around
        while len(order) < total:
            order += order[: total - len(order)]
        shard = order[:total][self.rank :: self.world_size]
        return iter(shard[self.start_step * self.batch_size :])

    def __len__(self) -> int:
        return self._length


def build_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool | None = None,
    drop_last: bool = True,
    shuffle: bool = True,
    collate_fn: Callable = collate_views,
) -> DataLoader:
    """The loader for one epoch (build a new one each epoch); yields `collate_views` batches
    `(views, labels, unreadable)`: add `unreadable` to the run's `UnreadableImages` in the main process.

    Calls `dataset.set_epoch(epoch)` when the dataset has one, before workers copy it. The loader's own
    generator (seeded from seed, epoch, rank) seeds torch, `random` and numpy in each worker, and keeps the
    main process's global RNG untouched (without it DataLoader draws its base seed from the global RNG).
    shuffle=False with drop_last=False visits every image in index order (evaluation, one rank).
    `collate_fn` replaces `collate_views` for datasets whose items are not decoded views (torch_gpu backend).
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if steps_per_epoch(len(dataset), batch_size, world_size, drop_last) == 0:
        raise DataError(f"{len(dataset)} images do not fill one global batch of {batch_size} x {world_size}")
    sampler = ResumableShardedSampler(
        len(dataset), batch_size, seed, epoch, start_step, rank, world_size, shuffle=shuffle, drop_last=drop_last
    )
    generator = torch.Generator()
    generator.manual_seed(hash((seed, epoch, rank)) & 0x7FFF_FFFF_FFFF_FFFF)  # int tuples hash alike everywhere
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
    )


class BatchSource(Protocol):
    """What the trainer iterates: one epoch's batches from any step, whatever the backend."""

    def epoch(self, epoch: int, start_step: int = 0) -> Iterable[Batch]:
        """This rank's batches of `epoch` from `start_step` on: `(views, labels, unreadable)`."""
        ...


class CpuBatches:
    """The CPU backend: decode (Pillow) and augment (torchvision) in DataLoader workers, `build_loader`."""

    def __init__(
        self, dataset: Dataset, batch_size: int, num_workers: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.dataset, self.batch_size, self.num_workers, self.seed = dataset, batch_size, num_workers, seed
        self.rank, self.world_size = rank, world_size

    def epoch(self, epoch: int, start_step: int = 0) -> DataLoader:
        return build_loader(
            self.dataset, self.batch_size, self.num_workers, seed=self.seed, epoch=epoch, start_step=start_step,
            rank=self.rank, world_size=self.world_size,
        )
