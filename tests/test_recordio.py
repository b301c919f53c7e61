"""Tests for src.data.recordio (RecordIO container, record headers) and src.data.face_rec (the insightface layout)."""

import os
import pickle
import struct
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from src.data.face_rec import FaceRecordDataset, write_face_dataset
from src.data.recordio import RECORD_MAGIC, IndexedRecordReader, IndexedRecordWriter, pack_header, unpack_record
from src.errors import ArcFaceError

MAGIC = struct.pack("<I", RECORD_MAGIC)


def physical_records(rec_path):
    """Walk a .rec file independently of the reader: list of (offset, cflag, length)."""
    data = open(rec_path, "rb").read()
    out = []
    pos = 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == RECORD_MAGIC
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        out.append((pos, cflag, length))
        pos += 8 + length + (-length & 3)
    assert pos == len(data)
    return out


def write_records(tmp_path, records, name="data"):
    rec = tmp_path / f"{name}.rec"
    idx = tmp_path / f"{name}.idx"
    with IndexedRecordWriter(rec, idx) as w:
        for key, payload in records:
            w.write(key, payload)
    return rec, idx


def read_at(reader, offset):
    """The payload of the logical record that starts at byte `offset`, found without the index."""
    return reader.walk(offset)[0]


def fake_image(rng, n=None):
    return b"\xff\xd8" + rng.bytes(int(rng.integers(1, 60)) if n is None else n)


# ---------------------------------------------------------------------------- container


def test_round_trip_random_payloads_with_magic(tmp_path):
    rng = np.random.default_rng(0)
    payloads = {
        0: b"",
        1: b"a",
        2: rng.bytes(37),
        3: MAGIC,  # magic only: two empty pieces
        4: MAGIC + b"xyz",  # magic at position 0
        5: b"abcd" + MAGIC + b"efgh" + MAGIC + MAGIC + b"ij",  # several, consecutive
        6: b"ab" + MAGIC + b"cd",  # unaligned: must stay a whole record
        7: rng.bytes(16) + MAGIC,  # magic at the very end
        8: rng.bytes(3) + MAGIC + MAGIC[:3],  # unaligned magic, then a partial one at the end
    }
    for k in range(9, 40):
        parts = [rng.bytes(4 * int(rng.integers(0, 5))) for _ in range(int(rng.integers(1, 4)))]
        payloads[k] = MAGIC.join(parts) + rng.bytes(int(rng.integers(0, 4)))
    order = list(payloads)
    rng.shuffle(order)
    rec, idx = write_records(tmp_path, [(k, payloads[k]) for k in order])

    cflags = [c for _, c, _ in physical_records(rec)]
    assert 1 in cflags and 2 in cflags and 3 in cflags
    assert all(off % 4 == 0 for off, _, _ in physical_records(rec))

    with IndexedRecordReader(rec) as r:  # idx path defaults to the same stem
        assert r.idx_path == str(idx)
        assert r.keys == [int(k) for k in order]
        assert len(r) == len(payloads)
        for k, payload in payloads.items():
            assert r.read(k) == payload
        # read_at with the offsets of the idx file
        for line in idx.read_text().splitlines():
            k, off = map(int, line.split("\t"))
            assert read_at(r, off) == payloads[k]


def test_writer_splits_only_at_aligned_magic(tmp_path):
    rec, _ = write_records(tmp_path, [(0, b"ab" + MAGIC + b"cd"), (1, b"abcd" + MAGIC + b"ef")])
    recs = physical_records(rec)
    assert [(c, n) for _, c, n in recs] == [(0, 8), (1, 4), (3, 2)]


def test_reader_accepts_hand_made_split(tmp_path):
    """A split written by another producer: first/middle/last pieces, including empty ones."""

    def phys(cflag, piece):
        return struct.pack("<II", RECORD_MAGIC, cflag << 29 | len(piece)) + piece + b"\0" * (-len(piece) & 3)

    blob = phys(1, b"") + phys(2, b"xy") + phys(2, b"") + phys(3, b"z") + phys(0, b"tail")
    rec = tmp_path / "h.rec"
    rec.write_bytes(blob)
    second = len(phys(1, b"") + phys(2, b"xy") + phys(2, b"") + phys(3, b"z"))
    (tmp_path / "h.idx").write_text(f"7\t0\n9\t{second}\n")
    r = IndexedRecordReader(rec)
    assert r.read(7) == MAGIC + b"xy" + MAGIC + MAGIC + b"z"
    assert r.read(9) == b"tail"
    assert r.read_prefix(7, 3) == MAGIC + b"xy"  # stops after the piece that reaches 3 bytes
    assert r.read_prefix(9, 2) == b"ta"


