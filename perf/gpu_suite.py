"""Every GPU figure in one command, time-boxed to fit one short GPU loan (issue 17).

    python perf/gpu_suite.py --out DIR        # on a GPU machine: under 8 min, results in DIR
    python perf/gpu_suite.py --dry-run        # anywhere: what it would run, with each part's time box

Why this shape: GPU time here is lent rarely and briefly (15 minutes of device time per session, machine start
included, 10 minutes per command), so one command must measure everything, and no part may eat the others'
time. Parts run in order, each in its own process group with its own time box (`PARTS`; the last part, bench_step,
gets whatever the budget has left, at least its own box when earlier parts ran short; bench_data prints each
backend's row as it ends, so a cut-off run keeps the rows measured); the ahead-of-time compile
report needs no GPU, so it runs beside the GPU tests. The sum of the boxes is the budget (480 s by default, 8
minutes, leaving a 10-minute command ~2 minutes for start-up and the copy back).

Results, rewritten after every part so that a command cut off still returns what was measured:
  gpu_suite.md    a dated block (device, driver, torch / triton / CUDA versions, each part's command, status,
                  seconds and output tables) ready to paste into perf/RESULTS.md (`--append` appends it there)
  gpu_suite.json  the same as data, with the JSON rows of bench_step and kernel_report
  gpu_suite.log   every part's full stdout and stderr
The output folder is --out, else $OUT when set, else runs/gpu_suite/ (ignored by git). Subprocesses get
PYTHONPATH = the repository root (the package need not be installed) and TRITON_INTERPRET unset.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480


@dataclass(frozen=True)
class Part:
    name: str
    args: tuple[str, ...]  # after the python executable; {json}: a file in the output folder, {out}: the folder
    box_s: int
    what: str
    background: bool = False  # CPU only: runs beside the next part (the GPU tests), collected before benchmarks


PARTS = (
    Part("kernel_report", ("perf/kernel_report.py", "--json", "{json}"), 100,
         "Triton kernels compiled ahead of time for sm_80 / sm_90: registers, spills, shared memory (CPU only)",
         background=True),
    Part("gpu_tests", ("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"), 140,
         "every GPU-marked test (kernels, GPU data paths, DDP under torchrun, DeepSpeed ZeRO-1/2 on CUDA)"),
    Part("bench_dino_loss", ("-m", "perf.bench_dino_loss", "--batch", "128", "--dtype", "bf16", "fp32"), 30,
         "fused DINO loss fwd+bwd vs official loop vs PyTorch, B=128, 12 crops, K=65536"),
    Part("bench_ema", ("perf/bench_ema.py", "--rep", "100"), 25,
         "teacher EMA: official loop vs foreach vs Triton, ViT-S/16 and ViT-B/16 + K=65536 head"),
    Part("bench_data", ("-m", "perf.bench_data", "--images", "768", "--batch", "64", "--workers", "12", "--steps",
                        "8", "--warmup", "2"), 30,
         "data backends: 2x224 + 10x96 img/s vs an official-style pipeline, GPU ms per image (768 JPEGs 500x375)"),
    Part("bench_curve_end_to_end", ("-m", "perf.bench_step", "--cases", "vits16_b128", "--providers", "fastdino",
                                    "--curve", "200", "--curve-png", "{out}/loss_curve.png", "--end-to-end",
                                    "dali,torch_gpu", "--steps", "10", "--json", "{json}"), 80,
         "ViT-S/16 B128: fastdino's loss curve vs plain PyTorch over 200 steps on the same real batches, and the "
         "trainer's own img/s on real JPEGs (Trainer.fit, DALI and torch_gpu data)"),
    Part("bench_step_candidates", ("-m", "perf.bench_step", "--cases", "vits16_b128", "--providers",
                                   "fastdino-compile,fastdino-cudagraphs", "--steps", "10", "--warmup", "3",
                                   "--json", "{json}"), 70,
         "fastdino's step-speed candidates (torch.compile, CUDA graphs), ViT-S/16 B128"),
    Part("bench_train_sit", ("perf/bench_train.py", "--method", "sit", "--steps", "10", "--warmup", "3",
                             "--results", ""), 35,
         "the SiT step on the same engine, ViT-S/16 2x224 B128 bf16: img/s beside DINO's (issue 15)"),
    Part("bench_step", ("-m", "perf.bench_step", "--steps", "10", "--warmup", "3", "--json", "{json}"), 70,
         "official vs plain PyTorch vs fastdino step, the four issue-17 cases, then the ResNet-50 recipe (rn50_b64, "
         "last: rows are written as they come, so a cut-off box keeps the ViT rows; 10 timed steps each)"),
)


def serial_seconds(parts: tuple[Part, ...]) -> int:
    """The boxes end to end: a background part overlaps the part after it (its box is no longer than that one's)."""
    return sum(p.box_s for i, p in enumerate(parts) if not p.background or i == len(parts) - 1)


def command(part: Part, out: Path) -> list[str]:
    return [sys.executable, *(a.replace("{json}", str(out / f"{part.name}.json")).replace("{out}", str(out))
                              for a in part.args)]


def shown(cmd: list[str]) -> str:
    """The command as a person would type it from the repository root."""
    return " ".join(["python", *(a or "''" for a in cmd[1:])])


def environment() -> dict:
    """Device, driver and versions, without creating a CUDA context in this process."""
    import torch
    import triton

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
           "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        name, driver, memory = (s.strip() for s in smi.stdout.splitlines()[0].split(","))
        env.update(device=name, driver=driver, memory=memory)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError) as exc:
        env.update(device="unknown (nvidia-smi failed)", driver=f"unknown ({exc})", memory="unknown")
    return env


