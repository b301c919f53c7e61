"""IJB-B / IJB-C 1:1 template verification (TAR at fixed FAR).

Data layout (the official ``IJB_release`` folders)::

    <ijb_dir>/meta/<prefix>_face_tid_mid.txt        image_name template_id media_id
    <ijb_dir>/meta/<prefix>_name_5pts_score.txt     image_name x1 y1 ... x5 y5 faceness
    <ijb_dir>/meta/<prefix>_template_pair_label.txt tid1 tid2 label
    <ijb_dir>/loose_crop/<image_name>

with ``<prefix>`` = ``ijbb`` or ``ijbc``.  ``ijb_dir`` is the target folder (e.g.
``IJB_release/IJBC``); the parent ``IJB_release`` folder is accepted too.

Protocol:

1. every face is aligned with a 5-point similarity transform onto the ArcFace 112x112 template;
2. its feature is ``emb(face) + emb(flip(face))`` (norm kept) times the faceness score;
3. a template feature is the sum over its media of the mean feature of that media's faces,
   l2-normalised;
4. a pair score is the dot product of the two template features;
5. from the ROC of all pairs, TAR@FAR is the TPR of the ROC point whose FPR is nearest the
   target (ties: the larger TPR).

The embedding model is any ``embed_fn`` following the protocol of
:func:`src.evaluation.verification.embed_pairs`; precomputed features go straight to
:func:`evaluate_ijb_features`.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from src.data.align import align_face
from src.data.images import decode_image
from src.errors import ArcFaceError
from src.evaluation.verification import embed_pairs, fuse_flips
from src.files import atomic_write

__all__ = [
    "FAR_TARGETS",
    "TARGETS",
    "IJBMeta",
    "resolve_target",
    "resolve_ijb_dir",
    "load_meta",
    "embed_ijb_faces",
    "template_features",
    "pair_scores",
    "tar_at_far",
    "format_table",
    "save_roc_plot",
    "evaluate_ijb_features",
    "evaluate_ijb",
]

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TARGETS = ("IJBB", "IJBC")
CHUNK_FACES = 4096


# ---------------------------------------------------------------------------------------------
# Meta files
# ---------------------------------------------------------------------------------------------


@dataclass
class IJBMeta:
    """The parsed meta files of one IJB set.

    Faces are in the order of ``<prefix>_face_tid_mid.txt``; pairs in the order of
    ``<prefix>_template_pair_label.txt``.
    """

    target: str  # 'IJBB' or 'IJBC'
    root: str  # the folder holding meta/ and loose_crop/
    image_names: list
    template_ids: np.ndarray  # (N,) int64
    media_ids: np.ndarray  # (N,) int64
    landmarks: np.ndarray  # (N, 5, 2) float32, in loose_crop pixel coordinates
    faceness: np.ndarray  # (N,) float32
    p1: np.ndarray  # (P,) int64 template ids
    p2: np.ndarray  # (P,) int64 template ids
    labels: np.ndarray  # (P,) int64, 1 = same identity

    @property
    def num_faces(self):
        return len(self.image_names)

    @property
    def num_pairs(self):
        return len(self.labels)


def resolve_target(target):
    """Canonical target name ('IJBB' or 'IJBC') of a case-insensitive name."""
    name = str(target).strip().upper()
    if name not in TARGETS:
        raise ArcFaceError(f"unknown IJB target {target!r}: expected one of {', '.join(TARGETS)}")
    return name


def resolve_ijb_dir(ijb_dir, target):
    """The folder holding ``meta/`` for ``target``: ``ijb_dir`` itself or ``ijb_dir/<TARGET>``."""
    target = resolve_target(target)
    ijb_dir = os.fspath(ijb_dir)
    if os.path.isdir(os.path.join(ijb_dir, "meta")):
        return ijb_dir
    nested = os.path.join(ijb_dir, target)
    if os.path.isdir(os.path.join(nested, "meta")):
        return nested
    if not os.path.isdir(ijb_dir):
        raise ArcFaceError(f"IJB folder not found: {ijb_dir}")
    raise ArcFaceError(
        f"missing folder {os.path.join(ijb_dir, 'meta')} (IJB meta files of {target})"
    )


def _data_lines(path):
    """Yield ``(line_number, fields)`` of the non-blank lines of a text file (1-based)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if fields:
                yield number, fields


