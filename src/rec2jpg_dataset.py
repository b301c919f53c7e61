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
import sys
import time

if not __package__:  # the model zoo's `python src/rec2jpg_dataset.py ...`: make `src` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np

from src.cli import run_main
from src.data.face_rec import FaceRecordDataset
from src.data.images import image_extension
from src.data.sources import BadSamples, scan
from src.errors import ArcFaceError
from src.files import atomic_write


class Layout:
    """Where each image of a RecordIO source goes: `<label>/<key>.<ext>`, zero-padded."""

    def __init__(self, source, output, fmt):
        self.source, self.output, self.fmt = source, output, fmt
        self.labels = source.labels()
        max_label = int(self.labels.max()) if self.labels.size else 0
        max_key = max(source.image_keys) if source.image_keys else 0
        self.class_width = len(str(max_label))
        self.key_width = max(8, len(str(max_key)))

    def class_dir(self, label):
        return os.path.join(self.output, f"{label:0{self.class_width}d}")

    def path(self, index, head=None):
        stem = os.path.join(self.class_dir(int(self.labels[index])),
                            f"{self.source.image_keys[index]:0{self.key_width}d}")
        return stem + (".png" if self.fmt == "png" else image_extension(head))

    def done(self, index):
        """Whether the image is already converted (a re-run continues where the last one stopped)."""
        if self.fmt == "png":
            path = self.path(index)
            try:
                with open(path, "rb") as fh:  # re-encoded: the size is unknown, check the end chunk
                    fh.seek(max(0, os.path.getsize(path) - 8))
                    return fh.read(4) == b"IEND"
            except OSError:
                return False
        try:
            size, head = self.source.image_head(index)
        except ArcFaceError:
            return False  # unreadable: the conversion reports it
        path = self.path(index, head)
        return os.path.isfile(path) and os.path.getsize(path) == size


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0


def convert(include, output, fmt="original", workers=8, skip_bad=False, no_progress=None):
    """Convert; returns the summary dict (identities, images, written, skipped, bad, bytes, seconds).
    The progress bar shows on a terminal only (no_progress=None) or never (True)."""
    start = time.time()
    source = FaceRecordDataset(include)
    source.check_labels()
    if len(source) == 0:
        raise ArcFaceError(f"{source.rec_path}: no images to convert")
    progress = sys.stderr.isatty() if no_progress is None else not no_progress
    layout = Layout(source, output, fmt)
    for label in np.unique(layout.labels).tolist():
        os.makedirs(layout.class_dir(label), exist_ok=True)
    todo = [i for i in range(len(source)) if not layout.done(i)]
    written = written_bytes = 0
    bad = BadSamples(skip_bad)
    for sample in scan(source, todo, workers, progress, desc="rec2jpg"):
        if bad.skip(sample.problem):
            continue
        data = sample.data
        if fmt == "png":
            data = cv2.imencode(".png", sample.image[:, :, ::-1])[1].tobytes()
        atomic_write(layout.path(sample.index, data), data, sync=False)
        written += 1
        written_bytes += len(data)
    complete = len(source) - len(todo)  # by an earlier run
    bad.finish(written + complete, include)
    return {"identities": int(len(np.unique(layout.labels))), "images": len(source),
            "written": written, "skipped": complete, "bad": len(bad.problems),
            "bytes": written_bytes, "seconds": time.time() - start, "output": output}


def summary_line(s):
    line = (f"{s['identities']} identities, {s['images']} images -> {s['output']}: {s['written']} written "
            f"({human_bytes(s['bytes'])}), {s['skipped']} skipped (already complete)")
    if s["bad"]:
        line += f", {s['bad']} bad images skipped"
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
