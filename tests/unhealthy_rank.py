"""`fastdino` whose health monitor on one process (FASTDINO_TEST_UNHEALTHY_RANK=RANK) always has a condition
pending, for tests under a launcher (torchrun FILE ...) that the processes agree whether to checkpoint."""

import os
import sys

import fastdino.engine.health as health
from fastdino.cli import main

if os.environ.get("RANK") == os.environ.get("FASTDINO_TEST_UNHEALTHY_RANK"):
    health.HealthMonitor.healthy = property(lambda self: False)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
