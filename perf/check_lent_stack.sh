#!/usr/bin/env bash
# The lent GPU machines' stack on this CPU machine, before a GPU session spends device time on it (issue 21):
# torch 2.11.0, torchvision 0.26.0, triton 3.6.0 under Python 3.12 in a virtual environment under /tmp (the
# shared environment is left alone), then the kernel, data and trainer tests under it, Triton in its interpreter.
#
#   bash perf/check_lent_stack.sh              # Python 3.12 if found (python3.12, pyenv), else python3 (said so)
#   PYTHON=/path/to/python bash perf/check_lent_stack.sh
#   LENT_VENV=/tmp/other bash perf/check_lent_stack.sh   # where the environment lives (kept for the next run)
#
# Why not in CI: the registry's Linux torch 2.11.0 is the CUDA build, which pulls about 3 GB of nvidia-* wheels;
# the CPU-only build lives on download.pytorch.org, which CI need not reach. perf/RESULTS.md ("Lent stack") has
# this script's measured install and test times.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.11.0 TORCHVISION=0.26.0 TRITON=3.6.0
py=${PYTHON:-}
if [[ -z $py ]]; then
    for candidate in python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python" python3; do
        if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            py=$candidate; break
        fi
    done
    py=${py:-python3}
fi
version=$("$py" -c 'import platform; print(platform.python_version())')
[[ $version == 3.12.* ]] || echo "check_lent_stack: Python $version here, not 3.12 as on the lent machines"
venv=${LENT_VENV:-/tmp/fastdino_lent_stack}
start=$(date +%s)
[[ -x $venv/bin/python ]] || "$py" -m venv "$venv"
# pip is a no-op when the environment is already right. numpy < 2.4: triton 3.6's interpreter turns a loop bound
# into int() of a 1-element array, which numpy 2.4 refuses (seen here: every interpreted DINO-loss kernel test
# failed with numpy 2.5.5 and 2.4.6); the GPU machines compile the kernels instead, so their numpy 2.5 is no
# concern there. pytest-timeout: the lent machines have it too.
"$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH" "torchvision==$TORCHVISION" \
    "triton==$TRITON" "numpy<2.4" pillow pyyaml tqdm matplotlib pytest pytest-timeout
installed=$(date +%s)
"$venv/bin/python" -c "import torch, torchvision, triton, platform
print(f'check_lent_stack: Python {platform.python_version()}, torch {torch.__version__}, '
      f'torchvision {torchvision.__version__}, triton {triton.__version__} ({\"$venv\"})')"
echo "check_lent_stack: environment ready in $((installed - start)) s"
# The kernel, data and trainer tests: this checkout's fastdino (cwd first on sys.path), not an installed copy.
status=0
PYTHONPATH=$PWD "$venv/bin/python" -m pytest -q -p no:cacheprovider --timeout 300 \
    tests/kernels tests/test_dino_loss.py tests/test_ema.py tests/test_data.py tests/test_gpu_augment.py \
    tests/test_image_decode.py tests/test_trainer.py "$@" || status=$?
echo "check_lent_stack: tests took $(($(date +%s) - installed)) s, exit code $status"
exit $status
