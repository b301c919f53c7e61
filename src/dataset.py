"""Training data sources and the `mindspore.dataset` pipeline built on them.

Three kinds of training folder are accepted (`detect_kind`):
- a RecordIO folder (`train.rec` + `train.idx` [+ `property`]), read by `src.recordio`;
- an ImageFolder: one sub-folder per identity, numeric folder names sorted numerically;
- a MindRecord folder (`train.mindrecord*` shards + their `.db` files, `property`,
  `class_counts.npy`), as written by `src.mindrecord`.
RecordIO and ImageFolder sources give random access to (encoded image bytes, integer label) and
feed a GeneratorDataset; MindRecord folders are read by MindSpore's own MindDataset. Either way
the pipeline decodes, flips at random, normalises to (x - 127.5) / 127.5 and batches, with
parallel workers, and shards by rank in distributed training.

Undecodable images. Errors raised inside a MindSpore pipeline arrive as RuntimeErrors: iterate
through `checked_iterator`, which turns them back into one-line ArcFaceErrors.
- skip_corrupt=False: a RecordIO/ImageFolder image failing a cheap completeness check (format
  signature and end marker; no decoding) that OpenCV cannot decode either stops training with an
  ArcFaceError naming the file and the record key/offset. MindRecord folders are decoded by
  MindSpore alone, with no Python per sample (src.mindrecord decoded every image when writing);
  a decode failure there names the shard file and points at `datainfo --verify` for the key.
- skip_corrupt=True: every image is decoded with OpenCV while loading (in worker threads) and a
  bad one is replaced by another (the next one; for MindRecord the previous good one), logged
  once with its file and key.
"""
import logging
import os
import re
import struct

import cv2
import numpy as np

from src.errors import ArcFaceError
from src.recordio import FaceRecordDataset, read_property

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
IMAGE_SIZE = (112, 112)
MINDRECORD_NAME = "train.mindrecord"
CLASS_COUNTS_NAME = "class_counts.npy"
# How far a skip_corrupt source looks for a decodable replacement before giving up.
_MAX_SUBSTITUTES = 1000

logger = logging.getLogger("arcface")


# --------------------------------------------------------------------------------------------
# Encoded images
# --------------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_format(data):
    """'jpeg', 'png' or 'bmp' from the signature of encoded image bytes, else None."""
    head = bytes(data[:8])
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head == _PNG_SIGNATURE:
        return "png"
    if head[:2] == b"BM" and len(data) >= 26:
        return "bmp"
    return None


def image_extension(data):
    """File extension for encoded image bytes: '.jpg', '.png' or '.bmp' ('.jpg' if unknown)."""
    return {"png": ".png", "bmp": ".bmp"}.get(image_format(data), ".jpg")


def check_image_bytes(data):
    """Cheap completeness check without decoding: None if the bytes start with a JPEG/PNG/BMP
    signature and end the way that format ends, else the reason. Trailing zero bytes after a
    JPEG end marker are tolerated (some writers pad files)."""
    fmt = image_format(data)
    if fmt is None:
        head = " ".join(f"{b:02x}" for b in bytes(data[:4]))
        return f"not a JPEG/PNG/BMP image ({len(data)} bytes starting with {head or 'nothing'})"
    if fmt == "jpeg":
        if not bytes(data[-64:]).rstrip(b"\0").endswith(b"\xff\xd9"):
            return f"truncated JPEG: no end marker ({len(data)} bytes)"
    elif fmt == "png":
        if bytes(data[-8:-4]) != b"IEND":
            return f"truncated PNG: no IEND chunk at the end ({len(data)} bytes)"
    else:
        declared = struct.unpack_from("<I", bytes(data[:6]), 2)[0]
        if declared > len(data):
            return f"truncated BMP: header declares {declared} bytes, file has {len(data)}"
    return None


def decode_image(data):
    """Encoded bytes -> HxWx3 uint8 RGB array, or None if OpenCV cannot decode them."""
    if len(data) == 0:
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def image_problem(data):
    """None for a usable image, else why not. Bytes failing the cheap check are decoded before
    being rejected, so an unusual but valid file is never refused."""
    reason = check_image_bytes(data)
    if reason is not None and decode_image(data) is not None:
        return None
    return reason


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _numeric_order(names):
    """All-digit names numerically ('9' before '10'; '01' and '1' by name), others by name."""
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


