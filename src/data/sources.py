"""The kinds of training data besides RecordIO (src.data.face_rec), opening a folder by its kind,
and the one decode/verify loop every data tool uses.

Kinds of folder (`detect_kind`), each a src.data.source.Source:
- RecordIO: `train.rec` + `train.idx` [+ `property`], read by src.data.face_rec;
- ImageFolder: one sub-folder per identity, all-digit names sorted numerically;
- MindRecord: `train.mindrecord*` shards + `.db` files, `property`, `class_counts.npy`
  (written by src.mindrecord).

`scan(source)` reads and decodes the samples for datainfo --verify, pack_rec, mindrecord and
rec2jpg, which share one policy for the samples they cannot use (`BadSamples`). Decoding for
training happens in src.data.pipeline.
"""
import logging
import os
import sys
from collections import deque
from dataclasses import dataclass

import numpy as np

from src.data.face_rec import FaceRecordDataset, read_property
from src.data.images import IMAGE_EXTENSIONS, decode_image, why_undecodable
from src.data.source import Source
from src.errors import ArcFaceError

MINDRECORD_NAME = "train.mindrecord"
CLASS_COUNTS_NAME = "class_counts.npy"

logger = logging.getLogger("arcface")


# --- ImageFolder ----------------------------------------------------------------------------------

