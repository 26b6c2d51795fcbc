"""Training health: cheap collapse and divergence signals, and a monitor that says what to change.

DINO avoids collapse only by balancing centering against sharpening (Caron et al. 2021, Sec. 5.3 and
Fig. 7): centering alone drives the teacher to the uniform distribution (its entropy rises to log K),
sharpening alone to one dimension (the entropy of the batch-mean teacher distribution falls to 0); in
both cases the KL between teacher and student goes to 0. A collapsed backbone maps every image to the same
direction, so the spread of its L2-normalised features across the batch goes to 0 (the SimSiam measure).

The signal functions run on device tensors in fp32 and return device scalars: nothing here reads a value
on the host. A method calls them only when the engine asks for signals (log steps) and returns them in its
stats; `RunLogger` reads them on the log step, and `HealthMonitor` watches the logged floats by name, so
any method that logs the same names is watched the same way.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fastdino.config import HealthConfig

log = logging.getLogger("fastdino")

# The logged names the monitor watches (a method provides what it can; absent names are not checked).
ENTROPY_RATIO = "teacher_entropy_ratio"
MEAN_ENTROPY_RATIO = "teacher_mean_entropy_ratio"
FEATURE_STD_RATIO = "feature_std_ratio"
DIVERGENCE_KEYS = ("loss", "grad_norm")
LOSS_SCALE = "loss_scale"
SUMMARY_KEYS = (
    "loss", "grad_norm", "teacher_entropy", ENTROPY_RATIO, "teacher_mean_entropy", MEAN_ENTROPY_RATIO,
    "kl_student_teacher", "feature_std", FEATURE_STD_RATIO, "center_norm", LOSS_SCALE,
)


class TrainingHealthError(RuntimeError):
    """health.on_collapse=stop and the run collapsed or diverged; the message names the kind and the knobs."""


def loss_scale(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """The GradScaler's current scale as a device scalar (fp16 only; `get_scale()` would sync)."""
    if not scaler.is_enabled():
        return None
    scale = scaler._get_scale_async()
    return None if scale is None else scale.detach().clone()


# -- the monitor --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    name: str
    meaning: str
    knobs: str


KINDS = {
    "collapse_uniform": Kind(
        "collapse to uniform",
        "the teacher gives every output dimension about the same probability, so the loss sits near log K "
        "and the student learns nothing (centering wins over sharpening)",
        "sharpen the teacher: lower dino.teacher_temp (0.04) and dino.warmup_teacher_temp, or warm it up over "
        "dino.warmup_teacher_temp_epochs; keep dino.center_momentum at 0.9; lower optim.lr or lengthen "
        "optim.warmup_epochs; with a small batch a smaller dino.out_dim helps; on a short run from random init "
        "where every image gets the same output, dino.head_bn=true (BatchNorm in the head)",
    ),
    "collapse_one_dim": Kind(
        "collapse to one dimension",
        "one output dimension takes the probability mass of the whole batch (sharpening wins over centering)",
        "strengthen centering: dino.center_momentum back to 0.9 (1.0 switches centering off); soften the "
        "teacher: raise dino.teacher_temp towards 0.04-0.07; slow the teacher: raise dino.momentum_teacher "
        "(e.g. 0.996-0.9995); lower optim.lr",
    ),
    "feature_collapse": Kind(
        "feature collapse",
        "the backbone maps different images to nearly the same feature vector",
        "lower optim.lr or lengthen optim.warmup_epochs; raise dino.momentum_teacher; fix any collapse of "
        "the teacher distribution reported above (it drags the backbone along); check dino.out_dim is not "
        "tiny",
    ),
    "divergence": Kind(
        "divergence",
        "the loss or the gradient norm grew by orders of magnitude (or the fp16 loss scale collapsed)",
        "lower optim.lr or lengthen optim.warmup_epochs; keep optim.clip_grad on (3.0); use "
        "train.precision=bf16 instead of fp16; keep dino.norm_last_layer=true and "
        "dino.freeze_last_layer_epochs >= 1",
    ),
}


@dataclass
class _Finding:
    first_step: int
    last_step: int
    checks: int = 0
    warnings: int = 0
    last_warned: int | None = None
    detail: str = ""


