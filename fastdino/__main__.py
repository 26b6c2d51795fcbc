"""`python -m fastdino ...` is `fastdino ...`: what `torchrun -m` and `deepspeed -m` launch."""

import sys

from fastdino.cli import main

sys.exit(main())
