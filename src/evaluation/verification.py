"""The standard 10-fold face-verification protocol (LFW style) on pair embeddings.

For every pair the distance is the squared L2 distance between the two l2-normalised
embeddings (so it lies in [0, 4]); a pair is predicted "same" iff its distance is below a
threshold.  The pairs are split into ``nfolds`` contiguous folds (``KFold`` without shuffling);
for each fold the threshold maximising accuracy on the other folds is chosen and the fold is
scored with it.  The reported accuracy is the mean over folds, with the population standard
deviation.  VAL@FAR=1e-3 chooses, per fold, the threshold at which the false-accept rate on the
training folds equals 1e-3 (by linear interpolation) and reports the true-accept rate (VAL) and
false-accept rate on the test fold.

"Accuracy" uses the embeddings of the images; "Accuracy-Flip" uses the fusion of the embeddings of
each image and of its horizontal flip (``fuse_flips``): by default their normalised sum, as both
references do.  VAL and the per-fold best thresholds are computed on the flip-combined embeddings
when flips are given, otherwise on the plain ones.

The protocol's threshold, as a cosine, is the calibrated threshold of a model
(``calibrated_cosine``); a training run records it next to its best checkpoint
(``write_threshold_record``: threshold.json), and embed.py uses it for that run's models.

The module is independent of the inference engine: ``embed_pairs`` and ``verify_bins`` take an
``embed_fn(batch_float32_nchw) -> (B, D) array`` so a MindSpore network, an ONNX session or a
lookup of precomputed features all go through the same code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import KFold

from src.data.bins import load_bin
from src.errors import ArcFaceError
from src.files import atomic_write

__all__ = [
    "ACC_THRESHOLDS",
    "VAL_THRESHOLDS",
    "FAR_TARGET",
    "VerificationResult",
    "l2_normalize",
    "FLIP_FUSIONS",
    "fuse_flips",
    "calibrated_cosine",
    "THRESHOLD_FILE",
    "file_sha256",
    "write_threshold_record",
    "read_threshold_record",
    "pair_distances",
    "accuracy_folds",
    "val_far_folds",
    "evaluate",
    "format_lines",
    "embed_pairs",
    "load_sets",
    "verify_sets",
    "verify_bins",
]

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3


@dataclass
class VerificationResult:
    """Scores of one verification set.

    ``acc_flip``/``acc_flip_std`` are None when no flipped embeddings were given.
    ``best_thresholds`` holds the accuracy-maximising threshold of every fold (flip-combined
    embeddings when available).
    """

    xnorm: float
    acc: float
    acc_std: float
    acc_flip: float | None
    acc_flip_std: float | None
    val: float
    val_std: float
    far: float
    best_thresholds: np.ndarray


def l2_normalize(x):
    """Row-wise l2 normalisation in float64; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return x / norms


def _fuse_sum(emb, emb_flip):
    """The references' flip fusion: the sum of the two unnormalised features."""
    return emb + emb_flip


def _fuse_norm(emb, emb_flip):
    """AdaFace's (`fuse_features_with_norm`, its default 'pre_norm_vector_add'): each feature
    normalised, multiplied by its own norm, the two summed. Each feature times its norm is the
    feature itself, so this is the sum's direction up to rounding; AdaFace writes it this way because
    its network returns unit features and their norms."""
    total = np.zeros_like(emb)
    for feature in (emb, emb_flip):
        norm = np.linalg.norm(feature, axis=1, keepdims=True)
        total += l2_normalize(feature) * norm
    return total


# How the features of an image and of its horizontal flip are combined (val.py --flip_fusion).
FLIP_FUSIONS = {"sum": _fuse_sum, "norm": _fuse_norm}


