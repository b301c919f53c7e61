"""The RecordIO container (``train.rec`` + ``train.idx``, as MXNet writes them): one record walker, one
positional read, the indexed reader and the writer. What insightface stores in it (a header record,
identity records, a ``property`` file) is src.data.face_rec.

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
"""

from __future__ import annotations

import collections
import os
import struct
import threading
from collections.abc import Sequence

import numpy as np

from src.errors import ArcFaceError

__all__ = [
    "RECORD_MAGIC",
    "HEADER_SIZE",
    "IRHeader",
    "pack_header",
    "parse_header",
    "header_size",
    "unpack_record",
    "RecordFile",
    "IndexedRecordReader",
    "IndexedRecordWriter",
    "scan_records",
    "overwrite_payload",
]

RECORD_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)
_REC_HEAD = struct.Struct("<II")  # magic, lrecord
_IR_HEAD = struct.Struct("<IfQQ")  # flag, label, id, id2
HEADER_SIZE = _IR_HEAD.size  # an image record header without its label array
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_MAX_PART = _LENGTH_MASK  # the largest payload piece one physical record can hold

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
# Reading: the record file and its walker, the index
# --------------------------------------------------------------------------------------------


class RecordFile:
    """A ``.rec`` file read by positional I/O, and the one walker over its physical records.

    The file is opened lazily and reopened whenever the object is used in a process other
    than the one that opened it, so it can be pickled into data-loading worker processes.
    Reads are positional, so one object may also be shared between threads.
    """

    def __init__(self, rec_path: str | os.PathLike):
        self.rec_path = os.fspath(rec_path)
        if not os.path.isfile(self.rec_path):
            raise ArcFaceError(f"{self.rec_path}: record file not found")
        self._size = os.path.getsize(self.rec_path)
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __getstate__(self):
        # File descriptors and locks do not survive pickling: the copy opens its own.
        return {**self.__dict__, "_fd": None, "_pid": None, "_lock": None}

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

    @property
    def size(self) -> int:
        """Bytes in the file when this process opened it."""
        self._file()
        return self._size

    def _pread(self, n: int, offset: int) -> bytes:
        """``n`` bytes from ``offset``, fewer only at the end of the file."""
        fd = self._file()
        chunks = []
        while n > 0:
            if hasattr(os, "pread"):
                chunk = os.pread(fd, n, offset)
            else:
                with self._lock:  # no positional read on this platform: seek+read must not interleave
                    os.lseek(fd, offset, os.SEEK_SET)
                    chunk = os.read(fd, n)
            if not chunk:
                break
            chunks.append(chunk)
            n -= len(chunk)
            offset += len(chunk)
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

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def walk(self, offset: int, key=None, read: bool = True, limit: int | None = None):
        """Walk the physical pieces of the logical record that starts at byte ``offset``.

        Returns ``(payload, payload_size, pieces, end)``: the payload with the magic words put back
        between the pieces (None unless ``read``), its size, the number of physical records and the
        offset just past them. With ``limit`` the first piece is read only up to ``limit`` bytes and
        the walk stops once ``limit`` payload bytes are in (what follows is then neither read nor
        checked). This is the one place that checks record headers: an ArcFaceError names the file,
        the record (by ``key`` when the idx file led here) and the offset of a later piece at fault.
        """
        size = self.size
        where = f"{self.rec_path}: " + (f"key {key} at offset {offset}" if key is not None else f"offset {offset}")
        # Reached through the idx file, a broken record may just be a wrong offset there.
        from_index = key is not None
        if not 0 <= offset < size:
            raise ArcFaceError(f"{where}: offset is past the end of the file ({size} bytes)")
        parts, total, pieces, pos = [], 0, 0, offset
        while True:
            first = pieces == 0
            at = "" if first else f" at offset {pos}"
            if not first and pos >= size:
                raise ArcFaceError(
                    f"{where}: multi-part record is missing its continuation (end of file at offset {pos})"
                )
            head = self._pread(_REC_HEAD.size, pos)
            if len(head) < _REC_HEAD.size:
                raise ArcFaceError(f"{where}: truncated record header{at} (file has {size} bytes)")
            magic, lrecord = _REC_HEAD.unpack(head)
            if magic != RECORD_MAGIC:
                hint = "; wrong offset in the idx file or corrupt file?" if from_index else ""
                raise ArcFaceError(
                    f"{where}: bad record magic 0x{magic:08x}{at} (expected 0x{RECORD_MAGIC:08x}{hint})"
                )
            cflag, length = lrecord >> _LENGTH_BITS, lrecord & _LENGTH_MASK
            if first and cflag not in (_WHOLE, _FIRST):
                hint = "; the idx offset does not point at the start of a record" if from_index else ""
                raise ArcFaceError(f"{where}: record starts with a continuation piece (cflag {cflag}){hint}")
            if not first and cflag not in (_MIDDLE, _LAST):
                raise ArcFaceError(
                    f"{where}: multi-part record is missing its continuation "
                    f"(found a record with cflag {cflag} at offset {pos})"
                )
            need = min(length, limit) if first and limit is not None else length
            data = self._pread(need, pos + _REC_HEAD.size) if read else b""
            present = len(data) if read else size - pos - _REC_HEAD.size
            if present < need:
                raise ArcFaceError(
                    f"{where}: truncated record{at}: declares {length} payload bytes but the file ends "
                    f"after {present}"
                )
            if read:
                if not first:
                    parts.append(_MAGIC_BYTES)  # the writer cut the payload at a magic word and dropped it
                parts.append(data)
            total += length if first else 4 + length
            pieces += 1
            pos += _REC_HEAD.size + length + _pad4(length)
            if cflag in (_WHOLE, _LAST) or (limit is not None and total >= limit):
                return (b"".join(parts) if read else None), total, pieces, pos


