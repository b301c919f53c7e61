"""Standalone and data-parallel training: network, optimizer, train-step cell and the loop."""
import logging
import math
import os
import signal
import time

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from src import runtime
from src.backbones import get_backbone
from src.callbacks import (CheckpointSaver, CurvePlotter, LossMonitor, StepState, VerificationMonitor,
                           best_eval_score, setup_logging)
from src.checkpoint import latest_checkpoint, list_checkpoints, load_backbone, load_train_state, read_checkpoint
from src.dataset import checked_iterator, create_train_dataset, open_source, resolve_num_classes
from src.errors import ArcFaceError
from src.loss import CombinedMarginHead
from src.partial_fc import (HeadShardSaver, PartialFCHead, build_partial_fc_train_step, has_complete_shards,
                            load_partial_fc_train_state, main_checkpoint_entries, split_head)
from src.lr_schedule import scaled_lr, step_lr
from src.verification import load_sets

logger = logging.getLogger("arcface")


class BackboneWithHead(nn.Cell):
    """images, labels -> margin softmax loss."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def construct(self, images, labels):
        return self.head(self.backbone(images), labels)


def build_network(cfg, num_classes, fp16=False):
    backbone = get_backbone(cfg.network, cfg.num_features, cfg.dropout, fp16=fp16, width=cfg.width)
    if cfg.partial_fc:
        # This rank's share of the class centres; rank and world size from the communication group.
        head = PartialFCHead(num_classes, cfg.num_features, cfg.scale, *cfg.margins, sample_rate=cfg.sample_rate,
                             seed=cfg.seed)
    else:
        head = CombinedMarginHead(num_classes, cfg.num_features, cfg.scale, *cfg.margins)
    return BackboneWithHead(backbone, head)


def parameter_groups(net, weight_decay):
    """Weight decay on everything but BatchNorm's gamma/beta."""
    bn_ids = set()
    for _, cell in net.cells_and_names():
        if isinstance(cell, (nn.BatchNorm1d, nn.BatchNorm2d)):
            bn_ids.update(id(p) for p in cell.get_parameters())
    params = net.trainable_params()
    decay = [p for p in params if id(p) not in bn_ids]
    no_decay = [p for p in params if id(p) in bn_ids]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_train_step(net, lr_per_step, cfg, fp16):
    optimizer = nn.SGD(parameter_groups(net, cfg.weight_decay), learning_rate=ms.Tensor(lr_per_step),
                       momentum=cfg.momentum)
    if cfg.partial_fc:
        return build_partial_fc_train_step(net, optimizer, fp16)
    if fp16:
        # Dynamic loss scaling keeps small fp16 gradients from flushing to zero; overflowing
        # steps are skipped and the scale lowered.
        scale = nn.DynamicLossScaleUpdateCell(loss_scale_value=2.0 ** 16, scale_factor=2, scale_window=2000)
        return LossScaledTrainStep(net, optimizer, scale)
    return nn.TrainOneStepCell(net, optimizer)


def _unscale(scale, grad):
    return grad * ops.cast(ops.reciprocal(scale), grad.dtype)


class LossScaledTrainStep(nn.Cell):
    """One optimizer step with dynamic loss scaling, on any device (nn.TrainOneStepWithLossScaleCell
    relies on Ascend float-status ops outside GPU). Returns (loss, overflow, scale); an overflowing
    step is skipped and the scale lowered by `scale_update`. Data parallel: gradients are averaged
    across ranks before the overflow check, so every rank skips the same steps."""

    def __init__(self, network, optimizer, scale_update):
        super().__init__(auto_prefix=False)  # parameter names as in nn.TrainOneStepCell
        self.network = network
        self.network.set_grad()
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.loss_scaling_manager = scale_update
        self.scale_sense = ms.Parameter(ms.Tensor(scale_update.get_loss_scale(), ms.float32), name="scale_sense")
        self.hyper_map = ops.HyperMap()
        parallel = ms.get_auto_parallel_context("parallel_mode") == ms.ParallelMode.DATA_PARALLEL
        self.reducer = nn.DistributedGradReducer(self.weights, mean=True) if parallel else nn.Identity()

    def construct(self, images, labels):
        loss = self.network(images, labels)
        scale = self.scale_sense
        sens = ops.ones_like(loss) * ops.cast(scale, loss.dtype)
        grads = self.grad(self.network, self.weights)(images, labels, sens)
        grads = self.reducer(grads)
        grads = self.hyper_map(ops.partial(_unscale, scale), grads)
        overflow = ops.logical_not(ms.amp.all_finite(grads))
        overflow = self.loss_scaling_manager(self.scale_sense, overflow)
        if not overflow:
            loss = ops.depend(loss, self.optimizer(grads))
        return loss, overflow, scale


