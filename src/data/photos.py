"""Photos in, aligned faces out: the work of align.py.

Every photo is decoded (size limit, EXIF orientation applied), its faces found by src.data.detect,
each face aligned by src.data.align (the project's one five-point alignment) and written as a
112x112 PNG. The output folder mirrors the input: a photo `a/b.jpg` of an input folder gives
`a/b_0.png`, `a/b_1.png`, ... (largest face first); a photo given as a file gives `b_0.png`, ...

`faces.csv` in the output folder has one row per face

    face,image,score,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5

(face: the PNG relative to the output folder; image: the photo, relative to the output folder
unless given as an absolute path, which is how embed.py --landmarks resolves image paths; score:
the detector's face probability; the five landmarks in the photo's pixels as displayed, left eye,
right eye, nose, left and right mouth corner), and one row with an empty face and score for every
photo in which no face was found. Unreadable files get no row.

The output folder of every photo is made even when the photo gives no face: a person's folder whose
photos all failed stays as an empty folder, which `python -m src.datainfo` reports as an identity
without images (and src.pack_rec skips with a warning), instead of vanishing from the training set.
"""
from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import dataclass, field

import cv2
import numpy as np

from src.data.align import align_face
from src.data.images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    check_image_bytes,
    decode_image,
    image_dimensions,
    image_format,
)
from src.errors import ArcFaceError
from src.files import atomic_write

CSV_NAME = "faces.csv"
CSV_COLUMNS = ("face", "image", "score") + tuple(f"{axis}{k}" for k in range(1, 6) for axis in "xy")


@dataclass
class Photo:
    path: str  # as given, or found by walking a folder given
    stem: str  # output name relative to the output folder, without `_<k>.png`


@dataclass
class Result:
    photo: Photo
    faces: list = field(default_factory=list)  # DetectedFace kept, largest first
    files: list = field(default_factory=list)  # their PNGs, relative to the output folder
    problem: str = None                        # why the file could not be used


@dataclass
class Summary:
    photos: int = 0          # photos read
    faces: int = 0           # faces written
    without_face: int = 0    # photos read in which no face was kept
    unreadable: int = 0      # files skipped (--skip_bad)
    csv_path: str = ""


