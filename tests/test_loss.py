"""The margin head against a float64 numpy implementation of the formula."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from src.loss import CombinedMarginHead
from src.config import MARGINS



@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


def numpy_loss(emb, weight, labels, s, m1, m2, m3):
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos = np.clip(emb @ w.T, -1 + 1e-7, 1 - 1e-7)
    logits = s * cos
    rows = np.arange(len(labels))
    theta = np.arccos(cos[rows, labels])
    logits[rows, labels] = s * (np.cos(m1 * theta + m2) - m3)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -logp[rows, labels].mean()


def make_head(weight, s, margins):
    head = CombinedMarginHead(weight.shape[0], weight.shape[1], s, *margins)
    head.weight.set_data(Tensor(weight.astype(np.float32)))
    return head


@pytest.mark.parametrize("margin", ["arcface", "cosface", "softmax", "sphere"])
def test_loss_matches_numpy(margin):
    rng = np.random.default_rng(0)
    margins = MARGINS.get(margin, (1.35, 0.1, 0.05))
    emb = rng.normal(size=(6, 16))
    weight = rng.normal(0, 0.01, size=(10, 16))
    labels = np.array([0, 3, 3, 9, 5, 1])
    head = make_head(weight, 64.0, margins)
    got = head(Tensor(emb.astype(np.float32)), Tensor(labels.astype(np.int32))).asnumpy()
    want = numpy_loss(emb, weight, labels, 64.0, *margins)
    assert got == pytest.approx(want, rel=1e-4)


def test_arcface_margin_raises_the_loss():
    rng = np.random.default_rng(1)
    emb, weight, labels = rng.normal(size=(8, 16)), rng.normal(size=(12, 16)), rng.integers(0, 12, 8)
    plain = make_head(weight, 64.0, MARGINS["softmax"])(Tensor(emb, ms.float32), Tensor(labels, ms.int32))
    arc = make_head(weight, 64.0, MARGINS["arcface"])(Tensor(emb, ms.float32), Tensor(labels, ms.int32))
    assert float(arc.asnumpy()) > float(plain.asnumpy()) + 1.0


def loss_and_grads(head, emb, labels):
    grad_fn = ms.value_and_grad(lambda x: head(x, labels), grad_position=0, weights=head.trainable_params())
    loss, (g_emb, (g_w,)) = grad_fn(emb)
    return loss.asnumpy(), g_emb.asnumpy(), g_w.asnumpy()


@pytest.mark.parametrize("dtype", [ms.float32, ms.float16])
def test_no_nan_at_cos_plus_minus_one(dtype):
    weight = np.eye(4, 8, dtype=np.float32)
    # Row 0 equals its class centre (cos = 1), row 1 is opposite to its class centre (cos = -1).
    emb = np.stack([weight[2] * 3.0, -weight[1] * 2.0])
    labels = Tensor(np.array([2, 1], np.int32))
    for margin in ("arcface", "cosface"):
        head = make_head(weight, 64.0, MARGINS[margin])
        loss, g_emb, g_w = loss_and_grads(head, Tensor(emb, dtype), labels)
        assert np.isfinite(loss) and np.isfinite(g_emb.astype(np.float32)).all() and np.isfinite(g_w).all()


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(3, 5))
    weight = rng.normal(size=(4, 5))
    labels = np.array([1, 0, 3])
    margins, s = MARGINS["arcface"], 8.0
    head = make_head(weight, s, margins)
    _, g_emb, g_w = loss_and_grads(head, Tensor(emb, ms.float32), Tensor(labels, ms.int32))

    def numeric(array, f, h=1e-6):
        grad = np.zeros_like(array)
        for idx in np.ndindex(array.shape):
            old = array[idx]
            array[idx] = old + h
            up = f()
            array[idx] = old - h
            down = f()
            array[idx] = old
            grad[idx] = (up - down) / (2 * h)
        return grad

    f = lambda: numpy_loss(emb, weight, labels, s, *margins)  # noqa: E731
    np.testing.assert_allclose(g_emb, numeric(emb, f), rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(g_w, numeric(weight, f), rtol=2e-3, atol=2e-5)
