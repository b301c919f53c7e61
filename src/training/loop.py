"""The training loop: steps until the end of the schedule, step results read back from the device only
at sync points, callbacks around them, and the defined outcome of every way a run stops.

  schedule    one value: where the run starts and ends, how steps map to epochs, the learning rate
              of every step, the global batch, the log interval and the data-sink block size
  run_loop    the loop (a plain Python loop over the data, no hidden framework loop)

Stops: the end of the schedule; a diverged step (an ArcFaceError naming it, nothing saved after it);
Ctrl-C or SIGTERM (the last completed step is saved); a collective that failed because another rank
or node stopped (an ArcFaceError saying so).
"""
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import mindspore as ms

from src.data.pipeline import checked_iterator
from src.errors import ArcFaceError
from src.training.callbacks import SyncState
from src.training.lr_schedule import LRSchedule

logger = logging.getLogger("arcface")


@dataclass(frozen=True)
class Schedule:
    """What the loop needs to know about the run's steps."""

    steps_per_epoch: int
    total_steps: int       # the last global step (all epochs, or fewer with --max_steps)
    start_step: int        # global steps already done (a resumed run)
    global_batch: int      # images per step over all devices
    lr: LRSchedule         # the learning rate of every step
    log_interval: int = 1
    sink_size: int = 0     # steps per call with MindSpore's data sink (GPU/Ascend), 0: one step per call

    def position(self, global_step):
        """(epoch, step_in_epoch), both 1-based, of the 1-based `global_step`."""
        epoch, step = divmod(global_step - 1, self.steps_per_epoch)
        return epoch + 1, step + 1

    def rate(self, global_step):
        """The learning rate applied at the 1-based `global_step`."""
        return float(self.lr.rate(global_step - 1))


class _Pending:
    """Step results still on the device: read back together at the next sync point."""

    def __init__(self, schedule):
        self.schedule = schedule
        self.results, self.steps = [], 0
        self.since = time.perf_counter()

    def add(self, global_step, output, steps=1):
        """The results of the step `global_step`, the last of `steps` steps run since the last add."""
        self.results.append((global_step, output))
        self.steps += steps

    def read(self):
        """Read the pending results: a SyncState for the last step, or an ArcFaceError naming the
        first step that diverged: a non-finite loss, or gradients not finite at loss scale 1 (such a
        step was not applied, so the parameters are those before it)."""
        skipped, loss, scale = 0, None, 1.0
        for global_step, (loss_t, overflow_t, scale_t) in self.results:
            loss, overflow, scale = float(loss_t.asnumpy()), bool(overflow_t.asnumpy()), float(scale_t.asnumpy())
            if not math.isfinite(loss) or (overflow and scale <= 1.0):
                epoch, step_in_epoch = self.schedule.position(global_step)
                raise ArcFaceError(
                    f"the loss or the gradients are not finite (loss {loss:g}) at epoch {epoch} step "
                    f"{step_in_epoch} (global step {global_step}): the run diverged; training stopped, "
                    f"no checkpoint written after it; lower --lr or resume from the last checkpoint")
            skipped += overflow
        global_step = self.results[-1][0]
        now = time.perf_counter()
        epoch, step_in_epoch = self.schedule.position(global_step)
        state = SyncState(epoch, step_in_epoch, global_step, self.schedule.steps_per_epoch, self.schedule.total_steps,
                          loss, self.schedule.rate(global_step), self.steps, now - self.since,
                          self.schedule.global_batch, skipped, scale)
        self.results, self.steps, self.since = [], 0, now
        return state


def step_blocks(train_step, dataset, schedule):
    """(number of steps, results of the last one) per call to the device: one step fed from the host,
    or `sink_size` steps that MindSpore's data sink runs on the device from the dataset itself
    (GPU/Ascend only), as the model zoo trains."""
    repeats = math.ceil((schedule.total_steps - schedule.start_step) / schedule.steps_per_epoch)
    if schedule.sink_size:
        sink = ms.data_sink(train_step, dataset.repeat(repeats), sink_size=schedule.sink_size)
        while True:
            yield schedule.sink_size, sink()
    for images, labels in checked_iterator(dataset.repeat(repeats).create_tuple_iterator(num_epochs=1)):
        yield 1, train_step(images, labels)


