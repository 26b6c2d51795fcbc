"""The method-agnostic training loop: one step in commented sections, checkpoints, exact resume."""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from fastdino.config import Config, config_to_dict, parse_stop_signals, schedule_errors, schedule_warnings
from fastdino.data.batch import steps_per_epoch
from fastdino.data.files import DataError, ImageFileDataset, ImageIndex, UnreadableImages
from fastdino.data.loader import build_batch_source, resolve_backend
from fastdino.data.multicrop import eval_transform
from fastdino.data.shards import index_images, index_in_classes_of, is_shard_set
from fastdino.engine.backends import Backend, build_backend
from fastdino.engine.checkpoint import (
    WRITE_ERRNOS,
    CheckpointError,
    CheckpointWriteError,
    load_checkpoint,
    os_error_of,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fastdino.engine.compile import compile_networks, mark_step_begin
from fastdino.engine.distributed import DistInfo, PeerWatch, close_process_group, init_distributed, sync_batchnorm
from fastdino.engine.ema import TeacherEMA
from fastdino.engine.health import HealthMonitor, TrainingHealthError, agree, agree_each
from fastdino.engine.logging import RunLogger, write_run_report
from fastdino.engine.preempt import Stopped, StopSignals, signal_name
from fastdino.engine.resume import check_architecture, check_resume, index_fingerprint, resume_path
from fastdino.engine.run_folder import (
    check_fresh_start,
    check_outside_data,
    lock_run_folder,
    remove_temporary_checkpoints,
)
from fastdino.errors import ConfigError, UserError
from fastdino.eval.knn import knn_evaluate
from fastdino.interop.official import init_from_weights, read_dino_weights
from fastdino.methods import build_method
from fastdino.methods.base import Method
from fastdino.models.backbones import check_crop_sizes
from fastdino.reports.plots import read_metrics
from fastdino.schedules import cosine_schedule
from fastdino.telemetry import phase

log = logging.getLogger("fastdino")

class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the iteration and the last good checkpoint."""

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration
        """The first bad iteration: the run's good iterations end before it."""


class NonFiniteWatch:
    """The first iteration whose loss (or, outside fp16, gradient norm) was not finite, kept on the device.

    The step never reads it on the host: the backend skips such a step on the device, and the loop calls `check`
    on log steps and before every checkpoint write, so the run stops there (every process at once) before a state
    after the bad iteration is written or logged.
    """

    NONE = 2**62

    def __init__(self, device: torch.device, precision: str):
        self.precision = precision
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.loss = torch.zeros((), device=device)  # the first bad iteration's loss, for the message
        self.epoch = torch.zeros((), dtype=torch.int64, device=device)

    def observe(self, step: int, epoch: int, loss: torch.Tensor, ok: torch.Tensor) -> None:
        new = ~ok & (self.first == self.NONE)
        self.first = torch.where(new, step, self.first)
        self.epoch = torch.where(new, epoch, self.epoch)
        self.loss = torch.where(new, loss.detach().float(), self.loss)

    def check(self, output_dir: Path, saved_step: int | None, stop: int | None = None) -> int | None:
        """Raise NonFiniteLossError when any process saw a bad iteration (one host sync; an all-reduce when
        several processes train). `stop`: the stop signal this process received (engine/preempt.py), or None;
        returns the one any process received (the same on every process: it rides in the same all-reduce), so
        all stop at this iteration without a collective of their own."""
        flags = torch.stack([self.first, torch.full_like(self.first, -(stop or 0))])  # MIN: the largest signal
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        step, signum = flags.tolist()
        if step == self.NONE:
            return -signum or None
        fix = "lower optim.lr" + (" or use train.precision=bf16" if self.precision == "fp16" else "")
        kept = (f"the last checkpoint {output_dir / 'last.pt'} (after {saved_step} iterations) is intact (finite "
                f"weights; the divergence may have begun before it): {fix} and resume with "
                "train.allow_config_change=true, or start afresh if it diverges again"
                if saved_step is not None else f"no checkpoint was written yet: {fix} and start again")
        if step != int(self.first):
            what = "a non-finite loss or gradient on another process"
        elif torch.isfinite(self.loss):
            what = f"a non-finite gradient (loss {float(self.loss):.4g})"
        else:
            what = f"non-finite loss ({float(self.loss)})"
        where = f" (epoch {int(self.epoch)})" if step == int(self.first) else ""
        raise NonFiniteLossError(f"{what} at iteration {step}{where}; {kept}", step)


class OutOfMemory(RuntimeError):
    """The step ran out of memory (CUDA or CPU); the message names the batch size, the memory switches and what
    last.pt holds (CLI exit code 7)."""


class DataVanishedError(RuntimeError):
    """Training images indexed at the start are gone mid-run (an unmounted volume); not a user mistake made before
    the run (CLI exit code 8, not 2)."""


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or isinstance(exc, RuntimeError) and (
        "DefaultCPUAllocator: can't allocate memory" in text or "DefaultCPUAllocator: not enough memory" in text)


@dataclass
class TrainResult:
    output_dir: Path
    steps_done: int
    """The iteration the run stands at: the run's total so far, a resume's earlier iterations included."""
    resumed_at: int = 0
    """The iteration this `fit` started from (0 for a fresh run)."""
    last_loss: float = float("nan")
    knn_init: float | None = None
    knn_trained: float | None = None
    skipped_images: int = 0
    history: list[dict] = field(default_factory=list)
    health: dict | None = None
    """HealthMonitor.summary() (also in output_dir/health.json); None when health.enabled is false."""
    already_complete: bool = False
    """The resumed checkpoint had reached the run's end (train.epochs / train.max_steps): nothing was done."""

    def complete_line(self, cfg: Config) -> str:
        """What `fastdino train` prints for an already complete run."""
        until = f"train.epochs={cfg.train.epochs}"
        if cfg.train.max_steps:
            until += f", train.max_steps={cfg.train.max_steps}"
        return (f"{self.output_dir / 'last.pt'} is already complete at iteration {self.steps_done} ({until}); "
                "nothing to do: raise train.epochs or train.max_steps to train longer")
    knn_history: dict[int, float] = field(default_factory=dict)
    """Iteration -> k-NN top-1 (%) of every pass: at 0 (random init), every train.knn_every epochs, at the end."""
    wall_time_s: float = 0.0
    """Wall clock of this `fit` call, k-NN passes included."""


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """auto | cpu | cuda -> a device; `key` names the setting in the refusal when no GPU is visible."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is visible: use {key}=cpu or auto", key)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device (its GradScaler is CUDA-only): use "
                          "train.precision=fp32 or bf16 on the CPU", "train.precision")
    return precision


def check_kernels(cfg: Config, device: torch.device) -> None:
    """The Triton kernels run on CUDA tensors (on the CPU only inside Triton's interpreter, for tests)."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    for key, value in (("loss.impl", cfg.loss.impl), ("ema.impl", cfg.ema.impl)):
        if value == "triton":
            raise ConfigError(f"{key}=triton needs a CUDA device: use {key}=auto on the CPU", key)


def data_roots(path: str) -> tuple[Path, Path | None]:
    """Training images: path/train when it exists, else path; k-NN validation: path/val when it exists.

    Raises ConfigError naming data.path when it is unset or names nothing (a brace pattern of shards is checked
    shard by shard when indexed)."""
    if not path:
        raise ConfigError("data.path is not set: add data.path=/folder/of/images (or run `fastdino demo`)",
                          "data.path")
    if not (os.path.exists(path) or is_shard_set(path)):
        raise ConfigError(f"data.path {path} does not exist", "data.path")
    root = Path(path)
    train_dir = root / "train" if (root / "train").is_dir() else root
    val_dir = root / "val" if (root / "val").is_dir() else None
    return train_dir, val_dir


def check_writable(folder: Path) -> None:
    """Create train.output_dir and prove a file can be written there, before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"train.output_dir {folder} is not writable ({exc.strerror or exc})", "train.output_dir"
        ) from exc


class Trainer:
    def __init__(self, cfg: Config):
        if errors := schedule_errors(cfg):  # load_config refuses them too; a Config built in Python may hold them
            raise errors[0]
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.dist: DistInfo = init_distributed(self.device, cfg.train.dist_timeout)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        check_kernels(cfg, self.device)
        self.data_backend = resolve_backend(cfg.data.backend, self.device, lambda flag: agree(flag, self.device))
        self.output_dir = Path(cfg.train.output_dir)
        self.backend: Backend = build_backend(cfg, self.dist, self.device, self.precision)  # checks DeepSpeed's set-up

        # Refuse bad data, bad checkpoints and changed settings before any model is built or step taken.
        self.train_dir, self.val_dir = data_roots(cfg.data.path)
        check_outside_data(self.output_dir, [d for d in (self.train_dir, self.val_dir, Path(cfg.data.path)) if d])
        try:
            self.index: ImageIndex = index_images(self.train_dir)
        except DataError as exc:
            raise DataError(f"data.path {cfg.data.path}: {exc}") from None
        n_images = len(self.index.paths)
        self.fingerprint = index_fingerprint(self.index, self.train_dir)
        self.val_index: ImageIndex | None = None
        """val/ in train/'s classes when the run has k-NN passes: indexed once, so no pass repeats its warnings."""
        if cfg.train.knn_eval and self.val_dir is not None and len(self.index.classes) > 1:
            try:  # the end-of-run k-NN needs val/ in train/'s classes: find out now, not after training
                self.val_index = index_in_classes_of(self.val_dir, self.train_dir, self.index)
            except DataError as exc:
                raise DataError(f"{exc}; fix it or set train.knn_eval=false") from None
        self.steps_per_epoch = steps_per_epoch(n_images, cfg.data.batch_size, self.dist.world_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"data.path {self.train_dir} has {n_images} images, fewer than one global batch of "
                f"{cfg.data.batch_size * self.dist.world_size} (data.batch_size={cfg.data.batch_size} x "
                f"{self.dist.world_size} processes): lower data.batch_size or add images"
            )
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, cfg.train.max_steps) if cfg.train.max_steps else self.total_steps
        ckpt_path = resume_path(cfg)
        ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
        notices = schedule_warnings(cfg, self.steps_per_epoch)
        if ckpt is not None:
            check_architecture(ckpt["config"], cfg, ckpt_path)
            notices += check_resume(ckpt, cfg, ckpt_path, self.dist.world_size, n_images, self.fingerprint,
                                    self.stop_step)
        if self.dist.is_main:
            for line in notices:
                log.warning("%s", line)
        init = None
        if cfg.train.init_from and ckpt is not None:
            log.info("train.init_from=%s is ignored: the run resumes from %s", cfg.train.init_from, ckpt_path)
        elif cfg.train.init_from:
            init = read_dino_weights(cfg.train.init_from)

        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.method: Method = build_method(cfg, self.device).to(self.device)
        check_crop_sizes(self.method.feature_backbone(), cfg.model.arch, self.method.crop_sizes())  # no RNG, no state
        self.method.student = sync_batchnorm(self.method.student, self.dist, self.device)
        self.method.teacher = sync_batchnorm(self.method.teacher, self.dist, self.device)
        self.ema = TeacherEMA(self.method.student, self.method.teacher, impl=cfg.ema.impl)
        self.nonfinite = NonFiniteWatch(self.device, self.precision)
        self.step = 0
        self.unreadable = UnreadableImages()  # distinct bad files of the run (its k-NN passes' too), checkpointed
        self.saved_step: int | None = None
        """The iteration output_dir/last.pt holds, None while this run has none there."""
        if ckpt is not None:
            self._restore(ckpt, ckpt_path)
            if ckpt_path == self.output_dir / "last.pt":
                self.saved_step = self.step
        elif init is not None:
            init_from_weights(self.method, init, cfg.dino.norm_last_layer)
        check_writable(self.output_dir)  # the last check (it creates the folder): nothing is written before
        self.lock = None
        if self.dist.is_main:  # one run per folder; then what a killed run left, and what another run wrote
            self.lock = lock_run_folder(self.output_dir)
            remove_temporary_checkpoints(self.output_dir)
            check_fresh_start(self.output_dir, cfg.train.resume, resumes=ckpt is not None)
        if ckpt is not None:  # said once the run folder is this run's (a busy folder is refused above, silently)
            log.info("resumed from %s at iteration %d", ckpt_path, self.step)
        compile_networks(self.method, cfg.model.compile)  # in place, before any wrapper
        self.backend.wrap(self.method)  # optimizer; DDP or the DeepSpeed engine around the student
        if ckpt is not None:  # after the wrap: DeepSpeed's optimizer exists only now
            self.backend.load_state_dict(ckpt, ckpt_path)
            set_rng_state(ckpt["rng"])
        self.dataset = ImageFileDataset(self.index, self.method.data_transform(), seed=cfg.train.seed)
        self.batches = build_batch_source(
            self.data_backend, self.dataset, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed,
            self.dist.rank, self.dist.world_size, self.device,
        )

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.backend.optimizer

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The run's checkpoint; called on every rank (a DeepSpeed backend writes its own files here)."""
        return {
            "config": config_to_dict(self.cfg),
            "step": self.step,
            "student": self.method.student_module().state_dict(),
            "teacher": self.method.teacher.state_dict(),
            **self.method.method_state_dict(),  # the method's own state, e.g. DINO's center
            **self.backend.state_dict(),  # ddp: optimizer, scaler; deepspeed: where its own checkpoint is
            "rng": rng_state(),
            "skipped_images": self.unreadable.state(),  # paths (an int before: from_state reads both)
            "world_size": self.dist.world_size,
            "n_images": len(self.index.paths),
            "index_fingerprint": self.fingerprint,
        }

    def _restore(self, ckpt: dict, path: Path) -> None:
        try:
            self.method.student_module().load_state_dict(ckpt["student"])
            self.method.teacher.load_state_dict(ckpt["teacher"])
            self.method.load_method_state_dict({name: ckpt[name] for name in self.method.method_state_dict()})
            self.step = int(ckpt["step"])
            self.unreadable = UnreadableImages.from_state(ckpt["skipped_images"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this run: {exc}") from exc

    def save(self) -> Path:
        """Write output_dir/last.pt (atomically: a failed write leaves the previous file as it was).

        Raises CheckpointWriteError (training stops: a run that cannot checkpoint would lose all further work
        on the next fault) naming the file, the error and what the previous last.pt holds."""
        path = self.output_dir / "last.pt"
        what = self.backend.checkpoint_dir or path
        if self.dist.world_size > 1 and dist.is_initialized():
            # Each process meets its own share of the images: the checkpoint keeps every process's bad files, so a
            # resumed run warns about none of them again and skipped_images counts them all. Each sends only what
            # it met since the last save: the rest every process got then, or from the checkpoint it resumed (all
            # load the same). Every process saves at the same iteration (after NonFiniteWatch's all-reduce), so
            # this gather lines up.
            gathered: list[list[str] | None] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, self.unreadable.news())
            self.unreadable.merge(gathered)
        try:
            state = self.state_dict()  # a DeepSpeed backend writes its own files here, on every rank
            what = path
            if self.dist.is_main:
                save_checkpoint(state, path)
        except (OSError, RuntimeError) as exc:  # DeepSpeed's torch.save wraps the OSError
            cause = os_error_of(exc)
            if not isinstance(cause, OSError):
                raise
            what = cause.filename or what
            kept = (f"the previous checkpoint {path} (after {self.saved_step} iterations) is intact"
                    if self.saved_step is not None else "no checkpoint was written before")
            raise CheckpointWriteError(
                f"could not write checkpoint {what} at iteration {self.step} ({cause.strerror or cause}); {kept}: "
                "free space (or fix the folder) and run again with train.resume=auto to continue") from exc
        return path

    def _kept(self) -> str:
        path = self.output_dir / "last.pt"
        return (f"{path} (after {self.saved_step} iterations) is intact" if self.saved_step is not None else
                "no checkpoint was written yet")

    def _resource_failure(self, exc: BaseException) -> RuntimeError | None:
        """Out of memory, or training images gone mid-run, as the one-line stop; None for any other error."""
        if _is_out_of_memory(exc):
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            batch = f"data.batch_size={self.cfg.data.batch_size}"
            keep = [] if self.cfg.model.grad_checkpointing else ["model.grad_checkpointing=true"]
            if self.device.type == "cuda" and self.precision == "fp32":
                keep.append("train.precision=bf16 (with train.allow_config_change=true)")
            resume = f"set {' and '.join(keep)} and resume with train.resume=auto, or " if keep else ""
            return OutOfMemory(
                f"out of memory on {self.device} at iteration {self.step} with {batch} per process ({first}); "
                f"{self._kept()}: {resume}lower data.batch_size in a new train.output_dir (a resume keeps the global "
                "batch)")
        if isinstance(exc, DataError):
            files = self.index.files()  # image files, or shards
            picks = files[:: max(1, len(files) // 100)]
            missing = sum(not os.path.exists(p) for p in picks)
            if missing:
                gone = ("is gone" if missing == len(picks) else
                        f"lost files: {missing} of {len(picks)} indexed files checked are missing")
                return DataVanishedError(
                    f"the training data {self.train_dir} {gone} at iteration {self.step} (an unmounted volume?); "
                    f"{self._kept()}: restore the data and resume with train.resume=auto")
        return None

    def _write_failure(self, exc: BaseException) -> CheckpointWriteError | None:
        """A run file (metrics.jsonl, summary.json, curves.png, health.json, ...) that a full or failing disk kept
        from being written, as the one-line stop (exit code 5); None for any other error."""
        cause = os_error_of(exc) if type(exc) in (OSError, RuntimeError) else None  # not one said already
        if not isinstance(cause, OSError) or cause.errno not in WRITE_ERRNOS:
            return None
        return CheckpointWriteError(
            f"could not write {cause.filename or 'a file in ' + str(self.output_dir)} at iteration {self.step} "
            f"({cause.strerror or cause}); {self._kept()}: free space and run again (train.resume=auto) to continue")

    # -- one iteration -------------------------------------------------------------------------------
    def train_step(self, views: list[torch.Tensor], epoch: int, with_signals: bool = False) -> dict:
        """One iteration; `with_signals` (log steps only) adds the method's health signals and the loss scale."""
        cfg, step, method = self.cfg, self.step, self.method
        # schedules (closed forms of the iteration: exact on resume)
        warmup = cfg.optim.warmup_epochs * self.steps_per_epoch
        global_batch = cfg.data.batch_size * self.dist.world_size
        lr = cosine_schedule(step, self.total_steps, cfg.optim.lr * global_batch / 256, cfg.optim.min_lr, warmup)
        wd = cosine_schedule(step, self.total_steps, cfg.optim.weight_decay, cfg.optim.weight_decay_end)
        momentum = method.teacher_momentum(step, self.total_steps)
        self.backend.set_schedules(lr, wd)

        # forward teacher and student, loss, center update (inside the method)
        mark_step_begin(cfg.model.compile)
        with phase("copy to device"):
            views = [v.to(self.device, non_blocking=True) for v in views]
        method.with_signals = with_signals
        with self.backend.autocast():
            loss, stats = method(views, epoch)
        loss_finite = torch.isfinite(loss)  # a device bool: no host sync in the step

        # backward (scaled under fp16; gradients reduced over processes)
        with phase("backward"):
            self.backend.backward(loss)

        # unscale, clip per parameter, cancel the method's frozen parameters, optimizer step (phases "clip",
        # "optimizer" inside the backend); a step with a non-finite loss or gradient is skipped on the device
        grad_norm = self.backend.step(epoch, loss_finite)
        self.nonfinite.observe(step, epoch, loss, loss_finite if self.precision == "fp16" else
                               loss_finite & torch.isfinite(grad_norm))  # fp16: an overflow skip is normal
        if with_signals and (scale := self.backend.loss_scale()) is not None:
            stats["loss_scale"] = scale  # fp16 only: the scale the next step uses (a device scalar)

        # EMA teacher update
        with phase("EMA"):
            self.ema.update(momentum)
        return {"loss": loss.detach(), "lr": lr, "wd": wd, "momentum": momentum, "grad_norm": grad_norm, **stats}

    def _stop_unhealthy(self, monitor: HealthMonitor) -> None:
        """health.on_collapse=stop: write health.json and raise before the unhealthy state is checkpointed."""
        monitor.stopped_at = self.step - 1
        if self.dist.is_main:
            monitor.write(self.output_dir / "health.json")
        kept = (f"{self.output_dir / 'last.pt'} (after {self.saved_step} iterations) is the last healthy checkpoint"
                if self.saved_step is not None else "no checkpoint was written")
        found = " ".join(monitor.message(k, self.step - 1, d) for k, d in monitor.holding.items())
        found = found or f"training health: another process saw collapse or divergence at iteration {self.step - 1}."
        raise TrainingHealthError(f"{found} Stopped (health.on_collapse=stop); {kept}.")

    def _snapshot(self, tag: str) -> None:
        """The method's picture (Method.snapshot) of a few fixed training images, evaluation-cropped; reads
        no global RNG (each item is decoded under its own seed), so a resumed run stays exact."""
        n = self.method.snapshot_images
        if not n or not self.dist.is_main:
            return
        dataset = ImageFileDataset(self.index, eval_transform(self.cfg.data.global_size), seed=self.cfg.train.seed)
        picks = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().long().tolist()
        images = torch.stack([dataset[i][0][0] for i in picks]).to(self.device)  # (n, 3, H, W)
        path = self.method.snapshot(images, self.output_dir, tag)
        if path is not None:
            log.info("wrote %s", path)

    # -- the loop ------------------------------------------------------------------------------------
    def knn(self) -> float | None:
        """k-NN top-1 (%) of the teacher now; None when train.knn_eval is off or there is no labelled val split.
        The pass runs under forked RNG states: whether and when it runs never changes the training."""
        if self.val_index is None:
            return None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return knn_evaluate(  # bad files go to the run's record: each is warned about once per run
                self.method.feature_backbone(), self.train_dir, self.val_dir, self.cfg.data.global_size,
                self.cfg.eval, self.device, self.cfg.data.num_workers, unreadable=self.unreadable,
                indexes=(self.index, self.val_index),
            ).top1

    def _knn_pass(self, result: TrainResult, logger: RunLogger) -> None:
        """One k-NN pass after `self.step` iterations: into result.knn_history and metrics.jsonl."""
        if self.step in result.knn_history:
            return
        top1 = self.knn()
        if top1 is not None:
            result.knn_history[self.step] = top1
            logger.log_eval(self.step, {"epoch": self.step / self.steps_per_epoch, "knn_top1": top1})
            if 0 < self.step < self.stop_step:
                logger.write(f"k-NN top-1 after {self.step} iterations: {top1:.2f}%")

    def _write_report(self, result: TrainResult, monitor: HealthMonitor | None, status: str, start_step: int,
                      train_seconds: float) -> None:
        """output_dir/summary.json and curves.png (engine/logging.write_run_report), main process only."""
        if not self.dist.is_main:
            return
        images_per_step = self.cfg.data.batch_size * self.dist.world_size
        health = monitor.summary() if monitor is not None else None
        logged, evals = read_metrics(self.output_dir / "metrics.jsonl")  # the whole run, earlier calls included
        knn = {e["step"]: e["knn_top1"] for e in evals}
        summary = {
            "status": status,
            "iterations": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "images_seen": self.step * images_per_step,
            "final_loss": logged[-1]["loss"] if logged else None,
            "knn_top1": None if not knn else {
                "random_init": knn.get(0), "trained": knn.get(self.stop_step) if status == "finished" else None,
                "by_iteration": knn,
            },
            "health": None if health is None else {
                "status": health["status"], "checks": health["checks"],
                "findings": {k: {"name": f["name"], "first_step": f["first_step"], "last_step": f["last_step"]}
                             for k, f in health["findings"].items()},
                "details": "health.json",
            },
            "skipped_images": len(self.unreadable),
            "this_call": {  # a resumed run: what this process did
                "start_iteration": start_step,
                "wall_time_s": result.wall_time_s,
                "train_time_s": train_seconds,
                "mean_img_per_s": (self.step - start_step) * images_per_step / train_seconds if train_seconds else None,
            },
            "device": str(self.device), "precision": self.precision, "world_size": self.dist.world_size,
        }
        write_run_report(self.output_dir, summary, self.cfg.health)

    def _stop(self, signum: int, keep: bool, signals: tuple[int, ...]) -> None:
        """A stop signal, agreed on by every process at this iteration: write last.pt here (unless the health watch
        holds on this state: then the last healthy one stays) and raise Stopped with the line the CLI prints."""
        if keep and self.saved_step != self.step:
            self.nonfinite.check(self.output_dir, self.saved_step)  # never a state after a non-finite step
            self.save()
            self.saved_step = self.step
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # no process exits (its launcher would then end the others) before last.pt is written
        path = self.output_dir / "last.pt"
        held = (f"{path} holds iteration {self.saved_step}" if self.saved_step is not None else
                "no checkpoint was written")
        raise Stopped(f"stopped by {signal_name(signum)} after {self.step} iterations; {held}: run the same command "
                      "again (train.resume=auto) to continue from it", signum, self.step, signals)

    def fit(self) -> TrainResult:
        cfg = self.cfg
        if self.step >= self.stop_step:  # a finished run re-run, or train.epochs lowered below the checkpoint
            if self.lock is not None:
                self.lock.release()
            return TrainResult(self.output_dir, self.step, already_complete=True,
                               skipped_images=len(self.unreadable))
        # noted only (engine/preempt.py); one process acts at the next iteration's end, several at the next log or
        # checkpoint step, whose all-reduce (NonFiniteWatch.check) carries the signal: the same iteration everywhere
        stops = StopSignals(parse_stop_signals(cfg.train.stop_signals)).install()
        single = self.dist.world_size == 1
        try:
            result = self._fit(stops, single)
        except Stopped:  # the handlers stay while the process ends with its line: a later signal (torchrun's,
            raise  # once a peer has exited with the stop's code) is noted, never a cut
        except BaseException as exc:
            stops.restore()
            failure = self._write_failure(exc) or self._resource_failure(exc)
            if failure is not None:
                raise failure from exc
            raise
        finally:
            if self.lock is not None:
                self.lock.release()
        stops.restore()
        return result

    def _fit(self, stops: StopSignals, single: bool) -> TrainResult:
        cfg = self.cfg
        started, start_step = time.perf_counter(), self.step
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        result = TrainResult(self.output_dir, self.step, resumed_at=self.step)
        images_per_step = cfg.data.batch_size * self.dist.world_size
        logger = RunLogger(self.output_dir, self.stop_step, self.step, images_per_step, self.dist.is_main,
                           self.device)
        watch = cfg.health.enabled
        monitor = HealthMonitor(cfg.health, verbose=self.dist.is_main) if watch else None
        healthy = True  # in stop mode: no condition pending on any process at the last log step
        loop_start, knn_seconds = time.perf_counter(), 0.0
        peers = PeerWatch(self.dist, stops).start()  # heartbeats: which process is gone when a collective fails
        try:
            if self.step == 0:
                self._knn_pass(result, logger)
                result.knn_init = result.knn_history.get(0)
                self._snapshot("start")
            if single and stops.received is not None:  # came before the first step (e.g. in the k-NN pass)
                self._stop(stops.received, True, stops.signals)
            while self.step < self.stop_step:
                epoch = self.step // self.steps_per_epoch
                loader = self.batches.epoch(epoch, start_step=self.step % self.steps_per_epoch)
                for views, _labels, unreadable in loader:
                    self.unreadable.add(unreadable)  # warns once per file per run
                    last_of_epoch = (self.step + 1) % self.steps_per_epoch == 0
                    log_now = (self.step + 1) % cfg.train.log_every == 0 or self.step + 1 == self.stop_step
                    log_now = log_now or last_of_epoch
                    metrics = self.train_step(views, epoch, with_signals=watch and log_now)
                    self.step += 1
                    signum = stops.received if single else None
                    if log_now:
                        signum = self.nonfinite.check(self.output_dir, self.saved_step, stops.received)
                        metrics.update(epoch=epoch, skipped_images=len(self.unreadable))
                        result.history.append({"step": self.step - 1, **logger.step(self.step - 1, metrics)})
                        result.last_loss = result.history[-1]["loss"]
                        if monitor is not None:
                            monitor.observe(self.step - 1, result.history[-1])
                            if cfg.health.on_collapse == "stop":
                                # each process watches its own batches: agree, or one would checkpoint (a
                                # collective under DeepSpeed and the gather in save) while another steps on
                                stop_now, unhealthy = agree_each([monitor.should_stop, not monitor.healthy],
                                                                 self.device)
                                if stop_now:
                                    self._stop_unhealthy(monitor)
                                healthy = not unhealthy
                    # stop mode never checkpoints a state a health condition holds on, on any process (last.pt
                    # stays good); `healthy` changes on log steps only, where the processes agreed on it
                    keep = monitor is None or cfg.health.on_collapse == "warn" or healthy
                    if keep and (self.step % cfg.train.ckpt_every == 0 or self.step == self.stop_step or last_of_epoch):
                        signum = self.nonfinite.check(self.output_dir, self.saved_step, stops.received) or signum
                        self.save()
                        self.saved_step = self.step
                    if signum is not None and self.step < self.stop_step:
                        self._stop(signum, keep, stops.signals)
                    if last_of_epoch and cfg.train.knn_every and (epoch + 1) % cfg.train.knn_every == 0:
                        tick = time.perf_counter()
                        self._knn_pass(result, logger)
                        knn_seconds += time.perf_counter() - tick
                    if self.step >= self.stop_step:
                        break
            train_seconds = time.perf_counter() - loop_start - knn_seconds
            if self.step == self.stop_step:
                self._knn_pass(result, logger)
                result.knn_trained = result.knn_history.get(self.step)
        except (NonFiniteLossError, TrainingHealthError, Stopped) as exc:
            result.wall_time_s = time.perf_counter() - started
            if isinstance(exc, NonFiniteLossError):
                self.step = exc.iteration  # the report counts the good iterations
            why = ("non-finite loss" if isinstance(exc, NonFiniteLossError) else signal_name(exc.signum)
                   if isinstance(exc, Stopped) else "health.on_collapse=stop")
            self._write_report(result, monitor, f"stopped: {why}", start_step,
                               time.perf_counter() - loop_start - knn_seconds)
            raise
        except Exception as exc:  # a collective failed, a peer's loss showed otherwise, or the launcher stops us
            # rank 0 writes last.pt: only it knows that the latest write completed
            after = f" (after {self.saved_step} iterations)" if self.dist.is_main else ""
            kept = (f"the last complete checkpoint {self.output_dir / 'last.pt'}{after} is intact: resume with "
                    "train.resume=auto" if self.saved_step is not None else
                    "no checkpoint was written yet: start again")
            lost = peers.failure(exc, self.step, kept)  # None: not a process-group failure
            if lost is None:
                raise
            raise lost from exc
        finally:
            peers.stop()
            logger.close()
        if monitor is not None:
            result.health = monitor.summary()
            if self.dist.is_main:
                monitor.write(self.output_dir / "health.json")
        if self.unreadable and self.dist.is_main:  # every process's files since the last save's gather
            log.warning("%s", self.unreadable.summary())
        result.steps_done, result.skipped_images = self.step, len(self.unreadable)
        result.wall_time_s = time.perf_counter() - started
        if self.step == self.stop_step:
            self._snapshot("end")
        self._write_report(result, monitor, "finished", start_step, train_seconds)
        return result


def train(cfg: Config) -> TrainResult:
    """Build the run and fit it. The process group it opens (torchrun's, or DeepSpeed's group of one) is closed at
    its end: always when finished, after an agreed stop (a signal, a non-finite loss, a health stop) or a user
    mistake, and in a group of one after any error (distributed.close_process_group); a group the caller opened
    stays open."""
    opened = not dist.is_initialized()
    try:
        result = Trainer(cfg).fit()
    except BaseException as exc:
        if opened:
            try:  # a communicator holding an earlier error may refuse to close: the run's own error is the one to say
                close_process_group(agreed=isinstance(exc, (UserError, NonFiniteLossError, TrainingHealthError,
                                                            Stopped)))
            except Exception as close_exc:
                log.warning("could not close the process group after %s: %s", type(exc).__name__, close_exc)
        raise
    if opened:
        close_process_group()
    return result
