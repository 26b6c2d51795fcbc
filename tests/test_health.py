"""Training health: the signals against float64 references, the monitor's rules, collapsing tiny runs that
trigger the right warning within a bounded number of steps, a normal run that triggers none, stop mode that
keeps the last healthy checkpoint, and proof that the signals add no host sync to the step."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastdino.cli import main
from fastdino.config import ConfigError, HealthConfig, load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.engine.checkpoint import load_checkpoint
from fastdino.engine.health import (
    KINDS,
    HealthMonitor,
    TrainingHealthError,
    loss_scale,
    summary_line,
)
from fastdino.engine.logging import RunLogger
from fastdino.engine.trainer import Trainer, train
from fastdino.losses.dino import dino_loss_ref
from fastdino.losses.signals import distribution_signals, feature_spread
from fastdino.methods.dino import DINO

TINY = [
    "model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=16", "model.drop_path_rate=0.1",
    "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8",
    "data.global_size=16", "data.local_size=8", "data.local_crops_number=2", "data.batch_size=4",
    "data.num_workers=0", "optim.warmup_epochs=1", "train.epochs=2", "train.log_every=1", "train.knn_eval=false",
]
# A trainable regime for the collapse runs: a real learning rate and a teacher that follows quickly.
FAST = ["optim.lr=0.1", "dino.momentum_teacher=0.9", "train.epochs=20"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster, and immune to a busy machine (OpenMP spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=2, n_val_per_class=1, size=32)


def tiny_cfg(demo_root, out, *extra):
    return load_config(None, TINY + [f"data.path={demo_root}", f"train.output_dir={out}", *extra])


# -- signals against float64 references ---------------------------------------------------------------
def _entropy64(p):
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def _fixed_logits(n, k):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    logits[0] = 0.0  # a uniform row
    logits[1, k - 1] = 80.0  # a (numerically) one-hot row
    return logits


@pytest.mark.parametrize("n, k", [(3, 4097), (8, 32), (2, 2)])
def test_distribution_signals_match_float64(n, k):
    logits = _fixed_logits(n, k)
    p = logits.softmax(-1)
    h_ref = _entropy64(p).mean()
    hm_ref = _entropy64(p.mean(0))
    got = distribution_signals(F.log_softmax(logits.float(), dim=-1))
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in got.values())
    torch.testing.assert_close(got["entropy"].double(), h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["mean_entropy"].double(), hm_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["entropy_ratio"].double(), h_ref / math.log(k), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["mean_entropy_ratio"].double(), hm_ref / math.log(k), rtol=1e-5, atol=1e-6)


def test_distribution_signals_extremes_and_bf16_input():
    k = 64
    uniform = distribution_signals(torch.full((4, k), -math.log(k)))
    assert uniform["entropy_ratio"] == pytest.approx(1.0, abs=1e-6)
    one_hot = F.log_softmax(torch.zeros(4, k).index_fill_(1, torch.tensor([3]), 100.0), dim=-1)
    sig = distribution_signals(one_hot)
    assert sig["entropy"] == pytest.approx(0.0, abs=1e-6) and sig["mean_entropy"] == pytest.approx(0.0, abs=1e-6)
    spread_rows = F.log_softmax(torch.eye(k)[:8] * 100.0, dim=-1)  # one-hot rows on 8 different dimensions
    assert distribution_signals(spread_rows)["mean_entropy"] == pytest.approx(math.log(8), abs=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sig = distribution_signals(F.log_softmax(_fixed_logits(6, 100).float(), dim=-1).bfloat16())
    assert sig["entropy"].dtype == torch.float32


def test_feature_spread_matches_float64():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(7, 193, generator=g, dtype=torch.float64) + 0.5
    z = f / f.norm(dim=-1, keepdim=True)
    std_ref = z.std(dim=0).mean()
    got = feature_spread(f.float())
    torch.testing.assert_close(got["std"].double(), std_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["std_ratio"].double(), std_ref * math.sqrt(193), rtol=1e-5, atol=1e-6)
    assert feature_spread(torch.ones(5, 16) * 3.0)["std"] == 0.0  # every image the same direction
    iso = feature_spread(torch.randn(4096, 64, generator=g))  # evenly spread: std_ratio about 1
    assert iso["std_ratio"] == pytest.approx(1.0, abs=0.02)


def test_dino_health_signals_match_float64():
    """Entropies of the centered, sharpened teacher, KL(P_t || P_s) over the loss's pairs, center norm."""
    cfg = load_config(None, TINY + ["dino.out_dim=37"])
    method = DINO(cfg, torch.device("cpu"))
    batch, n_crops, k, tau_s, tau_t = 3, 4, 37, 0.1, 0.05
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(2 * batch, k, generator=g, dtype=torch.float64)
    student = torch.randn(n_crops * batch, k, generator=g, dtype=torch.float64)
    center = torch.randn(k, generator=g, dtype=torch.float64) * 0.3
    features = torch.randn(2 * batch, 192, generator=g, dtype=torch.float64)
    method.center.center.copy_(center)
    loss, _ = dino_loss_ref(student.float(), teacher.float(), method.center.center, tau_s, tau_t)
    got = method.health_signals(loss, teacher.float(), features.float(), tau_t)

    p_t = ((teacher - center) / tau_t).softmax(-1).view(2, batch, k)
    log_p_s = (student / tau_s).log_softmax(-1).view(n_crops, batch, k)
    kl = [(p_t[t] * (p_t[t].log() - log_p_s[v])).sum(-1).mean() for t in range(2) for v in range(n_crops) if v != t]
    ref = {
        "teacher_entropy": _entropy64(p_t.reshape(-1, k)).mean(),
        "teacher_mean_entropy": _entropy64(p_t.reshape(-1, k).mean(0)),
        "kl_student_teacher": torch.stack(kl).mean(),
        "center_norm": center.norm(),
    }
    for key, value in ref.items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-5, atol=1e-5, msg=key)
    torch.testing.assert_close(got["teacher_entropy_ratio"].double(), ref["teacher_entropy"] / math.log(k),
                               rtol=1e-5, atol=1e-6)
    z = features / features.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got["feature_std"].double(), z.std(0).mean(), rtol=1e-5, atol=1e-7)
    assert all(v.dtype == torch.float32 for v in got.values())


