"""What a run measures about itself: GPU counters through NVML, and the phases of the training step (issue 16).

GPU telemetry: `GpuTelemetry(device).sample()` reads the training GPU's utilisation, memory used, power,
temperature and SM clock through NVIDIA's management library (NVML, Python bindings `pynvml` from the
`nvidia-ml-py` package: `pip install 'fastdino[gpu]'`). A sample is a few NVML queries and no CUDA
synchronisation, so the trainer takes one on every log step. With no CUDA device, no pynvml or no working
NVML, the process gets one notice, 'GPU telemetry unavailable: <why>', and samples are empty: never a crash.

Step phases: `with phase("backward"): ...` marks a phase of the training step. It is a no-op (a shared
`nullcontext`) unless a `PhaseTimer` is active, which is what `fastdino profile` does; the step code then
reads top to bottom with no `if profiling` branches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

log = logging.getLogger("fastdino")

# Keys of a sample, as logged in metrics.jsonl: NVML's units converted to these.
GPU_KEYS = {
    "gpu_util_pct": "% of the last sample period in which a kernel ran",
    "gpu_mem_used_gib": "device memory used by all processes, GiB",
    "gpu_power_w": "board power draw, W",
    "gpu_temp_c": "GPU die temperature, degrees C",
    "gpu_sm_clock_mhz": "SM clock, MHz",
}

_notice_given = False


def _notice(why: str, quiet: bool) -> None:
    """The one 'unavailable' notice of the process (a warning when a GPU is there but cannot be read)."""
    global _notice_given
    if quiet or _notice_given:
        return
    _notice_given = True
    level = logging.INFO if why.startswith("the training device is") else logging.WARNING
    log.log(level, "GPU telemetry unavailable: %s", why)


def _nvml_handle(nvml, device: torch.device):
    """The NVML handle of torch's CUDA `device`, found by PCI address: torch numbers the devices that
    CUDA_VISIBLE_DEVICES leaves visible, NVML numbers every GPU of the machine."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    if all(hasattr(props, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
        return nvml.nvmlDeviceGetHandleByPciBusId(bus_id)
    return nvml.nvmlDeviceGetHandleByIndex(index)


class GpuTelemetry:
    """NVML counters of one CUDA device; `sample()` returns {} when they cannot be read.

    Args:
        device: the training device (torch.device or string); anything but CUDA is 'unavailable'.
        quiet: do not log the 'unavailable' notice (callers that print `line()` themselves).
    Attributes:
        reason: why telemetry is unavailable (None when it is available).
    """

    def __init__(self, device: torch.device | str, quiet: bool = False):
        self.reason: str | None = None
        self._nvml = self._handle = None
        self._quiet = quiet
        device = torch.device(device)
        if device.type != "cuda":
            self._unavailable(f"the training device is the {device.type.upper()}, not a CUDA GPU")
            return
        try:
            import pynvml
        except ImportError:
            self._unavailable("pynvml is not installed (pip install 'fastdino[gpu]' brings nvidia-ml-py)")
            return
        except Exception as exc:  # installed but broken: reported once, skipped
            self._unavailable(f"pynvml failed to import ({type(exc).__name__}: {exc})")
            return
        try:
            pynvml.nvmlInit()
            self._handle = _nvml_handle(pynvml, device)
        except (pynvml.NVMLError, RuntimeError) as exc:
            self._unavailable(f"NVML did not start ({exc})")
            return
        self._nvml = pynvml

    def _unavailable(self, why: str) -> None:
        self.reason, self._handle = why, None
        _notice(why, self._quiet)

    @property
    def available(self) -> bool:
        return self._handle is not None

    def sample(self) -> dict[str, float]:
        """The counters now, keyed as GPU_KEYS (floats); a counter the GPU does not report is left out."""
        if self._handle is None:
            return {}
        nvml, h = self._nvml, self._handle
        queries = {
            "gpu_util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
            "gpu_mem_used_gib": lambda: nvml.nvmlDeviceGetMemoryInfo(h).used / 2**30,
            "gpu_power_w": lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1e3,  # NVML: milliwatts
            "gpu_temp_c": lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
            "gpu_sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
        }
        values = {}
        for key, query in queries.items():
            try:
                values[key] = float(query())
            except nvml.NVMLError_NotSupported:
                continue
            except nvml.NVMLError as exc:  # the driver went away mid-run: stop asking, say so once
                self._unavailable(f"an NVML query failed ({exc})")
                return {}
        return values

    def line(self) -> str:
        """One line for a report or a benchmark's output."""
        if self._handle is None:
            return f"GPU telemetry unavailable: {self.reason}"
        return "GPU telemetry: " + describe(self.sample())


def describe(sample: dict[str, float]) -> str:
    """'97% busy, 41.2 GiB used, 612 W, 63 C, SM 1980 MHz' from a sample (missing counters left out)."""
    formats = {"gpu_util_pct": "{:.0f}% busy", "gpu_mem_used_gib": "{:.1f} GiB used", "gpu_power_w": "{:.0f} W",
               "gpu_temp_c": "{:.0f} C", "gpu_sm_clock_mhz": "SM {:.0f} MHz"}
    return ", ".join(f.format(sample[k]) for k, f in formats.items() if k in sample) or "no counter reported"


# -- step phases ------------------------------------------------------------------------------------
_active: PhaseTimer | None = None
_NOOP = nullcontext()


def phase(name: str) -> AbstractContextManager:
    """Marks a phase of the training step: a no-op unless a PhaseTimer is active."""
    timer = _active
    return _NOOP if timer is None else timer.span(name)


class PhaseTimer:
    """Times the `phase` ranges run while it is active (`with PhaseTimer(device) as timer:`).

    On a CUDA device each range is a pair of CUDA events: the device time between the points where the host
    enqueued them, which is what the GPU spends on the phase (stream order; ranges do not overlap). On the
    CPU it is wall clock (`time.perf_counter`). Each range is also a `torch.profiler.record_function`
    range, so phases show by name in a profiler trace. Phases must not nest.
    """

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._spans: list[tuple[str, object, object]] = []

    def __enter__(self) -> PhaseTimer:
        global _active
        if _active is not None:
            raise RuntimeError("a PhaseTimer is already active")
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        with torch.profiler.record_function(name):
            start = self._now()
            try:
                yield
            finally:
                self._spans.append((name, start, self._now()))

    def totals_ms(self) -> dict[str, float]:
        """Total milliseconds per phase name over every range so far, in order of first appearance
        (synchronises the device on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for name, start, end in self._spans:
            ms = start.elapsed_time(end) if self.cuda else 1e3 * (end - start)
            totals[name] = totals.get(name, 0.0) + ms
        return totals
