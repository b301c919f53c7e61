"""Convert a RecordIO training set (train.rec + train.idx) into an ImageFolder.

One sub-folder per class, named by the integer label zero-padded to the width of the largest
label (so name order and numeric order agree: 00000, 00001, ...); one file per image, named by
its record key (00000123.jpg). Images are written as the stored encoded bytes, bit for bit
(.jpg, or .png / .bmp when the bytes are PNG / BMP); --format png re-encodes them as PNG.
Works on the insightface layout (header record at key 0, identity records after the images,
which are not read) and on header-less im2rec files.

Resumable: files are written under a temporary name and renamed when complete, and a re-run
skips every file that already exists with the right size (--format png: that ends with a PNG
end chunk), so an interrupted conversion just continues.

  python src/rec2jpg_dataset.py --include /data/faces_emore --output /data/faces_emore_images
"""
import argparse
import os
import struct
import sys
import time

if not __package__:  # run as a script: make `src` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from src.cli import run_main  # noqa: E402
from src.dataset import image_extension, image_problem, parallel_map  # noqa: E402
from src.errors import ArcFaceError  # noqa: E402
from src.recordio import FaceRecordDataset, unpack_record  # noqa: E402

WRITTEN, SKIPPED, BAD = "written", "skipped", "bad"


def write_atomic(path, data):
    """Write `data` to a hidden temporary file next to `path`, then rename it to `path`."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise ArcFaceError(f"cannot write {path}: {exc.strerror}") from None


class Converter:
    """Converts the images of a FaceRecordDataset one at a time (thread-safe)."""

    def __init__(self, dataset, output, fmt="original", skip_bad=False):
        self.dataset = dataset
        self.reader = dataset.reader
        self.output = output
        self.fmt = fmt
        self.skip_bad = skip_bad
        self.labels = dataset.labels()
        max_label = int(self.labels.max()) if self.labels.size else 0
        max_key = max(dataset.image_keys) if dataset.image_keys else 0
        self.class_width = len(str(max_label))
        self.key_width = max(8, len(str(max_key)))
        self.bad = []  # (where, reason) of records skipped with skip_bad

    def class_dir(self, label):
        return os.path.join(self.output, f"{label:0{self.class_width}d}")

    def make_class_dirs(self):
        for label in np.unique(self.labels).tolist():
            os.makedirs(self.class_dir(label), exist_ok=True)

    def _image_head(self, key):
        """(image size in bytes, first bytes of the image) of a record, reading only its start."""
        prefix = self.reader.read_prefix(key, 64)
        where = f"{self.dataset.rec_path}: key {key}"
        flag = struct.unpack_from("<I", prefix, 0)[0] if len(prefix) >= 4 else 0
        header_size = 24 + 4 * flag
        if len(prefix) < header_size + 16:
            prefix = self.reader.read_prefix(key, header_size + 16)
        _, head = unpack_record(prefix, where)
        return self.reader.payload_size(key) - header_size, head

    def _done(self, path, size):
        """Whether `path` already holds a finished copy."""
        try:
            actual = os.path.getsize(path)
        except OSError:
            return False
        if size is not None:
            return actual == size
        with open(path, "rb") as fh:  # PNG re-encoding: the size is unknown, check the end chunk
            fh.seek(max(0, actual - 8))
            return fh.read(4) == b"IEND"

    def __call__(self, i):
        """Convert the i-th image -> (status, bytes written)."""
        key = self.dataset.image_keys[i]
        folder = self.class_dir(int(self.labels[i]))
        stem = os.path.join(folder, f"{key:0{self.key_width}d}")
        if self.fmt == "png":
            path, size = stem + ".png", None
        else:
            size, head = self._image_head(key)
            path = stem + image_extension(head)
        if self._done(path, size):
            return SKIPPED, 0
        data, _ = self.dataset[i]
        reason = image_problem(data)
        if reason is None and self.fmt == "png":
            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if pixels is None:
                reason = "cannot be decoded"
            else:
                data = cv2.imencode(".png", pixels)[1].tobytes()
        if reason is not None:
            where = self.dataset.where(i)
            if not self.skip_bad:
                raise ArcFaceError(f"{where}: {reason} (use --skip_bad to skip such records)")
            self.bad.append((where, reason))
            return BAD, 0
        write_atomic(path, data)
        return WRITTEN, len(data)


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0


def convert(include, output, fmt="original", workers=8, skip_bad=False, no_progress=None):
    """Convert; returns the summary dict (identities, images, written, skipped, bad, bytes, seconds).
    The progress bar shows on a terminal only (no_progress=None) or never (True)."""
    start = time.time()
    dataset = FaceRecordDataset(include)
    dataset.check_labels()
    if len(dataset) == 0:
        raise ArcFaceError(f"{dataset.rec_path}: no images to convert")
    os.makedirs(output, exist_ok=True)
    converter = Converter(dataset, output, fmt, skip_bad)
    converter.make_class_dirs()
    counts = {WRITTEN: 0, SKIPPED: 0, BAD: 0}
    written_bytes = 0
    with tqdm(total=len(dataset), unit="img", disable=no_progress, desc="rec2jpg") as bar:
        for status, nbytes in parallel_map(converter, range(len(dataset)), workers):
            counts[status] += 1
            written_bytes += nbytes
            bar.update(1)
    for where, reason in converter.bad:
        print(f"warning: skipped {where}: {reason}", file=sys.stderr)
    return {"identities": int(len(np.unique(converter.labels))), "images": len(dataset),
            "written": counts[WRITTEN], "skipped": counts[SKIPPED], "bad": counts[BAD],
            "bytes": written_bytes, "seconds": time.time() - start, "output": output}


def summary_line(s):
    line = (f"{s['identities']} identities, {s['images']} images -> {s['output']}: {s['written']} written "
            f"({human_bytes(s['bytes'])}), {s['skipped']} skipped (already complete)")
    if s["bad"]:
        line += f", {s['bad']} bad records skipped"
    return line + f", {s['seconds']:.1f} s"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--include", required=True,
                        help="folder holding train.rec and train.idx (or the .rec file itself)")
    parser.add_argument("--output", required=True, help="ImageFolder to write (created; re-runs resume)")
    parser.add_argument("--format", choices=("original", "png"), default="original",
                        help="original: the stored bytes as they are (default); png: re-encode as PNG")
    parser.add_argument("--workers", type=int, default=8, help="parallel reader/writer threads (default 8)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip records that are not a decodable image (listed at the end) instead of stopping")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    summary = convert(args.include, args.output, args.format, args.workers, args.skip_bad)
    print(summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
