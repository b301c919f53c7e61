import numpy as np
import pytest

from src.training.lr_schedule import scaled_lr, step_lr


def test_linear_scaling_rule():
    assert scaled_lr(0.08, 64, 8) == pytest.approx(0.08)
    assert scaled_lr(0.08, 64, 1) == pytest.approx(0.01)


def test_step_decay_at_milestone_epochs():
    rates = step_lr(0.1, steps_per_epoch=10, epochs=5, milestones=[2, 4], gamma=0.1)
    assert rates.shape == (50,)
    np.testing.assert_allclose(rates[:20], 0.1)
    np.testing.assert_allclose(rates[20:40], 0.01, rtol=1e-6)
    np.testing.assert_allclose(rates[40:], 0.001, rtol=1e-6)


def test_warmup_ramps_linearly_then_follows_schedule():
    rates = step_lr(0.1, steps_per_epoch=4, epochs=3, milestones=[2], warmup_epochs=1)
    np.testing.assert_allclose(rates[:4], [0.025, 0.05, 0.075, 0.1], rtol=1e-6)
    np.testing.assert_allclose(rates[4:8], 0.1)
    np.testing.assert_allclose(rates[8:], 0.01, rtol=1e-6)
