"""What happens around each training step: log lines, progress bar, metrics, checkpoints.

Callbacks receive a `StepState` after every step and may implement `on_step_end`, `on_epoch_end`
and `on_train_end`. Only the main rank gets the logging and checkpoint callbacks.
"""
import glob
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from src.checkpoint import checkpoint_name, list_checkpoints, remove_checkpoint, save_checkpoint_atomic

logger = logging.getLogger("arcface")


@dataclass
class StepState:
    epoch: int            # 1-based
    step_in_epoch: int    # 1-based
    global_step: int      # steps done so far, over all epochs
    steps_per_epoch: int
    total_steps: int
    loss: float
    lr: float
    step_time: float      # seconds
    global_batch: int     # images per step over all devices


class Callback:
    """No-op hooks; subclasses override what they need."""

    def on_step_end(self, s: StepState):
        pass

    def on_epoch_end(self, s: StepState):
        pass

    def on_train_end(self, s):
        """`s` is the last StepState, or None when training stopped on an error."""


def setup_logging(log_dir=None, main=True):
    """Plain lines on stdout (like the model zoo); the same with timestamps in log_dir/train.log."""
    logger.setLevel(logging.INFO if main else logging.WARNING)
    logger.handlers.clear()
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if log_dir and main:
        os.makedirs(log_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(log_dir, "train.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    return logger


class LossMonitor(Callback):
    """The model zoo's log lines plus lr and throughput, a progress bar on a terminal, and a
    metrics.jsonl file (one JSON object per logged step) for plotting training curves."""

    def __init__(self, log_interval, metrics_path=None, progress=None):
        self.log_interval = log_interval
        self.metrics_path = metrics_path
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.bar = None
        self.epoch_start = time.time()
        self.epoch_steps = 0
        self.window = []

    def on_step_end(self, s: StepState):
        if self.progress and self.bar is None:
            self.bar = tqdm(total=s.total_steps, initial=s.global_step - 1, unit="step", dynamic_ncols=True)
        self.epoch_steps += 1
        self.window.append(s.step_time)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=s.epoch, loss=f"{s.loss:.4f}", lr=f"{s.lr:.5f}",
                                 img_s=f"{s.global_batch / max(s.step_time, 1e-9):.1f}")
        if s.step_in_epoch % self.log_interval == 0 or s.step_in_epoch == s.steps_per_epoch:
            mean_time = sum(self.window) / len(self.window)
            self.window = []
            self._write(f"epoch: {s.epoch} step: {s.step_in_epoch}, loss is {s.loss:.6f}, "
                        f"lr: {s.lr:.6f}, {s.global_batch / mean_time:.1f} img/s")
            if self.metrics_path:
                with open(self.metrics_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"epoch": s.epoch, "step": s.global_step, "loss": s.loss,
                                         "lr": s.lr}) + "\n")

    def on_epoch_end(self, s: StepState):
        elapsed = (time.time() - self.epoch_start) * 1000
        steps = max(self.epoch_steps, 1)
        self._write(f"epoch time: {elapsed:.3f} ms, per step time: {elapsed / steps:.3f} ms, "
                    f"{s.global_batch * steps / (elapsed / 1000):.1f} img/s")
        self.epoch_start, self.epoch_steps = time.time(), 0

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
    keeping the newest `keep` files."""

    def __init__(self, cell, directory, interval=0, keep=5, meta=None):
        self.cell, self.directory, self.interval, self.keep = cell, directory, interval, keep
        self.meta = dict(meta or {})
        self.last_saved_step = None
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(directory), ".tmp-*.ckpt")):
            os.remove(stale)

    def save(self, s: StepState):
        if self.last_saved_step == s.global_step:
            return
        path = os.path.join(self.directory, checkpoint_name(s.epoch, s.step_in_epoch))
        meta = {"epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "global_step": s.global_step}
        meta.update(self.meta)
        save_checkpoint_atomic(self.cell, path, meta)
        self.last_saved_step = s.global_step
        for old in list_checkpoints(self.directory)[:-self.keep]:
            remove_checkpoint(old)
        logger.info(f"saved checkpoint {path}")

    def on_step_end(self, s: StepState):
        if self.interval and s.global_step % self.interval == 0:
            self.save(s)

    def on_epoch_end(self, s: StepState):
        if not self.interval:
            self.save(s)

    def on_train_end(self, s):
        if s is not None:
            self.save(s)


class VerificationMonitor(Callback):
    """Runs the verification sets every `interval` steps (and at the end), logs their lines,
    records them in metrics.jsonl and keeps the checkpoint with the best mean Accuracy-Flip as
    `best.ckpt`."""

    def __init__(self, backbone, sets, interval, batch_size, save_cell, directory, meta=None,
                 metrics_path=None, nfolds=10, best=None):
        from src.embedders import MindSporeEmbedder
        self.backbone, self.sets, self.interval = backbone, sets, interval
        self.batch_size, self.nfolds = batch_size, nfolds
        self.embedder = MindSporeEmbedder(backbone)
        backbone.set_train(True)
        self.save_cell, self.directory, self.meta = save_cell, directory, dict(meta or {})
        self.metrics_path = metrics_path
        self.best, self.last_step = best, None  # a resumed run keeps the best score so far

    def on_step_end(self, s: StepState):
        if s.global_step % self.interval == 0:
            self.evaluate(s)

    def on_train_end(self, s):
        if s is not None and self.last_step != s.global_step:
            self.evaluate(s)

    def evaluate(self, s: StepState):
        from src.verification import verify_sets
        self.last_step = s.global_step
        self.backbone.set_train(False)
        try:
            results = verify_sets(self.embedder, self.sets, self.batch_size, self.nfolds, log=logger.info,
                                  progress=False)
        finally:
            self.backbone.set_train(True)
        accuracy = {name: r.acc_flip for name, r in results.items()}
        score = float(sum(accuracy.values()) / max(len(accuracy), 1))
        if self.metrics_path:
            with open(self.metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"epoch": s.epoch, "step": s.global_step, "eval": accuracy}) + "\n")
        if self.best is None or score > self.best:
            self.best = score
            meta = {"epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "global_step": s.global_step}
            meta.update(self.meta)
            save_checkpoint_atomic(self.save_cell, os.path.join(self.directory, "best.ckpt"), meta)
            logger.info(f"best mean Accuracy-Flip {score:.5f} at step {s.global_step}: saved best.ckpt")


def best_eval_score(metrics_path):
    """The best mean Accuracy-Flip recorded in metrics.jsonl, or None."""
    best = None
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as fh:
            for row in map(json.loads, fh):
                if row.get("eval"):
                    score = sum(row["eval"].values()) / len(row["eval"])
                    best = score if best is None else max(best, score)
    return best


def plot_training_curve(metrics_path, image_path):
    """Loss (and verification accuracy when evaluated) against the global step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, evals = [], [], {}
    with open(metrics_path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if "loss" in row:
                steps.append(row["step"])
                losses.append(row["loss"])
            for name, acc in row.get("eval", {}).items():
                evals.setdefault(name, []).append((row["step"], acc))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(steps, losses, color="tab:blue", linewidth=1.2, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    if evals:
        acc_ax = ax.twinx()
        for name, points in evals.items():
            xs, ys = zip(*points)
            acc_ax.plot(xs, ys, marker="o", linewidth=1.2, label=f"{name} Accuracy-Flip")
        acc_ax.set_ylabel("verification accuracy")
        acc_ax.legend(loc="lower right")
    ax.legend(loc="upper right")
    ax.set_title("training curve")
    fig.tight_layout()
    fig.savefig(image_path)
    plt.close(fig)


class CurvePlotter(Callback):
    """Redraws training_curve.png at each epoch end and at the end of training."""

    def __init__(self, metrics_path, image_path):
        self.metrics_path, self.image_path = metrics_path, image_path

    def _draw(self):
        if os.path.isfile(self.metrics_path):
            plot_training_curve(self.metrics_path, self.image_path)

    def on_epoch_end(self, s):
        self._draw()

    def on_train_end(self, s):
        if s is not None:
            self._draw()