class ImageFolderSource:
    """One sub-folder per identity. Folder names that are all integers are ordered numerically
    (so '10' follows '9'), others lexicographically; the label is the position in that order
    among the folders holding at least one image, so labels stay contiguous: an empty folder
    is reported (`empty_classes`, a warning) and gets no label. Files without an image
    extension are ignored and listed in `skipped_files`."""

    def __init__(self, root):
        self.root = root
        try:
            names = [d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith(".")]
        except OSError as exc:
            raise ArcFaceError(f"cannot list image folder {root}: {exc.strerror}") from None
        self.classes, self.empty_classes, self.skipped_files = [], [], []
        self.files, labels = [], []
        for name in _numeric_order(names):
            folder = os.path.join(root, name)
            images = []
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                raise ArcFaceError(f"cannot list class folder {folder}: {exc.strerror}") from None
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                    images.append(entry.path)
                else:
                    self.skipped_files.append(entry.path)
            if not images:
                self.empty_classes.append(name)
                continue
            labels.extend([len(self.classes)] * len(images))
            self.classes.append(name)
            self.files.extend(images)
        self._labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.classes)
        if self.empty_classes:
            shown = ", ".join(self.empty_classes[:5]) + (" ..." if len(self.empty_classes) > 5 else "")
            logger.warning(f"{root}: {len(self.empty_classes)} class folder(s) without images skipped "
                           f"(they get no label): {shown}")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        try:
            with open(path, "rb") as fh:
                return fh.read(), int(self._labels[index])
        except OSError as exc:
            raise ArcFaceError(f"cannot read image {path}: {exc.strerror}") from None

    def where(self, index):
        return self.files[index]

    def labels(self):
        return self._labels


def mindrecord_files(path):
    """The MindRecord shard files of a folder (`*.mindrecord*` without the `.db` index files),
    in shard order."""
    try:
        names = [n for n in os.listdir(path) if ".mindrecord" in n and not n.endswith(".db")
                 and not n.startswith(".")]
    except OSError:
        return []

    def order(name):
        stem, _, suffix = name.rpartition(".mindrecord")
        return (stem, int(suffix) if suffix.isdigit() else -1, suffix)
    return [os.path.join(path, n) for n in sorted(names, key=order)]


def mindspore_message(exc):
    """The informative line of a MindSpore RuntimeError (its message is a framed report)."""
    text = str(exc)
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[ERROR]"):
            return line[len("[ERROR]"):].strip()
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


