"""Training: one function, `train(cfg)`, in named phases that read top to bottom, and the loop.

  set-up     device, ranks, the output folder's lock, stale files, logging
  record     --resume: the checkpoint to continue and the configuration it recorded (or, with
             --ckpt_url, the architecture the checkpoint records)
  data       source, number of classes, pipeline; config.yaml written
  model      backbone + head (the class-sharded head; one rank holds all classes)
  step       optimizer, learning rates, the one train-step cell
  restore    weights / optimizer / step from --resume, or weights from --ckpt_url
  callbacks  log lines, metrics, checkpoints, evaluation, curve
  loop       steps until the end; results are read back from the device only at sync points
"""
import logging
import math
import os
import signal
import time
from dataclasses import dataclass

import mindspore as ms

from src import runtime
from src.checkpoint import MODEL_KEYS, checkpoint_position, list_checkpoints, read_checkpoint, remove_stale_temporaries
from src.config import read_record, record_text, resume_config, validate
from src.data.pipeline import checked_iterator, create_train_dataset
from src.data.sources import open_source, resolve_num_classes
from src.errors import ArcFaceError
from src.heads.classifier import PartialFC
from src.heads.margin import build_margin
from src.models import apply_init, get_backbone
from src.models.flops import gmacs
from src.training import modelarts
from src.training.callbacks import (
    CheckpointSaver,
    CurvePlotter,
    LossMonitor,
    SyncState,
    VerificationMonitor,
    best_eval_score,
    setup_logging,
)
from src.training.lock import RunLock
from src.training.lr_schedule import learning_rates, scaled_lr
from src.training.optim import build_optimizer
from src.training.state import CheckpointWriter, initialise, latest_resumable, restore, set_aside
from src.training.step import BackboneWithHead, TrainStep

logger = logging.getLogger("arcface")


@dataclass
class Run:
    """What the phases hand on to each other."""
    cfg: object
    rt: runtime.Runtime
    output_dir: str
    resume_path: str = ""
    resume_params: dict = None
    resume_meta: dict = None
    lock: RunLock = None

    @property
    def data_dir(self):
        return os.path.join(modelarts.CACHE, "data") if self.cfg.modelarts else self.cfg.data_url


# --- phases ---------------------------------------------------------------------------------------

def set_up(cfg):
    rt = runtime.setup(cfg.device_target, cfg.device_id, cfg.mode, seed=cfg.seed)
    run = Run(cfg, rt, os.path.join(modelarts.CACHE, "output") if cfg.modelarts else cfg.train_url)
    if rt.is_main:
        run.lock = RunLock(run.output_dir).acquire()
    try:
        _prepare_folders(run)
    except BaseException:
        if run.lock is not None:
            run.lock.release()
        raise
    return run


def _prepare_folders(run):
    cfg, rt = run.cfg, run.rt
    if cfg.modelarts:
        modelarts.fetch_once(cfg.data_url, run.data_dir)
        if cfg.resume:
            modelarts.fetch_once(cfg.train_url, run.output_dir)  # the checkpoints to continue from
    stale = remove_stale_temporaries(run.output_dir) if rt.is_main else []
    setup_logging(run.output_dir, main=rt.is_main)
    for name in stale:
        logger.info(f"removed {name}, left by an interrupted save")
    if cfg.device_num > 1 and cfg.device_num != rt.group_size:
        logger.warning(f"--device_num {cfg.device_num} but {rt.group_size} process(es) were launched: "
                       f"using {rt.group_size}")
    existing = list_checkpoints(run.output_dir)
    if existing and not cfg.resume:
        # A fresh run would mix its checkpoints with these (and prune its own first).
        raise ArcFaceError(f"{run.output_dir} already holds checkpoints ({os.path.basename(existing[-1])}): "
                           f"use --resume auto to continue, or another --train_url")


def adopt_initial_architecture(run, given):
    """--ckpt_url without --resume: the backbone options the checkpoint records (network, width,
    embedding size) are taken unless given, so that an imported or earlier model loads as it is."""
    cfg = run.cfg
    if not cfg.ckpt_url or cfg.resume:
        return
    _, meta = read_checkpoint(cfg.ckpt_url, meta_only=True)
    for key in MODEL_KEYS:
        if key in meta and (given is None or key not in given):
            setattr(cfg, key, meta[key])
    validate(cfg)


