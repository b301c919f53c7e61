"""Training: one function, `train(cfg)`, in named phases that read top to bottom.

  set-up     device, ranks, the output folder's lock, stale files, logging
  record     --resume: the checkpoint to continue and the configuration it recorded (or, with
             --ckpt_url, the architecture the checkpoint records)
  data       source, number of classes, pipeline; config.yaml written
  model      backbone + head (the class-sharded head; one rank holds all classes)
  step       optimizer, learning rates, the one train-step cell
  restore    weights / optimizer / step from --resume, or weights from --ckpt_url
  callbacks  log lines, metrics, checkpoints, evaluation, curve
  loop       steps until the end (src.training.loop)
"""
import logging
import os
import time
from dataclasses import dataclass

import mindspore as ms
import numpy as np

from src import runtime
from src.checkpoint import MODEL_KEYS, checkpoint_position, list_checkpoints, read_checkpoint
from src.config import read_record, record_text, resume_config, validate
from src.data.pipeline import create_train_dataset
from src.data.sources import open_source, resolve_num_classes
from src.errors import ArcFaceError
from src.files import atomic_write, remove_stale_temporaries
from src.heads.classifier import PartialFC
from src.heads.margin import build_margin
from src.models import apply_init, get_backbone
from src.models.flops import gmacs
from src.training import modelarts
from src.training.callbacks import (
    TRAIN_LOG,
    CheckpointSaver,
    CurvePlotter,
    LossMonitor,
    VerificationMonitor,
    best_eval_score,
    close_logging,
    setup_logging,
)
from src.training.lock import RunLock
from src.training.loop import Schedule, run_loop
from src.training.lr_schedule import LRSchedule, scaled_lr
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
    record: str = ""  # the resolved configuration as yaml, once the data has resolved it (config.yaml, checkpoints)

    @property
    def data_dir(self):
        return os.path.join(modelarts.CACHE, "data") if self.cfg.modelarts else self.cfg.data_url


# --- phases ---------------------------------------------------------------------------------------

def set_up(cfg):
    output_dir = os.path.join(modelarts.CACHE, "output") if cfg.modelarts else cfg.train_url
    rt = runtime.setup(cfg.device_target, cfg.device_id, cfg.mode, seed=cfg.seed,
                       run_log=os.path.join(output_dir, TRAIN_LOG))
    run = Run(cfg, rt, output_dir)
    if rt.is_main:
        run.lock = RunLock(run.output_dir).acquire()
    try:
        _prepare_folders(run)
    except BaseException:
        if run.lock is not None:
            run.lock.release()
        close_logging()
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
    if cfg.eval_url and not any(os.path.isfile(os.path.join(cfg.eval_url, f"{t}.bin")) for t in cfg.eval_sets):
        # Checked on every rank: only rank 0 evaluates, the others would wait for it forever.
        raise ArcFaceError(f"--eval_url {cfg.eval_url}: none of {', '.join(cfg.eval_sets)} found")
    source = open_source(run.data_dir)
    cfg.num_classes = resolve_num_classes(source, cfg.num_classes, run.data_dir)
    dataset = create_train_dataset(source, cfg.batch_size, run.rt.rank, run.rt.group_size, cfg.num_workers,
                                   skip_corrupt=cfg.skip_corrupt)
    return source, dataset


def write_record(run, source):
    """The run record, now that the data resolved the configuration: kept for the checkpoints and written
    by rank 0 as config.yaml in the output folder (the resolved options, loadable again with --config)."""
    run.record = record_text(run.cfg)
    if not run.rt.is_main:
        return
    header = [f"written by train.py on {time.strftime('%Y-%m-%d %H:%M:%S')}: the resolved configuration of this run",
              f"{run.rt.group_size} x {run.cfg.device_target}; data: {source.kind}, {len(source)} images, "
              f"{run.cfg.num_classes} classes" + (f"; resumed from {run.resume_path}" if run.resume_path else "")]
    atomic_write(os.path.join(run.output_dir, "config.yaml"), "".join(f"# {line}\n" for line in header) + run.record)


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


