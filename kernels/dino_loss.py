"""Fused Triton DINO loss (Caron et al. 2021, Sec. 3.1 and Alg. 1; SPEC.md "Loss" and its fused-kernel note).

Math. S: (n_crops*B, K) student logits, crop-major, rows [0, 2B) the two global crops; T: (2B, K) teacher
logits; c: (K,) center; tau_s, tau_t the temperatures.

    P_t[t, b]   = softmax((T[t*B + b] - c) / tau_t)                       teacher view t in {0, 1}
    x_v         = S[v*B + b] / tau_s,   lse_v = log sum_k exp(x_v[k])
    mix_v       = P_t[1, b] (v = 0),  P_t[0, b] (v = 1),  P_t[0, b] + P_t[1, b] (v >= 2)
    n_v         = sum_k mix_v[k]   (= 1 for a global crop, 2 for a local crop)
    loss        = 1 / (B * n_pairs) * sum_{v, b} (n_v * lse_v - mix_v . x_v),   n_pairs = 2 * n_crops - 2
    dloss/dS_v  = (n_v * softmax(x_v) - mix_v) / tau_s / (B * n_pairs)

which is the mean over all (teacher view t, student view v != t) pairs of H(P_t, P_s) averaged over the batch
(`fastdino.losses.dino.dino_loss_ref`): a student row's partner terms share one log-sum-exp, so the loss needs
one log-sum-exp and one dot product per student row. teacher_sum = sum_rows T (fp32) feeds the center update.

Passes (three launches, plus a torch sum of the per-row losses so the result is deterministic: no atomics):
  1. `_teacher_stats_kernel`, one program per teacher row: online max / sum-exp of z = (T - c) / tau_t over K in
     blocks of BLOCK_K (a 64k-wide row does not fit in registers), giving max_t and 1 / sum_t, (2B,) fp32 each.
  2. `_teacher_probs_kernel`, one program per BLOCK_K columns, looping over the 2B rows in tiles of BLOCK_R:
     writes P_t = exp(z - max_t) / sum_t as fp32 (2B, K) and, in the same read of T, the column sums.
     The column sums live here rather than in pass 1 because a row program cannot sum a column without atomics
     (float atomics make the center non-deterministic run to run); a column program sums it in registers, and T
     has to be read a second time anyway to write P_t, so the column sum costs no extra traffic.
  3. `_dino_loss_fwd_kernel`, one program per student row, b-major (pid = b * n_crops + v, so the programs
     in flight at any time share a few P_t rows, which then come from L2): sweep 1 over K accumulates the
     online log-sum-exp of x_v, mix_v . x_v and sum(mix_v) (fp32 vectors of BLOCK_K lanes, one scalar running
     max) and writes the row's loss term; when a gradient is needed, sweep 2 re-reads the row backwards (last
     block first, so the recently read blocks come from L2: a 64k bf16 row is 128 KiB, and ~260 programs in flight
     on an H100 hold ~34 MiB of rows against its 50 MiB L2; an fp32 row is twice that, so expect part of the second
     read of S to come from HBM) and writes dloss/dS (in S's dtype; fp32 for fp16 S, see below). Backward only
     scales that saved gradient by grad_output.

The gradient of fp16 inputs is kept in fp32 until backward. It is computed in the forward pass, before the loss
scale of fp16 training (GradScaler) arrives as grad_output, and an element is small: about 3.6e-3 / K at B = 128
and 12 crops, ~5e-8 at K = 65536, below fp16's smallest normal (6.1e-5) and at its smallest subnormal (6e-8).
Stored in fp16 it flushes to zero or keeps a bit or two: measured on the CPU, the gradient of 65536 * loss at
B = 4, 12 crops, K = 65536 (the interpreter; tests/kernels/test_dino_loss_kernel.py runs K = 32768) had 1.1% of
its entries flushed and a median relative error of 7e-3, and a float64 emulation of that rounding at the training
shape 31% and 26%. Kept in fp32 and rounded to fp16 after the scale multiplies it: 0 flushed, median 1.7e-4 (fp16's own
rounding). The alternative, a backward kernel that recomputes dloss/dS with
grad_output applied before rounding, would read S and P_t again. The cost here is 2 more bytes per element of
saved gradient under fp16 only (403 MB instead of 201 MB at the training shape). bf16 has fp32's exponent range:
its gradient stays bf16, and fp32 stays fp32.

Why materialise P_t rather than recompute it from T in pass 3: it is 2B x K fp32, i.e. 8 / (n_crops * itemsize)
of S (1/3 of S in bf16 at 12 crops, 1/6 in fp32), written once and read back mostly from L2 thanks to the
b-major order. Recomputing would read T instead (half the bytes in bf16) but cost 2 more exps per element and
per sweep for every local crop: 6 exps per S element instead of 2. An H100 does ~4e12 exps/s on its special-function
units against ~0.7e12 S elements/s of memory traffic (bf16, two reads and one write), so at 6 exps the exps would
become a second bottleneck; at 2 they hide under the memory time. The mixture P_t[0] + P_t[1] of a local crop is
not stored either (a further B x K fp32 buffer): local rows load both partner rows, from L2.

Memory beyond the inputs: P_t (2B x K fp32), the gradient (same shape and dtype as S, fp32 for fp16 S, only when
a gradient is needed; this is the gradient autograd needs anyway) and O(rows) scalars. No K-wide fp32 copy of S.

Design limits: one student row per program (a row is never split across programs, so very small batches use
few SMs: n_crops * B programs); K any size >= 1 (masked tail blocks), but K * itemsize must fit in int32 offsets
inside a row (K < 2**31); row offsets are int64. Loads are upcast to fp32 and all math is fp32, whatever the
input dtypes. The gradient reaches student_logits only (the teacher is detached, as in the reference).
"""