def resolve_resume(run, given):
    """--resume: find the checkpoint, read it once, and continue the configuration it recorded."""
    cfg = run.cfg
    if not cfg.resume:
        return
    skipped = []
    if cfg.resume == "auto":
        path, params, meta = latest_resumable(run.output_dir, skipped)
        if run.rt.is_main:
            for unusable in skipped:
                set_aside(unusable)
                logger.warning(f"renamed {os.path.basename(unusable)} to {os.path.basename(unusable)}.unusable")
    else:
        path = cfg.resume
        params, meta = read_checkpoint(path)
    later = [p for p in list_checkpoints(run.output_dir) if p not in skipped
             and checkpoint_position(p) > (meta.get("epoch", 0), meta.get("step_in_epoch", 0))]
    if later:
        # Continuing would write an older branch over these and prune them as "old".
        raise ArcFaceError(f"--resume {path} is at epoch {meta.get('epoch')} step {meta.get('step_in_epoch')}, but "
                           f"{run.output_dir} already holds the later {os.path.basename(later[-1])}: continue from "
                           f"{os.path.basename(path)} into another --train_url, or use --resume auto")
    run.resume_path, run.resume_params, run.resume_meta = path, params, meta
    if "config" in meta:
        recorded = read_record(meta["config"], path)
        run.cfg = resume_config(cfg, given if given is not None else frozenset(), recorded, path)


def open_data(run):
    cfg = run.cfg
    eval_targets = [t for t in cfg.eval_targets.split(",") if t]
    if cfg.eval_url and not any(os.path.isfile(os.path.join(cfg.eval_url, f"{t}.bin")) for t in eval_targets):
        # Checked on every rank: only rank 0 evaluates, the others would wait for it forever.
        raise ArcFaceError(f"--eval_url {cfg.eval_url}: none of {', '.join(eval_targets)} found")
    source = open_source(run.data_dir)
    cfg.num_classes = resolve_num_classes(source, cfg.num_classes, run.data_dir)
    dataset = create_train_dataset(source, cfg.batch_size, run.rt.rank, run.rt.group_size, cfg.num_workers,
                                   skip_corrupt=cfg.skip_corrupt)
    return source, dataset