def fuse_flips(emb, emb_flip, fusion="sum"):
    """(unit fused features (N, D), their norms before normalising (N,)), in float64: the flip
    fusion `fusion` (FLIP_FUSIONS) of the unnormalised features of images and of their flips."""
    if fusion not in FLIP_FUSIONS:
        raise ArcFaceError(f"unknown flip fusion {fusion!r} (one of: {', '.join(FLIP_FUSIONS)})")
    fused = FLIP_FUSIONS[fusion](np.asarray(emb, dtype=np.float64), np.asarray(emb_flip, dtype=np.float64))
    return l2_normalize(fused), np.linalg.norm(fused, axis=1)


def pair_distances(unit_embeddings):
    """Squared L2 distance between rows ``2k`` and ``2k + 1`` of the (normalised) embeddings."""
    diff = unit_embeddings[0::2] - unit_embeddings[1::2]
    return np.sum(np.square(diff), axis=1)


def _count_below(sorted_values, thresholds):
    """For every threshold, the number of values strictly below it."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def _folds(n_pairs, nfolds):
    return KFold(n_splits=nfolds, shuffle=False).split(np.arange(n_pairs))


def accuracy_folds(dist, issame, nfolds=10, thresholds=ACC_THRESHOLDS):
    """Per-fold test accuracies and chosen thresholds.

    For each fold the accuracy of every threshold on the training folds is computed
    (prediction "same" iff ``dist < threshold``), the first maximum is taken and the test fold
    is scored at that threshold.

    Returns:
        ``(accuracies, best_thresholds)``, both of shape ``(nfolds,)``.
    """
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    accuracies = np.zeros(nfolds)
    best = np.zeros(nfolds)
    for fold, (train, test) in enumerate(_folds(len(dist), nfolds)):
        d_train, s_train = dist[train], issame[train]
        same_sorted = np.sort(d_train[s_train])
        diff_sorted = np.sort(d_train[~s_train])
        tp = _count_below(same_sorted, thresholds)
        tn = len(diff_sorted) - _count_below(diff_sorted, thresholds)
        acc_train = (tp + tn) / float(len(d_train))
        best[fold] = thresholds[int(np.argmax(acc_train))]
        predict = dist[test] < best[fold]
        correct = int(np.sum(predict == issame[test]))
        accuracies[fold] = correct / float(len(test))
    return accuracies, best


def _slinear_at(x, y, target):
    """Evaluate linear interpolation of ``y`` over the non-decreasing ``x`` at ``target``.

    Reproduces ``scipy.interpolate.interp1d(x, y, kind='slinear')`` as it behaved when ``x``
    may contain repeated values (a degree-1 B-spline with knots ``[x0, x..., x_last]``): between
    the last ``x <= target`` and the first ``x > target`` the value is interpolated linearly; at
    ``target == x[-1]`` it is ``y[-1]``, or 0 when the last interval has zero length.
    """
    n = len(x)
    if target >= x[-1]:
        if n >= 2 and x[-2] == x[-1]:
            return 0.0
        return float(y[-1])
    i = int(np.searchsorted(x, target, side="right")) - 1
    i = max(i, 0)
    xa, xb = float(x[i]), float(x[i + 1])
    w = 1.0 / (xb - xa)
    return float(y[i] * (w * (xb - target)) + y[i + 1] * (w * (target - xa)))


def val_far_folds(dist, issame, nfolds=10, far_target=FAR_TARGET, thresholds=VAL_THRESHOLDS):
    """Per-fold VAL and FAR at the threshold giving ``far_target`` on the training folds.

    If the training folds never reach ``far_target`` the threshold is 0 (VAL = FAR = 0).
    A test fold without genuine (impostor) pairs gets VAL (FAR) 0.

    Returns:
        ``(val, far, fold_thresholds)``, each of shape ``(nfolds,)``.
    """
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    val = np.zeros(nfolds)
    far = np.zeros(nfolds)
    chosen = np.zeros(nfolds)
    for fold, (train, test) in enumerate(_folds(len(dist), nfolds)):
        d_train, s_train = dist[train], issame[train]
        n_diff_train = int(np.sum(~s_train))
        if n_diff_train > 0:
            far_train = _count_below(np.sort(d_train[~s_train]), thresholds) / float(n_diff_train)
        else:
            far_train = np.zeros(len(thresholds))
        if np.max(far_train) >= far_target:
            threshold = _slinear_at(far_train, thresholds, far_target)
        else:
            threshold = 0.0
        chosen[fold] = threshold
        predict = dist[test] < threshold
        actual = issame[test]
        n_same, n_diff = int(np.sum(actual)), int(np.sum(~actual))
        true_accept = int(np.sum(predict & actual))
        false_accept = int(np.sum(predict & ~actual))
        val[fold] = true_accept / float(n_same) if n_same else 0.0
        far[fold] = false_accept / float(n_diff) if n_diff else 0.0
    return val, far, chosen


def _check_embeddings(name, emb, n_images):
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] != n_images:
        raise ArcFaceError(
            f"{name} must have shape ({n_images}, D) for {n_images // 2} pairs, got {emb.shape}"
        )
    if emb.shape[1] == 0 or not np.all(np.isfinite(emb)):
        raise ArcFaceError(f"{name} contain NaN/Inf values or are empty")
    return emb


def evaluate(embeddings, issame, embeddings_flip=None, nfolds=10, fusion="sum"):
    """Run the verification protocol.

    Args:
        embeddings: ``(2N, D)`` embeddings; rows ``2k`` and ``2k + 1`` form pair ``k``.
        issame: ``(N,)`` booleans.
        embeddings_flip: optional ``(2N, D)`` embeddings of the horizontally flipped images.
        nfolds: number of folds.
        fusion: how an image's and its flip's features are combined (FLIP_FUSIONS).

    Returns:
        A :class:`VerificationResult`.
    """
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    n_pairs = len(issame)
    emb = _check_embeddings("embeddings", embeddings, 2 * n_pairs)
    nfolds = int(nfolds)
    if nfolds < 2:
        raise ArcFaceError(f"the number of folds must be at least 2, got {nfolds}")
    if n_pairs < nfolds:
        raise ArcFaceError(f"{n_pairs} pairs are not enough for {nfolds}-fold verification")
    raw = [np.asarray(emb, dtype=np.float64)]
    if embeddings_flip is not None:
        emb_flip = _check_embeddings("flipped embeddings", embeddings_flip, 2 * n_pairs)
        if emb_flip.shape != emb.shape:
            raise ArcFaceError(
                f"flipped embeddings shape {emb_flip.shape} differs from {emb.shape}"
            )
        raw.append(np.asarray(emb_flip, dtype=np.float64))

    xnorm = float(np.mean(np.linalg.norm(np.concatenate(raw, axis=0), axis=1)))

    acc, best = accuracy_folds(pair_distances(l2_normalize(raw[0])), issame, nfolds)
    acc_flip = acc_flip_std = None
    final_dist = None
    if len(raw) == 2:
        final_dist = pair_distances(fuse_flips(raw[0], raw[1], fusion)[0])
        accs_flip, best = accuracy_folds(final_dist, issame, nfolds)
        acc_flip, acc_flip_std = float(np.mean(accs_flip)), float(np.std(accs_flip))
    else:
        final_dist = pair_distances(l2_normalize(raw[0]))
    val, far, _ = val_far_folds(final_dist, issame, nfolds)
    return VerificationResult(
        xnorm=xnorm,
        acc=float(np.mean(acc)),
        acc_std=float(np.std(acc)),
        acc_flip=acc_flip,
        acc_flip_std=acc_flip_std,
        val=float(np.mean(val)),
        val_std=float(np.std(val)),
        far=float(np.mean(far)),
        best_thresholds=best,
    )


def format_lines(name, result):
    """The report lines of one set, e.g. ``[lfw]Accuracy-Flip: 0.99817+-0.00273``."""
    lines = [
        f"[{name}]XNorm: {result.xnorm:.5f}",
        f"[{name}]Accuracy: {result.acc:.5f}+-{result.acc_std:.5f}",
    ]
    if result.acc_flip is not None:
        lines.append(f"[{name}]Accuracy-Flip: {result.acc_flip:.5f}+-{result.acc_flip_std:.5f}")
    lines.append(
        f"[{name}]VAL@FAR=1e-3: {result.val:.5f}+-{result.val_std:.5f} (FAR {result.far:.5f})"
    )
    return lines


def _to_input(batch_uint8):
    """uint8 NHWC RGB -> float32 NCHW normalised to [-1, 1]."""
    x = batch_uint8.astype(np.float32)
    x -= 127.5
    x /= 127.5
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def embed_pairs(embed_fn, images_uint8, batch_size, progress=True, flip=True):
    """Embed images and their horizontal flips in fixed-size batches.

    Args:
        embed_fn: ``embed_fn(batch)`` with ``batch`` a float32 ``(batch_size, 3, H, W)`` array
            normalised as ``(x - 127.5) / 127.5``, returning a ``(batch_size, D)`` array.  It is
            always called with exactly ``batch_size`` rows: the last partial batch is padded by
            repeating its last image and the padding outputs are dropped.
        images_uint8: ``(M, H, W, 3)`` uint8 RGB images.
        batch_size: rows per call.
        progress: show a tqdm progress bar.
        flip: also embed the horizontally flipped images.

    Returns:
        ``(emb, emb_flip)`` float32 arrays ``(M, D)``; ``emb_flip`` is None when ``flip`` is False.
    """
    images = np.asarray(images_uint8)
    if images.ndim != 4 or images.shape[3] != 3:
        raise ArcFaceError(f"images must have shape (M, H, W, 3), got {images.shape}")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ArcFaceError(f"batch size must be positive, got {batch_size}")
    n = images.shape[0]
    emb = emb_flip = None

    def run(batch, rows):
        out = np.asarray(embed_fn(_to_input(batch)))
        if out.ndim != 2 or out.shape[0] != batch_size:
            raise ArcFaceError(
                f"the embedding model returned shape {out.shape} for a batch of {batch_size} "
                "images, expected (batch, D)"
            )
        return out[:rows]

    from tqdm import tqdm

    with tqdm(total=n, disable=not progress, desc="embedding", unit="img") as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            batch = images[start:stop]
            rows = stop - start
            if rows < batch_size:
                pad = np.repeat(batch[-1:], batch_size - rows, axis=0)
                batch = np.concatenate([batch, pad], axis=0)
            out = run(batch, rows)
            if emb is None:
                emb = np.empty((n, out.shape[1]), dtype=np.float32)
                if flip:
                    emb_flip = np.empty((n, out.shape[1]), dtype=np.float32)
            emb[start:stop] = out
            if flip:
                emb_flip[start:stop] = run(batch[:, :, ::-1, :], rows)
            bar.update(rows)
    if emb is None:  # no images
        emb = np.empty((0, 0), dtype=np.float32)
        emb_flip = np.empty((0, 0), dtype=np.float32) if flip else None
    return emb, emb_flip


def load_sets(eval_dir, targets, image_size=(112, 112), log=print, progress=True):
    """``{target: (images uint8, issame)}`` for every ``<eval_dir>/<target>.bin`` found; a missing
    file is logged as ``[<target>]missing: <path>`` and skipped."""
    sets = {}
    for target in targets:
        path = os.path.join(eval_dir, f"{target}.bin")
        if not os.path.isfile(path):
            log(f"[{target}]missing: {path}")
            continue
        sets[target] = load_bin(path, image_size=image_size, progress=progress)
    return sets


def verify_sets(embed_fn, sets, batch_size, nfolds=10, log=print, progress=True, fusion="sum"):
    """Run the protocol on loaded sets and log the report lines; returns ``{target: result}``."""
    results = {}
    for target, (images, issame) in sets.items():
        if len(issame) < nfolds:
            raise ArcFaceError(f"{target}: {len(issame)} pairs are not enough for {nfolds}-fold verification")
        emb, emb_flip = embed_pairs(embed_fn, images, batch_size, progress=progress)
        result = evaluate(emb, issame, emb_flip, nfolds=nfolds, fusion=fusion)
        for line in format_lines(target, result):
            log(line)
        results[target] = result
    return results


def verify_bins(embed_fn, eval_dir, targets, batch_size, nfolds=10, image_size=(112, 112), log=print,
                progress=True, fusion="sum"):
    """Evaluate ``<eval_dir>/<target>.bin`` for each target, one set in memory at a time."""
    results = {}
    for target in targets:
        sets = load_sets(eval_dir, [target], image_size, log, progress)
        results.update(verify_sets(embed_fn, sets, batch_size, nfolds, log, progress, fusion))
    return results


# --- the calibrated threshold of a model, and its record next to a training run ---------------------

THRESHOLD_FILE = "threshold.json"


def calibrated_cosine(result):
    """(cosine, squared distance): the protocol's threshold on a set, the mean of the folds'
    accuracy-maximising squared distances d between unit embeddings, as a cosine (d = 2 - 2 cos)."""
    distance = float(np.mean(result.best_thresholds))
    return 1.0 - distance / 2.0, distance


def file_sha256(path):
    """The sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_threshold_record(checkpoint, results, step):
    """Write threshold.json beside `checkpoint` (a run's best.ckpt, just written): the calibrated
    threshold of the first set of `results` ({set: VerificationResult}, in evaluation order), every
    set's, the step and the checkpoint's sha256 (which ties the record to those bytes). Nothing
    without results."""
    if not results:
        return None
    sets = {}
    for name, result in results.items():
        cosine, distance = calibrated_cosine(result)
        sets[name] = {"threshold": cosine, "distance": distance, "accuracy": result.acc_flip,
                      "nfolds": len(result.best_thresholds)}
    first = next(iter(sets))
    record = {"threshold": sets[first]["threshold"], "set": first, "accuracy": sets[first]["accuracy"],
              "step": int(step), "checkpoint": os.path.basename(checkpoint), "sha256": file_sha256(checkpoint),
              "sets": sets}
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), THRESHOLD_FILE)
    atomic_write(path, json.dumps(record, indent=1) + "\n")
    return path


