"""src.models.cpu_ops: the CPU training convolutions (oneDNN, blocked layouts) and BatchNorm against
MindSpore's own and the formulas, in values and gradients, alone and in whole training steps with
oneDNN's PReLU (alone: test_backbones); what they do not cover; the build cache."""
import logging
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from src.models import cpu_ops


@pytest.fixture
def graph():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_library_builds_here():
    """`make install` provides what the build needs (oneDNN headers; g++ and MindSpore's oneDNN are there)."""
    assert cpu_ops.library() is not None, "see the warning logged by src.models.cpu_ops"


class _Grad(nn.Cell):
    def __init__(self, cell):
        super().__init__()
        self.cell, self.weights = cell, ms.ParameterTuple(cell.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)

    def construct(self, x, sens):
        return self.cell(x), self.grad(self.cell, self.weights)(x, sens)


# (batch, in, out, height, width, kernel, stride, padding): the stem, blocks, strided blocks on odd
# sizes, the 1x1 downsample, a single image, a one-pixel map.
CASES = [(2, 3, 8, 12, 12, 3, 1, 1), (2, 8, 16, 12, 10, 3, 1, 1), (3, 8, 16, 13, 11, 3, 2, 1),
         (2, 8, 16, 13, 12, 1, 2, 0), (1, 16, 8, 7, 7, 3, 1, 1), (2, 4, 4, 1, 1, 3, 1, 1), (2, 4, 6, 9, 9, 5, 2, 2)]


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_equal_mindspore(graph, case):
    n, c, o, h, w, k, stride, pad = case
    kwargs = dict(stride=stride, has_bias=False, **({"pad_mode": "pad", "padding": pad} if pad else
                                                     {"pad_mode": "valid"}))
    ours, theirs = cpu_ops.Conv2d(c, o, k, **kwargs), nn.Conv2d(c, o, k, **kwargs)
    assert ours.use_onednn
    assert [p.name for p in ours.get_parameters()] == [p.name for p in theirs.get_parameters()]
    rng = np.random.RandomState(sum(case))
    weight = rng.normal(size=(o, c, k, k)).astype(np.float32)
    for cell in (ours, theirs):
        cell.weight.set_data(ms.Tensor(weight))
        cell.set_train(True)
    x = rng.normal(size=(n, c, h, w)).astype(np.float32)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    dy = rng.normal(size=(n, o, oh, ow)).astype(np.float32)
    (y1, ((dx1,), (dw1,))), (y2, ((dx2,), (dw2,))) = (_Grad(cell)(ms.Tensor(x), ms.Tensor(dy))
                                                      for cell in (ours, theirs))
    assert y1.shape == y2.shape == (n, o, oh, ow)
    for a, b in ((y1, y2), (dx1, dx2), (dw1, dw2)):
        a, b = a.asnumpy(), b.asnumpy()
        assert np.abs(a - b).max() <= 2e-6 * np.abs(b).max(), np.abs(a - b).max() / np.abs(b).max()
    # and against the definition, for the weights' gradient
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    expected = np.zeros_like(weight)
    for i in range(k):
        for j in range(k):
            window = padded[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            expected[:, :, i, j] = np.einsum("nchw,nohw->oc", window, dy)
    np.testing.assert_allclose(dw1.asnumpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_each_convolution_keeps_its_own_output_shape(mode):
    """One input, convolutions of stride 1 and 2 and a 1x1 one after another (PyNative mode once gave
    every ConvForward the output shape of the first)."""
    ms.set_context(mode=mode)
    try:
        x = ms.Tensor(np.random.RandomState(0).normal(size=(2, 8, 16, 16)).astype(np.float32))
        for kernel, stride, shape in ((3, 1, (2, 4, 16, 16)), (3, 2, (2, 4, 8, 8)), (1, 2, (2, 4, 8, 8)),
                                      (3, 1, (2, 4, 16, 16))):
            conv = cpu_ops.Conv2d(8, 4, kernel, stride=stride, **({"pad_mode": "pad", "padding": 1} if kernel == 3
                                                                   else {"pad_mode": "valid"}))
            conv.set_train(True)
            assert conv.use_onednn and conv(x).shape == shape, (kernel, stride)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_inference_and_uncovered_convolutions_keep_mindspore(graph):
    """Inference runs MindSpore's operator (so every export does); groups, bias, dilation, other
    paddings and even kernels are not the operators' and stay MindSpore's in training too."""
    assert not cpu_ops.Conv2d(4, 4, 3, pad_mode="pad", padding=1, group=2).use_onednn
    assert not cpu_ops.Conv2d(4, 4, 3, pad_mode="pad", padding=1, has_bias=True).use_onednn
    assert not cpu_ops.Conv2d(4, 4, 3, pad_mode="pad", padding=2, dilation=2).use_onednn
    assert not cpu_ops.Conv2d(4, 4, 3, pad_mode="same").use_onednn
    assert not cpu_ops.Conv2d(4, 4, 3, pad_mode="pad", padding=(1, 1, 0, 0)).use_onednn
    assert not cpu_ops.Conv2d(4, 4, 2, pad_mode="valid").use_onednn
    assert not cpu_ops.Conv2d(4, 4, 3, pad_mode="valid").use_onednn
    conv = cpu_ops.Conv2d(4, 4, 3, pad_mode="pad", padding=1)
    assert conv.use_onednn
    conv.set_train(False)
    x = ms.Tensor(np.random.RandomState(0).normal(size=(1, 4, 5, 5)).astype(np.float32))
    np.testing.assert_array_equal(conv(x).asnumpy(), ops.conv2d(x, conv.weight, pad_mode="pad", padding=1).asnumpy())


def _batch_norm_reference(x, gamma, beta, dy, eps):
    """y, dx, dgamma, dbeta of training-mode batch normalization over (N, H, W), by the formulas."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    axes, shape = (0, 2, 3), (1, -1, 1, 1)
    mean, var = x.mean(axes), x.var(axes)
    xhat = (x - mean.reshape(shape)) / np.sqrt(var + eps).reshape(shape)
    y = gamma.reshape(shape) * xhat + beta.reshape(shape)
    dgamma, dbeta = (dy * xhat).sum(axes), dy.sum(axes)
    dx = (gamma / np.sqrt(var + eps)).reshape(shape) * (
        dy - dy.mean(axes).reshape(shape) - xhat * (dy * xhat).mean(axes).reshape(shape))
    return y, dx, dgamma, dbeta, mean, x.var(axes, ddof=1) if x.size > x.shape[1] else np.zeros_like(mean)


# (N, C, H, W): a block's, odd sizes, a one-pixel map, a single image, more values than a lane holds
NORM_CASES = [(4, 8, 5, 7), (2, 16, 9, 9), (3, 4, 1, 1), (1, 5, 3, 3), (2, 3, 19, 21)]


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
@pytest.mark.parametrize("case", NORM_CASES)
def test_batch_norm_equals_mindspore_and_the_formulas(mode, case):
    """Training-mode BatchNorm2d on the operators: y, dx, dgamma, dbeta and the moving statistics
    against MindSpore's BatchNorm and against the formulas (float64); inference stays MindSpore's."""
    ms.set_context(mode=mode)
    try:
        n, c, h, w = case
        rng = np.random.RandomState(n * c + h)
        x = (rng.normal(size=case) * 3 + 2).astype(np.float32)
        dy = rng.normal(size=case).astype(np.float32)
        gamma, beta = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
        moving = rng.normal(size=c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
        results = []
        for cls in (cpu_ops.BatchNorm2d, nn.BatchNorm2d):
            bn = cls(c, eps=1e-5, momentum=0.9)
            for param, value in zip((bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance), (gamma, beta) + moving):
                param.set_data(ms.Tensor(value))
            bn.set_train(True)
            bn(ms.Tensor(x))  # one update of the moving statistics (PyNative's gradient runs the forward again)
            moved = bn.moving_mean.asnumpy().copy(), bn.moving_variance.asnumpy().copy()
            y, ((dx,), (dgamma, dbeta)) = _Grad(bn)(ms.Tensor(x), ms.Tensor(dy))
            results.append([t.asnumpy() for t in (y, dx, dgamma, dbeta)] + list(moved))
            bn.set_train(False)
            results[-1].append(bn(ms.Tensor(x)).asnumpy())
        ours, theirs = results
        assert bn.cls_name == "BatchNorm2d" and cpu_ops.BatchNorm2d(c).use_onednn
        y, dx, dgamma, dbeta, mean, unbiased = _batch_norm_reference(x, gamma, beta, dy, 1e-5)
        expected = [y, dx, dgamma, dbeta, 0.9 * moving[0] + 0.1 * mean, 0.9 * moving[1] + 0.1 * unbiased]
        scale = np.abs(dy).max() * gamma.max() / np.sqrt(x.var((0, 2, 3)).min() + 1e-5)
        for name, a, b, e, atol in zip(("y", "dx", "dgamma", "dbeta", "moving mean", "moving variance"),
                                       ours, theirs, expected, (1e-5, 1e-5 * scale, 1e-5, 1e-5, 1e-6, 1e-5)):
            tol = atol * max(1.0, np.abs(e).max())
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=tol, err_msg=f"{name}: ours against the formula")
            np.testing.assert_allclose(b, e, rtol=1e-5, atol=tol, err_msg=f"{name}: MindSpore's against the formula")
        # inference: the same operator, on moving statistics equal to float32 rounding
        np.testing.assert_allclose(ours[-1], theirs[-1], rtol=1e-5, atol=1e-5)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_batch_norm_operator_rejects_mismatched_tensors(graph):
    """The operator checks what it is given (shapes, epsilon) instead of reading past a buffer."""
    bn = cpu_ops._BatchNormOperators(cpu_ops.library())
    x = ms.Tensor(np.ones((2, 4, 3, 3), np.float32))
    four, three = ms.Tensor(np.ones(4, np.float32)), ms.Tensor(np.ones(3, np.float32))
    y, *_ = bn(x, four, four, four, four, ms.Tensor([1e-5, 0.1], ms.float32))
    np.testing.assert_allclose(y.asnumpy(), 1.0)  # constant x: normalized to 0, plus the shift 1
    # one value per channel: its unbiased variance counts as 0 (MindSpore's BatchNorm gives NaN)
    *_, new_mean, new_variance = bn(ms.Tensor(np.full((1, 4, 1, 1), 3.0, np.float32)), four, four, four, four,
                                    ms.Tensor([1e-5, 0.1], ms.float32))
    np.testing.assert_allclose(new_mean.asnumpy(), 0.9 + 0.3)
    np.testing.assert_allclose(new_variance.asnumpy(), 0.9)
    for args in ((x, three, four, four, four, ms.Tensor([1e-5, 0.1], ms.float32)),
                 (x, four, four, four, four, ms.Tensor([0.0, 0.1], ms.float32)),
                 (x, four, four, four, four, ms.Tensor([1e-5, 0.1, 0.0], ms.float32))):
        with pytest.raises(RuntimeError):
            bn(*args)[0].asnumpy()


def _train_losses(initial=None, steps=4):
    """(convolutions on the operators, losses of `steps` SGD steps, the initial weights) of an r18 (width
    8) starting from `initial` when given."""
    from src.config import TrainConfig
    from src.training.lr_schedule import LRSchedule
    from src.training.trainer import build_network, build_step

    ms.set_seed(5)  # the same initial weights in every run of the test
    cfg = TrainConfig(network="r18", width=8, seed=5)
    net = build_network(cfg, 20)
    if initial is not None:
        ms.load_param_into_net(net, {k: ms.Parameter(v, name=k) for k, v in initial.items()}, strict_load=True)
    weights = {p.name: ms.Tensor(p.asnumpy().copy()) for p in net.get_parameters()}
    step = build_step(cfg, net, LRSchedule.constant(0.02), fp16=False)
    step.set_train(True)
    rng = np.random.RandomState(1)
    x = ms.Tensor(rng.uniform(-1, 1, (4, 3, 112, 112)).astype(np.float32))
    y = ms.Tensor(rng.randint(0, 20, 4).astype(np.int32))
    used = sum(1 for _, cell in net.cells_and_names() if getattr(cell, "use_onednn", False))
    losses, moving = [], None
    for _ in range(steps):
        losses.append(float(step(x, y)[0].asnumpy()))
        # BatchNorm's moving statistics after the first step (later steps' drift, below, reaches them too)
        moving = moving or {p.name: p.asnumpy().copy() for p in net.get_parameters() if "moving" in p.name}
    return used, losses, weights, moving


def test_training_steps_equal_mindspore_kernels(graph, monkeypatch):
    """Four SGD steps (lr 0.02) of an r18 (width 8) from the same weights with the operators and without
    them (MindSpore's convolutions, the element-wise PReLU): the same falling losses."""
    used, ours, initial, our_moving = _train_losses()
    monkeypatch.setattr(cpu_ops, "library", lambda: None)
    unused, theirs, _, their_moving = _train_losses(initial)
    assert (used, unused) == (21 + 9 + 30, 0)  # convolutions, PReLUs, BatchNorm2d
    assert len(our_moving) == 2 * (30 + 1) and our_moving.keys() == their_moving.keys()
    for name, value in our_moving.items():
        np.testing.assert_allclose(value, their_moving[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert ours[-1] < ours[0]
    # The first step agrees to float32 rounding; later ones drift a little (oneDNN's kernels sum in
    # another order than MindSpore's, and four steps on one batch amplify it to ~2e-5). A wrong gradient
    # changes these losses by percent.
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_switch_and_missing_headers_fall_back_with_a_warning(monkeypatch, caplog):
    cpu_ops.library.cache_clear()
    try:
        monkeypatch.setenv("ARCFACE_CPU_OPS", "0")
        assert cpu_ops.library() is None
        cpu_ops.library.cache_clear()
        monkeypatch.delenv("ARCFACE_CPU_OPS")
        monkeypatch.setattr(cpu_ops, "_onednn_headers", lambda: None)
        with caplog.at_level(logging.WARNING, logger="src.models.cpu_ops"):
            assert cpu_ops.library() is None
            assert not cpu_ops.Conv2d(4, 4, 3, pad_mode="pad", padding=1).use_onednn
        assert "no oneDNN headers" in caplog.text and "make install" in caplog.text
        # a library that builds but whose oneDNN cannot be set up falls back too, before MindSpore loads it
        cpu_ops.library.cache_clear()
        monkeypatch.undo()
        monkeypatch.setattr(cpu_ops.ctypes, "CDLL", lambda path: type("Broken", (), {"CpuOpsReady": lambda _: 0})())
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="src.models.cpu_ops"):
            assert cpu_ops.library() is None
        assert "could not be set up" in caplog.text
    finally:
        cpu_ops.library.cache_clear()


def test_cache_is_verified_before_reuse(monkeypatch, tmp_path):
    """A library or oneDNN copy whose bytes changed after the build is rebuilt, not loaded."""
    monkeypatch.setenv("ARCFACE_CACHE_DIR", str(tmp_path))
    built = cpu_ops._build()
    copy = built[:-len(".so")] + "-onednn.so"
    assert os.path.dirname(built) == str(tmp_path) and cpu_ops._verified(built) and cpu_ops._verified(copy)
    stamp = os.stat(built).st_mtime_ns
    assert cpu_ops._build() == built and os.stat(built).st_mtime_ns == stamp  # reused as it is
    for path in (built, copy):
        with open(path, "r+b") as fh:
            fh.seek(100)
            fh.write(b"\xcc\xcc")
        assert not cpu_ops._verified(path)
        assert cpu_ops._build() == built
        assert cpu_ops._verified(path)
    # a source edited after the build gets a library of its own, and the stale one is removed
    monkeypatch.setattr(cpu_ops, "SOURCE", str(tmp_path / "edited.cc"))
    with open(cpu_ops.SOURCE, "wb") as fh, open(os.path.join(os.path.dirname(cpu_ops.__file__), "cpu_ops.cc"),
                                                 "rb") as original:
        fh.write(original.read() + b"\n// edited\n")
    rebuilt = cpu_ops._build()
    assert rebuilt != built and cpu_ops._verified(rebuilt)
    stem = os.path.basename(rebuilt)[:-len(".so")]
    expected = ["edited.cc"] + [stem + suffix for suffix in (".so", ".so.sha256", "-onednn.so", "-onednn.so.sha256")]
    assert sorted(os.listdir(tmp_path)) == sorted(expected)


@pytest.mark.parametrize("fault, message", [
    ({"CXX": "false"}, "compiling"),                          # a compiler that fails
    ({"MS_CUSTOM_AOT_WHITE_LIST": "/nonexistent-folder"}, "MS_CUSTOM_AOT_WHITE_LIST"),  # a whitelist without the cache
])
def test_a_failing_build_falls_back_with_a_warning(monkeypatch, caplog, tmp_path, fault, message):
    monkeypatch.setenv("ARCFACE_CACHE_DIR", str(tmp_path))  # nothing built there yet
    for name, value in fault.items():
        monkeypatch.setenv(name, value)
    cpu_ops.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="src.models.cpu_ops"):
            assert cpu_ops.library() is None
        assert message in caplog.text and "MindSpore's CPU kernels" in caplog.text
        assert not [name for name in os.listdir(tmp_path) if name.endswith(".so")]
    finally:
        cpu_ops.library.cache_clear()
