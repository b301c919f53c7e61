"""convert.py / src.deploy.interop: insightface models imported without torch, checked against the source.

The `.pth` files are written here in torch.save's zip layout (a protocol-2 data.pkl of an OrderedDict
of `torch._utils._rebuild_tensor_v2` calls with ('storage', torch.<Type>Storage, key, location, numel)
persistent ids, one aligned uncompressed member per storage), from weights made up on the spot with
insightface's parameter names. The "source model" is an independent float64 numpy forward pass of
insightface's topology on those names; ONNX sources are run by onnxruntime.
"""
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import convert
from src.cli import run_main
from src.deploy import interop
from src.errors import ArcFaceError

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # max over the batch of |ours - source| / |source|, per embedding


# ---------------------------------------------------------------- torch.save's format, without torch

class TorchGlobal:
    """A name pickled as GLOBAL `module\\nname` (torch itself need not exist)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable; it is never called
        raise AssertionError(f"{self.module}.{self.name} called")


REBUILD = TorchGlobal("torch._utils", "_rebuild_tensor_v2")
STORAGE_TYPES = {name: TorchGlobal("torch", name) for name in
                 ("FloatStorage", "HalfStorage", "DoubleStorage", "BFloat16Storage", "LongStorage")}
ENCODE = {"FloatStorage": "<f4", "HalfStorage": "<f2", "DoubleStorage": "<f8", "LongStorage": "<i8"}


class Storage:
    """Bytes for `<archive>/data/<key>`; `numel` is what the persistent id claims."""

    def __init__(self, flat, type_name="FloatStorage", numel=None):
        if type_name == "BFloat16Storage":
            self.data = (np.asarray(flat, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            self.data = np.asarray(flat).astype(ENCODE[type_name]).tobytes()
        self.type_name, self.numel = type_name, np.size(flat) if numel is None else numel


class Tensor:
    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def __reduce_ex__(self, protocol):
        return REBUILD, (self.storage, self.offset, self.shape, self.stride, False, OrderedDict())


def contiguous(array, type_name="FloatStorage"):
    array = np.asarray(array)
    stride = [int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)]
    return Tensor(Storage(array.reshape(-1), type_name), 0, array.shape, stride)


class TorchPickler(pickle._Pickler):
    """Python's pickler with torch.save's persistent ids: each storage becomes ('storage',
    torch.<Type>Storage, key, 'cpu', numel), keys numbered in order of first use."""
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages = []

    def save_torch_global(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[TorchGlobal] = save_torch_global

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        if not any(s is obj for s in self.storages):
            self.storages.append(obj)
        key = next(i for i, s in enumerate(self.storages) if s is obj)
        return "storage", STORAGE_TYPES[obj.type_name], str(key), "cpu", obj.numel


def write_zip(path, members, archive="backbone", deflate=()):
    """Members `<archive>/<name>`, uncompressed and 64-byte aligned with an 'FB' extra field as
    torch's writer does (or deflated, for names in `deflate`)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            if name in deflate:
                info.compress_type = zipfile.ZIP_DEFLATED
            else:
                pad = -(zf.fp.tell() + 30 + len(info.filename) + 4) % 64
                info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            zf.writestr(info, data)


def write_pth(path, obj, archive="backbone", extra=None, deflate=()):
    """torch.save(obj, path) for an object whose tensors are `Tensor`s."""
    buffer = io.BytesIO()
    pickler = TorchPickler(buffer)
    pickler.dump(obj)
    members = {"data.pkl": buffer.getvalue(), "byteorder": b"little"}
    members.update({f"data/{i}": s.data for i, s in enumerate(pickler.storages)})
    members.update({"version": b"3\n", ".data/version": b"3\n"})
    members.update(extra or {})
    write_zip(path, members, archive, deflate)


def state_dict(entries):
    """An OrderedDict with the `_metadata` attribute torch's state_dict() gives it."""
    sd = OrderedDict(entries)
    sd._metadata = OrderedDict([("", {"version": 1})] + [(k.rpartition(".")[0], {"version": 2}) for k in sd])
    return sd


# ---------------------------------------------------------------- insightface state dicts

def _bn(name, c, fixed_weight=False):
    return [(f"{name}.weight", (c,), "one" if fixed_weight else "gamma"), (f"{name}.bias", (c,), "beta"),
            (f"{name}.running_mean", (c,), "mean"), (f"{name}.running_var", (c,), "var"),
            (f"{name}.num_batches_tracked", (), "count")]


def iresnet_spec(layers, width=64, num_features=512):
    """(name, shape, kind) of insightface's IResNet state dict, in its order."""
    spec = [("conv1.weight", (width, 3, 3, 3), "conv"), *_bn("bn1", width), ("prelu.weight", (width,), "slope")]
    inplanes = width
    for stage, depth in enumerate(layers):
        planes = width * 2 ** stage
        for i in range(depth):
            p = f"layer{stage + 1}.{i}"
            spec += [*_bn(f"{p}.bn1", inplanes), (f"{p}.conv1.weight", (planes, inplanes, 3, 3), "conv"),
                     *_bn(f"{p}.bn2", planes), (f"{p}.prelu.weight", (planes,), "slope"),
                     (f"{p}.conv2.weight", (planes, planes, 3, 3), "conv"), *_bn(f"{p}.bn3", planes)]
            if i == 0:
                spec += [(f"{p}.downsample.0.weight", (planes, inplanes, 1, 1), "conv"),
                         *_bn(f"{p}.downsample.1", planes)]
            inplanes = planes
    return spec + [*_bn("bn2", inplanes), ("fc.weight", (num_features, inplanes * 49), "linear"),
                   ("fc.bias", (num_features,), "beta"), *_bn("features", num_features, fixed_weight=True)]


