"""Fused multi-tensor EMA for the DINO teacher (Caron et al. 2021, Sec. 3.1 "Teacher network"; SPEC "Teacher update").

    theta_t <- m * theta_t + (1 - m) * theta_s        for every (teacher, student) tensor pair, m in [0, 1]

computed in fp32 as fma(t, m, s * (1 - m)) and rounded once to the teacher's dtype: m = 1 returns t and m = 0
returns s bit for bit (finite values).

Mechanism: a pointer-array multi-tensor kernel (option (b) of issue 5). `EMAPlan` cuts every tensor pair
into blocks of `BLOCK` elements and writes one int64 table of shape (3, n_blocks): teacher address, student
address and element count of each block. One program per block loads its row, casts the two addresses to
typed pointers and updates `BLOCK` elements (unmasked and 16-byte-aligned when the block is full, masked
for the tail of a tensor). So the whole teacher is one launch per (teacher dtype, student dtype) group:
exactly one for the usual fp32 teacher with an fp32 or a bf16 student.

Why not flat storage (option (a): parameters as views into one flat buffer)? It gives the same single
elementwise kernel, but it changes the student's storage, and every later owner of the parameters must
then keep the views alive: `Module.to()` replaces each `param.data` (views break), `load_state_dict(assign=True)`
replaces the parameters, DeepSpeed/ZeRO and FSDP re-flatten into their own buffers, and a broken view turns
the EMA silently into an update of an orphaned buffer. It also forces one dtype per buffer. The pointer
table leaves both models exactly as built; its costs are small and bounded: the table read is 24 bytes per
block (0.05% of the 48 KiB an fp32/fp32 block of 4096 moves), at most one partly masked block per tensor
(about 160 of 11,000 programs for ViT-S/16 + a K = 65536 head), and a host-side address check per call
(`EMAPlan.matches`, one `data_ptr()` per tensor, overlapped with GPU work), after which the plan is rebuilt
when any tensor moved, so a stale address is never dereferenced. `EMAPlan` also holds detached aliases of
the tensors it was built from, so their memory cannot be freed under a live table.

Momentum: a Python float is passed as an fp32 scalar argument (Triton does not specialise on float values,
so a new m each step never recompiles); a 0-d float tensor on the tensors' device is loaded inside the
kernel (no host sync, CUDA-graph capturable). That gives two compiled variants per dtype pair
(M_IS_TENSOR), times ALIGNED (all base addresses 16-byte aligned, as PyTorch's allocator gives them).

Interpreter: under TRITON_INTERPRET=1 (the CPU CI) the interpreter dereferences the raw addresses in host
memory, so the same kernel runs on CPU tensors; CUDA tensors are refused in that mode (the interpreter
would copy them to the host and the addresses would point into device memory).

Not registered with `torch.library`: the op writes through raw addresses that the dispatcher cannot see,
so it could not declare its mutations truthfully; it runs after the optimizer step, outside compiled regions.

Design limits: pairs of equal shape and strides, dense (contiguous or channels-last); one device; float32,
bfloat16 or float16 on either side, math in fp32; any number of elements per tensor (blocks are int64
addressed); at most 2**31 - 1 blocks per group.

Imports only torch and triton.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

EMA_BLOCK = 4096  # elements per program: 16 fp32 per thread at 8 warps, four 16-byte vector accesses
EMA_NUM_WARPS = 8
EMA_BLOCK_INTERPRET = 1 << 16  # the interpreter's cost is per program, not per element: fewer, larger blocks

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _ema_multi_tensor_kernel(
    t_addr_ptr,  # (n_blocks,) int64: teacher address of each block's first element
    s_addr_ptr,  # (n_blocks,) int64: student address of each block's first element
    count_ptr,  # (n_blocks,) int64: elements in the block, 1..BLOCK
    m_ptr,  # 0-d float tensor holding m when M_IS_TENSOR, else unused
    m_val,  # fp32 scalar m when not M_IS_TENSOR
    T_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    M_IS_TENSOR: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """One block of one tensor pair: t <- fma(t, m, s * (1 - m)), fp32 math, stored in T_DTYPE."""
    pid = tl.program_id(0).to(tl.int64)
    t_ptr = tl.load(t_addr_ptr + pid).to(tl.pointer_type(T_DTYPE))
    s_ptr = tl.load(s_addr_ptr + pid).to(tl.pointer_type(S_DTYPE))
    count = tl.load(count_ptr + pid)
    if ALIGNED:
        # Block starts are base + k * BLOCK elements and every base is 16-byte aligned: lets loads vectorise.
        t_ptr = tl.multiple_of(t_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
    if M_IS_TENSOR:
        m = tl.load(m_ptr).to(tl.float32)
    else:
        m = tl.cast(m_val, tl.float32)
    w = 1.0 - m
    offs = tl.arange(0, BLOCK)
    if count == BLOCK:
        t = tl.load(t_ptr + offs).to(tl.float32)
        s = tl.load(s_ptr + offs).to(tl.float32)
        tl.store(t_ptr + offs, tl.fma(t, m, s * w).to(T_DTYPE))
    else:
        mask = offs < count
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(t_ptr + offs, tl.fma(t, m, s * w).to(T_DTYPE), mask=mask)


def _interpreting() -> bool:
    return isinstance(_ema_multi_tensor_kernel, InterpretedFunction)


def default_block() -> int:
    """EMA_BLOCK on the GPU, EMA_BLOCK_INTERPRET under TRITON_INTERPRET=1."""
    return EMA_BLOCK_INTERPRET if _interpreting() else EMA_BLOCK


def _is_dense(t: torch.Tensor) -> bool:
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


class _Group:
    """The launch table of the tensor pairs that share one (teacher dtype, student dtype)."""

    def __init__(self, teachers: list[torch.Tensor], students: list[torch.Tensor], block: int, device: torch.device):
        numel = torch.tensor([t.numel() for t in teachers], dtype=torch.int64)  # (n_tensors,)
        t_base = torch.tensor([t.data_ptr() for t in teachers], dtype=torch.int64)
        s_base = torch.tensor([s.data_ptr() for s in students], dtype=torch.int64)
        n_blocks = (numel + block - 1) // block  # (n_tensors,)
        tensor_of_block = torch.repeat_interleave(torch.arange(len(teachers)), n_blocks)  # (total,)
        first_block = torch.cumsum(n_blocks, 0) - n_blocks
        start = (torch.arange(tensor_of_block.numel()) - first_block[tensor_of_block]) * block  # element offset
        table = torch.stack(
            [
                t_base[tensor_of_block] + start * teachers[0].element_size(),
                s_base[tensor_of_block] + start * students[0].element_size(),
                torch.clamp(numel[tensor_of_block] - start, max=block),
            ]
        )  # (3, total)
        self.n_blocks = table.shape[1]
        if self.n_blocks >= 2**31:
            raise ValueError(f"{self.n_blocks} blocks exceed the grid limit; raise the block size")
        self.table = table.to(device)
        self.t_dtype = _TL_DTYPES[teachers[0].dtype]
        self.s_dtype = _TL_DTYPES[students[0].dtype]
        self.aligned = bool(((t_base % 16 == 0) & (s_base % 16 == 0)).all())


class EMAPlan:
    """Launch tables for one fixed list of (teacher, student) tensor pairs; build once, apply every step.

    teachers, students: equal-length lists of tensors paired by position, on one device, of equal shape and
    strides, dense, float32 / bfloat16 / float16. Empty tensors are skipped. block: elements per program, a
    power of two >= 16 (default `default_block()`). The plan keeps detached aliases
    of the tensors, so the memory its table points to stays allocated; if any tensor is later re-allocated
    (e.g. `Module.to()` replaces `param.data`), `matches` returns False and a new plan must be built: `apply`
    never checks, so the caller must (`ema_multi_tensor_` and TeacherEMA do, every call).
    """

    def __init__(self, teachers: list[torch.Tensor], students: list[torch.Tensor], block: int | None = None):
        if len(teachers) != len(students):
            raise ValueError(f"{len(teachers)} teacher tensors but {len(students)} student tensors")
        block = default_block() if block is None else block
        if block < 16 or block & (block - 1):
            raise ValueError(f"block must be a power of two >= 16, got {block}")
        devices = {t.device for t in teachers} | {s.device for s in students}
        if len(devices) > 1:
            raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
        self.device = devices.pop() if devices else None  # None: nothing to update, no launch
        if self.device is not None and self.device.type == "cuda" and _interpreting():
            raise RuntimeError("TRITON_INTERPRET=1 runs kernels on the host: the EMA kernel needs CPU tensors then")
        if self.device is not None and self.device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"the Triton EMA kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {self.device}")
        groups: dict[tuple[torch.dtype, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for i, (t, s) in enumerate(zip(teachers, students, strict=True)):
            if t.shape != s.shape or t.stride() != s.stride():
                raise ValueError(
                    f"pair {i}: teacher {tuple(t.shape)}/{t.stride()} != student {tuple(s.shape)}/{s.stride()}"
                )
            if not (_is_dense(t) and _is_dense(s)):
                raise ValueError(f"pair {i}: tensors must be dense (contiguous or channels-last)")
            if t.dtype not in _TL_DTYPES or s.dtype not in _TL_DTYPES:
                raise ValueError(f"pair {i}: dtypes {t.dtype}, {s.dtype} not in {sorted(map(str, _TL_DTYPES))}")
            if t.numel():
                pair = groups.setdefault((t.dtype, s.dtype), ([], []))
                pair[0].append(t)
                pair[1].append(s)
        self.block = block
        self.groups = [_Group(ts, ss, block, self.device) for ts, ss in groups.values()]
        # Detached aliases keep the storages alive even if a Parameter's .data is later replaced.
        self._alive = [t.detach() for t in teachers] + [s.detach() for s in students]
        self._key = _address_key(teachers, students)

    def matches(self, teachers: list[torch.Tensor], students: list[torch.Tensor]) -> bool:
        """True if the tensors still live at the addresses the tables were built from (cheap: host only)."""
        return _address_key(teachers, students) == self._key

    def apply(self, momentum: float | torch.Tensor) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, one launch per dtype group."""
        if isinstance(momentum, torch.Tensor):
            on_device = self.device is None or momentum.device == self.device
            if momentum.numel() != 1 or not momentum.is_floating_point() or not on_device:
                raise ValueError(
                    f"momentum tensor must be one float element on {self.device}, got {momentum.dtype} "
                    f"{tuple(momentum.shape)} on {momentum.device}"
                )
            m_is_tensor, m_val = True, 0.0
        else:
            m_val = float(momentum)
            if not 0.0 <= m_val <= 1.0:
                raise ValueError(f"momentum must be in [0, 1], got {m_val}")
            m_is_tensor = False
        if not self.groups:
            return
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            for g in self.groups:
                m_ptr = momentum if m_is_tensor else g.table  # dummy pointer when m is a scalar
                _ema_multi_tensor_kernel[(g.n_blocks,)](
                    g.table[0],
                    g.table[1],
                    g.table[2],
                    m_ptr,
                    m_val,
                    T_DTYPE=g.t_dtype,
                    S_DTYPE=g.s_dtype,
                    BLOCK=self.block,
                    M_IS_TENSOR=m_is_tensor,
                    ALIGNED=g.aligned,
                    num_warps=EMA_NUM_WARPS,
                )


def _address_key(teachers: list[torch.Tensor], students: list[torch.Tensor]) -> tuple:
    """Addresses and sizes: equal keys mean an unchanged table is still exactly right."""
    return (
        tuple(map(torch.Tensor.data_ptr, teachers)),
        tuple(map(torch.Tensor.data_ptr, students)),
        tuple(map(torch.Tensor.numel, teachers)),
    )


def ema_multi_tensor_(
    teachers: list[torch.Tensor],
    students: list[torch.Tensor],
    momentum: float | torch.Tensor,
    plan: EMAPlan | None = None,
) -> EMAPlan:
    """teachers[i] <- momentum * teachers[i] + (1 - momentum) * students[i], in place; returns the plan used.

    Pass the returned plan back on the next call to skip building tables; it is rebuilt when the tensors moved.
    Bytes moved (the floor): read students + read teachers + write teachers = sum numel * (2 * t_size + s_size).
    """
    if plan is None or not plan.matches(teachers, students):
        plan = EMAPlan(teachers, students)
    plan.apply(momentum)
    return plan