def read_threshold_record(path, log=print):
    """The checked content of a threshold.json, or None (with a warning) when it does not hold what it
    should: a cosine in [-1, 1], an accuracy in [0, 1], a step, a set name, the checkpoint's file name
    (beside it) and its sha256."""
    def bad(why):
        log(f"warning: {path} {why}; not used")
        return None

    try:
        if os.path.getsize(path) > 1 << 20:
            return bad("is larger than any threshold record")
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError) as exc:
        return bad(f"cannot be read as JSON ({exc})")
    if not isinstance(record, dict):
        return bad("does not hold a JSON object")

    def number(name, low, high):
        value = record.get(name)
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and low <= value <= high)

    sha = record.get("sha256")
    name = record.get("checkpoint")
    if not (number("threshold", -1.0, 1.0) and number("accuracy", 0.0, 1.0)):
        return bad("does not hold a threshold (a cosine in [-1, 1]) and an accuracy in [0, 1]")
    if not (isinstance(record.get("step"), int) and record["step"] >= 0 and isinstance(record.get("set"), str)):
        return bad("does not hold the step and the set it was calibrated on")
    if not (isinstance(name, str) and name.endswith(".ckpt") and os.path.basename(name) == name
            and isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        return bad("does not name the checkpoint beside it and its sha256")
    return {key: record[key] for key in ("threshold", "accuracy", "step", "set", "checkpoint", "sha256")}
