"""Where the time of a training step goes: `fastdino profile` as a script (fastdino/engine/profile.py).

  python perf/profile_step.py configs/demo.yaml                     # CPU: wall-clock phases
  python perf/profile_step.py configs/vit_small16.yaml --steps 20   # GPU: CUDA-event phases, MFU, NVML
  python perf/profile_step.py configs/demo.yaml --real-data --out runs/profile-demo

Writes report.md, phases.png, trace.json and profile.json into --out (default <train.output_dir>/profile).
"""

from __future__ import annotations

import sys

from fastdino.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