def _warn(line):
    """Notes go to stderr without breaking a progress bar."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stderr)


# --- inputs ---------------------------------------------------------------------------------------

def find_photos(inputs, output_dir):
    """Photos of files and folders (walked recursively, sorted; hidden entries and the output folder
    skipped), each with its output stem. Two photos that would write the same faces are an error."""
    skip = os.path.realpath(output_dir)
    photos = []
    for path in inputs:
        if os.path.isfile(path):
            photos.append(Photo(path, os.path.splitext(os.path.basename(path))[0]))
        elif os.path.isdir(path):
            found = _walk(path, skip)
            if not found:
                raise ArcFaceError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found in {path}")
            photos.extend(Photo(f, os.path.splitext(os.path.relpath(f, path))[0]) for f in found)
        else:
            raise ArcFaceError(f"input not found: {path}")
    owners = {}
    for photo in photos:
        other = owners.setdefault(os.path.normcase(photo.stem), photo.path)
        if other != photo.path:
            raise ArcFaceError(f"{other} and {photo.path} would both write {photo.stem}_<k>.png; "
                               f"rename one or align them into different folders")
    return photos


def _walk(folder, skip):
    def fail(exc):
        raise ArcFaceError(f"cannot list {exc.filename}: {exc.strerror}")

    found = []
    for root, dirs, files in os.walk(folder, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) != skip]
        found.extend(os.path.join(root, f) for f in files
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def read_photo(path):
    """(H, W, 3) uint8 RGB as displayed (EXIF orientation applied), or (None, why not)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    if len(data) == 0:
        return None, f"{path}: empty file (0 bytes)"
    size = image_dimensions(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        return None, (f"{path}: {size[0]}x{size[1]} pixels, more than the limit of {MAX_IMAGE_PIXELS} "
                      f"(a decompression bomb, or a photo to shrink first)")
    incomplete = check_image_bytes(data) if image_format(data) else None
    if incomplete:  # OpenCV would decode a cut-off JPEG into a half-grey photo
        return None, f"{path}: {incomplete}"
    image = decode_image(data)
    if image is None:
        return None, f"{path}: {check_image_bytes(data) or 'cannot be decoded (corrupt)'}"
    return image, None


# --- outputs --------------------------------------------------------------------------------------

def check_output(output_dir, overwrite):
    """Refuse, before any work, to replace the faces.csv of an earlier run unless asked to."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ArcFaceError(f"--output {output_dir} exists and is not a folder")
    csv_path = os.path.join(output_dir, CSV_NAME)
    if os.path.exists(csv_path) and not overwrite:
        raise ArcFaceError(f"{csv_path} exists; pass --overwrite to replace it and the faces it lists")
    return csv_path


def image_reference(path, output_dir):
    """The photo as faces.csv names it: absolute as given, else relative to the csv's folder."""
    return path if os.path.isabs(path) else os.path.relpath(path, output_dir)


def csv_rows(results, output_dir):
    """The rows of faces.csv (header first) for the photos read, in input order."""
    rows = [list(CSV_COLUMNS)]
    for result in results:
        image = image_reference(result.photo.path, output_dir)
        if not result.faces:
            rows.append(["", image] + [""] * (len(CSV_COLUMNS) - 2))
        for name, face in zip(result.files, result.faces):
            rows.append([name, image, f"{face.score:.5f}"] + [f"{v:.3f}" for v in face.landmarks.reshape(-1)])
    return rows


def write_csv(path, rows):
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    atomic_write(path, text.getvalue().encode("utf-8", "surrogateescape"), sync=True)


# --- the work -------------------------------------------------------------------------------------

def align_photo(photo, detector, output_dir, largest=False, min_size=0.0, overwrite=False, written=None):
    """Read, detect, align and write the faces of one photo (called from worker threads); the paths
    written are appended to `written`."""
    os.makedirs(os.path.dirname(os.path.join(output_dir, photo.stem)) or output_dir, exist_ok=True)
    image, problem = read_photo(photo.path)
    if image is None:
        return Result(photo, problem=problem)
    faces = [face for face in detector.detect(image) if face.size >= min_size]
    if largest:
        faces = faces[:1]
    result = Result(photo, faces)
    bgr = image[:, :, ::-1]
    for k, face in enumerate(faces):
        name = f"{photo.stem}_{k}.png"
        path = os.path.join(output_dir, name)
        if os.path.exists(path) and not overwrite:
            raise ArcFaceError(f"{path} exists; pass --overwrite to replace it")
        try:
            crop = align_face(bgr, face.landmarks)
        except ArcFaceError as exc:  # the detector's landmarks lie within the alignment's bounds (measured)
            raise ArcFaceError(f"{photo.path}: face {k}: {exc}") from None
        ok, png = cv2.imencode(".png", crop[:, :, ::-1])
        if not ok:  # pragma: no cover - OpenCV encodes any 112x112 uint8 image
            raise ArcFaceError(f"cannot encode {path}")
        atomic_write(path, png.tobytes(), sync=False)
        if written is not None:
            written.append(path)
        result.files.append(name.replace(os.sep, "/"))
    k = len(faces)
    while overwrite and os.path.isfile(os.path.join(output_dir, f"{photo.stem}_{k}.png")):
        os.remove(os.path.join(output_dir, f"{photo.stem}_{k}.png"))  # faces of an earlier run, no longer found
        k += 1
    return result


def detector_min_size(min_size):
    """The smallest face the detector looks for when faces under `min_size` pixels are dropped: a
    little below it (boxes are regressed after the search), never below 12, the default without."""
    from src.data.detect import MIN_SIZE
    return max(12.0, 0.8 * min_size) if min_size > 0 else float(MIN_SIZE)


def align_photos(inputs, output_dir, largest=False, min_size=0.0, workers=2, skip_bad=False, overwrite=False,
                 progress=None, warn=_warn, detector=None):
    """Align the faces of every photo of `inputs` into `output_dir` and write faces.csv there.

    Unreadable files are an error, or with `skip_bad` a warning each. Returns a Summary."""
    from tqdm import tqdm

    from src.data.sources import parallel_map
    if workers < 1:
        raise ArcFaceError(f"--workers must be at least 1, got {workers}")
    if not min_size >= 0:
        raise ArcFaceError(f"--min_size must be a number of pixels >= 0, got {min_size}")
    csv_path = check_output(output_dir, overwrite)
    photos = find_photos(inputs, output_dir)
    if detector is None:
        from src.data.detect import FaceDetector
        detector = FaceDetector(min_size=detector_min_size(min_size))
    summary = Summary(csv_path=csv_path)
    results = []
    progress = sys.stderr.isatty() if progress is None else progress

    written = []

    def work(photo):
        return align_photo(photo, detector, output_dir, largest, min_size, overwrite, written)

    results_in_order = parallel_map(work, photos, workers)
    try:
        with tqdm(total=len(photos), disable=not progress, desc="aligning", unit="photo") as bar:
            for result in results_in_order:
                bar.update(1)
                if result.problem is not None:
                    if not skip_bad:
                        raise ArcFaceError(f"{result.problem} (--skip_bad leaves such files out)")
                    warn(f"warning: skipping {result.problem}")
                    summary.unreadable += 1
                    continue
                summary.photos += 1
                summary.faces += len(result.faces)
                if not result.faces:
                    summary.without_face += 1
                    warn(f"no face of at least {min_size:g} pixels in {result.photo.path}" if min_size > 0
                         else f"no face found in {result.photo.path}")
                results.append(result)
        write_csv(csv_path, csv_rows(results, output_dir))
    except BaseException:
        results_in_order.close()  # waits for the photos in flight
        for path in written:  # a run that stops leaves none of its faces behind
            if os.path.isfile(path):
                os.remove(path)
        raise
    return summary
