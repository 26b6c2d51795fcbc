"""The multi-tensor EMA kernel (kernels/ema.py) against a float64 reference and torch._foreach_lerp_.

Tolerance scaled by the reference's own error: |y - y_ref| <= 2 * |y_foreach - y_ref| + atol. On CPU the
kernel runs in the Triton interpreter (tests/conftest.py), so CPU shapes stay small; the `gpu` tests use
ViT-S/16 + a K = 65536 head.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastdino.kernels.ema as kema
from fastdino.engine.ema import ema_foreach_
from fastdino.kernels.ema import EMAPlan, ema_multi_tensor_
from fastdino.models.heads import DINOHead
from fastdino.models.vit import vit_small, vit_tiny

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-6}  # teacher fp32 either way: the student dtype only sets inputs
MOMENTA = (0.0, 0.5, 0.996, 1.0)
ODD_SIZES = (1, 7, 64, 65, 4097)


def _pairs(sizes, s_dtype, scale=1.0):
    teachers = [torch.randn(n, device=DEVICE) for n in sizes]
    students = [(t + scale * torch.randn_like(t)).to(s_dtype) for t in teachers]
    return teachers, students


def _ref64(teachers, students, m: float):
    return [m * t.double() + (1.0 - m) * s.double() for t, s in zip(teachers, students, strict=True)]


def _assert_close(ys, ys_torch, ys_ref, atol):
    for i, (y, y_torch, y_ref) in enumerate(zip(ys, ys_torch, ys_ref, strict=True)):
        err = (y.double() - y_ref).abs()
        bound = 2 * (y_torch.double() - y_ref).abs() + atol
        assert bool((err <= bound).all()), f"tensor {i}: max excess {(err - bound).max().item():.3g}"


def _assert_near(ys, ys_ref, atol):
    for y, y_ref in zip(ys, ys_ref, strict=True):
        torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=atol)


def _model_params(backbone, head):
    """Student params of a real backbone + head, a perturbed fp32 teacher copy: (teachers, students)."""
    student = torch.nn.ModuleDict({"backbone": backbone, "head": head}).to(DEVICE)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return [p.detach() for p in teacher.parameters()], [p.detach() for p in student.parameters()]


def _n_compiled() -> int:
    caches = getattr(kema._ema_multi_tensor_kernel, "device_caches", {})
    return sum(len(c[0]) for c in caches.values())


@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", MOMENTA)
@pytest.mark.parametrize("block", [64, None])
def test_odd_sizes(m, s_dtype, block):
    teachers, students = _pairs(ODD_SIZES, s_dtype)
    ref = _ref64(teachers, students, m)
    t_torch = [t.clone() for t in teachers]
    ema_foreach_(t_torch, students, m)
    t0 = [t.clone() for t in teachers]
    EMAPlan(teachers, students, block=block).apply(m)
    _assert_close(teachers, t_torch, ref, ATOL[s_dtype])
    if m == 1.0:
        assert all(torch.equal(t, a) for t, a in zip(teachers, t0, strict=True))
    if m == 0.0:
        assert all(torch.equal(t, s.float()) for t, s in zip(teachers, students, strict=True))


def test_vit_tiny_head_parity():
    """Every parameter of a real ViT-T/16 + DINOHead (K = 1000, hidden 512 to keep the interpreter quick)."""
    head = DINOHead(192, 1000, hidden_dim=512)
    teachers, students = _model_params(vit_tiny(patch_size=16, drop_path_rate=0.0), head)
    m = torch.tensor(0.996, device=DEVICE)  # the float path runs in test_odd_sizes
    ref = _ref64(teachers, students, 0.996)
    t_torch = [t.clone() for t in teachers]
    torch._foreach_lerp_(t_torch, students, 1.0 - 0.996)
    EMAPlan(teachers, students).apply(m)
    _assert_close(teachers, t_torch, ref, ATOL[torch.float32])


def test_changing_momentum_and_bf16_student():
    """Several steps with a different m each (floats and 0-d tensors) and a bf16 student: one plan."""
    teachers, students = _pairs(ODD_SIZES, torch.bfloat16)
    expect = [t.double() for t in teachers]
    plan = EMAPlan(teachers, students, block=64)
    for step, m in enumerate((0.996, 0.9961, torch.tensor(0.5, device=DEVICE), 0.999, torch.tensor(1.0))):
        m = m.to(DEVICE) if isinstance(m, torch.Tensor) else m
        mf = float(m)
        expect = [mf * e + (1.0 - mf) * s.double() for e, s in zip(expect, students, strict=True)]
        plan.apply(m)
        for t, e in zip(teachers, expect, strict=True):
            torch.testing.assert_close(t.double(), e, rtol=0, atol=1e-6 * (step + 1))


def test_channels_last_and_empty():
    t = torch.randn(4, 3, 5, 5, device=DEVICE).to(memory_format=torch.channels_last)
    s = torch.randn(4, 3, 5, 5, device=DEVICE).to(memory_format=torch.channels_last)
    empty_t, empty_s = torch.empty(0, device=DEVICE), torch.empty(0, device=DEVICE)
    ref = _ref64([t], [s], 0.75)[0]
    ema_multi_tensor_([t, empty_t], [s, empty_s], 0.75)
    torch.testing.assert_close(t.double(), ref, rtol=0, atol=1e-6)
    EMAPlan([], []).apply(0.5)  # nothing to update (e.g. a fully frozen model): no launch, no error


def test_plan_follows_moved_tensors():
    teachers, students = _pairs((5, 70), torch.float32)
    plan = ema_multi_tensor_(teachers, students, 0.5)
    assert plan.matches(teachers, students)
    moved = [t.clone() for t in teachers]  # what Module.to() does to param.data
    assert not plan.matches(moved, students)
    ref = _ref64(moved, students, 0.5)
    plan2 = ema_multi_tensor_(moved, students, 0.5, plan=plan)
    assert plan2 is not plan
    _assert_near(moved, ref, 1e-6)
    assert ema_multi_tensor_(moved, students, 0.5, plan=plan2) is plan2


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ([torch.zeros(3)], [torch.zeros(4)]), "teacher"),
        (lambda: ([torch.zeros(3)], []), "1 teacher tensors but 0"),
        (lambda: ([torch.zeros(3, dtype=torch.float64)], [torch.zeros(3)]), "dtypes"),
        (lambda: ([torch.zeros(4, 4).t()], [torch.zeros(4, 4).t()]), "dense"),
    ],
)
def test_plan_errors(make, match):
    teachers, students = make()
    with pytest.raises(ValueError, match=match):
        EMAPlan([t.to(DEVICE) for t in teachers], [s.to(DEVICE) for s in students])


def test_momentum_errors():
    plan = EMAPlan(*_pairs((3,), torch.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plan.apply(1.5)
    with pytest.raises(ValueError, match="one float element"):
        plan.apply(torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="one float element"):
        plan.apply(torch.ones((), dtype=torch.int64, device=DEVICE))


def test_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(kema, "_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        EMAPlan([torch.zeros(3)], [torch.zeros(3)])


# -- GPU, full size ---------------------------------------------------------------------------------------


def _vit_s_head():
    return _model_params(vit_small(patch_size=16, drop_path_rate=0.0), DINOHead(384, 65536))


@pytest.mark.gpu
@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16])
def test_gpu_vit_small_head_k65536(s_dtype):
    teachers, students = _vit_s_head()
    students = [s.to(s_dtype) for s in students]
    plan = EMAPlan(teachers, students)
    assert len(plan.groups) == 1  # one launch for the whole teacher
    for m in (0.996, torch.tensor(0.9995, device=DEVICE)):
        mf = float(m)
        ref = _ref64(teachers, students, mf)
        t_torch = [t.clone() for t in teachers]
        ema_foreach_(t_torch, students, mf)
        plan.apply(m)
        _assert_close(teachers, t_torch, ref, ATOL[s_dtype])


@pytest.mark.gpu
def test_gpu_no_recompile_when_m_changes():
    teachers, students = _pairs(ODD_SIZES, torch.float32)
    plan = EMAPlan(teachers, students)
    m_dev = torch.tensor(0.996, device=DEVICE)
    plan.apply(0.996)
    plan.apply(m_dev)
    n = _n_compiled()
    for i in range(5):
        plan.apply(0.996 + i * 1e-4)
        m_dev.fill_(0.996 + i * 1e-4)
        plan.apply(m_dev)
    assert _n_compiled() == n


@pytest.mark.gpu
def test_gpu_cuda_graph_with_tensor_momentum():
    teachers, students = _pairs(ODD_SIZES, torch.float32)
    plan = EMAPlan(teachers, students)
    m_dev = torch.tensor(0.5, device=DEVICE)
    plan.apply(m_dev)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.apply(m_dev)
    m_dev.fill_(0.25)
    ref = _ref64(teachers, students, 0.25)
    graph.replay()
    torch.cuda.synchronize()
    _assert_near(teachers, ref, 1e-6)


@pytest.mark.gpu
def test_gpu_refuses_cuda_tensors_in_interpreter(monkeypatch):
    monkeypatch.setattr(kema, "_interpreting", lambda: True)
    with pytest.raises(RuntimeError, match="CPU tensors"):
        EMAPlan([torch.zeros(3, device=DEVICE)], [torch.zeros(3, device=DEVICE)])
