"""src.models: parameter counts, forward passes, fp16 casting and name handling."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from src.errors import ArcFaceError
from src.models import BACKBONES, IRESNETS, canonical_name, get_backbone

# Parameter counts of the reference (insightface arcface_torch) models, i.e. every learnable
# tensor including the frozen scale of the IResNet embedding BatchNorm.
REFERENCE_PARAMS = {
    "r18": 24_025_600,
    "r34": 34_139_328,
    "r50": 43_590_848,
    "r100": 65_156_160,
    "r200": 118_833_920,
    "mbf": 2_059_520,
}
# The IResNet embedding BatchNorm1d(512) has its gamma frozen at 1, so it is not trainable.
FROZEN_GAMMA = {"r18": 512, "r34": 512, "r50": 512, "r100": 512, "r200": 512, "mbf": 0}


@pytest.fixture
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield


@pytest.fixture
def graph():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _input(batch=2, seed=0):
    rng = np.random.RandomState(seed)
    return ms.Tensor(rng.uniform(-1.0, 1.0, (batch, 3, 112, 112)).astype(np.float32))


def _n_params(params):
    return sum(int(np.prod(p.shape)) for p in params)


@pytest.mark.parametrize("name", IRESNETS + ("mbf",))  # ViTs: tests/test_vit.py
def test_parameter_counts(pynative, name):
    net = get_backbone(name)
    trainable = _n_params(net.trainable_params())
    frozen = [p for p in net.get_parameters()
              if not p.requires_grad and "moving_" not in p.name]
    assert trainable == REFERENCE_PARAMS[name] - FROZEN_GAMMA[name]
    assert trainable + _n_params(frozen) == REFERENCE_PARAMS[name]


def test_embedding_bn_gamma_frozen(pynative):
    net = get_backbone("r18")
    gamma = net.features.gamma
    assert not gamma.requires_grad
    np.testing.assert_array_equal(gamma.asnumpy(), np.ones(512, np.float32))
    trainable = {p.name for p in net.trainable_params()}
    assert gamma.name not in trainable
    assert net.features.beta.name in trainable
    assert net.fc.bias.name in trainable


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_forward_graph_mode(graph, name):
    net = get_backbone(name)
    net.set_train(False)
    out = net(_input())
    assert out.shape == (2, 512)
    assert out.dtype == ms.float32
    assert np.isfinite(out.asnumpy()).all()


def test_forward_train_mode_custom_size(pynative):
    net = get_backbone("mbf", num_features=128)
    net.set_train(True)
    out = net(_input()).asnumpy()
    assert out.shape == (2, 128)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_fp16_forward(graph, name):
    net = get_backbone(name, fp16=True)
    net.set_train(False)
    out = net(_input())
    assert out.shape == (2, 512)
    assert out.dtype == ms.float32
    assert np.isfinite(out.asnumpy()).all()


def test_fp16_cast_structure(pynative):
    net = get_backbone("r18", fp16=True)
    block = net.layer1[0]
    # body convolutions and PReLUs compute in float16 ...
    for cell in (net.conv1, net.prelu, block.conv1, block.conv2, block.prelu, net.layer4[-1].conv2):
        assert getattr(cell, "fp16", False), cell
    # ... every BatchNorm keeps float32 ...
    for _, cell in net.cells_and_names():
        if isinstance(cell, (nn.BatchNorm1d, nn.BatchNorm2d)):
            assert not getattr(cell, "fp16", False), cell
    # ... and the head runs in float32; parameters themselves stay float32.
    for cell in (net.bn2, net.fc, net.features):
        assert not getattr(cell, "fp16", False), cell
    assert all(p.dtype == ms.float32 for p in net.get_parameters())


def test_fp16_close_to_fp32(pynative):
    net32 = get_backbone("r18")
    net16 = get_backbone("r18", fp16=True)
    ms.load_param_into_net(net16, net32.parameters_dict(), strict_load=True)
    net32.set_train(False)
    net16.set_train(False)
    x = _input()
    a, b = net32(x).asnumpy(), net16(x).asnumpy()
    assert b.dtype == np.float32
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert 0.0 < rel < 0.05  # really computed in half precision, but close


@pytest.mark.parametrize("alias, expected", [
    ("R50", "r50"), ("iresnet100", "r100"), ("IResNet-18", "r18"), ("r200", "r200"),
    ("MBF", "mbf"), ("mobilefacenet", "mbf"),
])
def test_aliases(alias, expected):
    assert canonical_name(alias) == expected


@pytest.mark.parametrize("bad", ["r101", "resnet50", "vit_x", "", None])
def test_unknown_name_raises(bad):
    with pytest.raises(ArcFaceError) as err:
        get_backbone(bad)
    for name in BACKBONES:
        assert name in str(err.value)


def test_bad_arguments_raise():
    with pytest.raises(ArcFaceError):
        get_backbone("r18", num_features=0)
    with pytest.raises(ArcFaceError):
        get_backbone("r18", dropout=1.0)
    with pytest.raises(ArcFaceError):
        get_backbone("mbf", dropout=0.2)


def test_dropout_is_used(pynative):
    net = get_backbone("r18", dropout=0.4)
    assert isinstance(net.dropout, nn.Dropout)
    assert isinstance(get_backbone("r18").dropout, nn.Identity)


@pytest.mark.parametrize("kernels", ["onednn", "slopes"])
@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_prelu_rewrite_equals_mindspore_prelu(mode, kernels, monkeypatch):
    """The backbones' PReLU (training on CPU: oneDNN's PReLU, or without that library relu + a
    depthwise 1x1 convolution) gives nn.PReLU's values and gradients in x and w, on inputs holding +0,
    -0, values of both signs and negative slopes; in inference it is the PReLU operator itself. Same
    parameter name, so checkpoints load."""
    from mindspore import ops

    from src.models import cpu_ops
    from src.models.iresnet import PReLU

    if kernels == "slopes":
        monkeypatch.setattr(cpu_ops, "library", lambda: None)

    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        rng = np.random.RandomState(3)
        x = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
        x[0, :, 0, :3] = 0.0
        x[1, :, 2, :2] = -0.0
        x[2, 1] = np.abs(x[2, 1])  # a channel with no negative value
        slopes = np.array([0.25, -0.5, 0.0, 1.7], np.float32)
        dy = rng.normal(size=x.shape).astype(np.float32)
        ours, theirs = PReLU(4), nn.PReLU(4)
        assert ours.use_onednn == (kernels == "onednn")
        assert [p.name for p in ours.get_parameters()] == [p.name for p in theirs.get_parameters()]
        for cell in (ours, theirs):
            cell.w.set_data(ms.Tensor(slopes))
            cell.set_train(True)

        class Grad(nn.Cell):
            def __init__(self, cell):
                super().__init__()
                self.cell, self.weights = cell, ms.ParameterTuple(cell.trainable_params())
                self.grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)

            def construct(self, inputs, sens):
                return self.cell(inputs), self.grad(self.cell, self.weights)(inputs, sens)

        (y1, ((dx1,), (dw1,))), (y2, ((dx2,), (dw2,))) = (Grad(c)(ms.Tensor(x), ms.Tensor(dy))
                                                          for c in (ours, theirs))
        expected = np.where(x > 0, x, x * slopes.reshape(1, 4, 1, 1))
        np.testing.assert_array_equal(y1.asnumpy(), y2.asnumpy())
        np.testing.assert_array_equal(y1.asnumpy(), expected)
        # dy where x > 0, w dy at x <= 0 (also at x = 0, as PReLUGrad): exactly
        np.testing.assert_array_equal(dx1.asnumpy(), dx2.asnumpy())
        np.testing.assert_array_equal(dx1.asnumpy(), np.where(x > 0, dy, dy * slopes.reshape(1, 4, 1, 1)))
        np.testing.assert_allclose(dw1.asnumpy(), dw2.asnumpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dw1.asnumpy(), (dy * np.minimum(x, 0)).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
        assert dw1.asnumpy()[1] != 0 and (dw1.asnumpy() != 0).all()
        ours.set_train(False)
        theirs.set_train(False)
        np.testing.assert_array_equal(ours(ms.Tensor(x)).asnumpy(), theirs(ms.Tensor(x)).asnumpy())
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