import torch
import triton
import triton.language as tl

# Block sizes. Student/teacher row sweeps: 4096 lanes (16 fp32 per thread at 8 warps; 16 blocks for K = 65536).
# Teacher column pass: 256 columns x 8 rows per tile, i.e. K / 256 = 256 programs at K = 65536.
ROW_BLOCK_K = 4096
ROW_NUM_WARPS = 8
COL_BLOCK_K = 256
COL_BLOCK_R = 8
COL_NUM_WARPS = 4


@triton.jit
def _teacher_stats_kernel(
    T,  # (2B, K) teacher logits, any float dtype
    C,  # (K,) center, fp32
    ROW_MAX,  # (2B,) fp32 out: max_k z, z = (T - c) / tau_t
    ROW_INV_SUM,  # (2B,) fp32 out: 1 / sum_k exp(z - max)
    stride_t,
    K,
    inv_tau,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t_row = T + row * stride_t
    cols = tl.arange(0, BLOCK_K)
    m = tl.full((), float("-inf"), tl.float32)  # running max (scalar)
    l_vec = tl.zeros([BLOCK_K], dtype=tl.float32)  # per-lane sum of exp(z - m)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + cols
        mask = offs < K
        t = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(mask, (t - c) * inv_tau, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every block holds at least one column
        l_vec = l_vec * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    tl.store(ROW_MAX + row, m)
    tl.store(ROW_INV_SUM + row, 1.0 / tl.sum(l_vec, axis=0))


@triton.jit
def _teacher_probs_kernel(
    T,  # (2B, K) teacher logits
    C,  # (K,) center, fp32
    ROW_MAX,  # (2B,) fp32, from _teacher_stats_kernel
    ROW_INV_SUM,  # (2B,) fp32, from _teacher_stats_kernel
    PT,  # (2B, K) fp32 out: teacher probabilities
    TSUM,  # (K,) fp32 out: column sums of the raw teacher logits
    stride_t,
    stride_p,
    N_ROWS,
    K,
    inv_tau,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs < K
    c = tl.load(C + offs, mask=kmask, other=0.0).to(tl.float32)
    colsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    rows_in_tile = tl.arange(0, BLOCK_R)
    for r0 in range(0, N_ROWS, BLOCK_R):
        rows = r0 + rows_in_tile
        rmask = rows < N_ROWS
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & kmask[None, :]
        t = tl.load(T + rows64[:, None] * stride_t + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        colsum += tl.sum(t, axis=0)
        m = tl.load(ROW_MAX + rows, mask=rmask, other=0.0)
        inv_sum = tl.load(ROW_INV_SUM + rows, mask=rmask, other=0.0)
        # exp(z - max) / sum, as softmax does: normalising by a division keeps sum(P_t) = 1 to fp32 rounding,
        # whereas exp(z - lse) would carry lse's absolute rounding (~|z| * 2^-24) into every probability.
        p = tl.exp((t - c[None, :]) * inv_tau - m[:, None]) * inv_sum[:, None]
        tl.store(PT + rows64[:, None] * stride_p + offs[None, :], p, mask=mask)
    tl.store(TSUM + offs, colsum, mask=kmask)


@triton.jit
def _to_bf16_rtne(x):
    """fp32 -> bf16 rounded to nearest even, by integer arithmetic (NaN stays NaN).

    Only for the Triton interpreter, whose fp32 -> bf16 cast truncates (and whose "rtne" mode drops the carry
    from the mantissa into the exponent); on a GPU the plain cast is cvt.rn, which this reproduces bit for bit.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    is_number = x == x
    return tl.where(is_number, rounded, x.to(tl.bfloat16))  # a NaN keeps its top mantissa bits through the cast


@triton.jit
def _dino_loss_fwd_kernel(
    S,  # (n_crops*B, K) student logits, crop-major
    PT,  # (2B, K) fp32 teacher probabilities
    GRAD,  # (n_crops*B, K) out, S's dtype (fp32 for fp16 S): dloss/dS (untouched unless NEED_GRAD)
    ROW_LOSS,  # (n_crops*B,) fp32 out: n_v * lse_v - mix_v . x_v, indexed by program id
    stride_s,
    stride_p,
    stride_g,
    B,
    N_CROPS,
    K,
    inv_tau,
    grad_scale,  # 1 / (B * n_pairs)
    BLOCK_K: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // N_CROPS  # b-major: neighbouring programs share the same teacher rows
    v = pid % N_CROPS
    is_local = v >= 2
    first = tl.where(v == 0, B + b, b)  # crop 0 -> teacher view 1, crop 1 and locals -> teacher view 0
    s_row = S + (v * B + b) * stride_s
    pa_row = PT + first * stride_p
    pb_row = PT + (B + b) * stride_p  # second partner (teacher view 1), loaded for local crops only
    cols = tl.arange(0, BLOCK_K)

    # Sweep 1: online log-sum-exp of x = S / tau_s, mix . x and sum(mix).
    m = tl.full((), float("-inf"), tl.float32)  # running max (scalar)
    l_vec = tl.zeros([BLOCK_K], dtype=tl.float32)
    dot_vec = tl.zeros([BLOCK_K], dtype=tl.float32)
    msum_vec = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + cols
        mask = offs < K
        x = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
        mix = tl.load(pa_row + offs, mask=mask, other=0.0) + tl.load(pb_row + offs, mask=mask & is_local, other=0.0)
        dot_vec += mix * x
        msum_vec += mix
        x_masked = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x_masked, axis=0))
        l_vec = l_vec * tl.exp(m - m_new) + tl.exp(x_masked - m_new)
        m = m_new
    log_sum = tl.log(tl.sum(l_vec, axis=0))  # lse = m + log_sum, kept apart so that x - lse = (x - m) - log_sum
    n_partners = tl.sum(msum_vec, axis=0)
    tl.store(ROW_LOSS + pid, n_partners * (m + log_sum) - tl.sum(dot_vec, axis=0))

    # Sweep 2: dloss/dS = (n_partners * softmax(x) - mix) / tau_s / (B * n_pairs), in GRAD's dtype. n_partners is
    # sum(mix) as accumulated (1 or 2 up to rounding), which is what autograd of the reference uses too.
    if NEED_GRAD:
        g_row = GRAD + (v * B + b) * stride_g
        coef = inv_tau * grad_scale
        n_blocks = tl.cdiv(K, BLOCK_K)
        for i in range(n_blocks):
            # Last block first: the blocks sweep 1 touched most recently are the likeliest to still be in L2.
            offs = (n_blocks - 1 - i) * BLOCK_K + cols
            mask = offs < K
            x = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
            mix = tl.load(pa_row + offs, mask=mask, other=0.0) + tl.load(pb_row + offs, mask=mask & is_local, other=0.0)
            g = (n_partners * tl.exp((x - m) - log_sum) - mix) * coef
            if ROUND_BF16_BY_HAND:
                tl.store(g_row + offs, _to_bf16_rtne(g), mask=mask)
            else:
                tl.store(g_row + offs, g.to(GRAD.dtype.element_ty), mask=mask)


def _check_inputs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor) -> tuple[int, int]:
    """Return (batch, n_crops); the same checks and messages as the reference's `_check_shapes`."""
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError("student and teacher logits must be 2-D (rows, K)")
    n_teacher, k = teacher_logits.shape
    if n_teacher % 2 or n_teacher == 0:
        raise ValueError(f"teacher logits must hold 2 global crops of B rows each, got {n_teacher} rows")
    batch = n_teacher // 2
    if student_logits.shape[1] != k or center.numel() != k:
        raise ValueError(f"K mismatch: student {student_logits.shape[1]}, teacher {k}, center {center.numel()}")
    if student_logits.shape[0] % batch or student_logits.shape[0] < n_teacher:
        raise ValueError(f"student rows {student_logits.shape[0]} are not n_crops >= 2 times the batch {batch}")
    if k == 0:
        raise ValueError("K must be at least 1")
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits), ("center", center)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != student_logits.device:
            raise ValueError(f"{name} is on {t.device}, student_logits on {student_logits.device}")
    return batch, student_logits.shape[0] // batch


def _launcher(kernel):
    """`wrap_triton(kernel)` so torch.compile sees the launch; the bare kernel where that cannot apply.

    Under TRITON_INTERPRET=1 `triton.jit` returns an InterpretedFunction, which older torch versions refuse to
    wrap; it is launched eagerly. torch < 2.6 has no `wrap_triton` (and no `triton_op`): plain launch.
    """
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is None or not isinstance(kernel, triton.runtime.jit.JITFunction):
        return kernel
    return wrap(kernel)


# TRITON_INTERPRET=1 (read by triton.jit at decoration) turns kernels into InterpretedFunction objects.
_INTERPRETED = not isinstance(_dino_loss_fwd_kernel, triton.runtime.jit.JITFunction)


def _block(k: int, largest: int) -> int:
    """A power of two in [16, largest], no wider than K needs."""
    return max(16, min(largest, triton.next_power_of_2(k)))


def _dino_loss_fwd_impl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host side of passes 1-3: returns (loss fp32 scalar, teacher_sum (K,) fp32, dloss/dS or an empty tensor);
    dloss/dS has S's dtype, except fp32 for fp16 S (rounded after the loss scale, in backward)."""
    s = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    t = teacher_logits if teacher_logits.stride(-1) == 1 else teacher_logits.contiguous()
    c = center.reshape(-1).to(torch.float32).contiguous()
    n_teacher, k = t.shape
    batch = n_teacher // 2
    n_rows = s.shape[0]
    n_crops = n_rows // batch
    grad_scale = 1.0 / (batch * (2 * n_crops - 2))
    dev = s.device

    row_max = torch.empty((n_teacher,), dtype=torch.float32, device=dev)
    row_inv_sum = torch.empty((n_teacher,), dtype=torch.float32, device=dev)
    p_t = torch.empty((n_teacher, k), dtype=torch.float32, device=dev)
    teacher_sum = torch.empty((k,), dtype=torch.float32, device=dev)
    row_loss = torch.empty((n_rows,), dtype=torch.float32, device=dev)
    grad_dtype = torch.float32 if s.dtype == torch.float16 else s.dtype
    grad = torch.empty((n_rows, k) if need_grad else (0,), dtype=grad_dtype, device=dev)

    block_k = _block(k, ROW_BLOCK_K)
    _launcher(_teacher_stats_kernel)[(n_teacher,)](
        t, c, row_max, row_inv_sum, t.stride(0), k, 1.0 / teacher_temp, BLOCK_K=block_k, num_warps=ROW_NUM_WARPS
    )
    col_block = _block(k, COL_BLOCK_K)
    _launcher(_teacher_probs_kernel)[(triton.cdiv(k, col_block),)](
        t, c, row_max, row_inv_sum, p_t, teacher_sum, t.stride(0), p_t.stride(0), n_teacher, k, 1.0 / teacher_temp,
        BLOCK_R=COL_BLOCK_R, BLOCK_K=col_block, num_warps=COL_NUM_WARPS,
    )  # fmt: skip
    _launcher(_dino_loss_fwd_kernel)[(n_rows,)](
        s, p_t, grad, row_loss, s.stride(0), p_t.stride(0), grad.stride(0) if need_grad else 0,
        batch, n_crops, k, 1.0 / student_temp, grad_scale,
        BLOCK_K=block_k, NEED_GRAD=need_grad, ROUND_BF16_BY_HAND=_INTERPRETED and s.dtype == torch.bfloat16,
        num_warps=ROW_NUM_WARPS,
    )  # fmt: skip
    loss = row_loss.sum() * grad_scale
    return loss, teacher_sum, grad


if hasattr(torch.library, "triton_op"):
    # A torch.library op whose body torch.compile can see (the wrapped launches become
    # triton_kernel_wrapper_functional nodes); its fake implementation is the same function.
    _dino_loss_fwd = torch.library.triton_op("fastdino::dino_loss_fwd", mutates_args=())(_dino_loss_fwd_impl)
else:  # torch < 2.6: eager only
    _dino_loss_fwd = _dino_loss_fwd_impl


class DinoLossFunction(torch.autograd.Function):
    """Autograd for the fused loss: forward runs passes 1-3 (and writes dloss/dS when a gradient is needed);
    backward scales that saved gradient by grad_output. teacher_sum is not differentiable."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, center, student_temp, teacher_temp):
        need_grad = bool(ctx.needs_input_grad[0])
        loss, teacher_sum, grad = _dino_loss_fwd(
            student_logits, teacher_logits, center, float(student_temp), float(teacher_temp), need_grad
        )
        ctx.save_for_backward(grad)
        ctx.student_dtype = student_logits.dtype
        ctx.mark_non_differentiable(teacher_sum)
        return loss, teacher_sum

    @staticmethod
    def backward(ctx, grad_loss, grad_teacher_sum):
        (grad,) = ctx.saved_tensors
        # grad_loss is a 0-dim fp32 tensor; for fp16 inputs the saved gradient is fp32 and the scaled product is
        # rounded to fp16 once, on store (`out=`: no second fp32 (rows, K) temporary).
        out = torch.empty_like(grad, dtype=ctx.student_dtype)
        return torch.mul(grad, grad_loss, out=out), None, None, None, None


def dino_loss_forward(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-differentiable forward: (loss, teacher_sum) without writing a gradient (e.g. for evaluation)."""
    _check_inputs(student_logits, teacher_logits, center)
    loss, teacher_sum, _ = _dino_loss_fwd(
        student_logits.detach(), teacher_logits.detach(), center.detach(), student_temp, teacher_temp, False
    )
    return loss, teacher_sum


def dino_loss_triton(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused DINO loss with `fastdino.losses.dino.dino_loss_ref`'s contract.

    student_logits: (n_crops*B, K), crop-major; rows [0, 2B) are the two global crops. teacher_logits: (2B, K),
    detached. center: (K,). Any of fp32 / bf16 / fp16. Returns (loss: fp32 scalar, teacher_sum: (K,) fp32 column
    sum of the raw teacher logits, for the center update; the caller all-reduces it). Differentiable w.r.t.
    student_logits only; the gradient is computed in the forward pass and has student_logits' dtype (for fp16 it
    is kept in fp32 until backward has applied grad_output, the loss scale: see the module docstring).

    The autograd.Function wraps a `torch.library.triton_op` (torch >= 2.6), so torch.compile traces through it
    without a graph break. Runs on CPU tensors under TRITON_INTERPRET=1 (slowly: tests only).
    """
    _check_inputs(student_logits, teacher_logits, center)
    return DinoLossFunction.apply(student_logits, teacher_logits.detach(), center.detach(), student_temp, teacher_temp)
