"""fastdino's Triton kernels, `fastdino.kernels.dino_loss` and `fastdino.kernels.ema` (DESIGN.md floor 0).

The modules live in the repository's top-level `kernels/` folder, which has no `__init__.py` on purpose: it is
never a top-level package `kernels`, so it cannot shadow Hugging Face's `kernels` package (a transformers 5.x
dependency) for code run from the repository root. This file is what finds the folder when fastdino is imported
from a checkout (`pip install -e .`, or no install at all with PYTHONPATH set to the repository root): it adds the
folder to this package's search path. A built wheel does not ship this file: setup.py maps `fastdino.kernels` to
`kernels/` itself (`package_dir`), so the modules sit in `fastdino/kernels/` of the install.
"""

from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[2] / "kernels"))
