"""Reading and writing indexed RecordIO files (``train.rec`` + ``train.idx``).

File format
-----------
``.idx`` is a text file with one ``key<TAB>byte_offset`` line per logical record.

``.rec`` is a sequence of physical records, each starting at a 4-byte aligned offset::

    uint32 LE  magic = 0xced7230a
    uint32 LE  lrecord = cflag << 29 | length      (length = low 29 bits)
    length     payload bytes
    0..3       zero bytes padding the record to a multiple of 4

``cflag`` 0 marks a complete logical record. A writer must never let the magic appear at an
aligned position of the file outside a record header (so a reader can resynchronise), so a
payload that contains the magic bytes at a 4-byte aligned position is cut there: the pieces
are stored as physical records with cflag 1 (first), 2 (middle) and 3 (last), the magic
itself is dropped, and the reader puts it back between consecutive pieces.

Payload layout (the "image record" header)::

    <IfQQ  uint32 flag, float32 label, uint64 id, uint64 id2      (24 bytes)
    flag * float32                                                (label array if flag > 0)
    image bytes (JPEG / PNG)

insightface dataset layout
--------------------------
Key 0 holds a header record: flag 2, label ``[first_identity_key, end_key]`` and no image.
Keys ``1 .. first_identity_key - 1`` are images whose label is the class id; keys
``first_identity_key .. end_key - 1`` are one record per class with label
``[first_image_key, end_image_key)``. A folder also holds a ``property`` file with the text
``num_classes,height,width``. Files produced by im2rec have no header record: every key of
the idx file is an image.
"""

from __future__ import annotations

import array
import collections
import math
import os
import struct
import threading
from collections.abc import Iterable, Sequence

import numpy as np

from src.errors import ArcFaceError
from src.files import atomic_path, atomic_write, temporary_name

__all__ = [
    "RECORD_MAGIC",
    "IRHeader",
    "pack_header",
    "parse_header",
    "unpack_record",
    "IndexedRecordReader",
    "IndexedRecordWriter",
    "FaceRecordDataset",
    "write_face_dataset",
    "scan_records",
    "read_property",
]

RECORD_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)
_REC_HEAD = struct.Struct("<II")  # magic, lrecord
_IR_HEAD = struct.Struct("<IfQQ")  # flag, label, id, id2
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_MAX_PART = _LENGTH_MASK  # the largest payload piece one physical record can hold
_MAX_EXACT_FLOAT32 = 1 << 24

# cflag values of a physical record.
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3

IRHeader = collections.namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = """Header of an image record.

``label`` is a Python float when ``flag == 0`` and a float32 numpy array of ``flag`` values
otherwise (the scalar field of the struct is then ignored)."""


def _pad4(n: int) -> int:
    """Number of zero bytes needed to bring ``n`` up to a multiple of 4."""
    return (-n) & 3


# --------------------------------------------------------------------------------------------
# Payload header
# --------------------------------------------------------------------------------------------


def pack_header(label: float | Sequence[float] | np.ndarray, id: int = 0, id2: int = 0) -> bytes:
    """Serialise an image record header; append the image bytes to get the full payload.

    ``label`` is either a number (stored in the scalar field, ``flag = 0``) or a non-empty
    sequence of numbers (stored as a float32 array after the struct, ``flag = len(label)``).
    """
    if isinstance(label, (str, bytes)):
        raise TypeError(f"label must be a number or a sequence of numbers, got {label!r}")
    if np.ndim(label) == 0:
        return _IR_HEAD.pack(0, float(label), int(id), int(id2))
    values = np.asarray(label, dtype="<f4").reshape(-1)
    if values.size == 0:
        # flag 0 would mean "scalar label", so an empty array cannot be represented.
        raise ValueError("an array label needs at least one value")
    return _IR_HEAD.pack(values.size, 0.0, int(id), int(id2)) + values.tobytes()


def parse_header(payload: bytes, where: str = "record") -> tuple[IRHeader, int]:
    """The record header at the start of ``payload`` and its size in bytes (struct + label array).

    ``payload`` may be just a prefix of the record, as long as it holds the whole header; an
    ArcFaceError naming ``where`` (file and key) is raised otherwise.
    """
    if len(payload) < _IR_HEAD.size:
        raise ArcFaceError(
            f"{where}: payload of {len(payload)} bytes is shorter than the "
            f"{_IR_HEAD.size}-byte record header"
        )
    flag, label, id_, id2 = _IR_HEAD.unpack_from(payload, 0)
    size = _IR_HEAD.size + 4 * flag
    if flag > 0:
        if len(payload) < size:
            raise ArcFaceError(
                f"{where}: header declares {flag} label values ({size} bytes) but the payload "
                f"has only {len(payload)} bytes"
            )
        label = np.frombuffer(payload, dtype="<f4", count=flag, offset=_IR_HEAD.size).astype(np.float32)
    return IRHeader(flag, label, id_, id2), size


