"""DeepSpeed ZeRO stage 1 / 2 backend (Rajbhandari et al. 2020), the same DINO step as ddp.py.

What stays ours, one source of truth with the DDP backend: the optimizer (optim.name: torch AdamW or SGD, never
fused here; LARS is refused, its trust ratio needs each parameter whole and ZeRO hands the optimizer flat
partitions) and its parameter groups (engine/optim.py),
the closed-form lr / weight-decay schedules (set on the groups each step), the per-parameter clipping of
the SPEC, the method's frozen parameters, the EMA teacher (outside DeepSpeed, replicated on every rank)
and the center (all-reduced by TeacherCenter over torch.distributed, which DeepSpeed shares).

How, given ZeRO:
- Precision: bf16 runs DeepSpeed's `torch_autocast` mode, which keeps the student's weights in fp32
  (its `bf16` mode keeps them in bf16, and an EMA step of 1 - m = 4e-3 read from them would be lost).
  fp16 runs the same `torch_autocast` mode in float16 (fp32 weights for the EMA), with fastdino's own
  dynamic loss scale (LossScale: torch GradScaler's rule; initial_scale_power and loss_scale_window from
  the JSON's fp16 section, e.g. configs/deepspeed/zero2_fp16.json). DeepSpeed's two routes are not used
  as they stand (DeepSpeed 0.19): its `fp16` mode keeps fp16 module weights, too coarse for the EMA; its
  torch_autocast fp16 mode steps a torch GradScaler once per parameter group after
  `unscale_and_clip_grads`, so the per-parameter clipping would see scaled gradients and an overflow would
  skip only its own group. Instead the backend removes that GradScaler, scales the loss before DeepSpeed's
  backward, turns on DeepSpeed's overflow check (all-reduced over the partitions: an overflow skips every
  group on every rank, no weight decay either) and unscales in the clipping hook by the scale the backward
  used. DeepSpeed's CPU accelerator lists no fp16 and fastdino refuses fp16 on the CPU, so the test forces
  the precision on the CPU: it follows the DDP backend's GradScaler step for step, overflows included.
  Gradient communication: in torch_autocast mode DeepSpeed reduces the gradients of Linear weights in the
  autocast dtype (bf16 / fp16; its `lower_precision_safe_modules`, left at DeepSpeed's default), DDP reduces
  them in fp32: with several processes the two engines differ by that rounding (tests/test_deepspeed.py
  states the tolerances it gives).
- Clipping: ZeRO reduces gradients into flat partitions, one per rank, and a parameter may straddle
  two. Just before the inner optimizer step of each group (DeepSpeed's `unscale_and_clip_grads`, which
  we replace on the optimizer instance; DeepSpeed's own global clipping is off), each rank sums the
  squares of every parameter's slice in its partition, one all-reduce gives every parameter's full
  norm, and each slice is scaled by min(1, clip / (norm + 1e-6)): the SPEC's per-parameter clipping,
  exactly (to float rounding of the split sum), not an approximation.
- Frozen parameters: cancelling `p.grad` after backward does nothing at ZeRO-2 (the gradient already
  sits in the partition). The parameters the method may freeze (`frozen_parameters(0)`: DINO's last
  layer) get parameter groups of their own (same lr / weight decay, same regularized flag), and while
  frozen the hook sets that group's flat fp32 gradient to None, so torch AdamW skips it as the DDP
  backend's `p.grad = None` does: no update, no weight decay, no Adam state or step count.
- A non-finite loss: the hook sets every group's gradient to None on that step (the same skip as a frozen
  group); the flag is read on the host once per step, as DeepSpeed's step takes no device-side one.
- ZeRO stage 3 (partitioned weights: the EMA would need a partitioned teacher) is refused.

Checkpoints: DeepSpeed's own save / load (every rank, its folder `output_dir/deepspeed/<tag>`), and the
run's `last.pt` (rank 0, written after every rank's files) names the tag beside the student, teacher,
center, step and RNG states: `last.pt` is a plain fastdino checkpoint that `fastdino knn` and
`fastdino export` read.
"""

from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path

import torch
import torch.distributed as dist

from fastdino.engine.backends.base import Backend
from fastdino.engine.checkpoint import CheckpointError
from fastdino.engine.optim import make_optimizer, param_groups
from fastdino.errors import ConfigError, MissingDependencyError
from fastdino.methods.base import Method
from fastdino.telemetry import phase

SOURCE_ROOT = Path(__file__).resolve().parents[3]
KEY = "train.deepspeed_config"

