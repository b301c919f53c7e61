"""Per-step learning rates: linear warm-up, then step decay at given epochs.

The optimizer indexes this array with its own global step, so a resumed run that restores the
global step continues on exactly the same schedule.
"""
import numpy as np


def scaled_lr(base_lr, batch_size, group_size, reference_batch=512):
    """The linear scaling rule: base_lr is the rate for a global batch of `reference_batch`."""
    return base_lr * batch_size * group_size / reference_batch


def step_lr(lr, steps_per_epoch, epochs, milestones=(), gamma=0.1, warmup_epochs=0.0):
    """float32 array of length steps_per_epoch * epochs."""
    total = steps_per_epoch * epochs
    step = np.arange(total, dtype=np.float64)
    epoch = step / steps_per_epoch
    rates = lr * gamma ** np.searchsorted(sorted(milestones), epoch, side="right")
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if warmup_steps > 0:
        ramp = (step[:warmup_steps] + 1) / warmup_steps
        rates[:warmup_steps] = rates[:warmup_steps] * ramp
    return rates.astype(np.float32)