class MindRecordSource:
    """A MindRecord folder written by `src.mindrecord`: shards with an `image` (bytes), `label`
    (int32) and `key` (int64, the record key or image number it came from) column;
    `property` (`num_classes,height,width`) and `class_counts.npy` (images per label) next to
    them. Folders written otherwise need only `image` and `label`; their labels
    are then read from the shards once (slow for large sets).

    Training reads the shards directly with `mindspore.dataset.MindDataset`; this object gives
    what the trainer needs before that: `len`, `labels()`, `num_classes`, `image_size`."""

    def __init__(self, root):
        import mindspore.dataset as ds

        self.root = root
        self.files = mindrecord_files(root)
        if not self.files:
            raise ArcFaceError(f"{root}: no MindRecord files (*.mindrecord*)")
        for f in self.files:
            if not os.path.isfile(f + ".db"):
                raise ArcFaceError(f"{f}: its index file {os.path.basename(f)}.db is missing")
        try:
            probe = ds.MindDataset(self.files, shuffle=False)
            columns = probe.get_col_names()
            size = probe.get_dataset_size()
        except RuntimeError as exc:
            raise ArcFaceError(f"{root}: cannot open the MindRecord files: {mindspore_message(exc)}") from None
        missing = [c for c in ("image", "label") if c not in columns]
        if missing:
            raise ArcFaceError(f"{root}: the MindRecord files have no {' or '.join(missing)} column "
                               f"(columns: {', '.join(columns)})")
        self.has_key = "key" in columns
        self._len = int(size)

        self.property_path = os.path.join(root, "property")
        self.image_size = None
        property_classes = None
        if os.path.isfile(self.property_path):
            property_classes, self.image_size = read_property(self.property_path)
        else:
            self.property_path = None

        self._labels = None
        self.counts = None
        counts_path = os.path.join(root, CLASS_COUNTS_NAME)
        if os.path.isfile(counts_path):
            try:
                counts = np.load(counts_path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ArcFaceError(f"{counts_path}: not a readable .npy file ({exc})") from None
            if counts.ndim != 1 or counts.dtype.kind not in "iu" or (counts < 0).any():
                raise ArcFaceError(f"{counts_path}: expected a 1-D array of non-negative image counts")
            if int(counts.sum()) != self._len:
                raise ArcFaceError(f"{counts_path}: counts {int(counts.sum())} images but the MindRecord "
                                   f"files hold {self._len}")
            self.counts = counts.astype(np.int64)
        if property_classes is not None:
            self.num_classes = property_classes
            used = np.flatnonzero(self.counts) if self.counts is not None else np.array([], np.int64)
            if used.size and used[-1] >= property_classes:
                raise ArcFaceError(f"{counts_path}: label {int(used[-1])} is out of range: {self.property_path} "
                                   f"declares {property_classes} classes")
        elif self.counts is not None:
            self.num_classes = len(self.counts)
        else:
            labels = self.labels()
            self.num_classes = int(labels.max()) + 1 if labels.size else 0

    def __len__(self):
        return self._len

    def labels(self):
        """Labels of all images. From `class_counts.npy` they come in label order, which is how the
        rows were written but not necessarily how MindDataset returns them from several shards;
        without it they are read from the shards (slow), in their read order."""
        if self._labels is None:
            if self.counts is not None:
                self._labels = np.repeat(np.arange(len(self.counts), dtype=np.int64), self.counts)
            else:
                logger.warning(f"{self.root}: no {CLASS_COUNTS_NAME}: reading every label from the shards")
                self._labels = np.fromiter((label for _, _, label in self.iter_samples(image=False)),
                                           dtype=np.int64, count=self._len)
                if self._labels.size and self._labels.min() < 0:
                    raise ArcFaceError(f"{self.root}: the MindRecord files hold a negative label "
                                       f"({int(self._labels.min())})")
        return self._labels

    def iter_samples(self, image=True):
        """(key, image bytes or None, label) of every record in stored order; the key is the
        `key` column, or the row number when the files have none."""
        import mindspore.dataset as ds

        columns = (["image"] if image else []) + ["label"] + (["key"] if self.has_key else [])
        dataset = ds.MindDataset(self.files, columns_list=columns, shuffle=False)
        try:
            for row, values in enumerate(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)):
                values = list(values)
                data = values.pop(0).tobytes() if image else None
                label = int(values[0])
                key = int(values[1]) if self.has_key else row
                yield key, data, label
        except RuntimeError as exc:
            raise ArcFaceError(f"{self.root}: cannot read the MindRecord files: {mindspore_message(exc)}") from None

    def where(self, key):
        return f"{self.root}: MindRecord key {key}"


def detect_kind(path):
    """'recordio', 'imagefolder' or 'mindrecord'; a clear error for anything else."""
    if not path:
        raise ArcFaceError("no training data given: pass --data_url DIR")
    if not os.path.isdir(path):
        raise ArcFaceError(f"training data folder not found: {path}")
    has_rec = os.path.isfile(os.path.join(path, "train.rec"))
    has_idx = os.path.isfile(os.path.join(path, "train.idx"))
    has_mindrecord = bool(mindrecord_files(path))
    if has_mindrecord and (has_rec or has_idx):
        raise ArcFaceError(f"{path} holds both RecordIO (train.rec/train.idx) and MindRecord files: "
                           f"keep one kind per folder")
    if has_mindrecord:
        return "mindrecord"
    if has_rec and has_idx:
        return "recordio"
    if has_rec != has_idx:
        missing = "train.idx" if has_rec else "train.rec"
        raise ArcFaceError(f"{path} has {'train.rec' if has_rec else 'train.idx'} but no {missing}")
    if any(d.is_dir() and not d.name.startswith(".") for d in os.scandir(path)):
        return "imagefolder"
    raise ArcFaceError(f"{path} holds neither train.rec/train.idx nor one sub-folder per identity "
                       f"(nor MindRecord files)")