class HealthMonitor:
    """Watches the logged values of each log step; warns (once, then every `warn_every` iterations while a
    condition holds) and, with on_collapse=stop, asks the engine to stop. Reads floats only: no syncs."""

    def __init__(self, cfg: HealthConfig, verbose: bool = True, window: int = 20):
        self.cfg = cfg
        self.verbose = verbose
        self.checks = 0
        self.holding: dict[str, str] = {}  # kind -> detail, for the conditions confirmed at the last check
        self.findings: dict[str, _Finding] = {}
        self._streak: dict[str, int] = {}
        self._history: dict[str, deque] = {k: deque(maxlen=window) for k in DIVERGENCE_KEYS}
        self._ranges: dict[str, dict[str, float]] = {}
        self.stopped_at: int | None = None

    @property
    def healthy(self) -> bool:
        """No condition holds at the last check (pending ones included: stop mode does not checkpoint them)."""
        return not any(self._streak.values())

    @property
    def should_stop(self) -> bool:
        return self.cfg.on_collapse == "stop" and bool(self.holding)

    def _conditions(self, step: int, values: dict) -> dict[str, str]:
        """kind -> what was seen, for every condition that holds in `values` at iteration `step`."""
        cfg, seen = self.cfg, {}

        def add(kind: str, detail: str) -> None:
            seen[kind] = f"{seen[kind]}; {detail}" if kind in seen else detail

        if step >= cfg.grace_steps:
            v = values.get(ENTROPY_RATIO)
            if v is not None and v > cfg.uniform_entropy_ratio:
                add("collapse_uniform", f"{ENTROPY_RATIO}={v:.4f} > {cfg.uniform_entropy_ratio}")
            v = values.get(MEAN_ENTROPY_RATIO)
            if v is not None and v < cfg.one_dim_entropy_ratio:
                add("collapse_one_dim", f"{MEAN_ENTROPY_RATIO}={v:.4f} < {cfg.one_dim_entropy_ratio}")
            v = values.get(FEATURE_STD_RATIO)
            if v is not None and v < cfg.feature_std_ratio:
                add("feature_collapse", f"{FEATURE_STD_RATIO}={v:.4g} < {cfg.feature_std_ratio}")
        fp16 = values.get(LOSS_SCALE) is not None
        for key in DIVERGENCE_KEYS:
            v = values.get(key)
            if v is None:
                continue
            history = self._history[key]
            if not math.isfinite(v):
                if not (fp16 and key == "grad_norm"):  # under fp16 an inf gradient is a skipped step
                    add("divergence", f"{key}={v}")
                continue
            reference = statistics.median(history) if len(history) >= min(5, history.maxlen) else None
            if reference is not None and v > cfg.divergence_factor * max(reference, 1e-12):
                ratio = v / max(reference, 1e-12)
                add("divergence", f"{key}={v:.4g} is {ratio:.3g}x its recent median {reference:.4g}")
            else:
                history.append(v)  # the reference only learns from healthy steps
        v = values.get(LOSS_SCALE)
        if v is not None and v < cfg.min_loss_scale:
            add("divergence", f"{LOSS_SCALE}={v:.4g} < {cfg.min_loss_scale} (fp16 overflows at every step)")
        return seen

    def observe(self, step: int, values: dict) -> list[str]:
        """Check the logged `values` (floats) of iteration `step`; returns the warnings emitted now."""
        self.checks += 1
        for key in SUMMARY_KEYS:
            v = values.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                r = self._ranges.setdefault(key, {"first": v, "min": v, "max": v})
                r.update(last=v, min=min(r["min"], v), max=max(r["max"], v))
        seen = self._conditions(step, values)
        self._streak = {k: self._streak.get(k, 0) + 1 for k in seen}
        self.holding = {k: seen[k] for k, n in self._streak.items() if n >= self.cfg.patience}
        messages = []
        for kind, detail in self.holding.items():
            f = self.findings.setdefault(kind, _Finding(step, step))
            f.last_step, f.checks, f.detail = step, f.checks + 1, detail
            if f.last_warned is None or step - f.last_warned >= self.cfg.warn_every:
                f.last_warned, f.warnings = step, f.warnings + 1
                messages.append(self.message(kind, step, detail))
        for kind, f in self.findings.items():
            if kind not in self.holding:
                f.last_warned = None  # it went away: warn at once if it comes back
        if self.verbose:
            for m in messages:
                log.warning(m)
        return messages

    @staticmethod
    def message(kind: str, step: int, detail: str) -> str:
        k = KINDS[kind]
        return f"training health: {k.name} at iteration {step} ({detail}): {k.meaning}. Usually fixed by: {k.knobs}."

    def summary(self) -> dict:
        """End-of-run report: status, each kind seen (first/last iteration, checks held) and signal ranges."""
        status = "stopped" if self.stopped_at is not None else ("unhealthy" if self.findings else "healthy")
        return {
            "status": status,
            "checks": self.checks,
            "stopped_at": self.stopped_at,
            "findings": {
                kind: {"name": KINDS[kind].name, "first_step": f.first_step, "last_step": f.last_step,
                       "checks": f.checks, "warnings": f.warnings, "detail": f.detail, "knobs": KINDS[kind].knobs}
                for kind, f in self.findings.items()
            },
            "signals": self._ranges,
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.summary(), indent=2) + "\n")


def summary_line(health: dict | None) -> str:
    """One line for the end of a run: `health: ok ...` or the kinds seen and where."""
    if not health:
        return "health: not watched (health.enabled=false)"
    if not health["findings"]:
        return f"health: ok (no collapse or divergence in {health['checks']} checks)"
    seen = "; ".join(
        f"{f['name']} at iterations {f['first_step']}-{f['last_step']} ({f['checks']} checks)"
        for f in health["findings"].values()
    )
    return f"health: {health['status'].upper()}: {seen}; see health.json for the knobs"


def agree(flag: bool, device: torch.device) -> bool:
    """True on every process when it is true on any (one host sync; called on log steps only in stop mode)."""
    return agree_each([flag], device)[0]


def agree_each(flags: list[bool], device: torch.device) -> list[bool]:
    """`agree` for several flags in one all-reduce (MAX): each true on every process when true on any."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