def numeric_order(names):
    """All-digit names numerically ('9' before '10'; '01' and '1' by name), others by name."""
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _entry_is(entry, kind, unknown=False):
    """Whether a directory entry is a folder / regular file (links followed); `unknown` when that cannot
    be told (a symbolic link loop): an image name kept that way is reported when it is read."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError:
        return unknown


class ImageFolderSource(Source):
    """One sub-folder per identity. Folder names that are all integers are ordered numerically
    (so '10' follows '9'), others lexicographically; the label is the position in that order
    among the folders holding at least one image, so labels stay contiguous: an empty folder
    is reported (`empty_classes`, a warning) and gets no label. Files without an image
    extension are ignored and listed in `skipped_files`."""

    kind = "imagefolder"

    def __init__(self, root):
        self.path = self.root = root
        try:
            names = [d.name for d in os.scandir(root) if _entry_is(d, "dir") and not d.name.startswith(".")]
        except OSError as exc:
            raise ArcFaceError(f"cannot list image folder {root}: {exc.strerror}") from None
        self.classes, self.empty_classes, self.skipped_files = [], [], []
        self.files, labels = [], []
        for name in numeric_order(names):
            folder = os.path.join(root, name)
            images = []
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                raise ArcFaceError(f"cannot list class folder {folder}: {exc.strerror}") from None
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.name.lower().endswith(IMAGE_EXTENSIONS) and _entry_is(entry, "file", unknown=True):
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
            shown = ", ".join(map(repr, self.empty_classes[:5])) + (" ..." if len(self.empty_classes) > 5 else "")
            logger.warning(f"{root}: {len(self.empty_classes)} class folder(s) without images skipped "
                           f"(they get no label): {shown}")

    def __len__(self):
        return len(self.files)

    def labels(self):
        return self._labels

    def where(self, index):
        return self.files[index]

    def read(self, index):
        path = self.files[index]
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise ArcFaceError(f"cannot read image {path}: {exc.strerror}") from None

    def byte_sizes(self, enough):
        total = largest = 0
        for path in self.files:
            try:
                size = os.path.getsize(path)
            except OSError:  # unreadable (a link loop): reported when it is read
                continue
            total, largest = total + size, max(largest, size)
            if total >= enough:
                break
        return total, largest

    def check(self, report, progress=False):
        report.line("kind", "imagefolder (one sub-folder per identity)")
        if self.empty_classes:
            report.problem(f"{len(self.empty_classes)} identity folder(s) without images, not trained on (they get "
                           f"no label; e.g. align.py found no face in their photos): "
                           + ", ".join(map(repr, self.empty_classes[:20])))
        if self.skipped_files:
            report.line("other files", f"{len(self.skipped_files)} non-image files ignored, "
                                       f"e.g. {self.skipped_files[0]}")


# --- MindRecord -----------------------------------------------------------------------------------

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


class MindRecordSource(Source):
    """A MindRecord folder written by `src.mindrecord`: shards with an `image` (bytes), `label`
    (int32) and `key` (int64, the record key or image number it came from) column; `property`
    (`num_classes,height,width`) and `class_counts.npy` (images per label) next to them. Folders
    written otherwise need only `image` and `label`; their labels are then read from the shards
    once (slow for large sets). There is no random access: indices are the `key` column (-1 when
    the files have none)."""

    kind = "mindrecord"

    def __init__(self, root):
        import mindspore.dataset as ds

        self.path = self.root = root
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
        property_classes = None
        if os.path.isfile(self.property_path):
            property_classes, self.image_size = read_property(self.property_path)
        else:
            self.property_path = None

        self._labels = None
        self.counts = None
        self.counts_path = os.path.join(root, CLASS_COUNTS_NAME)
        if os.path.isfile(self.counts_path):
            try:
                counts = np.load(self.counts_path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ArcFaceError(f"{self.counts_path}: not a readable .npy file ({exc})") from None
            if counts.ndim != 1 or counts.dtype.kind not in "iu" or (counts < 0).any():
                raise ArcFaceError(f"{self.counts_path}: expected a 1-D array of non-negative image counts")
            if int(counts.sum()) != self._len:
                raise ArcFaceError(f"{self.counts_path}: counts {int(counts.sum())} images but the MindRecord "
                                   f"files hold {self._len}")
            self.counts = counts.astype(np.int64)
        if property_classes is not None:
            self.num_classes = property_classes
            used = np.flatnonzero(self.counts) if self.counts is not None else np.array([], np.int64)
            if used.size and used[-1] >= property_classes:
                raise ArcFaceError(f"{self.counts_path}: label {int(used[-1])} is out of range: {self.property_path} "
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
                self._labels = np.fromiter((label for _, _, label, _ in self._rows(image=False)),
                                           dtype=np.int64, count=self._len)
                if self._labels.size and self._labels.min() < 0:
                    raise ArcFaceError(f"{self.root}: the MindRecord files hold a negative label "
                                       f"({int(self._labels.min())})")
        return self._labels

    def where(self, index):
        if int(index) < 0:
            return f"{self.root}: a MindRecord row (the files have no key column)"
        return f"{self.root}: MindRecord key {int(index)}"

    def problem(self, index, data):
        return f"{self.where(index)}: {why_undecodable(data)}"

    def _rows(self, image=True):
        import mindspore.dataset as ds
        columns = (["image"] if image else []) + ["label"] + (["key"] if self.has_key else [])
        dataset = ds.MindDataset(self.files, columns_list=columns, shuffle=False)
        try:
            for row, values in enumerate(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)):
                values = list(values)
                data = values.pop(0).tobytes() if image else None
                key = int(values[1]) if self.has_key else row
                yield key, data, int(values[0]), None
        except RuntimeError as exc:
            raise ArcFaceError(f"{self.root}: cannot read the MindRecord files: {mindspore_message(exc)}") from None

    def samples(self, indices=None):
        """Every row in stored order (`indices` is not supported: there is no random access)."""
        if indices is not None:
            raise ArcFaceError("MindRecord folders are read in stored order only")
        return self._rows()

    def dataset(self, num_shards=1, shard_id=0, shuffle=True, workers=1):
        import mindspore.dataset as ds
        shard = {"num_shards": num_shards, "shard_id": shard_id} if num_shards > 1 else {}
        columns = ["image", "label"] + (["key"] if self.has_key else [])
        dataset = ds.MindDataset(self.files, columns_list=columns, shuffle=shuffle, num_parallel_workers=workers,
                                 **shard)
        if not self.has_key:
            dataset = dataset.map(lambda label: (label, np.int64(-1)), input_columns=["label"],
                                  output_columns=["label", "key"])
        return dataset.rename(["image", "key"], ["data", "index"]).project(["data", "label", "index"])

    def check(self, report, progress=False):
        shown = ", ".join(os.path.basename(f) for f in self.files[:4]) + (" ..." if len(self.files) > 4 else "")
        report.line("kind", f"mindrecord ({len(self.files)} shard(s): {shown})")
        if self.counts is None:
            report.line("class counts", f"no {CLASS_COUNTS_NAME}: labels were read from the shards")


# --- opening a folder -----------------------------------------------------------------------------

def detect_kind(path):
    """'recordio', 'imagefolder' or 'mindrecord'; a clear error for anything else."""
    if not path:
        raise ArcFaceError("no training data given: pass --data_url DIR")
    if os.path.isfile(path):
        folder, name = os.path.split(os.path.abspath(path))
        stem, ext = os.path.splitext(name)
        if ext.lower() == ".bin":
            raise ArcFaceError(f"{path} is a verification set, not training data: training data is a folder "
                               f"(RecordIO, ImageFolder or MindRecord); evaluate on this set with "
                               f"python val.py --eval_url {folder} --target {stem} --ckpt_url ...")
        if ext.lower() in (".rec", ".idx"):
            raise ArcFaceError(f"{path} is part of a RecordIO set: give the folder holding train.rec and train.idx "
                               f"({folder})")
        raise ArcFaceError(f"{path} is a file: training data is a folder (RecordIO, ImageFolder or MindRecord)")
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


SOURCES = {"recordio": FaceRecordDataset, "imagefolder": ImageFolderSource, "mindrecord": MindRecordSource}


def open_source(path, for_training=True):
    """The source of a training folder. For training it must hold images whose labels fit its
    declared classes; datainfo opens it unchecked to report what is wrong."""
    source = SOURCES[detect_kind(path)](path)
    if for_training:
        if len(source) == 0:
            raise ArcFaceError(f"training data {path} contains no images")
        source.check_labels()
    return source


def implausible_class_count(source, needed):
    """Why the number of classes the folder declares is not believable for labels 0..needed-1, or
    None. A damaged `property` can declare billions of classes; the head would then take terabytes."""
    declared = int(source.num_classes or 0)
    if declared > max(2 * needed, needed + 10000):
        return (f"{source.property_path or source.path} declares {declared} classes but the labels use only "
                f"0..{needed - 1}: a damaged file? (--num_classes sets the number of classes explicitly)")
    return None


def resolve_num_classes(source, requested, path=""):
    """The dataset's own count when `requested` is 0; an error when the labels do not fit."""
    labels = source.labels()
    if labels.min() < 0:
        raise ArcFaceError(f"training data {path} has a negative label ({labels.min()})")
    needed = int(labels.max()) + 1
    if not requested and implausible_class_count(source, needed):
        raise ArcFaceError(implausible_class_count(source, needed))
    own = max(int(source.num_classes or 0), needed)
    if requested and requested < needed:
        raise ArcFaceError(f"--num_classes {requested} is smaller than the labels in {path} "
                           f"(largest label {needed - 1}, so at least {needed} classes)")
    return requested or own


