"""Every GPU figure in one command, time-boxed to fit one short GPU loan (issues 17 and 21).

    bash perf/gpu_wheels.sh                   # here, once: .gpu_wheels/ (xformers, DeepSpeed and its needs, 9 MiB)
    python perf/gpu_suite.py                  # on the GPU machine, with .gpu_wheels/ carried: under 9 min, $OUT
    python perf/gpu_suite.py --dry-run        # anywhere: each part's box, estimate, margin and the total
    python perf/gpu_suite.py --only bench_step_candidate --candidate cudagraphs   # the other cold compile

Why this shape: GPU time here is lent rarely and briefly (15 minutes of device time per session, machine start
included, 10 minutes per command), so one command must measure everything, and no part may eat the others'
time. Parts run in order, each in its own process group with its own time box (`PARTS`; the last part, bench_step,
gets whatever the budget has left, at least its own box when earlier parts ran short). A part marked `beside`
runs beside the next one: the CPU-only ones (carried wheels, the compile report), and the loss curve, which
measures no speed, beside the GPU tests; its box is no longer than that part's, so the boxes of the parts in
order add up to the suite's time. Beside each box is the part's own estimate (`estimate_s`, with how it was
reached in `basis`): `--dry-run` prints box, estimate and margin, and tests/test_perf_smoke.py fails when an
estimate outgrows its box or the boxes outgrow 9 minutes (`NINE_MINUTES_S`, the suite's own start included).

The lent machines (torch 2.11, Python 3.12, 16 cores) have no DALI, DeepSpeed or xformers and reach no registry:
`perf/gpu_wheels.sh` downloads what can travel into .gpu_wheels/ here; the suite installs the wheels whose
packages the machine lacks into a temporary target first (PYTHONPATH and PATH for every part). Without them the
suite still runs; its block says which rows were skipped and why. The JPEGs of bench_data, the end-to-end part
and the loss curve are written once, in parallel (make_data), into a temporary folder that never comes back.

Results, rewritten after every part so that a command cut off still returns what was measured (a part cut off
keeps the rows it printed and wrote: bench_step and bench_data print each row as it ends, the curve each curve):
  gpu_suite.md    a dated block (device, driver, torch / triton / CUDA versions, each part's command, status,
                  seconds and output tables) ready to paste into perf/RESULTS.md (`--append` appends it there)
  gpu_suite.json  the same as data, with the JSON rows of bench_step and kernel_report
  gpu_suite.log   every part's full stdout and stderr (the GPU tests' verbose log: -v, failures as they happen)
  loss_curve.png  the loss curves of fastdino and plain PyTorch
The output folder is --out, else $OUT when set, else runs/gpu_suite/ (ignored by git). Subprocesses get
PYTHONPATH = the repository root (the package need not be installed) and TRITON_INTERPRET unset.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NINE_MINUTES_S = 540  # the whole suite, machine start aside: a 10-minute command keeps a minute for the copy back
START_S = 10  # estimated: the suite's own start (import torch, nvidia-smi, a module probe) before the first part
WHEELS = ROOT / ".gpu_wheels"  # perf/gpu_wheels.sh writes it
E2E_IMAGES = 2688  # bench_step's end-to-end part at B128, 2 x 10 iterations + 1 batch; the curve takes 8 batches
CANDIDATES = {"compile": "fastdino-compile", "cudagraphs": "fastdino-cudagraphs", "recompute": "fastdino-recompute"}
# What a part needs that a lent machine may lack: the rows that skip without it, for the results block.
NEEDS = {
    "deepspeed": "DeepSpeed (carried by perf/gpu_wheels.sh): the GPU tests of train.engine=deepspeed "
                 "(ZeRO-1/2 bf16/fp16 resume, the launcher) skip",
    "xformers": "xformers (carried by perf/gpu_wheels.sh): the GPU test of model.attention=xformers skips",
    "nvidia.dali": "DALI (~476 MB, too large to carry): the dali rows of bench_data and bench_end_to_end and "
                   "DALI's GPU tests skip",
    "pytest_timeout": "pytest-timeout: the GPU tests run without a per-test timeout",
    "pytest_instafail": "pytest-instafail (carried by perf/gpu_wheels.sh): a failing GPU test's traceback is "
                        "printed at the end instead of as it happens",
}


@dataclass(frozen=True)
class Part:
    name: str
    args: tuple[str, ...]  # after the python executable; {json}: a file in the output folder, {out}: the folder,
    # {data}: the shared JPEG folder, {site}: the carried wheels' target, {wheels}: the wheels to install there,
    # {cores}: the CPU count, {candidate}: --candidate's bench_step provider
    box_s: int
    estimate_s: int  # what the part should take there, with its cold compiles and data making
    basis: str  # how estimate_s was reached (measured where, or estimated from what)
    what: str
    beside: bool = False  # runs beside the next part (measures no speed), collected when that part ends
    optional: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (module, args): args added when module is there


PARTS = (
    Part("install_wheels", ("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--disable-pip-version-check", "--target", "{site}", "{wheels}"), 20, 6,
         "9 MiB of wheels, nothing built (pip --no-index --no-deps into a folder)",
         "the carried wheels (.gpu_wheels/, perf/gpu_wheels.sh) whose packages the machine lacks, into a temporary "
         "target on every part's PYTHONPATH (CPU only; left out when there are none)", beside=True),
    Part("make_data", ("-m", "perf.bench_data", "--make-only", "--images", str(E2E_IMAGES), "--workers", "{cores}",
                       "--folder", "{data}"), 25, 8,
         "measured on the CPU machine 2026-12-07: 20.7 ms per 500x375 JPEG on one core (2,688: 56 s); 16 "
         "processes ~3.5 s, x2 for process start and slower cores",
         "the JPEGs that bench_data, bench_end_to_end and bench_curve share: 2,688 at 500x375 q90, in parallel "
         "(CPU only)"),
    Part("kernel_report", ("perf/kernel_report.py", "--json", "{json}"), 100, 60,
         "264 ahead-of-time Triton compiles + ptxas, CPU only (not measured on 16 cores)",
         "Triton kernels compiled ahead of time for sm_80 / sm_90: registers, spills, shared memory (CPU only)",
         beside=True),
    Part("bench_curve", ("-m", "perf.bench_step", "--cases", "vits16_b128", "--providers", "fastdino", "--no-steps",
                         "--curve", "200", "--curve-png", "{out}/loss_curve.png", "--data", "{data}/500x375",
                         "--json", "{json}"), 120, 85,
         "200 ViT-S/16 B128 steps each of torch (~80 ms) and fastdino (~50 ms) = 26 s, + CUDA start, "
         "Triton compiles and 8 batches ~25 s; x1.7 for sharing the GPU and CPU with the GPU tests",
         "ViT-S/16 B128: fastdino's loss curve vs plain PyTorch over 200 steps on the same real batches (a loss "
         "curve, no speed: runs beside the GPU tests)", beside=True),
    Part("gpu_tests", ("-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider"), 150, 110,
         "kernel tests' Triton compiles ~30 s, torchrun resume ~25 s, ZeRO-1/2 x bf16/fp16 resume "
         "~35 s, the DeepSpeed launcher ~20 s; a hang costs at most the 60 s per-test timeout",
         "every GPU-marked test (kernels, GPU data paths, DDP under torchrun, DeepSpeed ZeRO-1/2 on CUDA), "
         "failures printed as they happen",
         optional=(("pytest_timeout", ("--timeout", "60")), ("pytest_instafail", ("--instafail",)))),
    Part("bench_dino_loss", ("-m", "perf.bench_dino_loss", "--batch", "128", "--dtype", "bf16", "fp32"), 25, 12,
         "CUDA start ~5 s, Triton compiles of 2 dtypes x fwd/bwd ~5 s, timings ~2 s",
         "fused DINO loss fwd+bwd vs official loop vs PyTorch, B=128, 12 crops, K=65536"),
    Part("bench_ema", ("perf/bench_ema.py", "--rep", "100"), 20, 10,
         "CUDA start ~5 s, 2 models x 3 providers x 0.1 s of repetitions, Triton compile ~2 s",
         "teacher EMA: official loop vs foreach vs Triton, ViT-S/16 and ViT-B/16 + K=65536 head"),
    Part("bench_data", ("-m", "perf.bench_data", "--images", "768", "--batch", "64", "--workers", "12", "--steps",
                        "8", "--warmup", "2", "--folder", "{data}"), 25, 15,
         "3 backends x (12 workers' start ~2 s + 10 batches of 64 at >= 1,000 img/s); no data making "
         "(make_data's JPEGs)",
         "data backends: 2x224 + 10x96 img/s vs an official-style pipeline, GPU ms per image (500x375 JPEGs)"),
    Part("bench_end_to_end", ("-m", "perf.bench_step", "--cases", "vits16_b128", "--providers", "fastdino",
                              "--no-steps", "--end-to-end", "dali,torch_gpu", "--steps", "10", "--data",
                              "{data}/500x375", "--json", "{json}"), 45, 30,
         "CUDA start ~5 s, Trainer.fit's start (workers, Triton compiles) ~15 s, 20 iterations ~3 s; "
         "no data making (make_data's JPEGs); the dali row skips without DALI",
         "the trainer's own img/s on real JPEGs (Trainer.fit, ViT-S/16 B128, DALI and torch_gpu data)"),
    Part("bench_step_candidate", ("-m", "perf.bench_step", "--cases", "vits16_b128", "--providers", "{candidate}",
                                  "--steps", "10", "--warmup", "3", "--json", "{json}"), 120, 95,
         "one cold torch.compile of the ViT-S/16 student (2x224 + 10x96 in one graph, fwd + bwd) and "
         "teacher, ~80 s with 16 compile workers (not measured on a GPU; tests/test_compile.py's 1-block ViT-T "
         "takes ~65 s on 2 CPU cores) + 13 steps and start ~15 s",
         "one of fastdino's step-speed candidates, --candidate (default compile: torch.compile; cudagraphs, "
         "recompute), ViT-S/16 B128: one cold compile per run"),
    Part("bench_train_sit", ("perf/bench_train.py", "--method", "sit", "--steps", "10", "--warmup", "3",
                             "--results", ""), 25, 15,
         "CUDA start ~5 s, model build ~3 s, 13 steps of ViT-S/16 B128 ~2 s, Triton compiles ~3 s",
         "the SiT step on the same engine, ViT-S/16 2x224 B128 bf16: img/s beside DINO's (issue 15)"),
    Part("bench_step", ("-m", "perf.bench_step", "--steps", "10", "--warmup", "3", "--json", "{json}"), 85, 70,
         "12 ViT rows (4 cases x official, torch, fastdino), each build ~2 s + 13 steps ~2 s, + CUDA start "
         "and matmul rate ~8 s; then 3 ResNet-50 B64 rows ~10 s (estimated, not measured on a GPU)",
         "official vs plain PyTorch vs fastdino step, the four issue-17 cases, then the ResNet-50 recipe (rn50_b64, "
         "last: rows are written as they come, so a cut-off box keeps the ViT rows; 10 timed steps each)"),
)


def serial_seconds(parts: tuple[Part, ...]) -> int:
    """The boxes end to end: a part beside the next one overlaps it (its box is no longer than that one's)."""
    return sum(p.box_s for i, p in enumerate(parts) if not p.beside or i == len(parts) - 1)


@dataclass
class Setting:
    """What the placeholders of a part's arguments stand for in one run."""
    out: Path
    data: Path = Path("$DATA")
    site: Path = Path("$SITE")
    wheels: tuple[str, ...] = ("$WHEELS",)
    candidate: str = CANDIDATES["compile"]
    cores: str = "$CORES"
    have: frozenset[str] = frozenset()  # the modules of NEEDS found there (after the carried wheels)


def command(part: Part, setting: Setting) -> list[str]:
    words = {"{json}": str(setting.out / f"{part.name}.json"), "{out}": str(setting.out), "{data}": str(setting.data),
             "{site}": str(setting.site), "{cores}": setting.cores, "{candidate}": setting.candidate}
    args: list[str] = []
    for a in part.args:
        if a == "{wheels}":
            args += setting.wheels
            continue
        for key, value in words.items():
            a = a.replace(key, value)
        args.append(a)
    for module, extra in part.optional:
        if module in setting.have:
            args += extra
    return [sys.executable, *args]


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


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_wheels(folder: Path) -> tuple[list[str], list[str]]:
    """The wheels in `folder` whose distribution this Python lacks, and those it already has (left alone: the
    machine's own version stays, so nothing it was built with is shadowed)."""
    installed = {_normal(d.metadata["Name"] or "") for d in importlib.metadata.distributions()}
    wheels = sorted(str(w) for w in folder.glob("*.whl")) if folder.is_dir() else []
    missing = [w for w in wheels if _normal(Path(w).name.split("-")[0]) not in installed]
    return missing, [w for w in wheels if w not in missing]


def part_env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(site / "bin"), os.environ.get("PATH", "")])  # the deepspeed launcher
    env["PYTHONUNBUFFERED"] = "1"
    return env


