import math

import cv2
import numpy as np
import pytest

from src.data.bins import save_bin
from src.errors import ArcFaceError
from src.evaluation.verification import (
    VerificationResult,
    _slinear_at,
    accuracy_folds,
    embed_pairs,
    evaluate,
    format_lines,
    val_far_folds,
    verify_bins,
)

# ---------------------------------------------------------------------------------------------
# Independent brute-force reference: plain Python loops over explicit fold ranges and thresholds.
# ---------------------------------------------------------------------------------------------


def _unit(v):
    norm = math.sqrt(sum(float(a) * float(a) for a in v))
    return [float(a) / norm for a in v]


def _brute_dists(emb, emb_flip=None):
    rows = [list(map(float, r)) for r in emb]
    if emb_flip is not None:
        rows = [[a + float(b) for a, b in zip(r, f)] for r, f in zip(rows, emb_flip)]
    unit = [_unit(r) for r in rows]
    return [sum((a - b) ** 2 for a, b in zip(unit[2 * k], unit[2 * k + 1]))
            for k in range(len(unit) // 2)]


def _fold_ranges(n, nfolds):
    """Fold i is a contiguous slice; the first n % nfolds folds get one extra pair."""
    ranges, start = [], 0
    for i in range(nfolds):
        size = n // nfolds + (1 if i < n % nfolds else 0)
        ranges.append((start, start + size))
        start += size
    assert start == n
    return ranges


def _brute_accuracy(dists, issame, nfolds=10):
    n = len(dists)
    issame = [bool(s) for s in issame]
    thresholds = [float(t) for t in np.arange(0, 4, 0.01)]
    accs, best_thresholds = [], []
    for lo, hi in _fold_ranges(n, nfolds):
        train = [(dists[i], issame[i]) for i in range(n) if not lo <= i < hi]
        best_acc, best_thr = -1.0, None
        for thr in thresholds:
            correct = 0
            for d, s in train:
                if (d < thr) == s:
                    correct += 1
            acc = correct / len(train)
            if acc > best_acc:  # strict: the first maximum wins
                best_acc, best_thr = acc, thr
        correct = sum(1 for i in range(lo, hi) if (dists[i] < best_thr) == issame[i])
        accs.append(correct / (hi - lo))
        best_thresholds.append(best_thr)
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
    return mean, std, best_thresholds


def _synthetic(n_pairs, dim, noise, seed, flip_noise=0.3):
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    emb = np.empty((2 * n_pairs, dim))
    for k in range(n_pairs):
        a = rng.normal(size=dim)
        b = a + noise * rng.normal(size=dim) if issame[k] else rng.normal(size=dim)
        emb[2 * k], emb[2 * k + 1] = a * rng.uniform(5, 30), b * rng.uniform(5, 30)
    emb_flip = emb + flip_noise * rng.normal(size=emb.shape) * np.abs(emb).mean()
    return emb.astype(np.float32), emb_flip.astype(np.float32), issame


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------


def test_accuracy_matches_brute_force_with_flip():
    emb, emb_flip, issame = _synthetic(600, 32, noise=1.6, seed=0)
    res = evaluate(emb, issame, emb_flip, nfolds=10)

    acc, std, _ = _brute_accuracy(_brute_dists(emb), issame)
    acc_f, std_f, best_f = _brute_accuracy(_brute_dists(emb, emb_flip), issame)
    assert res.acc == pytest.approx(acc, abs=1e-12)
    assert res.acc_std == pytest.approx(std, abs=1e-12)
    assert res.acc_flip == pytest.approx(acc_f, abs=1e-12)
    assert res.acc_flip_std == pytest.approx(std_f, abs=1e-12)
    np.testing.assert_allclose(res.best_thresholds, best_f, rtol=0, atol=1e-12)
    # A non-trivial case: neither perfect nor chance, and the folds differ.
    assert 0.75 < res.acc < 0.98 and 0.75 < res.acc_flip < 0.98
    assert res.acc_std > 0 and res.acc_flip_std > 0
    assert res.acc_flip != res.acc

    # XNorm: mean raw norm over all rows of emb and emb_flip.
    norms = [math.sqrt(sum(float(v) ** 2 for v in r)) for r in np.concatenate([emb, emb_flip])]
    assert res.xnorm == pytest.approx(sum(norms) / len(norms), rel=1e-12)


def test_accuracy_uneven_folds_without_flip():
    # 457 pairs: the first 7 folds hold 46 pairs, the last 3 hold 45.
    emb, _, issame = _synthetic(457, 16, noise=0.9, seed=1)
    res = evaluate(emb, issame, nfolds=10)
    acc, std, best = _brute_accuracy(_brute_dists(emb), issame)
    assert res.acc == pytest.approx(acc, abs=1e-12)
    assert res.acc_std == pytest.approx(std, abs=1e-12)
    np.testing.assert_allclose(res.best_thresholds, best, rtol=0, atol=1e-12)
    assert res.acc_flip is None and res.acc_flip_std is None
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    assert res.xnorm == pytest.approx(norms.mean(), rel=1e-12)


def test_separable_gives_one():
    emb, emb_flip, issame = _synthetic(300, 32, noise=0.05, seed=2, flip_noise=0.01)
    res = evaluate(emb, issame, emb_flip)
    assert res.acc == 1.0 and res.acc_std == 0.0
    assert res.acc_flip == 1.0 and res.acc_flip_std == 0.0
    # Every genuine pair lies below the FAR=1e-3 threshold.  (FAR itself need not be 0: the
    # threshold sits just below the closest training impostor and a test impostor may be closer.)
    assert res.val == 1.0 and res.val_std == 0.0


def test_random_near_half():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(600, 64))
    issame = rng.random(300) < 0.5
    res = evaluate(emb, issame)
    acc, std, _ = _brute_accuracy(_brute_dists(emb), issame)
    assert res.acc == pytest.approx(acc, abs=1e-12)
    assert res.acc_std == pytest.approx(std, abs=1e-12)
    assert abs(res.acc - 0.5) < 0.08


# ---------------------------------------------------------------------------------------------
# VAL@FAR
# ---------------------------------------------------------------------------------------------

# Two folds of 10 pairs.  Train fold 1 (impostor distances 1.2004, 3, 3, 3, 3): FAR on the grid
# is 0 up to 1.200 and 1/5 from 1.201, so the FAR=1e-3 threshold interpolates to
# 1.200 + 0.001 * (0.001 / 0.2) = 1.200005; fold 0 then accepts 3/5 genuine pairs, 0/5 impostors.
# Train fold 0 (impostors from 1.5004) gives 1.500005; fold 1 accepts 2/5 genuine (1.50001 is
# just above) and 1/5 impostor (1.2004).  VAL = mean(0.6, 0.4) = 0.5 +- 0.1, FAR = 0.1.
_HAND_SAME = [[0.1, 0.2, 1.1, 1.4, 1.45], [0.5, 1.0, 1.50001, 1.6, 2.0]]
_HAND_DIFF = [[1.5004, 2.0, 2.5, 3.0, 3.5], [1.2004, 3.0, 3.0, 3.0, 3.0]]


def _hand_case():
    dist, issame = [], []
    for same, diff in zip(_HAND_SAME, _HAND_DIFF):
        for s, d in zip(same, diff):
            dist += [d, s]
            issame += [False, True]
    return np.array(dist), np.array(issame)


def test_val_far_by_hand():
    dist, issame = _hand_case()
    val, far, thr = val_far_folds(dist, issame, nfolds=2)
    np.testing.assert_allclose(thr, [1.200005, 1.500005], rtol=0, atol=1e-9)
    np.testing.assert_allclose(val, [0.6, 0.4], rtol=0, atol=1e-12)
    np.testing.assert_allclose(far, [0.0, 0.2], rtol=0, atol=1e-12)


def test_val_far_by_hand_through_evaluate():
    dist, issame = _hand_case()
    # 2-D unit vectors at the prescribed squared distance: |a - b|^2 = 2 - 2 cos(theta).
    emb = np.zeros((2 * len(dist), 2))
    for k, d in enumerate(dist):
        c = 1.0 - d / 2.0
        emb[2 * k] = [3.0, 0.0]
        emb[2 * k + 1] = [2.0 * c, 2.0 * math.sqrt(1.0 - c * c)]
    res = evaluate(emb, issame, nfolds=2)
    assert res.val == pytest.approx(0.5, abs=1e-12)
    assert res.val_std == pytest.approx(0.1, abs=1e-12)
    assert res.far == pytest.approx(0.1, abs=1e-12)
    assert res.xnorm == pytest.approx(2.5, abs=1e-12)
    assert format_lines("hand", res)[-1] == "[hand]VAL@FAR=1e-3: 0.50000+-0.10000 (FAR 0.10000)"


def test_val_far_target_never_reached():
    dist = np.array([0.5, 3.9995] * 10)  # impostors above the last threshold 3.999
    issame = np.array([True, False] * 10)
    val, far, thr = val_far_folds(dist, issame, nfolds=2)
    assert thr.tolist() == [0.0, 0.0] and val.tolist() == [0.0, 0.0] and far.tolist() == [0.0, 0.0]


def _bspline_reference(x, y, target):
    """What interp1d(kind='slinear') computed for repeated x: a degree-1 B-spline."""
    from scipy.interpolate import BSpline

    return float(BSpline.construct_fast(np.r_[x[0], x, x[-1]], np.asarray(y, float), 1)(target))


@pytest.mark.parametrize(
    "x, target",
    [
        ([0, 0, 0.2, 0.2, 0.4, 1.0, 1.0], 0.001),
        ([0, 0, 0.2, 0.2, 0.4, 1.0, 1.0], 0.2),  # exact hit on a repeated value
        ([0, 0, 0.2, 0.2, 0.4, 1.0, 1.0], 0.3),
        ([0, 0, 0.2, 0.2, 0.4, 1.0, 1.0], 1.0),  # last value repeated: scipy gave 0
        ([0, 0, 0.2, 0.2, 0.4, 1.0], 1.0),
        ([0, 0.001, 0.001, 0.002], 0.001),
    ],
)
def test_slinear_matches_scipy_bspline(x, target):
    x = np.array(x, dtype=float)
    y = np.arange(len(x)) * 0.001 + 0.5
    assert _slinear_at(x, y, target) == pytest.approx(_bspline_reference(x, y, target), abs=1e-15)


def _facenet_val(dist, issame, nfolds, target=1e-3):
    thresholds = np.arange(0, 4, 0.001)
    vals, fars = [], []
    for lo, hi in _fold_ranges(len(dist), nfolds):
        test = np.zeros(len(dist), bool)
        test[lo:hi] = True
        d_tr, s_tr = dist[~test], issame[~test]
        far_train = np.array([np.sum((d_tr < t) & ~s_tr) / np.sum(~s_tr) for t in thresholds])
        thr = 0.0
        if far_train.max() >= target:
            thr = _bspline_reference(far_train, thresholds, target)
        pred, act = dist[test] < thr, issame[test]
        vals.append(np.sum(pred & act) / np.sum(act))
        fars.append(np.sum(pred & ~act) / np.sum(~act))
    return np.mean(vals), np.std(vals), np.mean(fars)


@pytest.mark.parametrize("n_pairs, nfolds", [(600, 10), (4000, 2)])
def test_val_far_matches_facenet_formula(n_pairs, nfolds):
    # With 4000 pairs in 2 folds each training fold has exactly 1000 impostors, so the FAR
    # 1/1000 == 1e-3 is hit exactly and the repeated-FAR handling decides the threshold.
    rng = np.random.default_rng(n_pairs)
    fold = n_pairs // nfolds  # every fold: exactly half genuine pairs, in random order
    issame = np.concatenate([rng.permutation(fold) < fold // 2 for _ in range(nfolds)])
    dist = np.where(issame, rng.uniform(0.0, 2.5, n_pairs), rng.uniform(1.2, 4.0, n_pairs))
    for f in range(nfolds):  # two isolated closest impostors: FAR stays 1/n_diff for a while
        impostors = f * fold + np.flatnonzero(~issame[f * fold:(f + 1) * fold])
        dist[impostors[:2]] = [1.0505, 1.0805 + 0.001 * f]
    val, far, thr = val_far_folds(dist, issame, nfolds=nfolds)
    if nfolds == 2:  # exact hit on FAR 1e-3: the last grid threshold below the 2nd impostor
        np.testing.assert_allclose(thr, [1.081, 1.080], atol=1e-9)
    ref_val, ref_std, ref_far = _facenet_val(dist, issame, nfolds)
    assert np.mean(val) == pytest.approx(ref_val, abs=1e-12)
    assert np.std(val) == pytest.approx(ref_std, abs=1e-12)
    assert np.mean(far) == pytest.approx(ref_far, abs=1e-12)
    assert 0 < np.mean(val) < 1


# ---------------------------------------------------------------------------------------------
# Inputs, formatting
# ---------------------------------------------------------------------------------------------


def test_evaluate_rejects_bad_inputs():
    emb = np.ones((20, 4))
    with pytest.raises(ArcFaceError, match="shape"):
        evaluate(emb, np.ones(9, bool))
    with pytest.raises(ArcFaceError, match="not enough"):
        evaluate(emb, np.ones(10, bool), nfolds=11)
    with pytest.raises(ArcFaceError, match="flipped"):
        evaluate(emb, np.ones(10, bool), np.ones((20, 5)))
    bad = emb.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ArcFaceError, match="NaN"):
        evaluate(bad, np.ones(10, bool))


def test_accuracy_folds_returns_per_fold():
    dist = np.array([0.5, 1.5] * 10)
    issame = np.array([True, False] * 10)
    acc, best = accuracy_folds(dist, issame, nfolds=5)
    assert acc.tolist() == [1.0] * 5
    # First maximum: the smallest grid threshold above 0.5.
    np.testing.assert_allclose(best, [0.51] * 5, atol=1e-12)


def test_format_lines():
    res = VerificationResult(
        xnorm=22.123454, acc=0.998166, acc_std=0.002734, acc_flip=0.99817, acc_flip_std=0.00273,
        val=0.98123, val_std=0.004567, far=0.001, best_thresholds=np.zeros(10),
    )
    assert format_lines("lfw", res) == [
        "[lfw]XNorm: 22.12345",
        "[lfw]Accuracy: 0.99817+-0.00273",
        "[lfw]Accuracy-Flip: 0.99817+-0.00273",
        "[lfw]VAL@FAR=1e-3: 0.98123+-0.00457 (FAR 0.00100)",
    ]
    res.acc_flip = res.acc_flip_std = None
    assert [line.split(":")[0] for line in format_lines("cfp_fp", res)] == [
        "[cfp_fp]XNorm", "[cfp_fp]Accuracy", "[cfp_fp]VAL@FAR=1e-3",
    ]


# ---------------------------------------------------------------------------------------------
# Embedding driver
# ---------------------------------------------------------------------------------------------


class _FixedBatchEmbedder:
    """Features: left-half mean minus right-half mean, overall mean, first pixel of channel 0."""

    def __init__(self, batch_size):
        self.batch_size = batch_size
        self.calls = 0

    def __call__(self, x):
        assert x.dtype == np.float32
        assert x.shape[0] == self.batch_size and x.shape[1] == 3 and x.flags.c_contiguous
        self.calls += 1
        w = x.shape[3]
        lr = x[:, :, :, : w // 2].mean(axis=(1, 2, 3)) - x[:, :, :, w // 2:].mean(axis=(1, 2, 3))
        return np.stack([lr, x.mean(axis=(1, 2, 3)), x[:, 0, 0, 0]], axis=1)


def test_embed_pairs_fixed_batch_and_flip():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(10, 5, 6, 3), dtype=np.uint8)
    images[:, :, :3] //= 4  # dark left half
    fn = _FixedBatchEmbedder(batch_size=4)
    emb, emb_flip = embed_pairs(fn, images, batch_size=4, progress=False)
    assert fn.calls == 6  # 3 batches (4 + 4 + 2 padded to 4), each plain and flipped
    assert emb.shape == emb_flip.shape == (10, 3)

    x = (images.astype(np.float64) - 127.5) / 127.5
    lr = x[:, :, :3].mean(axis=(1, 2, 3)) - x[:, :, 3:].mean(axis=(1, 2, 3))
    np.testing.assert_allclose(emb[:, 0], lr, atol=1e-5)
    assert np.all(emb[:, 0] < 0)
    np.testing.assert_allclose(emb_flip[:, 0], -lr, atol=1e-5)  # the flip swaps the halves
    np.testing.assert_allclose(emb[:, 1], emb_flip[:, 1], atol=1e-5)
    np.testing.assert_allclose(emb[:, 2], x[:, 0, 0, 0], atol=1e-6)  # R channel, top-left
    np.testing.assert_allclose(emb_flip[:, 2], x[:, 0, -1, 0], atol=1e-6)  # top-right after flip

    emb_only, none = embed_pairs(_FixedBatchEmbedder(3), images, 3, progress=True, flip=False)
    assert none is None
    np.testing.assert_allclose(emb_only, emb, atol=1e-6)


def test_embed_pairs_wrong_output_shape():
    images = np.zeros((4, 2, 2, 3), np.uint8)
    with pytest.raises(ArcFaceError, match="returned shape"):
        embed_pairs(lambda x: np.zeros((x.shape[0] - 1, 8)), images, 2, progress=False)


def _encode(rgb):
    ok, buf = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    return buf.tobytes()


def test_verify_bins(tmp_path):
    rng = np.random.default_rng(6)
    blobs, issame = [], []
    for k in range(20):
        same = k % 2 == 0
        c1 = rng.integers(0, 256, 3)
        c2 = np.clip(c1 + rng.integers(-10, 11, 3), 0, 255) if same else rng.integers(0, 256, 3)
        for c in (c1, c2):
            img = np.tile(c.astype(np.uint8), (20, 16, 1))
            img[:, :8] = img[:, :8] // 2
            blobs.append(_encode(img))
        issame.append(same)
    save_bin(tmp_path / "lfw.bin", blobs, issame)

    def embed_fn(x):
        assert x.shape == (8, 3, 16, 16)
        return x.mean(axis=(2, 3)) + 2.0

    lines = []
    results = verify_bins(embed_fn, str(tmp_path), ["lfw", "cfp_fp"], batch_size=8, nfolds=10,
                          image_size=(16, 16), log=lines.append, progress=False)
    missing = str(tmp_path / "cfp_fp.bin")
    assert list(results) == ["lfw"]
    assert isinstance(results["lfw"], VerificationResult)
    assert lines[:4] == format_lines("lfw", results["lfw"])
    assert lines[4] == f"[cfp_fp]missing: {missing}"
    assert [line.split(":")[0] for line in lines[:4]] == [
        "[lfw]XNorm", "[lfw]Accuracy", "[lfw]Accuracy-Flip", "[lfw]VAL@FAR=1e-3",
    ]
    assert results["lfw"].acc > 0.8

    with pytest.raises(ArcFaceError, match="not enough"):
        verify_bins(embed_fn, str(tmp_path), ["lfw"], 8, 30, (16, 16), log=lines.append,
                    progress=False)


def test_flip_fusions_are_the_references_formulas():
    """sum: the two unnormalised features added; norm: AdaFace's fuse_features_with_norm
    ('pre_norm_vector_add'): each feature normalised, multiplied by its own norm, the two summed, the
    sum normalised and returned with its norm. Both written out in numpy here."""
    from src.evaluation.verification import fuse_flips
    emb = np.array([[3.0, 4.0, 0.0], [1.0, -2.0, 2.0], [0.5, 0.0, 0.0]])
    flip = np.array([[0.0, 0.0, 5.0], [2.0, 2.0, 1.0], [0.0, -0.25, 0.0]])
    norms = np.linalg.norm(emb, axis=1, keepdims=True), np.linalg.norm(flip, axis=1, keepdims=True)
    adaface = (emb / norms[0]) * norms[0] + (flip / norms[1]) * norms[1]
    for fusion, fused in (("sum", emb + flip), ("norm", adaface)):
        unit, norm = fuse_flips(emb, flip, fusion)
        np.testing.assert_allclose(norm, np.linalg.norm(fused, axis=1), rtol=1e-15)
        np.testing.assert_allclose(unit, fused / np.linalg.norm(fused, axis=1, keepdims=True), rtol=1e-15)
    # the exact numbers: (3, 4, 5) / sqrt(50), (3, 0, 3) / sqrt(18), (0.5, -0.25, 0) / sqrt(0.3125)
    unit, norm = fuse_flips(emb, flip, "norm")
    np.testing.assert_allclose(norm, [50 ** 0.5, 18 ** 0.5, 0.3125 ** 0.5], rtol=1e-15)
    np.testing.assert_allclose(unit[1], [2 ** -0.5, 0.0, 2 ** -0.5], rtol=1e-15, atol=1e-16)
    with pytest.raises(ArcFaceError, match="unknown flip fusion 'max'"):
        fuse_flips(emb, flip, "max")


def test_evaluate_with_either_fusion_gives_the_same_result():
    rng = np.random.default_rng(3)
    emb, flip = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    issame = np.arange(20) % 2 == 0
    plain, adaface = (evaluate(emb, issame, flip, fusion=f) for f in ("sum", "norm"))
    assert plain.acc_flip == adaface.acc_flip and np.array_equal(plain.best_thresholds, adaface.best_thresholds)
