"""What a run reports: a tqdm progress bar, a JSONL file of metrics, TensorBoard when installed, NVML counters
on a GPU, and at the end summary.json and curves.png."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fastdino.config import HealthConfig
from fastdino.reports.plots import plot_run_curves, read_metrics
from fastdino.telemetry import GpuTelemetry

log = logging.getLogger("fastdino")


def _read(metrics: dict) -> dict:
    """Device scalars to floats in one transfer (a single host sync); plain numbers pass through."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    values = dict(metrics)
    if keys:
        device = metrics[keys[0]].device
        stacked = torch.stack([metrics[k].detach().float().reshape(()).to(device) for k in keys])
        values.update(zip(keys, stacked.tolist()))
    return values


class RunLogger:
    """Reads device values (one host sync) only every `log_every` steps, never in between; with a CUDA `device`
    each logged line also holds the GPU's NVML counters (fastdino.telemetry.GPU_KEYS)."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, images_per_step: int, enabled: bool,
                 device: torch.device | None = None):
        self.enabled = enabled
        self.telemetry = GpuTelemetry(device) if enabled and device is not None else None
        self.images_per_step = images_per_step
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, disable=not enabled)
        self.jsonl_path = output_dir / "metrics.jsonl"
        self.jsonl = _open_jsonl(self.jsonl_path) if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tb"))
            except ImportError:
                log.info("tensorboard is not installed: metrics go to metrics.jsonl only")
            except Exception as exc:  # installed but broken (any error while importing or starting): skipped
                log.warning("tensorboard failed to start (%s: %s): metrics go to metrics.jsonl only",
                            type(exc).__name__, exc)
        self._last_time = time.perf_counter()
        self._last_step = start_step

    def step(self, step: int, metrics: dict) -> dict:
        """Log `metrics` (device tensors or numbers) at iteration `step`; returns them as floats."""
        now = time.perf_counter()
        n = step + 1 - self._last_step
        values = _read(metrics)
        values["img_per_s"] = n * self.images_per_step / max(now - self._last_time, 1e-9)
        if self.telemetry is not None:
            values.update(self.telemetry.sample())
        self._last_time, self._last_step = now, step + 1
        if self.enabled:
            self.bar.update(n)
            self.bar.set_postfix(
                loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", mom=f"{values['momentum']:.5f}",
                img_s=f"{values['img_per_s']:.1f}",
            )
            self._append({"step": step, **values})
            if self.tb is not None:
                for k, v in values.items():
                    if isinstance(v, (int, float)):
                        self.tb.add_scalar(f"train/{k}", v, step)
        return values

    def log_eval(self, step: int, values: dict) -> None:
        """An evaluation (e.g. `{"epoch": 2, "knn_top1": 97.5}`) after `step` iterations: one JSONL line and
        TensorBoard `eval/*` scalars."""
        if self.enabled:
            self._append({"step": step, **values})
            if self.tb is not None:
                for k, v in values.items():
                    self.tb.add_scalar(f"eval/{k}", v, step)

    def _append(self, record: dict) -> None:
        """One JSONL line; an OSError names the file (a file object's write does not)."""
        try:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.jsonl_path)) from exc

    def write(self, message: str) -> None:
        """A line above the bar (tqdm.write keeps the bar intact)."""
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            try:
                self.jsonl.close()
                if self.tb is not None:
                    self.tb.close()
            except OSError:  # a full disk: the write that failed first has said so
                pass


def _open_jsonl(path: Path):
    """metrics.jsonl for appending; a last line cut short (a full disk, a kill mid-write) is dropped first, with a
    warning, so the next record starts on a line of its own."""
    if path.is_file() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("%s: dropped a damaged last line (%d bytes; a write cut short)", path, len(data) - keep)
            with open(path, "r+b") as f:
                f.truncate(keep)
    return open(path, "a")


def write_run_report(output_dir: Path, summary: dict, health: HealthConfig | None = None) -> tuple[Path, Path | None]:
    """End of a run: output_dir/summary.json (`summary`; non-finite floats become null, as JSON has no NaN) and
    output_dir/curves.png drawn from output_dir/metrics.jsonl (reports.plots.plot_run_curves); no curves when
    no iteration was logged (a run stopped at its first step). Returns both paths (None for missing curves)."""
    summary_path = output_dir / "summary.json"
    clean = json.loads(json.dumps(summary, default=str), parse_constant=lambda _: None)
    summary_path.write_text(json.dumps(clean, indent=2) + "\n")
    metrics = output_dir / "metrics.jsonl"
    if not metrics.is_file() or not read_metrics(metrics)[0]:
        return summary_path, None
    return summary_path, plot_run_curves(metrics, output_dir / "curves.png", health, title=output_dir.name)
