"""GPU telemetry (NVML) and step phases: one 'unavailable' notice and no crash without a GPU or pynvml, the
unit conversions against a fake NVML, phase timing and its no-op default."""

import json
import logging
import sys
import time
import types

import pytest
import torch

from fastdino import telemetry
from fastdino.engine.logging import RunLogger
from fastdino.telemetry import GpuTelemetry, PhaseTimer, phase


@pytest.fixture(autouse=True)
def fresh_notice(monkeypatch):
    monkeypatch.setattr(telemetry, "_notice_given", False)


def notices(caplog):
    return [r for r in caplog.records if "GPU telemetry unavailable" in r.getMessage()]


def test_cpu_device_is_unavailable_with_one_notice(caplog):
    caplog.set_level(logging.INFO, logger="fastdino")
    first, second = GpuTelemetry("cpu"), GpuTelemetry(torch.device("cpu"))
    assert not first.available and first.sample() == {} and second.sample() == {}
    assert "CPU" in first.reason and first.line() == f"GPU telemetry unavailable: {first.reason}"
    assert len(notices(caplog)) == 1 and notices(caplog)[0].levelno == logging.INFO


def test_without_pynvml_one_warning_and_no_crash(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    for _ in range(3):
        gpu = GpuTelemetry("cuda")
        assert gpu.sample() == {} and not gpu.available
    assert "pynvml is not installed" in gpu.reason and "fastdino[gpu]" in gpu.reason
    assert len(notices(caplog)) == 1 and notices(caplog)[0].levelno == logging.WARNING


def test_quiet_gives_no_notice(caplog):
    caplog.set_level(logging.INFO, logger="fastdino")
    assert "unavailable" in GpuTelemetry("cpu", quiet=True).line()
    assert notices(caplog) == []


def test_nvml_that_cannot_start_is_unavailable(fake_gpu, caplog):
    fake_gpu()

    def no_driver():
        raise FakeNVMLError("Driver Not Loaded")

    sys.modules["pynvml"].nvmlInit = no_driver
    for _ in range(2):
        gpu = GpuTelemetry("cuda")
        assert gpu.sample() == {} and not gpu.available and "NVML did not start (Driver Not Loaded)" in gpu.reason
    assert len(notices(caplog)) == 1


def test_pynvml_that_fails_to_import_is_unavailable(monkeypatch, caplog):
    """Installed but broken (its import raises something other than ImportError): one notice, no crash."""
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_FailingImport("pynvml"), *sys.meta_path])
    gpu = GpuTelemetry("cuda")
    assert gpu.sample() == {} and "pynvml failed to import (RuntimeError: broken build)" in gpu.reason
    assert len(notices(caplog)) == 1


class _FailingImport:
    """A meta-path finder whose module `name` raises RuntimeError while it is imported."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, name, path=None, target=None):
        import importlib.util

        return importlib.util.spec_from_loader(name, self) if name == self.name else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise RuntimeError("broken build")


class FakeNVMLError(Exception):
    pass


class FakeNotSupported(FakeNVMLError):
    pass


def fake_nvml(fail_after: int | None = None):
    """A stand-in for pynvml with fixed readings in NVML's units; `fail_after` sample calls, queries fail."""
    calls = {"bus_id": None, "n": 0}

    def query(value):
        def read(*_args):
            calls["n"] += 1
            if fail_after is not None and calls["n"] > fail_after:
                raise FakeNVMLError("GPU is lost")
            return value
        return read

    def not_supported(*_args):
        raise FakeNotSupported("not supported")

    def by_bus(bus_id):
        calls["bus_id"] = bus_id
        return "handle"

    module = types.SimpleNamespace(
        NVMLError=FakeNVMLError, NVMLError_NotSupported=FakeNotSupported, NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1,
        nvmlInit=lambda: None, nvmlDeviceGetHandleByPciBusId=by_bus,
        nvmlDeviceGetUtilizationRates=query(types.SimpleNamespace(gpu=87, memory=40)),
        nvmlDeviceGetMemoryInfo=query(types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)),
        nvmlDeviceGetPowerUsage=query(412_500),  # milliwatts
        nvmlDeviceGetTemperature=query(61),
        nvmlDeviceGetClockInfo=not_supported,
    )
    return module, calls


