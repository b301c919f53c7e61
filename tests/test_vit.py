"""ViT backbones: parameter counts against insightface, graph-mode forward, masking and drop-path only
in training, fp16, width scaling, names, and MINDIR/ONNX export parity."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from src.errors import ArcFaceError
from src.models import VIT_EMBED_DIMS, VIT_HEADS, VITS, canonical_name, get_backbone
from src.models.vit import VIT_CONFIGS, DropPath, VisionTransformer

# insightface arcface_torch backbones/__init__.py get_model:
# name: (embed_dim, depth, num_heads, drop_path_rate, mask_ratio); all norm_layer="ln", patch 9, mlp_ratio 4.
PUBLISHED = {
    "vit_t": (256, 12, 8, 0.1, 0.1),
    "vit_t_dp005_mask0": (256, 12, 8, 0.05, 0.0),
    "vit_s": (512, 12, 8, 0.1, 0.1),
    "vit_s_dp005_mask_0": (512, 12, 8, 0.05, 0.0),
    "vit_b": (512, 24, 8, 0.1, 0.1),
    "vit_b_dp005_mask_005": (512, 24, 8, 0.05, 0.05),
    "vit_l_dp005_mask_005": (768, 24, 8, 0.05, 0.05),
    "vit_h": (1024, 48, 8, 0.1, 0.0),
}
# Parameters of insightface's VisionTransformer with num_classes=512 (every nn.Parameter, BN running
# statistics excluded), from `reference_param_count` below.
REFERENCE_PARAMS = {
    "vit_t": 19_137_792,
    "vit_t_dp005_mask0": 19_137_792,
    "vit_s": 76_023_296,
    "vit_s_dp005_mask_0": 76_023_296,
    "vit_b": 113_833_472,
    "vit_b_dp005_mask_005": 113_833_472,
    "vit_l_dp005_mask_005": 255_684_352,
    "vit_h": 756_393_984,
}
SLOW_TO_BUILD = {"vit_l_dp005_mask_005", "vit_h"}  # 255M / 756M parameters: ~8 s / ~15 s to initialise


def reference_param_count(embed_dim, depth, num_features=512, patches=144, mlp_ratio=4, norm="ln"):
    """Sum of insightface's layer shapes: patch Conv2d(3, D, 9) with bias, pos_embed (1, 144, D),
    mask_token (1, 1, D); per block two norms, qkv Linear(D, 3D, bias=False), proj Linear(D, D),
    fc1 Linear(D, 4D), fc2 Linear(4D, D); final norm; head Linear(144D, D, bias=False), BN(D),
    Linear(D, F, bias=False), BN(F). A LayerNorm has 2D parameters, the "bn" norm 2 * 144."""
    d, hidden = embed_dim, embed_dim * mlp_ratio
    norm_params = 2 * d if norm == "ln" else 2 * patches
    block = 2 * norm_params + d * 3 * d + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    return ((3 * 9 * 9 * d + d) + patches * d + d + depth * block + norm_params
            + patches * d * d + 2 * d + d * num_features + 2 * num_features)


@pytest.fixture
def graph():
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=mode)


@pytest.fixture
def pynative():
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=mode)


def _input(batch=2, seed=0):
    rng = np.random.RandomState(seed)
    return ms.Tensor(rng.uniform(-1.0, 1.0, (batch, 3, 112, 112)).astype(np.float32))


def _n_params(params):
    return sum(int(np.prod(p.shape)) for p in params)


def test_configs_match_the_reference_and_the_registry():
    assert set(VITS) == set(PUBLISHED) == set(VIT_CONFIGS)
    for name, (embed, depth, heads, drop_path, mask) in PUBLISHED.items():
        cfg = VIT_CONFIGS[name]
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.drop_path_rate, cfg.mask_ratio) == \
            (embed, depth, heads, drop_path, mask), name
        assert (cfg.mlp_ratio, cfg.qkv_bias, cfg.norm) == (4.0, False, "ln")
        assert VIT_EMBED_DIMS[name] == embed and VIT_HEADS == heads
        assert reference_param_count(embed, depth) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TO_BUILD else n
                                  for n in VITS])
def test_parameter_counts(pynative, name):
    net = get_backbone(name)
    trainable = _n_params(net.trainable_params())
    others = [p for p in net.get_parameters() if not p.requires_grad and "moving_" not in p.name]
    assert trainable == REFERENCE_PARAMS[name]
    assert not others  # nothing frozen, unlike the IResNet embedding BN


@pytest.mark.parametrize("norm", ["ln", "bn"])
def test_narrow_parameter_counts_follow_the_reference_formula(pynative, norm):
    net = VisionTransformer(32, 2, 8, num_features=64, norm=norm)
    assert _n_params(net.trainable_params()) == reference_param_count(32, 2, num_features=64, norm=norm)


def test_block_layout_and_drop_path_schedule(pynative):
    net = get_backbone("vit_t", width=16)
    assert net.embed_dim == 64 and len(net.blocks) == 12 and net.len_keep == 129  # int(144 * 0.9)
    assert isinstance(net.blocks[0].drop_path, nn.Identity)  # linspace starts at 0
    rates = [block.drop_path.drop_prob for block in net.blocks[1:]]
    np.testing.assert_allclose(rates, np.linspace(0, 0.1, 12)[1:])
    assert get_backbone("vit_b_dp005_mask_005", width=16).len_keep == 136  # int(144 * 0.95)
    assert get_backbone("vit_t_dp005_mask0", width=16).len_keep == 144
    block = net.blocks[0]
    assert isinstance(block.norm1, nn.LayerNorm) and isinstance(block.mlp.act, nn.ReLU6)
    assert block.attn.qkv.bias is None and block.attn.qkv.out_channels == 3 * 64
    assert block.mlp.fc1.out_channels == 4 * 64
    head = net.feature
    assert head[0].in_channels == 144 * 64 and head[0].bias is None and head[2].bias is None


def test_initialisation(pynative):
    ms.set_seed(3)
    net = get_backbone("vit_s", width=32)  # embed 256
    weight = net.blocks[0].mlp.fc1.weight.asnumpy()
    assert abs(weight.std() - 0.02) < 1e-3 and abs(weight.mean()) < 1e-3
    assert not net.blocks[0].mlp.fc1.bias.asnumpy().any()
    assert abs(net.pos_embed.asnumpy().std() - 0.02) < 2e-3
    np.testing.assert_array_equal(net.blocks[0].norm1.gamma.asnumpy(), 1.0)
    ms.set_seed(3)
    again = get_backbone("vit_s", width=32)
    np.testing.assert_array_equal(again.blocks[0].mlp.fc1.weight.asnumpy(), weight)  # set_seed reproduces


def test_forward_graph_mode(graph):
    net = get_backbone("vit_t", width=16)
    net.set_train(False)
    out = net(_input())
    assert out.shape == (2, 512) and out.dtype == ms.float32
    assert np.isfinite(out.asnumpy()).all()
    narrow = get_backbone("vit_s_dp005_mask_0", num_features=128, width=8)
    narrow.set_train(True)
    out = narrow(_input(4)).asnumpy()
    assert out.shape == (4, 128) and out.dtype == np.float32 and np.isfinite(out).all()


def test_randomness_only_in_training(graph):
    """Masking and drop-path make two training passes differ; inference is deterministic."""
    ms.set_seed(0)
    net = get_backbone("vit_t", width=16)
    x = _input(4)
    net.set_train(True)
    first, second = net(x).asnumpy(), net(x).asnumpy()
    assert np.abs(first - second).max() > 1e-3
    net.set_train(False)
    np.testing.assert_array_equal(net(x).asnumpy(), net(x).asnumpy())


@pytest.mark.parametrize("drop_path, mask", [(0.0, 0.0), (0.0, 0.5), (0.8, 0.0)])
def test_each_source_of_randomness(graph, drop_path, mask):
    ms.set_seed(1)
    net = VisionTransformer(32, 3, 8, drop_path_rate=drop_path, mask_ratio=mask)
    net.set_train(True)
    x = _input(4)
    first, second = net(x).asnumpy(), net(x).asnumpy()
    if drop_path or mask:
        assert np.abs(first - second).max() > 1e-3
    else:  # training BN alone is deterministic
        np.testing.assert_array_equal(first, second)


def test_masking_keeps_a_random_subset_and_refills_with_the_mask_token(pynative):
    net = VisionTransformer(16, 1, 8, mask_ratio=0.25)
    net.set_train(True)
    tokens = net.patch_embed(_input(3)) + net.pos_embed
    out = net._masked_tokens(tokens).asnumpy()
    assert out.shape == (3, 144, 16)
    filled = np.all(out == net.mask_token.asnumpy()[0], axis=-1)  # (3, 144)
    assert (filled.sum(axis=1) == 144 - 108).all()  # int(144 * 0.75) = 108 kept
    assert len({tuple(np.flatnonzero(row)) for row in filled}) > 1  # a different subset per sample


def test_drop_path_cell():
    ms.set_seed(2)
    drop = DropPath(0.5)
    drop.set_train(True)
    out = drop(ms.Tensor(np.ones((256, 2, 2), np.float32))).asnumpy()
    assert set(np.unique(out)) == {0.0, 2.0}  # dropped, or kept and rescaled by 1 / keep_prob
    assert (out[:, 0, 0][:, None, None] == out).all()  # per sample
    assert 0.3 < (out[:, 0, 0] == 0).mean() < 0.7
    drop.set_train(False)
    np.testing.assert_array_equal(drop(ms.Tensor(np.ones((4, 2, 2), np.float32))).asnumpy(), 1.0)


def test_fp16_cast_structure(pynative):
    net = get_backbone("vit_t", width=16, fp16=True)
    block = net.blocks[3]
    for cell in (net.patch_embed.proj, block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
        assert getattr(cell, "fp16", False), cell
    for _, cell in net.cells_and_names():
        if isinstance(cell, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
            assert not getattr(cell, "fp16", False), cell
    for cell in (net, block, block.attn, net.norm, net.feature, net.feature[0], net.feature[2]):
        assert not getattr(cell, "fp16", False), cell
    assert all(p.dtype == ms.float32 for p in net.get_parameters())


def test_fp16_close_to_fp32(graph):
    net32 = get_backbone("vit_t", width=16)
    net16 = get_backbone("vit_t", width=16, fp16=True)
    ms.load_param_into_net(net16, net32.parameters_dict(), strict_load=True)
    net32.set_train(False)
    net16.set_train(False)
    x = _input()
    a, b = net32(x).asnumpy(), net16(x).asnumpy()
    assert b.dtype == np.float32
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert 0.0 < rel < 0.05  # really computed in half precision, but close
    net16.set_train(True)
    assert net16(x).dtype == ms.float32


@pytest.mark.parametrize("name, width, embed", [("vit_t", 16, 64), ("vit_l_dp005_mask_005", 16, 192),
                                                ("vit_h", 8, 128), ("vit_s", 64, 512)])
def test_width_scales_the_embedding(pynative, name, width, embed):
    net = get_backbone(name, width=width)
    assert net.embed_dim == embed and net.blocks[0].attn.num_heads == 8
    assert len(net.blocks) == VIT_CONFIGS[name].depth


@pytest.mark.parametrize("name, width", [("vit_t", 3), ("vit_t", 1), ("vit_l_dp005_mask_005", 5)])
def test_width_not_divisible_by_the_heads_is_one_error(name, width):
    with pytest.raises(ArcFaceError) as err:
        get_backbone(name, width=width)
    message = str(err.value)
    assert "\n" not in message and "multiple of" in message and str(width) in message


def test_other_bad_options_raise():
    with pytest.raises(ArcFaceError, match="dropout"):
        get_backbone("vit_t", dropout=0.1)
    with pytest.raises(ArcFaceError):
        get_backbone("vit_t", num_features=0)
    with pytest.raises(ValueError):
        VisionTransformer(32, 2, 8, norm="bn", mask_ratio=0.1)  # BN over all 144 patches cannot mask


@pytest.mark.parametrize("alias, expected", [
    ("vit_t", "vit_t"), ("ViT_T", "vit_t"), ("VIT-B", "vit_b"), ("vit_l_dp005_mask_005", "vit_l_dp005_mask_005"),
    (" Vit_S_dp005_mask_0 ", "vit_s_dp005_mask_0"), ("vit_t_dp005_mask0", "vit_t_dp005_mask0"), ("vit_h", "vit_h"),
])
def test_names(alias, expected):
    assert canonical_name(alias) == expected


@pytest.mark.parametrize("bad", ["vitt", "vit_x", "vit_t_dp005_mask_0", "vit_l"])
def test_unknown_vit_names_raise(bad):
    with pytest.raises(ArcFaceError) as err:
        canonical_name(bad)
    assert all(name in str(err.value) for name in VITS)


@pytest.mark.slow
def test_export_parity_mindir_onnx(graph, tmp_path):
    """MindSpore, MINDIR (dynamic batch) and ONNX (symbolic batch) agree at batch 1 and 3."""
    import onnx

    from src.deploy.exporting import export_backbone
    from src.evaluation.embedders import MindIREmbedder, OnnxEmbedder
    ms.set_seed(4)
    net = get_backbone("vit_t", width=16)
    net.set_train(True)
    net(_input(8))  # move the BN statistics away from their initial values
    mindir = export_backbone(net, str(tmp_path / "vit"), "MINDIR")
    onnx_path = export_backbone(net, str(tmp_path / "vit"), "ONNX")
    graph_input = onnx.load(onnx_path).graph.input[0]
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == ["batch", 3, 112, 112]
    net.set_train(False)
    embedders = (MindIREmbedder(mindir), OnnxEmbedder(onnx_path))
    for batch in (1, 3):
        x = np.random.default_rng(batch).uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)
        reference = net(ms.Tensor(x)).asnumpy()
        norm = np.linalg.norm(reference, axis=1).max()
        for embedder in embedders:
            out = embedder(x)
            assert out.shape == (batch, 512)
            assert np.abs(out - reference).max() <= 1e-4 * norm, type(embedder).__name__