def test_loss_scale_is_a_device_scalar_under_fp16_only():
    assert loss_scale(torch.amp.GradScaler("cpu", enabled=False)) is None
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))
    scale = loss_scale(scaler)
    assert isinstance(scale, torch.Tensor) and scale.item() == 1024.0


# -- the monitor's rules on synthetic values ----------------------------------------------------------
HEALTHY = {"loss": 5.0, "grad_norm": 2.0, "teacher_entropy_ratio": 0.7, "teacher_mean_entropy_ratio": 0.9,
           "feature_std_ratio": 0.6}


def _feed(monitor, rows, start=0):
    return [monitor.observe(start + i, {**HEALTHY, **row}) for i, row in enumerate(rows)]


@pytest.mark.parametrize("kind, bad", [
    ("collapse_uniform", {"teacher_entropy_ratio": 0.995}),
    ("collapse_one_dim", {"teacher_mean_entropy_ratio": 0.01}),
    ("feature_collapse", {"feature_std_ratio": 0.001}),
    ("divergence", {"grad_norm": 2000.0}),
])
def test_each_kind_is_named_after_patience_with_its_knobs(kind, bad):
    monitor = HealthMonitor(HealthConfig(patience=2, warn_every=10), verbose=False)
    out = _feed(monitor, [{}] * 6 + [bad] * 25)
    assert not any(out[:7])  # first bad check: pending only
    assert len(out[7]) == 1 and KINDS[kind].name in out[7][0] and "iteration 7" in out[7][0]
    warned_at = [i for i, msgs in enumerate(out) if msgs]
    assert warned_at == [7, 17, 27]  # once, then every warn_every iterations while it holds
    assert monitor.should_stop is False and list(monitor.summary()["findings"]) == [kind]
    f = monitor.summary()["findings"][kind]
    assert (f["first_step"], f["last_step"], f["checks"]) == (7, 30, 24)
    knob = {"collapse_uniform": "dino.teacher_temp", "collapse_one_dim": "dino.center_momentum",
            "feature_collapse": "optim.lr", "divergence": "train.precision=bf16"}[kind]
    assert knob in out[7][0]


