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
import os
import sys
import time

if not __package__:  # run as `python src/datainfo.py ...`: make `src` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from src.cli import run_main
from src.data.images import image_format
from src.data.sources import implausible_class_count, open_source, scan

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


def first_image(rep, source):
    """(height, width) of the first decodable image (each bad one before it is a problem)."""
    for sample in scan(source, workers=1):
        if sample.image is not None:
            size = sample.image.shape[:2]
            fmt = (image_format(sample.data) or "unknown format").upper()
            rep.line("image size", f"{size[1]}x{size[0]} ({fmt}, first image)")
            return size
        rep.problem(f"bad image: {sample.problem}", "bad images")
    rep.problem("no image of the dataset can be decoded")
    return None


def check_declared(rep, source, labels, counts, first):
    """`property` (RecordIO, MindRecord) against the labels and the first image."""
    property_path = source.property_path
    if property_path is None:
        if source.kind != "imagefolder":
            rep.line("property", f"none (num_classes = {source.num_classes})")
        return
    h, w = source.image_size
    out_of_range = np.flatnonzero(labels >= source.num_classes)
    rep.problems_of("labels out of range", out_of_range,
                    lambda i: f"{source.where(i)}: label {int(labels[i])} is out of range: {property_path} "
                              f"declares {source.num_classes} classes")
    ok = not out_of_range.size
    if labels.size and labels.max() >= 0 and implausible_class_count(source, int(labels.max()) + 1):
        rep.problem(implausible_class_count(source, int(labels.max()) + 1))
        ok = False
    if first is not None and tuple(first) != (h, w):
        rep.problem(f"{property_path}: declares {w}x{h} images, the first image is {first[1]}x{first[0]}")
        ok = False
    text = f"{source.num_classes},{h},{w}"
    if ok and len(counts) < source.num_classes:
        text += f": {source.num_classes - len(counts)} declared class(es) have no images"
    rep.line("property", text + (": consistent with the labels" if ok else ": inconsistent (see problems)"))


def verify_images(rep, source, expected_size, workers, progress):
    """Decode every image; report the bad ones and those whose size differs from the first.
    Also compares the labels found in the samples with the source's own (MindRecord counts)."""
    bad = wrong = count = 0
    seen = []
    for sample in scan(source, workers=workers, progress=progress):
        count += 1
        seen.append(sample.label)
        if sample.problem is not None:
            bad += 1
            rep.problem(f"bad image: {sample.problem}", "bad images")
        elif expected_size is not None and tuple(sample.image.shape[:2]) != tuple(expected_size):
            wrong += 1
            h, w = sample.image.shape[:2]
            rep.problem(f"{sample.where}: image is {w}x{h}, the first one is {expected_size[1]}x{expected_size[0]}",
                        "images of another size")
    counts = source.counts
    if counts is not None:
        stored = np.bincount(np.asarray(seen, dtype=np.int64), minlength=len(counts))
        if not np.array_equal(stored, counts):
            rep.problem(f"{source.counts_path}: does not match the labels stored in the shards")
    text = f"{count} images decoded: {bad} bad"
    if expected_size is not None:
        h, w = expected_size
        text += f", {wrong} not {w}x{h}" if wrong else f", {'the others' if bad else 'all'} {w}x{h}"
    rep.line("verify", text)


def describe(path, verify=False, workers=4, out=None, no_progress=None):
    """Print the report to `out` (stdout); returns the exit code (0 ok, 1 problems). Unreadable data
    raises ArcFaceError. Progress bars show on a terminal only (no_progress=None) or never (True)."""
    start = time.time()
    progress = sys.stderr.isatty() if no_progress is None else not no_progress
    rep = Report(out)
    rep.line("dataset", path)
    source = open_source(path, for_training=False)
    source.check(rep, progress)
    labels = source.labels()
    counts = label_lines(rep, labels[labels >= 0])
    first = first_image(rep, source) if len(source) else None
    check_declared(rep, source, labels, counts, first)
    if verify:
        verify_images(rep, source, first, workers, progress)
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
