"""`fastdino` with train.precision=fp16 let through on the CPU, for tests under a launcher (torchrun FILE ...).

fastdino refuses fp16 on the CPU (its GradScaler needs CUDA in use) and DeepSpeed's CPU accelerator lists no fp16;
the math does not depend on the device, so the fp16 tests force the precision here, in the processes a launcher
starts, as tests/test_deepspeed.py does with monkeypatch in its own process.
"""

import sys

import fastdino.engine.trainer as trainer
from fastdino.cli import main

if __name__ == "__main__":
    trainer.resolve_precision = lambda precision, device: precision
    sys.exit(main())
