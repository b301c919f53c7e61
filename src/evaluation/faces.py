"""Face images in, embeddings out; comparing two faces and searching a gallery (embed.py).

A face is an aligned 112x112 crop (other sizes are resized as the evaluation resizes them, with a
warning), a photo with five landmarks, or a photo whose faces the detector finds (--detect); photos
are aligned here with the one five-point alignment (src.data.align). Its embedding is the one the
verification protocol scores: emb(face) + emb(flip(face)), L2-normalised, so thresholds found by that
protocol apply to it unchanged; its quality is the norm of the mean of the two unnormalised features
(on the scale of the XNorm val.py prints). A set of faces (a folder given to --compare, an identity of
a gallery) is the mean of its unit embeddings, renormalised. The model is opened by
src.evaluation.embedders.open_model, as every door opens one.

Names: a face is named by its image's path; an image that gives several faces (every face of a photo
with --all_faces, or a landmark file listing it several times) names them `path#0`, `path#1`, ...
(largest first / in the file's order). A path with a line break or another control character cannot
be listed one per line (EMB.txt, the printed lines): it is refused, or left out with --skip_bad.
"""
from __future__ import annotations

import csv
import json
import os
import stat
import sys
import zipfile
from dataclasses import dataclass

import numpy as np

from src.data.align import align_face
from src.data.images import IMAGE_EXTENSIONS, IMAGE_SIZE, decode_image, resize, why_undecodable
from src.data.sources import ImageFolderSource, parallel_map
from src.errors import ArcFaceError
from src.evaluation.verification import (
    THRESHOLD_FILE,
    calibrated_cosine,
    embed_pairs,
    evaluate,
    file_sha256,
    fuse_flips,
    l2_normalize,
    read_threshold_record,
)
from src.files import atomic_write

# Cosine threshold when none is given, calibrated or recorded by the run: squared distance 1.4.
# Published ArcFace ResNets trained on MS1M-scale data separate same/different around cosine
# 0.28-0.36; other models differ widely (the demo model's calibrated threshold is 0.68), hence the
# warning printed with it.
DEFAULT_THRESHOLD = 0.3
# Faces decoded at a time, rounded up to whole batches: bounds memory (~38 KB per face) on large inputs.
CHUNK_FACES = 128
WORKERS = min(4, os.cpu_count() or 1)
# Embeddings of different people collapsing into nearly one direction mean the model does not see
# faces: a wrong --input_mean/--input_std (or a broken model), which calls most pairs "same". Measured
# as the mean cosine between different people (impostor pairs of a verification set, or a gallery's
# identities). The demo model (make demo: r18 width 16, 300 synthetic identities; its 600 held-out
# pairs): 0.029 with the right normalisation (127.5/127.5); 0.59-0.65 for raw pixels (0/1), pixels in
# [0, 1] (0/255), centred but unscaled (127.5/1) or inverted (255/127.5), where 91-96 % of impostor
# pairs pass the default threshold 0.3; 0.43 for 0/127.5, 0.38 for 127.5/255; 0.19-0.22 for
# ImageNet-like values (123.7/58.4, 127.5/64), whose accuracy stays 0.965-0.98. The tests' tiny model
# (8 identities) gives 0.46-0.48 with the right normalisation, 0.88-0.90 with raw pixels. Above 0.5 is
# a collapse; nothing can be said of a few faces of unknown identity (embedding, --compare).
COLLAPSED_MEAN_COSINE = 0.5
SPREAD_MIN_FACES = 4


def warn_line(line):
    """Warnings go to stderr without breaking a progress bar."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stderr)


def shown(path):
    """A path as messages show it: control characters (a line break in a file name) escaped, so every
    message stays one line."""
    text = str(path)
    return text.encode("unicode_escape").decode("ascii") if _unlistable(text) else text


def _unlistable(text):
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


# --- inputs ---------------------------------------------------------------------------------------

@dataclass
class Face:
    path: str                     # the image file, as given (or found in a folder given)
    landmarks: np.ndarray = None  # (5, 2) pixel coordinates in the image, None for an aligned crop
    origin: str = ""              # the landmark file's line (or key), or the detector, for messages
    index: int = None             # the face's number in its image, when the image gives several

    @property
    def name(self):
        """How outputs and messages name the face."""
        return self.path if self.index is None else f"{self.path}#{self.index}"


def _key(path):
    return os.path.normcase(os.path.abspath(path))


def _kind_of(path):
    """'file', 'folder', 'missing' (including dangling links and loops: reported when read), or what
    else it is (a FIFO, a socket, a device), which is never read: reading a FIFO waits forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "missing" if not os.path.lexists(path) else "unreadable"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"