def _block(name, cin, cout, k=1, groups=1, act=True):
    spec = [(f"{name}.layers.0.weight", (cout, cin // groups, k, k), "conv"), *_bn(f"{name}.layers.1", cout)]
    return spec + ([(f"{name}.layers.2.weight", (cout,), "slope")] if act else [])


def _depthwise(name, cin, cout, hidden):
    return (_block(f"{name}.layers.0", cin, hidden) + _block(f"{name}.layers.1", hidden, hidden, 3, hidden)
            + _block(f"{name}.layers.2", hidden, cout, act=False))


def mbf_spec(num_features=512):
    """insightface's get_mbf(blocks=(1, 4, 6, 2), scale=2)."""
    spec = _block("layers.0", 3, 128, 3) + _block("layers.1", 128, 128, 3, 64)
    for stage, (cin, cout, hidden, count, res_hidden) in zip((2, 4, 6), ((128, 128, 128, 4, 128),
                                                                        (128, 256, 256, 6, 256),
                                                                        (256, 256, 512, 2, 256))):
        spec += _depthwise(f"layers.{stage}", cin, cout, hidden)
        for i in range(count):
            spec += _depthwise(f"layers.{stage + 1}.layers.{i}", cout, cout, res_hidden)
    spec += _block("conv_sep", 256, 512) + _block("features.layers.0", 512, 512, 7, 512, act=False)
    return spec + [("features.layers.2.weight", (num_features, 512), "linear"), *_bn("features.layers.3", num_features)]


def vit_spec(embed_dim, depth, num_features=512):
    """insightface's VisionTransformer(img_size=112, patch_size=9, norm_layer='ln', mlp_ratio=4)."""
    d = embed_dim
    spec = [("pos_embed", (1, 144, d), "pos"), ("mask_token", (1, 1, d), "pos"),
            ("patch_embed.proj.weight", (d, 3, 9, 9), "conv"), ("patch_embed.proj.bias", (d,), "beta")]
    for i in range(depth):
        b = f"blocks.{i}"
        spec += [(f"{b}.norm1.weight", (d,), "gamma"), (f"{b}.norm1.bias", (d,), "beta"),
                 (f"{b}.attn.qkv.weight", (3 * d, d), "linear"), (f"{b}.attn.proj.weight", (d, d), "linear"),
                 (f"{b}.attn.proj.bias", (d,), "beta"), (f"{b}.norm2.weight", (d,), "gamma"),
                 (f"{b}.norm2.bias", (d,), "beta"), (f"{b}.mlp.fc1.weight", (4 * d, d), "linear"),
                 (f"{b}.mlp.fc1.bias", (4 * d,), "beta"), (f"{b}.mlp.fc2.weight", (d, 4 * d), "linear"),
                 (f"{b}.mlp.fc2.bias", (d,), "beta")]
    return spec + [("norm.weight", (d,), "gamma"), ("norm.bias", (d,), "beta"),
                   ("feature.0.weight", (d, 144 * d), "linear"), *_bn("feature.1", d),
                   ("feature.2.weight", (num_features, d), "linear"), *_bn("feature.3", num_features)]


def _draw(rng, kind, shape):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if kind in ("conv", "linear"):
        return rng.normal(0, np.sqrt((2.0 if kind == "conv" else 1.0) / fan_in), shape)
    if kind in ("gamma", "var"):
        return rng.uniform(0.5, 1.5, shape)
    if kind == "slope":
        return rng.uniform(0.05, 0.4, shape)
    if kind == "one":
        return np.ones(shape)
    return rng.normal(0, 0.5 if kind == "pos" else 0.1, shape)  # beta, mean, pos


def make_weights(spec, seed):
    """Values (float32-exact, held as float64) for a spec; scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    return OrderedDict((name, np.array(1000) if kind == "count" else
                        _draw(rng, kind, shape).astype(np.float32).astype(np.float64)) for name, shape, kind in spec)


def to_state_dict(weights, half=(), bfloat16=(), double=()):
    """`Tensor`s for the weights: float32 storages, or half/bfloat16/double for the names given (the
    weights are rounded in place to what those storages hold)."""
    entries = []
    for name, value in weights.items():
        if value.dtype.kind == "i":
            entries.append((name, contiguous(value, "LongStorage")))
            continue
        kind = "HalfStorage" if name in half else "BFloat16Storage" if name in bfloat16 else \
            "DoubleStorage" if name in double else "FloatStorage"
        if kind == "HalfStorage":
            weights[name] = value.astype(np.float16).astype(np.float64)
        elif kind == "BFloat16Storage":
            weights[name] = (value.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32).astype(np.float64)
        entries.append((name, contiguous(weights[name], kind)))
    return state_dict(entries)


# ---------------------------------------------------------------- insightface's forward passes in numpy

def conv2d(x, w, stride=1, pad=0, groups=1, bias=None):
    n, _, h, wd = x.shape
    o, cg, k, _ = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    xg, wg = x.reshape(n, groups, cg, *x.shape[2:]), w.reshape(groups, o // groups, cg, k, k)
    out = np.zeros((n, groups, o // groups, oh, ow))
    for i in range(k):
        for j in range(k):
            patch = xg[..., i:i + stride * oh:stride, j:j + stride * ow:stride]
            if groups == 1:
                out[:, 0] += np.tensordot(patch[:, 0], wg[0, :, :, i, j], axes=([1], [1])).transpose(0, 3, 1, 2)
            else:
                out += np.einsum("ngchw,goc->ngohw", patch, wg[..., i, j])
    out = out.reshape(n, o, oh, ow)
    return out if bias is None else out + bias[None, :, None, None]


def bn(x, sd, name, eps=1e-5):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = (sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"] + eps)).reshape(shape)
    return (x - sd[f"{name}.running_mean"].reshape(shape)) * scale + sd[f"{name}.bias"].reshape(shape)


def prelu(x, slope):
    return np.where(x > 0, x, x * slope.reshape(1, -1, 1, 1))


def reference_iresnet(sd, x, layers):
    x = prelu(bn(conv2d(x, sd["conv1.weight"], 1, 1), sd, "bn1"), sd["prelu.weight"])
    for stage, depth in enumerate(layers, 1):
        for i in range(depth):
            p = f"layer{stage}.{i}"
            out = conv2d(bn(x, sd, f"{p}.bn1"), sd[f"{p}.conv1.weight"], 1, 1)
            out = prelu(bn(out, sd, f"{p}.bn2"), sd[f"{p}.prelu.weight"])
            out = bn(conv2d(out, sd[f"{p}.conv2.weight"], 2 if i == 0 else 1, 1), sd, f"{p}.bn3")
            shortcut = bn(conv2d(x, sd[f"{p}.downsample.0.weight"], 2), sd, f"{p}.downsample.1") if i == 0 else x
            x = out + shortcut
    x = bn(x, sd, "bn2").reshape(len(x), -1)
    return bn(x @ sd["fc.weight"].T + sd["fc.bias"], sd, "features")


def reference_mbf(sd, x):
    def block(x, name, stride=1, pad=0, groups=1, act=True):
        x = bn(conv2d(x, sd[f"{name}.layers.0.weight"], stride, pad, groups), sd, f"{name}.layers.1")
        return prelu(x, sd[f"{name}.layers.2.weight"]) if act else x

    def depthwise(x, name, stride, residual=False):
        y = block(x, f"{name}.layers.0")
        y = block(y, f"{name}.layers.1", stride, 1, groups=y.shape[1])
        y = block(y, f"{name}.layers.2", act=False)
        return y + x if residual else y

    x = block(block(x, "layers.0", 2, 1), "layers.1", 1, 1, groups=64)
    for stage, count in ((2, 4), (4, 6), (6, 2)):
        x = depthwise(x, f"layers.{stage}", 2)
        for i in range(count):
            x = depthwise(x, f"layers.{stage + 1}.layers.{i}", 1, residual=True)
    x = block(block(x, "conv_sep"), "features.layers.0", groups=512, act=False).reshape(len(x), -1)
    return bn(x @ sd["features.layers.2.weight"].T, sd, "features.layers.3")


def layer_norm(x, sd, name, eps=1e-5):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def reference_vit(sd, x, depth, heads=8):
    t = conv2d(x, sd["patch_embed.proj.weight"], 9, bias=sd["patch_embed.proj.bias"])
    n, d = t.shape[:2]
    t = t.reshape(n, d, -1).transpose(0, 2, 1) + sd["pos_embed"]
    for i in range(depth):
        b = f"blocks.{i}"
        qkv = (layer_norm(t, sd, f"{b}.norm1") @ sd[f"{b}.attn.qkv.weight"].T)
        q, k, v = qkv.reshape(n, 144, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
        scores = q @ k.transpose(0, 1, 3, 2) * (d // heads) ** -0.5
        attn = np.exp(scores - scores.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(n, 144, d)
        t = t + out @ sd[f"{b}.attn.proj.weight"].T + sd[f"{b}.attn.proj.bias"]
        h = np.clip(layer_norm(t, sd, f"{b}.norm2") @ sd[f"{b}.mlp.fc1.weight"].T + sd[f"{b}.mlp.fc1.bias"], 0, 6)
        t = t + h @ sd[f"{b}.mlp.fc2.weight"].T + sd[f"{b}.mlp.fc2.bias"]
    f = layer_norm(t, sd, "norm").reshape(n, -1)
    f = bn(f @ sd["feature.0.weight"].T, sd, "feature.1", eps=2e-5)
    return bn(f @ sd["feature.2.weight"].T, sd, "feature.3", eps=2e-5)


# ---------------------------------------------------------------- helpers

def images(n=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 112, 112))


def our_embeddings(ckpt, x):
    from src.evaluation.embedders import MindSporeEmbedder, backbone_from_checkpoint
    return MindSporeEmbedder(backbone_from_checkpoint(str(ckpt)))(x.astype(np.float32)).astype(np.float64)


def relative_difference(ours, source):
    return float(np.max(np.linalg.norm(ours - source, axis=1) / np.linalg.norm(source, axis=1)))


def convert_ok(source, output, *extra):
    assert convert.main([str(source), str(output), *extra]) == 0
    from src.checkpoint import read_checkpoint
    return read_checkpoint(str(output), meta_only=True)[1]


def convert_error(capsys, source, output, *extra):
    """The one `error:` line of a failed conversion; nothing is written."""
    capsys.readouterr()
    assert run_main(convert.main, [str(source), str(output), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not os.path.exists(output)
    return err[0]


# ---------------------------------------------------------------- PyTorch state dicts

def test_r18_state_dict_gives_the_source_embeddings(tmp_path):
    """Full-size r18 with the storage variants torch writes: half/bfloat16/double storages, a tensor
    with non-contiguous strides, tensors sharing one storage at offsets, num_batches_tracked, the
    state dict's _metadata. The embeddings equal a float64 forward of insightface's IResNet."""
    layers = (2, 2, 2, 2)
    weights = make_weights(iresnet_spec(layers), seed=1)
    sd = to_state_dict(weights, half={n for n in weights if n.endswith("prelu.weight")},
                       bfloat16={"layer3.1.bn1.weight"}, double={"bn2.running_var"})
    w = weights["fc.weight"]  # stored transposed: the tensor reads it with strides (1, 512)
    sd["fc.weight"] = Tensor(Storage(w.T.reshape(-1)), 0, w.shape, (1, w.shape[0]))
    parts = [f"layer4.1.bn3.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
    shared = Storage(np.concatenate([weights[p] for p in parts]))
    for i, p in enumerate(parts):
        sd[p] = Tensor(shared, i * 512, (512,), (1,))
    write_pth(tmp_path / "backbone.pth", sd)

    meta = convert_ok(tmp_path / "backbone.pth", tmp_path / "r18.ckpt")
    assert (meta["network"], meta["width"], meta["num_features"]) == ("r18", 64, 512)
    assert meta["source"] == f"PyTorch state dict {tmp_path / 'backbone.pth'}"
    x = images()
    difference = relative_difference(our_embeddings(tmp_path / "r18.ckpt", x), reference_iresnet(weights, x, layers))
    print(f"r18 max relative difference {difference:.2e}")
    assert difference <= TOLERANCE


def test_mbf_state_dict_gives_the_source_embeddings(tmp_path):
    weights = make_weights(mbf_spec(num_features=128), seed=2)
    write_pth(tmp_path / "model.pt", to_state_dict(weights), archive="model")
    meta = convert_ok(tmp_path / "model.pt", tmp_path / "mbf.ckpt", "--network", "mobilefacenet")
    assert (meta["network"], meta["width"], meta["num_features"]) == ("mbf", 64, 128)
    x = images()
    difference = relative_difference(our_embeddings(tmp_path / "mbf.ckpt", x), reference_mbf(weights, x))
    print(f"mbf max relative difference {difference:.2e}")
    assert difference <= TOLERANCE


def test_vit_state_dict_gives_the_source_embeddings(tmp_path):
    """vit_t at a quarter of its width (embedding dimension 64, depth 12); --network picks the
    variant of that size to record."""
    weights = make_weights(vit_spec(64, 12, num_features=256), seed=3)
    write_pth(tmp_path / "model.pt", to_state_dict(weights))
    meta = convert_ok(tmp_path / "model.pt", tmp_path / "vit.ckpt", "--network", "vit_t_dp005_mask0")
    assert (meta["network"], meta["width"], meta["num_features"]) == ("vit_t_dp005_mask0", 16, 256)
    x = images()
    difference = relative_difference(our_embeddings(tmp_path / "vit.ckpt", x), reference_vit(weights, x, 12))
    print(f"vit_t (width 16) max relative difference {difference:.2e}")
    assert difference <= TOLERANCE


PUBLISHED = {"r18": iresnet_spec((2, 2, 2, 2)), "r34": iresnet_spec((3, 4, 6, 3)), "r50": iresnet_spec((3, 4, 14, 3)),
             "r100": iresnet_spec((3, 13, 30, 3)), "r200": iresnet_spec((6, 26, 60, 6)), "mbf": mbf_spec(),
             "vit_t": vit_spec(256, 12), "vit_s": vit_spec(512, 12), "vit_b": vit_spec(512, 24),
             "vit_l_dp005_mask_005": vit_spec(768, 24), "vit_h": vit_spec(1024, 48)}


@pytest.mark.parametrize("network", list(PUBLISHED))
def test_every_published_network_is_recognised_and_mapped(network):
    """Names and shapes only: each insightface state dict is recognised and every tensor has a place."""
    shapes = {name: shape for name, shape, kind in PUBLISHED[network] if kind != "count"}
    model = interop.identify_torch(shapes)
    assert (model.network, model.width, model.num_features) == (network, 64, 512)
    mapped = interop.map_torch({name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}, model)
    assert len(mapped) == len(shapes)


def test_network_mismatches_name_both():
    shapes = {name: shape for name, shape, _ in PUBLISHED["r18"]}
    with pytest.raises(ArcFaceError, match=r"holds r18 \(stage depths \(2, 2, 2, 2\)\), not r50"):
        interop.identify_torch(shapes, "iresnet50")
    vit_s = {name: shape for name, shape, _ in PUBLISHED["vit_s"]}
    assert interop.identify_torch(vit_s, "vit_s_dp005_mask_0").network == "vit_s_dp005_mask_0"
    with pytest.raises(ArcFaceError, match=r"holds vit_s \(depth 12, embedding dimension 512\), not vit_b"):
        interop.identify_torch(vit_s, "vit_b")
    with pytest.raises(ArcFaceError, match=r"blocks \(2, 8, 12, 4\) and scale 4"):  # insightface's mbf_large
        interop.identify_torch({"conv_sep.layers.0.weight": (512, 512, 1, 1),
                                "layers.0.layers.0.weight": (256, 3, 3, 3),
                                **{f"layers.{s}.layers.{i}.layers.0.layers.0.weight": (1,)
                                   for s, n in ((1, 2), (3, 8), (5, 12), (7, 4)) for i in range(n)}})


def test_missing_unexpected_and_misshapen_tensors_are_named():
    shapes = {name: shape for name, shape, kind in PUBLISHED["r18"] if kind != "count"}
    model = interop.identify_torch(shapes)
    values = {name: np.zeros(shape, np.float32) for name, shape in shapes.items() if name != "fc.bias"}
    values["head.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ArcFaceError, match=r"parameters of r18: 1 missing: fc.bias; 1 unexpected: head.weight"):
        interop.map_torch(values, model)
    values = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    values["layer2.1.prelu.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ArcFaceError, match=r"layer2.1.prelu.w \(3,\) there, \(128,\) here"):
        interop.map_torch(values, model)


def test_training_checkpoint_and_module_prefix(tmp_path):
    """arcface_torch's checkpoint_gpu_0.pt keeps the backbone under state_dict_backbone; DataParallel
    prefixes module.; num_batches_tracked is dropped."""
    sd = state_dict([("module.conv1.weight", contiguous(np.arange(6.0).reshape(2, 3), "HalfStorage")),
                     ("module.bn1.num_batches_tracked", contiguous(np.array(7), "LongStorage"))])
    write_pth(tmp_path / "checkpoint_gpu_0.pt", {"epoch": 3, "state_dict_backbone": sd, "lr": [0.1, 0.01]})
    tensors = interop.read_torch(str(tmp_path / "checkpoint_gpu_0.pt"))
    assert list(tensors) == ["conv1.weight"] and tensors["conv1.weight"].dtype == np.float32
    np.testing.assert_array_equal(tensors["conv1.weight"], np.arange(6.0).reshape(2, 3))


def test_big_endian_and_bfloat16_storages(tmp_path):
    """A file written on a big-endian machine says so in <archive>/byteorder; bfloat16 widens to float32."""
    floats, bf16 = Storage(np.arange(3.0)), Storage(np.array([1.5, -2.0, 3.0e38]), "BFloat16Storage")
    floats.data = np.arange(3.0).astype(">f4").tobytes()
    bf16.data = np.frombuffer(bf16.data, "<u2").astype(">u2").tobytes()
    sd = state_dict([("a", Tensor(floats, 1, (2,), (1,))), ("b", Tensor(bf16, 0, (3,), (1,)))])
    write_pth(tmp_path / "big.pth", sd, extra={"byteorder": b"big"})
    tensors = interop.read_torch(str(tmp_path / "big.pth"))
    np.testing.assert_array_equal(tensors["a"], [1.0, 2.0])
    assert tensors["b"].dtype == np.float32 and tensors["b"][:2].tolist() == [1.5, -2.0]
    assert abs(tensors["b"][2] / 3.0e38 - 1) < 1e-2


# ---------------------------------------------------------------- hostile or broken files

def _pickle(obj):
    buffer = io.BytesIO()
    pickler = TorchPickler(buffer)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.storages


def _hostile(kind, path, marker):
    """Write the hostile file `kind`; returns the part of the error line expected."""
    one = Storage(np.zeros(4))
    if kind == "os.system":
        command = f"touch {marker}".encode()
        data = b"\x80\x02cos\nsystem\nq\x00X" + struct.pack("<I", len(command)) + command + b"q\x01\x85q\x02Rq\x03."
        write_zip(path, {"data.pkl": data, "version": b"3\n"})
        return "references 'os.system', which is not allowed"
    if kind == "builtins.exec in a tensor":
        data = (b"\x80\x02ccollections\nOrderedDict\n)Rq\x00X\x01\x00\x00\x00wcbuiltins\nexec\nX\x0b\x00\x00\x00"
                b"print('hi')\x85Rs.")
        write_zip(path, {"data.pkl": data})
        return "references 'builtins.exec', which is not allowed"
    if kind == "wrong storage key":
        data, _ = _pickle(state_dict([("w", Tensor(one, 0, (4,), (1,)))]))
        write_zip(path, {"data.pkl": data, "data/5": one.data})
        return "no member backbone/data/0"
    if kind == "storage shorter than the tensor":
        write_pth(path, state_dict([("w", Tensor(one, 0, (3, 3), (3, 1)))]))
        return "needs 9 elements, its storage '0' has 4"
    if kind == "strides past the storage":
        write_pth(path, state_dict([("w", Tensor(one, 1, (2,), (3,)))]))
        return "needs 5 elements"
    if kind == "member shorter than the storage":
        write_pth(path, state_dict([("w", Tensor(Storage(np.zeros(4), numel=9), 0, (9,), (1,)))]))
        return "holds 16 bytes, the tensors need 36"
    if kind == "numel 2**60":
        write_pth(path, state_dict([("w", Tensor(Storage(np.zeros(4), numel=2 ** 60), 0, (4,), (1,)))]))
        return "bad storage size"
    if kind == "size 2**30 x 2**30":
        write_pth(path, state_dict([("w", Tensor(Storage(np.zeros(4), numel=2 ** 31), 0, (2 ** 30, 2 ** 30),
                                                 (2 ** 30, 1)))]))
        return "more than 2147483648 elements"
    if kind == "zip bomb":
        zeros = Storage(np.zeros(2 ** 21, np.float32))
        write_pth(path, state_dict([("w", Tensor(zeros, 0, (2 ** 21,), (1,)))]), deflate={"data/0"})
        return "(a zip bomb?); refusing to decompress it"
    if kind == "not a zip":
        path.write_bytes(os.urandom(4096))
        return "not a PyTorch checkpoint"
    if kind == "legacy torch format":
        path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + os.urandom(64))
        return "legacy (torch < 1.6) format"
    if kind == "zip without data.pkl":
        write_zip(path, {"version": b"3\n", "data/0": one.data})
        return "without <archive>/data.pkl"
    if kind == "truncated data.pkl":
        data, _ = _pickle(state_dict([("w", Tensor(one, 0, (4,), (1,)))]))
        write_zip(path, {"data.pkl": data[:40], "data/0": one.data})
        return "damaged data.pkl"
    if kind == "stride 0 (1 KB claiming 24 GiB)":
        # One stored value repeated: every check on the storage passes, the tensor would take 24 GiB.
        write_pth(path, state_dict([("conv1.weight", Tensor(one, 0, (2 ** 20, 3, 3, 3), (0, 0, 0, 0)))]))
        return "is not a dense layout"
    if kind == "overlapping strides":
        write_pth(path, state_dict([("w", Tensor(Storage(np.zeros(6)), 0, (3, 3), (1, 1)))]))
        return "is not a dense layout"
    if kind == "tensors totalling 12 GB":
        big = Storage(np.zeros(4), numel=2 ** 30)
        write_pth(path, state_dict([(f"w{i}", Tensor(big, 0, (2 ** 30,), (1,))) for i in range(3)]))
        return "claim 12884901888 bytes, more than the 8589934592 allowed"
    if kind == "conv1 of 2**20 rows":
        # Refused by its shape before its bytes are read or a network of that width is built.
        weights = to_state_dict(make_weights(iresnet_spec((2, 2, 2, 2), width=8, num_features=16), seed=0))
        weights["conv1.weight"] = contiguous(np.zeros((2 ** 20, 1, 1, 1), np.float32))
        write_pth(path, state_dict(weights))
        return "width must be an integer from 1 to 256 (64 is the published network), got 1048576"
    if kind == "block index of 5000 digits":
        weights = to_state_dict(make_weights(iresnet_spec((2, 2, 2, 2), width=8, num_features=16), seed=0))
        weights["layer1." + "9" * 5000 + ".bn1.weight"] = contiguous(np.ones(8))
        write_pth(path, state_dict(weights))
        return "unexpected: layer1.999"
    raise AssertionError(kind)


HOSTILE = ["os.system", "builtins.exec in a tensor", "wrong storage key", "storage shorter than the tensor",
           "strides past the storage", "member shorter than the storage", "numel 2**60", "size 2**30 x 2**30",
           "zip bomb", "not a zip", "legacy torch format", "zip without data.pkl", "truncated data.pkl",
           "stride 0 (1 KB claiming 24 GiB)", "overlapping strides", "tensors totalling 12 GB",
           "conv1 of 2**20 rows", "block index of 5000 digits"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_or_broken_files_give_one_error_line(kind, tmp_path, capsys):
    marker = tmp_path / "pwned"
    expected = _hostile(kind, tmp_path / "evil.pth", marker)
    line = convert_error(capsys, tmp_path / "evil.pth", tmp_path / "out.ckpt")
    assert expected in line, line
    assert not marker.exists()


def test_cli_help_and_a_refused_file_in_a_fresh_interpreter(tmp_path):
    marker = tmp_path / "pwned"
    _hostile("os.system", tmp_path / "evil.pth", marker)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "convert.py", "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "eval_onnx.py" in done.stdout and "--network" in done.stdout
    done = subprocess.run([sys.executable, "convert.py", str(tmp_path / "evil.pth"), str(tmp_path / "out.ckpt")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()


# ---------------------------------------------------------------- ONNX

def _randomised(network, seed, **kwargs):
    """One of our backbones with random BatchNorm statistics, PReLU slopes and biases."""
    import mindspore as ms

    from src.models import get_backbone
    ms.set_seed(seed)
    net = get_backbone(network, **kwargs)
    rng = np.random.default_rng(seed)
    ranges = {"moving_variance": (0.5, 1.5), "gamma": (0.5, 1.5), ".w": (0.05, 0.4), "beta": (-0.1, 0.1),
              "moving_mean": (-0.1, 0.1), "bias": (-0.1, 0.1)}
    for p in net.get_parameters():
        for suffix, (low, high) in ranges.items():
            if p.name.endswith(suffix):
                p.set_data(ms.Tensor(rng.uniform(low, high, p.shape).astype(np.float32)))
    return net


def fold_batchnorms(source, target, dynamic_flatten=False, matmul=False, epsilon=None):
    """What PyTorch's exporter does in eval mode: a BatchNorm after a Conv goes into the Conv's weight
    and a new bias; PReLU slopes become (C, 1, 1) weights; the input is called input.1. With
    `dynamic_flatten`, Flatten becomes what `x.view(x.size(0), -1)` exports to with a dynamic batch
    (insightface's MobileFaceNet): Shape -> Gather -> Unsqueeze -> Concat -> Reshape; with `matmul`,
    Gemm becomes MatMul + Add; `epsilon` replaces that of the remaining BatchNorms."""
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.load(source)
    graph = model.graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes, dropped = list(graph.node), set()
    for node in nodes:
        users = [n for n in nodes if node.output[0] in n.input]
        if node.op_type == "Unsqueeze" and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]].reshape(-1, 1, 1)
            dropped.add(id(node))
        elif node.op_type == "Conv" and len(users) == 1 and users[0].op_type == "BatchNormalization":
            bn_node = users[0]
            scale, beta, mean, var = (weights[name].astype(np.float64) for name in bn_node.input[1:])
            eps = next(a.f for a in bn_node.attribute if a.name == "epsilon")
            k = scale / np.sqrt(var + eps)
            weights[node.input[1] + ".folded"] = (weights[node.input[1]] * k[:, None, None, None]).astype(np.float32)
            weights[node.input[1] + ".bias"] = (beta - mean * k).astype(np.float32)
            node.input[:] = [node.input[0], node.input[1] + ".folded", node.input[1] + ".bias"]
            node.output[0] = bn_node.output[0]
            dropped.add(id(bn_node))
    kept = [n for n in nodes if id(n) not in dropped]
    for node in [n for n in kept if n.op_type == "BatchNormalization" and epsilon]:
        next(a for a in node.attribute if a.name == "epsilon").f = epsilon
    for node in [n for n in kept if n.op_type == "Gemm" and matmul]:
        weights[node.input[1] + ".t"] = weights[node.input[1]].T.copy()
        kept[kept.index(node):kept.index(node) + 1] = [
            helper.make_node("MatMul", [node.input[0], node.input[1] + ".t"], [node.output[0] + ".mm"]),
            helper.make_node("Add", [node.output[0] + ".mm", node.input[2]], [node.output[0]])]
    for node in [n for n in kept if n.op_type == "Flatten" and dynamic_flatten]:
        x, out = node.input[0], node.output[0]
        weights.update({"zero": np.array(0, np.int64), "minus_one": np.array([-1], np.int64)})
        kept[kept.index(node):kept.index(node) + 1] = [
            helper.make_node("Shape", [x], [x + ".shape"]),
            helper.make_node("Gather", [x + ".shape", "zero"], [x + ".batch"], axis=0),
            helper.make_node("Unsqueeze", [x + ".batch"], [x + ".batch1"], axes=[0]),
            helper.make_node("Concat", [x + ".batch1", "minus_one"], [x + ".target"], axis=0),
            helper.make_node("Reshape", [x, x + ".target"], [out])]
    used = {name for n in kept for name in n.input}
    del graph.node[:], graph.initializer[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items() if k in used)
    for n in graph.node:
        n.input[:] = ["input.1" if name == "data" else name for name in n.input]
    graph.input[0].name = "input.1"
    onnx.checker.check_model(model)
    onnx.save(model, target)


@pytest.fixture(scope="module")
def exported_r18(tmp_path_factory):
    """Our r18 at width 8 exported by export.py's code (BatchNorm unfolded), and a copy with folded
    BatchNorms, the others at epsilon 1e-2 (not ours: changes the embeddings by ~1%), and MatMul + Add
    for the Gemm."""
    from src.deploy.exporting import export_backbone
    folder = tmp_path_factory.mktemp("onnx")
    path = export_backbone(_randomised("r18", 4, width=8, num_features=64), str(folder / "r18"), "ONNX")
    fold_batchnorms(path, str(folder / "r18_folded.onnx"), matmul=True, epsilon=1e-2)
    return Path(path), folder / "r18_folded.onnx"


def _onnx_difference(onnx_path, ckpt, x):
    from src.evaluation.embedders import OnnxEmbedder
    source = OnnxEmbedder(str(onnx_path))(x.astype(np.float32)).astype(np.float64)
    return relative_difference(our_embeddings(ckpt, x), source)


@pytest.mark.parametrize("variant", ["unfolded", "folded"])
def test_onnx_iresnet_gives_onnxruntime_embeddings(exported_r18, variant, tmp_path):
    source = exported_r18[0 if variant == "unfolded" else 1]
    meta = convert_ok(source, tmp_path / "r18.ckpt")
    assert (meta["network"], meta["width"], meta["num_features"]) == ("r18", 8, 64)
    difference = _onnx_difference(source, tmp_path / "r18.ckpt", images(3))
    print(f"ONNX r18 ({variant}) max relative difference {difference:.2e}")
    assert difference <= TOLERANCE


def test_onnx_mbf_with_folded_batchnorm_gives_onnxruntime_embeddings(tmp_path):
    from src.deploy.exporting import export_backbone
    path = export_backbone(_randomised("mbf", 5, num_features=128), str(tmp_path / "mbf"), "ONNX")
    fold_batchnorms(path, str(tmp_path / "w600k_mbf.onnx"), dynamic_flatten=True)
    import onnx
    assert "Shape" in {n.op_type for n in onnx.load(str(tmp_path / "w600k_mbf.onnx")).graph.node}
    meta = convert_ok(tmp_path / "w600k_mbf.onnx", tmp_path / "mbf.ckpt")
    assert (meta["network"], meta["num_features"]) == ("mbf", 128)
    difference = _onnx_difference(tmp_path / "w600k_mbf.onnx", tmp_path / "mbf.ckpt", images(3))
    print(f"ONNX mbf (folded) max relative difference {difference:.2e}")
    assert difference <= TOLERANCE


def test_onnx_network_mismatch_and_unmapped_graphs(exported_r18, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, external_data_helper, helper, numpy_helper
    line = convert_error(capsys, exported_r18[1], tmp_path / "x.ckpt", "--network", "r34")
    assert "holds r18 (stage depths (2, 2, 2, 2)), not r34" in line
    # a graph that normalises its input and is no iresnet
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input.1", "k"], ["x"]), helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4),
         helper.make_node("Relu", ["y"], ["out"])], "other",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [None, 3, 112, 112])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.float32(1 / 127.5), "k"),
         numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")])
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    line = convert_error(capsys, tmp_path / "other.onnx", tmp_path / "x.ckpt")
    assert "the input goes into Mul, not a convolution" in line
    assert f"python eval_onnx.py --eval_url EVAL_DIR --onnx_url {tmp_path / 'other.onnx'}" in line
    # our r18 followed by an L2 normalisation
    model = onnx.load(str(exported_r18[1]))
    model.graph.node.append(helper.make_node("LpNormalization", [model.graph.output[0].name], ["normed"]))
    model.graph.output[0].name = "normed"
    onnx.save(model, str(tmp_path / "normed.onnx"))
    line = convert_error(capsys, tmp_path / "normed.onnx", tmp_path / "x.ckpt")
    assert "the graph's output is 'normed'" in line and "eval_onnx.py" in line
    # weights in an external file are not followed
    model = onnx.load(str(exported_r18[1]))
    external_data_helper.set_external_data(model.graph.initializer[0], location="../../etc/passwd")
    model.graph.initializer[0].ClearField("raw_data")
    model.graph.initializer[0].data_location = TensorProto.EXTERNAL
    onnx.save(model, str(tmp_path / "external.onnx"))
    line = convert_error(capsys, tmp_path / "external.onnx", tmp_path / "x.ckpt")
    assert "keeps its values in an external data file ('../../etc/passwd')" in line


@pytest.mark.slow
def test_fine_tuning_an_imported_model_on_an_image_folder(tiny_data, tmp_path):
    """train.py --ckpt_url imported.ckpt on an ImageFolder of one's own identities: the backbone starts
    from the import (network, width and embedding size read from it), the head is new."""
    import cv2

    import train
    from src.checkpoint import read_checkpoint
    from src.data.face_rec import FaceRecordDataset
    weights = make_weights(iresnet_spec((2, 2, 2, 2), width=8, num_features=64), seed=3)
    write_pth(tmp_path / "backbone.pth", to_state_dict(weights))
    convert_ok(tmp_path / "backbone.pth", tmp_path / "imported.ckpt")
    records = FaceRecordDataset(str(tiny_data[0]))
    folder = tmp_path / "my_faces"
    for i in range(32):  # 4 identities of 8 images, as files
        data, label = records[i]
        (folder / f"person{label}").mkdir(parents=True, exist_ok=True)
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        cv2.imwrite(str(folder / f"person{label}" / f"{i}.png"), image)
    out = tmp_path / "fine_tuned"
    imported = str(tmp_path / "imported.ckpt")
    assert train.main(["--data_url", str(folder), "--train_url", str(out), "--ckpt_url", imported,
                       "--batch_size", "8", "--epochs", "1", "--num_workers", "1", "--log_interval", "1",
                       "--lr", "0.08"]) == 0
    log = (out / "train.log").read_text()
    assert "initialised the backbone from" in log and "r18 width 8" in log and "4 classes" in log
    params, meta = read_checkpoint(str(out / "ArcFace-1_4.ckpt"))
    assert (meta["network"], meta["width"], meta["num_features"]) == ("r18", 8, 64)
    assert params["head.weight"].shape == (4, 64)
    start, trained = weights["conv1.weight"], params["backbone.conv1.weight"].asnumpy()
    moved = np.linalg.norm(trained - start) / np.linalg.norm(start)
    assert 0 < moved < 0.2, moved  # started from the import, then trained


# ---------------------------------------------------------------- hostile ONNX models

def _tiny_graph(nodes, initializers, output="y"):
    """A graph taking (N, 3, 112, 112) `x` to `output`."""
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph(nodes, "hostile", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              [None, 3, 112, 112])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [None, 8, 112, 112])],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=onnx.IR_VERSION)


def _external(tensor, location):
    from onnx import TensorProto, external_data_helper
    external_data_helper.set_external_data(tensor, location=location)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    return tensor


def _hostile_onnx(kind, path):
    """Write the hostile ONNX model `kind`; returns the part of the error line expected. The secret
    file `secret.txt` lies in the folder convert.py is run from."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    weight = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)
    if kind == "Constant node reading a file of the current folder":
        value = _external(numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "value"), "secret.txt")
        model = _tiny_graph([helper.make_node("Constant", [], ["w"], value=value), conv], [])
        expected = "tensor 'value' keeps its values in an external data file ('secret.txt')"
    elif kind == "initializer at an absolute path":
        model = _tiny_graph([conv], [_external(weight, "/etc/hostname")])
        expected = "keeps its values in an external data file ('/etc/hostname')"
    elif kind == "sparse initializer outside the folder":
        values = _external(numpy_helper.from_array(np.zeros(2, np.float32), "w"), "../secret.txt")
        indices = numpy_helper.from_array(np.array([0, 1], np.int64), "w_indices")
        model = _tiny_graph([conv], [])
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [8, 3, 3, 3]))
        expected = "external data file ('../secret.txt')"
    elif kind == "Constant inside a subgraph":
        value = _external(numpy_helper.from_array(np.zeros(1, np.float32), "inner"), "secret.txt")
        branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=value)], "branch", [],
                                   [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)])
        cond = numpy_helper.from_array(np.array(True), "cond")
        model = _tiny_graph([conv, helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch)],
                            [weight, cond], output="y")
        expected = "tensor 'inner' keeps its values in an external data file ('secret.txt')"
    elif kind == "cycle of two Identity nodes":
        loop = [helper.make_node("Identity", ["b"], ["a"]), helper.make_node("Identity", ["a"], ["b"])]
        model = _tiny_graph([conv] + loop + [helper.make_node("Add", ["y", "a"], ["z"])], [weight], output="z")
        expected = "not a valid ONNX model (its graph has a cycle)"
    elif kind == "undefined dtype":
        bad = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
        bad.data_type = TensorProto.UNDEFINED
        model = _tiny_graph([conv], [bad])
        expected = "error: "
    elif kind == "unknown dtype":
        bad = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
        bad.data_type = 999
        model = _tiny_graph([conv], [bad])
        expected = "error: "
    elif kind == "scalar convolution weight":
        model = _tiny_graph([conv], [numpy_helper.from_array(np.float32(1.0), "w")])
        expected = "has a weight of shape (), not a 2-D kernel"
    elif kind == "empty strides":
        node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)
        node.attribute.append(helper.make_attribute("strides", [], attr_type=onnx.AttributeProto.INTS))
        model = _tiny_graph([node], [weight])
        expected = "does not map onto our iresnets or mbf"
    else:
        raise AssertionError(kind)
    onnx.save(model, str(path))
    return expected