def start(part: Part, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(command(part, out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(part: Part, proc: subprocess.Popen, started: float, box_s: float, out: Path) -> dict:
    """Wait for a part within its box (its whole process group is killed past it); its result record."""
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, box_s - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    result = {"name": part.name, "what": part.what, "command": shown(command(part, out)).replace(str(out), "$OUT"),
              "box_s": round(box_s), "seconds": round(time.monotonic() - started, 1), "returncode": proc.returncode,
              "timed_out": timed_out, "stdout": stdout, "stderr": stderr}
    data = out / f"{part.name}.json"
    if data.exists():  # kernel_report and bench_step write their rows; folded into gpu_suite.json
        try:
            result["data"] = json.loads(data.read_text())
        except ValueError as exc:  # cut off mid-write
            result["data_error"] = str(exc)
        data.unlink()
    return result


def status(r: dict) -> str:
    if r["timed_out"]:
        return f"TIMED OUT after {r['seconds']:.0f} s (box {r['box_s']} s): figures up to then"
    return f"{'ok' if r['returncode'] == 0 else 'exit code ' + str(r['returncode'])}, {r['seconds']:.0f} s"


def body(r: dict) -> str:
    """What a part contributes to the markdown: its tables (benchmarks), or its summary lines (tests, errors)."""
    lines = r["stdout"].rstrip().splitlines()
    if r["name"] == "gpu_tests":
        lines = [ln for ln in lines if ln.startswith(("FAILED", "ERROR")) or " passed" in ln or " failed" in ln
                 or " skipped" in ln or "no tests ran" in ln]
    if r["returncode"] != 0 and not r["timed_out"]:
        lines += ["", "stderr (last lines):", *r["stderr"].rstrip().splitlines()[-5:]]
    return "\n".join(lines) if lines else "(no output)"


def markdown(env: dict, results: list[dict], argv: list[str], budget: float, total: float) -> str:
    head = [f"### GPU suite, {env['date']}, {env['device']}", "",
            f"Device: {env['device']} ({env['memory']}), driver {env['driver']}; torch {env['torch']} (CUDA "
            f"{env['cuda']}), triton {env['triton']}, Python {env['python']}, {env['cpu_count']} CPU cores.",
            f"Command: `python perf/gpu_suite.py {' '.join(argv)}` ({total:.0f} s of a {budget:.0f} s budget).", ""]
    for r in results:
        head += [f"#### {r['name']}: {r['what']}", "", f"`{r['command']}`: {status(r)}", "", body(r), ""]
    return "\n".join(head)


def write(out: Path, env: dict, results: list[dict], argv: list[str], budget: float, total: float) -> None:
    (out / "gpu_suite.md").write_text(markdown(env, results, argv, budget, total))
    (out / "gpu_suite.json").write_text(json.dumps(
        {"environment": env, "command": f"python perf/gpu_suite.py {' '.join(argv)}", "budget_s": budget,
         "seconds": round(total, 1), "parts": [{k: v for k, v in r.items() if k not in ("stdout", "stderr")}
                                               | {"stdout": r["stdout"][-20000:]} for r in results]}, indent=1))
    with open(out / "gpu_suite.log", "w") as log:
        for r in results:
            log.write(f"===== {r['name']}: {r['command']} ({status(r)})\n{r['stdout']}\n--- stderr\n{r['stderr']}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from fastdino.cli import OneLineParser, positive_float

    parser = OneLineParser(prog="gpu_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results folder (default: $OUT if set, else runs/gpu_suite)")
    parser.add_argument("--dry-run", action="store_true", help="list the parts, their commands and time boxes")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(p.name for p in PARTS)}")
    parser.add_argument("--budget", type=positive_float, default=BUDGET_S,
                        help="seconds for everything (default %(default)s)")
    parser.add_argument("--append", action="store_true", help="also append the markdown block to perf/RESULTS.md")
    args = parser.parse_args(argv)
    parts = PARTS
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in {p.name for p in PARTS}]
        if unknown:
            print(f"gpu_suite: --only: unknown part {unknown[0]!r}; parts: {', '.join(p.name for p in PARTS)}",
                  file=sys.stderr)
            return 2
        parts = tuple(p for p in PARTS if p.name in names)
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "gpu_suite")
    scale = min(1.0, args.budget / serial_seconds(parts))  # a smaller budget shrinks every box alike

    if args.dry_run:
        print(f"gpu_suite dry run: {len(parts)} parts, budget {args.budget:.0f} s; results would go to {out}/")
        for p in parts:
            where = "beside the next part (CPU only)" if p.background else "in order"
            print(f"  {p.name:24s} box {p.box_s * scale:4.0f} s  {where:32s} {shown(command(p, Path('$OUT')))}")
            print(f"  {'':24s} {p.what}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA GPU visible; run it on a GPU machine (--dry-run lists what it runs)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    t0 = time.monotonic()
    results: list[dict] = []
    background: list[tuple[Part, subprocess.Popen, float, float]] = []
    for i, part in enumerate(parts):
        left = args.budget - (time.monotonic() - t0)
        last = i == len(parts) - 1
        box = left if last else min(part.box_s * scale, left)
        if box < 5:
            results.append({"name": part.name, "what": part.what, "command": shown(command(part, Path("$OUT"))),
                            "box_s": 0, "seconds": 0.0, "returncode": None, "timed_out": True,
                            "stdout": "", "stderr": "not run: the budget was spent"})
            continue
        print(f"[{time.monotonic() - t0:5.0f} s] {part.name} (box {box:.0f} s)", flush=True)
        proc, started = start(part, out), time.monotonic()
        if part.background:
            background.append((part, proc, started, box))
            continue
        results.append(finish(part, proc, started, box, out))
        for bg in background:  # the CPU-only parts end before the benchmarks start timing
            results.append(finish(*bg, out))
        background.clear()
        write(out, env, results, argv, args.budget, time.monotonic() - t0)
    for bg in background:
        results.append(finish(*bg, out))
    total = time.monotonic() - t0
    write(out, env, results, argv, args.budget, total)
    if args.append:
        with open(ROOT / "perf" / "RESULTS.md", "a") as f:
            f.write("\n" + markdown(env, results, argv, args.budget, total))
    for r in results:
        print(f"{r['name']:16s} {status(r)}")
    print(f"results: {out}/gpu_suite.md, gpu_suite.json, gpu_suite.log ({total:.0f} s)")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # fastdino importable without installing it, as for the parts
    sys.exit(main())
