"""Data tools: rec2jpg, pack_rec, MindRecord conversion and training input, datainfo, corrupt inputs,
and the byte-by-byte MXNet RecordIO fixture in tests/data."""
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from src import datainfo, mindrecord, pack_rec, rec2jpg_dataset
from src.cli import run_main
from src.data.face_rec import FaceRecordDataset, write_face_dataset
from src.data.pipeline import checked_iterator, create_train_dataset
from src.data.recordio import IndexedRecordReader, IndexedRecordWriter, pack_header, scan_records, unpack_record
from src.data.sources import ImageFolderSource, MindRecordSource, detect_kind, open_source, resolve_num_classes
from src.errors import ArcFaceError

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
FIXTURE = DATA / "mxnet_rec"


def face(seed, size=112, ext=".jpg"):
    """A smooth synthetic image, encoded (a few KB at 112x112)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
    return cv2.imencode(ext, image)[1].tobytes()


def make_folder(root, classes, per_class=3, png_at=None):
    """ImageFolder with the given class folder names; the image number `png_at` is a PNG."""
    n = 0
    for name in classes:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            ext = ".png" if n == png_at else ".jpg"
            (root / name / f"img{k}{ext}").write_bytes(face(n, ext=ext))
            n += 1
    return root


def folder_samples(path):
    source = ImageFolderSource(str(path))
    return [(data, label) for _, data, label, _ in source.samples()]


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_log():
    """Warnings of the 'arcface' logger (a training run may have stopped its propagation)."""
    handler = Records()
    logger = logging.getLogger("arcface")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Folder of 12 identities x 3 (numeric names incl. 10, 11; one PNG; a notes file; an empty
    folder), its RecordIO pack and its MindRecord conversion."""
    root = tmp_path_factory.mktemp("base")
    folder = make_folder(root / "folder", [str(c) for c in range(13) if c != 5], png_at=4)
    (folder / "5").mkdir()  # empty class folder: no label
    (folder / "3" / "notes.txt").write_text("not an image")
    summary = pack_rec.pack(str(folder), str(root / "rec"), no_progress=True)
    mr = mindrecord.convert(str(root / "rec"), str(root / "mr"), shards=3, no_progress=True)
    return {"root": root, "folder": folder, "rec": root / "rec", "mr": root / "mr", "pack": summary, "mindrecord": mr}


# ---------------------------------------------------------------------------- fixture (MXNet layout)


def test_fixture_is_read_exactly():
    expected = json.loads((DATA / "mxnet_rec_expected.json").read_text())
    pixels = np.load(DATA / "mxnet_rec_pixels.npy")
    ds = FaceRecordDataset(FIXTURE)
    assert ds.has_header_record and ds.num_classes == expected["num_classes"] and ds.image_size == (8, 8)
    assert ds.image_keys == expected["image_keys"]
    assert ds.labels().tolist() == expected["labels"]
    for i in range(len(ds)):
        data, label = ds[i]
        assert label == expected["labels"][i]
        assert hashlib.sha256(data).hexdigest() == expected["sha256"][i]
        decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(decoded, pixels[i])
    # Physical layout: offsets, payload sizes and the 3-piece record, by walking and through the index.
    records = expected["records"]
    walked = list(scan_records(FIXTURE / "train.rec"))
    assert [w[0] for w in walked] == [records[k]["offset"] for k in sorted(records, key=int)]
    assert {str(k): (o, n) for k, (o, n, _) in zip(sorted(map(int, records)), walked)} == \
        {k: (r["offset"], r["payload_size"]) for k, r in records.items()}
    assert [p for _, _, p in walked].count(3) == 1 and records["4"]["pieces"][1] == [2, 4]
    for k, r in records.items():
        assert ds.reader.payload_size(int(k)) == r["payload_size"]
    # Identity records and the header.
    header, _ = unpack_record(ds.reader.read(0))
    assert header.label.tolist() == expected["header"]
    for c, rng in enumerate(expected["identity_ranges"]):
        assert unpack_record(ds.reader.read(expected["header"][0] + c))[0].label.tolist() == rng


