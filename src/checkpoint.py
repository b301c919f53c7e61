"""Checkpoint files: names, atomic writes, finding the latest, and loading them into networks.

A training checkpoint holds the whole train-step cell (backbone, margin head, optimizer moments,
optimizer global step, loss scale) plus meta entries stored as `meta_<name>` (the prefix keeps
them apart from parameters such as the optimizer's own `global_step`).
"""
import glob
import os
import re

import mindspore as ms

from src.errors import ArcFaceError

CKPT_PREFIX = "ArcFace"
_CKPT_RE = re.compile(rf"^{CKPT_PREFIX}-(\d+)_(\d+)\.ckpt$")
META_PREFIX = "meta_"
META_KEYS = ("epoch", "step_in_epoch", "global_step")
# Written with every training checkpoint so evaluation and export rebuild the right backbone.
MODEL_KEYS = ("network", "width", "num_features")
# Rebuilt from the config on every start, so a resumed run may change --epochs or --lr.
NOT_RESTORED = ("learning_rate",)
# Loss-scaling state: absent from fp32 checkpoints, so an fp32 run can resume with fp16 (defaults).
OPTIONAL = ("scale_sense", "current_iterator_step", "last_overflow_iterator_step")


def checkpoint_name(epoch, step_in_epoch):
    return f"{CKPT_PREFIX}-{epoch}_{step_in_epoch}.ckpt"


def list_checkpoints(directory):
    """Training checkpoints in `directory`, oldest first (ordered by epoch, then step)."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(directory), f"{CKPT_PREFIX}-*.ckpt")):
        match = _CKPT_RE.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), int(match.group(2)), path))
    return [path for _, _, path in sorted(found)]


def latest_checkpoint(directory, usable=None):
    """The newest checkpoint in `directory` (for which `usable(path)` holds, when given)."""
    found = list_checkpoints(directory)
    if not found:
        raise ArcFaceError(f"no {CKPT_PREFIX}-*.ckpt checkpoint in {directory}")
    for path in reversed(found):
        if usable is None or usable(path):
            return path
    raise ArcFaceError(f"none of the {len(found)} checkpoints in {directory} is complete")


def remove_checkpoint(path):
    """Delete a checkpoint and the Partial FC head shards written next to it."""
    stem = path[:-len(".ckpt")]
    for victim in [path] + glob.glob(glob.escape(stem) + ".head-r*of*.ckpt"):
        try:
            os.remove(victim)
        except FileNotFoundError:  # another rank pruned its shard first
            pass


def save_checkpoint_atomic(cell, path, meta=None):
    """Write to a hidden temporary file in the same folder, then rename: a crash during the save
    leaves the previous checkpoint intact and no half-written file under the final name."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{name}")
    try:
        meta = {META_PREFIX + key: value for key, value in (meta or {}).items()}
        ms.save_checkpoint(cell, tmp, append_dict=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path):
    """(parameter dict, meta dict) with a clear error for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise ArcFaceError(f"checkpoint not found: {path}")
    try:
        params = ms.load_checkpoint(path)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ArcFaceError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    meta = {}
    for key in META_KEYS + MODEL_KEYS:
        if META_PREFIX + key in params:
            value = params.pop(META_PREFIX + key)
            meta[key] = value if isinstance(value, str) else int(value.asnumpy())
    return params, meta


def _check_shapes(cell, params, path):
    for param in cell.get_parameters():
        name = param.name
        if name in params and tuple(params[name].shape) != tuple(param.shape):
            raise ArcFaceError(
                f"checkpoint {path} does not fit this model: {name} has shape {tuple(params[name].shape)} "
                f"there and {tuple(param.shape)} here (another --network or --num_classes?)")


def load_train_state(train_cell, path):
    """Restore everything for --resume; returns the meta dict (epoch, step_in_epoch, global_step, ...)."""
    params, meta = read_checkpoint(path)
    if "global_step" not in meta:
        raise ArcFaceError(f"{path} is not a training checkpoint of this project (no global_step): "
                           f"use --ckpt_url to initialise from it instead")
    for key in [k for k in params if k.endswith(NOT_RESTORED)]:
        params.pop(key)
    _check_shapes(train_cell, params, path)
    ms.load_param_into_net(train_cell, params)
    missing = [p.name for p in train_cell.get_parameters()
               if p.name not in params and not p.name.endswith(NOT_RESTORED + OPTIONAL)]
    if missing:
        raise ArcFaceError(f"checkpoint {path} lacks {len(missing)} parameter(s) of this model, "
                           f"e.g. {missing[0]} (another --network?)")
    return meta


def backbone_params(params, backbone):
    """The backbone's entries of a checkpoint, whatever prefix the training cell gave them."""
    own = {p.name for p in backbone.get_parameters()}
    selected = {}
    for key, value in params.items():
        for prefix in ("", "backbone.", "network.backbone.", "_backbone."):
            if key.startswith(prefix) and key[len(prefix):] in own:
                selected[key[len(prefix):]] = value
                break
    return selected


def load_backbone(backbone, path, params=None):
    """Load a backbone from a training checkpoint (head and optimizer entries are ignored) or from a
    backbone-only checkpoint. Errors name what does not match."""
    if params is None:
        params, _ = read_checkpoint(path)
    selected = backbone_params(params, backbone)
    _check_shapes(backbone, selected, path)
    missing = [p.name for p in backbone.get_parameters() if p.name not in selected]
    if missing:
        raise ArcFaceError(f"checkpoint {path} does not hold this backbone: {len(missing)} parameter(s) "
                           f"missing, e.g. {missing[0]} (trained with another --network?)")
    ms.load_param_into_net(backbone, selected)
    return selected