# --- the one decode/verify loop -------------------------------------------------------------------

@dataclass
class Sample:
    index: int
    where: str
    data: bytes       # encoded bytes (None when unreadable)
    label: int
    image: object     # decoded RGB uint8 array, None when unusable
    problem: str      # why it is unusable (names the sample), else None


def scan(source, indices=None, workers=4, progress=False, desc="verify"):
    """Read and decode every sample (or `indices`) in order, decoding in `workers` threads; yields
    `Sample`s. Nothing is raised for a bad sample: it comes with its problem."""
    from tqdm import tqdm

    def decode(row):
        index, data, label, error = row
        where = source.where(index)
        if error is not None:
            return Sample(index, where, None, label, None, error)
        image = decode_image(data)
        return Sample(index, where, data, label, image, None if image is not None else f"{where}: "
                      f"{why_undecodable(data)}")

    total = len(source) if indices is None else len(indices)
    with tqdm(total=total, unit="img", disable=not progress, desc=desc) as bar:
        for sample in parallel_map(decode, source.samples(indices), workers):
            bar.update(1)
            yield sample


def parallel_map(func, items, workers):
    """func(item) for every item in `workers` threads, yielding results in input order with a
    bounded number in flight (for I/O and for OpenCV, which releases the GIL). An exception
    cancels the items not started yet and propagates."""
    if workers <= 1:
        for item in items:
            yield func(item)
        return
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


# --- the data tools' policy for bad samples -------------------------------------------------------

class BadSamples:
    """What pack_rec, mindrecord and rec2jpg do with a sample they cannot use: stop with its problem,
    or with --skip_bad collect it, list it at the end and go on, unless nothing usable is left."""

    def __init__(self, skip_bad):
        self.skip_bad = skip_bad
        self.problems = []

    def skip(self, problem):
        """Whether to leave out a sample with `problem` (None: a usable sample). Without --skip_bad a
        problem stops the tool with an ArcFaceError."""
        if problem is None:
            return False
        if not self.skip_bad:
            raise ArcFaceError(f"{problem} (use --skip_bad to skip such images)")
        self.problems.append(problem)
        return True

    def finish(self, usable, where):
        """Warn about every skipped sample; an ArcFaceError naming `where` when no usable image is
        left (`usable` counts them)."""
        for problem in self.problems:
            print(f"warning: skipped {problem}", file=sys.stderr)
        if not usable and self.problems:
            raise ArcFaceError(f"{where}: no usable image (all {len(self.problems)} were skipped as bad)")