def probe(site: Path) -> frozenset[str]:
    """The modules of NEEDS that the parts can import (the carried ones included), without importing them."""
    code = ("import importlib.util as u, sys\nfor m in sys.argv[1:]:\n    try:\n        print(m) if u.find_spec(m) "
            "else None\n    except ImportError:\n        pass")
    found = subprocess.run([sys.executable, "-c", code, *NEEDS], capture_output=True, text=True, env=part_env(site),
                           cwd=ROOT, timeout=60)
    return frozenset(found.stdout.split())


def start(part: Part, setting: Setting) -> subprocess.Popen:
    return subprocess.Popen(command(part, setting), cwd=ROOT, env=part_env(setting.site), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def record(part: Part, setting: Setting, box_s: float, **fields) -> dict:
    """A part's result record: its command as a person types it (with $OUT, $DATA, $SITE) and its box."""
    cmd = shown(command(part, setting))
    for path, name in ((setting.out, "$OUT"), (setting.data, "$DATA"), (setting.site, "$SITE")):
        cmd = cmd.replace(str(path), name)
    return {"name": part.name, "what": part.what, "command": cmd, "box_s": round(box_s),
            "estimate_s": part.estimate_s, **fields}


def finish(part: Part, proc: subprocess.Popen, started: float, box_s: float, setting: Setting) -> dict:
    """Wait for a part within its box (its whole process group is killed past it); its result record."""
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, box_s - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    result = record(part, setting, box_s, seconds=round(time.monotonic() - started, 1), returncode=proc.returncode,
                    timed_out=timed_out, stdout=stdout, stderr=stderr)
    data = setting.out / f"{part.name}.json"
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
    if r["name"] == "gpu_tests":  # -v: one line per test; keep the failures, the skips' reasons and the summary
        lines = [ln for ln in lines if ln.startswith(("FAILED", "ERROR", "SKIPPED")) or " FAILED" in ln
                 or " ERROR" in ln or " passed" in ln or " failed" in ln or "no tests ran" in ln]
    if r["returncode"] != 0 and not r["timed_out"]:
        lines += ["", "stderr (last lines):", *r["stderr"].rstrip().splitlines()[-5:]]
    return "\n".join(lines) if lines else "(no output)"


def markdown(env: dict, results: list[dict], argv: list[str], budget: float, total: float, notes: list[str]) -> str:
    head = [f"### GPU suite, {env['date']}, {env['device']}", "",
            f"Device: {env['device']} ({env['memory']}), driver {env['driver']}; torch {env['torch']} (CUDA "
            f"{env['cuda']}), triton {env['triton']}, Python {env['python']}, {env['cpu_count']} CPU cores.",
            f"Command: `python perf/gpu_suite.py {' '.join(argv)}` ({total:.0f} s of a {budget:.0f} s budget).", "",
            *(f"- {n}" for n in notes), ""]
    for r in results:
        head += [f"#### {r['name']}: {r['what']}", "",
                 f"`{r['command']}`: {status(r)} (estimate {r['estimate_s']} s)", "", body(r), ""]
    return "\n".join(head)


def write(out: Path, env: dict, results: list[dict], argv: list[str], budget: float, total: float,
          notes: list[str]) -> None:
    (out / "gpu_suite.md").write_text(markdown(env, results, argv, budget, total, notes))
    (out / "gpu_suite.json").write_text(json.dumps(
        {"environment": env, "command": f"python perf/gpu_suite.py {' '.join(argv)}", "budget_s": budget,
         "seconds": round(total, 1), "notes": notes,
         "parts": [{k: v for k, v in r.items() if k not in ("stdout", "stderr")}
                   | {"stdout": r["stdout"][-20000:]} for r in results]}, indent=1))
    with open(out / "gpu_suite.log", "w") as log:
        for r in results:
            log.write(f"===== {r['name']}: {r['command']} ({status(r)})\n{r['stdout']}\n--- stderr\n{r['stderr']}\n")


def dry_run(parts: tuple[Part, ...], scale: float, budget: float, setting: Setting) -> None:
    """Every part's box, estimate and margin, how the estimate was reached, its command; then the total."""
    print(f"gpu_suite dry run: {len(parts)} parts, budget {budget:.0f} s; results would go to {setting.out}/")
    print(f"  {'part':22s} {'box s':>5s} {'est. s':>6s} {'margin':>6s}  runs")
    for i, p in enumerate(parts):
        box = p.box_s * scale
        host = next((q.name for q in parts[i + 1:] if not q.beside), None) if p.beside else None
        print(f"  {p.name:22s} {box:5.0f} {p.estimate_s:6d} {box - p.estimate_s:6.0f}  "
              f"{'beside ' + host if host else 'in order'}")
        print(f"  {'':22s} {shown(command(p, setting))}")
        if p.optional:
            print(f"  {'':22s} + where installed: " + ", ".join(f"{' '.join(a)} ({m})" for m, a in p.optional))
        print(f"  {'':22s} {p.what}")
        print(f"  {'':22s} {'' if p.basis.startswith('measured') else 'estimated: '}{p.basis}")
    serial = serial_seconds(parts) * scale
    print(f"total: start {START_S} s (estimated) + {serial:.0f} s of boxes in order = {START_S + serial:.0f} s, "
          f"{NINE_MINUTES_S - START_S - serial:.0f} s under the {NINE_MINUTES_S} s (9-minute) limit")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from fastdino.cli import OneLineParser, positive_float

    parser = OneLineParser(prog="gpu_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results folder (default: $OUT if set, else runs/gpu_suite)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the parts, their commands, time boxes, estimates and margins, and the total")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(p.name for p in PARTS)}")
    parser.add_argument("--budget", type=positive_float, default=serial_seconds(PARTS),
                        help="seconds for the parts (default %(default)s: the boxes)")
    parser.add_argument("--candidate", choices=tuple(CANDIDATES), default="compile",
                        help="bench_step_candidate's step candidate: one cold compile per run (default %(default)s)")
    parser.add_argument("--wheels", type=Path, default=WHEELS,
                        help="carried wheels to install first (default .gpu_wheels/, from perf/gpu_wheels.sh)")
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
        dry_run(parts, scale, args.budget, Setting(out=Path("$OUT"), candidate=CANDIDATES[args.candidate]))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA GPU visible; run it on a GPU machine (--dry-run lists what it runs)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_suite_"))  # the JPEGs and the carried packages: never in $OUT
    try:
        return run(parts, scale, args, argv, out, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(parts: tuple[Part, ...], scale: float, args, argv: list[str], out: Path, scratch: Path) -> int:
    missing, present = missing_wheels(args.wheels)
    setting = Setting(out=out, data=scratch / "data", site=scratch / "site", wheels=tuple(missing),
                      candidate=CANDIDATES[args.candidate], cores=str(os.cpu_count() or 1))
    notes = [f"Carried wheels ({args.wheels.name}/): {len(missing)} to install "
             f"({', '.join(Path(w).name.split('-')[0] for w in missing) or 'none'}), {len(present)} already there."
             if missing or present else f"No carried wheels ({args.wheels} is missing or empty: run "
             "`bash perf/gpu_wheels.sh` on the CPU side and carry the folder)."]
    if not missing:
        parts = tuple(p for p in parts if p.name != "install_wheels")
    env = environment()
    t0 = time.monotonic()
    results: list[dict] = []
    beside: list[tuple[Part, subprocess.Popen, float, float]] = []
    probed = False
    for i, part in enumerate(parts):
        left = args.budget - (time.monotonic() - t0)
        last = i == len(parts) - 1
        box = left if last else min(part.box_s * scale, left)
        if not probed and not any(p.name == "install_wheels" for p, *_ in beside) and part.name != "install_wheels":
            setting.have, probed = probe(setting.site), True  # after the carried wheels, before any part needs them
            notes += [f"Not there, so skipped: {why}." for module, why in NEEDS.items() if module not in setting.have]
        if box < 5:
            results.append(record(part, setting, 0, seconds=0.0, returncode=None, timed_out=True, stdout="",
                                  stderr="not run: the budget was spent"))
            continue
        print(f"[{time.monotonic() - t0:5.0f} s] {part.name} (box {box:.0f} s)", flush=True)
        proc, started = start(part, setting), time.monotonic()
        if part.beside and not last:
            beside.append((part, proc, started, box))
            continue
        results.append(finish(part, proc, started, box, setting))
        for b in beside:  # the parts beside this one end before the next part starts timing
            results.append(finish(*b, setting))
        beside.clear()
        write(out, env, results, argv, args.budget, time.monotonic() - t0, notes)
    total = time.monotonic() - t0
    write(out, env, results, argv, args.budget, total, notes)
    if args.append:
        with open(ROOT / "perf" / "RESULTS.md", "a") as f:
            f.write("\n" + markdown(env, results, argv, args.budget, total, notes))
    for n in notes:
        print(n)
    for r in results:
        print(f"{r['name']:22s} {status(r)}")
    print(f"results: {out}/gpu_suite.md, gpu_suite.json, gpu_suite.log ({total:.0f} s)")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # fastdino importable without installing it, as for the parts
    sys.exit(main())
