"""Learning rate per step, in closed form: linear warm-up, then step decay (the model zoo), polynomial
decay to 0 (insightface arcface_torch) or cosine decay.

`LRSchedule` is the schedule as a value: `rate(steps)` gives the rates of any steps on the host (for
log lines and tests), `cell()` the same formula as a MindSpore LearningRateSchedule that the optimizer
evaluates at its own step counter on the device. Nothing is allocated per step, so the length of a run
costs no memory (a per-step table of a 1e9-epoch schedule would take gigabytes).

The optimizer's counter advances every iteration (also on a skipped fp16 step and on the micro-batches
of gradient accumulation), so the rate follows the iteration as arcface_torch's scheduler does, and a
resumed run continues on the same schedule. Steps past the end keep the last step's rate.
"""
import math
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

SCHEDULES = ("step", "poly", "cosine")


def scaled_lr(base_lr, batch_size, group_size, reference_batch=512):
    """The linear scaling rule: base_lr is the rate for a global batch of `reference_batch`."""
    return base_lr * batch_size * group_size / reference_batch


@dataclass(frozen=True)
class LRSchedule:
    """kind 'step': lr x gamma^(milestone epochs passed), with a linear warm-up reaching lr at the last
    warm-up step (the model zoo). kind 'poly' (arcface_torch's PolyScheduler): lr t / w during the w
    warm-up steps (so the very first step has rate 0), then lr (1 - (t - w) / (T - w)) down to 0 at
    T = all steps. kind 'cosine': warm-up as poly, then lr (1 + cos(pi (t - w) / (T - w))) / 2."""

    kind: str
    lr: float
    steps_per_epoch: int
    epochs: int
    milestones: tuple = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.kind!r}")
        object.__setattr__(self, "milestones", tuple(sorted(int(m) for m in self.milestones)))

    @classmethod
    def constant(cls, lr):
        """The same rate at every step."""
        return cls("step", float(lr), 1, 1)

    @property
    def total_steps(self):
        return self.steps_per_epoch * self.epochs

    @property
    def warmup_steps(self):
        if self.kind == "step":
            return int(round(self.warmup_epochs * self.steps_per_epoch))
        return min(int(self.warmup_epochs * self.steps_per_epoch), self.total_steps - 1)

    def rate(self, steps):
        """float64 rates of the 0-based `steps` (a number or an array)."""
        t = np.minimum(np.asarray(steps, dtype=np.float64), self.total_steps - 1)
        w = self.warmup_steps
        if self.kind == "step":
            passed = (t[..., None] >= np.asarray(self.milestones, np.float64) * self.steps_per_epoch).sum(-1)
            rates = self.lr * self.gamma ** passed
            return np.where(t < w, rates * (t + 1) / max(w, 1), rates)
        x = (t - w) / max(self.total_steps - w, 1)
        decayed = 1.0 - x if self.kind == "poly" else 0.5 * (1.0 + np.cos(math.pi * x))
        return np.where(t < w, self.lr * t / max(w, 1), self.lr * decayed)

    def cell(self):
        """The schedule as a mindspore LearningRateSchedule (global step -> float32 rate)."""
        return ScheduleCell(self)


class ScheduleCell(LearningRateSchedule):
    """`LRSchedule.rate` computed in float32 on the device from the optimizer's step counter."""

    def __init__(self, schedule):
        super().__init__()
        self.kind = schedule.kind
        self.lr = float(schedule.lr)
        self.gamma = Tensor(schedule.gamma, ms.float32)
        self.last = float(schedule.total_steps - 1)
        self.warmup = float(schedule.warmup_steps)
        self.ramp = float(max(schedule.warmup_steps, 1))
        self.span = float(max(schedule.total_steps - schedule.warmup_steps, 1))
        boundaries = [m * schedule.steps_per_epoch for m in schedule.milestones] or [np.inf]
        self.boundaries = Tensor(np.asarray(boundaries, np.float32))

    def construct(self, global_step):
        t = ops.minimum(ops.cast(global_step, ms.float32), self.last)
        warming = t < self.warmup
        if self.kind == "step":
            rate = self.lr * ops.pow(self.gamma, ops.sum(ops.cast(t >= self.boundaries, ms.float32)))
            return ops.where(warming, rate * (t + 1.0) / self.ramp, rate)
        x = (t - self.warmup) / self.span
        if self.kind == "poly":
            decayed = 1.0 - x
        else:
            decayed = 0.5 * (1.0 + ops.cos(math.pi * x))
        return ops.where(warming, self.lr * t / self.ramp, self.lr * decayed)