HOSTILE_ONNX = ["Constant node reading a file of the current folder", "initializer at an absolute path",
                "sparse initializer outside the folder", "Constant inside a subgraph", "cycle of two Identity nodes",
                "undefined dtype", "unknown dtype", "scalar convolution weight", "empty strides"]


@pytest.mark.parametrize("kind", HOSTILE_ONNX)
def test_hostile_onnx_models_give_one_error_line_and_read_nothing_else(kind, tmp_path, capsys, monkeypatch):
    """No tensor of any kind, anywhere in the model, makes the import read another file: the bytes of
    `secret.txt` in the current folder never become weights."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.txt").write_bytes(b"ssh-rsa AAAA" * 100)
    expected = _hostile_onnx(kind, tmp_path / "evil.onnx")
    line = convert_error(capsys, tmp_path / "evil.onnx", tmp_path / "out.ckpt")
    assert expected in line, line


def test_every_hostile_model_ends_in_bounded_memory_and_time(tmp_path):
    """The whole hostile set, converted in a fresh interpreter under a 4 GiB address-space limit and a
    time limit: each is one error line (no MemoryError, no endless walk of a cyclic graph)."""
    import resource
    for i, kind in enumerate(HOSTILE):
        _hostile(kind, tmp_path / f"{i}.pth", tmp_path / "pwned")
    for i, kind in enumerate(HOSTILE_ONNX):
        _hostile_onnx(kind, tmp_path / f"{i}.onnx")
    (tmp_path / "secret.txt").write_bytes(b"secret")
    script = ("import sys, glob, convert\nfrom src.cli import run_main\n"
              "for path in sorted(glob.glob('*.pth') + glob.glob('*.onnx')):\n"
              "    print(path, run_main(convert.main, [path, 'out.ckpt']), flush=True)\n")

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)
    codes = dict(line.split() for line in done.stdout.splitlines())
    assert len(codes) == len(HOSTILE) + len(HOSTILE_ONNX) and set(codes.values()) == {"2"}, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line]
    assert len(errors) == len(codes) and all(line.startswith("error: ") for line in errors), done.stderr
    assert not (tmp_path / "out.ckpt").exists() and not (tmp_path / "pwned").exists()
