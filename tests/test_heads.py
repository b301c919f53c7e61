"""The margin and the classifier on one rank against float64 numpy implementations of the formulas:
loss values, both margin gradients (exact and straight-through, including theta > pi - m), finite
differences, NaN propagation and inter-class filtering."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from src.config import MARGINS
from src.heads.classifier import PartialFC
from src.heads.margin import COS_CLAMP, CombinedMargin


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_loss(emb, weight, labels, s, m1, m2, m3):
    cos = np.clip(unit(emb) @ unit(weight).T, -COS_CLAMP, COS_CLAMP)
    logits = s * cos
    rows = np.arange(len(labels))
    theta = np.arccos(cos[rows, labels])
    logits[rows, labels] = s * (np.cos(m1 * theta + m2) - m3)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -logp[rows, labels].mean()


def make_head(weight, s, margins, gradient="exact", threshold=0.0):
    margin = CombinedMargin(s, *margins, gradient=gradient, interclass_filtering_threshold=threshold)
    head = PartialFC(weight.shape[0], weight.shape[1], margin, rank=0, world_size=1)
    head.weight.set_data(Tensor(weight.astype(np.float32)))
    return head


def loss_and_grads(head, emb, labels):
    grad_fn = ms.value_and_grad(lambda x: head(x, labels), grad_position=0, weights=head.trainable_params())
    loss, (g_emb, (g_w,)) = grad_fn(emb)
    return loss.asnumpy(), g_emb.asnumpy(), g_w.asnumpy()


@pytest.mark.parametrize("margin", ["arcface", "cosface", "softmax", "sphere"])
@pytest.mark.parametrize("gradient", ["exact", "straight"])
def test_loss_matches_numpy(margin, gradient):
    rng = np.random.default_rng(0)
    margins = MARGINS.get(margin, (1.35, 0.1, 0.05))
    emb = rng.normal(size=(6, 16))
    weight = rng.normal(0, 0.01, size=(10, 16))
    labels = np.array([0, 3, 3, 9, 5, 1])
    head = make_head(weight, 64.0, margins, gradient)
    got = head(Tensor(emb.astype(np.float32)), Tensor(labels.astype(np.int32))).asnumpy()
    assert got == pytest.approx(numpy_loss(emb, weight, labels, 64.0, *margins), rel=1e-4)


def test_arcface_margin_raises_the_loss():
    rng = np.random.default_rng(1)
    emb, weight, labels = rng.normal(size=(8, 16)), rng.normal(size=(12, 16)), rng.integers(0, 12, 8)
    plain = make_head(weight, 64.0, MARGINS["softmax"])(Tensor(emb, ms.float32), Tensor(labels, ms.int32))
    arc = make_head(weight, 64.0, MARGINS["arcface"])(Tensor(emb, ms.float32), Tensor(labels, ms.int32))
    assert float(arc.asnumpy()) > float(plain.asnumpy()) + 1.0


def margin_grad_wrt_cos(cos, one_hot, s, m2, gradient):
    """d loss / d cos of mean softmax CE over the margin logits, from ops on (N, C) inputs."""
    margin = CombinedMargin(s, 1.0, m2, 0.0, gradient=gradient)

    def loss(c):
        logits = margin(c, Tensor(one_hot))
        shifted = logits - logits.max(axis=1, keepdims=True)
        return (ms.ops.log(ms.ops.exp(shifted).sum(axis=1)) - (shifted * Tensor(one_hot)).sum(axis=1)).mean()
    return ms.grad(loss)(Tensor(cos.astype(np.float32))).asnumpy()


@pytest.mark.parametrize("target_theta", [0.6, 2.0, 2.9])  # 2.9 > pi - 0.5: the exact factor is negative
def test_margin_gradients_against_the_formulas(target_theta):
    """straight: d/dcos = s (p - onehot) / N at the margin-shifted probabilities; exact: the target column
    additionally times sin(theta + m) / sin(theta), which turns negative for theta > pi - m."""
    s, m2 = 8.0, 0.5
    rng = np.random.default_rng(3)
    cos = rng.uniform(-0.5, 0.5, size=(2, 5))
    cos[0, 1] = np.cos(target_theta)
    one_hot = np.zeros((2, 5), np.float32)
    one_hot[0, 1] = one_hot[1, 3] = 1
    logits = s * cos.copy()
    theta = np.arccos(cos[one_hot > 0])
    logits[one_hot > 0] = s * np.cos(theta + m2)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    straight = s * (p - one_hot) / 2
    exact = straight.copy()
    exact[one_hot > 0] *= np.sin(theta + m2) / np.sin(theta)
    np.testing.assert_allclose(margin_grad_wrt_cos(cos, one_hot, s, m2, "straight"), straight, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(margin_grad_wrt_cos(cos, one_hot, s, m2, "exact"), exact, rtol=1e-4, atol=1e-6)
    pull = margin_grad_wrt_cos(cos, one_hot, s, m2, "exact")[0, 1]
    # Gradient descent moves cos(target) by -grad: towards the centre unless exact and theta > pi - m.
    assert (pull < 0) == (target_theta < np.pi - m2)
    assert margin_grad_wrt_cos(cos, one_hot, s, m2, "straight")[0, 1] < 0


@pytest.mark.parametrize("dtype", [ms.float32, ms.float16])
@pytest.mark.parametrize("gradient", ["exact", "straight"])
def test_no_nan_at_cos_plus_minus_one(dtype, gradient):
    weight = np.eye(4, 8, dtype=np.float32)
    # Row 0 equals its class centre (cos = 1), row 1 is opposite to its class centre (cos = -1).
    emb = np.stack([weight[2] * 3.0, -weight[1] * 2.0])
    labels = Tensor(np.array([2, 1], np.int32))
    for margin in ("arcface", "cosface"):
        head = make_head(weight, 64.0, MARGINS[margin], gradient)
        loss, g_emb, g_w = loss_and_grads(head, Tensor(emb, dtype), labels)
        assert np.isfinite(loss) and np.isfinite(g_emb.astype(np.float32)).all() and np.isfinite(g_w).all()


def test_nan_weights_give_a_nan_loss():
    """The clamp before arccos must not turn NaN into a finite bound (it would hide a diverged run)."""
    weight = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    weight[2, 3] = np.nan
    head = make_head(weight, 64.0, MARGINS["arcface"])
    loss = head(Tensor(np.ones((2, 8), np.float32)), Tensor(np.array([0, 1], np.int32))).asnumpy()
    assert np.isnan(loss)


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


def test_interclass_filtering_zeroes_confusable_non_targets():
    """Non-target cosines above the threshold count as 0 in every row, as arcface_torch filters."""
    s, threshold = 4.0, 0.3
    cos = np.array([[0.2, 0.9, 0.5, -0.1], [0.6, 0.1, 0.4, 0.35]], np.float32)
    one_hot = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32)
    margin = CombinedMargin(s, 1.0, 0.0, 0.0, interclass_filtering_threshold=threshold)
    got = margin(Tensor(cos), Tensor(one_hot)).asnumpy()
    want = cos.copy()
    want[(cos > threshold) & (one_hot == 0)] = 0.0
    np.testing.assert_allclose(got, s * want, rtol=1e-6)
    # A row whose class lives on another rank: every cosine here is a non-target one and is filtered
    # too (filtering only rows that hold their target made a 2-rank run differ from one rank).
    elsewhere = margin(Tensor(cos), Tensor(np.zeros_like(one_hot))).asnumpy()
    np.testing.assert_allclose(elsewhere, s * np.where(cos > threshold, 0.0, cos), rtol=1e-6)