def resolve_amp(cfg):
    """True for an fp16 backbone: 'auto' means fp16 on GPU/Ascend, fp32 on CPU (faster there)."""
    if cfg.amp == "auto":
        return cfg.device_target != "CPU"
    return cfg.amp == "O2"


MODELARTS_CACHE = "/cache"  # the local disk of a ModelArts job


def _modelarts_sync(src, dst):
    try:
        import moxing as mox
    except ImportError:
        raise ArcFaceError("--modelarts needs the moxing package, available on ModelArts") from None
    mox.file.copy_parallel(src, dst)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def train(cfg):
    """Run training as configured; returns the final StepState (None if no step ran)."""
    rt = runtime.setup(cfg.device_target, cfg.device_id, cfg.mode, seed=cfg.seed)
    output_dir = cfg.train_url
    data_dir = cfg.data_url
    if cfg.modelarts:
        data_dir, output_dir = os.path.join(MODELARTS_CACHE, "data"), os.path.join(MODELARTS_CACHE, "output")
        _modelarts_sync(cfg.data_url, data_dir)
        if cfg.resume:
            _modelarts_sync(cfg.train_url, output_dir)  # the checkpoints to continue from
    setup_logging(output_dir, main=rt.is_main)
    if cfg.device_num > 1 and cfg.device_num != rt.group_size:
        logger.warning(f"--device_num {cfg.device_num} but {rt.group_size} process(es) were launched: "
                       f"using {rt.group_size}")

    existing = list_checkpoints(output_dir)
    if existing and not cfg.resume:
        # A fresh run would mix its checkpoints with these (and prune its own first).
        raise ArcFaceError(f"{output_dir} already holds checkpoints ({os.path.basename(existing[-1])}): "
                           f"use --resume auto to continue, or another --train_url")
    eval_targets = [t for t in cfg.eval_targets.split(",") if t]
    if cfg.eval_url and not any(os.path.isfile(os.path.join(cfg.eval_url, f"{t}.bin")) for t in eval_targets):
        # Checked on every rank: only rank 0 evaluates, the others would wait for it forever.
        raise ArcFaceError(f"--eval_url {cfg.eval_url}: none of {', '.join(eval_targets)} found")

    source = open_source(data_dir)
    num_classes = resolve_num_classes(source, cfg.num_classes, data_dir)
    dataset = create_train_dataset(source, cfg.batch_size, rt.rank, rt.group_size, cfg.num_workers,
                                   path=data_dir, skip_corrupt=cfg.skip_corrupt)
    steps_per_epoch = dataset.get_dataset_size()
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    fp16 = resolve_amp(cfg)
    net = build_network(cfg, num_classes, fp16=fp16)
    if cfg.ckpt_url:
        params, _ = read_checkpoint(cfg.ckpt_url)
        load_backbone(net.backbone, cfg.ckpt_url, params)
        head_weight = params.get("head.weight")
        if cfg.partial_fc:
            # A full head (a plain run, or export_merged_checkpoint) is split; a shard is not used.
            if head_weight is not None and tuple(head_weight.shape) == (num_classes, cfg.num_features):
                net.head.weight.set_data(ms.Tensor(split_head(head_weight.asnumpy(), rt.rank, rt.group_size)))
        elif head_weight is not None and tuple(head_weight.shape) == tuple(net.head.weight.shape):
            net.head.weight.set_data(head_weight)
        logger.info(f"initialised from {cfg.ckpt_url}")
    lr = scaled_lr(cfg.lr, cfg.batch_size, rt.group_size)
    lr_per_step = step_lr(lr, steps_per_epoch, cfg.epochs, cfg.schedule, cfg.gamma, cfg.warmup_epochs)
    train_step = build_train_step(net, lr_per_step, cfg, fp16)

    start_step = 0
    if cfg.resume:
        # With Partial FC, the newest checkpoint whose head shards were all written.
        complete = has_complete_shards if cfg.partial_fc else None
        path = latest_checkpoint(output_dir, complete) if cfg.resume == "auto" else cfg.resume
        if cfg.partial_fc:
            meta = load_partial_fc_train_state(train_step, net.head, path)
        else:
            meta = load_train_state(train_step, path)
        start_step = meta["global_step"]
        logger.info(f"resumed from {path} at epoch {meta['epoch']} step {meta['step_in_epoch']} "
                    f"(global step {start_step})")
        if start_step >= total_steps:
            logger.info(f"nothing to do: the checkpoint is at step {start_step} of {total_steps}")
            return None
        # A new shuffle for the resumed run instead of replaying the first run's order.
        ms.dataset.config.set_seed(cfg.seed + start_step)

    global_batch = cfg.batch_size * rt.group_size
    logger.info(f"{cfg.network} {cfg.margin} | {source.kind} {data_dir}: {len(source)} images, "
                f"{num_classes} classes | {rt.group_size} x {cfg.device_target} | batch {cfg.batch_size} "
                f"per device, {steps_per_epoch} steps/epoch | lr {lr:g} | "
                f"{'fp16 backbone + loss scaling' if fp16 else 'fp32'} | {cfg.mode} mode")
    callbacks = []
    checkpoint_cell = train_step
    if cfg.partial_fc:
        # Every rank writes its head shard next to rank 0's checkpoint, which leaves the shards out.
        callbacks.append(HeadShardSaver(train_step, net.head, output_dir, cfg.save_interval, cfg.keep_checkpoint_max))
        checkpoint_cell = main_checkpoint_entries(train_step, net.head)
    if rt.is_main:
        metrics = os.path.join(output_dir, "metrics.jsonl")
        if not cfg.resume and os.path.exists(metrics):
            os.remove(metrics)  # a fresh run starts a fresh curve
        model = {"network": cfg.network, "width": cfg.width, "num_features": cfg.num_features}
        callbacks.append(LossMonitor(cfg.log_interval, metrics))
        callbacks.append(CheckpointSaver(checkpoint_cell, output_dir, cfg.save_interval, cfg.keep_checkpoint_max,
                                         meta=model))
        if cfg.eval_url:
            sets = load_sets(cfg.eval_url, eval_targets, log=logger.info, progress=False)
            callbacks.append(VerificationMonitor(net.backbone, sets, cfg.eval_interval, cfg.eval_batch_size,
                                                 checkpoint_cell, output_dir, model, metrics,
                                                 best=best_eval_score(metrics) if cfg.resume else None))
        callbacks.append(CurvePlotter(metrics, os.path.join(output_dir, "training_curve.png")))
    # A scheduler's SIGTERM is handled like Ctrl-C: the last completed step is saved.
    previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return run_loop(train_step, dataset, lr_per_step, start_step, total_steps, steps_per_epoch,
                        global_batch, callbacks)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if cfg.modelarts and rt.is_main:
            _modelarts_sync(output_dir, cfg.train_url)  # checkpoints and logs back to OBS, also after a failure