def scan_records(rec_path: str | os.PathLike):
    """Walk a ``.rec`` file from its first byte, independently of any index.

    Yields ``(offset, payload_size, pieces)`` for every logical record, where ``offset`` is
    where its first physical record starts. A broken record raises the walker's ArcFaceError,
    naming the file and the offset.
    """
    with RecordFile(rec_path) as records:
        offset, size = 0, records.size
        while offset < size:
            _, payload_size, pieces, end = records.walk(offset, read=False)
            yield offset, payload_size, pieces
            offset = end


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


class IndexedRecordReader(RecordFile):
    """Random access to the logical records of a ``.rec`` file through its ``.idx`` file."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        super().__init__(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else os.path.splitext(self.rec_path)[0] + ".idx"
        self._keys, self._offsets = _parse_idx(self.idx_path, self.rec_path, self._size)
        self._build_lookup()
        self._keys_list: list | None = None

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

    def __getstate__(self):
        return {**super().__getstate__(), "_keys_list": None}  # the list view is rebuilt on demand

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
        """(keys, offsets) of the idx file as read-only int64 arrays, in file order."""
        keys, offsets = self._keys.view(), self._offsets.view()
        keys.flags.writeable = offsets.flags.writeable = False
        return keys, offsets

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
        return self.walk(self.offset(key), key)[0]

    def read_prefix(self, key: int, nbytes: int) -> bytes:
        """At least the first ``nbytes`` of the payload under ``key`` (fewer only if the payload
        is shorter), without reading the rest when the first physical piece suffices."""
        return self.walk(self.offset(key), key, limit=nbytes)[0]

    def payload_size(self, key: int) -> int:
        """Length of the payload under ``key``, from the physical record headers only (the
        payload itself is not read)."""
        return self.walk(self.offset(key), key, read=False)[1]


# --------------------------------------------------------------------------------------------
# Writing
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


def overwrite_payload(rec_path: str | os.PathLike, offset: int, payload: bytes) -> None:
    """Replace, in place, the payload of the one-piece record at ``offset`` by ``payload`` of the
    same length: how a record written before its content was known (a count) is completed."""
    with RecordFile(rec_path) as records:
        _, size, pieces, _ = records.walk(offset, read=False)
    if pieces != 1 or size != len(payload) or len(_split_at_magic(payload)) != 1:
        raise ValueError(f"{rec_path}: offset {offset}: the new payload must fit the old record's single piece")
    with open(rec_path, "r+b") as f:
        f.seek(offset + _REC_HEAD.size)
        f.write(payload)