def test_our_writer_reproduces_the_fixture_bytes(tmp_path):
    reader = IndexedRecordReader(FIXTURE / "train.rec")
    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key in reader.keys:
            writer.write(key, reader.read(key))
    assert (tmp_path / "train.rec").read_bytes() == (FIXTURE / "train.rec").read_bytes()
    assert (tmp_path / "train.idx").read_text() == (FIXTURE / "train.idx").read_text()


def test_rec2jpg_on_fixture_is_bit_identical(tmp_path, capsys):
    expected = json.loads((DATA / "mxnet_rec_expected.json").read_text())
    assert rec2jpg_dataset.main(["--include", str(FIXTURE), "--output", str(tmp_path / "out"), "--workers", "2"]) == 0
    assert "3 identities, 5 images" in capsys.readouterr().out
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["0/00000001.jpg", "0/00000002.jpg", "1/00000003.jpg", "2/00000004.jpg", "2/00000005.png"]
    digests = [hashlib.sha256((tmp_path / "out" / f).read_bytes()).hexdigest() for f in files]
    assert digests == expected["sha256"]
    # --format png: lossless re-encoding of the decoded pixels.
    assert rec2jpg_dataset.main(["--include", str(FIXTURE / "train.rec"), "--output", str(tmp_path / "png"),
                                 "--format", "png"]) == 0
    pngs = sorted((tmp_path / "png").rglob("*.png"))
    assert [p.name for p in pngs] == [f"0000000{k}.png" for k in range(1, 6)]
    pixels = np.load(DATA / "mxnet_rec_pixels.npy")
    for p, expected_pixels in zip(pngs, pixels):
        decoded = cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(decoded, expected_pixels)


def test_datainfo_on_fixture(capsys):
    assert datainfo.main([str(FIXTURE), "--verify"]) == 0
    out = capsys.readouterr().out
    for line in ["kind         recordio, insightface layout", "identities   3 (labels 0..2)", "images       5",
                 "per identity min 1 / median 2 / max 2", "image size   8x8 (JPEG, first image)",
                 "property     3,8,8: consistent with the labels",
                 "index        9 records in train.rec, 9 idx lines: every offset starts a record",
                 "3 identity records: consistent with the image labels",
                 "verify       5 images decoded: 0 bad, all 8x8", "result       ok"]:
        assert line in out, out


# ---------------------------------------------------------------------------- round trips


def test_folder_to_rec_to_folder_is_lossless(base, tmp_path, capsys):
    s = base["pack"]
    assert (s["identities"], s["images"], s["skipped_files"], s["empty_classes"], s["bad"]) == (12, 36, 1, 1, 0)
    assert (base["rec"] / "property").read_text() == "12,112,112\n"
    assert (base["rec"] / "classes.txt").read_text().split() == [str(c) for c in range(13) if c != 5]
    assert rec2jpg_dataset.main(["--include", str(base["rec"]), "--output", str(tmp_path / "back")]) == 0
    summary = capsys.readouterr().out
    assert "12 identities, 36 images" in summary and "36 written" in summary and "0 skipped" in summary
    # Zero-padded class folders: name order == numeric order, labels kept.
    assert sorted(os.listdir(tmp_path / "back")) == [f"{c:02d}" for c in range(12)]
    assert (tmp_path / "back" / "01" / "00000005.png").is_file()  # the PNG keeps its format
    original = folder_samples(base["folder"])
    assert folder_samples(tmp_path / "back") == original  # same bytes, same labels, same order
    assert [label for _, label in original] == [c for c in range(12) for _ in range(3)]


def test_write_face_dataset_streams_sorted_input_and_sorts_unsorted(tmp_path):
    samples = [(face(i, size=8), c) for i, c in enumerate([0, 0, 1, 2, 2, 2, 4])]
    assert write_face_dataset(tmp_path / "a", iter(samples)) == 5  # generator, already ordered
    shuffled = [samples[i] for i in (6, 2, 0, 3, 1, 4, 5)]
    assert write_face_dataset(tmp_path / "b", shuffled) == 5  # two passes
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert sorted(os.listdir(tmp_path / "b")) == ["property", "train.idx", "train.rec"]  # no temporaries left
    ds = FaceRecordDataset(tmp_path / "a")
    assert [ds[i] for i in range(len(ds))] == samples