# DeepSpeed fields this config fills: set in the JSON too, they would be set twice.
OWNED = {
    "train_batch_size": "data.batch_size x processes",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "1 (one optimizer step per batch)",
    "bf16": "train.precision",
    "torch_autocast": "train.precision",
    "amp": "train.precision",
    "optimizer": "optim.* (optim.name with engine/optim.py's groups)",
    "scheduler": "optim.* (closed-form schedules)",
    "gradient_clipping": "optim.clip_grad (per parameter)",
}
# The JSON's fp16 section: dynamic loss scaling only (train.precision=fp16 turns it on).
FP16_FIELDS = ("loss_scale", "initial_scale_power", "loss_scale_window")


def _import_deepspeed():
    try:
        import deepspeed
    except Exception as exc:  # not installed, or installed but broken (any error while importing)
        raise MissingDependencyError(
            f"train.engine=deepspeed needs the deepspeed package ({type(exc).__name__}: {exc}): pip install "
            "'fastdino[deepspeed]' (or deepspeed), or use train.engine=ddp"
        ) from exc
    return deepspeed


def resolve_config_path(name: str) -> Path:
    """A relative path is looked up in the working directory, then in the fastdino source tree."""
    path = Path(name)
    if not path.is_file() and not path.is_absolute() and (SOURCE_ROOT / path).is_file():
        path = SOURCE_ROOT / path
    if not path.is_file():
        raise ConfigError(f"{KEY}={name}: no such file (the stage 1 / 2 files are in configs/deepspeed/)", KEY)
    return path


def deepspeed_config(name: str, batch_size: int, world_size: int, precision: str) -> dict:
    """The JSON file's settings with the batch and precision fields filled from our config.

    Raises ConfigError naming train.deepspeed_config for an unreadable file, a field this config owns
    (OWNED), ZeRO stage 0 or 3, CPU offload, or an fp16 section other than dynamic loss scaling. The JSON's
    fp16 section becomes `fastdino_fp16` (init_scale, growth_interval), which the backend takes out: fastdino
    scales the loss itself (see the module docstring).
    """
    path = resolve_config_path(name)
    try:
        ds = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{KEY}={name} is not a readable JSON file ({exc})", KEY) from exc
    if not isinstance(ds, dict):
        raise ConfigError(f"{KEY}={name} must hold a JSON object", KEY)
    twice = [f"{field} (set by {ours})" for field, ours in OWNED.items() if field in ds]
    if "enabled" in ds.get("fp16", {}):
        twice.append("fp16.enabled (set by train.precision)")
    if twice:
        raise ConfigError(f"{KEY}={name} sets fields fastdino fills from its own config: {', '.join(twice)}; "
                          "remove them from the JSON file", KEY)
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage == 3:
        raise ConfigError(f"{KEY}={name} asks for ZeRO stage 3 (zero_optimization.stage=3): partitioned weights "
                          "would need a partitioned EMA teacher, not built yet; use stage 1 or 2", KEY)
    if stage not in (1, 2):
        raise ConfigError(f"{KEY}={name}: zero_optimization.stage={stage!r} must be 1 or 2 (stage 0 is "
                          "train.engine=ddp)", KEY)
    if zero.get("offload_optimizer") or zero.get("cpu_offload"):
        raise ConfigError(f"{KEY}={name}: optimizer offload is not supported by fastdino's clipping hook; "
                          "remove zero_optimization.offload_optimizer", KEY)
    fp16 = ds.pop("fp16", {})
    unknown = sorted(set(fp16) - set(FP16_FIELDS))
    if unknown or fp16.get("loss_scale", 0) != 0:
        raise ConfigError(f"{KEY}={name}: fp16 may hold only {', '.join(FP16_FIELDS)} with loss_scale 0 (dynamic "
                          f"loss scaling), not {', '.join(unknown) or 'loss_scale=' + str(fp16['loss_scale'])}", KEY)
    ds["fastdino_fp16"] = {"init_scale": 2.0 ** fp16.get("initial_scale_power", 16),
                           "growth_interval": int(fp16.get("loss_scale_window", 2000))}
    ds.update(train_batch_size=batch_size * world_size, train_micro_batch_size_per_gpu=batch_size,
              gradient_accumulation_steps=1, gradient_clipping=0.0, zero_allow_untested_optimizer=True)
    if precision in ("bf16", "fp16"):  # fp32 weights (see the module docstring)
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    ds.setdefault("steps_per_print", 2**31 - 1)  # fastdino logs; DeepSpeed's own step lines are off
    return ds


