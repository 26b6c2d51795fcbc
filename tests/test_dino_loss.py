"""The DINO loss reference (`dino_loss_ref`) and `TeacherCenter` against independent float64 implementations.

SPEC.md "Loss": the mean over every (teacher view t, student view v != t) pair of H(P_t, P_s), batch-averaged;
"Centering": c <- m c + (1 - m) mean of the teacher outputs.
"""

import pytest
import torch

from fastdino.losses.dino import TeacherCenter, dino_loss_ref

STUDENT_TEMP = 0.1
TEACHER_TEMP = 0.04


def naive_dino_loss(student, teacher, center, student_temp, teacher_temp):
    """float64 loop over every (teacher view t, student view v != t) pair, softmax written out by hand."""
    s, t, c = student.double(), teacher.double(), center.double().reshape(-1)
    batch = t.shape[0] // 2
    n_crops = s.shape[0] // batch

    def log_softmax(x):  # (B, K)
        shifted = x - x.max(dim=-1, keepdim=True).values
        return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()

    total, n_pairs = 0.0, 0
    for ti in range(2):
        p_t = log_softmax((t[ti * batch : (ti + 1) * batch] - c) / teacher_temp).exp()  # (B, K)
        for v in range(n_crops):
            if v == ti:
                continue
            log_p_s = log_softmax(s[v * batch : (v + 1) * batch] / student_temp)  # (B, K)
            total = total + (-(p_t * log_p_s).sum(dim=-1)).mean()
            n_pairs += 1
    assert n_pairs == 2 * n_crops - 2
    return total / n_pairs


def closed_form_grad(student, teacher, center, student_temp, teacher_temp):
    """SPEC note: dL/dS_v = (n_partners * softmax(S_v / tau_s) - sum of partner P_t) / tau_s / (B * n_pairs)."""
    s, t = student.double(), teacher.double()
    batch = t.shape[0] // 2
    n_crops = s.shape[0] // batch
    p_t = torch.softmax((t - center.double()) / teacher_temp, dim=-1).view(2, batch, -1)
    p_s = torch.softmax(s / student_temp, dim=-1).view(n_crops, batch, -1)
    mix = torch.empty_like(p_s)
    mix[0], mix[1], mix[2:] = p_t[1], p_t[0], p_t[0] + p_t[1]
    n_partners = torch.tensor([1.0, 1.0] + [2.0] * (n_crops - 2), dtype=torch.float64).view(-1, 1, 1)
    grad = (n_partners * p_s - mix) / student_temp / (batch * (2 * n_crops - 2))
    return grad.view_as(s)


def make_inputs(batch, n_local, k, dtype=torch.float32):
    n_crops = 2 + n_local
    student = torch.randn(n_crops * batch, k).to(dtype)
    teacher = torch.randn(2 * batch, k).to(dtype)
    center = 0.1 * torch.randn(k)
    return student, teacher, center


