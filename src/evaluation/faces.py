"""Face images in, embeddings out; comparing two faces and searching a gallery (embed.py).

A face is an aligned 112x112 crop (other sizes are resized as the evaluation resizes them) or a
photo with five landmarks, aligned here with the IJB pipeline's similarity transform. Its
embedding is the one the verification protocol scores: emb(face) + emb(flip(face)), L2-normalised,
so thresholds found by that protocol apply to it unchanged. A set of faces (a folder given to
--compare, an identity of a gallery) is the mean of its unit embeddings, renormalised. The model is
opened by src.evaluation.embedders.open_model, as every door opens one.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import zipfile
from dataclasses import dataclass

import numpy as np

from src.data.align import align_face
from src.data.images import IMAGE_EXTENSIONS, IMAGE_SIZE, decode_image, resize, why_undecodable
from src.data.sources import ImageFolderSource, parallel_map
from src.errors import ArcFaceError
from src.evaluation.verification import embed_pairs, evaluate, l2_normalize
from src.files import atomic_write

# Cosine threshold when none is given or calibrated: squared distance 1.4. Published ArcFace
# ResNets trained on MS1M-scale data separate same/different around cosine 0.28-0.36; a model of
# another size or training differs, hence the note printed with it.
DEFAULT_THRESHOLD = 0.3
# Faces decoded at a time, rounded up to whole batches: bounds memory (~38 KB per face) on large inputs.
CHUNK_FACES = 128
WORKERS = min(4, os.cpu_count() or 1)


def warn_line(line):
    """Warnings go to stderr without breaking a progress bar."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stderr)


# --- inputs ---------------------------------------------------------------------------------------

@dataclass
class Face:
    path: str                     # as written to the outputs and named in messages
    landmarks: np.ndarray = None  # (5, 2) pixel coordinates in the image, None for an aligned crop
    origin: str = ""              # the landmark file's line (or key), for messages


def _key(path):
    return os.path.normcase(os.path.abspath(path))


def find_images(paths):
    """Files as given, folders walked recursively (hidden entries skipped) in the sorted order of
    their relative paths, so the rows of an output follow one reproducible order."""
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            images = _walk(path)
            if not images:
                raise ArcFaceError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found in {path}")
            found.extend(images)
        else:
            raise ArcFaceError(f"image path not found: {path}")
    return found


