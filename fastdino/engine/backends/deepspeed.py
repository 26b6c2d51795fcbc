"""DeepSpeed ZeRO stage 1 / 2 backend (Rajbhandari et al. 2020), the same DINO step as ddp.py.

What stays ours, one source of truth with the DDP backend: the AdamW parameter groups (engine/optim.py),
the closed-form lr / weight-decay schedules (set on the groups each step), the per-parameter clipping of
the SPEC, the method's frozen parameters, the EMA teacher (outside DeepSpeed, replicated on every rank)
and the center (all-reduced by TeacherCenter over torch.distributed, which DeepSpeed shares).

How, given ZeRO:
- Precision: bf16 runs DeepSpeed's `torch_autocast` mode, which keeps the student's weights in fp32
  (its `bf16` mode keeps them in bf16, and an EMA step of 1 - m = 4e-3 read from them would be lost).
  fp16 is refused (ConfigError on train.precision), because neither of DeepSpeed's two fp16 routes is
  correct for this step as it stands (DeepSpeed 0.19) and neither can be tested here: DeepSpeed's CPU
  accelerator has no fp16 (`supported_dtypes()` is fp32 and bf16), and fastdino refuses fp16 on the CPU.
  (1) Its `fp16` mode keeps fp16 module weights: the EMA would have to read the fp32 master partitions,
  all-gathered every step. (2) Its `torch_autocast` fp16 mode keeps fp32 weights but steps a torch
  GradScaler once per parameter group, after `unscale_and_clip_grads`: our per-parameter clipping would
  see scaled gradients, and an overflow in one group would skip that group's step only. The route to
  build: torch_autocast fp16 with that GradScaler removed, DeepSpeed's global overflow check
  (`check_grad_overflow`) and dynamic loss scaler kept, the clipping hook unscaling by the scale the
  backward pass used; validated on a GPU.
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

from fastdino.config import ConfigError
from fastdino.engine.backends import Backend
from fastdino.engine.checkpoint import CheckpointError
from fastdino.engine.optim import param_groups
from fastdino.errors import MissingDependencyError
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
    "optimizer": "optim.* (AdamW with engine/optim.py's groups)",
    "scheduler": "optim.* (closed-form schedules)",
    "gradient_clipping": "optim.clip_grad (per parameter)",
}


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as exc:
        raise MissingDependencyError(
            f"train.engine=deepspeed needs the deepspeed package ({exc}): pip install 'fastdino[deepspeed]' "
            "(or deepspeed), or use train.engine=ddp"
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
    (OWNED), ZeRO stage 0 or 3, or CPU offload; and naming train.precision for fp16.
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
    if precision == "fp16":
        raise ConfigError("train.precision=fp16 with train.engine=deepspeed is not supported yet (DeepSpeed's fp16 "
                          "mode keeps fp16 weights, too coarse for the EMA teacher, and its torch-autocast fp16 "
                          "scaler would clip scaled gradients): use train.precision=bf16, or fp16 with "
                          "train.engine=ddp", "train.precision")
    ds.pop("fp16", None)
    ds.update(train_batch_size=batch_size * world_size, train_micro_batch_size_per_gpu=batch_size,
              gradient_accumulation_steps=1, gradient_clipping=0.0, zero_allow_untested_optimizer=True)
    if precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}  # fp32 weights (see the module docstring)
    ds.setdefault("steps_per_print", 2**31 - 1)  # fastdino logs; DeepSpeed's own step lines are off
    return ds


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
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self.ckpt_dir = self.output_dir / "deepspeed"

    def wrap(self, method: Method) -> None:
        """The DeepSpeed engine around the student, with torch AdamW over our groups and the clipping hook."""
        if not dist.is_initialized():  # a single process without a launcher: a group of one, for DeepSpeed
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        self.method = method
        student = method.student_module()
        freezable = {id(p) for p in method.frozen_parameters(0)}
        self.groups = split_groups(param_groups(student), freezable)
        self.group_params = [list(g["params"]) for g in self.groups]  # DeepSpeed replaces them by flat partitions
        optimizer = torch.optim.AdamW(self.groups, lr=0.0, weight_decay=0.0)
        self.engine, self.optimizer, _, _ = self.ds.initialize(
            model=student, optimizer=optimizer, config=self.ds_config, dist_init_required=False)
        self._slices = [self._partition_slices(i) for i in range(len(self.group_params))]
        self.optimizer.unscale_and_clip_grads = types.MethodType(self._unscale_and_clip, self.optimizer)
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
        if opt.loss_scale != 1.0:
            grad.mul_(1.0 / opt.loss_scale)
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
            opt.single_partition_of_fp32_groups[i].grad = None  # AdamW skips the group: no step, no decay

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, epoch: int) -> torch.Tensor:
        frozen = {id(p) for p in self.method.frozen_parameters(epoch)}
        self._frozen = [self.groups[i]["freezable"] and all(id(p) in frozen for p in params)
                        for i, params in enumerate(self.group_params)]
        self._sq_norm = torch.zeros((), device=self.device)
        with phase("optimizer"):  # clipping runs inside DeepSpeed's step (see _unscale_and_clip)
            self.engine.step()
        return self._sq_norm.sqrt()

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
        return {"deepspeed": {"tag": tag, "stage": self.stage, "dir": "deepspeed"}}

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