def _physical_line(path, row):
    """1-based line number of the ``row``-th (0-based) non-blank line."""
    for k, (number, _) in enumerate(_data_lines(path)):
        if k == row:
            return number
    return row + 1


def _parse_named_rows(path, n_numbers, kind):
    """Parse lines ``name n1 ... nK``.

    ``kind`` is ``int`` or ``float`` (the type of every number).  Returns
    ``(names, numbers (M, K), line_numbers)``; float values must be finite.
    """
    names, values, numbers = [], [], []
    expected = n_numbers + 1
    for number, fields in _data_lines(path):
        if len(fields) != expected:
            raise ArcFaceError(
                f"{path}, line {number}: expected {expected} fields (image name and {n_numbers} "
                f"numbers), got {len(fields)}"
            )
        name = fields[0]
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise ArcFaceError(f"{path}, line {number}: image name {name!r} points outside loose_crop/")
        names.append(name)
        values.append(fields[1:])
        numbers.append(number)
    if not names:
        raise ArcFaceError(f"{path}: the file contains no faces")
    dtype = np.int64 if kind is int else np.float64
    try:
        array = np.array(values, dtype=dtype)
    except (ValueError, OverflowError):
        array = None
    if array is None:  # locate the offending line
        for number, fields in zip(numbers, values):
            for value in fields:
                try:
                    kind(value)
                except (ValueError, OverflowError):
                    what = "an integer" if kind is int else "a number"
                    raise ArcFaceError(f"{path}, line {number}: {value!r} is not {what}") from None
        raise ArcFaceError(f"{path}: cannot parse the numbers")  # pragma: no cover
    if kind is float:
        bad = np.flatnonzero(~np.all(np.isfinite(array), axis=1))
        if len(bad):
            raise ArcFaceError(f"{path}, line {numbers[bad[0]]}: non-finite value")
    return names, array, numbers