def run_loop(train_step, dataset, lr_per_step, start_step, total_steps, steps_per_epoch, global_batch,
             callbacks):
    """Step until total_steps. The data pipeline is one stream repeated as often as needed, so a
    run resumed mid-epoch simply continues; epoch and step numbers derive from the global step."""
    train_step.set_train(True)
    repeats = math.ceil((total_steps - start_step) / steps_per_epoch)
    # Errors raised inside the pipeline (e.g. a corrupt image) come back as one clear ArcFaceError.
    iterator = checked_iterator(dataset.repeat(repeats).create_tuple_iterator(num_epochs=1))
    global_step, state = start_step, None
    if start_step == 0:
        logger.info("compiling the training graph (the first step takes longer)")
    try:
        for images, labels in iterator:
            tick = time.time()
            output = train_step(images, labels)
            loss = float((output[0] if isinstance(output, tuple) else output).asnumpy())
            global_step += 1
            epoch, step_in_epoch = divmod(global_step - 1, steps_per_epoch)
            if not np.isfinite(loss):
                raise ArcFaceError(
                    f"loss is {loss} at epoch {epoch + 1} step {step_in_epoch + 1} (global step {global_step}): "
                    f"training stopped without saving; lower --lr or resume from the last checkpoint")
            state = StepState(epoch + 1, step_in_epoch + 1, global_step, steps_per_epoch, total_steps, loss,
                              float(lr_per_step[global_step - 1]), time.time() - tick, global_batch)
            for cb in callbacks:
                cb.on_step_end(state)
            if state.step_in_epoch == steps_per_epoch:
                for cb in callbacks:
                    cb.on_epoch_end(state)
            if global_step >= total_steps:
                break
    except KeyboardInterrupt:
        # Keep the work done so far: the parameters after the last completed step are consistent.
        if state is not None:
            logger.info(f"interrupted at global step {state.global_step}: saving a checkpoint")
            _finish(callbacks, state)
        raise
    except ArcFaceError:
        _finish(callbacks, None)
        raise
    _finish(callbacks, state)
    return state


def _finish(callbacks, state):
    for cb in callbacks:
        cb.on_train_end(state)
