"""Describe and check a training set: RecordIO folder, ImageFolder or MindRecord folder.

Prints the kind, the number of identities and images, images per identity (min / median /
max), the image size (of the first image), the label range, and checks
- RecordIO: the `property` file against the labels, the identity records of the insightface
  layout against the image labels, and `train.idx` against `train.rec` (the file is walked
  record by record: every idx offset must start a record and every record must be listed);
- ImageFolder: empty class folders and files that are not images;
- MindRecord: `property` and `class_counts.npy` against the shards.
--verify also decodes every image and checks that all have the size of the first one, listing
bad ones with their key and offset (or file).

Exit code: 0 when everything is consistent, 1 when problems were found (each printed on a
`problem:` line), 2 when the dataset cannot be read at all.

  python -m src.datainfo /data/faces_emore --verify
"""
import argparse
import array
import os
import sys
import time

if not __package__:  # run as a script: make `src` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from src.cli import run_main  # noqa: E402
from src.dataset import (CLASS_COUNTS_NAME, ImageFolderSource, MindRecordSource, check_image_bytes,  # noqa: E402
                         decode_image, detect_kind, image_format, parallel_map)
from src.errors import ArcFaceError  # noqa: E402
from src.recordio import FaceRecordDataset, scan_records, unpack_record  # noqa: E402

SHOWN = 20  # problems of one kind printed in full