def test_header_scalar_and_array_labels():
    payload = pack_header(3.0, id=5, id2=6) + b"IMG"
    header, image = unpack_record(payload)
    assert (header.flag, header.label, header.id, header.id2) == (0, 3.0, 5, 6)
    assert image == b"IMG"

    payload = pack_header([1.5, 2.0, -4.0], id=9) + b"PNG"
    header, image = unpack_record(payload)
    assert header.flag == 3
    np.testing.assert_array_equal(header.label, np.array([1.5, 2.0, -4.0], dtype=np.float32))
    assert header.id == 9 and image == b"PNG"
    assert len(pack_header(np.arange(4))) == 24 + 16

    with pytest.raises(ValueError):
        pack_header([])
    with pytest.raises(ArcFaceError, match="shorter"):
        unpack_record(b"\0" * 10, "x.rec: key 3")
    with pytest.raises(ArcFaceError, match="x.rec: key 3"):
        unpack_record(struct.pack("<IfQQ", 5, 0, 0, 0) + b"\0" * 8, "x.rec: key 3")


def test_array_and_scalar_labels_through_files(tmp_path):
    rec, _ = write_records(
        tmp_path,
        [(0, pack_header(4.0) + MAGIC + b"img0"), (1, pack_header([7.0, 1.0]) + b"img1")],
    )
    r = IndexedRecordReader(rec)
    h0, i0 = unpack_record(r.read(0))
    h1, i1 = unpack_record(r.read(1))
    assert h0.label == 4.0 and i0 == MAGIC + b"img0"
    assert h1.flag == 2 and list(h1.label) == [7.0, 1.0] and i1 == b"img1"


def _read_in_child(reader, key):
    return reader.read(key)


def test_reader_pickle_and_other_process(tmp_path):
    payloads = {k: bytes([k]) * (k + 1) + MAGIC * (k % 2) for k in range(6)}
    rec, _ = write_records(tmp_path, payloads.items())
    r = IndexedRecordReader(rec)
    assert r.read(3) == payloads[3]  # opens the file in this process
    clone = pickle.loads(pickle.dumps(r))
    assert [clone.read(k) for k in range(6)] == [payloads[k] for k in range(6)]
    # Pretend the object was inherited by another process: it must reopen, not reuse the fd.
    r._pid = -1
    assert r.read(5) == payloads[5]
    with ProcessPoolExecutor(1) as pool:
        assert pool.submit(_read_in_child, r, 1).result() == payloads[1]
    r.close()
    assert r.read(0) == payloads[0]  # reopens after close


def test_non_contiguous_keys(tmp_path):
    rec, _ = write_records(tmp_path, [(10, b"a"), (3, b"b"), (1000, b"c")])
    r = IndexedRecordReader(rec)
    assert r.keys == [10, 3, 1000]
    assert r.read(1000) == b"c" and r.read(3) == b"b"
    assert 4 not in r and 10 in r
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.read(10) == b"a"


# ---------------------------------------------------------------------------- reader errors


@pytest.fixture
def small_rec(tmp_path):
    payloads = [(0, b"first record"), (1, b"abcd" + MAGIC + b"efgh"), (2, b"last")]
    rec, idx = write_records(tmp_path, payloads, name="err")
    return rec, idx


def test_error_missing_idx(tmp_path, small_rec):
    rec, idx = small_rec
    os.remove(idx)
    with pytest.raises(ArcFaceError, match="err.idx"):
        IndexedRecordReader(rec)


def test_error_missing_rec(tmp_path):
    with pytest.raises(ArcFaceError, match="nothere.rec"):
        IndexedRecordReader(tmp_path / "nothere.rec")


@pytest.mark.parametrize("bad", ["0\t0\n1 x\n", "0\t0\n1\t2\t3\n", "0\t0\n\n5\n", "0\t0\n1\t-4\n"])
def test_error_malformed_idx_line(small_rec, bad):
    rec, idx = small_rec
    idx.write_text(bad)
    lineno = bad.rstrip("\n").count("\n") + 1
    with pytest.raises(ArcFaceError, match=rf"err\.idx: line {lineno}"):
        IndexedRecordReader(rec)


def test_error_duplicate_key(small_rec):
    rec, idx = small_rec
    idx.write_text("0\t0\n0\t0\n")
    with pytest.raises(ArcFaceError, match=r"err\.idx: line 2: key 0"):
        IndexedRecordReader(rec)


