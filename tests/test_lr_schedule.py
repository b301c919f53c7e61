"""The learning-rate schedules in closed form: the host formula against the references' formulas, the
device cell against the host formula, and a run length that costs no memory."""
import mindspore as ms
import numpy as np
import pytest

from src.training.lr_schedule import LRSchedule, scaled_lr


def test_linear_scaling_rule():
    assert scaled_lr(0.08, 64, 8) == pytest.approx(0.08)
    assert scaled_lr(0.08, 64, 1) == pytest.approx(0.01)


def rates(schedule):
    return schedule.rate(np.arange(schedule.total_steps))


def test_step_decay_at_milestone_epochs():
    got = rates(LRSchedule("step", 0.1, steps_per_epoch=10, epochs=5, milestones=[4, 2], gamma=0.1))
    assert got.shape == (50,)
    np.testing.assert_allclose(got[:20], 0.1)
    np.testing.assert_allclose(got[20:40], 0.01, rtol=1e-12)
    np.testing.assert_allclose(got[40:], 0.001, rtol=1e-12)


def test_warmup_ramps_linearly_then_follows_schedule():
    got = rates(LRSchedule("step", 0.1, steps_per_epoch=4, epochs=3, milestones=[2], warmup_epochs=1))
    np.testing.assert_allclose(got[:4], [0.025, 0.05, 0.075, 0.1], rtol=1e-12)
    np.testing.assert_allclose(got[4:8], 0.1)
    np.testing.assert_allclose(got[8:], 0.01, rtol=1e-12)


def test_poly_schedule_is_arcface_torchs():
    """lr(t) = base t / w for t < w, then base (1 - (t - w) / (T - w)): 0 at the first step, base after
    the warm-up, linear to 0 at the end (stepped every iteration)."""
    base, per_epoch, epochs, warmup = 0.1, 10, 4, 1
    got = rates(LRSchedule("poly", base, per_epoch, epochs, warmup_epochs=warmup))
    t = np.arange(per_epoch * epochs)
    w, total = warmup * per_epoch, per_epoch * epochs
    want = np.where(t < w, base * t / w, base * (1 - (t - w) / (total - w)))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert got[0] == 0 and got[w] == pytest.approx(base) and got[-1] == pytest.approx(base / (total - w))
    np.testing.assert_allclose(rates(LRSchedule("poly", base, per_epoch, epochs)), base * (1 - t / total), rtol=1e-12)


def test_cosine_schedule():
    got = rates(LRSchedule("cosine", 1.0, 5, 4, warmup_epochs=1))
    t = np.arange(20)
    want = np.where(t < 5, t / 5, 0.5 * (1 + np.cos(np.pi * (t - 5) / 15)))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_steps_past_the_end_keep_the_last_rate_and_unknown_kinds_are_refused():
    schedule = LRSchedule("poly", 0.1, 2, 2)
    assert schedule.rate(4) == schedule.rate(3) == pytest.approx(0.025)
    assert LRSchedule.constant(0.3).rate(np.arange(5)).tolist() == [0.3] * 5
    with pytest.raises(ValueError):
        LRSchedule("linear", 0.1, 2, 2)


@pytest.mark.parametrize("schedule", [
    LRSchedule("step", 0.1, 10, 5, [2, 4], 0.1, warmup_epochs=0.5),
    LRSchedule("step", 0.1, 4, 3, [2], warmup_epochs=1),
    LRSchedule("poly", 0.1, 10, 4, warmup_epochs=1),
    LRSchedule("poly", 0.3, 7, 3),
    LRSchedule("cosine", 1.0, 5, 4, warmup_epochs=1),
], ids=lambda s: f"{s.kind}-w{s.warmup_epochs:g}")
def test_the_device_cell_computes_the_host_formula(schedule):
    """The optimizer evaluates the cell at its step counter: the same rates in float32, also past the end."""
    cell = schedule.cell()
    steps = np.arange(schedule.total_steps + 3)
    device = [float(cell(ms.Tensor(int(t), ms.int32)).asnumpy()) for t in steps]
    np.testing.assert_allclose(device, schedule.rate(steps), rtol=2e-6, atol=1e-8)


def test_a_huge_run_length_costs_no_memory():
    """A 1e9-epoch schedule (a typo, or a hostile config) is a formula, not a table of 1e13 rates."""
    schedule = LRSchedule("cosine", 0.1, 11_372, 10**9, warmup_epochs=1)
    assert schedule.total_steps == 11_372 * 10**9
    assert schedule.rate(0) == 0 and schedule.rate(11_372) == pytest.approx(0.1)
    cell = schedule.cell()
    assert float(cell(ms.Tensor(11_372, ms.int32)).asnumpy()) == pytest.approx(0.1, rel=1e-6)