class LossScale:
    """Dynamic loss scaling with torch GradScaler's rule (Micikevicius et al. 2018): halve on an overflow and skip
    the step, double after `growth_interval` steps without one. The scale is a host float: DeepSpeed's overflow
    check syncs anyway."""

    def __init__(self, init_scale: float, growth_interval: int):
        self.scale, self.growth_interval, self.good_steps = float(init_scale), growth_interval, 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale, self.good_steps = self.scale * 0.5, 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale, self.good_steps = self.scale * 2.0, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def _forget_earlier_runs() -> None:
    """DeepSpeed keeps per-process state in module globals, made by the first engine and kept for every later one.
    A second run in the same process (tests, a notebook) must not inherit it:
    - deepspeed.utils.groups._WORLD_GROUP, a clone of the world group: after the process group was closed, the
      new default group does not hold it, and DeepSpeed's first broadcast raises;
    - deepspeed.runtime.torch_autocast's TORCH_AUTOCAST_INITIALIZED / _DTYPE, set by a run in DeepSpeed's
      torch-autocast mode: a later fp32 run would then step through an fp16 GradScaler that never saw its
      gradients. DeepSpeed sets them again when this run's config asks for that mode."""
    from deepspeed.runtime import torch_autocast
    from deepspeed.utils import groups

    clone = getattr(groups, "_WORLD_GROUP", None)
    if clone is not None and clone not in dist.distributed_c10d._world.pg_group_ranks:
        groups._WORLD_GROUP = None
    torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE = False, None


def split_groups(groups: list[dict], freezable: set[int]) -> list[dict]:
    """Each group split in two: the parameters the method may freeze, and the others (empty groups dropped)."""
    out = []
    for group in groups:
        for frozen in (False, True):
            params = [p for p in group["params"] if (id(p) in freezable) == frozen]
            if params:
                out.append({**group, "params": params, "freezable": frozen})
    return out


