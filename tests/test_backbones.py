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
