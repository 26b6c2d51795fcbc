#!/usr/bin/env bash
# The Python packages a lent GPU machine lacks and can carry (issue 21), as cp312 manylinux x86_64 wheels in the
# git-ignored folder .gpu_wheels/ (or $1), for perf/gpu_suite.py to install into a temporary target there:
#   xformers 0.0.35                 model.attention=xformers (needs torch >= 2.10; a 3 MB wheel). Built for torch 2.10
#                                   + CUDA 12.8: its own extension does not load beside torch 2.11+cu130 (seen with
#                                   the lent stack here: libcudart.so.12 missing), but its flash path calls torch's
#                                   own flash attention; tests/test_vit.py's GPU test says whether it runs there
#   deepspeed 0.19.8 + its needs    train.engine=deepspeed (pure Python; its ops are built just in time, never here)
#   pytest-instafail, pytest-timeout  the suite's GPU tests print each failure as it happens, with a per-test timeout
# Never torch, nvidia-*, numpy or DALI (the machine has the first three; DALI is ~476 MB and cannot travel).
# The machines reach no registry and take at most 64 MiB of carried files per command: the total is checked.
#
#   bash perf/gpu_wheels.sh            # here, on the CPU machine, once
#   then, on the GPU machine, with .gpu_wheels carried:  python perf/gpu_suite.py
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; echo "usage: bash perf/gpu_wheels.sh [DIR]   (default .gpu_wheels)"; exit 0 ;;
    -*) echo "gpu_wheels: unknown option $1 (usage: bash perf/gpu_wheels.sh [DIR])" >&2; exit 2 ;;
esac
dir=${1:-.gpu_wheels}
# The folder is emptied first: refuse one that holds anything but wheels (a mistyped path must lose nothing).
if [[ -d "$dir" ]] && find "$dir" -mindepth 1 ! -name '*.whl' | grep -q .; then
    echo "gpu_wheels: $dir holds files other than wheels: name a new or wheel-only folder" >&2
    exit 2
fi
XFORMERS=0.0.35 DEEPSPEED=0.19.8
LIMIT_MIB=48  # of the 64 MiB a command carries: the working tree travels in the same 64 MiB
platform=(--python-version 3.12 --implementation cp --only-binary=:all:
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -rf -- "$dir" && mkdir -p -- "$dir"
pip() { python3 -m pip --disable-pip-version-check -q "$@"; }
pip download --no-deps "${platform[@]}" -d "$dir" "xformers==$XFORMERS"
# DeepSpeed is published as a source archive only: build its pure-Python wheel here (no ops: DS_BUILD_OPS=0).
DS_BUILD_OPS=0 pip wheel --no-deps -w "$dir" "deepspeed==$DEEPSPEED"
# DeepSpeed's requirements except torch, numpy and nvidia-ml-py, with their own (pydantic-core, annotated-types,
# typing-*), resolved for Python 3.12 on x86_64 Linux. The suite installs only those the machine lacks.
pip download "${platform[@]}" -d "$dir" einops hjson msgpack ninja "packaging>=20.0" psutil py-cpuinfo \
    "pydantic>=2.0.0" tqdm pytest-instafail pytest-timeout
# The pytest plugins need pytest, which the machine has: one version of each package, and none of pytest's.
find "$dir" -name 'pytest-[0-9]*.whl' -o -name 'pluggy-*.whl' -o -name 'iniconfig-*.whl' \
    -o -name 'pygments-*.whl' | xargs -r rm
ls -1 "$dir"
bytes=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
mib=$(python3 -c "print(f'{$bytes / 2**20:.1f}')")
echo "gpu_wheels: $(ls "$dir"/*.whl | wc -l) wheels, $mib MiB in $dir/ (carry it: run(..., carry=[\"$dir\"]))"
if (( bytes > LIMIT_MIB * 2**20 )); then
    echo "gpu_wheels: over $LIMIT_MIB MiB: the working tree and the wheels must fit 64 MiB together" >&2
    exit 1
fi