def find_images(paths):
    """Files as given, folders walked recursively (hidden entries skipped) in the sorted order of
    their relative paths, so the rows of an output follow one reproducible order. Only regular files
    are taken from folders; one given by name must be one."""
    found = []
    for path in paths:
        kind = _kind_of(path)
        if kind in ("file", "unreadable"):
            found.append(path)
        elif kind == "folder":
            images = _walk(path)
            if not images:
                raise ArcFaceError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found in {shown(path)}")
            found.extend(images)
        elif kind == "missing":
            raise ArcFaceError(f"image path not found: {shown(path)}")
        else:
            raise ArcFaceError(f"{shown(path)} is a {kind}, not an image file")
    return found


def _walk(folder):
    def fail(exc):
        raise ArcFaceError(f"cannot list {shown(exc.filename)}: {exc.strerror}")

    images = []
    for root, dirs, files in os.walk(folder, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = os.path.join(root, name)
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS) and \
                    _kind_of(path) in ("file", "unreadable"):
                images.append(path)
    return sorted(images, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def listable(faces, skip_bad=False, warn=warn_line):
    """The faces whose names can be written one per line; the others are an error, or with
    `skip_bad` a warning each."""
    kept = []
    for face in faces:
        if not _unlistable(face.name):
            kept.append(face)
            continue
        problem = (f"{shown(face.name)}: a file name with a line break or another control character cannot be "
                   f"listed one per line; rename it")
        if not skip_bad:
            raise ArcFaceError(f"{problem} (--skip_bad leaves such images out)")
        warn(f"warning: skipping {problem}")
    return kept


def _number_faces(faces):
    """Give the faces of images that appear more than once their number in that image."""
    counts = {}
    for face in faces:
        counts[_key(face.path)] = counts.get(_key(face.path), 0) + 1
    seen = {}
    for face in faces:
        if counts[_key(face.path)] > 1:
            face.index = seen.get(_key(face.path), 0)
            seen[_key(face.path)] = face.index + 1
    return faces


@dataclass
class Landmarks:
    """The faces of a landmark file, in its order (an image listed several times gives several faces)."""

    path: str
    faces: list

    def faces_of(self, paths):
        """Faces for image files/folders; each image must be listed in the file."""
        table = {}
        for face in self.faces:
            table.setdefault(_key(face.path), []).append(face)
        faces = []
        for path in find_images(paths):
            listed = table.get(_key(path))
            if listed is None:
                raise ArcFaceError(f"{shown(path)}: no landmarks for this image in {shown(self.path)}")
            faces.extend(Face(path, face.landmarks, face.origin, face.index) for face in listed)
        return faces


def read_landmarks(path):
    """A CSV file of rows `image,x1,y1,...,x5,y5` (an optional header row, blank and `#` lines
    skipped; a header naming the columns `image` and `x1`..`y5` picks them from wider rows, as in
    align.py's faces.csv) or a JSON object {image: [[x, y], ...5]}. Each row is a face: an image may
    be listed several times (align.py lists every face of a photo), not twice with the same points.
    Relative image paths are relative to the file's folder. A missing image is an error here, before
    any model is loaded."""
    if _kind_of(path) != "file":
        raise ArcFaceError(f"landmark file not found: {shown(path)}" if _kind_of(path) == "missing"
                           else f"landmark file {shown(path)} is not a regular file")
    entries = _read_json(path) if path.lower().endswith(".json") else _read_csv(path)
    if not entries:
        raise ArcFaceError(f"{shown(path)}: no landmark rows")
    folder = os.path.dirname(path)
    faces, seen = [], {}
    for name, points, origin in entries:
        image = name if os.path.isabs(name) else os.path.join(folder, name)
        kind = _kind_of(image)
        if kind != "file":
            raise ArcFaceError(f"{origin}: image not found: {shown(image)}" if kind in ("missing", "unreadable")
                               else f"{origin}: {shown(image)} is a {kind}, not an image file")
        same = (_key(image), points.tobytes())
        if same in seen:
            raise ArcFaceError(f"{origin}: {shown(name)} is listed twice with the same landmarks (also {seen[same]})")
        seen[same] = origin
        faces.append(Face(image, points, origin))
    return Landmarks(path, _number_faces(faces))


def _points(values, where):
    try:
        points = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        points = None
    if points is None or points.size != 10 or points.shape not in ((5, 2), (10,)):
        raise ArcFaceError(f"{where}: expected five [x, y] points, got {json.dumps(values)[:80]}")
    if not np.all(np.isfinite(points)):
        raise ArcFaceError(f"{where}: landmarks must be finite numbers")
    return points.reshape(5, 2)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ArcFaceError(f"{shown(path)}: cannot read the landmarks as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ArcFaceError(f"{shown(path)}: expected a JSON object mapping each image to [[x, y], ...5]")
    entries = []
    for name, values in data.items():
        where = f"{shown(path)}: {shown(repr(name))}"
        entries.append((name, _points(values, where), where))
    return entries


def _number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


LANDMARK_COLUMNS = ("image",) + tuple(f"{axis}{k}" for k in range(1, 6) for axis in "xy")


def _read_csv(path):
    entries, columns = [], None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                fields = [field.strip() for field in row]
                where = f"{shown(path)} line {reader.line_num}"
                if not any(fields) or fields[0].startswith("#"):
                    continue
                if not entries and columns is None and set(LANDMARK_COLUMNS) <= set(fields):
                    columns = [fields.index(name) for name in LANDMARK_COLUMNS]
                    continue  # a header naming its columns, e.g. align.py's faces.csv
                if columns:
                    fields = [fields[i] if i < len(fields) else "" for i in columns]
                    if not any(fields[1:]):
                        continue  # a photo in which align.py found no face
                if not entries and len(fields) == 11 and not any(_number(v) for v in fields[1:]):
                    continue  # a header row
                if len(fields) != 11:
                    raise ArcFaceError(f"{where}: expected an image and 10 numbers (x1,y1,...,x5,y5), "
                                       f"got {len(fields) - 1} values")
                bad = next((v for v in fields[1:] if not _number(v)), None)
                if bad is not None:
                    raise ArcFaceError(f"{where}: {shown(repr(bad))} is not a number")
                entries.append((fields[0], _points([float(v) for v in fields[1:]], where), where))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ArcFaceError(f"{shown(path)}: cannot read the landmarks as CSV: {exc}") from None
    return entries


def faces_of(paths, landmarks=None):
    """Faces for image files/folders: aligned crops (or photos, for --detect), or with a landmark file
    the faces it lists for them."""
    return landmarks.faces_of(paths) if landmarks else [Face(p) for p in find_images(paths)]


# --- reading images -------------------------------------------------------------------------------

def read_bytes(path):
    """The bytes of a regular file, as a uint8 array. Opened without waiting (a FIFO put in place of
    an image after it was listed would block a plain open) and refused unless a regular file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(0, f"not a regular file (a {'FIFO' if stat.S_ISFIFO(mode) else 'special file'})")
        return np.frombuffer(fh.read(), dtype=np.uint8)


def load_face(face, resized=None):
    """(the 112x112 RGB crop, None) or (None, why it cannot be had). An aligned crop of another size
    is resized; its (name, width, height) is appended to `resized` when given."""
    try:
        data = read_bytes(face.path)
    except OSError as exc:
        return None, f"cannot read {shown(face.path)}: {exc.strerror or exc}"
    image = decode_image(data)
    if image is None:
        return None, f"{shown(face.path)}: {why_undecodable(data)}"
    if face.landmarks is None:
        if image.shape[:2] != IMAGE_SIZE and resized is not None:
            resized.append((face.name, image.shape[1], image.shape[0]))
        return resize(image, IMAGE_SIZE), None
    try:
        return align_face(image[:, :, ::-1], face.landmarks), None
    except ArcFaceError as exc:
        return None, f"{shown(face.name)}: {exc} ({face.origin})"


def detect_faces(photos, all_faces=False, skip_bad=False, progress=None, warn=warn_line):
    """The faces the detector finds in photos, as faces with landmarks (aligned when embedded, as with
    a landmark file): the largest of each photo, or every face with `all_faces` (largest first). A
    photo that cannot be read or shows no face is an error, or with `skip_bad` a warning."""
    from tqdm import tqdm

    from src.data.detect import detect
    from src.data.photos import read_photo

    def find(photo):
        image, problem = read_photo(photo.path)
        if image is None:
            return [], problem
        found = detect(image)
        if not found:
            return [], f"no face found in {shown(photo.path)}"
        return (found if all_faces else found[:1]), None

    progress = sys.stderr.isatty() if progress is None else progress
    faces = []
    with tqdm(total=len(photos), disable=not progress, desc="detecting", unit="photo") as bar:
        for photo, (found, problem) in zip(photos, parallel_map(find, photos, WORKERS)):
            bar.update(1)
            if problem is not None:
                if not skip_bad:
                    raise ArcFaceError(f"{problem} (--skip_bad leaves such photos out)")
                warn(f"warning: skipping {problem}")
                continue
            for k, detected in enumerate(found):
                faces.append(Face(photo.path, detected.landmarks, f"face {k} found by the detector, score "
                                                                  f"{detected.score:.3f}",
                                  k if len(found) > 1 else None))
    if not faces:
        raise ArcFaceError(f"no face found in any of the {len(photos)} photo(s)")
    return faces


# --- embedding ------------------------------------------------------------------------------------

@dataclass
class Embedded:
    kept: np.ndarray        # indices of the faces embedded
    embeddings: np.ndarray  # (N, D) float32 unit embeddings of emb + emb_flip
    quality: np.ndarray     # (N,) float32 norms of (emb + emb_flip) / 2


def embed_faces(embed_fn, faces, batch_size, skip_bad=False, progress=None, warn=warn_line):
    """Embed faces (see Embedded). A face that cannot be read, decoded or aligned, or whose embedding
    is not finite, is an error, or with `skip_bad` a warning and left out. Aligned crops of another
    size than 112x112 are resized with one warning naming --detect and --landmarks. Faces are decoded
    a chunk at a time, in threads; the bar shows on a terminal for more than one batch."""
    from tqdm import tqdm
    if batch_size < 1:
        raise ArcFaceError(f"--batch_size must be positive, got {batch_size}")
    progress = sys.stderr.isatty() if progress is None else progress
    chunk = batch_size * -(-CHUNK_FACES // batch_size)
    kept, parts, qualities, resized = [], [], [], []

    def bad(problem):
        if not skip_bad:
            raise ArcFaceError(f"{problem} (--skip_bad leaves such images out)")
        warn(f"warning: skipping {problem}")

    with tqdm(total=len(faces), disable=not progress or len(faces) <= batch_size, desc="embedding",
              unit="img") as bar:
        for start in range(0, len(faces), chunk):
            images, indices = [], []
            loaded = parallel_map(lambda face: load_face(face, resized), faces[start:start + chunk], WORKERS)
            for index, (image, problem) in enumerate(loaded, start):
                if problem is None:
                    indices.append(index)
                    images.append(image)
                else:
                    bad(problem)
            if images:
                emb, emb_flip = embed_pairs(embed_fn, np.stack(images), batch_size, progress=False)
                unit, norm = fuse_flips(emb, emb_flip, "sum")
                finite = np.all(np.isfinite(unit), axis=1) & np.isfinite(norm)
                for index in np.asarray(indices)[~finite]:
                    bad(f"{shown(faces[index].name)}: the model's embedding of it is not finite (NaN/Inf)")
                kept.extend(np.asarray(indices)[finite])
                parts.append(unit[finite].astype(np.float32))
                qualities.append((norm[finite] / 2).astype(np.float32))
            bar.update(min(chunk, len(faces) - start))
    if resized:
        name, width, height = resized[0]
        warn(f"warning: {len(resized)} image(s) are not 112x112 aligned faces (e.g. {shown(name)}: {width}x{height}) "
             f"and are resized, which only suits crops aligned as the model was trained; for photos use --detect "
             f"(find and align the faces) or --landmarks FILE (align them with given landmarks)")
    if not kept:
        raise ArcFaceError(f"none of the {len(faces)} image(s) could be used")
    return Embedded(np.asarray(kept, dtype=np.int64), np.concatenate(parts), np.concatenate(qualities))


def quality_filter(names, quality, min_quality, warn=warn_line):
    """Boolean mask of the faces at or above `min_quality` (None: all); each one below is a note."""
    keep = np.ones(len(quality), dtype=bool)
    if min_quality is None:
        return keep
    keep = quality >= min_quality
    for name, value in zip(np.asarray(names, dtype=object)[~keep], quality[~keep]):
        warn(f"note: leaving out {shown(name)}: quality {value:.3f} is below --min_quality {min_quality:g}")
    return keep


def embed_named(embed_fn, faces, batch_size, skip_bad=False, min_quality=None, warn=warn_line):
    """(names, (N, D) unit embeddings, (N,) qualities) of the faces usable and at or above
    `min_quality` (see embed_faces and quality_filter)."""
    done = embed_faces(embed_fn, faces, batch_size, skip_bad, warn=warn)
    names = [faces[i].name for i in done.kept]
    keep = quality_filter(names, done.quality, min_quality, warn)
    if not keep.any():
        raise ArcFaceError(f"none of the {len(faces)} face(s) reaches --min_quality {min_quality:g}")
    return [name for name, kept in zip(names, keep) if kept], done.embeddings[keep], done.quality[keep]


def mean_embedding(unit_embeddings):
    """The unit vector of a set of faces: their unit embeddings averaged, renormalised."""
    return l2_normalize(np.mean(unit_embeddings, axis=0, keepdims=True))[0].astype(np.float32)


def mean_pairwise_cosine(unit_embeddings):
    """The mean cosine between different rows of unit embeddings."""
    unit = np.asarray(unit_embeddings, dtype=np.float64)
    n = len(unit)
    total = unit.sum(axis=0)
    return float((total @ total - np.sum(unit * unit)) / (n * (n - 1)))


def collapse_problem(mean_cosine, what):
    """Why embeddings of different people whose mean cosine is `mean_cosine` look collapsed into one
    direction (see COLLAPSED_MEAN_COSINE), or None."""
    if mean_cosine <= COLLAPSED_MEAN_COSINE:
        return None
    return (f"the embeddings of different people point nearly the same way ({what}: mean cosine {mean_cosine:.3f}; "
            f"a working model gives well under {COLLAPSED_MEAN_COSINE}): most pairs would look 'same'. Is the pixel "
            f"normalisation right (--input_mean/--input_std of an ONNX model; ours and insightface's are 127.5/127.5)?")


def warn_if_collapsed(templates, warn=warn_line):
    """A warning when the templates of a gallery's identities (different people) collapse."""
    if len(templates) >= SPREAD_MIN_FACES:
        problem = collapse_problem(mean_pairwise_cosine(templates), f"the {len(templates)} gallery identities")
        if problem:
            warn(f"warning: {problem}")


# --- outputs --------------------------------------------------------------------------------------

def output_files(output):
    """(EMB.npy, EMB.txt, EMB.quality.npy) for --output EMB.npy."""
    if not output.endswith(".npy"):
        raise ArcFaceError(f"--output must name a .npy file, got {shown(output)}")
    stem = output[:-len(".npy")]
    return output, stem + ".txt", stem + ".quality.npy"


def check_outputs(output, overwrite):
    """Refuse, before any work, to replace earlier results unless asked to."""
    for path in output_files(output):
        if os.path.lexists(path) and not overwrite:
            raise ArcFaceError(f"{shown(path)} exists; pass --overwrite to replace it")


def save_embeddings(output, names, embeddings, quality):
    """EMB.npy (float32, one row per face), EMB.txt (the face names in row order) and EMB.quality.npy
    (float32, each face's quality)."""
    npy, txt, quality_npy = output_files(output)
    text = "".join(f"{name}\n" for name in names).encode("utf-8", "surrogateescape")
    atomic_write(txt, lambda f: f.write(text))
    atomic_write(quality_npy, lambda f: np.save(f, np.asarray(quality, dtype=np.float32)))
    atomic_write(npy, lambda f: np.save(f, np.asarray(embeddings, dtype=np.float32)))


# --- thresholds -----------------------------------------------------------------------------------

@dataclass
class Threshold:
    cosine: float
    source: str             # where it came from, printed with every decision
    calibrated: bool = True


def given_threshold(cosine):
    if not -1.0 <= cosine <= 1.0:
        raise ArcFaceError(f"--threshold is a cosine similarity in [-1, 1], got {cosine}")
    return Threshold(cosine, "from --threshold")


UNCALIBRATED = ("calibrate: --calibration SET.bin (a verification set such as lfw.bin), or --threshold; a "
                "training run with --eval_url records its own threshold in threshold.json")


def default_threshold():
    return Threshold(DEFAULT_THRESHOLD, "uncalibrated default, not measured for this model; calibrate with "
                                        "--calibration SET.bin or set --threshold", calibrated=False)


def uncalibrated_warning(threshold):
    return (f"warning: same/different at an uncalibrated threshold ({threshold.cosine:g}): models differ widely "
            f"(the demo model's calibrated threshold is 0.68), so the decision may be wrong; {UNCALIBRATED}")


def calibrated_threshold(embed_fn, bin_path, batch_size, nfolds=10, progress=None, warn=warn_line):
    """The verification protocol's threshold on a .bin set: the mean of the folds' accuracy-maximising
    squared distances d between unit embeddings, as a cosine (d = 2 - 2 cos)."""
    from src.data.bins import load_bin
    progress = sys.stderr.isatty() if progress is None else progress
    images, issame = load_bin(bin_path, progress=progress)
    emb, emb_flip = embed_pairs(embed_fn, images, batch_size, progress=progress)
    result = evaluate(emb, issame, emb_flip, nfolds=nfolds)
    cosine, distance = calibrated_cosine(result)
    unit = fuse_flips(emb, emb_flip)[0]
    impostors = np.sum(unit[0::2] * unit[1::2], axis=1)[~np.asarray(issame, dtype=bool)]
    problem = collapse_problem(float(np.mean(impostors)), f"the {len(impostors)} impostor pairs of {bin_path}") \
        if len(impostors) else None
    if problem:
        warn(f"warning: {problem}")
    return Threshold(cosine, f"calibrated on {bin_path}: mean of the {nfolds} folds' best squared "
                             f"distances {distance:.4f}, Accuracy-Flip {result.acc_flip:.5f}")


def recorded_threshold(model_path, model=None, log=warn_line):
    """The threshold a training run recorded (threshold.json beside best.ckpt: see
    src.evaluation.verification.write_threshold_record) for a model of that run, or None.

    A model of the run is a checkpoint in its folder (or the folder itself), or an ONNX export of its
    best.ckpt: the verified export cache stamps each export with the key of the checkpoint bytes it
    was made from, compared here with best.ckpt's. The record holds best.ckpt's sha256: a record that
    does not describe the best.ckpt beside it (a run stopped between writing the two) is not used."""
    from src.evaluation.embedders import STAMP, Options, export_key
    path = os.path.abspath(model_path)
    metadata = getattr(model.embed, "metadata", None) if model is not None else None
    if os.path.isdir(path):
        kind, folders = "run", [path]
    elif path.lower().endswith(".ckpt"):
        kind, folders = "checkpoint", [os.path.dirname(path)]
    elif path.lower().endswith(".onnx") and metadata and metadata.get(STAMP):
        folder = os.path.dirname(path)
        kind, folders = "export", [folder] + ([os.path.dirname(folder)] if os.path.basename(folder) == ".onnx-cache"
                                              else [])
    else:
        return None
    for folder in folders:
        record_path = os.path.join(folder, THRESHOLD_FILE)
        if not os.path.lexists(record_path):
            continue
        record = read_threshold_record(record_path, log)
        if record is None:
            continue
        best = os.path.join(folder, record["checkpoint"])
        try:
            if _kind_of(best) != "file" or file_sha256(best) != record["sha256"]:
                log(f"warning: {shown(record_path)} does not describe a {record['checkpoint']} beside it (a run "
                    f"stopped between writing them, or files copied apart?); not used")
                continue
            if kind == "export":  # an ONNX export of best.ckpt's very bytes?
                if metadata[STAMP] != export_key(best, Options()):
                    continue
                which = f"this model is the export of {record['checkpoint']}"
            elif kind == "checkpoint" and file_sha256(path) == record["sha256"]:
                which = f"this checkpoint is {record['checkpoint']}"
            else:
                which = f"recorded for {record['checkpoint']} of this run; this checkpoint may differ slightly"
        except OSError as exc:
            log(f"warning: cannot check {shown(record_path)}: {exc.strerror or exc}; not used")
            continue
        return Threshold(record["threshold"], f"recorded by the training run in {shown(record_path)}: calibrated on "
                                              f"{record['set']} at step {record['step']}, Accuracy-Flip "
                                              f"{record['accuracy']:.5f}; {which}")
    return None


def decision_threshold(args_threshold, calibration, model_path, model, batch_size, nfolds, log=warn_line):
    """The threshold of --compare/--search: --threshold, --calibration SET.bin, the one the model's
    training run recorded, or the uncalibrated default (with a warning)."""
    if args_threshold is not None:
        return given_threshold(args_threshold)
    if calibration:
        return calibrated_threshold(model.embed, calibration, batch_size, nfolds)
    threshold = recorded_threshold(model_path, model, log) or default_threshold()
    if not threshold.calibrated:
        log(uncalibrated_warning(threshold))
    return threshold


# --- comparing ------------------------------------------------------------------------------------

def compare(embed_fn, a, b, batch_size, skip_bad=False, progress=None, min_quality=None, warn=warn_line):
    """Cosine similarity of two faces, or of the mean embeddings of two sets of faces; `a` and `b` are
    (name, faces). Both are embedded in one pass."""
    done = embed_faces(embed_fn, a[1] + b[1], batch_size, skip_bad, progress, warn)
    names = [(a[1] + b[1])[i].name for i in done.kept]
    keep = quality_filter(names, done.quality, min_quality, warn)
    in_a = (done.kept < len(a[1])) & keep
    in_b = (done.kept >= len(a[1])) & keep
    for (name, _), rows in ((a, in_a), (b, in_b)):
        if not rows.any():
            raise ArcFaceError(f"no image of {shown(name)} could be used")
    emb = done.embeddings
    return float(mean_embedding(emb[in_a]) @ mean_embedding(emb[in_b]))


def decision(cosine, threshold):
    """'same' when the cosine exceeds the threshold (the protocol's distance below it), else 'different'."""
    return "same" if cosine > threshold.cosine else "different"


# --- gallery search -------------------------------------------------------------------------------

CACHE_ENTRIES = ("model", "files", "stamps", "embeddings", "quality")


def check_gallery_cache(path, overwrite, gallery_dir, query_paths=()):
    """Refuse, before any work, a --gallery_cache that is not a .npz, lies inside the gallery or a query
    folder (or is a query image), or is an existing file that is not a gallery cache (without
    --overwrite: it would be replaced)."""
    if not path.lower().endswith(".npz"):
        raise ArcFaceError(f"--gallery_cache must name a .npz file, got {shown(path)}")
    real = os.path.realpath(path)
    for folder in [gallery_dir] + list(query_paths):
        inside = os.path.realpath(folder)
        if real == inside or real.startswith(inside.rstrip(os.sep) + os.sep):
            raise ArcFaceError(f"--gallery_cache {shown(path)} lies inside {shown(folder)}: keep it outside the "
                               f"gallery and query folders")
    kind = _kind_of(path)
    if kind == "missing":
        return
    if kind != "file":
        raise ArcFaceError(f"--gallery_cache {shown(path)} exists and is not a regular file")
    if not overwrite and not is_gallery_cache(path):
        raise ArcFaceError(f"--gallery_cache {shown(path)} exists and is not a gallery cache (a .npz written by "
                           f"embed.py --search); pass --overwrite to replace it")


def is_gallery_cache(path):
    """Whether `path` is a .npz holding a gallery cache's entries (whatever their values)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with np.load(path, allow_pickle=False) as data:
            return set(CACHE_ENTRIES[:4]) <= set(data.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def open_gallery(gallery_dir):
    """The ImageFolder of a gallery: one sub-folder of faces (or photos) per identity."""
    if not os.path.isdir(gallery_dir):
        raise ArcFaceError(f"gallery folder not found: {shown(gallery_dir)}")
    source = ImageFolderSource(gallery_dir)
    if not source.num_classes:
        raise ArcFaceError(f"{shown(gallery_dir)}: no identity sub-folders with images (a gallery holds one folder "
                           f"of aligned faces per identity)")
    return source


def gallery_templates(model, gallery, batch_size, cache=None, skip_bad=False, progress=None, warn=warn_line,
                      detect=False, min_quality=None, overwrite=False):
    """(identity names, (K, D) unit templates) of an ImageFolder gallery (a folder, or open_gallery's
    source), one identity per sub-folder (of aligned faces, or of photos with `detect`: the largest
    face of each).

    With `cache` (.npz), embeddings of images unchanged since (same relative path, size and mtime,
    same model and detection) are reused, the others embedded and the cache rewritten. A cache that
    does not hold what it claims (shapes, dtypes, finite unit rows) is rebuilt with a warning; a file
    that is not a gallery cache is only replaced with `overwrite` (check_gallery_cache)."""
    source = gallery if isinstance(gallery, ImageFolderSource) else open_gallery(gallery)
    gallery_dir = source.root
    files, labels = source.files, source.labels()
    names = [os.path.relpath(f, gallery_dir) for f in files]
    stamps = np.array([_stamp(f) for f in files], dtype=np.int64)
    key = model.key + (" detect" if detect else "")
    known = {} if not cache or (overwrite and not is_gallery_cache(cache)) else _read_cache(cache, key, warn)
    embeddings = {}
    for name, stamp in zip(names, stamps):
        if name in known and np.array_equal(known[name][0], stamp):
            embeddings[name] = known[name][1:]
    # One cached image is embedded again: the cache must prove it holds this model's embeddings (its key
    # names the model's files and options, but the arrays could come from anywhere).
    probe = next(iter(embeddings), None)
    claimed = embeddings.pop(probe) if probe is not None else None
    todo = [i for i, name in enumerate(names) if name not in embeddings]
    if todo:
        fresh = _embed_gallery_files([files[i] for i in todo], model, batch_size, skip_bad, progress, warn, detect)
        if probe is not None and not _same_direction(claimed[0], fresh.get(files[names.index(probe)])):
            warn(f"warning: the gallery cache {shown(cache)} does not hold this model's embeddings (an image "
                 f"embedded again differs from its cached row); re-embedding the gallery")
            todo, embeddings = list(range(len(files))), {}
            fresh = _embed_gallery_files(files, model, batch_size, skip_bad, progress, warn, detect)
        embeddings.update((os.path.relpath(path, gallery_dir), row) for path, row in fresh.items())
    if cache and (todo or len(known) != len(embeddings)):
        _write_cache(cache, key, names, stamps, embeddings)
    members = [[] for _ in source.classes]
    used = [name for name in names if name in embeddings]
    quality = np.array([embeddings[name][1] for name in used], dtype=np.float32)
    keep = dict(zip(used, quality_filter([os.path.join(gallery_dir, n) for n in used], quality, min_quality, warn)))
    for name, label in zip(names, labels):
        if keep.get(name):
            members[label].append(embeddings[name][0])
    identities, templates = [], []
    for identity, rows in zip(source.classes, members):
        if _unlistable(identity):
            problem = f"identity folder {shown(identity)}: its name has a line break or another control character"
            if not skip_bad:
                raise ArcFaceError(f"{problem}; rename it (--skip_bad leaves it out)")
            warn(f"warning: skipping {problem}")
        elif rows:
            identities.append(identity)
            templates.append(mean_embedding(np.stack(rows)))
        else:
            warn(f"warning: identity {shown(identity)} has no usable image; left out of the gallery")
    if not templates:
        raise ArcFaceError(f"{shown(gallery_dir)}: no identity of the gallery has a usable image")
    return identities, np.stack(templates)


def _embed_gallery_files(files, model, batch_size, skip_bad, progress, warn, detect):
    """{path: (unit embedding, quality)} of the gallery images that could be used: aligned crops, or
    photos (their largest face)."""
    faces = [Face(path) for path in files]
    if detect:
        faces = detect_faces(faces, skip_bad=skip_bad, progress=progress, warn=warn)
    done = embed_faces(model.embed, faces, batch_size, skip_bad, progress, warn)
    return {faces[index].path: (done.embeddings[row], done.quality[row]) for row, index in enumerate(done.kept)}


def _same_direction(cached, fresh):
    """Whether a cached unit embedding is the one computed now (`fresh`: (embedding, quality) or None):
    the same size and direction (cosine 0.999; runtimes differ by ~1e-6)."""
    return fresh is not None and cached.shape == fresh[0].shape and float(cached @ fresh[0]) >= 0.999


def _stamp(path):
    """(size, mtime in ns) of a gallery image; (-1, -1) when it cannot be read (a symbolic link loop):
    never equal to a cached stamp, so it is embedded, and reported as unreadable there."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _read_cache(path, model_key, warn):
    """{relative path: (stamp, embedding, quality)} from a gallery cache whose content is checked; a
    cache of another model or one that does not hold what it should is rebuilt (empty result)."""
    if not os.path.exists(path):
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            entries = {name: data[name] for name in CACHE_ENTRIES if name in data.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warn(f"warning: cannot use the gallery cache {shown(path)} ({exc}); re-embedding")
        return {}
    problem = _cache_problem(entries)
    if problem:
        warn(f"warning: the gallery cache {shown(path)} {problem}; re-embedding the gallery")
        return {}
    if str(entries["model"]) != model_key:
        warn(f"note: the gallery cache {shown(path)} was made with another model or options; re-embedding")
        return {}
    return {str(n): (s, e, q) for n, s, e, q in zip(entries["files"], entries["stamps"], entries["embeddings"],
                                                     entries["quality"])}


def _cache_problem(entries):
    """What is wrong with the arrays of a gallery cache, or None."""
    missing = [name for name in CACHE_ENTRIES if name not in entries]
    if missing:
        return f"has no {', '.join(missing)} (an older or damaged cache)"
    model, files, stamps, emb, quality = (entries[name] for name in CACHE_ENTRIES)
    n = len(files) if files.ndim == 1 else -1
    if model.ndim != 0 or model.dtype.kind != "U" or files.ndim != 1 or files.dtype.kind != "U":
        return "does not hold a model key and a list of file names"
    if len(set(files.tolist())) != n:
        return "lists a file twice"
    if stamps.dtype != np.int64 or stamps.shape != (n, 2):
        return f"holds stamps of shape {stamps.shape} {stamps.dtype} for {n} files, expected ({n}, 2) int64"
    if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[0] != n or emb.shape[1] < 1:
        return f"holds embeddings of shape {emb.shape} {emb.dtype} for {n} files, expected ({n}, D) float32"
    if quality.dtype != np.float32 or quality.shape != (n,):
        return f"holds qualities of shape {quality.shape} {quality.dtype} for {n} files, expected ({n},) float32"
    if not (np.all(np.isfinite(emb)) and np.all(np.isfinite(quality))):
        return "holds NaN/Inf values"
    if n and (np.max(np.abs(np.linalg.norm(emb.astype(np.float64), axis=1) - 1)) > 1e-3 or np.any(quality < 0)):
        return "holds embeddings that are not unit vectors or negative qualities"
    return None


def _write_cache(path, model_key, names, stamps, embeddings):
    rows = [i for i, name in enumerate(names) if name in embeddings]
    if not rows:
        return
    atomic_write(path, lambda f: np.savez(
        f, model=np.array(model_key), files=np.array([names[i] for i in rows]), stamps=stamps[rows],
        embeddings=np.stack([embeddings[names[i]][0] for i in rows]).astype(np.float32),
        quality=np.array([embeddings[names[i]][1] for i in rows], dtype=np.float32)))


def search(query_embeddings, templates, top_k):
    """(indices (Q, k), cosines (Q, k)) of the k best identities for every query, best first."""
    scores = query_embeddings @ templates.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return order, np.take_along_axis(scores, order, axis=1)


def search_line(name, identities, order, scores, threshold):
    """`name: id 0.82455, id 0.18456` when the best identity is above the threshold, else
    `name: no match above 0.43550: id 0.28455, ...`."""
    ranked = ", ".join(f"{identities[k]} {s:.5f}" for k, s in zip(order, scores))
    if threshold is None or scores[0] > threshold.cosine:
        return f"{name}: {ranked}"
    return f"{name}: no match above {threshold.cosine:.5f}: {ranked}"
