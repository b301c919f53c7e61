"""The insightface layout of a RecordIO training set (src.data.recordio is the container), its Source
and its checks.

Key 0 holds a header record: flag 2, label ``[first_identity_key, end_key]`` and no image.
Keys ``1 .. first_identity_key - 1`` are images whose label is the class id (a scalar, or the
first value of a label array); keys ``first_identity_key .. end_key - 1`` are one record per
class with label ``[first_image_key, end_image_key)``. A folder also holds a ``property`` file
with the text ``num_classes,height,width``. Files produced by im2rec have no header record: every
key of the idx file is an image.
"""

from __future__ import annotations

import array
import math
import os
from collections.abc import Iterable

import numpy as np

from src.data.recordio import (
    HEADER_SIZE,
    IndexedRecordReader,
    IndexedRecordWriter,
    IRHeader,
    header_size,
    overwrite_payload,
    pack_header,
    parse_header,
    scan_records,
    unpack_record,
)
from src.data.source import Source
from src.errors import ArcFaceError
from src.files import atomic_path, atomic_write, temporary_name

__all__ = ["FaceRecordDataset", "write_face_dataset", "read_property"]

_MAX_EXACT_FLOAT32 = 1 << 24


def read_property(path: str) -> tuple[int, tuple[int, int]]:
    """Parse a ``property`` file (``num_classes,height,width``)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except OSError as exc:
        raise ArcFaceError(f"{path}: cannot read property file: {exc.strerror}") from None
    fields = [s.strip() for s in text.split(",")]
    try:
        if len(fields) != 3:
            raise ValueError
        num_classes, h, w = (int(s) for s in fields)
        if num_classes <= 0 or h <= 0 or w <= 0:
            raise ValueError
    except ValueError:
        raise ArcFaceError(
            f"{path}: expected 'num_classes,height,width' with positive integers, got {text[:80]!r}"
        ) from None
    return num_classes, (h, w)


def _as_class_id(value, where: str) -> int:
    """A label value as a non-negative integer class id."""
    v = float(value)
    if not math.isfinite(v) or v < 0 or v != int(v):
        raise ArcFaceError(f"{where}: label {value!r} is not a non-negative integer class id")
    return int(v)


def _class_id(header: IRHeader, where: str) -> int:
    """The class id an image record carries: its scalar label, or the first value of its label array."""
    return _as_class_id(header.label if header.flag == 0 else header.label[0], where)


# --------------------------------------------------------------------------------------------
# Reading: the `recordio` Source
# --------------------------------------------------------------------------------------------


class FaceRecordDataset(Source):
    """The images of an insightface-style (or im2rec) record dataset, as a random-access Source.

    ``dataset[i]`` is ``(image_bytes, class_id)`` of the i-th image; indices are image positions and
    `where` names the record key and offset. Attributes:

    * ``image_keys``: the record keys of the images, in dataset order;
    * ``has_header_record``: whether key 0 is an insightface header record;
    * ``num_classes``: from the ``property`` file if present, else ``max(label) + 1``;
    * ``image_size``: ``(height, width)`` from the ``property`` file, or ``None``.

    Pickles cheaply (the underlying reader reopens the file in each process).
    """

    kind = "recordio"

    def __init__(self, folder_or_rec_path: str | os.PathLike):
        path = self.path = os.fspath(folder_or_rec_path)
        if os.path.isdir(path):
            rec_path = os.path.join(path, "train.rec")
            idx_path = os.path.join(path, "train.idx")
            missing = [p for p in (rec_path, idx_path) if not os.path.isfile(p)]
            if missing:
                raise ArcFaceError(
                    f"{path}: not a record dataset folder (missing {', '.join(os.path.basename(p) for p in missing)})"
                )
            folder = path
        else:
            if not os.path.isfile(path):
                raise ArcFaceError(f"{path}: no such record file or dataset folder")
            rec_path = path
            idx_path = os.path.splitext(path)[0] + ".idx"
            folder = os.path.dirname(path) or "."
        self.rec_path = rec_path
        self.reader = IndexedRecordReader(rec_path, idx_path)

        self.property_path: str | None = os.path.join(folder, "property")
        if not os.path.isfile(self.property_path):
            self.property_path = None

        self.has_header_record = False
        self.image_keys: list = self._find_image_keys()
        self._labels: np.ndarray | None = None

        self.image_size: tuple[int, int] | None = None
        if self.property_path is not None:
            self.num_classes, self.image_size = read_property(self.property_path)
        else:
            labels = self.labels()
            if labels.size == 0:
                raise ArcFaceError(f"{rec_path}: dataset has no images, cannot infer the number of classes")
            self.num_classes = int(labels.max()) + 1

    def _find_image_keys(self) -> list:
        """Keys of the images: 1 .. first_identity_key - 1 after an insightface header record,
        else every key of the index. The header's key range is checked against the index before
        anything is allocated from it."""
        reader = self.reader
        self.identity_range = None
        if 0 not in reader:
            return list(reader.keys)
        where = f"{self.rec_path}: key 0"
        head = reader.read_prefix(0, HEADER_SIZE + 8)
        if len(head) < HEADER_SIZE + 8 or header_size(head) != HEADER_SIZE + 8:  # not a two-value label
            return list(reader.keys)
        header, image = unpack_record(reader.read(0), where)
        # The insightface header carries no image; an im2rec image with a two-value label does,
        # which is what tells the two apart.
        if image:
            return list(reader.keys)
        first_id, end = (float(v) for v in header.label)
        index_keys, _ = reader.index_arrays()
        max_key = int(index_keys.max())
        if not (math.isfinite(first_id) and math.isfinite(end) and first_id.is_integer() and end.is_integer()
                and 1 <= first_id <= end <= max_key + 1 and first_id - 1 <= len(reader)):
            raise ArcFaceError(
                f"{where}: header record announces images 1..{first_id - 1:g} and identity records up to key "
                f"{end - 1:g}, which does not fit the index ({len(reader)} keys, largest {max_key}); the header "
                f"is damaged"
            )
        keys = np.arange(1, int(first_id), dtype=np.int64)
        # Vectorised: real datasets announce millions of image keys.
        missing = keys[~np.isin(keys, index_keys)]
        if missing.size:
            raise ArcFaceError(
                f"{reader.idx_path}: image key {int(missing[0])} announced by the header "
                f"record of {self.rec_path} is not in the index"
            )
        self.has_header_record = True
        self.identity_range = (int(first_id), int(end))
        return keys.tolist()

    def __len__(self) -> int:
        return len(self.image_keys)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        n = len(self.image_keys)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        key = self.image_keys[i]
        where = f"{self.rec_path}: key {key}"
        header, image = unpack_record(self.reader.read(key), where)
        label = _class_id(header, where)
        if not image:
            raise ArcFaceError(f"{where}: record has no image bytes")
        return image, label

    def read(self, index):
        return self[index][0]

    def key(self, index):
        return int(self.image_keys[index])

    def where(self, i: int) -> str:
        """``<rec file>: key K at offset O`` of the i-th image, for messages."""
        key = self.image_keys[i]
        return f"{self.rec_path}: key {key} at offset {self.reader.offset(key)}"

    def byte_sizes(self, enough):
        total = os.path.getsize(self.rec_path)
        if total >= enough:
            return total, total
        return total, max((self.reader.payload_size(key) for key in self.image_keys), default=0)

    def _header(self, i: int, extra: int = 0) -> tuple[IRHeader, int, bytes]:
        """Header of the i-th image, its size in bytes and the first ``extra`` bytes of the image,
        reading only the start of the record."""
        key = self.image_keys[i]
        prefix = self.reader.read_prefix(key, 64 + extra)
        if len(prefix) >= 4 and len(prefix) < header_size(prefix) + extra:
            prefix = self.reader.read_prefix(key, header_size(prefix) + extra)
        header, size = parse_header(prefix, f"{self.rec_path}: key {key}")
        return header, size, prefix[size:size + extra]

    def image_head(self, i: int, nbytes: int = 16) -> tuple[int, bytes]:
        """(size of the i-th image in bytes, its first ``nbytes``), reading only the record's start."""
        _, size, head = self._header(i, nbytes)
        return self.reader.payload_size(self.image_keys[i]) - size, head

    def label_of(self, i: int) -> int:
        """Class id of the i-th image, reading only its record header."""
        header, _, _ = self._header(i)
        return _class_id(header, f"{self.rec_path}: key {self.image_keys[i]}")

    def labels(self) -> np.ndarray:
        """Class ids of all images (int64, dataset order); read from headers once, then cached."""
        if self._labels is None:
            self._labels = np.fromiter(
                (self.label_of(i) for i in range(len(self.image_keys))),
                dtype=np.int64,
                count=len(self.image_keys),
            )
        return self._labels

    def check_labels(self) -> None:
        """Raise an ArcFaceError naming the first image (key and offset) whose label is not below
        the class count of the ``property`` file. Negative or non-integer labels are rejected
        while reading them."""
        labels = self.labels()
        if self.property_path is None or labels.size == 0:
            return
        bad = np.flatnonzero(labels >= self.num_classes)
        if bad.size:
            i = int(bad[0])
            raise ArcFaceError(
                f"{self.where(i)}: label {int(labels[i])} is out of range: {self.property_path} declares "
                f"{self.num_classes} classes (labels 0..{self.num_classes - 1}); {bad.size} image(s) affected"
            )

    # -- datainfo's checks -------------------------------------------------------------------

    def check(self, report, progress=False):
        from tqdm import tqdm

        # Labels one record at a time, so that an unreadable header is a problem, not a stop (label -1).
        labels = np.empty(len(self), dtype=np.int64)
        for i in tqdm(range(len(self)), unit="img", disable=not progress, desc="labels"):
            try:
                labels[i] = self.label_of(i)
            except ArcFaceError as exc:
                labels[i] = -1
                report.problem(str(exc), "unreadable records")
        self._labels = labels
        layout = ("insightface layout (header record at key 0, identity records)" if self.has_header_record
                  else "im2rec layout (no header record)")
        report.line("kind", f"recordio, {layout}")
        self._check_index(report, progress)
        if self.has_header_record:
            self._check_identity_records(report)

    def _check_index(self, report, progress):
        """Walk train.rec and compare its records with train.idx."""
        from tqdm import tqdm

        keys, offsets = self.reader.index_arrays()
        starts = array.array("q")
        walk_error = None
        with tqdm(total=os.path.getsize(self.rec_path), unit="B", unit_scale=True, disable=not progress,
                  desc="index") as bar:
            last = 0
            try:
                for offset, _, _ in scan_records(self.rec_path):
                    starts.append(offset)
                    if offset - last > (1 << 24):
                        bar.update(offset - last)
                        last = offset
            except ArcFaceError as exc:
                walk_error = str(exc)
                report.problem(walk_error)
            bar.update(bar.total - last)
        starts = np.frombuffer(starts, dtype=np.int64) if len(starts) else np.zeros(0, np.int64)
        known = np.isin(offsets, starts)
        limit = int(starts[-1]) if starts.size else -1
        # After a broken record the walk stops: offsets beyond it cannot be checked.
        misplaced = np.flatnonzero(~known & (offsets <= limit if walk_error else True))
        idx_path = self.reader.idx_path
        report.problems_of("misplaced idx offsets", misplaced,
                           lambda j: f"{idx_path}: key {int(keys[j])} has offset {int(offsets[j])}, "
                                     f"which is not the start of a record in {self.rec_path}")
        unlisted = int(starts.size - np.isin(starts, offsets).sum())
        if unlisted and not walk_error:
            report.problem(f"{self.rec_path}: {unlisted} record(s) are not listed in {idx_path}")
        text = f"{starts.size} records in {os.path.basename(self.rec_path)}, {len(keys)} idx lines"
        if walk_error:
            text += ": the record file is damaged (see problems)"
        elif not misplaced.size and not unlisted and starts.size == len(keys):
            text += ": every offset starts a record"
        else:
            text += f": {misplaced.size} offset(s) not at a record, {unlisted} record(s) not listed"
        report.line("index", text)

    def _check_identity_records(self, report):
        """insightface layout: identity record c must announce exactly the images labelled c."""
        labels = self.labels()
        first_id, end = self.identity_range
        expected = np.full(len(self), -1, dtype=np.int64)
        problems = 0
        for c, key in enumerate(range(first_id, end)):
            where = f"{self.rec_path}: identity record key {key}"
            try:
                record, _ = unpack_record(self.reader.read(key), where)
            except ArcFaceError as exc:
                report.problem(str(exc), "identity record problems")
                problems += 1
                continue
            if record.flag < 2:
                report.problem(f"{where}: expected a [first, end) key range, found a scalar label",
                               "identity record problems")
                problems += 1
                continue
            a, b = float(record.label[0]), float(record.label[1])
            if not (a.is_integer() and b.is_integer() and 1 <= a <= b <= first_id):
                report.problem(f"{where}: key range [{a:g}, {b:g}) is outside the images 1..{first_id - 1}",
                               "identity record problems")
                problems += 1
                continue
            expected[int(a) - 1:int(b) - 1] = c
        mismatch = np.flatnonzero((expected != labels) & (labels >= 0))
        report.problems_of("label/identity mismatches", mismatch,
                           lambda i: f"{self.where(i)}: label {int(labels[i])}, but " + (
                               f"the identity records put it in class {int(expected[i])}" if expected[i] >= 0
                               else "no readable identity record covers it"))
        problems += mismatch.size
        report.line("identity rec", f"{end - first_id} identity records: "
                    + ("consistent with the image labels" if not problems else f"{problems} problem(s)"))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_face_dataset(
    folder: str | os.PathLike,
    samples: Iterable[tuple[bytes, int]],
    image_size: tuple[int, int] = (112, 112),
) -> int:
    """Write ``(image_bytes, class_id)`` samples as ``train.rec``/``train.idx``/``property``.

    Uses the insightface layout: header record at key 0, images at keys ``1..N`` grouped by
    class (stable order within a class), then one identity record per class
    ``0..num_classes-1`` (a class without images gets an empty key range).

    Samples are streamed to disk as they arrive, so input already ordered by class (an
    ImageFolder walk, another record dataset) needs memory only for one label per image.
    Unordered input is written in a first pass and reordered into the final file in a second
    one. Files are written atomically (src.files), so an interrupted run never leaves a
    complete-looking dataset behind. Returns the number of classes.
    """
    folder = os.fspath(folder)
    h, w = (int(v) for v in image_size)
    rec_path = os.path.join(folder, "train.rec")
    idx_path = os.path.join(folder, "train.idx")
    # The first pass of unordered input, reordered into the final files by the second pass.
    scratch = [temporary_name(os.path.join(folder, name)) for name in ("pass1.rec", "pass1.idx")]
    try:
        with atomic_path(rec_path) as rec_tmp, atomic_path(idx_path) as idx_tmp:
            labels = array.array("q")
            ordered = True
            with IndexedRecordWriter(rec_tmp, idx_tmp) as writer:
                writer.write(0, _header_placeholder())
                for n, (image, label) in enumerate(samples):
                    class_id = _checked_class_id(label, f"{folder}: sample {n}")
                    if labels and class_id < labels[-1]:
                        ordered = False
                    labels.append(class_id)
                    writer.write(n + 1, pack_header(float(class_id), id=n + 1) + bytes(image))
                if not labels:
                    raise ArcFaceError(f"{folder}: no samples to write")
                counts = np.bincount(np.asarray(labels, dtype=np.int64))
                if ordered:
                    _write_identity_records(writer, counts)
            if not ordered:
                # Keys 1..N hold the samples in arrival order: reorder them by class into a new file.
                os.replace(rec_tmp, scratch[0])
                os.replace(idx_tmp, scratch[1])
                order = np.argsort(np.asarray(labels, dtype=np.int64), kind="stable")
                with IndexedRecordReader(*scratch) as reader, IndexedRecordWriter(rec_tmp, idx_tmp) as writer:
                    writer.write(0, _header_placeholder())
                    for key, old in enumerate(order.tolist(), start=1):
                        _, image = unpack_record(reader.read(old + 1), f"{scratch[0]}: key {old + 1}")
                        writer.write(key, pack_header(float(labels[old]), id=key) + image)
                    _write_identity_records(writer, counts)
            num_images, num_classes = len(labels), len(counts)
            # Positive float32 labels and a flag of 2 never form the magic word, so the header is one
            # physical record of the placeholder's size, completed in place once the counts are known.
            overwrite_payload(rec_tmp, 0, _header_payload(num_images, num_classes))
    finally:
        for path in scratch:
            if os.path.exists(path):
                os.remove(path)
    atomic_write(os.path.join(folder, "property"), f"{num_classes},{h},{w}\n")
    return num_classes


def _checked_class_id(label, where: str) -> int:
    if isinstance(label, bool) or np.ndim(label) != 0:
        raise ArcFaceError(f"{where}: label {label!r} is not an integer class id")
    class_id = _as_class_id(label, where)
    if class_id > _MAX_EXACT_FLOAT32:
        # Labels are stored as float32, which holds integers exactly only up to 2**24.
        raise ArcFaceError(f"{where}: class id {class_id} is too large for a float32 label")
    return class_id


def _header_payload(num_images: int, num_classes: int) -> bytes:
    first_identity = num_images + 1
    return pack_header([first_identity, first_identity + num_classes])


def _header_placeholder() -> bytes:
    # Same size as the final header record: it is overwritten in place once the counts are known.
    return _header_payload(0, 0)


def _write_identity_records(writer: IndexedRecordWriter, counts: np.ndarray) -> None:
    """One record per class ``c`` with label ``[first_image_key, end_image_key)``."""
    num_images = int(counts.sum())
    ends = np.cumsum(counts) + 1
    starts = ends - counts
    first_identity = num_images + 1
    for c in range(len(counts)):
        writer.write(first_identity + c, pack_header([int(starts[c]), int(ends[c])]))