def _parse_pairs(path):
    """Parse ``tid1 tid2 label`` lines into an ``(P, 3)`` int64 array (fast path: loadtxt)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
            rows = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError as error:
        # Slow path only on malformed files: find the first bad line and name it.
        for number, fields in _data_lines(path):
            if len(fields) != 3:
                raise ArcFaceError(
                    f"{path}, line {number}: expected 3 fields (tid1 tid2 label), got {len(fields)}"
                ) from None
            for value in fields:
                try:
                    int(value)
                except ValueError:
                    raise ArcFaceError(
                        f"{path}, line {number}: {value!r} is not an integer"
                    ) from None
        raise ArcFaceError(f"{path}: cannot parse the pairs ({error})") from None
    if rows.size == 0:
        raise ArcFaceError(f"{path}: the file contains no pairs")
    if rows.shape[1] != 3:
        raise ArcFaceError(
            f"{path}, line {_physical_line(path, 0)}: expected 3 fields (tid1 tid2 label), "
            f"got {rows.shape[1]}"
        )
    return rows


def load_meta(ijb_dir, target):
    """Read and validate the meta files of ``target`` ('IJBB' or 'IJBC', case-insensitive).

    Raises:
        ArcFaceError: missing folder/file, malformed line (with its number), landmark file not
            matching the face list, labels other than 0/1, or a pair naming a template without
            faces.
    """
    target = resolve_target(target)
    prefix = target.lower()
    root = resolve_ijb_dir(ijb_dir, target)
    meta_dir = os.path.join(root, "meta")
    tid_path = os.path.join(meta_dir, f"{prefix}_face_tid_mid.txt")
    lmk_path = os.path.join(meta_dir, f"{prefix}_name_5pts_score.txt")
    pair_path = os.path.join(meta_dir, f"{prefix}_template_pair_label.txt")
    for path in (tid_path, lmk_path, pair_path):
        if not os.path.isfile(path):
            raise ArcFaceError(f"missing IJB meta file: {path}")

    names, ids, _ = _parse_named_rows(tid_path, 2, int)
    lmk_names, lmk_values, lmk_lines = _parse_named_rows(lmk_path, 11, float)
    if len(lmk_names) != len(names):
        raise ArcFaceError(
            f"{lmk_path} lists {len(lmk_names)} faces but {tid_path} lists {len(names)}"
        )
    for k, (a, b) in enumerate(zip(names, lmk_names)):
        if a != b:
            raise ArcFaceError(
                f"{lmk_path}, line {lmk_lines[k]}: image {b!r} does not match {a!r} of "
                f"{tid_path} (face {k + 1}); both files must list the faces in the same order"
            )

    rows = _parse_pairs(pair_path)
    labels = rows[:, 2]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise ArcFaceError(
            f"{pair_path}, line {_physical_line(pair_path, int(bad[0]))}: label must be 0 or 1, "
            f"got {labels[bad[0]]}"
        )
    known = np.unique(ids[:, 0])
    for column in (0, 1):
        missing = np.flatnonzero(~np.isin(rows[:, column], known))
        if len(missing):
            row = int(missing[0])
            raise ArcFaceError(
                f"{pair_path}, line {_physical_line(pair_path, row)}: template "
                f"{rows[row, column]} has no faces in {tid_path}"
            )

    return IJBMeta(
        target=target,
        root=root,
        image_names=names,
        template_ids=np.ascontiguousarray(ids[:, 0]),
        media_ids=np.ascontiguousarray(ids[:, 1]),
        landmarks=lmk_values[:, :10].reshape(-1, 5, 2).astype(np.float32),
        faceness=lmk_values[:, 10].astype(np.float32),
        p1=np.ascontiguousarray(rows[:, 0]),
        p2=np.ascontiguousarray(rows[:, 1]),
        labels=np.ascontiguousarray(labels),
    )


# ---------------------------------------------------------------------------------------------
# Alignment and embedding
# ---------------------------------------------------------------------------------------------


def _load_face(root, meta, index):
    path = os.path.join(root, "loose_crop", meta.image_names[index])
    if not os.path.isfile(path):
        raise ArcFaceError(f"missing IJB image: {path}")
    image = decode_image(np.fromfile(path, dtype=np.uint8))
    if image is None:
        raise ArcFaceError(f"cannot decode IJB image: {path}")
    try:
        return align_face(image[:, :, ::-1], meta.landmarks[index])
    except ArcFaceError as error:
        raise ArcFaceError(f"{path}: {error}") from None


def _iter_face_chunks(root, meta, chunk_size, workers):
    """Yield ``(start, faces_uint8)`` chunks; the next chunk is decoded while one is used."""
    n = meta.num_faces
    chunk_size = max(1, int(chunk_size))
    pool = ThreadPoolExecutor(max_workers=max(1, int(workers)))

    def submit(start):
        stop = min(start + chunk_size, n)
        return [pool.submit(_load_face, root, meta, i) for i in range(start, stop)]

    try:
        pending = submit(0) if n else []
        for start in range(0, n, chunk_size):
            current = pending
            nxt = start + chunk_size
            pending = submit(nxt) if nxt < n else []
            yield start, np.stack([f.result() for f in current])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def embed_ijb_faces(embed_fn, ijb_dir, meta, batch_size, progress=True, chunk_size=CHUNK_FACES,
                    workers=2, fusion="sum"):
    """Stream faces through ``embed_fn`` chunk by chunk.

    Returns:
        ``(N, D)`` float32 features ``(emb + emb_flip) * faceness`` (the flip fusion ``fusion`` with
        its norm kept: see src.evaluation.verification.fuse_flips).
    """
    from tqdm import tqdm

    root = resolve_ijb_dir(ijb_dir, meta.target)
    n = meta.num_faces
    features = None
    with tqdm(total=n, disable=not progress, desc=f"{meta.target} faces", unit="img") as bar:
        for start, chunk in _iter_face_chunks(root, meta, chunk_size, workers):
            emb, emb_flip = embed_pairs(embed_fn, chunk, batch_size, progress=False, flip=True)
            stop = start + len(chunk)
            if features is None:
                features = np.empty((n, emb.shape[1]), dtype=np.float32)
            if fusion == "sum":
                np.add(emb, emb_flip, out=features[start:stop])
            else:
                unit, norm = fuse_flips(emb, emb_flip, fusion)
                features[start:stop] = unit * norm[:, None]
            features[start:stop] *= meta.faceness[start:stop, None]
            bar.update(len(chunk))
    if features is None:
        raise ArcFaceError(f"{meta.target}: no faces to embed")
    return features


# ---------------------------------------------------------------------------------------------
# Templates, scores and ROC
# ---------------------------------------------------------------------------------------------


def template_features(features, template_ids, media_ids, chunk=65536):
    """Aggregate face features into l2-normalised template features.

    Within a template, the faces of one media are averaged and the media means are summed.

    Returns:
        ``(templates, feats)``: sorted unique template ids ``(T,)`` and ``(T, D)`` float32 rows
        (all-zero rows stay zero).
    """
    from scipy import sparse

    features = np.asarray(features)
    template_ids = np.asarray(template_ids).reshape(-1)
    media_ids = np.asarray(media_ids).reshape(-1)
    if features.ndim != 2 or not len(features) == len(template_ids) == len(media_ids):
        raise ArcFaceError(
            f"features {features.shape}, template ids ({len(template_ids)},) and media ids "
            f"({len(media_ids)},) do not match"
        )
    templates, t_index = np.unique(template_ids, return_inverse=True)
    _, m_index = np.unique(media_ids, return_inverse=True)
    group_key = t_index.astype(np.int64) * (int(m_index.max(initial=0)) + 1) + m_index
    _, group, group_size = np.unique(group_key, return_inverse=True, return_counts=True)
    weight = 1.0 / group_size[group]  # each face weighs 1 / (faces in its template's media)

    n = len(features)
    sums = np.zeros((len(templates), features.shape[1]), dtype=np.float64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        matrix = sparse.csr_matrix(
            (weight[start:stop], (t_index[start:stop], np.arange(stop - start))),
            shape=(len(templates), stop - start),
        )
        sums += matrix @ features[start:stop].astype(np.float64)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return templates, (sums / norms).astype(np.float32)


def pair_scores(template_ids_sorted, template_feats, p1, p2, chunk=100_000):
    """Dot products of the template features of each pair, in bounded-memory chunks.

    Returns:
        ``(P,)`` float32 scores.
    """
    ids = np.asarray(template_ids_sorted).reshape(-1)
    feats = np.asarray(template_feats, dtype=np.float32)
    p1 = np.asarray(p1).reshape(-1)
    p2 = np.asarray(p2).reshape(-1)
    if feats.ndim != 2 or len(feats) != len(ids):
        raise ArcFaceError(f"{len(ids)} template ids but template features of shape {feats.shape}")
    if len(p1) != len(p2):
        raise ArcFaceError(f"pair lists differ in length: {len(p1)} and {len(p2)}")
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    if len(sorted_ids) > 1 and np.any(sorted_ids[1:] == sorted_ids[:-1]):
        raise ArcFaceError("template ids are not unique")

    if len(ids) == 0:
        raise ArcFaceError("no template features to score")

    def rows_of(pairs, which):
        pos = np.minimum(np.searchsorted(sorted_ids, pairs), len(sorted_ids) - 1)
        missing = np.flatnonzero(sorted_ids[pos] != pairs)
        if len(missing):
            k = int(missing[0])
            raise ArcFaceError(
                f"pair {k + 1} ({which} template) references template {pairs[k]}, "
                "which has no features"
            )
        return order[pos]

    rows1, rows2 = rows_of(p1, "first"), rows_of(p2, "second")
    scores = np.empty(len(p1), dtype=np.float32)
    chunk = max(1, int(chunk))
    for start in range(0, len(p1), chunk):
        stop = min(start + chunk, len(p1))
        scores[start:stop] = np.einsum(
            "ij,ij->i", feats[rows1[start:stop]], feats[rows2[start:stop]]
        )
    return scores


def tar_at_far(labels, scores, far_targets=FAR_TARGETS):
    """ROC and TAR at each FAR target.

    The TAR of a target is the TPR of the ROC point with FPR nearest the target; among equally
    near points, the one with the larger TPR (the last).

    Returns:
        ``(fpr, tpr, {far: tar})``.
    """
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(labels) != len(scores):
        raise ArcFaceError(f"{len(labels)} labels but {len(scores)} scores")
    if not np.all(np.isfinite(scores)):
        raise ArcFaceError("scores contain NaN/Inf values")
    n_pos = int(np.sum(labels == 1))
    if n_pos == 0 or n_pos == len(labels):
        raise ArcFaceError("the ROC needs both genuine (label 1) and impostor (label 0) pairs")
    fpr, tpr, _ = roc_curve(labels, scores)
    tars = {}
    for far in far_targets:
        gap = np.abs(fpr - far)
        index = len(gap) - 1 - int(np.argmin(gap[::-1]))  # last of the nearest
        tars[far] = float(tpr[index])
    return fpr, tpr, tars


def format_table(rows):
    """PrettyTable of ``{method: {far: tar}}`` with TARs in percent (``%.2f``)."""
    from prettytable import PrettyTable

    if not rows:
        raise ArcFaceError("no results to tabulate")
    fars = list(next(iter(rows.values())).keys())
    table = PrettyTable(["Methods"] + [str(far) for far in fars])
    for name, tars in rows.items():
        table.add_row([name] + [
            "%.2f" % (tars[far] * 100) if far in tars else "" for far in fars
        ])
    return table.get_string()


def save_roc_plot(path, curves, title="ROC on IJB"):
    """Save the ROC curves ``{name: (fpr, tpr)}`` (log-scale FAR axis) as an image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import auc

    fig = Figure(figsize=(7, 5.5), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    low = 1.0
    for name, (fpr, tpr) in curves.items():
        fpr = np.asarray(fpr, dtype=np.float64)
        tpr = np.asarray(tpr, dtype=np.float64)
        area = auc(fpr, tpr) * 100 if len(fpr) > 1 else float("nan")
        visible = fpr > 0
        ax.plot(fpr[visible], tpr[visible], lw=1.5, label=f"{name} (AUC = {area:.2f}%)")
        shown = tpr[visible & (fpr >= 1e-6)]
        if len(shown):
            low = min(low, float(shown.min()))
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1.0)
    ax.set_ylim(min(0.3, np.floor(low * 10) / 10), 1.0)
    ax.set_xticks([10.0 ** e for e in range(-6, 1)])
    ax.set_xlabel("False Positive Rate (FAR)")
    ax.set_ylabel("True Positive Rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="major", linestyle="--", linewidth=0.8, alpha=0.7)
    ax.grid(True, which="minor", linestyle=":", linewidth=0.5, alpha=0.4)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def evaluate_ijb_features(features, meta, target, result_dir, job=None, log=print):
    """Score precomputed face features (rows in face-list order) and report TAR@FAR.

    Writes ``<result_dir>/<TARGET>_scores.npy`` (float32, pair-file order) and
    ``<result_dir>/<TARGET>_roc.png``; logs the table.

    Returns:
        ``{far: tar}``.
    """
    target = resolve_target(target)
    if meta.target != target:
        raise ArcFaceError(f"the meta data is of {meta.target}, not {target}")
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] != meta.num_faces or features.shape[1] == 0:
        raise ArcFaceError(
            f"{target}: features must have shape ({meta.num_faces}, D), got {features.shape}"
        )
    if not np.all(np.isfinite(features)):
        raise ArcFaceError(f"{target}: features contain NaN/Inf values")
    job = target.lower() if job is None else str(job)
    name = f"{job}-{target}"

    templates, feats = template_features(features, meta.template_ids, meta.media_ids)
    scores = pair_scores(templates, feats, meta.p1, meta.p2)
    os.makedirs(result_dir, exist_ok=True)
    score_path = os.path.join(result_dir, f"{target}_scores.npy")
    atomic_write(score_path, lambda fh: np.save(fh, scores.astype(np.float32)))

    fpr, tpr, tars = tar_at_far(meta.labels, scores)
    log(format_table({name: tars}))
    roc_path = os.path.join(result_dir, f"{target}_roc.png")
    save_roc_plot(roc_path, {name: (fpr, tpr)}, title=f"ROC on {target}")
    log(f"[{name}] scores: {score_path}  roc: {roc_path}")
    return tars


def evaluate_ijb(embed_fn, ijb_dir, target, batch_size, result_dir, job=None, log=print,
                 progress=True, fusion="sum"):
    """The whole IJB-B/IJB-C 1:1 verification: meta, streaming embedding, scoring, report."""
    meta = load_meta(ijb_dir, target)
    log(f"[{meta.target}] {meta.num_faces} faces, {len(np.unique(meta.template_ids))} templates, "
        f"{meta.num_pairs} pairs")
    features = embed_ijb_faces(embed_fn, ijb_dir, meta, batch_size, progress=progress, fusion=fusion)
    return evaluate_ijb_features(features, meta, meta.target, result_dir, job=job, log=log)