class Report:
    """Collects `name  value` lines and problems, printing lines as they come."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.problems = []
        self._hidden = {}

    def line(self, name, text):
        print(f"{name:<13}{text}", file=self.out, flush=True)

    def problem(self, text, kind=None):
        if kind is not None:
            self._hidden[kind] = self._hidden.get(kind, 0) + 1
            if self._hidden[kind] > SHOWN:
                return
        self.problems.append(text)

    def problems_of(self, kind, indices, text):
        """One problem per index (text(i)), printing the first SHOWN and counting the rest."""
        for i in indices[:SHOWN]:
            self.problem(text(int(i)), kind)
        if len(indices) > SHOWN:
            self._hidden[kind] = self._hidden.get(kind, 0) + len(indices) - SHOWN

    def finish(self):
        for text in self.problems:
            print(f"problem: {text}", file=self.out)
        for kind, count in self._hidden.items():
            if count > SHOWN:
                print(f"problem: ... and {count - SHOWN} more {kind}", file=self.out)
        total = len(self.problems) + sum(max(0, c - SHOWN) for c in self._hidden.values())
        print(f"{'result':<13}{'ok' if not total else f'{total} problem(s)'}", file=self.out)
        return 1 if total else 0


def per_identity(counts):
    counts = np.asarray(counts)
    counts = counts[counts > 0]
    if counts.size == 0:
        return "-"
    return f"min {int(counts.min())} / median {float(np.median(counts)):g} / max {int(counts.max())}"


def label_lines(rep, labels):
    counts = np.bincount(labels) if labels.size else np.zeros(0, np.int64)
    identities = int((counts > 0).sum())
    rng = f"labels {int(labels.min())}..{int(labels.max())}" if labels.size else "no labels"
    gaps = len(counts) - identities
    rep.line("identities", f"{identities} ({rng}{f', {gaps} label(s) without images' if gaps else ''})")
    rep.line("images", f"{labels.size}")
    rep.line("per identity", per_identity(counts))
    return counts


def size_text(shape, data):
    fmt = (image_format(data) or "unknown format").upper()
    return f"{shape[1]}x{shape[0]} ({fmt}, first image)"


def verify_text(count, bad, wrong, size):
    text = f"{count} images decoded: {bad} bad"
    if size is not None:
        h, w = size
        text += f", {wrong} not {w}x{h}" if wrong else f", {'the others' if bad else 'all'} {w}x{h}"
    return text


def verify_images(rep, count, read, where, workers, expected_size, no_progress):
    """Decode `count` images (read(i) -> bytes, may raise ArcFaceError); report the bad ones and
    those whose size differs from expected_size."""
    def check(i):
        try:
            data = read(i)
        except ArcFaceError as exc:  # its message already names the file and record
            return i, str(exc), None
        image = decode_image(data)
        if image is None:
            return i, f"{where(i)}: {check_image_bytes(data) or 'cannot be decoded'}", None
        return i, None, image.shape[:2]

    bad = wrong_size = 0
    with tqdm(total=count, unit="img", disable=no_progress, desc="verify") as bar:
        for i, reason, shape in parallel_map(check, range(count), workers):
            bar.update(1)
            if reason is not None:
                bad += 1
                rep.problem(f"bad image: {reason}", "bad images")
            elif expected_size is not None and tuple(shape) != tuple(expected_size):
                wrong_size += 1
                rep.problem(f"{where(i)}: image is {shape[1]}x{shape[0]}, the first one is "
                            f"{expected_size[1]}x{expected_size[0]}", "images of another size")
    rep.line("verify", verify_text(count, bad, wrong_size, expected_size))


def check_index(rep, ds, no_progress):
    """Walk train.rec and compare its records with train.idx."""
    keys, offsets = ds.reader.index_arrays()
    starts = array.array("q")
    walk_error = None
    with tqdm(total=os.path.getsize(ds.rec_path), unit="B", unit_scale=True, disable=no_progress,
              desc="index") as bar:
        last = 0
        try:
            for offset, _, _ in scan_records(ds.rec_path):
                starts.append(offset)
                if offset - last > (1 << 24):
                    bar.update(offset - last)
                    last = offset
        except ArcFaceError as exc:
            walk_error = str(exc)
            rep.problem(walk_error)
        bar.update(bar.total - last)
    starts = np.frombuffer(starts, dtype=np.int64) if len(starts) else np.zeros(0, np.int64)
    known = np.isin(offsets, starts)
    limit = int(starts[-1]) if starts.size else -1
    # After a broken record the walk stops: offsets beyond it cannot be checked.
    misplaced = np.flatnonzero(~known & (offsets <= limit if walk_error else True))
    rep.problems_of("misplaced idx offsets", misplaced,
                    lambda j: f"{ds.reader.idx_path}: key {int(keys[j])} has offset {int(offsets[j])}, which is "
                              f"not the start of a record in {ds.rec_path}")
    unlisted = int(starts.size - np.isin(starts, offsets).sum())
    if unlisted and not walk_error:
        rep.problem(f"{ds.rec_path}: {unlisted} record(s) are not listed in {ds.reader.idx_path}")
    text = f"{starts.size} records in {os.path.basename(ds.rec_path)}, {len(keys)} idx lines"
    if walk_error:
        text += ": the record file is damaged (see problems)"
    elif not misplaced.size and not unlisted and starts.size == len(keys):
        text += ": every offset starts a record"
    else:
        text += f": {misplaced.size} offset(s) not at a record, {unlisted} record(s) not listed"
    rep.line("index", text)


def check_identity_records(rep, ds, labels):
    """insightface layout: identity record c must announce exactly the images labelled c."""
    header, _ = unpack_record(ds.reader.read(0), f"{ds.rec_path}: key 0")
    first_id, end = (int(v) for v in header.label)
    expected = np.full(len(ds), -1, dtype=np.int64)
    problems = 0
    for c, key in enumerate(range(first_id, end)):
        where = f"{ds.rec_path}: identity record key {key}"
        try:
            record, _ = unpack_record(ds.reader.read(key), where)
        except ArcFaceError as exc:
            rep.problem(str(exc), "identity record problems")
            problems += 1
            continue
        if record.flag < 2:
            rep.problem(f"{where}: expected a [first, end) key range, found a scalar label", "identity record problems")
            problems += 1
            continue
        a, b = int(record.label[0]), int(record.label[1])
        if not 1 <= a <= b <= first_id:
            rep.problem(f"{where}: key range [{a}, {b}) is outside the images 1..{first_id - 1}",
                        "identity record problems")
            problems += 1
            continue
        expected[a - 1:b - 1] = c
    mismatch = np.flatnonzero((expected != labels) & (labels >= 0))
    rep.problems_of("label/identity mismatches", mismatch,
                    lambda i: f"{ds.where(i)}: label {int(labels[i])}, but " + (
                        f"the identity records put it in class {int(expected[i])}" if expected[i] >= 0
                        else "no readable identity record covers it"))
    problems += mismatch.size
    rep.line("identity rec", f"{end - first_id} identity records: "
             + ("consistent with the image labels" if not problems else f"{problems} problem(s)"))


def info_recordio(rep, path, verify, workers, no_progress):
    ds = FaceRecordDataset(path)
    layout = ("insightface layout (header record at key 0, identity records)" if ds.has_header_record
              else "im2rec layout (no header record)")
    rep.line("kind", f"recordio, {layout}")
    check_index(rep, ds, no_progress)
    labels = np.empty(len(ds), dtype=np.int64)
    for i in tqdm(range(len(ds)), unit="img", disable=no_progress, desc="labels"):
        try:
            labels[i] = ds.label_of(i)
        except ArcFaceError as exc:
            labels[i] = -1
            rep.problem(str(exc), "unreadable records")
    counts = label_lines(rep, labels[labels >= 0])

    first = None
    for i in range(len(ds)):
        try:
            data = ds[i][0]
        except ArcFaceError:
            continue
        image = decode_image(data)
        if image is not None:
            first = image.shape[:2]
            rep.line("image size", size_text(first, data))
            break
    if first is None:
        rep.problem("no image of the dataset can be decoded")

    if ds.property_path is None:
        rep.line("property", f"none (num_classes = largest label + 1 = {ds.num_classes})")
    else:
        text = f"{ds.num_classes},{ds.image_size[0]},{ds.image_size[1]}"
        out_of_range = np.flatnonzero(labels >= ds.num_classes)
        rep.problems_of("labels out of range", out_of_range,
                        lambda i: f"{ds.where(i)}: label {int(labels[i])} is out of range: {ds.property_path} "
                                  f"declares {ds.num_classes} classes")
        ok = not out_of_range.size
        if first is not None and tuple(first) != tuple(ds.image_size):
            rep.problem(f"{ds.property_path}: declares {ds.image_size[1]}x{ds.image_size[0]} images, the first "
                        f"image is {first[1]}x{first[0]}")
            ok = False
        if ok and len(counts) < ds.num_classes:
            text += f": {ds.num_classes - len(counts)} declared class(es) have no images"
        rep.line("property", text + (": consistent with the labels" if ok else ": inconsistent (see problems)"))
    if ds.has_header_record:
        check_identity_records(rep, ds, labels)
    if verify:
        verify_images(rep, len(ds), lambda i: ds[i][0], ds.where, workers, first, no_progress)


def info_imagefolder(rep, path, verify, workers, no_progress):
    source = ImageFolderSource(path)
    rep.line("kind", "imagefolder (one sub-folder per identity)")
    label_lines(rep, source.labels())
    if source.empty_classes:
        rep.problem(f"{len(source.empty_classes)} class folder(s) without images (skipped, no label): "
                    + ", ".join(source.empty_classes[:SHOWN]))
    if source.skipped_files:
        rep.line("other files", f"{len(source.skipped_files)} non-image files ignored, e.g. {source.skipped_files[0]}")
    first = None
    for i in range(len(source)):
        data = source[i][0]
        image = decode_image(data)
        if image is not None:
            first = image.shape[:2]
            rep.line("image size", size_text(first, data))
            break
        rep.problem(f"bad image: {source.where(i)}: {check_image_bytes(data) or 'cannot be decoded'}", "bad images")
    if verify:
        verify_images(rep, len(source), lambda i: source[i][0], source.where, workers, first, no_progress)


def info_mindrecord(rep, path, verify, workers, no_progress):
    source = MindRecordSource(path)
    rep.line("kind", f"mindrecord ({len(source.files)} shard(s): "
             f"{', '.join(os.path.basename(f) for f in source.files[:4])}{' ...' if len(source.files) > 4 else ''})")
    labels = source.labels()
    label_lines(rep, labels)
    rows = source.iter_samples()
    first = None
    for key, data, _ in rows:
        image = decode_image(data)
        if image is not None:
            first = image.shape[:2]
            rep.line("image size", size_text(first, data))
        else:
            rep.problem(f"bad image: {source.where(key)}: {check_image_bytes(data) or 'cannot be decoded'}")
        break
    rows.close()
    if source.property_path is None:
        rep.line("property", f"none (num_classes = {source.num_classes})")
    else:
        h, w = source.image_size
        ok = first is None or tuple(first) == (h, w)
        if not ok:
            rep.problem(f"{source.property_path}: declares {w}x{h} images, the first image is {first[1]}x{first[0]}")
        rep.line("property", f"{source.num_classes},{h},{w}" + (": consistent" if ok else ": inconsistent"))
    if source.counts is None:
        rep.line("class counts", f"no {CLASS_COUNTS_NAME}: labels were read from the shards")
    if verify:
        verify_mindrecord(rep, source, labels, first, workers, no_progress)


def verify_mindrecord(rep, source, labels, first, workers, no_progress):
    """MindRecord has no random access: stream the rows, decode them, count the labels against
    class_counts.npy."""
    def check(row):
        key, data, label = row
        image = decode_image(data)
        if image is None:
            return key, label, check_image_bytes(data) or "cannot be decoded", None
        return key, label, None, image.shape[:2]

    bad = wrong = 0
    stored = array.array("q")
    with tqdm(total=len(source), unit="img", disable=no_progress, desc="verify") as bar:
        for key, label, reason, shape in parallel_map(check, source.iter_samples(), workers):
            bar.update(1)
            stored.append(label)
            if reason is not None:
                bad += 1
                rep.problem(f"bad image: {source.where(key)}: {reason}", "bad images")
            elif first is not None and tuple(shape) != tuple(first):
                wrong += 1
                rep.problem(f"{source.where(key)}: image is {shape[1]}x{shape[0]}, the first one is "
                            f"{first[1]}x{first[0]}", "images of another size")
    if source.counts is not None:
        stored_counts = np.bincount(np.asarray(stored, dtype=np.int64), minlength=len(source.counts))
        if not np.array_equal(stored_counts, source.counts):
            rep.problem(f"{os.path.join(source.root, CLASS_COUNTS_NAME)}: does not match the labels stored in the "
                        f"shards")
    rep.line("verify", verify_text(len(stored), bad, wrong, first))


def describe(path, verify=False, workers=4, out=None, no_progress=None):
    """Print the report to `out` (stdout); returns the exit code (0 ok, 1 problems). Unreadable data
    raises ArcFaceError. Progress bars show on a terminal only (no_progress=None) or never (True)."""
    start = time.time()
    rep = Report(out)
    rep.line("dataset", path)
    kind = detect_kind(path)
    {"recordio": info_recordio, "imagefolder": info_imagefolder, "mindrecord": info_mindrecord}[kind](
        rep, path, verify, workers, no_progress)
    rep.line("time", f"{time.time() - start:.1f} s")
    return rep.finish()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="RecordIO folder, ImageFolder or MindRecord folder")
    parser.add_argument("--verify", action="store_true", help="decode every image and check its size")
    parser.add_argument("--workers", type=int, default=4, help="decoding threads for --verify (default 4)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return describe(args.dataset, args.verify, args.workers)


if __name__ == "__main__":
    sys.exit(run_main(main))