def write_record(run, source):
    """config.yaml in the output folder: the resolved options, loadable again with --config."""
    if not run.rt.is_main:
        return
    header = [f"written by train.py on {time.strftime('%Y-%m-%d %H:%M:%S')}: the resolved configuration of this run",
              f"{run.rt.group_size} x {run.cfg.device_target}; data: {source.kind}, {len(source)} images, "
              f"{run.cfg.num_classes} classes" + (f"; resumed from {run.resume_path}" if run.resume_path else "")]
    path = os.path.join(run.output_dir, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(record_text(run.cfg, header))
    os.replace(tmp, path)


def resolve_amp(cfg):
    """True for an fp16 backbone: 'auto' means fp16 on GPU/Ascend, fp32 on CPU (faster there)."""
    if cfg.amp == "auto":
        return cfg.device_target != "CPU"
    return cfg.amp == "O2"


def build_network(cfg, num_classes, fp16=False):
    """Backbone + the class-sharded head (rank and world size from the communication group)."""
    backbone = get_backbone(cfg.network, cfg.num_features, cfg.dropout, fp16=fp16, width=cfg.width)
    apply_init(backbone, cfg.network, cfg.init, cfg.seed)
    margin = build_margin(cfg.margin_type, **cfg.margin_hyper)
    head = PartialFC(num_classes, cfg.num_features, margin, sample_rate=cfg.sample_rate, seed=cfg.seed)
    return BackboneWithHead(backbone, head)


def build_step(cfg, net, lr_per_step, fp16):
    return TrainStep(net, build_optimizer(cfg, net, lr_per_step), fp16=fp16, clip_norm=cfg.clip_grad_norm,
                     accumulate=cfg.gradient_acc, scale_window=cfg.loss_scale_window)


def restore_state(run, net, step):
    """Returns the global step to start from."""
    if run.resume_path:
        meta = restore(step, net.head, run.resume_path, run.resume_params, run.resume_meta)
        run.resume_params = None  # the arrays are in the network now
        logger.info(f"resumed from {run.resume_path} at epoch {meta['epoch']} step {meta['step_in_epoch']} "
                    f"(global step {meta['global_step']})")
        return int(meta["global_step"])
    if run.cfg.ckpt_url:
        initialise(net, run.cfg.ckpt_url)
    return 0


def describe_run(run, source, steps_per_epoch, lr, fp16, macs):
    """The first log line: what is trained on what, how, at which cost per image."""
    cfg = run.cfg
    width = f" width {cfg.width}" if cfg.width != 64 else ""
    hyper = cfg.margin_hyper
    margin = cfg.margin if cfg.margin_type == "combined" else cfg.margin_type + "".join(
        f" {key} {value}" if isinstance(value, bool) else f" {key} {value:g}"
        for key, value in hyper.items() if key not in ("s", "gradient"))
    parts = [f"{cfg.network}{width} ({2 * macs:.2f} GFLOPs = {macs:.2f} G multiply-adds per image) {margin}"
             + (" straight-through" if hyper.get("gradient") == "straight" else ""),
             f"{source.kind} {run.data_dir}: {len(source)} images, {cfg.num_classes} classes",
             f"{run.rt.group_size} x {cfg.device_target}",
             f"batch {cfg.batch_size} per device, {steps_per_epoch} steps/epoch",
             f"{cfg.optimizer} lr {lr:g} {cfg.lr_schedule}", "fp16 backbone + loss scaling" if fp16 else "fp32",
             f"{cfg.mode} mode"]
    if cfg.sample_rate < 1:
        parts.append(f"sampling {cfg.sample_rate:g} of the class centres")
    if cfg.gradient_acc > 1:
        parts.append(f"{cfg.gradient_acc} micro-batches per update")
    if cfg.clip_grad_norm:
        parts.append(f"gradient norm clipped at {cfg.clip_grad_norm:g}")
    return " | ".join(parts)


def build_callbacks(run, net, step):
    cfg, rt = run.cfg, run.rt
    model = {key: getattr(cfg, key) for key in MODEL_KEYS}
    writer = CheckpointWriter(step, net.head, run.output_dir, cfg.keep_checkpoint_max,
                              meta=dict(model, config=record_text(cfg)), is_main=rt.is_main)
    callbacks = [CheckpointSaver(writer, cfg.save_interval)]
    if rt.is_main:
        metrics = os.path.join(run.output_dir, "metrics.jsonl")
        if not cfg.resume and os.path.exists(metrics):
            os.remove(metrics)  # a fresh run starts a fresh curve
        callbacks.insert(0, LossMonitor(cfg.log_interval, metrics))
        if cfg.eval_url:
            from src.evaluation.verification import load_sets
            targets = [t for t in cfg.eval_targets.split(",") if t]
            sets = load_sets(cfg.eval_url, targets, log=logger.info, progress=False)
            from src.evaluation.embedders import resolve_backend
            callbacks.append(VerificationMonitor(net.backbone, sets, cfg.eval_interval, cfg.eval_batch_size, writer,
                                                 metrics, best=best_eval_score(metrics) if cfg.resume else None,
                                                 backend=resolve_backend(cfg.eval_backend, cfg.device_target),
                                                 model=model))
        callbacks.append(CurvePlotter(metrics, os.path.join(run.output_dir, "training_curve.png")))
    return callbacks


def train(cfg, given=None):
    """Run training as configured (`given`: the options set explicitly, for --resume); returns the
    final SyncState (None if no step ran)."""
    run = set_up(cfg)
    try:
        return _train(run, given)
    finally:
        if run.cfg.modelarts:  # checkpoints and logs back to OBS, also after a failure
            modelarts.push_results(run.output_dir, run.cfg.train_url, run.rt.rank, run.rt.group_size)
        if run.lock is not None:
            run.lock.release()


def _train(run, given):
    resolve_resume(run, given)
    adopt_initial_architecture(run, given)
    cfg = run.cfg
    source, dataset = open_data(run)
    write_record(run, source)
    steps_per_epoch = dataset.get_dataset_size()
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    fp16 = resolve_amp(cfg)
    net = build_network(cfg, cfg.num_classes, fp16=fp16)
    lr = scaled_lr(cfg.lr, cfg.batch_size, run.rt.group_size)
    lr_per_step = learning_rates(cfg.lr_schedule, lr, steps_per_epoch, cfg.epochs, cfg.schedule, cfg.gamma,
                                 cfg.warmup_epochs)
    step = build_step(cfg, net, lr_per_step, fp16)

    start_step = restore_state(run, net, step)
    if start_step >= total_steps:
        logger.info(f"nothing to do: the checkpoint is at step {start_step} of {total_steps}")
        return None
    if start_step:
        ms.dataset.config.set_seed(cfg.seed + start_step)  # a new shuffle instead of replaying the first run's order

    logger.info(describe_run(run, source, steps_per_epoch, lr, fp16, gmacs(net.backbone)))
    callbacks = build_callbacks(run, net, step)
    # A scheduler's SIGTERM is handled like Ctrl-C: the last completed step is saved.
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run_loop(step, dataset, lr_per_step, start_step, total_steps, steps_per_epoch,
                        cfg.batch_size * run.rt.group_size, callbacks, cfg.log_interval, cfg.sink_size)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: from a job scheduler, from the launcher, or from MindSpore's
    cluster manager when another rank or node stopped answering (the ranks then stop within the
    cluster time-out instead of waiting in a collective forever)."""


def _raise_terminated(signum, frame):
    raise Terminated


# --- the loop -------------------------------------------------------------------------------------

class _Pending:
    """Step results still on the device: read back together at the next sync point."""

    def __init__(self, lr_per_step, steps_per_epoch, total_steps, global_batch):
        self.lr_per_step, self.steps_per_epoch = lr_per_step, steps_per_epoch
        self.total_steps, self.global_batch = total_steps, global_batch
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
                epoch, step_in_epoch = divmod(global_step - 1, self.steps_per_epoch)
                raise ArcFaceError(
                    f"the loss or the gradients are not finite (loss {loss:g}) at epoch {epoch + 1} step "
                    f"{step_in_epoch + 1} (global step {global_step}): the run diverged; training stopped, "
                    f"no checkpoint written after it; lower --lr or resume from the last checkpoint")
            skipped += overflow
        global_step = self.results[-1][0]
        now = time.perf_counter()
        epoch, step_in_epoch = divmod(global_step - 1, self.steps_per_epoch)
        state = SyncState(epoch + 1, step_in_epoch + 1, global_step, self.steps_per_epoch, self.total_steps, loss,
                          float(self.lr_per_step[global_step - 1]), self.steps, now - self.since,
                          self.global_batch, skipped, scale)
        self.results, self.steps, self.since = [], 0, now
        return state


def step_blocks(train_step, dataset, start_step, total_steps, steps_per_epoch, sink_size=0):
    """(number of steps, results of the last one) per call to the device: one step fed from the host,
    or `sink_size` steps that MindSpore's data sink runs on the device from the dataset itself
    (GPU/Ascend only), as the model zoo trains."""
    repeats = math.ceil((total_steps - start_step) / steps_per_epoch)
    if sink_size:
        sink = ms.data_sink(train_step, dataset.repeat(repeats), sink_size=sink_size)
        while True:
            yield sink_size, sink()
    for images, labels in checked_iterator(dataset.repeat(repeats).create_tuple_iterator(num_epochs=1)):
        yield 1, train_step(images, labels)


def run_loop(train_step, dataset, lr_per_step, start_step, total_steps, steps_per_epoch, global_batch, callbacks,
             log_interval=1, sink_size=0):
    """Step until total_steps. The data pipeline is one stream repeated as often as needed, so a
    run resumed mid-epoch simply continues; epoch and step numbers derive from the global step.
    Step results are read back only at sync points: log lines, checkpoints, evaluations, epoch
    ends and the end (with a data sink: at the end of every sunk block of steps)."""
    train_step.set_train(True)
    pending = _Pending(lr_per_step, steps_per_epoch, total_steps, global_batch)
    global_step, state = start_step, None
    if start_step == 0:
        logger.info("compiling the training graph (the first step takes longer)")
    distributed = getattr(train_step, "distributed", False)
    blocks = step_blocks(train_step, dataset, start_step, total_steps, steps_per_epoch, sink_size)
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
            step_in_epoch = (global_step - 1) % steps_per_epoch + 1
            epoch_end = step_in_epoch == steps_per_epoch
            if (count > 1 or step_in_epoch % log_interval == 0 or epoch_end or global_step >= total_steps
                    or any(cb.due(global_step) for cb in callbacks)):
                state = pending.read()
                for cb in callbacks:
                    cb.on_sync(state)
                if epoch_end:
                    for cb in callbacks:
                        cb.on_epoch_end(state)
                pending.since = time.perf_counter()  # saving and evaluating are not step time
            if global_step >= total_steps:
                break
    except KeyboardInterrupt as stop:
        # Keep the work done so far: the parameters after the last completed step are consistent.
        # On several ranks a rank that died leaves its head shard of this save unwritten, and
        # --resume auto then takes the newest complete checkpoint.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the save short
        why = ("stopped by SIGTERM (a job scheduler, the launcher, or MindSpore after another rank stopped "
               "answering)" if isinstance(stop, Terminated) else "interrupted")
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
