import math
import os
import shutil

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_curve

from src.data.align import ARCFACE_TEMPLATE, align_face, similarity_transform
from src.errors import ArcFaceError
from src.evaluation.ijb import (
    FAR_TARGETS,
    embed_ijb_faces,
    evaluate_ijb,
    evaluate_ijb_features,
    format_table,
    load_meta,
    pair_scores,
    tar_at_far,
    template_features,
)

# ---------------------------------------------------------------------------------------------
# A tiny IJB release in the real formats: IJB_release/<IJBB|IJBC>/{meta,loose_crop}
# ---------------------------------------------------------------------------------------------

LOOSE_SIZE = 150


def _similarity(scale, angle_deg, tx, ty):
    a = math.radians(angle_deg)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), tx],
                     [scale * math.sin(a), scale * math.cos(a), ty]])


def _apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def _canonical_face(rng):
    """A 112x112 BGR face-like pattern aligned with the ArcFace template, identity-specific."""
    img = np.full((112, 112, 3), rng.uniform(40, 90), dtype=np.float32)
    skin = rng.uniform(110, 220, size=3)
    mask = np.zeros((112, 112), np.uint8)
    cv2.ellipse(mask, (56, 66), (38, 50), 0, 0, 360, 255, -1)
    texture = cv2.resize(rng.uniform(-50, 50, (5, 5, 3)).astype(np.float32), (112, 112),
                         interpolation=cv2.INTER_CUBIC)
    img[mask > 0] = (skin + texture)[mask > 0]
    for x, y in ARCFACE_TEMPLATE:
        cv2.circle(img, (int(round(x)), int(round(y))), 4, (20, 20, 30), -1)
    return img