def open_source(path):
    """The source for a training folder, checked to be non-empty and to have labels that fit
    its `property` file."""
    kind = detect_kind(path)
    if kind == "recordio":
        source = FaceRecordDataset(path)
        source.check_labels()
    elif kind == "mindrecord":
        source = MindRecordSource(path)
    else:
        source = ImageFolderSource(path)
    if len(source) == 0:
        raise ArcFaceError(f"training data {path} contains no images")
    source.kind = kind
    return source


def resolve_num_classes(source, requested, path=""):
    """The dataset's own count when `requested` is 0; an error when the labels do not fit."""
    labels = source.labels()
    if labels.min() < 0:
        raise ArcFaceError(f"training data {path} has a negative label ({labels.min()})")
    needed = int(labels.max()) + 1
    own = max(int(source.num_classes or 0), needed)
    if requested and requested < needed:
        raise ArcFaceError(f"--num_classes {requested} is smaller than the labels in {path} "
                           f"(largest label {needed - 1}, so at least {needed} classes)")
    return requested or own


def source_where(source, index):
    """File and record of the index-th image of a random-access source, for messages."""
    where = getattr(source, "where", None)
    return where(index) if where is not None else f"image {index}"


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


class _Samples:
    """GeneratorDataset source over a random-access source.

    Without skip_corrupt: encoded bytes as a uint8 array and an int32 label; bytes that fail
    the cheap completeness check and do not decode raise an ArcFaceError naming the record.
    With skip_corrupt: the decoded RGB image (OpenCV) and the label; an unreadable or
    undecodable record is logged once and replaced by the next usable one."""

    def __init__(self, source, skip_corrupt=False):
        self.source = source
        self.skip_corrupt = skip_corrupt
        self._bad = set()

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        index = int(index)
        if not self.skip_corrupt:
            data, label = self.source[index]
            reason = image_problem(data)
            if reason is not None:
                raise ArcFaceError(f"{source_where(self.source, index)}: {reason}; train with --skip_corrupt to "
                                   f"skip such images, or list them all with python -m src.datainfo --verify")
            return np.frombuffer(data, dtype=np.uint8), np.int32(label)
        n = len(self.source)
        for step in range(min(n, _MAX_SUBSTITUTES)):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                data, label = self.source[j]
                image = decode_image(data)
                reason = None if image is not None else (check_image_bytes(data) or "cannot be decoded")
            except ArcFaceError as exc:
                image, reason = None, str(exc)
            if image is not None:
                return image, np.int32(label)
            self._bad.add(j)
            logger.warning(f"skipping a corrupt image: {source_where(self.source, j)}: {reason}")
        raise ArcFaceError(f"no decodable image among {min(n, _MAX_SUBSTITUTES)} images from "
                           f"{source_where(self.source, index)} on")


class _MindRecordGuard:
    """Map operation for MindRecord rows with skip_corrupt: decodes with OpenCV and replaces an
    undecodable image by the last good sample (logged once per key)."""

    def __init__(self, source, fallback):
        self.source = source
        self.last = fallback  # (RGB image, int32 label) used until a good sample has been seen
        self._bad = set()

    def __call__(self, image, label, key):
        data = image.tobytes()
        decoded = decode_image(data)
        if decoded is None:
            k = int(key)
            if k not in self._bad:
                self._bad.add(k)
                logger.warning(f"skipping a corrupt image: {self.source.where(k)}: "
                               f"{check_image_bytes(data) or 'cannot be decoded'}")
            decoded, label = self.last
        else:
            self.last = (decoded, label)
        return decoded, label, key


def _first_decodable(source, path, skip_corrupt):
    """(HxW, RGB image, label) of the first image; with skip_corrupt the first decodable one."""
    def samples():
        if getattr(source, "kind", None) == "mindrecord":
            for key, data, label in source.iter_samples():
                yield source.where(key), data, label, None
            return
        for i in range(len(source)):
            try:
                data, label = source[i]
            except ArcFaceError as exc:
                if not skip_corrupt:
                    raise
                yield source_where(source, i), None, None, str(exc)
                continue
            yield source_where(source, i), data, label, None

    for count, (where, data, label, error) in enumerate(samples()):
        image = decode_image(data) if data is not None else None
        if image is not None:
            return image.shape[:2], image, np.int32(label)
        reason = error or check_image_bytes(data) or "cannot be decoded"
        if not skip_corrupt:
            raise ArcFaceError(f"{where}: the first image of {path} cannot be decoded ({reason})")
        logger.warning(f"skipping a corrupt image: {where}: {reason}")
        if count + 1 >= _MAX_SUBSTITUTES:
            break
    raise ArcFaceError(f"training data {path}: no decodable image among the first ones")