def test_monitor_recovery_rewarns_grace_and_stop():
    monitor = HealthMonitor(HealthConfig(patience=1, warn_every=100, on_collapse="stop"), verbose=False)
    bad = {"teacher_mean_entropy_ratio": 0.0}
    out = _feed(monitor, [bad, bad, {}, bad])
    assert [len(m) for m in out] == [1, 0, 0, 1]  # it went away and came back: warned again at once
    assert monitor.should_stop and not monitor.healthy
    graced = HealthMonitor(HealthConfig(patience=1, grace_steps=10), verbose=False)
    assert not any(_feed(graced, [bad] * 10)) and _feed(graced, [bad], start=10)[0]


def test_divergence_reference_and_fp16_rules():
    cfg = HealthConfig(patience=1)
    monitor = HealthMonitor(cfg, verbose=False)
    assert not any(_feed(monitor, [{"grad_norm": 2000.0}]))  # no history yet: nothing to compare with
    # slow growth is not divergence; a jump of 100x over the recent median is
    monitor = HealthMonitor(cfg, verbose=False)
    assert not any(_feed(monitor, [{"grad_norm": 2.0 * 1.2**i} for i in range(30)]))
    assert "grad_norm" in _feed(monitor, [{"grad_norm": 1e5}], start=30)[0][0]
    # under fp16 an inf gradient is a skipped step; without a loss scale it is divergence
    fp16 = HealthMonitor(cfg, verbose=False)
    assert not any(_feed(fp16, [{"grad_norm": math.inf, "loss_scale": 1024.0}] * 3))
    assert _feed(fp16, [{"loss_scale": 0.25}], start=3)[0]  # the scale collapsed: overflow every step
    assert _feed(HealthMonitor(cfg, verbose=False), [{"grad_norm": math.nan}])[0]


def test_summary_line_and_config_validation():
    assert summary_line(None).startswith("health: not watched")
    monitor = HealthMonitor(HealthConfig(patience=1), verbose=False)
    _feed(monitor, [{}])
    assert summary_line(monitor.summary()) == "health: ok (no collapse or divergence in 1 checks)"
    _feed(monitor, [{"feature_std_ratio": 0.0}], start=1)
    assert "feature collapse at iterations 1-1" in summary_line(monitor.summary())
    for bad in ["health.on_collapse=abort", "health.uniform_entropy_ratio=1.5", "health.divergence_factor=1",
                "health.patience=0"]:
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


# -- tiny runs: collapse is caught, a normal run is not flagged ---------------------------------------
def _findings(result):
    return result.health["findings"]


def test_normal_tiny_run_is_healthy_and_logs_the_signals(demo_root, tmp_path, capsys):
    result = train(tiny_cfg(demo_root, tmp_path / "run", "train.epochs=10"))
    assert result.health["status"] == "healthy" and not _findings(result) and result.health["checks"] == 30
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    signals = {"teacher_entropy", "teacher_entropy_ratio", "teacher_mean_entropy", "teacher_mean_entropy_ratio",
               "kl_student_teacher", "feature_std", "feature_std_ratio", "center_norm", "grad_norm"}
    assert all(signals <= set(x) for x in lines) and "loss_scale" not in lines[0]  # fp32: no scaler
    assert json.loads((tmp_path / "run" / "health.json").read_text())["status"] == "healthy"
    assert main(["train", str(_empty_yaml(tmp_path)), *TINY, f"data.path={demo_root}",
                 f"train.output_dir={tmp_path / 'cli'}", "train.max_steps=2"]) == 0
    assert "health: ok (no collapse or divergence in 2 checks)" in capsys.readouterr().out


