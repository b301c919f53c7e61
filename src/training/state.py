"""The training state on disk: one writer and one restore path for every configuration.

Rank 0 writes the checkpoint (everything the ranks have in common); the head writes its rank-local
state next to it (nothing on one rank, see src.heads.sharding). Restoring reads the checkpoint and
lets the head take its rows from wherever they were stored, on any number of ranks.
"""
import contextlib
import glob
import logging
import os

import mindspore as ms
import numpy as np

from src.checkpoint import (
    check_shapes,
    checkpoint_name,
    checkpoint_position,
    list_checkpoints,
    load_backbone,
    newest_readable,
    read_checkpoint,
    save_checkpoint_atomic,
)
from src.errors import ArcFaceError
from src.heads import sharding

logger = logging.getLogger("arcface")

# The per-step rate table that checkpoints of earlier versions hold: the schedule is rebuilt from the
# config on every start (so a resumed run may change --epochs or --lr), never read from a file.
NOT_RESTORED = ("learning_rate",)
# Loss-scaling state: absent from fp32 checkpoints, so an fp32 run can resume with fp16 (defaults).
OPTIONAL = ("scale_sense", "current_iterator_step", "last_overflow_iterator_step")


class CheckpointWriter:
    """Writes `ArcFace-<epoch>_<step>.ckpt` (rank 0) and the head state (every rank), keeping the
    newest `keep` checkpoints. `meta` (model description, run record) goes into every file."""

    def __init__(self, train_cell, head, directory, keep=5, meta=None, is_main=True):
        self.cell, self.head, self.directory, self.keep = train_cell, head, directory, keep
        self.meta, self.is_main = dict(meta or {}), is_main
        local = set(head.rank_local_names(train_cell))
        # References to the live parameters: their values are read when a file is written.
        self.entries = [{"name": p.name, "data": p} for p in train_cell.get_parameters() if p.name not in local]
        os.makedirs(directory, exist_ok=True)

    def write(self, path, position, head_state=True):
        """Write the state as `path` (and the head shards unless not wanted); `position` =
        {epoch, step_in_epoch, global_step}."""
        meta = dict(position, **self.meta)
        if self.is_main:
            save_checkpoint_atomic(self.entries, path, meta)
        if head_state:
            self.head.save_state(self.cell, path, meta)

    def save(self, position):
        """A numbered checkpoint, then pruning of the oldest (never the one just written)."""
        path = os.path.join(self.directory, checkpoint_name(position["epoch"], position["step_in_epoch"]))
        self.write(path, position)
        if self.is_main:
            for old in list_checkpoints(self.directory)[:-self.keep]:
                if old != path:
                    remove_checkpoint(old)
        # Every rank prunes its own shards too: on a node of its own, rank 0 cannot see them.
        suffix = f".head-r{self.head.rank}of{self.head.world_size}.ckpt"
        own = []
        for shard in glob.glob(os.path.join(glob.escape(self.directory), f"*{suffix}")):
            position_of = checkpoint_position(shard[:-len(suffix)] + ".ckpt")
            if position_of:
                own.append((position_of, shard))
        for _, shard in sorted(own)[:-self.keep]:
            if shard != sharding.shard_path(path, self.head.rank, self.head.world_size):
                _remove(shard)
        return path


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:  # another rank removed it first
        pass


def remove_checkpoint(path):
    """Delete a checkpoint and the head shards written next to it."""
    for victim in [path] + sharding.shard_files_of(path):
        _remove(victim)


def latest_resumable(directory, skipped=None):
    """(path, params, meta) of the newest checkpoint in `directory` that can be read and whose head
    state is complete (inside it, or a full set of shards next to it); newer ones are skipped with
    a warning (a truncated file, a rank killed before writing its shard) and listed in `skipped`."""
    def complete(path, params):
        if "head.weight" in params or sharding.complete_shard_sets(path):
            return True
        logger.warning(f"{os.path.basename(path)}: its head shards are incomplete, trying an older checkpoint")
        return False
    return newest_readable(directory, usable=complete, log=logger.warning, skipped=skipped)


def set_aside(path):
    """Rename a checkpoint that cannot be resumed (and its shards) to `<name>.unusable`, so that it
    neither counts as the newest one nor gets pruned as an old one; nothing is deleted."""
    for victim in [path] + sharding.shard_files_of(path):
        if os.path.exists(victim):
            os.replace(victim, victim + ".unusable")


def restore(train_cell, head, path, params=None, meta=None):
    """--resume: every parameter of the train step (backbone, head, optimizer state, step, loss scale)
    from `path` and, for the head, its shard files. Returns the checkpoint's meta dict."""
    if params is None:
        params, meta = read_checkpoint(path)
    if "global_step" not in meta:
        raise ArcFaceError(f"{path} is not a training checkpoint of this project (no global_step): "
                           f"use --ckpt_url to initialise from it instead")
    head_names = set(head.state_names(train_cell))
    common = {k: v for k, v in params.items() if k not in head_names and not k.endswith(NOT_RESTORED)}
    check_shapes(train_cell, common, path)
    refuse_non_finite(params, path)
    missing = [p.name for p in train_cell.get_parameters()
               if p.name not in common and p.name not in head_names and not p.name.endswith(NOT_RESTORED + OPTIONAL)]
    if missing:
        raise ArcFaceError(f"checkpoint {path} lacks {len(missing)} parameter(s) of this model, "
                           f"e.g. {missing[0]} (another --network?)")
    # The head's entries are loaded below, from wherever they were stored: MindSpore's warning that
    # they "are not loaded" here would be false (what is really missing was checked above).
    with _mindspore_warnings_off():
        ms.load_param_into_net(train_cell, common)
    head.load_state(train_cell, path, params)
    return meta


@contextlib.contextmanager
def _mindspore_warnings_off():
    from mindspore import log
    logger = log._get_logger()  # MindSpore has no public handle on its logger
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def refuse_non_finite(params, path):
    """A checkpoint whose parameters hold NaN/Inf (a diverged run saved by other software) would start
    a run that diverges at once and blames the learning rate: refuse it, naming it."""
    bad = [name for name, value in params.items()
           if hasattr(value, "asnumpy") and value.dtype in (ms.float16, ms.float32, ms.float64, ms.bfloat16)
           and not np.isfinite(value.asnumpy().astype(np.float32)).all()]
    if bad:
        raise ArcFaceError(f"checkpoint {path} holds NaN/Inf in {len(bad)} parameter(s), e.g. {bad[0]}: it comes "
                           f"from a diverged run; use an earlier checkpoint")


def initialise(net, path):
    """--ckpt_url: the backbone from any checkpoint holding it, the head's centres too when the
    checkpoint has a head of the same number of classes (its optimizer state is not taken)."""
    params, _ = read_checkpoint(path)
    refuse_non_finite(params, path)
    load_backbone(net.backbone, path, params)
    head = net.head
    try:
        head.load_state(net, path, params)
        logger.info(f"initialised the backbone and the head from {path}")
    except ArcFaceError as exc:
        logger.info(f"initialised the backbone from {path}; the head starts afresh ({exc})")
