"""Schedules against the official DINO `cosine_scheduler` arrays and the per-epoch teacher temperature."""

import numpy as np
import pytest

from fastdino.schedules import cosine_schedule, teacher_temp_schedule


def official_cosine(base, final, epochs, niter, warmup_epochs=0, start_warmup=0.0):
    """The official utils.cosine_scheduler, restated in numpy as the closed form to check against."""
    warmup = np.linspace(start_warmup, base, warmup_epochs * niter) if warmup_epochs else np.array([])
    iters = np.arange(epochs * niter - warmup_epochs * niter)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cos))


@pytest.mark.parametrize("base, final, epochs, niter, warmup", [
    (5e-4, 1e-6, 7, 13, 2),  # lr: warm-up then decay
    (0.04, 0.4, 5, 11, 0),  # weight decay rises
    (0.996, 1.0, 4, 9, 0),  # teacher momentum
])
def test_cosine_matches_official_arrays(base, final, epochs, niter, warmup):
    ref = official_cosine(base, final, epochs, niter, warmup)
    ours = [cosine_schedule(s, epochs * niter, base, final, warmup * niter) for s in range(epochs * niter)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)


def test_cosine_end_points():
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(0, 100, 1.0, 0.0, warmup_steps=10) == 0.0
    assert cosine_schedule(9, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(1.0)


@pytest.mark.parametrize("warmup_epochs, niter", [
    (1, 1),  # a one-step warm-up: np.linspace(start, base, 1) = [start]
    (2, 1),  # two steps: start, then base
    (1, 2),  # one epoch of two steps
    (5, 1),
    (3, 7),  # 21 steps over 3 epochs
    (37, 1),
])
@pytest.mark.parametrize("start", [0.0, 0.1])
def test_cosine_warmups_of_one_two_and_many_steps_match_official_arrays(warmup_epochs, niter, start):
    epochs = warmup_epochs + 13
    ref = official_cosine(0.8, 0.01, epochs, niter, warmup_epochs, start_warmup=start)
    ours = [cosine_schedule(s, epochs * niter, 0.8, 0.01, warmup_epochs * niter, warmup_start=start)
            for s in range(epochs * niter)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
    assert ours[0] == start  # the warm-up starts at its start value, whatever its length


@pytest.mark.parametrize("warmup_epochs, epochs", [(1, 40), (2, 40), (30, 40), (4, 4)])
def test_teacher_temperature_warmups_of_one_two_and_many_epochs(warmup_epochs, epochs):
    """The official DINOLoss.teacher_temp_schedule array: np.linspace over the warm-up epochs, then constant."""
    ref = np.concatenate((np.linspace(0.04, 0.07, warmup_epochs), np.ones(epochs - warmup_epochs) * 0.07))
    ours = [teacher_temp_schedule(e, 0.04, 0.07, warmup_epochs) for e in range(epochs)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert ours[0] == 0.04  # a one-epoch warm-up is not skipped


def test_teacher_temperature_without_warmup():
    assert teacher_temp_schedule(0, 0.04, 0.07, 0) == 0.07
    assert teacher_temp_schedule(0, 0.04, 0.04, 0) == 0.04
