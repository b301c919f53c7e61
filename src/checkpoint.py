"""Checkpoint files: names, listing, writing, reading, and loading a backbone from them.

A training checkpoint `ArcFace-<epoch>_<step>.ckpt` holds the parameters of the train-step cell
(backbone, optimizer moments, optimizer global step, loss scale and, for a run on one rank, the
classification head) plus meta entries stored as `meta_<name>`: the epoch/step, the backbone's
name/width/embedding size (read by evaluation and export) and `config`, the run's resolved
configuration as yaml. The prefix keeps them apart from parameters such as the optimizer's own
`global_step`. A run on several ranks also writes head shard files next to it (src.heads.sharding).
"""
import glob
import os
import re

import mindspore as ms
import numpy as np

from src.errors import ArcFaceError
from src.files import atomic_path

CKPT_PREFIX = "ArcFace"
_CKPT_RE = re.compile(rf"^{CKPT_PREFIX}-(\d+)_(\d+)\.ckpt$")
META_PREFIX = "meta_"
# Written with every training checkpoint so evaluation and export rebuild the right backbone.
MODEL_KEYS = ("network", "width", "num_features")


def checkpoint_name(epoch, step_in_epoch):
    return f"{CKPT_PREFIX}-{epoch}_{step_in_epoch}.ckpt"


def checkpoint_position(path):
    """(epoch, step_in_epoch) from a checkpoint's name, or None for other names."""
    match = _CKPT_RE.match(os.path.basename(path))
    return (int(match.group(1)), int(match.group(2))) if match else None


def list_checkpoints(directory):
    """Training checkpoints in `directory`, oldest first (ordered by epoch, then step)."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(directory), f"{CKPT_PREFIX}-*.ckpt")):
        position = checkpoint_position(path)
        if position:
            found.append((position, path))
    return [path for _, path in sorted(found)]


def _values(entries):
    """(name, numpy value) of what ms.save_checkpoint is given: a Cell or a list of {name, data}."""
    if isinstance(entries, ms.nn.Cell):
        return ((p.name, p.asnumpy()) for p in entries.get_parameters())
    return ((e["name"], e["data"].asnumpy() if hasattr(e["data"], "asnumpy") else np.asarray(e["data"]))
            for e in entries)


def non_finite_entries(entries):
    """Names of floating-point entries holding NaN or Inf."""
    return [name for name, value in _values(entries)
            if value.dtype.kind == "f" and not np.isfinite(value).all()]


def save_checkpoint_atomic(entries, path, meta=None):
    """Write a checkpoint of `entries` (a Cell or a list of {"name", "data"}) with `meta` entries,
    atomically (src.files: a crash leaves the previous checkpoint intact, a full disk is one error).

    Refuses entries holding NaN/Inf: a diverged run must never replace good checkpoints."""
    bad = non_finite_entries(entries)
    if bad:
        raise ArcFaceError(f"not saving {os.path.basename(path)}: {len(bad)} parameter(s) hold NaN/Inf "
                           f"(e.g. {bad[0]}); the run diverged, lower --lr or resume from an earlier checkpoint")
    if not path.endswith(".ckpt"):
        raise ArcFaceError(f"{path}: a checkpoint's name must end with .ckpt")
    meta = {META_PREFIX + key: value for key, value in (meta or {}).items()}
    with atomic_path(path, note="; the earlier checkpoints are intact") as tmp:
        ms.save_checkpoint(entries, tmp, append_dict=meta)


def _meta_value(value):
    if isinstance(value, str):
        return value
    array = value.asnumpy()
    return array.item() if array.dtype.kind == "f" else int(array)


def read_checkpoint(path, meta_only=False):
    """(parameter dict, meta dict) with a clear error for a missing or unreadable file. With
    meta_only the parameters are not loaded (the dict is empty)."""
    if not os.path.isfile(path):
        raise ArcFaceError(f"checkpoint not found: {path}")
    choice = (lambda name: name.startswith(META_PREFIX)) if meta_only else None
    try:
        params = ms.load_checkpoint(path, choice_func=choice)
    except (ValueError, RuntimeError, OSError, TypeError) as exc:
        if meta_only and "empty after filter" in str(exc):
            return {}, {}  # a readable checkpoint without meta entries (written by other software)
        raise ArcFaceError(f"cannot read checkpoint {path}: {str(exc).strip().splitlines()[0]}") from None
    meta = {key[len(META_PREFIX):]: _meta_value(params.pop(key)) for key in list(params)
            if key.startswith(META_PREFIX)}
    return params, meta


def check_shapes(cell, params, path):
    for param in cell.get_parameters():
        name = param.name
        if name in params and tuple(params[name].shape) != tuple(param.shape):
            raise ArcFaceError(
                f"checkpoint {path} does not fit this model: {name} has shape {tuple(params[name].shape)} "
                f"there and {tuple(param.shape)} here (another --network or --num_classes?)")


_BACKBONE_PREFIXES = ("network.backbone.", "_backbone.", "backbone.")


def bare_name(name):
    """A backbone parameter's name without the prefix its parent cell gives it."""
    for prefix in _BACKBONE_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def backbone_params(params, backbone):
    """The backbone's entries of a checkpoint, whatever prefix the training cell gave them there or
    the backbone's parent cell gives them here; keyed by the backbone's own parameter names."""
    own = {bare_name(p.name): p.name for p in backbone.get_parameters()}
    return {own[bare_name(key)]: value for key, value in params.items() if bare_name(key) in own}


def load_backbone(backbone, path, params=None):
    """Load a backbone from a training checkpoint (head and optimizer entries are ignored) or from a
    backbone-only checkpoint. Errors name what does not match."""
    if params is None:
        params, _ = read_checkpoint(path)
    selected = backbone_params(params, backbone)
    check_shapes(backbone, selected, path)
    missing = [p.name for p in backbone.get_parameters() if p.name not in selected]
    if missing:
        raise ArcFaceError(f"checkpoint {path} does not hold this backbone: {len(missing)} parameter(s) "
                           f"missing, e.g. {missing[0]} (trained with another --network?)")
    ms.load_param_into_net(backbone, selected)
    return selected


def newest_readable(directory, usable=None, log=None, skipped=None):
    """(path, params, meta) of the newest checkpoint in `directory` that can be read (and for which
    `usable(path, params)` holds). An unreadable one (truncated by a crash, a power loss) is
    reported through `log`, added to the list `skipped` and passed over."""
    found = list_checkpoints(directory)
    if not found:
        raise ArcFaceError(f"no {CKPT_PREFIX}-*.ckpt checkpoint in {directory}")
    for path in reversed(found):
        try:
            params, meta = read_checkpoint(path)
        except ArcFaceError as exc:
            if log:
                log(f"warning: skipping an unreadable checkpoint: {exc}")
            if skipped is not None:
                skipped.append(path)
            continue
        if usable is None or usable(path, params):
            return path, params, meta
        if skipped is not None:
            skipped.append(path)
    raise ArcFaceError(f"none of the {len(found)} checkpoints in {directory} can be used")


def read_checkpoint_or_newest(path, log=None):
    """(path, params, meta) of a checkpoint file, or of the newest readable one of a training folder."""
    if os.path.isdir(path):
        return newest_readable(path, log=log)
    params, meta = read_checkpoint(path)
    return path, params, meta
