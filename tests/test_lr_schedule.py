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


def test_poly_schedule_is_arcface_torchs():
    """lr(t) = base t / w for t < w, then base (1 - (t - w) / (T - w)): 0 at the first step, base after
    the warm-up, linear to 0 at the end (stepped every iteration)."""
    from src.training.lr_schedule import poly_lr
    base, per_epoch, epochs, warmup = 0.1, 10, 4, 1
    rates = poly_lr(base, per_epoch, epochs, warmup)
    t = np.arange(per_epoch * epochs)
    w, total = warmup * per_epoch, per_epoch * epochs
    want = np.where(t < w, base * t / w, base * (1 - (t - w) / (total - w)))
    np.testing.assert_allclose(rates, want, rtol=1e-6, atol=1e-9)
    assert rates[0] == 0 and rates[w] == pytest.approx(base) and rates[-1] == pytest.approx(base / (total - w))
    np.testing.assert_allclose(poly_lr(base, per_epoch, epochs), base * (1 - t / total), rtol=1e-6, atol=1e-9)


def test_cosine_schedule():
    from src.training.lr_schedule import cosine_lr
    rates = cosine_lr(1.0, 5, 4, warmup_epochs=1)
    t = np.arange(20)
    want = np.where(t < 5, t / 5, 0.5 * (1 + np.cos(np.pi * (t - 5) / 15)))
    np.testing.assert_allclose(rates, want, rtol=1e-6, atol=1e-7)


def test_schedule_by_name():
    from src.training.lr_schedule import learning_rates
    assert learning_rates("step", 0.1, 2, 2, [1]).tolist() == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert learning_rates("poly", 0.1, 2, 2).tolist() == pytest.approx([0.1, 0.075, 0.05, 0.025])
    with pytest.raises(ValueError):
        learning_rates("linear", 0.1, 2, 2)
