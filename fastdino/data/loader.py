"""The choice of data backend (`data.backend`: cpu, torch_gpu, dali) behind one interface, `BatchSource`
(batch.py), and whether DALI can run here. Each backend yields the same batches in the same order
(batch.py's contract); this module imports the GPU backends, which never import it back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdino.data.batch import BatchSource, CpuBatches
from fastdino.data.files import ImageFileDataset
from fastdino.errors import ConfigError, MissingDependencyError

DATA_BACKENDS = ("auto", "cpu", "torch_gpu", "dali")


def dali_available() -> bool:
    """Whether NVIDIA DALI (`pip install -e ".[dali]"`) can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # not installed, or broken: any error while importing (build_pipeline names it when asked for)
        return False
    return True


def dali_problem(device: torch.device) -> str | None:
    """Why DALI cannot run on the CUDA `device`, or None: it imports, and a tiny GPU pipeline builds and runs
    there (`fastdino.data.dali.gpu_problem`, probed once per device and process)."""
    if not dali_available():
        return 'NVIDIA DALI is not installed: pip install -e ".[dali]"'
    from fastdino.data.dali import gpu_problem

    return gpu_problem(torch.cuda.current_device() if device.index is None else device.index)


def resolve_backend(name: str, device: torch.device,
                    on_any_process: Callable[[bool], bool] = lambda flag: flag) -> str:
    """`data.backend` -> the backend that runs on `device` (the training device).

    auto: dali when training runs on a GPU where DALI is installed and a probe pipeline runs (`dali_problem`),
    else torch_gpu on a GPU, else cpu (no probe without a GPU). Raises ConfigError (key data.backend) for an
    unknown name, a GPU backend without a CUDA training device, or dali where its probe fails (the reason in
    the message); MissingDependencyError for dali without the package. Under many processes
    `on_any_process(flag)` must be true on every process when it is true on any (the trainer passes an
    all-reduce): a probe that fails on one GPU then moves every rank off DALI (auto) or stops every rank
    (dali), so no rank augments differently and none waits for a peer that left.
    """
    if name not in DATA_BACKENDS:
        raise ConfigError(f"data.backend={name!r} is not one of {DATA_BACKENDS}", "data.backend")
    on_gpu = device.type == "cuda"
    if name == "auto":
        return ("torch_gpu" if on_any_process(dali_problem(device) is not None) else "dali") if on_gpu else "cpu"
    if name == "dali" and not dali_available():
        raise MissingDependencyError(
            "data.backend=dali needs NVIDIA DALI: pip install -e \".[dali]\" (or use data.backend=auto|cpu|torch_gpu)"
        )
    if name != "cpu" and not on_gpu:
        where = "no CUDA device is visible" if not torch.cuda.is_available() else "train.device is cpu"
        raise ConfigError(
            f"data.backend={name} decodes and augments on the GPU but {where}: use data.backend=cpu or auto",
            "data.backend",
        )
    if name == "dali":
        problem = dali_problem(device)
        if on_any_process(problem is not None):
            where = f"on {device} ({problem})" if problem else "on another process's GPU"
            raise ConfigError(f"data.backend=dali: DALI cannot run {where}: use data.backend=torch_gpu or auto",
                              "data.backend")
    return name


def build_batch_source(
    backend: str,
    dataset: ImageFileDataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> BatchSource:
    """The `BatchSource` of a resolved backend (`resolve_backend`) over `dataset`, whose transform is the
    method's (the GPU backends read the multi-crop recipe from it). GPU backends put views on `device`."""
    if backend == "cpu":
        return CpuBatches(dataset, batch_size, num_workers, seed, rank, world_size)
    if backend == "torch_gpu":
        from fastdino.data.gpu_augment import TorchGpuBatches

        return TorchGpuBatches(dataset, batch_size, num_workers, seed, rank, world_size, device)
    if backend == "dali":
        from fastdino.data.dali import DaliBatches

        return DaliBatches(dataset, batch_size, num_workers, seed, rank, world_size, device)
    raise ValueError(f"unresolved data backend {backend!r}: call resolve_backend first")