def create_train_dataset(source, batch_size, rank=0, group_size=1, num_workers=4, shuffle=True,
                         path="", skip_corrupt=False):
    """Batches of (float32 NCHW images in [-1, 1], int32 labels), drop_remainder, sharded by rank.

    Iterate it through `checked_iterator` so a bad record stops training with an ArcFaceError.
    `skip_corrupt=True` decodes with OpenCV while loading and replaces undecodable images."""
    import mindspore.dataset as ds
    import mindspore.dataset.vision as vision

    per_shard = len(source) // group_size
    if per_shard < batch_size:
        raise ArcFaceError(f"training data {path} has {len(source)} images, {per_shard} per device: "
                           f"fewer than one batch of {batch_size}")
    workers = max(1, min(num_workers, os.cpu_count() or 1))
    shard = {"num_shards": group_size, "shard_id": rank} if group_size > 1 else {}
    decoded = skip_corrupt
    if getattr(source, "kind", None) == "mindrecord":
        size = source.image_size
        fallback = None
        if skip_corrupt or size is None:
            size, image, label = _first_decodable(source, path, skip_corrupt)
            fallback = (image, label)
        columns = ["image", "label"] + (["key"] if skip_corrupt and source.has_key else [])
        dataset = ds.MindDataset(source.files, columns_list=columns, shuffle=shuffle,
                                 num_parallel_workers=workers, **shard)
        if skip_corrupt:
            guard = _MindRecordGuard(source, fallback)
            if not source.has_key:
                guard_call = guard
                guard = lambda image, label: guard_call(image, label, np.int64(-1))[:2]  # noqa: E731
            dataset = dataset.map(operations=guard, input_columns=columns, output_columns=columns,
                                  num_parallel_workers=workers)
            dataset = dataset.project(["image", "label"])
    else:
        size = _first_decodable(source, path, skip_corrupt)[0]
        dataset = ds.GeneratorDataset(_Samples(source, skip_corrupt), column_names=["image", "label"],
                                      shuffle=shuffle, python_multiprocessing=False,
                                      num_parallel_workers=workers if skip_corrupt else 1, **shard)
    transforms = [] if decoded else [vision.Decode()]
    if tuple(size) != IMAGE_SIZE:
        transforms.append(vision.Resize(IMAGE_SIZE))
    transforms += [vision.RandomHorizontalFlip(0.5),
                   vision.Normalize(mean=[127.5] * 3, std=[127.5] * 3),
                   vision.HWC2CHW()]
    dataset = dataset.map(operations=transforms, input_columns="image", num_parallel_workers=workers)
    return dataset.batch(batch_size, drop_remainder=True)


_ARCFACE_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?ArcFaceError: (.+)$", re.MULTILINE)
_DATA_FILE = re.compile(r"The corresponding data file is: (.+?)\.\s")


def pipeline_error(exc):
    """The ArcFaceError behind a RuntimeError raised by a MindSpore data pipeline, or None.

    MindSpore reports an exception raised in a Python source or map operation as a
    RuntimeError carrying its traceback text; the original message is recovered from it. A
    failure of MindSpore's own image decoder becomes an error naming the data file."""
    text = str(exc)
    found = _ARCFACE_ERROR_LINE.findall(text)
    if found:
        return ArcFaceError(found[-1].strip())
    if "Decode" in text and "failed" in text:
        match = _DATA_FILE.search(text)
        where = match.group(1) if match else "the training data"
        return ArcFaceError(f"{where}: an image cannot be decoded ({mindspore_message(exc)}); list the bad "
                            f"records with python -m src.datainfo --verify DIR, or train with --skip_corrupt")
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


def parallel_map(func, items, workers):
    """func(item) for every item in `workers` threads, yielding results in input order with a
    bounded number in flight (for I/O and for OpenCV, which releases the GIL). An exception
    cancels the items not started yet and propagates."""
    if workers <= 1:
        for item in items:
            yield func(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        try:
            for item in items:
                pending.append(pool.submit(func, item))
                if len(pending) >= 4 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
