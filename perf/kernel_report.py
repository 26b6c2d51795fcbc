"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, without a GPU: registers, spills, shared memory.

    python perf/kernel_report.py                 # markdown table, every configuration the host code can launch
    python perf/kernel_report.py --quick         # the CI subset (see `configurations`), about a fifth of the compiles
    python perf/kernel_report.py --json out.json # the same rows as JSON (what tests/kernels/test_aot_compile.py reads)

Triton's compiler runs its whole pipeline (TTIR -> TTGIR -> LLVM -> PTX) for a `GPUTarget("cuda", cc, 32)` on any
host; the PTX is then assembled with Triton's bundled `ptxas -v`, whose report gives registers per thread and
spill stores / loads in bytes. Shared memory is Triton's own figure (`metadata.shared`, the dynamic shared memory
each launch asks for: reduction scratch and layout conversions). Nothing here touches a GPU.

Configurations (`configurations()`): for each kernel, every dtype its wrapper accepts, every constexpr variant
(NEED_GRAD, M_IS_TENSOR, ALIGNED) and every block size the host can choose (`fastdino.kernels.dino_loss._block`
gives the powers of two from 16 to ROW_BLOCK_K / COL_BLOCK_K; the EMA uses EMA_BLOCK on a GPU), with the wrapper's
num_warps. Argument attributes are those Triton's launcher derives at the training shape (B = 128, 12 crops,
K = 65536): every pointer 16-byte aligned, and the integer arguments that are multiples of 16 marked so.

