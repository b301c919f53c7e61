"""The training pipeline on any source: read -> decode (+ resize to 112x112 when needed) -> random
horizontal flip -> normalise to (x - 127.5) / 127.5 -> NCHW -> batches, sharded by rank.

Decoding runs in the map's parallel workers (threads: OpenCV releases the GIL) for every kind of
source. Errors raised inside a MindSpore pipeline arrive as RuntimeErrors: iterate through
`checked_iterator`, which turns them back into one-line ArcFaceErrors.
- skip_corrupt=False: an undecodable sample stops training with an ArcFaceError naming its file
  and record.
- skip_corrupt=True: it is replaced by the last good sample of the pipeline and logged once.
"""
import logging
import os
import re

import numpy as np

from src.data.images import IMAGE_SIZE, decode_image, resize
from src.data.sources import scan
from src.errors import ArcFaceError

logger = logging.getLogger("arcface")
# How far a skip_corrupt pipeline looks for a first decodable sample before giving up.
MAX_SUBSTITUTES = 1000


class Decoder:
    """Map operation (data, label, index) -> (RGB image at 112x112, label)."""

    def __init__(self, source, skip_corrupt=False, fallback=None):
        self.source = source
        self.skip_corrupt = skip_corrupt
        self.last = fallback  # (image, label) used in place of a bad sample
        self._reported = set()

    def __call__(self, data, label, index):
        image = decode_image(data.tobytes()) if data.size else None
        if image is not None:
            image = resize(image, IMAGE_SIZE)
            self.last = (image, label)
            return image, label
        reason = self.source.problem(int(index), data.tobytes())
        if not self.skip_corrupt:
            raise ArcFaceError(f"{reason}; train with --skip_corrupt to skip such images, or list them all with "
                               f"python -m src.datainfo --verify")
        if int(index) not in self._reported:
            self._reported.add(int(index))
            logger.warning(f"skipping a corrupt image: {reason}")
        return self.last


def first_good_sample(source, path):
    """(image, int32 label) of the first decodable sample, the stand-in until the pipeline has seen
    a good one."""
    for count, sample in enumerate(scan(source, workers=1)):
        if sample.image is not None:
            return resize(sample.image, IMAGE_SIZE), np.int32(sample.label)
        logger.warning(f"skipping a corrupt image: {sample.problem}")
        if count + 1 >= MAX_SUBSTITUTES:
            break
    raise ArcFaceError(f"training data {path}: no decodable image among the first {MAX_SUBSTITUTES}")


def create_train_dataset(source, batch_size, rank=0, group_size=1, num_workers=4, shuffle=True, skip_corrupt=False):
    """Batches of (float32 NCHW images in [-1, 1], int32 labels), drop_remainder, sharded by rank."""
    import mindspore.dataset.vision as vision

    per_shard = len(source) // group_size
    if per_shard < batch_size:
        raise ArcFaceError(f"training data {source.path} has {len(source)} images, {per_shard} per device: "
                           f"fewer than one batch of {batch_size}")
    workers = max(1, min(num_workers, os.cpu_count() or 1))
    fallback = first_good_sample(source, source.path) if skip_corrupt else None
    dataset = source.dataset(num_shards=group_size, shard_id=rank, shuffle=shuffle, workers=workers)
    dataset = dataset.map(operations=Decoder(source, skip_corrupt, fallback), input_columns=["data", "label", "index"],
                          output_columns=["image", "label"], num_parallel_workers=workers)
    dataset = dataset.map(operations=[vision.RandomHorizontalFlip(0.5),
                                      vision.Normalize(mean=[127.5] * 3, std=[127.5] * 3),
                                      vision.HWC2CHW()],
                          input_columns="image", num_parallel_workers=workers)
    return dataset.batch(batch_size, drop_remainder=True)


_ARCFACE_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?ArcFaceError: (.+)$", re.MULTILINE)


def pipeline_error(exc):
    """The ArcFaceError behind a RuntimeError raised by a MindSpore data pipeline, or None.

    MindSpore reports an exception raised in a Python source or map operation as a RuntimeError
    carrying its traceback text; the original message is recovered from it."""
    found = _ARCFACE_ERROR_LINE.findall(str(exc))
    if found:
        return ArcFaceError(found[-1].strip())
    return None


def checked_iterator(iterator):
    """Iterate a dataset iterator, turning pipeline failures caused by the data into ArcFaceErrors."""
    try:
        yield from iterator
    except RuntimeError as exc:
        error = pipeline_error(exc)
        if error is None:
            raise
        raise error from None