def test_error_offset_past_end(small_rec):
    rec, idx = small_rec
    size = os.path.getsize(rec)
    idx.write_text(f"0\t0\n1\t{size + 8}\n")
    with pytest.raises(ArcFaceError, match=rf"err\.idx: line 2: key 1 has offset {size + 8}.*err\.rec"):
        IndexedRecordReader(rec)
    idx.write_text("0\t0\n")
    r = IndexedRecordReader(rec)
    with pytest.raises(ArcFaceError, match=rf"err\.rec: offset {size}"):
        read_at(r, size)


def test_error_unknown_key(small_rec):
    r = IndexedRecordReader(small_rec[0])
    with pytest.raises(ArcFaceError, match=r"err\.idx: key 42"):
        r.read(42)


def test_error_bad_magic(small_rec):
    rec, idx = small_rec
    r = IndexedRecordReader(rec)
    with pytest.raises(ArcFaceError, match=r"err\.rec: offset 4: bad record magic"):
        read_at(r, 4)
    data = bytearray(rec.read_bytes())
    data[0] ^= 0xFF
    rec.write_bytes(bytes(data))
    with pytest.raises(ArcFaceError, match=r"err\.rec: key 0 at offset 0: bad record magic"):
        IndexedRecordReader(rec).read(0)


def test_error_truncated_payload(small_rec):
    rec, idx = small_rec
    data = rec.read_bytes()
    last_off = physical_records(rec)[-1][0]
    rec.write_bytes(data[: last_off + 8 + 2])  # header complete, payload "last" cut to 2 bytes
    with pytest.raises(ArcFaceError, match=rf"err\.rec: key 2 at offset {last_off}: truncated record"):
        IndexedRecordReader(rec).read(2)
    rec.write_bytes(data[: last_off + 5])  # record header itself cut
    with pytest.raises(ArcFaceError, match=r"err\.rec: key 2 .*truncated record header"):
        IndexedRecordReader(rec).read(2)


def test_error_missing_continuation(small_rec):
    rec, idx = small_rec
    recs = physical_records(rec)
    assert [c for _, c, _ in recs] == [0, 1, 3, 0]
    data = rec.read_bytes()
    # Continuation cut off by the end of the file.
    rec.write_bytes(data[: recs[2][0]])
    idx.write_text(f"1\t{recs[1][0]}\n")
    with pytest.raises(ArcFaceError, match=r"err\.rec: key 1 at offset \d+: multi-part record is missing"):
        IndexedRecordReader(rec).read(1)
    # Continuation replaced by an unrelated whole record.
    rec.write_bytes(data[: recs[2][0]] + data[recs[3][0]:])
    with pytest.raises(ArcFaceError, match=r"err\.rec: key 1 .*missing its continuation"):
        IndexedRecordReader(rec).read(1)
    # An idx offset pointing at a continuation piece.
    rec.write_bytes(data)
    idx.write_text(f"1\t{recs[2][0]}\n")
    with pytest.raises(ArcFaceError, match=r"err\.rec: key 1 .*continuation piece"):
        IndexedRecordReader(rec).read(1)


# ---------------------------------------------------------------------------- insightface layout


def make_samples(rng, num_classes=5, per_class=(1, 4)):
    samples = []
    for c in range(num_classes):
        for _ in range(int(rng.integers(*per_class))):
            img = fake_image(rng)
            if rng.random() < 0.3:
                img = img[:2] + b"\0\0" + MAGIC + img[2:]  # forces multi-part records
            samples.append((img, c))
    order = rng.permutation(len(samples))
    return [samples[i] for i in order]


def test_write_face_dataset_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    samples = make_samples(rng)
    n = len(samples)
    assert write_face_dataset(tmp_path, samples, image_size=(112, 96)) == 5
    assert (tmp_path / "property").read_text().strip() == "5,112,96"

    # Raw layout, checked with the low-level reader.
    r = IndexedRecordReader(tmp_path / "train.rec")
    assert r.keys == list(range(0, n + 1 + 5))
    h0, img0 = unpack_record(r.read(0))
    assert h0.flag == 2 and list(h0.label) == [n + 1, n + 6] and img0 == b""
    expected = sorted(samples, key=lambda s: s[1])  # stable sort keeps input order per class
    for c in range(5):
        hc, _ = unpack_record(r.read(n + 1 + c))
        first, end = map(int, hc.label)
        assert [expected[k - 1][1] for k in range(first, end)] == [c] * (end - first)
        assert end > first
    assert any(cf == 1 for _, cf, _ in physical_records(tmp_path / "train.rec"))

    ds = FaceRecordDataset(tmp_path)
    assert ds.has_header_record
    assert ds.image_keys == list(range(1, n + 1))
    assert len(ds) == n
    assert ds.num_classes == 5 and ds.image_size == (112, 96)
    assert [ds[i] for i in range(n)] == expected
    assert ds[-1] == expected[-1]
    np.testing.assert_array_equal(ds.labels(), [lab for _, lab in expected])
    assert ds.labels().dtype.kind == "i"
    with pytest.raises(IndexError):
        ds[n]

    # Same dataset opened through the .rec path; pickled copy reads too.
    ds2 = pickle.loads(pickle.dumps(FaceRecordDataset(tmp_path / "train.rec")))
    assert ds2[0] == expected[0] and ds2.num_classes == 5

    # Without property the class count comes from the labels.
    os.remove(tmp_path / "property")
    ds3 = FaceRecordDataset(tmp_path)
    assert ds3.num_classes == 5 and ds3.image_size is None