def _empty_yaml(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    return path


def test_uniform_collapse_is_caught(demo_root, tmp_path):
    """Centering without sharpening (teacher 4x softer than the student's 0.1) drifts to uniform."""
    result = train(tiny_cfg(demo_root, tmp_path / "run", *FAST, "dino.teacher_temp=0.4", "train.max_steps=30"))
    start = result.history[0]["teacher_entropy_ratio"]
    assert start < 0.95  # not uniform at the start: the collapse happens during training
    assert _findings(result)["collapse_uniform"]["first_step"] <= 25
    assert "collapse_one_dim" not in _findings(result) and "divergence" not in _findings(result)


def test_one_dimension_collapse_is_caught(demo_root, tmp_path, caplog):
    """No centering (center_momentum=1.0 keeps the center at 0) and a very sharp teacher: one dimension wins."""
    result = train(tiny_cfg(demo_root, tmp_path / "run", *FAST, "dino.teacher_temp=0.01",
                            "dino.center_momentum=1.0", "train.max_steps=15"))
    assert result.history[0]["teacher_mean_entropy_ratio"] > 0.2  # well above the 0.1 threshold at the start
    assert _findings(result)["collapse_one_dim"]["first_step"] <= 10
    assert "collapse_uniform" not in _findings(result)
    assert "collapse to one dimension at iteration" in caplog.text and "dino.center_momentum" in caplog.text
    assert result.history[-1]["center_norm"] == 0.0


def test_feature_collapse_is_caught(demo_root, tmp_path):
    """A teacher backbone whose final norm has zero gain maps every image to one vector (and stays: m=1)."""
    trainer = Trainer(tiny_cfg(demo_root, tmp_path / "run", "dino.momentum_teacher=1.0", "train.max_steps=4"))
    torch.nn.init.zeros_(trainer.method.teacher.backbone.norm.weight)
    result = trainer.fit()
    assert _findings(result)["feature_collapse"]["first_step"] == 1
    assert result.history[0]["feature_std_ratio"] < 1e-3


def test_divergence_is_caught(demo_root, tmp_path, monkeypatch):
    original, calls = DINO.forward, {"n": 0}

    def exploding(self, views, epoch):  # the loss (and every gradient) grows 1000x from iteration 8
        loss, stats = original(self, views, epoch)
        calls["n"] += 1
        return loss * (1000.0 if calls["n"] > 8 else 1.0), stats

    monkeypatch.setattr(DINO, "forward", exploding)
    result = train(tiny_cfg(demo_root, tmp_path / "run", "train.epochs=4"))
    assert _findings(result)["divergence"]["first_step"] == 9
    detail = _findings(result)["divergence"]["detail"]
    assert detail.startswith("loss=") and "; grad_norm=" in detail  # both grew 1000x: both are named


def test_stop_mode_keeps_the_last_healthy_checkpoint(demo_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, *FAST, "dino.teacher_temp=0.01", "dino.center_momentum=1.0", "train.max_steps=15",
            "train.ckpt_every=1", "health.on_collapse=stop", f"data.path={demo_root}", f"train.output_dir={out}"]
    with pytest.raises(TrainingHealthError, match=r"collapse to one dimension.*last.pt \(after \d+ iterations\)"):
        train(load_config(None, args))
    health = json.loads((out / "health.json").read_text())
    stopped = health["stopped_at"]
    assert health["status"] == "stopped" and health["findings"]["collapse_one_dim"]["first_step"] == stopped
    # the condition first held one check earlier (patience 2): neither of those states was checkpointed
    assert load_checkpoint(out / "last.pt")["step"] == stopped - 1
    lines = {x["step"]: x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert lines[stopped - 2]["teacher_mean_entropy_ratio"] >= 0.1  # the checkpointed state was healthy
    assert lines[stopped - 1]["teacher_mean_entropy_ratio"] < 0.1
    # the CLI reports it in one line with its own exit code
    assert main(["train", str(_empty_yaml(tmp_path)), *args[:-1], f"train.output_dir={tmp_path / 'cli'}"]) == 4
    err = capsys.readouterr().err
    assert "fastdino: training stopped: training health: collapse to one dimension" in err
    assert "Traceback" not in err


# -- no host sync from the signals --------------------------------------------------------------------
def _host_reads(monkeypatch, trainer):
    """Run `trainer` and record every host read of a tensor: (where: step | logger, iteration index), and the
    iterations on which DINO.health_signals ran."""
    where, reads, signal_steps = {"in": None}, [], []

    def inside(fn, name):
        def wrapper(self, *a, **kw):
            previous, where["in"] = where["in"], name
            try:
                return fn(self, *a, **kw)
            finally:
                where["in"] = previous
        return wrapper

    def host_read(fn):
        def wrapper(self, *a, **kw):
            if where["in"] is not None:
                reads.append((where["in"], trainer.step - (where["in"] == "logger")))
            return fn(self, *a, **kw)
        return wrapper

    def health_signals(self, *a, **kw):
        signal_steps.append(trainer.step)
        return original_signals(self, *a, **kw)

    original_signals = DINO.health_signals
    with monkeypatch.context() as m:
        m.setattr(DINO, "health_signals", health_signals)
        m.setattr(Trainer, "train_step", inside(Trainer.train_step, "step"))
        m.setattr(RunLogger, "step", inside(RunLogger.step, "logger"))
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, host_read(getattr(torch.Tensor, name)))
        trainer.fit()
    return reads, signal_steps


def test_signals_only_on_log_steps_and_no_sync_in_the_step(demo_root, tmp_path, monkeypatch):
    """Signals are computed only on log steps; they add no host read inside the step, which has none at all (the
    non-finite check stays on the device, fused AdamW keeps its step counters there); values reach the host only
    through RunLogger, on log steps, where the same hooks see them (so a read in the step would show)."""
    extra = ["train.log_every=4", "train.epochs=3"]  # 9 steps
    reads, signal_steps = _host_reads(monkeypatch, Trainer(tiny_cfg(demo_root, tmp_path / "on", *extra)))
    base, none = _host_reads(monkeypatch, Trainer(tiny_cfg(demo_root, tmp_path / "off", *extra,
                                                            "health.enabled=false")))
    log_steps = [2, 3, 5, 7, 8]  # every 4th, and the last of each 3-step epoch (0-based)
    assert signal_steps == log_steps and none == []
    per_step = [sum(1 for w, s in reads if (w, s) == ("step", i)) for i in range(9)]
    assert per_step == [sum(1 for w, s in base if (w, s) == ("step", i)) for i in range(9)] == [0] * 9
    assert sorted({s for w, s in reads if w == "logger"}) == log_steps


def test_health_disabled_computes_nothing(demo_root, tmp_path, monkeypatch):
    monkeypatch.setattr(DINO, "health_signals", lambda *a, **kw: pytest.fail("signals computed"))
    result = train(tiny_cfg(demo_root, tmp_path / "run", "health.enabled=false", "train.max_steps=2"))
    assert result.health is None and not (tmp_path / "run" / "health.json").exists()
    assert "teacher_entropy" not in result.history[-1]


def test_signals_are_fp32_under_bf16_autocast(demo_root, tmp_path, monkeypatch):
    original, dtypes = DINO.health_signals, []

    def checked(self, loss, teacher_logits, teacher_features, teacher_temp):
        out = original(self, loss, teacher_logits, teacher_features, teacher_temp)
        dtypes.append((teacher_logits.dtype, {v.dtype for v in out.values()}))
        return out

    monkeypatch.setattr(DINO, "health_signals", checked)
    result = train(tiny_cfg(demo_root, tmp_path / "run", "train.precision=bf16", "train.max_steps=2"))
    assert dtypes == [(torch.bfloat16, {torch.float32})] * 2
    assert all(math.isfinite(h["teacher_entropy"]) for h in result.history)