@pytest.mark.parametrize("n_local", [0, 2, 6])
@pytest.mark.parametrize("batch", [1, 3])
def test_ref_matches_naive_pair_loop(batch, n_local):
    student, teacher, center = make_inputs(batch, n_local, k=257)
    s = student.clone().requires_grad_()
    loss, teacher_sum = dino_loss_ref(s, teacher, center, STUDENT_TEMP, TEACHER_TEMP)
    loss.backward()

    s64 = student.double().requires_grad_()
    loss64 = naive_dino_loss(s64, teacher, center, STUDENT_TEMP, TEACHER_TEMP)
    loss64.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-6, atol=0)
    assert s.grad.dtype == torch.float32
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=0, atol=1e-6 * s64.grad.abs().max().item())
    assert teacher_sum.shape == (257,) and teacher_sum.dtype == torch.float32
    torch.testing.assert_close(teacher_sum.double(), teacher.double().sum(0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_local", [0, 2, 6])
def test_ref_grad_matches_spec_closed_form(n_local):
    student, teacher, center = make_inputs(3, n_local, k=101)
    s = student.clone().requires_grad_()
    dino_loss_ref(s, teacher, center, STUDENT_TEMP, TEACHER_TEMP)[0].backward()
    expected = closed_form_grad(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP)
    torch.testing.assert_close(s.grad.double(), expected, rtol=0, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ref_half_inputs_compute_in_fp32(dtype):
    student, teacher, center = make_inputs(3, 2, k=300, dtype=dtype)
    s = student.clone().requires_grad_()
    loss, teacher_sum = dino_loss_ref(s, teacher, center, STUDENT_TEMP, TEACHER_TEMP)
    loss.backward()
    assert loss.dtype == torch.float32 and teacher_sum.dtype == torch.float32
    assert s.grad.dtype == dtype
    # fp32 math on the half inputs: the loss is as exact as with fp32 inputs of the same values.
    loss64 = naive_dino_loss(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-6, atol=0)


def test_ref_teacher_is_not_differentiated():
    student, teacher, center = make_inputs(2, 2, k=64)
    t = teacher.clone().requires_grad_()
    loss, teacher_sum = dino_loss_ref(student.requires_grad_(), t, center, STUDENT_TEMP, TEACHER_TEMP)
    loss.backward()
    assert t.grad is None
    assert not teacher_sum.requires_grad


def test_ref_gradcheck():
    """gradcheck in float64. The reference computes in fp32 whatever the input dtype (by contract), so the finite
    differences use eps = 1e-3 on a low-curvature problem (tau_s = 1, small K) and the tolerances are 1e-3: a
    wrong gradient (a missing partner, a wrong normalisation) is off by far more than that."""
    student, teacher, center = make_inputs(3, 2, k=7, dtype=torch.float64)
    s = student.requires_grad_()

    def loss_fn(x):
        return dino_loss_ref(x, teacher, center, 1.0, 0.5)[0]

    assert torch.autograd.gradcheck(loss_fn, (s,), eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "student_shape, teacher_shape, k_center, match",
    [
        ((8, 16, 2), (4, 16), 16, "2-D"),  # student not 2-D
        ((8, 16), (4,), 16, "2-D"),  # teacher not 2-D
        ((8, 16), (3, 16), 16, "2 global crops"),  # odd number of teacher rows
        ((0, 16), (0, 16), 16, "2 global crops"),  # empty batch
        ((8, 16), (4, 15), 16, "K mismatch"),  # student / teacher K
        ((8, 16), (4, 16), 15, "K mismatch"),  # center K
        ((9, 16), (4, 16), 16, "n_crops"),  # student rows not a multiple of B
        ((2, 16), (4, 16), 16, "n_crops"),  # fewer than the 2 global crops
    ],
)
def test_ref_bad_shapes_raise(student_shape, teacher_shape, k_center, match):
    with pytest.raises(ValueError, match=match):
        dino_loss_ref(torch.randn(student_shape), torch.randn(teacher_shape), torch.zeros(k_center), 0.1, 0.04)


def test_teacher_center_update_closed_form():
    """After n updates from c_0: c_n = m^n c_0 + (1 - m) sum_i m^(n-1-i) (sum_i / rows_i)."""
    k, momentum = 33, 0.9
    center = TeacherCenter(k, momentum=momentum)
    c0 = torch.randn(k)
    center.center.copy_(c0)
    sums, rows = [], [4, 6, 2]
    for n_rows in rows:
        teacher = torch.randn(n_rows, k)
        sums.append(teacher.sum(0))
        center.update(teacher.sum(0), n_rows)
    n = len(rows)
    expected = momentum**n * c0.double()
    for i, (s, r) in enumerate(zip(sums, rows)):
        expected = expected + (1 - momentum) * momentum ** (n - 1 - i) * s.double() / r
    torch.testing.assert_close(center.center.double(), expected, rtol=1e-6, atol=1e-6)
    assert center.center.dtype == torch.float32


def test_teacher_center_from_loss_teacher_sum():
    """One step as the method runs it: the loss's teacher_sum over 2B rows gives the mean teacher output."""
    student, teacher, center_values = make_inputs(3, 2, k=50)
    center = TeacherCenter(50, momentum=0.9)
    center.center.copy_(center_values)
    _, teacher_sum = dino_loss_ref(student, teacher, center.center, STUDENT_TEMP, TEACHER_TEMP)
    center.update(teacher_sum, teacher.shape[0])
    expected = 0.9 * center_values + 0.1 * teacher.mean(0)
    torch.testing.assert_close(center.center, expected, rtol=1e-5, atol=1e-6)
