"""Per-step learning rates: linear warm-up, then step decay (the model zoo), polynomial decay to 0
(insightface arcface_torch) or cosine decay.

The optimizer indexes this array with its own step counter, which advances every iteration (also
on a skipped fp16 step and on the micro-batches of gradient accumulation), so the rate follows the
iteration as arcface_torch's scheduler does, and a resumed run continues on the same schedule.
"""
import math

import numpy as np

SCHEDULES = ("step", "poly", "cosine")


def scaled_lr(base_lr, batch_size, group_size, reference_batch=512):
    """The linear scaling rule: base_lr is the rate for a global batch of `reference_batch`."""
    return base_lr * batch_size * group_size / reference_batch


def step_lr(lr, steps_per_epoch, epochs, milestones=(), gamma=0.1, warmup_epochs=0.0):
    """Model zoo: lr x gamma^(number of milestones passed); linear warm-up reaching lr at the last
    warm-up step. float32 array of length steps_per_epoch * epochs."""
    total = steps_per_epoch * epochs
    step = np.arange(total, dtype=np.float64)
    rates = lr * gamma ** np.searchsorted(sorted(milestones), step / steps_per_epoch, side="right")
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if warmup_steps > 0:
        ramp = (step[:warmup_steps] + 1) / warmup_steps
        rates[:warmup_steps] = rates[:warmup_steps] * ramp
    return rates.astype(np.float32)


def poly_lr(lr, steps_per_epoch, epochs, warmup_epochs=0.0, power=1.0):
    """arcface_torch's PolyScheduler: lr(t) = lr * t / w during the w warm-up steps (so the very first
    step has rate 0), then lr * (1 - (t - w) / (T - w)) ** power down to 0 at T = all steps."""
    return _decay(lr, steps_per_epoch, epochs, warmup_epochs, lambda x: (1.0 - x) ** power)


def cosine_lr(lr, steps_per_epoch, epochs, warmup_epochs=0.0):
    """Warm-up as poly_lr, then lr * (1 + cos(pi * (t - w) / (T - w))) / 2."""
    return _decay(lr, steps_per_epoch, epochs, warmup_epochs, lambda x: 0.5 * (1.0 + np.cos(math.pi * x)))


def _decay(lr, steps_per_epoch, epochs, warmup_epochs, shape):
    total = steps_per_epoch * epochs
    t = np.arange(total, dtype=np.float64)
    warmup = min(int(warmup_epochs * steps_per_epoch), total - 1)
    rates = np.empty(total, np.float64)
    if warmup > 0:
        rates[:warmup] = lr * t[:warmup] / warmup
    rates[warmup:] = lr * shape((t[warmup:] - warmup) / max(total - warmup, 1))
    return rates.astype(np.float32)


def learning_rates(schedule, lr, steps_per_epoch, epochs, milestones=(), gamma=0.1, warmup_epochs=0.0):
    """The per-step rates of `schedule` ('step', 'poly' or 'cosine')."""
    if schedule == "step":
        return step_lr(lr, steps_per_epoch, epochs, milestones, gamma, warmup_epochs)
    if schedule == "poly":
        return poly_lr(lr, steps_per_epoch, epochs, warmup_epochs)
    if schedule == "cosine":
        return cosine_lr(lr, steps_per_epoch, epochs, warmup_epochs)
    raise ValueError(f"unknown lr schedule {schedule!r}")
