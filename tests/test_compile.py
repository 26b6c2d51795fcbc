"""torch.compile of the networks (model.compile, engine/compile.py) on the CPU: the compiled step gives the
eager step's losses and weights within float32 tolerance, compiles once per crop-size set and never again."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from fastdino.config import load_config
from fastdino.data.demo import make_demo_dataset
from fastdino.engine.trainer import Trainer

TINY = [
    "model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=16", "model.drop_path_rate=0",
    "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8",
    "data.global_size=16", "data.local_size=8", "data.local_crops_number=2", "data.batch_size=4",
    "data.num_workers=0", "optim.warmup_epochs=1", "train.epochs=2", "train.log_every=1", "train.knn_eval=false",
    "dino.freeze_last_layer_epochs=0",
]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=2, n_val_per_class=1, size=32)


def run(demo_root, out, mode: str, steps: int) -> Trainer:
    trainer = Trainer(load_config(None, TINY + [f"data.path={demo_root}", f"train.output_dir={out}",
                                                f"model.compile={mode}", f"train.max_steps={steps}"]))
    trainer.result = trainer.fit()
    return trainer


def test_compiled_step_matches_eager_and_never_recompiles(demo_root, tmp_path):
    torch._dynamo.reset()
    eager = run(demo_root, tmp_path / "eager", "none", 4)
    compiled = run(demo_root, tmp_path / "compiled", "default", 2)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):  # steps 3 and 4: the same graphs, no new ones
        compiled.cfg.train.max_steps = compiled.stop_step = 4
        compiled.result.history += compiled.fit().history
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames > 0
    got = [h["loss"] for h in compiled.result.history]
    want = [h["loss"] for h in eager.result.history]
    assert got == pytest.approx(want, rel=1e-5)
    for key in ("student", "teacher"):
        a, b = eager.state_dict()[key], compiled.state_dict()[key]
        assert a.keys() == b.keys()  # compiled in place: no `_orig_mod.` in the checkpoint
        for name, value in a.items():
            torch.testing.assert_close(b[name], value, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
