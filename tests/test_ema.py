"""TeacherEMA (fastdino/engine/ema.py): closed form, pairing by name, frozen state, moved storage, errors.

impl=triton runs the Triton interpreter on CPU (tests/conftest.py). Models are a small ViT-T/16 (2 blocks)
with a small DINOHead: every kind of parameter the trainer has, at a size the interpreter runs quickly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fastdino.engine.ema import TeacherEMA, ema_foreach_, resolve_ema_impl
from fastdino.models.heads import DINOHead
from fastdino.models.vit import vit_tiny

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ["foreach", "triton"]
GAIN = "head.last_layer.parametrizations.weight.original0"
V = "head.last_layer.parametrizations.weight.original1"


class Net(nn.Module):
    """The trainer's layout: `backbone.*` and `head.*`."""

    def __init__(self):
        super().__init__()
        self.backbone = vit_tiny(patch_size=16, img_size=32, depth=2, drop_path_rate=0.0)
        self.head = DINOHead(192, 64, hidden_dim=128, bottleneck_dim=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _models(student_dtype: torch.dtype = torch.float32) -> tuple[Net, Net]:
    student = Net().to(DEVICE)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # teacher != student, so the average shows
    return student.to(student_dtype), teacher


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in module.named_parameters()}


def _train_step(student: nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    loss = student(x).float().square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _assert_matches(teacher: nn.Module, expect: dict[str, torch.Tensor], atol: float = 2e-6) -> None:
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach().double(), expect[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_closed_form_constant_student(impl):
    """Student fixed: after momenta m_1..m_k, t = P t_0 + (1 - P) s with P = prod m_i."""
    student, teacher = _models()
    t0, s = _snapshot(teacher), _snapshot(student)
    ema = TeacherEMA(student, teacher, impl=impl)
    momenta = [0.9, 0.996, 0.5, 1.0, 0.7]
    for m in momenta:
        ema.update(m)
    prod = torch.tensor(momenta, dtype=torch.float64).prod()
    expect = {n: prod * t0[n] + (1 - prod) * s[n] for n in t0}
    expect[GAIN] = s[GAIN]  # frozen: copied, not averaged
    _assert_matches(teacher, expect)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tensor_m", [False, True])
def test_recursion_with_optimizer_steps(impl, tensor_m):
    """Student trained by AdamW between updates: t_k = m_k t_(k-1) + (1 - m_k) s_k in float64."""
    student, teacher = _models()
    ema = TeacherEMA(student, teacher, impl=impl)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    expect = _snapshot(teacher)
    for step in range(3):
        _train_step(student, opt)
        m = 0.99 - 0.1 * step
        ema.update(torch.tensor(m, device=DEVICE) if tensor_m else m)
        s = _snapshot(student)
        expect = {n: m * expect[n] + (1 - m) * s[n] for n in expect}
        expect[GAIN] = s[GAIN]
    _assert_matches(teacher, expect)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_student(impl):
    student, teacher = _models(torch.bfloat16)
    t0, s = _snapshot(teacher), _snapshot(student)
    TeacherEMA(student, teacher, impl=impl).update(0.75)
    expect = {n: 0.75 * t0[n] + 0.25 * s[n] for n in t0}
    expect[GAIN] = s[GAIN]
    _assert_matches(teacher, expect)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())


def test_impls_agree():
    (s1, t1), (s2, t2) = _models(), _models()
    t2.load_state_dict(t1.state_dict())
    s2.load_state_dict(s1.state_dict())
    e1, e2 = TeacherEMA(s1, t1, impl="foreach"), TeacherEMA(s2, t2, impl="triton")
    for m in (0.996, 0.9, 0.0):
        e1.update(m)
        e2.update(m)
    _assert_matches(t2, _snapshot(t1), atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_gain_is_copied_and_teacher_frozen(impl):
    student, teacher = _models()
    with torch.no_grad():
        teacher.get_parameter(GAIN).fill_(3.0)  # e.g. a teacher loaded from elsewhere
    ema = TeacherEMA(student, teacher, impl=impl)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert student.get_parameter(GAIN).requires_grad is False
    v_before = teacher.get_parameter(V).detach().clone()
    ema.update(0.996)
    assert torch.equal(teacher.get_parameter(GAIN), student.get_parameter(GAIN))  # bit-equal, not averaged
    assert not torch.equal(teacher.get_parameter(V), v_before)  # the direction v is averaged


@pytest.mark.parametrize("impl", IMPLS)
def test_follows_moved_and_replaced_parameters(impl):
    """No storage invariant to keep: `.to()`-style moves and load_state_dict (in place or assign) after construction."""
    student, teacher = _models()
    ema = TeacherEMA(student, teacher, impl=impl)
    # Module.to(other device) replaces every param.data: simulate it with a clone on the same device.
    student._apply(torch.clone)
    teacher._apply(torch.clone)
    t0, s = _snapshot(teacher), _snapshot(student)
    ema.update(0.5)
    _assert_matches(teacher, {n: 0.5 * t0[n] + 0.5 * s[n] if n != GAIN else s[n] for n in t0})
    # checkpoint load, in place and by assignment (new Parameter objects)
    src_t, src_s = _models()
    teacher.load_state_dict(src_t.state_dict())
    student.load_state_dict(src_s.state_dict(), assign=True)
    t0, s = _snapshot(teacher), _snapshot(student)
    ema.update(0.25)
    _assert_matches(teacher, {n: 0.25 * t0[n] + 0.75 * s[n] if n != GAIN else s[n] for n in t0})


@pytest.fixture
def single_process_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("impl", IMPLS)
def test_ddp_wrapped_student(impl, single_process_group):
    """Trainer order: TeacherEMA -> optimizer -> DDP wrap; passing the DDP wrapper is unwrapped too."""
    student, teacher = _models()
    ema = TeacherEMA(student, teacher, impl=impl)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    ddp = nn.parallel.DistributedDataParallel(student)
    _train_step(ddp, opt)
    t0, s = _snapshot(teacher), _snapshot(student)
    ema.update(0.9)
    TeacherEMA(ddp, copy.deepcopy(teacher), impl=impl)  # wrapped student: same names after unwrapping
    _assert_matches(teacher, {n: 0.9 * t0[n] + 0.1 * s[n] if n != GAIN else s[n] for n in t0})


def test_name_mismatch():
    student, teacher = _models()
    teacher.extra = nn.Parameter(torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"only in the teacher \['extra'\]"):
        TeacherEMA(student, teacher)
    student, teacher = _models()
    teacher.head.last_layer = nn.Linear(32, 64, bias=False).to(DEVICE)  # no weight norm: other names
    with pytest.raises(ValueError, match="parametrizations.weight.original0"):
        TeacherEMA(student, teacher)


def test_shape_buffer_and_dtype_mismatch():
    student, teacher = _models()
    teacher.backbone.cls_token = nn.Parameter(torch.zeros(1, 1, 7, device=DEVICE))
    with pytest.raises(ValueError, match="cls_token"):
        TeacherEMA(student, teacher)
    student, teacher = _models()
    teacher.register_buffer("running", torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="buffers differ"):
        TeacherEMA(student, teacher)
    student, teacher = _models()
    teacher.to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 \\(or float64\\) teacher"):
        TeacherEMA(student, teacher)
    student, _ = _models()
    with pytest.raises(ValueError, match="shared"):
        TeacherEMA(student, student)


def test_bad_impl_and_momentum():
    student, teacher = _models()
    with pytest.raises(ValueError, match="ema.impl"):
        TeacherEMA(student, teacher, impl="cuda")
    ema = TeacherEMA(student, teacher, impl="foreach")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema.update(-0.1)
    assert resolve_ema_impl("auto", torch.device("cpu")) == "foreach"
    assert resolve_ema_impl("auto", torch.device("cuda", 0)) == "triton"


def test_ema_foreach_reference():
    t = [torch.randn(5), torch.randn(3, 2)]
    s = [torch.randn(5).bfloat16(), torch.randn(3, 2)]
    expect = [0.3 * a.double() + 0.7 * b.double() for a, b in zip(t, s, strict=True)]
    t2 = [a.clone() for a in t]
    ema_foreach_(t, s, 0.3)
    ema_foreach_(t2, s, torch.tensor(0.3))
    for a, a2, e in zip(t, t2, expect, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=0, atol=1e-6)
        torch.testing.assert_close(a2.double(), e, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_convnet_parameters_averaged_batchnorm_statistics_kept(impl, channels_last):
    """ResNet-18 (issue 22): every conv / BN / head parameter is averaged in float64 closed form, channels-last
    4-D weights included; the teacher's BN running statistics and counters are its own, untouched."""
    from fastdino.models.backbones import build_backbone

    def net() -> nn.Module:
        backbone, dim = build_backbone("resnet18")
        model = nn.Sequential()
        model.add_module("backbone", backbone)
        model.add_module("head", DINOHead(dim, 64, hidden_dim=128, bottleneck_dim=32))
        return model.to(DEVICE, memory_format=torch.channels_last) if channels_last else model.to(DEVICE)

    torch.manual_seed(0)
    student, teacher = net(), net()
    with torch.no_grad():
        for b in teacher.buffers():
            b.add_(3) if b.is_floating_point() else b.fill_(7)  # the teacher's own statistics
    if channels_last:
        assert teacher.get_parameter("backbone.conv1.weight").is_contiguous(memory_format=torch.channels_last)
    t0, s = _snapshot(teacher), _snapshot(student)
    buffers = {n: b.clone() for n, b in teacher.named_buffers()}
    ema = TeacherEMA(student, teacher, impl=impl)
    for m in (0.9, 0.5):
        ema.update(m)
    expect = {n: 0.45 * t0[n] + 0.55 * s[n] for n in t0}
    expect[GAIN] = s[GAIN]
    _assert_matches(teacher, expect)
    assert buffers and all(torch.equal(b, buffers[n]) for n, b in teacher.named_buffers())
