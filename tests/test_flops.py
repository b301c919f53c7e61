"""src.models.flops.gmacs: exact counts on hand-computed cells, the published backbone figures, and
that counting leaves the network and the context as they were."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from src.errors import ArcFaceError
from src.models import get_backbone
from src.models.flops import gmacs


def vit_macs(embed_dim, depth, num_features=512, patches=144, patch=9):
    """insightface's ViT cost from its layer shapes: patch conv, per block qkv/proj/fc1/fc2 Linear
    (12 D^2 per token) plus q.k^T and attn.v (2 N^2 D, the reference's `extra_gflops`), head."""
    d = embed_dim
    block = patches * 12 * d * d + 2 * patches * patches * d
    return patches * d * 3 * patch * patch + depth * block + patches * d * d + d * num_features


# insightface arcface_torch README, "ViT For Face Recognition" table (FLOPs column, GMACs):
# r18 2.6, r50 6.3, r100 12.1, VIT-T 1.5, VIT-S 5.7, VIT-B 11.4, VIT-L 25.3; "mobilefacenet-0.45G".
# vit_h is not in the table: its value is derived from the same formula.
VIT_PUBLISHED = {
    "vit_t": 1.5, "vit_t_dp005_mask0": 1.5, "vit_s": 5.7, "vit_s_dp005_mask_0": 5.7,
    "vit_b": 11.4, "vit_b_dp005_mask_005": 11.4, "vit_l_dp005_mask_005": 25.3, "vit_h": 89.2,
}
VIT_SHAPES = {
    "vit_t": (256, 12), "vit_t_dp005_mask0": (256, 12), "vit_s": (512, 12), "vit_s_dp005_mask_0": (512, 12),
    "vit_b": (512, 24), "vit_b_dp005_mask_005": (512, 24), "vit_l_dp005_mask_005": (768, 24), "vit_h": (1024, 48),
}
SLOW = {"vit_b", "vit_b_dp005_mask_005", "vit_l_dp005_mask_005", "vit_h"}


@pytest.fixture
def graph():
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=mode)


class ConvDense(nn.Cell):
    def __init__(self, group=1):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, pad_mode="valid", group=group, has_bias=True)
        self.flatten = nn.Flatten()
        self.fc = nn.Dense(6 * 55 * 55, 10)

    def construct(self, x):
        return self.fc(self.flatten(self.conv(x)))


@pytest.mark.parametrize("group", [1, 3])
def test_single_conv_and_dense_exactly(graph, group):
    # conv: 6 x 55 x 55 outputs ((112 - 3) // 2 + 1 = 55), each 3/group input channels x 3 x 3; no bias.
    conv = 6 * 55 * 55 * (3 // group) * 3 * 3
    dense = 6 * 55 * 55 * 10
    assert gmacs(ConvDense(group)) * 1e9 == pytest.approx(conv + dense, abs=1e-3)
    assert conv + dense == {1: 671_550, 3: 344_850}[group]


def test_image_size_is_used(graph):
    net = nn.SequentialCell(nn.Conv2d(3, 8, 1, pad_mode="valid"))
    assert gmacs(net, image_size=20) * 1e9 == pytest.approx(8 * 20 * 20 * 3, abs=1e-6)


@pytest.mark.parametrize("name, exact, published", [
    ("r18", 2.61, 2.6), ("r50", 6.31, 6.3), ("r100", 12.1, 12.1), ("mbf", 0.438, 0.45),
])
def test_cnn_backbones(graph, name, exact, published):
    value = gmacs(get_backbone(name))
    assert float(f"{value:.3g}") == exact
    # mobilefacenet's 0.45 from ptflops also counts its BatchNorms and PReLUs (+0.011).
    assert value == pytest.approx(published, rel=0.03 if name == "mbf" else 0.02)
    if name in ("r50", "r100"):  # as FLOPs (2 per multiply-add): iresnet50 12.6, iresnet100 24.2
        assert 2 * value == pytest.approx({"r50": 12.6, "r100": 24.2}[name], rel=0.01)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in VIT_PUBLISHED])
def test_vit_backbones(graph, name):
    value = gmacs(get_backbone(name))
    assert value * 1e9 == pytest.approx(vit_macs(*VIT_SHAPES[name]), abs=1.0)
    assert round(value, 1) == VIT_PUBLISHED[name]


def test_narrow_vit_counts_the_attention_matmuls(graph):
    net = get_backbone("vit_t", width=16)  # embed 64
    assert gmacs(net) * 1e9 == pytest.approx(vit_macs(64, 12), abs=1.0)
    assert vit_macs(256, 12) == 1_504_882_688


@pytest.mark.parametrize("start_mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_leaves_network_and_context_as_found(start_mode):
    mode = ms.get_context("mode")
    ms.set_context(mode=start_mode)
    try:
        net = get_backbone("vit_t", width=16)
        net.set_train(True)
        net.blocks[2].set_train(False)  # a mixed state must survive too
        before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
        flags = {name: (cell.training, cell.phase) for name, cell in net.cells_and_names()}
        gmacs(net)
        assert ms.get_context("mode") == start_mode
        assert {name: (cell.training, cell.phase) for name, cell in net.cells_and_names()} == flags
        for p in net.get_parameters():
            np.testing.assert_array_equal(p.asnumpy(), before[p.name])
        assert not net._forward_hook and not net.blocks[0].attn.qkv._forward_hook  # hooks removed
        net.set_train(False)
        x = ms.Tensor(np.zeros((2, 3, 112, 112), np.float32))
        assert net(x).shape == (2, 512)
    finally:
        ms.set_context(mode=mode)


def test_wrong_image_size_is_one_error(graph):
    with pytest.raises(ArcFaceError, match="cannot run the backbone"):
        gmacs(get_backbone("r18", width=8), image_size=64)
