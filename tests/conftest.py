"""Shared test set-up: Triton runs in its interpreter without a GPU; `gpu` tests skip cleanly; fixed seeds."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any kernel module is imported: triton.jit reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _index_cache(tmp_path_factory):
    """The tests' image-index caches (fastdino.data.files) go to a temporary folder, not the user's ~/.cache."""
    before = os.environ.get("FASTDINO_INDEX_CACHE")
    os.environ["FASTDINO_INDEX_CACHE"] = str(tmp_path_factory.mktemp("index_cache"))
    yield
    if before is None:
        os.environ.pop("FASTDINO_INDEX_CACHE")
    else:
        os.environ["FASTDINO_INDEX_CACHE"] = before


@pytest.fixture
def poison_loss(monkeypatch):
    """poison_loss(at) makes DINO's forward call number `at` (1-based; 0: every call) return a NaN loss, whose
    gradients are NaN too. Returns the call counter {"n": calls so far}; poison_loss.undo() restores DINO."""
    from fastdino.methods.dino import DINO

    original, calls = DINO.forward, {"n": 0}

    def poison(at: int) -> dict:
        def poisoned(self, views, epoch):
            loss, stats = original(self, views, epoch)
            calls["n"] += 1
            return (loss * float("nan") if at in (0, calls["n"]) else loss), stats

        monkeypatch.setattr(DINO, "forward", poisoned)
        return calls

    poison.undo = lambda: monkeypatch.setattr(DINO, "forward", original)
    return poison
