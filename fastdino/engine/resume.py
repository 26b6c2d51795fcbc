"""Resuming a run: which checkpoint, and whether it fits this config and these images (refused in one line
naming the keys when it does not). The trainer calls these before restoring any state.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastdino.config import Config, config_to_dict
from fastdino.data.files import DataError, ImageIndex
from fastdino.engine.checkpoint import CheckpointError
from fastdino.errors import ConfigError
from fastdino.methods import method_class

# Keys that fix the shapes of the networks for every method; each method adds its own (Method.ARCH_KEYS).
# A checkpoint must agree on all of them to be loaded.
ARCH_KEYS = {"model": ("arch", "patch_size", "img_size", "depth"), "train": ("method",)}


def index_fingerprint(index: ImageIndex, root: Path) -> str:
    """SHA-1 of the images' paths relative to the data folder (a shard member: the path its key records) and
    their labels: which images, in which order, not where the folder lives (a moved data set still resumes, a
    folder's run resumes on the shards made from it)."""
    digest = hashlib.sha1()
    for name, label in zip(index.image_ids(root), index.labels):
        digest.update(f"{name}\0{label}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


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


# Keys a resumed run may change: where files go, logging, evaluation, the health watch, and choices between
# implementations of the same math. Every other key changes the trajectory and is checked on resume.
FREE_SECTIONS = ("eval", "health")
FREE_KEYS = {
    "model": ("attention", "compile", "grad_checkpointing"),
    "data": ("path", "num_workers"),
    "optim": ("fused",),
    "loss": ("impl",),
    "ema": ("impl",),
    "train": ("epochs", "max_steps", "output_dir", "resume", "device", "log_every", "ckpt_every", "knn_eval",
              "allow_config_change", "init_from", "dist_timeout", "stop_signals"),
}


def check_resume(saved: dict, cfg: Config, path: Path, world_size: int, n_images: int, fingerprint: str,
                 stop_step: int) -> list[str]:
    """Refuse a resume whose settings would silently change the run; return notices for allowed changes.

    saved: the checkpoint (its `config`, and `world_size` / `n_images`, absent before 2026-11-30: those
    checks are then skipped). The data position (iteration s = images s*G..(s+1)*G-1 of the epoch's order)
    only holds for the same global batch G and the same image set, so changes there are always refused;
    other trajectory keys are refused unless train.allow_config_change is true.
    Raises ConfigError / DataError naming the keys.
    """
    was, now = saved["config"], config_to_dict(cfg)
    default = config_to_dict(Config())  # a key added since the checkpoint was written: its default
    old_world = saved.get("world_size")
    old_global = was["data"]["batch_size"] * (old_world or world_size)
    new_global = cfg.data.batch_size * world_size
    if old_global != new_global:
        raise ConfigError(
            f"checkpoint {path} was trained with a global batch of {old_global} (data.batch_size="
            f"{was['data']['batch_size']} x {old_world or world_size} processes), this run has {new_global} "
            f"(data.batch_size={cfg.data.batch_size} x {world_size}): its place in the data order does not map onto "
            "another global batch; resume with the same product, or start afresh (train.resume=none or another "
            "train.output_dir)", "data.batch_size",
        )
    if saved.get("n_images") not in (None, n_images):
        raise DataError(
            f"data.path {cfg.data.path} holds {n_images} training images, the run in checkpoint {path} was trained "
            f"on {saved['n_images']}: the epoch length and data order would change; resume on the same images or "
            "start afresh (train.resume=none or another train.output_dir)"
        )
    if saved.get("index_fingerprint") not in (None, fingerprint):
        raise DataError(
            f"data.path {cfg.data.path} holds other training images (names or classes) than the run in checkpoint "
            f"{path} was trained on: the data order would change; resume on the same images or start afresh "
            "(train.resume=none or another train.output_dir)"
        )
    changed = [
        f"{section}.{key}={now[section][key]!r} (checkpoint: {old!r})"
        for section, values in now.items() if section not in FREE_SECTIONS
        for key in values if key not in FREE_KEYS.get(section, ())
        if (old := was.get(section, {}).get(key, default[section][key])) != now[section][key]
    ]
    if changed and not cfg.train.allow_config_change:
        raise ConfigError(
            f"train.resume: these settings differ from checkpoint {path} and change the run's trajectory: "
            + ", ".join(changed) + "; set train.allow_config_change=true to resume with them anyway (e.g. a lower "
            "optim.lr after a divergence), or start afresh (train.resume=none or another train.output_dir)",
            "train.allow_config_change",
        )
    notices = [f"resuming with changed settings (train.allow_config_change=true): {', '.join(changed)}"]
    notices = notices if changed else []
    if was["train"]["epochs"] != cfg.train.epochs and saved["step"] < stop_step:
        notices.append(f"train.epochs changed from {was['train']['epochs']} to {cfg.train.epochs}: the lr, "
                       "weight-decay and teacher-momentum schedules now span the new length")
    return notices