Must run with TRITON_INTERPRET unset (the interpreter turns kernels into objects the compiler cannot take): the
script drops it from its own environment before importing the kernels. Works with triton 3.6 and 3.8
(`triton.compiler.ASTSource` with a "constexpr"-typed signature and tuple-keyed attributes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = (80, 90)
SUPPORTED_TARGETS = (80, 86, 87, 89, 90)  # what Triton's bundled `ptxas` assembles (sm_100+: ptxas-blackwell)
DTYPES = ("fp32", "bf16", "fp16")
REG_BOUND = 128
"""Registers per thread every configuration must stay at or under: at 8 warps (256 threads) a 128-register kernel
still fits two CTAs (16 warps) per SM on sm_80 / sm_90 (65,536 registers); above it occupancy halves."""

# Integer arguments at the training shape (B = 128, 12 crops, K = 65536), for the launcher's 16-divisibility marks.
_SHAPE_INTS = {"stride_t": 65536, "stride_p": 65536, "stride_s": 65536, "stride_g": 65536, "K": 65536,
               "N_ROWS": 256, "B": 128, "N_CROPS": 12}
_QUICK_EMA_PAIRS = {("fp32", "fp32"), ("fp32", "bf16")}


@dataclass
class KernelConfig:
    """One compile: kernel `module:name`, its full signature (constexprs typed "constexpr") and launch options."""

    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    label: str = ""
    dtype_constexprs: dict[str, str] = field(default_factory=dict)
    """constexpr arguments that are Triton dtypes, by name -> "fp32" / "bf16" / "fp16" (resolved at compile)."""

    @property
    def name(self) -> str:
        return f"{self.kernel}[{self.label}]"


def _block_sizes(largest: int, quick: bool) -> list[int]:
    """The blocks `fastdino.kernels.dino_loss._block` can return: powers of two in [16, largest] (quick: largest
    only)."""
    sizes = [1 << i for i in range(4, largest.bit_length()) if 1 << i <= largest]
    return sizes[-1:] if quick else sizes


def configurations(quick: bool = False) -> list[KernelConfig]:
    """Every (kernel, dtype, constexpr variant, block) the wrappers in kernels/ can launch on a GPU.

    quick (the CI test's subset): the loss kernels at their largest block only (the block every K >= 4096 gets,
    and the most registers: a full report shows registers growing with the block), every dtype and NEED_GRAD;
    the EMA kernel for every dtype pair and momentum kind (float or tensor) with aligned tensors (what PyTorch's
    allocator gives), and unaligned as well for the fp32 teacher with an fp32 or bf16 student.
    """
    from fastdino.kernels import dino_loss as dl
    from fastdino.kernels import ema

    out = []
    for dt in DTYPES:
        for bk in _block_sizes(dl.ROW_BLOCK_K, quick):
            sig = {"T": f"*{dt}", "C": "*fp32", "ROW_MAX": "*fp32", "ROW_INV_SUM": "*fp32", "stride_t": "i32",
                   "K": "i32", "inv_tau": "fp32", "BLOCK_K": "constexpr"}
            out.append(KernelConfig("fastdino.kernels.dino_loss", "_teacher_stats_kernel", sig, {"BLOCK_K": bk},
                                    dl.ROW_NUM_WARPS, f"T={dt} BLOCK_K={bk}"))
        for bk in _block_sizes(dl.COL_BLOCK_K, quick):
            sig = {"T": f"*{dt}", "C": "*fp32", "ROW_MAX": "*fp32", "ROW_INV_SUM": "*fp32", "PT": "*fp32",
                   "TSUM": "*fp32", "stride_t": "i32", "stride_p": "i32", "N_ROWS": "i32", "K": "i32",
                   "inv_tau": "fp32", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"}
            out.append(KernelConfig("fastdino.kernels.dino_loss", "_teacher_probs_kernel", sig,
                                    {"BLOCK_R": dl.COL_BLOCK_R, "BLOCK_K": bk}, dl.COL_NUM_WARPS,
                                    f"T={dt} BLOCK_R={dl.COL_BLOCK_R} BLOCK_K={bk}"))
        for need_grad in (True, False):
            for bk in _block_sizes(dl.ROW_BLOCK_K, quick):
                sig = {"S": f"*{dt}", "PT": "*fp32", "GRAD": f"*{dt}", "ROW_LOSS": "*fp32", "stride_s": "i32",
                       "stride_p": "i32", "stride_g": "i32", "B": "i32", "N_CROPS": "i32", "K": "i32",
                       "inv_tau": "fp32", "grad_scale": "fp32", "BLOCK_K": "constexpr", "NEED_GRAD": "constexpr",
                       "ROUND_BF16_BY_HAND": "constexpr"}  # the by-hand rounding is for the interpreter only
                out.append(KernelConfig("fastdino.kernels.dino_loss", "_dino_loss_fwd_kernel", sig,
                                        {"BLOCK_K": bk, "NEED_GRAD": need_grad, "ROUND_BF16_BY_HAND": False},
                                        dl.ROW_NUM_WARPS, f"S={dt} NEED_GRAD={int(need_grad)} BLOCK_K={bk}"))
    for t_dt in DTYPES:
        for s_dt in DTYPES:
            for m_is_tensor in (True, False):
                for aligned in (True, False):
                    if quick and not aligned and (t_dt, s_dt) not in _QUICK_EMA_PAIRS:
                        continue
                    sig = {"t_addr_ptr": "*i64", "s_addr_ptr": "*i64", "count_ptr": "*i64",
                           "m_ptr": "*fp32" if m_is_tensor else "*i64", "m_val": "fp32", "T_DTYPE": "constexpr",
                           "S_DTYPE": "constexpr", "BLOCK": "constexpr", "M_IS_TENSOR": "constexpr",
                           "ALIGNED": "constexpr"}
                    out.append(KernelConfig(
                        "fastdino.kernels.ema", "_ema_multi_tensor_kernel", sig,
                        {"BLOCK": ema.EMA_BLOCK, "M_IS_TENSOR": m_is_tensor, "ALIGNED": aligned},
                        ema.EMA_NUM_WARPS,
                        f"T={t_dt} S={s_dt} M_IS_TENSOR={int(m_is_tensor)} ALIGNED={int(aligned)} "
                        f"BLOCK={ema.EMA_BLOCK}",
                        dtype_constexprs={"T_DTYPE": t_dt, "S_DTYPE": s_dt}))
    return out


def api_problem() -> str | None:
    """Why AOT compilation cannot run here (None when it can): Triton's API, its CUDA backend, bundled ptxas."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this triton has no ASTSource / GPUTarget API ({e})"
    try:
        importlib.import_module("triton.backends.nvidia.compiler")
    except ImportError as e:
        return f"this triton has no CUDA backend ({e})"
    ptxas = ptxas_path()
    if not ptxas.is_file() or not os.access(ptxas, os.X_OK):
        return f"no executable ptxas at {ptxas} (set TRITON_PTXAS_PATH)"
    return None


def ptxas_path() -> Path:
    """TRITON_PTXAS_PATH if set (Triton honours it too), else the ptxas bundled in Triton's CUDA backend."""
    if os.environ.get("TRITON_PTXAS_PATH"):
        return Path(os.environ["TRITON_PTXAS_PATH"])
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
}


def parse_ptxas(log: str) -> dict[str, int]:
    """registers, spill_stores, spill_loads, stack_frame (bytes) from a `ptxas -v` report of one kernel."""
    out = {}
    for key, pattern in _PTXAS_RE.items():
        match = pattern.search(log)
        if match is None:
            raise ValueError(f"ptxas -v report has no {key!r} line:\n{log}")
        out[key] = int(match.group(1))
    return out


def compile_one(cfg: KernelConfig, cc: int) -> dict:
    """Compile `cfg` for compute capability `cc` and assemble it with `ptxas -v`: one result row (a dict)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(cfg.module), cfg.kernel)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError(f"{cfg.kernel} is not a JITFunction (TRITON_INTERPRET=1?): run without the interpreter")
    constexprs = dict(cfg.constexprs)
    tl_dtypes = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    constexprs.update({k: tl_dtypes[v] for k, v in cfg.dtype_constexprs.items()})
    attrs = {}
    for i, (arg, ty) in enumerate(cfg.signature.items()):
        if ty.startswith("*") or (ty.startswith("i") and _SHAPE_INTS.get(arg, 1) % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    start = time.perf_counter()
    src = ASTSource(fn=fn, signature=cfg.signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": cfg.num_warps})
    ptx = kernel.asm["ptx"]
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE).group(1)  # sm_90a on Hopper, as Triton builds
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        run = subprocess.run([str(ptxas_path()), "-v", f"--gpu-name={arch}", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"],
                             capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"ptxas failed on {cfg.name} for {arch}:\n{run.stderr}")
    row = {"kernel": cfg.kernel, "config": cfg.label, "target": arch, "num_warps": cfg.num_warps,
           **parse_ptxas(run.stdout + run.stderr), "shared_bytes": int(kernel.metadata.shared),
           "compile_s": round(time.perf_counter() - start, 2)}
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | config | target | warps | registers | spill stores / loads (B) | shared memory (B) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['config']} | {r['target']} | | FAILED: {r['error']} | | |")
            continue
        lines.append(f"| {r['kernel']} | {r['config']} | {r['target']} | {r['num_warps']} | {r['registers']} | "
                     f"{r['spill_stores']} / {r['spill_loads']} | {r['shared_bytes']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fastdino.cli import OneLineParser, output_file  # after __main__ dropped TRITON_INTERPRET

    def targets(text: str) -> list[int]:
        ccs = [t for t in text.split(",") if t]
        bad = [t for t in ccs if not t.isdigit() or int(t) not in SUPPORTED_TARGETS] or ([text] if not ccs else [])
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not a compute capability this report assembles: use "
                                             f"{', '.join(map(str, SUPPORTED_TARGETS))} (Triton's bundled ptxas)")
        return [int(t) for t in ccs]

    parser = OneLineParser(prog="kernel_report", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="only the largest block size of each kernel variant (the most registers): the CI subset")
    parser.add_argument("--targets", type=targets, default=list(TARGETS),
                        help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--json", type=output_file, help="also write the rows to this JSON file")
    parser.add_argument("--kernel", help="only kernels whose name contains this")
    args = parser.parse_args(argv)
    problem = api_problem()
    if problem:
        print(f"kernel_report: cannot compile ahead of time: {problem}", file=sys.stderr)
        return 2
    import triton

    rows = []
    for cfg in configurations(args.quick):
        if args.kernel and args.kernel not in cfg.kernel:
            continue
        for cc in args.targets:
            try:
                rows.append(compile_one(cfg, cc))
            except Exception as e:  # noqa: BLE001 - one failed configuration is a row, not the end of the report
                rows.append({"kernel": cfg.kernel, "config": cfg.label, "target": f"sm_{cc}",
                             "error": " ".join(str(e).split())[:300]})
    print(f"# Triton {triton.__version__} ahead-of-time compile, ptxas {ptxas_path()}; "
          f"register bound {REG_BOUND} per thread\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "reg_bound": REG_BOUND, "rows": rows},
                                              indent=1))
    failed = [r for r in rows if "error" in r or r["spill_stores"] or r["spill_loads"] or r["registers"] > REG_BOUND]
    if failed:
        print(f"\n{len(failed)} configuration(s) failed, spill or exceed {REG_BOUND} registers", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    # The interpreter would turn the kernels into objects the compiler cannot take: drop it before they are imported.
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