def test_num_classes_from_scan_uses_max_label(tmp_path):
    samples = [(b"a", 0), (b"b", 7), (b"c", 2)]
    assert write_face_dataset(tmp_path, samples) == 8
    os.remove(tmp_path / "property")
    ds = FaceRecordDataset(tmp_path)
    assert ds.num_classes == 8
    np.testing.assert_array_equal(ds.labels(), [0, 2, 7])


def test_headerless_im2rec_layout(tmp_path):
    rng = np.random.default_rng(2)
    images = [(fake_image(rng), int(rng.integers(0, 4))) for _ in range(9)]
    images.append((fake_image(rng), 4))
    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key, (img, lab) in enumerate(images):
            # im2rec style: scalar label, except one record with a label array [class, extra]
            label = [float(lab), 0.5] if key == 3 else float(lab)
            w.write(key, pack_header(label, id=key) + img)
    ds = FaceRecordDataset(tmp_path)
    assert not ds.has_header_record
    assert ds.image_keys == list(range(10))
    assert ds.num_classes == 5
    assert [ds[i] for i in range(10)] == images
    np.testing.assert_array_equal(ds.labels(), [lab for _, lab in images])


def test_headerless_key0_with_two_value_label_is_an_image(tmp_path):
    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_header([1.0, 3.0]) + b"jpegbytes")
        w.write(1, pack_header(0.0) + b"more")
    ds = FaceRecordDataset(tmp_path)
    assert not ds.has_header_record
    assert ds[0] == (b"jpegbytes", 1) and ds.num_classes == 2


# ---------------------------------------------------------------------------- dataset errors


def test_dataset_folder_without_files(tmp_path):
    with pytest.raises(ArcFaceError, match="train.rec"):
        FaceRecordDataset(tmp_path)
    (tmp_path / "train.rec").write_bytes(b"")
    with pytest.raises(ArcFaceError, match="train.idx"):
        FaceRecordDataset(tmp_path)
    with pytest.raises(ArcFaceError, match="nope"):
        FaceRecordDataset(tmp_path / "nope")


@pytest.mark.parametrize("label", [-1.0, 2.5, float("nan")])
def test_dataset_rejects_bad_labels(tmp_path, label):
    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_header(0.0) + b"ok")
        w.write(1, pack_header(label) + b"bad")
    (tmp_path / "property").write_text("3,112,112")
    ds = FaceRecordDataset(tmp_path)
    assert ds[0] == (b"ok", 0)
    with pytest.raises(ArcFaceError, match=r"train\.rec: key 1: label"):
        ds[1]
    with pytest.raises(ArcFaceError, match=r"train\.rec: key 1"):
        ds.labels()


def test_dataset_bad_property_and_header(tmp_path):
    write_face_dataset(tmp_path, [(b"x", 0), (b"y", 1)])
    (tmp_path / "property").write_text("two,112,112")
    with pytest.raises(ArcFaceError, match="property"):
        FaceRecordDataset(tmp_path)
    os.remove(tmp_path / "property")
    # Header announcing more image keys than the idx has.
    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_header([5.0, 7.0]))
        w.write(1, pack_header(0.0) + b"img")
    with pytest.raises(ArcFaceError, match=r"key 0: header record announces images 1\.\.4 .* does not fit the index"):
        FaceRecordDataset(tmp_path)


def test_write_face_dataset_rejects_bad_input(tmp_path):
    with pytest.raises(ArcFaceError, match="no samples"):
        write_face_dataset(tmp_path / "a", [])
    with pytest.raises(ArcFaceError, match="sample 1"):
        write_face_dataset(tmp_path / "b", [(b"x", 0), (b"y", -2)])
    with pytest.raises(ArcFaceError, match="sample 0"):
        write_face_dataset(tmp_path / "c", [(b"x", 1.5)])
