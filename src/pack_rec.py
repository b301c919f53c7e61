"""Pack an ImageFolder of aligned faces into a RecordIO training set (insightface layout).

The input holds one sub-folder per identity with aligned 112x112 faces. Labels follow the
training ImageFolder order: numeric folder names sorted numerically, other names by name;
folders without images are skipped with a warning and get no label, so labels stay contiguous.
Each image is stored as its file bytes (no re-encoding) once OpenCV has decoded it and it is
112x112; --resize instead resizes other sizes to 112x112 and stores them as JPEG (quality 95).
Files without an image extension (.jpg .jpeg .png .bmp) are skipped and counted.

Writes <output>/train.rec, train.idx, property (num_classes,112,112) and classes.txt (the folder
name of label i on line i+1). Records are streamed to disk, so memory stays small for any size.

  python -m src.pack_rec --input /data/my_faces --output /data/my_faces_rec
"""
import argparse
import os
import sys
import time

import cv2

from src.cli import run_main
from src.data.face_rec import write_face_dataset
from src.data.images import IMAGE_SIZE
from src.data.images import resize as resize_image
from src.data.sources import BadSamples, ImageFolderSource, scan
from src.errors import ArcFaceError

JPEG_QUALITY = 95


def prepare(sample, resize):
    """(bytes to store, None, resized?) for a usable decoded sample, or (None, reason, False)."""
    if sample.problem is not None:
        return None, sample.problem, False
    h, w = sample.image.shape[:2]
    if (h, w) == IMAGE_SIZE:
        return sample.data, None, False
    if not resize:
        return None, (f"{sample.where}: is {w}x{h}, expected {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} aligned faces "
                      f"(use --resize)"), False
    ok, encoded = cv2.imencode(".jpg", resize_image(sample.image)[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        return None, f"{sample.where}: cannot be re-encoded as JPEG", False
    return encoded.tobytes(), None, True


def check_class_names(source):
    """classes.txt holds one folder name per line: a name with a line break (or another control
    character) would shift every later label."""
    for name in source.classes:
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise ArcFaceError(f"class folder {name!r} in {source.root}: its name contains a control character "
                               f"(line break, tab, ...); rename it")


def pack(input_dir, output, resize=False, workers=4, skip_bad=False, overwrite=False, no_progress=None):
    """Pack; returns a summary dict (identities, images, bytes, resized, bad, skipped_files,
    empty_classes, seconds, output). The progress bar shows on a terminal only (no_progress=None)
    or never (True)."""
    start = time.time()
    if not os.path.isdir(input_dir):
        raise ArcFaceError(f"image folder not found: {input_dir}")
    if os.path.isfile(os.path.join(input_dir, "train.rec")):
        raise ArcFaceError(f"{input_dir} is already a RecordIO folder (has train.rec)")
    if os.path.abspath(input_dir) == os.path.abspath(output):
        raise ArcFaceError("--output must differ from --input")
    if not overwrite and os.path.exists(os.path.join(output, "train.rec")):
        raise ArcFaceError(f"{output}/train.rec exists: pass --overwrite to replace it")
    source = ImageFolderSource(input_dir)
    if len(source) == 0:
        raise ArcFaceError(f"{input_dir} contains no images (one sub-folder per identity, "
                           f".jpg/.jpeg/.png/.bmp files)")
    check_class_names(source)
    progress = sys.stderr.isatty() if no_progress is None else not no_progress
    bad, names = BadSamples(skip_bad), []
    stats = {"resized": 0, "bytes": 0, "images": 0}
    relabel = {}  # folder label -> written label: a folder whose images were all skipped gets none

    def samples():
        for sample in scan(source, workers=workers, progress=progress, desc="pack_rec"):
            data, reason, resized = prepare(sample, resize)
            if bad.skip(reason):
                continue
            if sample.label not in relabel:
                relabel[sample.label] = len(relabel)
                names.append(source.classes[sample.label])
            stats["resized"] += resized
            stats["bytes"] += len(data)
            stats["images"] += 1
            yield data, relabel[sample.label]
        bad.finish(stats["images"], input_dir)  # still inside the write: nothing usable leaves no files

    num_classes = write_face_dataset(output, samples(), image_size=IMAGE_SIZE)
    with open(os.path.join(output, "classes.txt"), "w", encoding="utf-8") as fh:
        fh.write("".join(name + "\n" for name in names))
    lost = len(source.classes) - num_classes
    if lost:
        print(f"warning: {lost} class folder(s) had only bad images and got no label", file=sys.stderr)
    return {"identities": num_classes, "images": stats["images"], "bytes": stats["bytes"],
            "resized": stats["resized"], "bad": len(bad.problems), "skipped_files": len(source.skipped_files),
            "empty_classes": len(source.empty_classes), "seconds": time.time() - start, "output": output}


def summary_line(s):
    line = (f"packed {s['images']} images of {s['identities']} identities into {s['output']} "
            f"({s['bytes'] / 2**20:.1f} MB of images, {s['seconds']:.1f} s)")
    extras = [f"{s['resized']} resized" if s["resized"] else "",
              f"{s['skipped_files']} non-image files skipped" if s["skipped_files"] else "",
              f"{s['empty_classes']} empty class folders skipped" if s["empty_classes"] else "",
              f"{s['bad']} bad images skipped" if s["bad"] else ""]
    extras = [e for e in extras if e]
    return line + (": " + ", ".join(extras) if extras else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="image folder: one sub-folder per identity")
    parser.add_argument("--output", required=True, help="folder for train.rec, train.idx, property, classes.txt")
    parser.add_argument("--resize", action="store_true",
                        help="resize images that are not 112x112 and store them as JPEG (quality 95)")
    parser.add_argument("--workers", type=int, default=4, help="decoding threads for validation (default 4)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip undecodable or wrongly sized images (listed at the end) instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing train.rec in --output")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    print(summary_line(pack(args.input, args.output, args.resize, args.workers, args.skip_bad, args.overwrite)))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
