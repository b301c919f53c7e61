"""Convert a RecordIO folder or an ImageFolder into MindRecord, MindSpore's native format.

Writes <output>/train.mindrecord0 .. train.mindrecord<N-1> (--shards N; MindSpore zero-pads
the number when N > 10) with their .db index files, plus
  property          num_classes,height,width (as in insightface RecordIO folders)
  class_counts.npy  number of images of each label (int64), read by training instead of
                    scanning millions of rows for their labels
Schema: image (bytes: the encoded image exactly as stored in the input), label (int32) and
key (int64: the RecordIO key, or the image's position in ImageFolder order). Rows are written
in label order (a reader of several shards may interleave them). Every image is decoded with
OpenCV before it is written and must have the size of the first one, so training can decode
inside MindSpore without Python in the loop.

Train on the result with --data_url <output> (the folder is recognised by its
*.mindrecord* files).

  python -m src.mindrecord --input /data/faces_emore --output /data/faces_emore_mindrecord --shards 8
"""
import argparse
import glob
import os
import shutil
import sys
import time

import numpy as np

from src.cli import run_main
from src.data.sources import (
    CLASS_COUNTS_NAME,
    MINDRECORD_NAME,
    BadSamples,
    detect_kind,
    mindspore_message,
    open_source,
    resolve_num_classes,
    scan,
)
from src.errors import ArcFaceError
from src.files import atomic_write

SCHEMA = {"image": {"type": "bytes"}, "label": {"type": "int32"}, "key": {"type": "int64"}}
ROWS_PER_WRITE = 256
SMALL_INPUT = 32 << 20


def _pow2_at_least(n):
    return 1 << (int(n) - 1).bit_length()


def _existing_outputs(output):
    names = glob.glob(os.path.join(glob.escape(output), "*.mindrecord*"))
    return names + [p for p in (os.path.join(output, "property"), os.path.join(output, CLASS_COUNTS_NAME))
                    if os.path.exists(p)]


def convert(input_dir, output, shards=1, workers=4, skip_bad=False, overwrite=False, no_progress=None):
    """Convert; returns a summary dict (identities, images, bad, files, bytes, seconds, output).
    The progress bar shows on a terminal only (no_progress=None) or never (True)."""
    from mindspore.mindrecord import FileWriter
    from mindspore.mindrecord.common.exceptions import MindRecordException

    start = time.time()
    kind = detect_kind(input_dir)
    if kind == "mindrecord":
        raise ArcFaceError(f"{input_dir} is already a MindRecord folder")
    if os.path.abspath(input_dir) == os.path.abspath(output):
        raise ArcFaceError("--output must differ from --input")
    if not 1 <= shards <= 1000:
        raise ArcFaceError(f"--shards {shards}: must be between 1 and 1000")
    existing = _existing_outputs(output) if os.path.isdir(output) else []
    if existing and not overwrite:
        raise ArcFaceError(f"{output} already holds MindRecord output ({os.path.basename(existing[0])}): "
                           f"pass --overwrite to replace it")
    source = open_source(input_dir)
    labels = source.labels()
    num_classes = resolve_num_classes(source, 0, input_dir)
    order = np.argsort(labels, kind="stable")  # rows in label order, like the insightface layout
    shards = min(shards, len(source))
    progress = sys.stderr.isatty() if no_progress is None else not no_progress

    first_size = []  # (h, w) of the first usable image: every other one must match
    os.makedirs(output, exist_ok=True)
    tmp = os.path.join(output, ".mindrecord.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    name = os.path.join(tmp, MINDRECORD_NAME + ("0" if shards == 1 else ""))
    counts = np.zeros(num_classes, dtype=np.int64)
    image_bytes = [0]
    bad = BadSamples(skip_bad)
    try:
        writer = FileWriter(name, shard_num=shards, overwrite=True)
        total, largest = source.byte_sizes(SMALL_INPUT)
        if total < SMALL_INPUT:
            # MindSpore's default 32 MB pages and 16 MB header would make every shard of a small set
            # at least 48 MB (sparse, but not once copied): size them to the data instead.
            writer.set_page_size(_pow2_at_least(max(4 * largest, total // shards // 8, 32 << 10)))
            writer.set_header_size(64 << 10)
        writer.add_schema(SCHEMA, "arcface face images")
        writer.add_index(["label"])
        rows = []
        for sample in scan(source, order.tolist(), workers, progress, desc="mindrecord"):
            reason = sample.problem
            size = sample.image.shape[:2] if sample.image is not None else None
            if reason is None and first_size and size != first_size[0]:
                reason = (f"{sample.where}: is {size[1]}x{size[0]} but the first image is "
                          f"{first_size[0][1]}x{first_size[0][0]}")
            if bad.skip(reason):
                continue
            if not first_size:
                first_size.append(size)
            rows.append({"image": bytes(sample.data), "label": int(sample.label),
                         "key": source.key(sample.index)})
            counts[sample.label] += 1
            image_bytes[0] += len(sample.data)
            if len(rows) == ROWS_PER_WRITE:
                writer.write_raw_data(rows)
                rows = []
        bad.finish(int(counts.sum()), input_dir)
        if rows:
            writer.write_raw_data(rows)
        writer.commit()
        for path in _existing_outputs(output):
            os.remove(path)
        files = sorted(os.listdir(tmp))
        for f in files:  # shard names are recorded without their folder: moving them is safe
            os.replace(os.path.join(tmp, f), os.path.join(output, f))
    except (RuntimeError, MindRecordException) as exc:  # MindSpore writer errors (full disk, permissions, ...)
        raise ArcFaceError(f"{output}: writing MindRecord failed: {mindspore_message(exc)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write(os.path.join(output, CLASS_COUNTS_NAME), lambda fh: np.save(fh, counts))
    h, w = first_size[0]
    atomic_write(os.path.join(output, "property"), f"{num_classes},{h},{w}\n")
    shard_files = [f for f in files if not f.endswith(".db")]
    return {"identities": int((counts > 0).sum()), "num_classes": num_classes, "images": int(counts.sum()),
            "bad": len(bad.problems), "files": shard_files, "bytes": image_bytes[0],
            "seconds": time.time() - start, "output": output, "kind": kind}


def summary_line(s):
    line = (f"{s['kind']} -> MindRecord: {s['images']} images of {s['identities']} identities "
            f"({s['num_classes']} classes) in {len(s['files'])} shard(s) under {s['output']} "
            f"({s['bytes'] / 2**20:.1f} MB of images, {s['seconds']:.1f} s)")
    return line + (f", {s['bad']} bad images skipped" if s["bad"] else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="RecordIO folder (train.rec/train.idx) or ImageFolder")
    parser.add_argument("--output", required=True, help="folder for the MindRecord shards, property, class_counts.npy")
    parser.add_argument("--shards", type=int, default=1, help="number of MindRecord files (default 1)")
    parser.add_argument("--workers", type=int, default=4, help="decoding threads for validation (default 4)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip undecodable images or images of another size (listed at the end)")
    parser.add_argument("--overwrite", action="store_true", help="replace MindRecord output already in --output")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    print(summary_line(convert(args.input, args.output, args.shards, args.workers, args.skip_bad, args.overwrite)))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