def _write_release(root, target, n_ids, n_pairs, seed):
    """Write IJB_release/<target> and return its ground truth."""
    rng = np.random.default_rng(seed)
    prefix = target.lower()
    base = os.path.join(root, "IJB_release", target)
    os.makedirs(os.path.join(base, "meta"))
    os.makedirs(os.path.join(base, "loose_crop"))
    faces = [_canonical_face(rng) for _ in range(n_ids)]
    rows = []  # (name, tid, mid, identity)
    template_identity = {}
    media_counter = 500
    image_counter = 1
    for identity in range(n_ids):
        shared_media = None
        for t in range(3):
            tid = 1000 + 13 * (3 * identity + t) + (7 if target == "IJBB" else 0)
            template_identity[tid] = identity
            for m in range(int(rng.integers(1, 4))):
                if t == 1 and m == 0 and shared_media is not None:
                    mid = shared_media  # same media id in two templates: grouped per template
                else:
                    media_counter += 1
                    mid = media_counter
                    shared_media = mid if shared_media is None else shared_media
                for _ in range(int(rng.integers(1, 3))):
                    rows.append((f"{image_counter}.jpg", tid, mid, identity))
                    image_counter += 1
    order = rng.permutation(len(rows))  # faces of a template need not be contiguous
    rows = [rows[i] for i in order]

    landmarks, scores = [], []
    for name, _tid, _mid, identity in rows:
        m = _similarity(rng.uniform(0.95, 1.2), rng.uniform(-20, 20), 0, 0)
        centre = _apply(m, ARCFACE_TEMPLATE).mean(axis=0)
        m[:, 2] = LOOSE_SIZE / 2 + rng.uniform(-6, 6, 2) - centre
        img = cv2.warpAffine(faces[identity], m, (LOOSE_SIZE, LOOSE_SIZE),
                             borderMode=cv2.BORDER_REPLICATE)
        nuisance = cv2.resize(rng.uniform(-45, 45, (4, 4, 3)).astype(np.float32),
                              (LOOSE_SIZE, LOOSE_SIZE), interpolation=cv2.INTER_CUBIC)
        img = img * rng.uniform(0.85, 1.15) + nuisance + rng.normal(0, 4, img.shape)
        cv2.imwrite(os.path.join(base, "loose_crop", name), np.clip(img, 0, 255).astype(np.uint8),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        landmarks.append(np.round(_apply(m, ARCFACE_TEMPLATE), 3))
        scores.append(round(float(rng.uniform(0.5, 1.0)), 4))

    tids = sorted(template_identity)
    all_pairs = [(a, b) for i, a in enumerate(tids) for b in tids[i + 1:]]
    genuine = [p for p in all_pairs if template_identity[p[0]] == template_identity[p[1]]]
    impostor = [p for p in all_pairs if template_identity[p[0]] != template_identity[p[1]]]
    pick = rng.choice(len(impostor), n_pairs - len(genuine), replace=False)
    pairs = genuine + [impostor[i] for i in pick]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    labels = [int(template_identity[a] == template_identity[b]) for a, b in pairs]

    meta = os.path.join(base, "meta")
    with open(os.path.join(meta, f"{prefix}_face_tid_mid.txt"), "w") as f:
        for name, tid, mid, _ in rows:
            f.write(f"{name} {tid} {mid}\n")
    with open(os.path.join(meta, f"{prefix}_name_5pts_score.txt"), "w") as f:
        for (name, *_), lmk, score in zip(rows, landmarks, scores):
            f.write(name + " " + " ".join(f"{v:.3f}" for v in lmk.reshape(-1)) + f" {score}\n")
    with open(os.path.join(meta, f"{prefix}_template_pair_label.txt"), "w") as f:
        for (a, b), label in zip(pairs, labels):
            f.write(f"{a} {b} {label}\n")
    return {
        "dir": base,
        "names": [r[0] for r in rows],
        "tids": [r[1] for r in rows],
        "mids": [r[2] for r in rows],
        "landmarks": landmarks,
        "faceness": scores,
        "pairs": pairs,
        "labels": labels,
    }


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb")
    return {
        "root": str(root),
        "IJBC": _write_release(str(root), "IJBC", n_ids=6, n_pairs=40, seed=11),
        "IJBB": _write_release(str(root), "IJBB", n_ids=5, n_pairs=30, seed=12),
    }


_PROJECTION = np.random.default_rng(0).standard_normal((3 * 14 * 14, 16)).astype(np.float32)


def _project(x):
    """A fixed random projection of the 8x8-block-averaged image."""
    b = x.shape[0]
    small = x.reshape(b, 3, 14, 8, 14, 8).mean(axis=(3, 5)).reshape(b, -1)
    return small @ _PROJECTION


def _embedder(batch_size, calls=None):
    def embed(x):
        assert x.dtype == np.float32 and x.shape == (batch_size, 3, 112, 112)
        assert -1.0 <= x.min() and x.max() <= 1.0
        if calls is not None:
            calls.append(x.shape[0])
        return _project(x)
    return embed


def _reference_scores(gt):
    """Plain per-image / per-template loops on the ground truth written by the fixture."""
    feats = []
    for name, lmk, faceness in zip(gt["names"], gt["landmarks"], gt["faceness"]):
        image = cv2.imread(os.path.join(gt["dir"], "loose_crop", name))
        face = align_face(image, lmk)
        x = ((face.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        emb = _project(x)[0].astype(np.float64) + _project(x[:, :, :, ::-1].copy())[0]
        feats.append(emb * faceness)
    templates = {}
    for tid in sorted(set(gt["tids"])):
        media = {}
        for i, t in enumerate(gt["tids"]):
            if t == tid:
                media.setdefault(gt["mids"][i], []).append(feats[i])
        total = sum(np.mean(np.array(v), axis=0) for v in media.values())
        templates[tid] = total / np.linalg.norm(total)
    return np.array([float(np.dot(templates[a], templates[b])) for a, b in gt["pairs"]])


def _reference_tars(labels, scores):
    fpr, tpr, _ = roc_curve(labels, scores)
    tars = {}
    for far in FAR_TARGETS:
        best = None
        for i in range(len(fpr)):
            gap = abs(fpr[i] - far)
            if best is None or gap < best[0] or (gap == best[0] and tpr[i] >= best[1]):
                best = (gap, tpr[i])
        tars[far] = best[1]
    return tars


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["IJBC", "IJBB"])
def test_evaluate_ijb_end_to_end(release, tmp_path, target):
    gt = release[target]
    lines = []
    out = tmp_path / "result"
    tars = evaluate_ijb(_embedder(4), gt["dir"], target, batch_size=4, result_dir=str(out),
                        log=lines.append, progress=False)

    scores = np.load(out / f"{target}_scores.npy")
    assert scores.dtype == np.float32 and scores.shape == (len(gt["pairs"]),)
    reference = _reference_scores(gt)
    np.testing.assert_allclose(scores, reference, atol=1e-5)
    assert set(gt["labels"]) == {0, 1}

    expected = _reference_tars(gt["labels"], reference)
    assert list(tars) == list(FAR_TARGETS)
    for far in FAR_TARGETS:
        assert tars[far] == pytest.approx(expected[far], abs=1e-12)

    png = out / f"{target}_roc.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert cv2.imread(str(png)) is not None
    table = next(line for line in lines if "Methods" in line)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[1::2]]
    assert cells == [
        ["Methods", "1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"],
        [f"{target.lower()}-{target}"] + ["%.2f" % (expected[far] * 100) for far in FAR_TARGETS],
    ]
    assert 0 < expected[1e-4] < 1  # the synthetic set is neither trivial nor hopeless


def test_target_selects_its_own_files_from_release_root(release, tmp_path):
    lines = []
    release_dir = os.path.join(release["root"], "IJB_release")
    tars_b = evaluate_ijb(_embedder(8), release_dir, "ijbb", 8, str(tmp_path), job="mine",
                          log=lines.append, progress=False)
    assert any("| mine-IJBB |" in line for line in lines)
    assert np.load(tmp_path / "IJBB_scores.npy").shape == (30,)
    meta_c = load_meta(release_dir, "Ijbc")
    assert meta_c.target == "IJBC" and meta_c.num_pairs == 40
    meta_b = load_meta(release["IJBB"]["dir"], "IJBB")
    assert meta_b.num_faces == len(release["IJBB"]["names"]) != meta_c.num_faces
    assert set(tars_b) == set(FAR_TARGETS)


def test_load_meta_fields(release):
    gt = release["IJBC"]
    meta = load_meta(gt["dir"], "ijbc")
    assert meta.image_names == gt["names"]
    np.testing.assert_array_equal(meta.template_ids, gt["tids"])
    np.testing.assert_array_equal(meta.media_ids, gt["mids"])
    assert meta.landmarks.dtype == np.float32 and meta.landmarks.shape == (len(gt["names"]), 5, 2)
    np.testing.assert_allclose(meta.landmarks, np.array(gt["landmarks"]), atol=1e-4)
    np.testing.assert_allclose(meta.faceness, gt["faceness"], atol=1e-6)
    np.testing.assert_array_equal(meta.p1, [a for a, _ in gt["pairs"]])
    np.testing.assert_array_equal(meta.p2, [b for _, b in gt["pairs"]])
    np.testing.assert_array_equal(meta.labels, gt["labels"])


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_batch_size_does_not_change_scores(release, batch_size):
    gt = release["IJBC"]
    meta = load_meta(gt["dir"], "IJBC")
    calls = []
    feats = embed_ijb_faces(_embedder(batch_size, calls), gt["dir"], meta, batch_size,
                            progress=False, chunk_size=10)
    assert feats.shape == (meta.num_faces, 16) and feats.dtype == np.float32
    templates, tfeats = template_features(feats, meta.template_ids, meta.media_ids)
    scores = pair_scores(templates, tfeats, meta.p1, meta.p2)
    np.testing.assert_allclose(scores, _reference_scores(gt), atol=1e-5)
    assert set(calls) == {batch_size}


def test_streamed_features_are_those_of_the_aligned_faces(release):
    """Each face's feature is (emb(face) + emb(flip(face))) * faceness of its align_face crop."""
    gt = release["IJBB"]
    meta = load_meta(gt["dir"], "IJBB")
    feats = embed_ijb_faces(_embedder(5), gt["dir"], meta, 5, progress=False, chunk_size=7, workers=2)
    for i in (0, 8, meta.num_faces - 1):
        image = cv2.imread(os.path.join(gt["dir"], "loose_crop", gt["names"][i]))
        x = ((align_face(image, meta.landmarks[i]).astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        expected = (_project(x)[0] + _project(x[:, :, :, ::-1].copy())[0]) * meta.faceness[i]
        np.testing.assert_allclose(feats[i], expected, rtol=1e-4, atol=1e-5)


def test_evaluate_ijb_features_accepts_precomputed_features(release, tmp_path):
    gt = release["IJBC"]
    meta = load_meta(gt["dir"], "IJBC")
    feats = embed_ijb_faces(_embedder(16), gt["dir"], meta, 16, progress=False)
    lines = []
    tars = evaluate_ijb_features(feats, meta, "IJBC", str(tmp_path), job="cpp", log=lines.append)
    assert tars == _reference_tars(gt["labels"], _reference_scores(gt))
    assert any("| cpp-IJBC |" in line for line in lines)
    with pytest.raises(ArcFaceError, match="shape"):
        evaluate_ijb_features(feats[:-1], meta, "IJBC", str(tmp_path), log=lines.append)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def _blob_centroids(channel, points, radius=6):
    out = []
    for x, y in points:
        cx, cy = int(round(x)), int(round(y))
        ys, xs = np.mgrid[cy - radius:cy + radius + 1, cx - radius:cx + radius + 1]
        w = channel[cy - radius:cy + radius + 1, cx - radius:cx + radius + 1].astype(np.float64)
        out.append((np.sum(w * xs) / np.sum(w), np.sum(w * ys) / np.sum(w)))
    return np.array(out)


@pytest.mark.parametrize("scale,angle,offset", [(1.0, 0.0, (-20, 15)), (1.4, 25.0, (10.3, 5.7)),
                                                (0.8, -35.0, (40, -30)), (1.7, 170.0, (-3, 8))])
def test_alignment_maps_landmarks_back_onto_template(scale, angle, offset):
    # Canonical face: gaussian blobs (red only) centred on the template points.
    ys, xs = np.mgrid[0:112, 0:112].astype(np.float64)
    canonical = np.zeros((112, 112, 3), np.float64)
    for x, y in ARCFACE_TEMPLATE:
        canonical[..., 2] += 250 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 2.0 ** 2))
    canonical[..., 0] = 60  # blue background: checks the BGR -> RGB conversion
    m = _similarity(scale, angle, 0, 0)
    m[:, 2] = 130 + np.array(offset) - _apply(m, ARCFACE_TEMPLATE).mean(axis=0)
    size = (260, 260)
    loose = cv2.warpAffine(np.clip(canonical, 0, 255).astype(np.uint8), m, size)
    landmarks = _apply(m, ARCFACE_TEMPLATE)

    est = similarity_transform(landmarks)
    np.testing.assert_allclose(_apply(est, landmarks), ARCFACE_TEMPLATE, atol=1e-6)

    aligned = align_face(loose, landmarks.astype(np.float32))
    assert aligned.dtype == np.uint8 and aligned.shape == (112, 112, 3)
    assert np.all(aligned[5:20, 5:20, 2] == 60)  # RGB: blue is the last channel
    centroids = _blob_centroids(aligned[..., 0], ARCFACE_TEMPLATE)
    assert np.max(np.linalg.norm(centroids - ARCFACE_TEMPLATE, axis=1)) < 0.5


def test_similarity_transform_is_least_squares_and_rejects_degenerate_landmarks():
    rng = np.random.default_rng(5)
    noisy = _apply(_similarity(1.3, 12, 40, 30), ARCFACE_TEMPLATE) + rng.normal(0, 1.0, (5, 2))
    best = similarity_transform(noisy)
    best_err = np.sum((_apply(best, noisy) - ARCFACE_TEMPLATE) ** 2)
    for _ in range(50):  # no perturbed similarity does better
        d = rng.normal(0, 1e-3, 4)
        a, b = best[0, 0] + d[0], best[1, 0] + d[1]
        other = np.array([[a, -b, best[0, 2] + d[2]], [b, a, best[1, 2] + d[3]]])
        assert np.sum((_apply(other, noisy) - ARCFACE_TEMPLATE) ** 2) >= best_err
    with pytest.raises(ArcFaceError, match="degenerate"):
        similarity_transform(np.ones((5, 2)))


def test_template_features_match_direct_loops():
    rng = np.random.default_rng(3)
    n, d = 60, 8
    feats = rng.normal(size=(n, d)).astype(np.float32) * rng.uniform(0.5, 3, (n, 1))
    tids = rng.choice([7, 3, 42, 100, 9], size=n)
    mids = rng.choice([1, 2, 5], size=n)  # media ids shared across templates
    templates, tf = template_features(feats, tids, mids, chunk=7)
    assert list(templates) == sorted(set(tids.tolist()))
    assert tf.dtype == np.float32
    for row, tid in enumerate(templates):
        total = np.zeros(d)
        for mid in sorted(set(mids[tids == tid].tolist())):
            members = [feats[i].astype(np.float64) for i in range(n)
                       if tids[i] == tid and mids[i] == mid]
            total += sum(members) / len(members)
        np.testing.assert_allclose(tf[row], total / np.linalg.norm(total), atol=1e-6)


def test_pair_scores_chunking_and_unknown_template():
    rng = np.random.default_rng(4)
    ids = np.array([30, 10, 20])  # unsorted ids are fine
    tf = rng.normal(size=(3, 5)).astype(np.float32)
    p1, p2 = np.array([10, 30, 20, 10, 30]), np.array([20, 20, 10, 10, 30])
    scores = pair_scores(ids, tf, p1, p2, chunk=2)
    row = {30: 0, 10: 1, 20: 2}
    expected = [float(np.dot(tf[row[a]], tf[row[b]])) for a, b in zip(p1, p2)]
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    with pytest.raises(ArcFaceError, match="template 99"):
        pair_scores(ids, tf, p1, np.array([20, 20, 99, 10, 30]))
    with pytest.raises(ArcFaceError, match="template 5"):
        pair_scores(ids, tf, np.array([5]), np.array([10]))


def test_tar_at_far_takes_nearest_point_and_larger_tpr_on_ties():
    # Scores: 4 genuine above all impostors except one impostor on top.
    labels = np.array([0, 1, 1, 1, 1, 0, 0, 0])
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1])
    fpr, tpr, tars = tar_at_far(labels, scores, far_targets=(1e-6, 0.25, 0.5, 0.6, 1.0))
    # ROC points: (0,0) (0.25,0) (0.25,1) (1,1); FAR 0.25 ties at two points -> TPR 1.
    assert tars[1e-6] == 0.0
    assert tars[0.25] == 1.0
    assert tars[0.5] == 1.0
    assert tars[1.0] == 1.0
    # An exact tie in distance between two FPR values takes the later (larger TPR) point.
    labels = np.array([0, 1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    fpr, tpr, tars = tar_at_far(labels, scores, far_targets=(0.375,))
    assert tars[0.375] == 1.0  # fpr 0.25 (tpr .5) and 0.5 (tpr 1) are equally near
    with pytest.raises(ArcFaceError, match="both"):
        tar_at_far([1, 1], [0.2, 0.3])


def test_format_table_layout():
    tars = dict(zip(FAR_TARGETS, [0.8208, 0.9337, 0.9587, 0.9740, 0.9840, 0.9905]))
    expected = "\n".join([
        "+-----------+-------+-------+--------+-------+-------+-------+",
        "|  Methods  | 1e-06 | 1e-05 | 0.0001 | 0.001 |  0.01 |  0.1  |",
        "+-----------+-------+-------+--------+-------+-------+-------+",
        "| ijbc-IJBC | 82.08 | 93.37 | 95.87  | 97.40 | 98.40 | 99.05 |",
        "+-----------+-------+-------+--------+-------+-------+-------+",
    ])
    assert format_table({"ijbc-IJBC": tars}) == expected


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def copy_c(release, tmp_path):
    dst = tmp_path / "IJBC"
    shutil.copytree(release["IJBC"]["dir"], dst)
    return dst


def _break_line(path, number, transform):
    lines = path.read_text().splitlines(keepends=True)
    lines[number - 1] = transform(lines[number - 1])
    path.write_text("".join(lines))


@pytest.mark.parametrize("filename,transform,message", [
    ("ijbc_face_tid_mid.txt", lambda s: s.rstrip("\n") + " 7\n", "expected 3 fields"),
    ("ijbc_face_tid_mid.txt", lambda s: s.replace(".jpg ", ".jpg x"), "is not an integer"),
    ("ijbc_name_5pts_score.txt", lambda s: s.rsplit(" ", 1)[0] + "\n", "expected 12 fields"),
    ("ijbc_name_5pts_score.txt", lambda s: s.replace(" ", " abc", 1), "is not a number"),
    ("ijbc_template_pair_label.txt", lambda s: s.rsplit(" ", 1)[0] + "\n", "expected 3 fields"),
    ("ijbc_template_pair_label.txt", lambda s: s.replace(" ", " z", 1), "is not an integer"),
    ("ijbc_template_pair_label.txt", lambda s: s.rsplit(" ", 1)[0] + " 2\n", "0 or 1"),
    ("ijbc_template_pair_label.txt", lambda s: "999 " + s.split(" ", 1)[1], "template 999"),
])
def test_malformed_meta_line_names_file_and_line(copy_c, filename, transform, message):
    path = copy_c / "meta" / filename
    _break_line(path, 3, transform)
    with pytest.raises(ArcFaceError, match=message) as info:
        load_meta(str(copy_c), "IJBC")
    assert filename in str(info.value) and "line 3" in str(info.value)


def test_blank_lines_keep_physical_line_numbers(copy_c):
    path = copy_c / "meta" / "ijbc_template_pair_label.txt"
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(1, "\n")
    path.write_text("".join(lines))
    assert load_meta(str(copy_c), "IJBC").num_pairs == 40
    _break_line(path, 4, lambda s: s.rsplit(" ", 1)[0] + " 5\n")
    with pytest.raises(ArcFaceError, match="line 4"):
        load_meta(str(copy_c), "IJBC")


def test_landmark_file_must_match_face_list(copy_c):
    path = copy_c / "meta" / "ijbc_name_5pts_score.txt"
    _break_line(path, 2, lambda s: "other.jpg " + s.split(" ", 1)[1])
    with pytest.raises(ArcFaceError, match="line 2") as info:
        load_meta(str(copy_c), "IJBC")
    assert "other.jpg" in str(info.value)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    with pytest.raises(ArcFaceError, match="lists"):
        load_meta(str(copy_c), "IJBC")


def test_missing_meta_file_and_folder(copy_c, tmp_path):
    os.remove(copy_c / "meta" / "ijbc_template_pair_label.txt")
    with pytest.raises(ArcFaceError, match="ijbc_template_pair_label.txt"):
        load_meta(str(copy_c), "IJBC")
    with pytest.raises(ArcFaceError, match="ijbb_face_tid_mid.txt"):
        load_meta(str(copy_c), "IJBB")  # the IJBC folder has no ijbb_* files
    with pytest.raises(ArcFaceError, match="not found"):
        load_meta(str(tmp_path / "nowhere"), "IJBC")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArcFaceError, match="meta"):
        load_meta(str(tmp_path / "empty"), "IJBC")


def test_missing_or_broken_image_names_the_path(copy_c, tmp_path):
    meta = load_meta(str(copy_c), "IJBC")
    victim = copy_c / "loose_crop" / meta.image_names[5]
    os.remove(victim)
    with pytest.raises(ArcFaceError, match="missing") as info:
        evaluate_ijb(_embedder(4), str(copy_c), "IJBC", 4, str(tmp_path / "r"), log=lambda s: None,
                     progress=False)
    assert str(victim) in str(info.value)
    with pytest.raises(ArcFaceError, match="missing") as info:
        embed_ijb_faces(_embedder(4), str(copy_c), meta, 4, progress=False, chunk_size=3)
    assert str(victim) in str(info.value)
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(ArcFaceError, match="decode") as info:
        embed_ijb_faces(_embedder(4), str(copy_c), meta, 4, progress=False, chunk_size=3)
    assert str(victim) in str(info.value)


def test_wrong_target_name(release, tmp_path):
    for bad in ("IJBA", "", "lfw"):
        with pytest.raises(ArcFaceError, match="IJBB, IJBC"):
            load_meta(release["IJBC"]["dir"], bad)
    with pytest.raises(ArcFaceError, match="target"):
        evaluate_ijb(_embedder(4), release["IJBC"]["dir"], "IJB-C", 4, str(tmp_path),
                     progress=False)