def header_size(prefix: bytes) -> int:
    """Bytes taken by the header that starts ``prefix`` (at least 4 bytes): struct + label array."""
    return _IR_HEAD.size + 4 * struct.unpack_from("<I", prefix, 0)[0]


def unpack_record(payload: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split a record payload into ``(IRHeader, image_bytes)``; ``where`` names the record in errors."""
    header, size = parse_header(payload, where)
    return header, bytes(payload[size:])


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


def _parse_idx(idx_path: str, rec_path: str, rec_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read an idx file into (keys, offsets) int64 arrays, in file order."""
    keys = []
    offsets = []
    seen = set()
    try:
        f = open(idx_path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise ArcFaceError(f"{idx_path}: index file not found (needed to read {rec_path})") from None
    except OSError as exc:
        raise ArcFaceError(f"{idx_path}: cannot open index file: {exc.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue  # blank lines (e.g. a trailing one) carry no entry
            try:
                if len(parts) != 2:
                    raise ValueError
                key, offset = int(parts[0]), int(parts[1])
                if offset < 0:
                    raise ValueError
            except ValueError:
                raise ArcFaceError(
                    f"{idx_path}: line {lineno}: expected 'key<TAB>byte_offset', got {line.strip()[:80]!r}"
                ) from None
            if key in seen:
                raise ArcFaceError(f"{idx_path}: line {lineno}: key {key} appears twice")
            if offset >= rec_size:
                raise ArcFaceError(
                    f"{idx_path}: line {lineno}: key {key} has offset {offset}, past the end of "
                    f"{rec_path} ({rec_size} bytes)"
                )
            seen.add(key)
            keys.append(key)
            offsets.append(offset)
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


class IndexedRecordReader:
    """Random access to the logical records of a ``.rec`` file through its ``.idx`` file.

    The file is opened lazily and reopened whenever the object is used in a process other
    than the one that opened it, so the reader can be pickled into data-loading worker
    processes. Reads use positional I/O, so one reader may also be shared between threads.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else os.path.splitext(self.rec_path)[0] + ".idx"
        if not os.path.isfile(self.rec_path):
            raise ArcFaceError(f"{self.rec_path}: record file not found")
        self._size = os.path.getsize(self.rec_path)
        self._keys, self._offsets = _parse_idx(self.idx_path, self.rec_path, self._size)
        self._build_lookup()
        self._keys_list: list | None = None
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def _build_lookup(self) -> None:
        # Datasets have millions of keys and the reader is pickled into every worker: when the
        # keys form a contiguous range (the usual case) a flat array is far smaller than a dict.
        self._key_base = 0
        self._slot: np.ndarray | None = None
        self._key_pos: dict | None = None
        n = len(self._keys)
        if n and int(self._keys.max()) - int(self._keys.min()) == n - 1:
            self._key_base = int(self._keys.min())
            self._slot = np.empty(n, dtype=np.int64)
            self._slot[self._keys - self._key_base] = np.arange(n, dtype=np.int64)
        else:
            self._key_pos = {int(k): i for i, k in enumerate(self._keys.tolist())}

    # -- pickling / process handling ---------------------------------------------------------

    def __getstate__(self):
        state = self.__dict__.copy()
        # File descriptors and locks do not survive pickling; the list view is rebuilt on demand.
        state["_fd"] = None
        state["_pid"] = None
        state["_lock"] = None
        state["_keys_list"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _file(self) -> int:
        """The descriptor of the .rec file for the current process, opening it if needed."""
        pid = os.getpid()
        if self._fd is not None and self._pid == pid:
            return self._fd
        with self._lock:
            if self._fd is not None and self._pid != pid:
                # Inherited through fork: drop this process's copy and open a private one.
                try:
                    os.close(self._fd)
                except OSError:
                    pass
                self._fd = None
            if self._fd is None:
                try:
                    self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                except OSError as exc:
                    raise ArcFaceError(f"{self.rec_path}: cannot open record file: {exc.strerror}") from None
                self._pid = pid
                self._size = os.fstat(self._fd).st_size
            return self._fd

    def _pread(self, n: int, offset: int) -> bytes:
        fd = self._file()
        if hasattr(os, "pread"):
            chunks = []
            while n > 0:
                chunk = os.pread(fd, n, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                n -= len(chunk)
                offset += len(chunk)
            return b"".join(chunks)
        with self._lock:  # no positional read on this platform: seek+read must not interleave
            os.lseek(fd, offset, os.SEEK_SET)
            chunks = []
            while n > 0:
                chunk = os.read(fd, n)
                if not chunk:
                    break
                chunks.append(chunk)
                n -= len(chunk)
            return b"".join(chunks)

    def close(self) -> None:
        """Close the file (it is reopened automatically by the next read)."""
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None
        self._pid = None

    def __enter__(self) -> IndexedRecordReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- index -------------------------------------------------------------------------------

    @property
    def keys(self) -> list:
        """All keys, in the order of the idx file."""
        if self._keys_list is None:
            self._keys_list = self._keys.tolist()
        return self._keys_list

    def __len__(self) -> int:
        return len(self._keys)

    def index_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, offsets) of the idx file as int64 arrays, in file order."""
        return self._keys.copy(), self._offsets.copy()

    def __contains__(self, key) -> bool:
        return self._position(key) is not None

    def _position(self, key) -> int | None:
        try:
            key = int(key)
        except (TypeError, ValueError):
            return None
        if self._slot is not None:
            i = key - self._key_base
            return int(self._slot[i]) if 0 <= i < len(self._slot) else None
        return self._key_pos.get(key)

    def offset(self, key: int) -> int:
        """Byte offset of ``key`` in the .rec file."""
        pos = self._position(key)
        if pos is None:
            raise ArcFaceError(f"{self.idx_path}: key {key} is not in the index")
        return int(self._offsets[pos])

    # -- records -----------------------------------------------------------------------------

    def read(self, key: int) -> bytes:
        """Payload of the logical record stored under ``key``."""
        return self._read_logical(self.offset(key), key, limit=None)

    def read_at(self, offset: int) -> bytes:
        """Payload of the logical record starting at byte ``offset``."""
        return self._read_logical(int(offset), None, limit=None)

    def read_prefix(self, key: int, nbytes: int) -> bytes:
        """At least the first ``nbytes`` of the payload under ``key`` (fewer only if the payload
        is shorter), without reading the rest when the first physical piece suffices."""
        return self._read_logical(self.offset(key), key, limit=nbytes)

    def payload_size(self, key: int) -> int:
        """Length of the payload under ``key``, from the physical record headers only (the
        payload itself is not read)."""
        offset = self.offset(key)
        if offset >= self._size:
            raise ArcFaceError(
                f"{self._where(offset, key)}: offset is past the end of the file ({self._size} bytes)"
            )
        total, pos, first = 0, offset, True
        while True:
            head = self._pread(_REC_HEAD.size, pos)
            if len(head) < _REC_HEAD.size:
                what = "multi-part record is missing its continuation" if not first else "truncated record header"
                raise ArcFaceError(f"{self._where(offset, key)}: {what} at offset {pos} (file has {self._size} bytes)")
            magic, lrecord = _REC_HEAD.unpack(head)
            if magic != RECORD_MAGIC:
                raise ArcFaceError(
                    f"{self._where(offset, key)}: bad record magic 0x{magic:08x} at offset {pos} "
                    f"(expected 0x{RECORD_MAGIC:08x}; wrong offset in the idx file or corrupt file?)"
                )
            cflag, length = lrecord >> _LENGTH_BITS, lrecord & _LENGTH_MASK
            if pos + _REC_HEAD.size + length > self._size:
                raise ArcFaceError(
                    f"{self._where(offset, key)}: truncated record at offset {pos}: declares {length} "
                    f"payload bytes but the file ends after {self._size - pos - _REC_HEAD.size}"
                )
            if first and cflag not in (_WHOLE, _FIRST):
                raise ArcFaceError(
                    f"{self._where(offset, key)}: record starts with a continuation piece (cflag {cflag}); "
                    f"the idx offset does not point at the start of a record"
                )
            if not first and cflag not in (_MIDDLE, _LAST):
                raise ArcFaceError(
                    f"{self._where(offset, key)}: multi-part record is missing its continuation "
                    f"(found a record with cflag {cflag} at offset {pos})"
                )
            total += length if first else 4 + length  # the reader re-inserts the magic between pieces
            if cflag in (_WHOLE, _LAST):
                return total
            first = False
            pos += _REC_HEAD.size + length + _pad4(length)

    def _where(self, offset: int, key) -> str:
        what = f"key {key} at offset {offset}" if key is not None else f"offset {offset}"
        return f"{self.rec_path}: {what}"

    def _read_physical(self, offset: int, key, start: int, limit: int | None):
        """One physical record at ``offset`` -> (cflag, payload, next_offset).

        ``start`` is the offset of the logical record (for messages); with ``limit`` only the
        first ``limit`` payload bytes are read.
        """
        head = self._pread(_REC_HEAD.size, offset)
        if len(head) < _REC_HEAD.size:
            if offset >= self._size and offset != start:
                raise ArcFaceError(
                    f"{self._where(start, key)}: multi-part record is missing its continuation "
                    f"(end of file at offset {offset})"
                )
            raise ArcFaceError(
                f"{self._where(start, key)}: truncated record header at offset {offset} "
                f"(file has {self._size} bytes)"
            )
        magic, lrecord = _REC_HEAD.unpack(head)
        if magic != RECORD_MAGIC:
            raise ArcFaceError(
                f"{self._where(start, key)}: bad record magic 0x{magic:08x} at offset {offset} "
                f"(expected 0x{RECORD_MAGIC:08x}; wrong offset in the idx file or corrupt file?)"
            )
        cflag, length = lrecord >> _LENGTH_BITS, lrecord & _LENGTH_MASK
        want = length if limit is None else min(length, limit)
        data = self._pread(want, offset + _REC_HEAD.size)
        if len(data) < want:
            raise ArcFaceError(
                f"{self._where(start, key)}: truncated record at offset {offset}: declares "
                f"{length} payload bytes but the file ends after {len(data)}"
            )
        return cflag, data, offset + _REC_HEAD.size + length + _pad4(length)

    def _read_logical(self, offset: int, key, limit: int | None) -> bytes:
        if offset < 0 or offset >= self._size:
            raise ArcFaceError(
                f"{self._where(offset, key)}: offset is past the end of the file ({self._size} bytes)"
            )
        cflag, data, nxt = self._read_physical(offset, key, offset, limit)
        if cflag == _WHOLE:
            return data
        if cflag != _FIRST:
            raise ArcFaceError(
                f"{self._where(offset, key)}: record starts with a continuation piece "
                f"(cflag {cflag}); the idx offset does not point at the start of a record"
            )
        parts = [data]
        got = len(data)
        while True:
            if limit is not None and got >= limit:
                return b"".join(parts)
            pos = nxt
            if pos >= self._size:
                raise ArcFaceError(
                    f"{self._where(offset, key)}: multi-part record is missing its continuation "
                    f"(end of file at offset {pos})"
                )
            cflag, data, nxt = self._read_physical(pos, key, offset, None)
            if cflag not in (_MIDDLE, _LAST):
                raise ArcFaceError(
                    f"{self._where(offset, key)}: multi-part record is missing its continuation "
                    f"(found a record with cflag {cflag} at offset {pos})"
                )
            # The writer cut the payload at a magic word and dropped it: put it back.
            parts.append(_MAGIC_BYTES)
            parts.append(data)
            got += 4 + len(data)
            if cflag == _LAST:
                return b"".join(parts)


def scan_records(rec_path: str | os.PathLike):
    """Walk a ``.rec`` file from its first byte, independently of any index.

    Yields ``(offset, payload_size, pieces)`` for every logical record, where ``offset`` is
    where its first physical record starts. A bad magic, a truncated record, a continuation
    piece without a start or a multi-part record cut short raise an ArcFaceError naming the
    file and the offset.
    """
    rec_path = os.fspath(rec_path)
    try:
        fd = os.open(rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ArcFaceError(f"{rec_path}: cannot open record file: {exc.strerror}") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = os.fstat(fd).st_size
        pos = 0
        start = None  # offset of the open multi-part record
        total = pieces = 0
        while pos < size:
            if hasattr(os, "pread"):
                head = os.pread(fd, _REC_HEAD.size, pos)
            else:
                f.seek(pos)
                head = f.read(_REC_HEAD.size)
            if len(head) < _REC_HEAD.size:
                raise ArcFaceError(
                    f"{rec_path}: offset {pos}: truncated record header ({size - pos} bytes left at the end "
                    f"of the file)"
                )
            magic, lrecord = _REC_HEAD.unpack(head)
            if magic != RECORD_MAGIC:
                raise ArcFaceError(
                    f"{rec_path}: offset {pos}: bad record magic 0x{magic:08x} (expected 0x{RECORD_MAGIC:08x})"
                )
            cflag, length = lrecord >> _LENGTH_BITS, lrecord & _LENGTH_MASK
            end = pos + _REC_HEAD.size + length
            if end > size:
                raise ArcFaceError(
                    f"{rec_path}: offset {pos}: truncated record: declares {length} payload bytes but the "
                    f"file ends after {size - pos - _REC_HEAD.size}"
                )
            if cflag in (_WHOLE, _FIRST):
                if start is not None:
                    raise ArcFaceError(
                        f"{rec_path}: offset {start}: multi-part record is missing its continuation "
                        f"(found a record with cflag {cflag} at offset {pos})"
                    )
                if cflag == _WHOLE:
                    yield pos, length, 1
                else:
                    start, total, pieces = pos, length, 1
            else:
                if start is None:
                    raise ArcFaceError(
                        f"{rec_path}: offset {pos}: continuation piece (cflag {cflag}) without a first piece"
                    )
                total += 4 + length
                pieces += 1
                if cflag == _LAST:
                    yield start, total, pieces
                    start = None
            pos = end + _pad4(length)
        if start is not None:
            raise ArcFaceError(
                f"{rec_path}: offset {start}: multi-part record is missing its continuation "
                f"(end of file at offset {size})"
            )


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def _split_at_magic(payload: bytes) -> list:
    """Cut ``payload`` at every 4-byte aligned occurrence of the magic, dropping the magic."""
    pieces = []
    start = 0
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            pieces.append(payload[start:pos])
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start)
        else:
            # Unaligned matches are harmless: records start aligned, so they can never be
            # mistaken for a record header. Resume the search at the next aligned position.
            pos = payload.find(_MAGIC_BYTES, pos + _pad4(pos))
    pieces.append(payload[start:])
    return pieces


class IndexedRecordWriter:
    """Writes logical records to a ``.rec`` file and their offsets to an ``.idx`` file."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else os.path.splitext(self.rec_path)[0] + ".idx"
        try:
            self._rec = open(self.rec_path, "wb")
        except OSError as exc:
            raise ArcFaceError(f"{self.rec_path}: cannot create record file: {exc.strerror}") from None
        try:
            self._idx = open(self.idx_path, "w", encoding="ascii", newline="\n")
        except OSError as exc:
            self._rec.close()
            raise ArcFaceError(f"{self.idx_path}: cannot create index file: {exc.strerror}") from None
        self._pos = 0
        self._keys = set()

    def write(self, key: int, payload: bytes) -> int:
        """Append ``payload`` under ``key``; returns the byte offset of the record."""
        if self._rec is None:
            raise ValueError(f"{self.rec_path}: writer is closed")
        key = int(key)
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: key {key} written twice")
        payload = bytes(payload)
        pieces = _split_at_magic(payload)
        for piece in pieces:
            if len(piece) > _MAX_PART:
                raise ValueError(
                    f"{self.rec_path}: key {key}: record piece of {len(piece)} bytes exceeds the "
                    f"format limit of {_MAX_PART} bytes"
                )
        offset = self._pos
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            if last == 0:
                cflag = _WHOLE
            elif i == 0:
                cflag = _FIRST
            elif i == last:
                cflag = _LAST
            else:
                cflag = _MIDDLE
            self._rec.write(_REC_HEAD.pack(RECORD_MAGIC, cflag << _LENGTH_BITS | len(piece)))
            self._rec.write(piece)
            pad = _pad4(len(piece))
            if pad:
                self._rec.write(b"\0" * pad)
            self._pos += _REC_HEAD.size + len(piece) + pad
        self._idx.write(f"{key}\t{offset}\n")
        self._keys.add(key)
        return offset

    def close(self) -> None:
        if self._rec is not None:
            self._rec.close()
            self._idx.close()
            self._rec = None
            self._idx = None

    def __enter__(self) -> IndexedRecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# insightface layout
# --------------------------------------------------------------------------------------------


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


class FaceRecordDataset:
    """Random-access view of the images of an insightface-style (or im2rec) record dataset.

    ``dataset[i]`` is ``(image_bytes, class_id)`` of the i-th image. Attributes:

    * ``image_keys``: the record keys of the images, in dataset order;
    * ``has_header_record``: whether key 0 is an insightface header record;
    * ``num_classes``: from the ``property`` file if present, else ``max(label) + 1``;
    * ``image_size``: ``(height, width)`` from the ``property`` file, or ``None``.

    Pickles cheaply (the underlying reader reopens the file in each process).
    """

    def __init__(self, folder_or_rec_path: str | os.PathLike):
        path = os.fspath(folder_or_rec_path)
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
        head = reader.read_prefix(0, _IR_HEAD.size + 8)
        if len(head) < _IR_HEAD.size + 8 or struct.unpack_from("<I", head, 0)[0] != 2:
            return list(reader.keys)
        header, image = unpack_record(reader.read(0), where)
        # The insightface header carries no image; an im2rec image with a two-value label does,
        # which is what tells the two apart.
        if image:
            return list(reader.keys)
        first_id, end = (float(v) for v in header.label)
        max_key = int(reader._keys.max())
        if not (math.isfinite(first_id) and math.isfinite(end) and first_id.is_integer() and end.is_integer()
                and 1 <= first_id <= end <= max_key + 1 and first_id - 1 <= len(reader)):
            raise ArcFaceError(
                f"{where}: header record announces images 1..{first_id - 1:g} and identity records up to key "
                f"{end - 1:g}, which does not fit the index ({len(reader)} keys, largest {max_key}); the header "
                f"is damaged"
            )
        keys = np.arange(1, int(first_id), dtype=np.int64)
        # Vectorised: real datasets announce millions of image keys.
        missing = keys[~np.isin(keys, reader._keys)]
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

    def _label_from_header(self, header: IRHeader, where: str) -> int:
        value = header.label if header.flag == 0 else header.label[0]
        return _as_class_id(value, where)

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
        label = self._label_from_header(header, where)
        if not image:
            raise ArcFaceError(f"{where}: record has no image bytes")
        return image, label

    def where(self, i: int) -> str:
        """``<rec file>: key K at offset O`` of the i-th image, for messages."""
        key = self.image_keys[i]
        return f"{self.rec_path}: key {key} at offset {self.reader.offset(key)}"

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

    def read_header(self, i: int, extra: int = 0) -> tuple[IRHeader, bytes]:
        """Header of the i-th image and the first ``extra`` bytes of its image, reading only the
        start of the record."""
        key = self.image_keys[i]
        where = f"{self.rec_path}: key {key}"
        prefix = self.reader.read_prefix(key, 64 + extra)
        if len(prefix) >= 4 and len(prefix) < header_size(prefix) + extra:
            prefix = self.reader.read_prefix(key, header_size(prefix) + extra)
        header, size = parse_header(prefix, where)
        return header, prefix[size:size + extra]

    def image_head(self, i: int, nbytes: int = 16) -> tuple[int, bytes]:
        """(size of the i-th image in bytes, its first ``nbytes``), reading only the record's start."""
        header, head = self.read_header(i, nbytes)
        size = self.reader.payload_size(self.image_keys[i]) - (_IR_HEAD.size + 4 * header.flag)
        return size, head

    def label_of(self, i: int) -> int:
        """Class id of the i-th image, reading only its record header."""
        header, _ = self.read_header(i)
        return self._label_from_header(header, f"{self.rec_path}: key {self.image_keys[i]}")

    def labels(self) -> np.ndarray:
        """Class ids of all images (int64, dataset order); read from headers once, then cached."""
        if self._labels is None:
            self._labels = np.fromiter(
                (self.label_of(i) for i in range(len(self.image_keys))),
                dtype=np.int64,
                count=len(self.image_keys),
            )
        return self._labels

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> FaceRecordDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
            _patch_header(rec_tmp, num_images, num_classes)
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


def _patch_header(rec_path: str, num_images: int, num_classes: int) -> None:
    """Write the real header record over the placeholder at offset 0."""
    payload = _header_payload(num_images, num_classes)
    # Positive float32 labels and a flag of 2 never form the magic word, so the header is always
    # one physical record of the placeholder's size.
    assert len(_split_at_magic(payload)) == 1 and len(payload) == len(_header_placeholder())
    with open(rec_path, "r+b") as f:
        f.seek(_REC_HEAD.size)
        f.write(payload)


def _write_identity_records(writer: IndexedRecordWriter, counts: np.ndarray) -> None:
    """One record per class ``c`` with label ``[first_image_key, end_image_key)``."""
    num_images = int(counts.sum())
    ends = np.cumsum(counts) + 1
    starts = ends - counts
    first_identity = num_images + 1
    for c in range(len(counts)):
        writer.write(first_identity + c, pack_header([int(starts[c]), int(ends[c])]))