@pytest.fixture
def fake_gpu(monkeypatch):
    def install(fail_after=None):
        module, calls = fake_nvml(fail_after)
        monkeypatch.setitem(sys.modules, "pynvml", module)
        props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        return calls
    return install


def test_sample_converts_nvml_units_and_skips_unsupported(fake_gpu):
    calls = fake_gpu()
    gpu = GpuTelemetry("cuda")
    assert calls["bus_id"] == "00000000:3B:00.0"  # found by PCI address, not by torch's index
    assert gpu.available and gpu.sample() == {
        "gpu_util_pct": 87.0, "gpu_mem_used_gib": 3.0, "gpu_power_w": 412.5, "gpu_temp_c": 61.0,
    }
    assert gpu.line() == "GPU telemetry: 87% busy, 3.0 GiB used, 412 W, 61 C"


def test_nvml_failing_mid_run_stops_sampling_with_one_notice(fake_gpu, caplog):
    fake_gpu(fail_after=4)
    gpu = GpuTelemetry("cuda")
    assert len(gpu.sample()) == 4
    assert gpu.sample() == {} and gpu.sample() == {} and not gpu.available
    assert "GPU is lost" in gpu.reason and len(notices(caplog)) == 1


def test_run_logger_writes_gpu_counters_on_log_steps(fake_gpu, tmp_path):
    fake_gpu()
    logger = RunLogger(tmp_path, 10, 0, 4, enabled=True, device=torch.device("cuda"))
    logger.step(0, {"loss": torch.tensor(2.5), "lr": 1e-3, "momentum": 0.996})
    logger.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["loss"] == 2.5 and line["gpu_util_pct"] == 87.0 and line["gpu_power_w"] == 412.5


def test_run_logger_on_the_cpu_logs_no_gpu_keys(tmp_path):
    logger = RunLogger(tmp_path, 10, 0, 4, enabled=True, device=torch.device("cpu"))
    logger.step(0, {"loss": 1.0, "lr": 1e-3, "momentum": 0.996})
    logger.close()
    assert not any(k.startswith("gpu_") for k in json.loads((tmp_path / "metrics.jsonl").read_text()))


# -- phases ----------------------------------------------------------------------------------------------
def test_phase_is_a_shared_no_op_without_a_timer():
    assert phase("backward") is phase("loss")
    with phase("backward"):
        pass


def test_phase_timer_sums_wall_clock_per_phase_in_order():
    with PhaseTimer("cpu") as timer:
        for _ in range(2):
            with phase("b"):
                time.sleep(0.03)
            with phase("a"):
                pass
    totals = timer.totals_ms()
    assert list(totals) == ["b", "a"]
    assert 60 <= totals["b"] < 2000 and 0 <= totals["a"] < totals["b"]
    assert phase("b") is phase("a")  # inactive again after the with block


def test_phase_timers_do_not_nest():
    with PhaseTimer("cpu"), pytest.raises(RuntimeError, match="already active"):
        with PhaseTimer("cpu"):
            pass


def test_phases_are_named_ranges_in_a_profiler_trace():
    with torch.profiler.profile() as prof, PhaseTimer("cpu"):
        with phase("teacher forward"):
            torch.ones(64, 64) @ torch.ones(64, 64)
    assert "teacher forward" in {e.key for e in prof.key_averages()}


@pytest.mark.gpu
def test_phase_timer_uses_cuda_events_on_a_gpu():
    a = torch.randn(4096, 4096, device="cuda")
    with PhaseTimer("cuda") as timer:
        with phase("matmul"):
            for _ in range(10):
                a @ a
    assert timer.totals_ms()["matmul"] > 0
