"""The method-agnostic training loop: one step in commented sections, checkpoints, exact resume."""

from __future__ import annotations

import logging
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from fastdino.config import Config, config_to_dict
from fastdino.data.files import ImageFileDataset, ImageIndex, index_image_folder
from fastdino.data.loader import build_loader, steps_per_epoch
from fastdino.data.multicrop import eval_transform
from fastdino.engine.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fastdino.engine.distributed import DistInfo, init_distributed, sync_batchnorm, wrap_ddp
from fastdino.engine.ema import TeacherEMA
from fastdino.engine.health import HealthMonitor, TrainingHealthError, agree, loss_scale
from fastdino.engine.logging import RunLogger
from fastdino.engine.optim import build_optimizer, clip_gradients_per_param, set_schedules
from fastdino.eval.knn import knn_evaluate
from fastdino.methods import build_method, method_class
from fastdino.methods.base import Method
from fastdino.schedules import cosine_schedule

log = logging.getLogger("fastdino")

# Keys that fix the shapes of the networks for every method; each method adds its own (Method.ARCH_KEYS).
# A checkpoint must agree on all of them to be loaded.
ARCH_KEYS = {"model": ("arch", "patch_size", "img_size", "depth"), "train": ("method",)}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the iteration and the last good checkpoint."""


@dataclass
class TrainResult:
    output_dir: Path
    steps_done: int
    last_loss: float = float("nan")
    knn_init: float | None = None
    knn_trained: float | None = None
    skipped_images: int = 0
    history: list[dict] = field(default_factory=list)
    health: dict | None = None
    """HealthMonitor.summary() (also in output_dir/health.json); None when health.enabled is false."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise RuntimeError("train.precision=fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return precision


def data_roots(path: str) -> tuple[Path, Path | None]:
    """Training images: path/train when it exists, else path; k-NN validation: path/val when it exists."""
    if not path:
        raise ValueError("data.path is empty: set it to a folder of images (or run `fastdino demo`)")
    root = Path(path)
    train_dir = root / "train" if (root / "train").is_dir() else root
    val_dir = root / "val" if (root / "val").is_dir() else None
    return train_dir, val_dir


def resume_path(cfg: Config) -> Path | None:
    resume = cfg.train.resume
    if resume == "none":
        return None
    if resume == "auto":
        last = Path(cfg.train.output_dir) / "last.pt"
        return last if last.is_file() else None
    return Path(resume)


