"""torch.compile of a method's networks (issue 17): the student and the teacher, in place, static shapes.

`model.compile` picks the torch.compile mode. Each network is compiled with `nn.Module.compile` (its parameters,
names and state dict unchanged, so checkpoints, the EMA's parameter views and DDP / DeepSpeed wrapping see the
same module) and `dynamic=False`: a crop-size set (DINO: 2 global + n local crops for the student, 2 global
for the teacher) is one graph, compiled once in the first steps; the shapes never change afterwards, so nothing
recompiles. The student is compiled before DDP wraps it: its backward is one graph, so DDP's gradient
all-reduce starts after it instead of overlapping it (several GPUs: measure before using).

Randomness: stochastic depth inside a compiled graph may draw from Inductor's generator (seeded from torch's)
instead of torch's eager one, so a compiled run is reproducible and resumes exactly but need not draw the masks
an eager run draws. The first step's time includes compiling (a short run's mean img/s in summary.json shows
it); `reduce-overhead` and `max-autotune` add CUDA graphs on a GPU only.
"""

from __future__ import annotations

import torch

from fastdino.methods.base import Method


def compile_networks(method: Method, mode: str) -> None:
    """Compile `method.student_module()` and `method.teacher` in place; mode: model.compile (none: nothing)."""
    if mode == "none":
        return
    options = {"dynamic": False, "mode": None if mode == "default" else mode}
    for network in (method.student_module(), method.teacher):
        network.compile(**options)


def mark_step_begin(mode: str) -> None:
    """Tell CUDA-graph trees a new iteration starts (modes with CUDA graphs), so the outputs of the previous
    iteration's graph replays may be overwritten."""
    if mode in ("reduce-overhead", "max-autotune"):
        torch.compiler.cudagraph_mark_step_begin()