class Stopped(KeyboardInterrupt):
    """A signal that ends the run like Ctrl-C: the last completed step is saved. SIGTERM comes from a job
    scheduler, the launcher, or MindSpore's cluster manager when another rank or node stopped answering
    (the ranks then stop within the cluster time-out instead of waiting in a collective forever). While a
    step runs, MindSpore's own SIGINT handler turns Ctrl-C into SIGTERM (`kill(getpid(), SIGTERM)`), so a
    SIGTERM that reaches a run in the foreground of its terminal is most likely Ctrl-C."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
        self.from_terminal = signum == signal.SIGINT or _in_terminal_foreground()

    def __str__(self):
        if self.signum == signal.SIGINT:
            return "SIGINT (Ctrl-C)"
        if self.from_terminal:
            return "Ctrl-C (which MindSpore passes on as SIGTERM while a step runs) or SIGTERM"
        return "SIGTERM (a job scheduler, the launcher, or MindSpore after another rank stopped answering)"


def _in_terminal_foreground():
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def _handle_stop_signals():
    """Install the handlers of SIGINT and SIGTERM; returns the previous ones."""
    return {signum: signal.signal(signum, _raise_stopped) for signum in (signal.SIGINT, signal.SIGTERM)}


def run_loop(train_step, dataset, schedule, callbacks):
    """Step from `schedule.start_step` to `schedule.total_steps`. The data pipeline is one stream
    repeated as often as needed, so a run resumed mid-epoch simply continues; epoch and step numbers
    derive from the global step. Step results are read back only at sync points: log lines,
    checkpoints, evaluations, epoch ends and the end (with a data sink: at the end of every sunk
    block of steps). SIGINT and SIGTERM stop it with the last completed step saved; the message names the
    signal (see `Stopped`)."""
    previous = _handle_stop_signals()
    try:
        return _loop(train_step, dataset, schedule, callbacks)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _loop(train_step, dataset, schedule, callbacks):
    train_step.set_train(True)
    pending = _Pending(schedule)
    global_step, state = schedule.start_step, None
    if global_step == 0:
        logger.info("compiling the training graph (the first step takes longer)")
    distributed = getattr(train_step, "distributed", False)
    blocks = step_blocks(train_step, dataset, schedule)
    try:
        while True:
            try:
                count, output = next(blocks)
            except StopIteration:
                break
            except RuntimeError as exc:
                if not distributed:
                    raise
                raise _rank_lost(exc, global_step + 1) from None
            global_step += count
            pending.add(global_step, output, count)
            for cb in callbacks:
                cb.on_step(global_step, count)
            _, step_in_epoch = schedule.position(global_step)
            epoch_end = step_in_epoch == schedule.steps_per_epoch
            if (count > 1 or step_in_epoch % schedule.log_interval == 0 or epoch_end
                    or global_step >= schedule.total_steps or any(cb.due(global_step) for cb in callbacks)):
                state = pending.read()
                for cb in callbacks:
                    cb.on_sync(state)
                if epoch_end:
                    for cb in callbacks:
                        cb.on_epoch_end(state)
                pending.since = time.perf_counter()  # saving and evaluating are not step time
            if global_step >= schedule.total_steps:
                break
    except KeyboardInterrupt as stop:
        # Keep the work done so far: the parameters after the last completed step are consistent.
        # On several ranks a rank that died leaves its head shard of this save unwritten, and
        # --resume auto then takes the newest complete checkpoint.
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the save short
            signal.signal(signum, signal.SIG_IGN)
        why = f"stopped by {stop}" if isinstance(stop, Stopped) else "interrupted"
        logger.warning(f"{why} after global step {global_step}: saving the last completed step; continue with "
                       f"--resume auto")
        try:
            if pending.results:
                state = pending.read()
            if state is not None:
                _finish(callbacks, state)
        except Exception as exc:  # noqa: BLE001  e.g. a collective that failed with the dead rank
            logger.warning(f"nothing saved: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}")
        raise
    except ArcFaceError:
        _finish(callbacks, None)
        raise
    _finish(callbacks, state)
    return state


def _rank_lost(exc, step):
    """The error of a step whose collective operation failed: another rank or node stopped. MindSpore
    then sends SIGTERM to end this rank too; it is ignored, so that this line is the last word."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kernel = next((line.strip() for line in str(exc).splitlines() if "failed" in line), "a kernel failed")
    return ArcFaceError(f"global step {step} failed on this rank ({kernel}): another rank or node has stopped "
                        f"(see its log); training stopped without saving this step; continue with --resume auto")


def _finish(callbacks, state):
    for cb in callbacks:
        cb.on_train_end(state)