def test_rec2jpg_resumes(tmp_path, base, capsys):
    out = tmp_path / "out"
    args = ["--include", str(base["rec"]), "--output", str(out), "--workers", "3"]
    assert rec2jpg_dataset.main(args) == 0
    capsys.readouterr()
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    files[3].unlink()
    with open(files[7], "r+b") as fh:
        fh.truncate(100)
    mtimes = {p: p.stat().st_mtime_ns for p in files if p not in (files[3], files[7])}
    assert rec2jpg_dataset.main(args) == 0
    summary = capsys.readouterr().out
    assert "2 written" in summary and "34 skipped (already complete)" in summary, summary
    assert {p: p.read_bytes() for p in files} == before
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # untouched
    assert not list(out.rglob(".tmp-*"))


def test_rec2jpg_layouts_and_no_read_past_the_last_image(tmp_path, capsys):
    # im2rec layout: every key is an image, keys from 0.
    small_rec(tmp_path / "im2rec", headerless=True)
    assert rec2jpg_dataset.main(["--include", str(tmp_path / "im2rec"), "--output", str(tmp_path / "a")]) == 0
    names = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.jpg"))
    assert names == ["0/00000000.jpg", "0/00000001.jpg", "1/00000002.jpg", "1/00000003.jpg", "2/00000004.jpg",
                     "2/00000005.jpg"]
    # insightface layout: the identity records after the images are never read, so damaging them
    # does not matter to the conversion (datainfo does notice).
    path = small_rec(tmp_path / "insightface")
    offsets = idx_offsets(path)
    with open(path / "train.rec", "r+b") as fh:
        fh.seek(offsets[7])
        fh.write(b"\0" * 8)
    assert rec2jpg_dataset.main(["--include", str(path), "--output", str(tmp_path / "b")]) == 0
    assert "3 identities, 6 images" in capsys.readouterr().out
    assert datainfo.main([str(path)]) == 1
    assert f"offset {offsets[7]}: bad record magic" in capsys.readouterr().out


def test_three_input_kinds_give_the_same_samples(base, tmp_path):
    assert detect_kind(str(base["mr"])) == "mindrecord"
    assert sorted(os.listdir(base["mr"])) == ["class_counts.npy", "property"] + [
        f"train.mindrecord{i}{db}" for i in range(3) for db in ("", ".db")]
    report = io.StringIO()
    assert datainfo.describe(str(base["mr"]), verify=True, out=report) == 0, report.getvalue()
    assert "verify       36 images decoded: 0 bad, all 112x112" in report.getvalue()
    assert base["mindrecord"]["images"] == 36 and base["mindrecord"]["identities"] == 12
    # A second MindRecord straight from the ImageFolder.
    assert mindrecord.main(["--input", str(base["folder"]), "--output", str(tmp_path / "mr_folder")]) == 0
    paths = {"folder": base["folder"], "rec": base["rec"], "mr": base["mr"], "mr_folder": tmp_path / "mr_folder"}
    sources = {name: open_source(str(path)) for name, path in paths.items()}
    assert sources["mr"].kind == "mindrecord" and len(sources["mr"]) == 36
    expected = sorted(folder_samples(base["folder"]))
    for name, source in sources.items():
        assert resolve_num_classes(source, 0) == 12, name
        np.testing.assert_array_equal(np.sort(source.labels()), np.repeat(np.arange(12), 3))
        samples = [(data, label) for _, data, label, _ in source.samples()]
        assert sorted(samples) == expected, name

    def pipeline_samples(source, **kw):
        """(label, image) pairs out of the training pipeline, the image un-normalised and put in a
        canonical orientation (the pipeline flips at random)."""
        out = []
        dataset = create_train_dataset(source, 6, num_workers=2, shuffle=False, **kw)
        for images, labels in checked_iterator(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)):
            for image, label in zip(images, labels):
                pixels = np.rint(image * 127.5 + 127.5).astype(np.uint8).transpose(1, 2, 0)
                out.append((int(label), min(pixels.tobytes(), pixels[:, ::-1].tobytes())))
        return sorted(out)

    reference = pipeline_samples(sources["rec"])
    assert len(reference) == 36
    assert pipeline_samples(sources["mr"]) == reference
    assert pipeline_samples(sources["folder"]) == reference
    # Sharded by rank: two halves that together make the whole set.
    labels = [np.concatenate([b[1] for b in create_train_dataset(sources["mr"], 6, rank, 2, 1, shuffle=False)
                              .create_tuple_iterator(num_epochs=1, output_numpy=True)]) for rank in (0, 1)]
    assert len(labels[0]) == len(labels[1]) == 18
    assert sorted(np.concatenate(labels).tolist()) == sorted(label for label, _ in reference)