def _walk(folder):
    def fail(exc):
        raise ArcFaceError(f"cannot list {exc.filename}: {exc.strerror}")

    images = []
    for root, dirs, files in os.walk(folder, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        images.extend(os.path.join(root, f) for f in files
                      if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(images, key=lambda p: os.path.relpath(p, folder).split(os.sep))


@dataclass
class Landmarks:
    """The faces of a landmark file, in its order."""

    path: str
    faces: list

    def faces_of(self, paths):
        """Faces for image files/folders; each image must be listed in the file."""
        table = {_key(face.path): face for face in self.faces}
        faces = []
        for path in find_images(paths):
            listed = table.get(_key(path))
            if listed is None:
                raise ArcFaceError(f"{path}: no landmarks for this image in {self.path}")
            faces.append(Face(path, listed.landmarks, listed.origin))
        return faces


def read_landmarks(path):
    """A CSV file of rows `image,x1,y1,...,x5,y5` (an optional header row, blank and `#` lines
    skipped; a header naming the columns `image` and `x1`..`y5` picks them from wider rows, as in
    align.py's faces.csv) or a JSON object {image: [[x, y], ...5]}. Relative image paths are relative to the
    file's folder. A missing image is an error here, before any model is loaded."""
    if not os.path.isfile(path):
        raise ArcFaceError(f"landmark file not found: {path}")
    entries = _read_json(path) if path.lower().endswith(".json") else _read_csv(path)
    if not entries:
        raise ArcFaceError(f"{path}: no landmark rows")
    folder = os.path.dirname(path)
    faces, seen = [], {}
    for name, points, origin in entries:
        image = name if os.path.isabs(name) else os.path.join(folder, name)
        if not os.path.isfile(image):
            raise ArcFaceError(f"{origin}: image not found: {image}")
        if _key(image) in seen:
            raise ArcFaceError(f"{origin}: {name} is listed twice (also {seen[_key(image)]})")
        seen[_key(image)] = origin
        faces.append(Face(image, points, origin))
    return Landmarks(path, faces)


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
        raise ArcFaceError(f"{path}: cannot read the landmarks as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ArcFaceError(f"{path}: expected a JSON object mapping each image to [[x, y], ...5]")
    return [(name, _points(values, f"{path}: {name!r}"), f"{path}: {name!r}") for name, values in data.items()]


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
                where = f"{path} line {reader.line_num}"
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
                    raise ArcFaceError(f"{where}: {bad!r} is not a number")
                entries.append((fields[0], _points([float(v) for v in fields[1:]], where), where))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ArcFaceError(f"{path}: cannot read the landmarks as CSV: {exc}") from None
    return entries


def faces_of(paths, landmarks=None):
    """Faces for image files/folders: aligned crops, or with a landmark file the images it lists."""
    return landmarks.faces_of(paths) if landmarks else [Face(p) for p in find_images(paths)]


# --- embedding ------------------------------------------------------------------------------------

def load_face(face):
    """(the 112x112 RGB crop, None) or (None, why it cannot be had)."""
    try:
        data = np.fromfile(face.path, dtype=np.uint8)
    except OSError as exc:
        return None, f"cannot read {face.path}: {exc.strerror or exc}"
    image = decode_image(data)
    if image is None:
        return None, f"{face.path}: {why_undecodable(data)}"
    if face.landmarks is None:
        return resize(image, IMAGE_SIZE), None
    try:
        return align_face(image[:, :, ::-1], face.landmarks), None
    except ArcFaceError as exc:
        return None, f"{face.path}: {exc} ({face.origin})"


def embed_faces(embed_fn, faces, batch_size, skip_bad=False, progress=None, warn=warn_line):
    """(indices of the faces embedded, (N, D) float32 unit embeddings of emb + emb_flip).

    A face that cannot be read, decoded or aligned is an error, or with `skip_bad` a warning and
    left out. Faces are decoded a chunk at a time, in threads; the bar shows on a terminal for
    more than one batch."""
    from tqdm import tqdm
    if batch_size < 1:
        raise ArcFaceError(f"--batch_size must be positive, got {batch_size}")
    progress = sys.stderr.isatty() if progress is None else progress
    chunk = batch_size * -(-CHUNK_FACES // batch_size)
    kept, parts = [], []
    with tqdm(total=len(faces), disable=not progress or len(faces) <= batch_size, desc="embedding",
              unit="img") as bar:
        for start in range(0, len(faces), chunk):
            images = []
            loaded = parallel_map(load_face, faces[start:start + chunk], WORKERS)
            for index, (image, problem) in enumerate(loaded, start):
                if problem is None:
                    kept.append(index)
                    images.append(image)
                elif skip_bad:
                    warn(f"warning: skipping {problem}")
                else:
                    raise ArcFaceError(f"{problem} (--skip_bad leaves such images out)")
            if images:
                emb, emb_flip = embed_pairs(embed_fn, np.stack(images), batch_size, progress=False)
                parts.append(l2_normalize(emb.astype(np.float64) + emb_flip).astype(np.float32))
            bar.update(min(chunk, len(faces) - start))
    if not kept:
        raise ArcFaceError(f"none of the {len(faces)} image(s) could be used")
    return np.asarray(kept), np.concatenate(parts)


def mean_embedding(unit_embeddings):
    """The unit vector of a set of faces: their unit embeddings averaged, renormalised."""
    return l2_normalize(np.mean(unit_embeddings, axis=0, keepdims=True))[0].astype(np.float32)


# --- outputs --------------------------------------------------------------------------------------

def output_files(output):
    """(EMB.npy, EMB.txt) for --output EMB.npy."""
    if not output.endswith(".npy"):
        raise ArcFaceError(f"--output must name a .npy file, got {output}")
    return output, output[:-len(".npy")] + ".txt"


def check_outputs(output, overwrite):
    """Refuse, before any work, to replace earlier results unless asked to."""
    for path in output_files(output):
        if os.path.exists(path) and not overwrite:
            raise ArcFaceError(f"{path} exists; pass --overwrite to replace it")


def save_embeddings(output, paths, embeddings):
    """EMB.npy (float32, one row per image) and EMB.txt (the image paths in row order)."""
    npy, txt = output_files(output)
    text = "".join(f"{path}\n" for path in paths).encode("utf-8", "surrogateescape")
    atomic_write(txt, lambda f: f.write(text))
    atomic_write(npy, lambda f: np.save(f, np.asarray(embeddings, dtype=np.float32)))


# --- comparing ------------------------------------------------------------------------------------

@dataclass
class Threshold:
    cosine: float
    source: str  # where it came from, printed with every decision


def given_threshold(cosine):
    if not -1.0 <= cosine <= 1.0:
        raise ArcFaceError(f"--threshold is a cosine similarity in [-1, 1], got {cosine}")
    return Threshold(cosine, "from --threshold")


def default_threshold():
    return Threshold(DEFAULT_THRESHOLD, "uncalibrated default; calibrate with --calibration SET.bin "
                                        "or set --threshold")


def calibrated_threshold(embed_fn, bin_path, batch_size, nfolds=10, progress=None):
    """The verification protocol's threshold on a .bin set: the mean of the folds' accuracy-maximising
    squared distances d between unit embeddings, as a cosine (d = 2 - 2 cos)."""
    from src.data.bins import load_bin
    progress = sys.stderr.isatty() if progress is None else progress
    images, issame = load_bin(bin_path, progress=progress)
    emb, emb_flip = embed_pairs(embed_fn, images, batch_size, progress=progress)
    result = evaluate(emb, issame, emb_flip, nfolds=nfolds)
    distance = float(np.mean(result.best_thresholds))
    return Threshold(1.0 - distance / 2.0, f"calibrated on {bin_path}: mean of the {nfolds} folds' best squared "
                                           f"distances {distance:.4f}, Accuracy-Flip {result.acc_flip:.5f}")


def compare(embed_fn, a, b, batch_size, skip_bad=False, progress=None):
    """Cosine similarity of two faces, or of the mean embeddings of two sets of faces; `a` and `b`
    are (name, faces). Both are embedded in one pass."""
    kept, emb = embed_faces(embed_fn, a[1] + b[1], batch_size, skip_bad, progress)
    in_a = kept < len(a[1])
    for (name, _), rows in ((a, in_a), (b, ~in_a)):
        if not rows.any():
            raise ArcFaceError(f"no image of {name} could be used")
    return float(mean_embedding(emb[in_a]) @ mean_embedding(emb[~in_a]))


def decision(cosine, threshold):
    """'same' when the cosine exceeds the threshold (the protocol's distance below it), else 'different'."""
    return "same" if cosine > threshold.cosine else "different"


# --- gallery search -------------------------------------------------------------------------------

def gallery_templates(model, gallery_dir, batch_size, cache=None, skip_bad=False, progress=None, warn=warn_line):
    """(identity names, (K, D) unit templates) of an ImageFolder gallery, one identity per sub-folder.

    With `cache` (.npz), embeddings of images unchanged since (same relative path, size and mtime,
    same model) are reused, the others embedded and the cache rewritten."""
    if not os.path.isdir(gallery_dir):
        raise ArcFaceError(f"gallery folder not found: {gallery_dir}")
    source = ImageFolderSource(gallery_dir)
    if not source.num_classes:
        raise ArcFaceError(f"{gallery_dir}: no identity sub-folders with images (a gallery holds one folder "
                           f"of aligned faces per identity)")
    files, labels = source.files, source.labels()
    names = [os.path.relpath(f, gallery_dir) for f in files]
    stats = [os.stat(f) for f in files]
    stamps = np.array([[st.st_size, st.st_mtime_ns] for st in stats], dtype=np.int64)
    known = _read_cache(cache, model.key, warn) if cache else {}
    embeddings = {}
    for name, stamp in zip(names, stamps):
        if name in known and np.array_equal(known[name][0], stamp):
            embeddings[name] = known[name][1]
    todo = [i for i, name in enumerate(names) if name not in embeddings]
    if todo:
        kept, emb = embed_faces(model.embed, [Face(files[i]) for i in todo], batch_size, skip_bad, progress, warn)
        embeddings.update((names[todo[k]], row) for k, row in zip(kept, emb))
    if cache and (todo or len(known) != len(embeddings)):
        _write_cache(cache, model.key, names, stamps, embeddings)
    members = [[] for _ in source.classes]
    for name, label in zip(names, labels):
        if name in embeddings:
            members[label].append(embeddings[name])
    identities, templates = [], []
    for identity, rows in zip(source.classes, members):
        if rows:
            identities.append(identity)
            templates.append(mean_embedding(np.stack(rows)))
        else:
            warn(f"warning: identity {identity} has no usable image; left out of the gallery")
    return identities, np.stack(templates)


def _read_cache(path, model_key, warn):
    """{relative path: (stamp, embedding)} from a gallery cache; an unusable cache is rebuilt."""
    if not os.path.exists(path):
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["model"]) != model_key:
                warn(f"note: the gallery cache {path} was made with another model or options; re-embedding")
                return {}
            return {str(n): (s, e) for n, s, e in zip(data["files"], data["stamps"], data["embeddings"])}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warn(f"warning: cannot use the gallery cache {path} ({exc}); re-embedding")
        return {}


def _write_cache(path, model_key, names, stamps, embeddings):
    rows = [i for i, name in enumerate(names) if name in embeddings]
    atomic_write(path, lambda f: np.savez(f, model=np.array(model_key), files=np.array([names[i] for i in rows]),
                                          stamps=stamps[rows], embeddings=np.stack([embeddings[names[i]]
                                                                                    for i in rows])))


def search(query_embeddings, templates, top_k):
    """(indices (Q, k), cosines (Q, k)) of the k best identities for every query, best first."""
    scores = query_embeddings @ templates.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return order, np.take_along_axis(scores, order, axis=1)