def build_step(cfg, net, lr_schedule, fp16):
    return TrainStep(net, build_optimizer(cfg, net, lr_schedule), fp16=fp16, clip_norm=cfg.clip_grad_norm,
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


# A network of this many parameters or more (r50: 43.6 M) takes seconds per image to train on a CPU.
SLOW_ON_CPU_PARAMETERS = 40_000_000


def describe_run(run, source, net, schedule, fp16):
    """What is about to happen, printed before the graph is compiled: the network and its cost, the data,
    the steps, the recipe; on a CPU a warning when the network is too large to train there in reasonable
    time (a run started without --config is the model zoo's r100)."""
    cfg = run.cfg
    macs = gmacs(net.backbone)
    parameters = sum(int(np.prod(p.shape)) for p in net.backbone.trainable_params())
    hyper = cfg.margin_hyper
    margin = (f"{cfg.margin} (combined margin {','.join(f'{m:g}' for m in cfg.margins)})"
              if cfg.margin_type == "combined" else cfg.margin_type + "".join(
                  f" {key} {value}" if isinstance(value, bool) else f" {key} {value:g}"
                  for key, value in hyper.items() if key not in ("s", "gradient")))
    width = f" width {cfg.width}" if cfg.width != 64 else ""
    epochs = -(-schedule.total_steps // schedule.steps_per_epoch)
    recipe = [f"{cfg.optimizer} lr {schedule.lr.lr:g} {cfg.lr_schedule}"]
    if cfg.sample_rate < 1:
        recipe.append(f"sampling {cfg.sample_rate:g} of the class centres")
    if cfg.gradient_acc > 1:
        recipe.append(f"{cfg.gradient_acc} micro-batches per update")
    if cfg.clip_grad_norm:
        recipe.append(f"gradient norm clipped at {cfg.clip_grad_norm:g}")
    lines = [
        f"training {cfg.network}{width}: {parameters / 1e6:.1f} M parameters, {2 * macs:.2f} GFLOPs "
        f"({macs:.2f} G multiply-adds) per image",
        f"  loss       {margin}, scale {cfg.scale:g}" + (" (straight-through)" if hyper.get("gradient") == "straight"
                                                          else ""),
        f"  data       {source.kind} {run.data_dir}: {len(source)} images, {cfg.num_classes} classes",
        f"  steps      {schedule.total_steps - schedule.start_step} to go of {schedule.total_steps} "
        f"({schedule.steps_per_epoch} steps/epoch x {epochs} epoch(s)), batch {cfg.batch_size} per device x "
        f"{run.rt.group_size} x {cfg.device_target} = {schedule.global_batch} images per step",
        f"  recipe     {', '.join(recipe)}",
        f"  precision  {'fp16 backbone + loss scaling' if fp16 else 'fp32'}, {cfg.mode} mode",
    ]
    if cfg.device_target == "CPU" and parameters >= SLOW_ON_CPU_PARAMETERS:
        lines.append(f"note: {cfg.network} has {parameters / 1e6:.0f} M parameters: training it on a CPU takes seconds "
                     f"per image (days per epoch on a large set); for a first run try --config configs/demo.yaml, or "
                     f"a GPU/Ascend device")
    return "\n".join(lines)


def build_callbacks(run, net, step, schedule=None):
    cfg, rt = run.cfg, run.rt
    model = {key: getattr(cfg, key) for key in MODEL_KEYS}
    writer = CheckpointWriter(step, net.head, run.output_dir, cfg.keep_checkpoint_max,
                              meta=dict(model, config=run.record), is_main=rt.is_main)
    callbacks = [CheckpointSaver(writer, cfg.save_interval)]
    if rt.is_main:
        metrics = os.path.join(run.output_dir, "metrics.jsonl")
        if not cfg.resume and os.path.exists(metrics):
            os.remove(metrics)  # a fresh run starts a fresh curve
        callbacks.insert(0, LossMonitor(cfg.log_interval, metrics, schedule=schedule))
        if cfg.eval_url:
            from src.evaluation.verification import load_sets
            sets = load_sets(cfg.eval_url, cfg.eval_sets, log=logger.info, progress=False)
            from src.evaluation.embedders import embedder_factory
            factory = embedder_factory(cfg.eval_backend, cfg.device_target,
                                       os.path.join(run.output_dir, ".onnx-cache"), model, log=logger.info)
            best = best_eval_score(metrics) if cfg.resume else None
            callbacks.append(VerificationMonitor(net.backbone, sets, cfg.eval_interval, cfg.eval_batch_size, writer,
                                                 factory, metrics, best=best))
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
        close_logging()


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
    lr_schedule = LRSchedule(cfg.lr_schedule, lr, steps_per_epoch, cfg.epochs, cfg.schedule, cfg.gamma,
                             cfg.warmup_epochs)
    step = build_step(cfg, net, lr_schedule, fp16)

    start_step = restore_state(run, net, step)
    if start_step >= total_steps:
        logger.info(f"nothing to do: the checkpoint is at step {start_step} of {total_steps}")
        return None
    if start_step:
        ms.dataset.config.set_seed(cfg.seed + start_step)  # a new shuffle instead of replaying the first run's order

    schedule = Schedule(steps_per_epoch, total_steps, start_step, cfg.batch_size * run.rt.group_size, lr_schedule,
                        cfg.log_interval, cfg.sink_size)
    logger.info(describe_run(run, source, net, schedule, fp16))
    callbacks = build_callbacks(run, net, step, schedule)
    return run_loop(step, dataset, schedule, callbacks)