@pytest.mark.slow
def test_training_on_a_mindrecord_folder(base, tmp_path):
    import train
    out = tmp_path / "run"
    assert train.main(["--data_url", str(base["mr"]), "--train_url", str(out), "--network", "r18", "--width", "8",
                       "--batch_size", "8", "--epochs", "1", "--max_steps", "2", "--num_workers", "1",
                       "--mode", "pynative"]) == 0
    assert (out / "ArcFace-1_2.ckpt").is_file()
    assert "mindrecord" in (out / "train.log").read_text()


# ---------------------------------------------------------------------------- pack_rec input checks


def test_pack_rec_checks_images(tmp_path, capsys):
    folder = make_folder(tmp_path / "in", ["0", "1"], per_class=2)
    (folder / "1" / "small.jpg").write_bytes(face(50, size=64))
    assert run_main(pack_rec.main, ["--input", str(folder), "--output", str(tmp_path / "a")]) == 2
    line = error_line(capsys)
    assert "1/small.jpg: is 64x64, expected 112x112" in line and "--resize" in line
    # --resize: resized, stored as JPEG.
    assert pack_rec.main(["--input", str(folder), "--output", str(tmp_path / "b"), "--resize"]) == 0
    assert "1 resized" in capsys.readouterr().out
    ds = FaceRecordDataset(tmp_path / "b")
    resized = [ds[i][0] for i in range(len(ds)) if ds[i][1] == 1]
    assert all(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR).shape == (112, 112, 3) for b in resized)
    # Undecodable image: error naming the file, or skipped and counted with --skip_bad.
    (folder / "1" / "small.jpg").unlink()
    (folder / "0" / "broken.jpg").write_bytes(face(51)[:300])
    assert run_main(pack_rec.main, ["--input", str(folder), "--output", str(tmp_path / "c")]) == 2
    assert "0/broken.jpg: truncated JPEG" in error_line(capsys)
    assert not (tmp_path / "c" / "train.rec").exists()  # nothing half-written
    assert pack_rec.main(["--input", str(folder), "--output", str(tmp_path / "c"), "--skip_bad"]) == 0
    captured = capsys.readouterr()
    assert "packed 4 images of 2 identities" in captured.out and "1 bad images skipped" in captured.out
    assert "broken.jpg" in captured.err
    # Existing output is not replaced silently; nothing at all to pack is an error.
    assert run_main(pack_rec.main, ["--input", str(folder), "--output", str(tmp_path / "c")]) == 2
    assert "pass --overwrite" in error_line(capsys)
    (tmp_path / "empty" / "0").mkdir(parents=True)
    assert run_main(pack_rec.main, ["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "d")]) == 2
    assert "contains no images" in error_line(capsys)


# ---------------------------------------------------------------------------- corrupt inputs


def small_rec(path, n=6, headerless=False, bad=None):
    """A record dataset of n 112x112 images in 3 classes; `bad` maps image index -> bytes."""
    samples = [((bad or {}).get(i, face(100 + i)), i * 3 // n) for i in range(n)]
    if headerless:
        path.mkdir(parents=True)
        with IndexedRecordWriter(path / "train.rec", path / "train.idx") as w:
            for key, (data, label) in enumerate(samples):
                w.write(key, pack_header(float(label), id=key) + data)
    else:
        write_face_dataset(path, samples)
    return path


def idx_offsets(path):
    return {int(k): int(o) for k, o in (line.split("\t") for line in (path / "train.idx").read_text().splitlines())}


def corrupt(case, path):
    """Damage a small dataset; returns the regex the error must match."""
    if case == "bad_magic":
        small_rec(path)
        off = idx_offsets(path)[2]
        with open(path / "train.rec", "r+b") as fh:
            fh.seek(off)
            fh.write(b"\0\0\0\0")
        return rf"train\.rec: key 2 at offset {off}: bad record magic"
    if case == "truncated_last":
        small_rec(path, headerless=True)
        off = idx_offsets(path)[5]
        os.truncate(path / "train.rec", off + 100)
        return rf"train\.rec: key 5 at offset {off}: truncated record"
    if case == "idx_past_end":
        small_rec(path)
        lines = (path / "train.idx").read_text().splitlines()
        lines[3] = "3\t999999"
        (path / "train.idx").write_text("\n".join(lines) + "\n")
        return r"train\.idx: line 4: key 3 has offset 999999, past the end of .*train\.rec"
    if case == "idx_missing":
        small_rec(path)
        (path / "train.idx").unlink()
        return r"train\.rec but no train\.idx|missing train\.idx"
    if case == "not_an_image":
        small_rec(path, bad={3: b"this is not an image at all"})
        off = idx_offsets(path)[4]
        return rf"train\.rec: key 4 at offset {off}: not a JPEG/PNG/BMP image"
    if case == "label_negative":
        small_rec(path, headerless=True)
        with IndexedRecordWriter(path / "train.rec", path / "train.idx") as w:
            w.write(0, pack_header(0.0) + face(1))
            w.write(1, pack_header(-1.0) + face(2))
        return r"train\.rec: key 1: label -1\.0 is not a non-negative integer class id"
    if case == "label_too_large":
        small_rec(path)
        (path / "property").write_text("2,112,112\n")
        off = idx_offsets(path)[5]
        return rf"train\.rec: key 5 at offset {off}: label 2 is out of range: .*property declares 2 classes"
    raise AssertionError(case)


CASES = ["bad_magic", "truncated_last", "idx_past_end", "idx_missing", "not_an_image", "label_negative",
         "label_too_large"]


@pytest.mark.parametrize("case", CASES)
def test_corrupt_input_gives_one_clear_error(case, tmp_path, capsys):
    pattern = corrupt(case, tmp_path / "data")
    data = str(tmp_path / "data")
    # rec2jpg and the MindRecord converter stop with one line naming the file and the record.
    assert run_main(rec2jpg_dataset.main, ["--include", data, "--output", str(tmp_path / "jpg")]) == 2
    assert re.search(pattern, error_line(capsys)), case
    assert run_main(mindrecord.main, ["--input", data, "--output", str(tmp_path / "mr")]) == 2
    assert re.search(pattern, error_line(capsys)), case
    assert not list((tmp_path / "mr").glob("*.mindrecord*"))  # nothing half-written
    # datainfo: a structural problem (exit 1) or an unreadable dataset (exit 2), never a traceback.
    code = run_main(datainfo.main, [data, "--verify"])
    captured = capsys.readouterr()
    assert code in (1, 2) and re.search(pattern, captured.out + captured.err), (case, captured)


def test_the_converters_share_one_policy_for_bad_images(tmp_path, capsys):
    """rec2jpg, mindrecord and pack_rec stop at a bad image with one line naming it; --skip_bad leaves it
    out, lists it at the end and counts it in the summary; when no usable image is left, they stop."""
    rec = small_rec(tmp_path / "rec", bad={2: b"not an image"})
    folder = make_folder(tmp_path / "folder", ["0", "1"], per_class=2)
    (folder / "1" / "img1.jpg").write_bytes(b"not an image")
    record = f"key 3 at offset {idx_offsets(rec)[3]}: not a JPEG/PNG/BMP image"
    tools = {"rec2jpg": (rec2jpg_dataset.main, ["--include", str(rec)], record),
             "mindrecord": (mindrecord.main, ["--input", str(rec)], record),
             "pack_rec": (pack_rec.main, ["--input", str(folder)], "1/img1.jpg: not a JPEG/PNG/BMP image")}
    for name, (main, args, problem) in tools.items():
        assert run_main(main, args + ["--output", str(tmp_path / name / "stop")]) == 2
        line = error_line(capsys)
        assert problem in line and line.endswith("(use --skip_bad to skip such images)"), (name, line)
        assert run_main(main, args + ["--output", str(tmp_path / name / "skip"), "--skip_bad"]) == 0
        captured = capsys.readouterr()
        assert "1 bad images skipped" in captured.out, (name, captured.out)
        warnings = [line for line in captured.err.splitlines() if line.startswith("warning: skipped ")]
        assert len(warnings) == 1 and problem in warnings[0], (name, captured.err)
    # Nothing usable left.
    rec = small_rec(tmp_path / "all_bad_rec", n=3, bad={i: b"junk" for i in range(3)})
    for path in folder.rglob("*.jpg"):
        path.write_bytes(b"junk")
    for name, (main, args, _) in tools.items():
        data, images = (folder, 4) if name == "pack_rec" else (rec, 3)
        assert run_main(main, [args[0], str(data), "--output", str(tmp_path / name / "none"), "--skip_bad"]) == 2
        captured = capsys.readouterr()
        assert f"error: {data}: no usable image (all {images} were skipped as bad)" in captured.err, name
        assert captured.err.count("warning: skipped ") == images, (name, captured.err)


def test_training_stops_on_an_undecodable_record_or_skips_it(tmp_path, warnings_log):
    truncated = face(200)[:-200]
    path = small_rec(tmp_path / "data", n=8, bad={5: truncated})
    source = open_source(str(path))
    dataset = create_train_dataset(source, 4, num_workers=1, shuffle=False)
    off = idx_offsets(path)[6]
    with pytest.raises(ArcFaceError, match=rf"train\.rec: key 6 at offset {off}: truncated JPEG.*skip_corrupt"):
        for _ in checked_iterator(dataset.create_tuple_iterator(num_epochs=1)):
            pass
    dataset = create_train_dataset(source, 4, num_workers=1, shuffle=False, skip_corrupt=True)
    batches = list(checked_iterator(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)))
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 112, 112)
    labels = np.concatenate([b[1] for b in batches]).tolist()
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2]  # image 5 (label 2) replaced by the last good one, image 4
    assert any(f"key 6 at offset {off}" in m for m in warnings_log)
    # datainfo --verify lists it with key and offset.
    assert datainfo.describe(str(path), verify=True) == 1


def test_mindrecord_pipeline_with_a_bad_image(tmp_path, warnings_log):
    """A MindRecord not written by our converter may hold an undecodable image."""
    from mindspore.mindrecord import FileWriter
    folder = tmp_path / "mr"
    folder.mkdir()
    writer = FileWriter(str(folder / "train.mindrecord0"), shard_num=1, overwrite=True)
    writer.add_schema(mindrecord.SCHEMA, "test")
    rows = [{"image": face(300 + i), "label": i // 2, "key": 10 + i} for i in range(8)]
    rows[3]["image"] = b"garbage, not an image"
    writer.write_raw_data(rows)
    writer.commit()
    np.save(folder / "class_counts.npy", np.full(4, 2, np.int64))
    (folder / "property").write_text("4,112,112\n")
    source = open_source(str(folder))
    with pytest.raises(ArcFaceError, match=r"mr: MindRecord key 13: not a JPEG/PNG/BMP image.*datainfo --verify"):
        for _ in checked_iterator(create_train_dataset(source, 4, num_workers=1, shuffle=False)
                                  .create_tuple_iterator(num_epochs=1)):
            pass
    batches = list(checked_iterator(create_train_dataset(source, 4, num_workers=1, shuffle=False, skip_corrupt=True)
                                    .create_tuple_iterator(num_epochs=1, output_numpy=True)))
    assert np.concatenate([b[1] for b in batches]).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # label kept from key 12
    assert any("MindRecord key 13" in m for m in warnings_log)
    out = tmp_path / "info.txt"
    with open(out, "w") as fh:
        assert datainfo.describe(str(folder), verify=True, out=fh) == 1
    assert "bad image: " in out.read_text() and "MindRecord key 13: not a JPEG/PNG/BMP image" in out.read_text()


def test_datainfo_reports_problems(tmp_path, capsys):
    path = small_rec(tmp_path / "data", bad={2: face(9)[:-300]})
    assert datainfo.main([str(path)]) == 0  # without --verify the images are not decoded
    assert "result       ok" in capsys.readouterr().out
    assert datainfo.main([str(path), "--verify"]) == 1
    out = capsys.readouterr().out
    off = idx_offsets(path)[3]
    assert f"problem: bad image: {path / 'train.rec'}: key 3 at offset {off}: truncated JPEG" in out
    assert "verify       6 images decoded: 1 bad, the others 112x112" in out
    # An idx offset that does not start a record, and property disagreeing with the labels.
    offsets = idx_offsets(path)
    lines = [f"{k}\t{o + 4 if k == 4 else o}" for k, o in offsets.items()]
    (path / "train.idx").write_text("\n".join(lines) + "\n")
    (path / "property").write_text("3,96,96\n")
    assert datainfo.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert f"train.idx: key 4 has offset {offsets[4] + 4}, which is not the start of a record" in out
    assert "declares 96x96 images, the first image is 112x112" in out
    assert "1 offset(s) not at a record, 1 record(s) not listed" in out


def test_imagefolder_problems_and_kinds(tmp_path, warnings_log):
    folder = make_folder(tmp_path / "f", ["a", "b"], per_class=1)
    (folder / "c").mkdir()
    (folder / "b" / "readme.md").write_text("x")
    source = ImageFolderSource(str(folder))
    assert source.classes == ["a", "b"] and source.empty_classes == ["c"] and len(source.skipped_files) == 1
    assert any("1 class folder(s) without images skipped" in m for m in warnings_log)
    both = small_rec(tmp_path / "both")
    shutil.copy(FIXTURE / "train.rec", both / "x.mindrecord0")
    with pytest.raises(ArcFaceError, match="both RecordIO .* and MindRecord"):
        detect_kind(str(both))
    with pytest.raises(ArcFaceError, match=r"x\.mindrecord0\.db is missing"):
        MindRecordSource(str(both))


# ---------------------------------------------------------------------------- command lines


@pytest.mark.parametrize("module", [rec2jpg_dataset, pack_rec, mindrecord, datainfo])
def test_help_exits_zero(module, capsys):
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_tools_run_as_scripts_and_modules():
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    for cmd in ([sys.executable, "src/rec2jpg_dataset.py", "--help"], [sys.executable, "-m", "src.datainfo", "--help"]):
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
    result = subprocess.run([sys.executable, "src/datainfo.py", str(FIXTURE)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "result       ok" in result.stdout, result.stderr
    result = subprocess.run([sys.executable, "src/datainfo.py", str(DATA / "nope")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: training data folder not found")


def test_the_model_zoo_command_and_the_module_commands_run_from_the_repository(tmp_path):
    """`python src/rec2jpg_dataset.py --include ... --output ...` as the model zoo runs it, and the other tools
    as `python -m src.<tool>` as documented."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    result = run("src/rec2jpg_dataset.py", "--include", str(FIXTURE), "--output", str(tmp_path / "jpg"))
    assert result.returncode == 0 and "3 identities, 5 images" in result.stdout, result.stderr
    assert len([p for p in (tmp_path / "jpg").rglob("*") if p.is_file()]) == 5
    folder = make_folder(tmp_path / "folder", ["0", "1"], per_class=1)
    result = run("-m", "src.pack_rec", "--input", str(folder), "--output", str(tmp_path / "rec"))
    assert result.returncode == 0 and "packed 2 images of 2 identities" in result.stdout, result.stderr
    for module in ("src.rec2jpg_dataset", "src.mindrecord", "src.partial_fc"):
        result = run("-m", module, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout, (module, result.stderr)
