"""What happens around the training steps: log lines, progress bar, metrics, checkpoints, evaluation.

The loop reads the step results back from the device only at sync points (log lines, checkpoints,
evaluations, epoch ends; see src.training.loop). Callbacks get `on_step(global_step, steps)`
after every call to the device (host-only work such as the progress bar), `due(global_step)` to ask for a sync,
and at each sync `on_sync(state)` with a `SyncState`; then `on_epoch_end` and `on_train_end`.
"""
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from src.errors import ArcFaceError

logger = logging.getLogger("arcface")
TRAIN_LOG = "train.log"


@dataclass
class SyncState:
    epoch: int            # 1-based
    step_in_epoch: int    # 1-based
    global_step: int      # steps done so far, over all epochs
    steps_per_epoch: int
    total_steps: int
    loss: float           # loss of the last step
    lr: float             # learning rate applied at the last step
    steps: int            # steps since the previous sync
    seconds: float        # wall time since the previous sync
    global_batch: int     # images per step over all devices
    skipped: int = 0      # steps since the previous sync skipped for a non-finite gradient (fp16 overflow)
    loss_scale: float = 1.0

    @property
    def position(self):
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step}


class Callback:
    """No-op hooks; subclasses override what they need."""

    def on_step(self, global_step, steps=1):
        pass

    def due(self, global_step):
        return False

    def on_sync(self, s: SyncState):
        pass

    def on_epoch_end(self, s: SyncState):
        pass

    def on_train_end(self, s):
        """`s` is the last SyncState, or None when training stopped on an error."""


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a line is logged (it may be replaced, e.g. by a test's
    capture, after the handler was made)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(log_dir=None, main=True):
    """Plain lines on stdout (like the model zoo); the same with timestamps in log_dir/train.log."""
    logger.setLevel(logging.INFO if main else logging.WARNING)
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    console = _StdoutHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if log_dir and main:
        os.makedirs(log_dir, exist_ok=True)
        # delay: the file appears with the first line, so a run refused before it logs anything leaves none.
        handler = logging.FileHandler(os.path.join(log_dir, TRAIN_LOG), delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    return logger


def close_logging():
    """Close the run's log file at the end of a run: lines logged later in the same process (another
    tool, another run) must not go to a file of a finished run, or fail on its removed folder."""
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        handler.close()
        logger.removeHandler(handler)


def append_metrics(path, row):
    """One JSON line; a failure to write metrics is logged, never fatal."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
    except OSError as exc:
        logger.warning(f"cannot append to {path}: {exc.strerror}")


def read_metrics(path):
    """The rows of metrics.jsonl; a damaged line (e.g. half-written when a run was killed) is skipped."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def duration(seconds):
    """'42 s', '12 min', '3.5 h', '2.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class LossMonitor(Callback):
    """The model zoo's log lines plus lr and throughput, a progress bar on a terminal, and a
    metrics.jsonl file (one JSON object per logged step) for plotting training curves."""

    # Steps timed after the first one (which compiles the graph) before the run's length is estimated.
    ESTIMATE_AFTER = 5

    def __init__(self, log_interval, metrics_path=None, progress=None, schedule=None):
        self.log_interval = log_interval
        self.metrics_path = metrics_path
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.bar = None
        self.window_steps, self.window_seconds, self.window_skipped = 0, 0.0, 0
        self.epoch_steps, self.epoch_seconds = 0, 0.0
        self.schedule, self.timing_from = schedule, None  # (global step, time) after the first step

    def on_step(self, global_step, steps=1):
        if self.bar is not None:
            self.bar.update(steps)
        if self.schedule is not None:
            self._estimate(global_step)

    def _estimate(self, global_step):
        """Once, a few steps after the compiled first one: how long an epoch and the rest of the run take."""
        now = time.perf_counter()
        if self.timing_from is None:
            self.timing_from = (global_step, now)
            return
        timed = global_step - self.timing_from[0]
        if timed < self.ESTIMATE_AFTER:
            return
        per_step = (now - self.timing_from[1]) / timed
        self.schedule, schedule = None, self.schedule
        self._write(f"about {per_step:.3g} s per step ({schedule.global_batch / per_step:.1f} img/s): an epoch takes "
                    f"about {duration(per_step * schedule.steps_per_epoch)}, the rest of the run about "
                    f"{duration(per_step * (schedule.total_steps - global_step))}")

    def on_sync(self, s: SyncState):
        if self.progress and self.bar is None:
            self.bar = tqdm(total=s.total_steps, initial=s.global_step, unit="step", dynamic_ncols=True)
        self.window_steps += s.steps
        self.window_seconds += s.seconds
        self.window_skipped += s.skipped
        self.epoch_steps += s.steps
        self.epoch_seconds += s.seconds
        if self.bar is not None:
            self.bar.set_postfix(epoch=s.epoch, loss=f"{s.loss:.4f}", lr=f"{s.lr:.5f}",
                                 img_s=f"{s.global_batch * s.steps / max(s.seconds, 1e-9):.1f}")
        if s.step_in_epoch % self.log_interval == 0 or s.step_in_epoch == s.steps_per_epoch:
            rate = s.global_batch * self.window_steps / max(self.window_seconds, 1e-9)
            line = f"epoch: {s.epoch} step: {s.step_in_epoch}, loss is {s.loss:.6f}, lr: {s.lr:.6f}, {rate:.1f} img/s"
            if self.window_skipped:
                line += (f", {self.window_skipped} step(s) skipped for fp16 overflow (loss scale now "
                         f"{s.loss_scale:g})")
            self._write(line)
            if self.metrics_path:
                append_metrics(self.metrics_path, {"epoch": s.epoch, "step": s.global_step, "loss": s.loss,
                                                   "lr": s.lr, "skipped": self.window_skipped})
            self.window_steps, self.window_seconds, self.window_skipped = 0, 0.0, 0

    def on_epoch_end(self, s: SyncState):
        elapsed = self.epoch_seconds * 1000
        steps = max(self.epoch_steps, 1)
        self._write(f"epoch time: {elapsed:.3f} ms, per step time: {elapsed / steps:.3f} ms, "
                    f"{s.global_batch * steps / max(elapsed / 1000, 1e-9):.1f} img/s")
        self.epoch_steps, self.epoch_seconds = 0, 0.0

    def on_train_end(self, s):
        if self.bar is not None:
            self.bar.close()

    def _write(self, line):
        if self.bar is not None:
            self.bar.clear()
        logger.info(line)
        if self.bar is not None:
            self.bar.refresh()


class CheckpointSaver(Callback):
    """`ArcFace-<epoch>_<step>.ckpt` every `interval` steps (0: at each epoch end) and at the end,
    through a CheckpointWriter (which also writes the head state and prunes)."""

    def __init__(self, writer, interval=0):
        self.writer, self.interval = writer, interval
        self.last_saved_step = None

    def due(self, global_step):
        return bool(self.interval) and global_step % self.interval == 0

    def save(self, s: SyncState):
        if self.last_saved_step == s.global_step:
            return
        path = self.writer.save(s.position)
        self.last_saved_step = s.global_step
        logger.info(f"saved checkpoint {path}")

    def on_sync(self, s: SyncState):
        if self.due(s.global_step):
            self.save(s)

    def on_epoch_end(self, s: SyncState):
        if not self.interval:
            self.save(s)

    def on_train_end(self, s):
        if s is not None:
            self.save(s)


class VerificationMonitor(Callback):
    """Runs the verification sets every `interval` steps (and at the end), logs their lines,
    records them in metrics.jsonl and keeps the checkpoint with the best mean Accuracy-Flip as
    `best.ckpt` (backbone and everything rank 0 holds), with its calibrated threshold beside it
    (`threshold.json`: the protocol's threshold on the first set, as a cosine, used by embed.py).

    `embedder_factory(backbone)` gives the embedder of the backbone's weights at that moment (the
    backbone itself in MindSpore, or its export run by ONNX Runtime: src.evaluation.embedders)."""

    def __init__(self, backbone, sets, interval, batch_size, writer, embedder_factory, metrics_path=None, nfolds=10,
                 best=None):
        self.backbone, self.sets, self.interval = backbone, sets, interval
        self.batch_size, self.nfolds = batch_size, nfolds
        self.embedder_factory = embedder_factory
        self.writer = writer
        self.metrics_path = metrics_path
        self.best, self.last_step = best, None  # a resumed run keeps the best score so far

    def due(self, global_step):
        return global_step % self.interval == 0

    def on_sync(self, s: SyncState):
        if self.due(s.global_step):
            self.evaluate(s)

    def on_train_end(self, s):
        if s is not None and self.last_step != s.global_step:
            self.evaluate(s)

    def evaluate(self, s: SyncState):
        from src.evaluation.verification import verify_sets, write_threshold_record
        self.last_step = s.global_step
        self.backbone.set_train(False)
        try:
            embedder = self.embedder_factory(self.backbone)
            results = verify_sets(embedder, self.sets, self.batch_size, self.nfolds, log=logger.info, progress=False)
        finally:
            self.backbone.set_train(True)
        accuracy = {name: r.acc_flip for name, r in results.items()}
        score = float(sum(accuracy.values()) / max(len(accuracy), 1))
        if self.metrics_path:
            append_metrics(self.metrics_path, {"epoch": s.epoch, "step": s.global_step, "eval": accuracy})
        if self.best is None or score > self.best:
            self.best = score
            best = os.path.join(self.writer.directory, "best.ckpt")
            self.writer.write(best, s.position, head_state=False)
            try:  # a threshold is worth a warning, never the run
                write_threshold_record(best, results, s.global_step)
            except (OSError, ArcFaceError) as exc:
                logger.warning(f"could not write the threshold record beside {best}: {exc}")
            logger.info(f"best mean Accuracy-Flip {score:.5f} at step {s.global_step}: saved best.ckpt")


def best_eval_score(metrics_path):
    """The best mean Accuracy-Flip recorded in metrics.jsonl, or None."""
    best = None
    for row in read_metrics(metrics_path):
        evals = row.get("eval")
        if isinstance(evals, dict) and evals:
            try:
                score = sum(float(v) for v in evals.values()) / len(evals)
            except (TypeError, ValueError):
                continue
            best = score if best is None else max(best, score)
    return best


def plot_training_curve(metrics_path, image_path):
    """Loss (and verification accuracy when evaluated) against the global step, as a PNG."""
    import matplotlib.pyplot as plt
    fig = draw_training_curve(metrics_path)
    fig.savefig(image_path)
    plt.close(fig)


def draw_training_curve(metrics_path):
    """The figure of plot_training_curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, evals = [], [], {}
    for row in read_metrics(metrics_path):
        if "loss" in row and "step" in row:
            steps.append(row["step"])
            losses.append(row["loss"])
        if isinstance(row.get("eval"), dict):
            for name, acc in row["eval"].items():
                evals.setdefault(name, []).append((row.get("step", 0), acc))
    # Loss (left axis, blue) and accuracy (right axis, one warm colour per set): two colours, two axes, and
    # one legend above the plot, outside the lines.
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110, layout="constrained")
    handles = ax.plot(steps, losses, color="tab:blue", linewidth=1.2, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.tick_params(axis="y", colors="tab:blue")
    ax.grid(alpha=0.3)
    if evals:
        acc_ax = ax.twinx()
        for (name, points), color in zip(evals.items(), ["tab:orange", "tab:red", "tab:brown", "tab:purple",
                                                          "tab:olive", "tab:pink"] * 4):
            xs, ys = zip(*points)
            handles += acc_ax.plot(xs, ys, marker="o", color=color, linewidth=1.2, label=f"{name} Accuracy-Flip")
        acc_ax.set_ylabel("verification accuracy", color="tab:orange")
        acc_ax.tick_params(axis="y", colors="tab:orange")
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 4), frameon=False)
    return fig


class CurvePlotter(Callback):
    """Redraws training_curve.png at each epoch end and at the end of training. A plotting failure
    is logged and never stops training."""

    def __init__(self, metrics_path, image_path):
        self.metrics_path, self.image_path = metrics_path, image_path

    def _draw(self):
        if not os.path.isfile(self.metrics_path):
            return
        try:
            plot_training_curve(self.metrics_path, self.image_path)
        except Exception as exc:  # noqa: BLE001  a curve is never worth a training run
            logger.warning(f"could not draw {self.image_path}: {type(exc).__name__}: {exc}")

    def on_epoch_end(self, s):
        self._draw()

    def on_train_end(self, s):
        if s is not None:
            self._draw()