class DeepSpeedBackend(Backend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ds = _import_deepspeed()
        self.ds_config = deepspeed_config(self.cfg.train.deepspeed_config, self.cfg.data.batch_size,
                                          self.dist.world_size, self.precision)
        fp16 = self.ds_config.pop("fastdino_fp16")
        self.scaler = LossScale(**fp16) if self.precision == "fp16" else None
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self.ckpt_dir = self.checkpoint_dir = self.output_dir / "deepspeed"

    def wrap(self, method: Method) -> None:
        """The DeepSpeed engine around the student, with optim.name's torch optimizer over our groups and the clipping
        hook."""
        if not dist.is_initialized():  # a single process without a launcher: a group of one, for DeepSpeed
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        _forget_earlier_runs()
        self.method = method
        student = method.student_module()
        freezable = {id(p) for p in method.frozen_parameters(0)}
        self.groups = split_groups(param_groups(student), freezable)
        self.group_params = [list(g["params"]) for g in self.groups]  # DeepSpeed replaces them by flat partitions
        optimizer = make_optimizer(self.cfg.optim.name, self.groups, fused=False)
        self.engine, self.optimizer, _, _ = self.ds.initialize(
            model=student, optimizer=optimizer, config=self.ds_config, dist_init_required=False)
        self._slices = [self._partition_slices(i) for i in range(len(self.group_params))]
        self.optimizer.unscale_and_clip_grads = types.MethodType(self._unscale_and_clip, self.optimizer)
        if self.scaler is not None:  # our loss scale; DeepSpeed's global overflow check skips every group at once
            self.optimizer.torch_autocast_gradscaler = None
            self.optimizer.check_grad_overflow = True
        self._frozen = [False] * len(self.group_params)
        self._sq_norm = torch.zeros((), device=self.device)
        method.student = self.engine  # `.module` is the student: Method.student_module() unwraps it

    def _partition_slices(self, i: int) -> list[tuple[int, int, int]]:
        """(parameter index in group i, start, end) of each parameter's part of this rank's fp32 partition.

        ZeRO 1/2 flatten group i's parameters in order (plus padding at the end) and give rank r the
        elements [r * partition_size, (r + 1) * partition_size)."""
        opt = self.optimizer
        params = opt.round_robin_bit16_groups[i]
        if [id(p) for p in params] != [id(p) for p in self.group_params[i]]:
            raise RuntimeError("DeepSpeed reordered a parameter group: per-parameter clipping would misalign")
        size = int(opt.partition_size[i])
        lo = dist.get_rank(group=opt.real_dp_process_group[i]) * size
        slices, offset = [], 0
        for j, p in enumerate(params):
            a, b = max(offset, lo), min(offset + p.numel(), lo + size)
            if a < b:
                slices.append((j, a - lo, b - lo))
            offset += p.numel()
        return slices

    @torch.no_grad()
    def _unscale_and_clip(self, opt, grads_flat: list[torch.Tensor], total_norm) -> None:
        """Replaces DeepSpeed's global clipping: unscale, per-parameter clipping, frozen group skipped."""
        grad = grads_flat[0]  # this rank's fp32 gradient partition of one group
        i = next(k for k, part in enumerate(opt.single_partition_of_fp32_groups) if part.grad is grad)
        scale = opt.loss_scale * (self._scale_used if self.scaler is not None else 1.0)
        if scale != 1.0:
            grad.mul_(1.0 / scale)
        sq = torch.zeros(len(self.group_params[i]), dtype=torch.float32, device=grad.device)
        for j, a, b in self._slices[i]:
            sq[j] += grad[a:b].float().pow(2).sum()
        dist.all_reduce(sq, group=opt.real_dp_process_group[i])  # (n_params,) squared norms of full gradients
        norms = sq.sqrt()
        self._sq_norm = self._sq_norm + sq.sum()
        if self.cfg.optim.clip_grad > 0:
            coefs = torch.clamp(self.cfg.optim.clip_grad / (norms + 1e-6), max=1.0)
            for j, a, b in self._slices[i]:
                grad[a:b].mul_(coefs[j])
        if self._frozen[i]:
            opt.single_partition_of_fp32_groups[i].grad = None  # the optimizer skips the group: no step, no decay

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            self.engine.backward(loss)
            return
        self._scale_used = self.scaler.scale
        self.engine.backward(loss * self._scale_used)

    def step(self, epoch: int, loss_finite: torch.Tensor) -> torch.Tensor:
        frozen = {id(p) for p in self.method.frozen_parameters(epoch)}
        skip = not bool(loss_finite)  # one host read: DeepSpeed's step takes no device-side skip flag
        self._frozen = [skip or (self.groups[i]["freezable"] and all(id(p) in frozen for p in params))
                        for i, params in enumerate(self.group_params)]
        self._sq_norm = torch.zeros((), device=self.device)
        with phase("optimizer"):  # clipping runs inside DeepSpeed's step (see _unscale_and_clip)
            self.engine.step()
        if self.scaler is None:
            return self._sq_norm.sqrt()
        overflow = bool(self.optimizer.overflow)  # all-reduced by DeepSpeed: every group of every rank skipped
        self.scaler.update(overflow)
        return torch.full((), float("inf"), device=self.device) if overflow else self._sq_norm.sqrt()

    def loss_scale(self) -> torch.Tensor | None:
        return None if self.scaler is None else torch.tensor(self.scaler.scale, device=self.device)

    # -- checkpoints: DeepSpeed's files on every rank, then last.pt names their tag --------------------------
    def state_dict(self) -> dict:
        tag = f"step{self.engine.global_steps}"
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, save_latest=False)
        dist.barrier()  # every rank's files are complete before rank 0 writes last.pt naming them
        if self.dist.local_rank == 0 and self.ckpt_dir.is_dir():  # keep this tag and the one last.pt names now
            keep = {tag, getattr(self, "_last_tag", None)}
            for old in self.ckpt_dir.iterdir():
                if old.is_dir() and old.name.startswith("step") and old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)
        self._last_tag = tag
        saved = {"tag": tag, "stage": self.stage, "dir": "deepspeed"}
        if self.scaler is not None:
            saved["loss_scale"] = self.scaler.state_dict()
        return {"deepspeed": saved}

    def load_state_dict(self, ckpt: dict, path: Path) -> None:
        saved = ckpt.get("deepspeed")
        if saved is None:
            raise CheckpointError(f"checkpoint {path} was not written by train.engine=deepspeed (no DeepSpeed state): "
                                  "resume with the engine that wrote it, or start afresh (train.resume=none)")
        folder = path.parent / saved["dir"]
        if not (folder / saved["tag"]).is_dir():
            raise CheckpointError(f"checkpoint {path} names DeepSpeed state {folder / saved['tag']}, which is missing")
        try:
            loaded, _ = self.engine.load_checkpoint(str(folder), tag=saved["tag"], load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        except (RuntimeError, ValueError, KeyError, AssertionError) as exc:
            raise CheckpointError(f"DeepSpeed state {folder / saved['tag']} does not match this run: {exc}") from exc
        if loaded is None:
            raise CheckpointError(f"DeepSpeed state {folder / saved['tag']} could not be loaded")
        self._last_tag = saved["tag"]
        if self.scaler is not None and "loss_scale" in saved:
            self.scaler.load_state_dict(saved["loss_scale"])