def check_architecture(saved: dict, cfg: Config, path: Path) -> None:
    current, default = config_to_dict(cfg), config_to_dict(Config())  # a key added since: its default
    arch_keys = {**ARCH_KEYS, **method_class(cfg).ARCH_KEYS}
    diffs = [
        f"{section}.{key}: checkpoint {was!r} vs config {current[section][key]!r}"
        for section, keys in arch_keys.items()
        for key in keys
        if (was := saved.get(section, {}).get(key, default[section][key])) != current[section][key]
    ]
    if diffs:
        raise CheckpointError(f"checkpoint {path} is from another architecture: " + "; ".join(diffs))


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.dist: DistInfo = init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.output_dir = Path(cfg.train.output_dir)

        # Refuse bad data and bad checkpoints before any model is built or step taken.
        self.train_dir, self.val_dir = data_roots(cfg.data.path)
        self.index: ImageIndex = index_image_folder(self.train_dir)
        ckpt_path = resume_path(cfg)
        ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
        if ckpt is not None:
            check_architecture(ckpt["config"], cfg, ckpt_path)

        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.method: Method = build_method(cfg, self.device).to(self.device)
        self.method.student = sync_batchnorm(self.method.student, self.dist, self.device)
        self.method.teacher = sync_batchnorm(self.method.teacher, self.dist, self.device)
        self.ema = TeacherEMA(self.method.student, self.method.teacher, impl=cfg.ema.impl)
        self.optimizer = build_optimizer(self.method.student, cfg.optim.fused, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = 0
        self.skipped_images = 0
        if ckpt is not None:
            self._restore(ckpt, ckpt_path)
        self.method.student = wrap_ddp(self.method.student, self.dist, self.device)

        self.dataset = ImageFileDataset(self.index, self.method.data_transform(), seed=cfg.train.seed)
        self.steps_per_epoch = steps_per_epoch(len(self.index.paths), cfg.data.batch_size, self.dist.world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.path {self.train_dir} has {len(self.index.paths)} images, fewer than one global batch "
                f"({cfg.data.batch_size} x {self.dist.world_size} processes)"
            )
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, cfg.train.max_steps) if cfg.train.max_steps else self.total_steps

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": config_to_dict(self.cfg),
            "step": self.step,
            "student": self.method.student_module().state_dict(),
            "teacher": self.method.teacher.state_dict(),
            **self.method.method_state_dict(),  # the method's own state, e.g. a center
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "skipped_images": self.skipped_images,
        }

    def _restore(self, ckpt: dict, path: Path) -> None:
        try:
            self.method.student_module().load_state_dict(ckpt["student"])
            self.method.teacher.load_state_dict(ckpt["teacher"])
            self.method.load_method_state_dict({name: ckpt[name] for name in self.method.method_state_dict()})
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
            self.step = int(ckpt["step"])
            self.skipped_images = int(ckpt["skipped_images"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this run: {exc}") from exc
        log.info("resumed from %s at iteration %d", path, self.step)

    def save(self) -> Path:
        path = self.output_dir / "last.pt"
        if self.dist.is_main:
            save_checkpoint(self.state_dict(), path)
        return path

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
        set_schedules(self.optimizer, lr, wd)

        # forward teacher and student, loss, center update (inside the method)
        views = [v.to(self.device, non_blocking=True) for v in views]
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)
            if self.precision != "fp32" else nullcontext()
        )
        method.with_signals = with_signals
        with autocast:
            loss, stats = method(views, epoch)
        # host sync, once per step: a non-finite loss must stop training before it reaches the weights
        if not torch.isfinite(loss).item():
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at iteration {step} (epoch {epoch}); the last good checkpoint "
                f"{self.output_dir / 'last.pt'} is intact: lower optim.lr, use train.precision=bf16, then resume"
            )

        # backward
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

        # clip (per parameter, on unscaled gradients), frozen last layer
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = clip_gradients_per_param(params, cfg.optim.clip_grad)
        method.before_optimizer_step(epoch)

        # optimizer step
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if with_signals and (scale := loss_scale(self.scaler)) is not None:
            stats["loss_scale"] = scale  # fp16 only: the scale the next step uses (a device scalar)

        # EMA teacher update
        self.ema.update(momentum)
        return {"loss": loss.detach(), "lr": lr, "wd": wd, "momentum": momentum, "grad_norm": grad_norm, **stats}

    def _stop_unhealthy(self, monitor: HealthMonitor, saved_step: int | None) -> None:
        """health.on_collapse=stop: write health.json and raise before the unhealthy state is checkpointed."""
        monitor.stopped_at = self.step - 1
        if self.dist.is_main:
            monitor.write(self.output_dir / "health.json")
        kept = (f"{self.output_dir / 'last.pt'} (after {saved_step} iterations) is the last healthy checkpoint"
                if saved_step is not None else "no checkpoint was written")
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
        if not self.cfg.train.knn_eval or self.val_dir is None or len(self.index.classes) < 2:
            return None
        return knn_evaluate(
            self.method.feature_backbone(), self.train_dir, self.val_dir, self.cfg.data.global_size, self.cfg.eval,
            self.device, self.cfg.data.num_workers,
        )

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        result = TrainResult(self.output_dir, self.step)
        if self.step == 0:
            result.knn_init = self.knn()
            self._snapshot("start")
        images_per_step = cfg.data.batch_size * self.dist.world_size
        logger = RunLogger(self.output_dir, self.stop_step, self.step, images_per_step, self.dist.is_main)
        watch = cfg.health.enabled
        monitor = HealthMonitor(cfg.health, verbose=self.dist.is_main) if watch else None
        saved_step = self.step if resume_path(cfg) == self.output_dir / "last.pt" else None  # what last.pt holds
        try:
            while self.step < self.stop_step:
                epoch = self.step // self.steps_per_epoch
                self.dataset.set_epoch(epoch)
                loader = build_loader(
                    self.dataset, cfg.data.batch_size, cfg.data.num_workers, seed=cfg.train.seed, epoch=epoch,
                    start_step=self.step % self.steps_per_epoch, rank=self.dist.rank,
                    world_size=self.dist.world_size,
                )
                for views, _labels, n_skipped in loader:
                    self.skipped_images += n_skipped
                    last_of_epoch = (self.step + 1) % self.steps_per_epoch == 0
                    log_now = (self.step + 1) % cfg.train.log_every == 0 or self.step + 1 == self.stop_step
                    log_now = log_now or last_of_epoch
                    metrics = self.train_step(views, epoch, with_signals=watch and log_now)
                    self.step += 1
                    if log_now:
                        metrics.update(epoch=epoch, skipped_images=self.skipped_images)
                        result.history.append({"step": self.step - 1, **logger.step(self.step - 1, metrics)})
                        result.last_loss = result.history[-1]["loss"]
                        if monitor is not None:
                            monitor.observe(self.step - 1, result.history[-1])
                            if cfg.health.on_collapse == "stop" and agree(monitor.should_stop, self.device):
                                self._stop_unhealthy(monitor, saved_step)
                    # stop mode never checkpoints a state a health condition holds on (last.pt stays good)
                    keep = monitor is None or cfg.health.on_collapse == "warn" or monitor.healthy
                    if keep and (self.step % cfg.train.ckpt_every == 0 or self.step == self.stop_step or last_of_epoch):
                        self.save()
                        saved_step = self.step
                    if self.step >= self.stop_step:
                        break
        finally:
            logger.close()
        if monitor is not None:
            result.health = monitor.summary()
            if self.dist.is_main:
                monitor.write(self.output_dir / "health.json")
        if self.skipped_images:
            log.warning("%d unreadable images were skipped (see the warnings above for their paths)",
                        self.skipped_images)
        result.steps_done, result.skipped_images = self.step, self.skipped_images
        if self.step == self.stop_step:
            self._snapshot("end")
            result.knn_trained = self.knn()
        return result


def train(cfg: Config) -> TrainResult:
    return Trainer(cfg).fit()
