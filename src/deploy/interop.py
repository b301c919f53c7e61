"""Importing insightface recognition models as checkpoints of ours (`convert.py`).

Two sources:

* arcface_torch PyTorch state dicts (`backbone.pth`, written by `torch.save`): a zip holding
  `<archive>/data.pkl`, a protocol-2 pickle of an OrderedDict whose values are
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` calls, each
  storage a persistent id `('storage', torch.<Type>Storage, key, location, numel)` whose bytes are
  the member `<archive>/data/<key>`. The pickle is read by `src.safe_pickle` with the handful of
  names such a file uses, all mapped to inert placeholders; the arrays are then built here from the
  raw bytes after checking dtype, size, strides and offsets against the member. torch is not needed.
* insightface model-zoo ONNX files (`w600k_r50.onnx`, `glint360k_r100.onnx`, ...): the graph is walked
  along the structure of our iresnets and mbf; it imports only when every node maps onto a layer
  of ours. A convolution whose BatchNorm the exporter folded into it (a convolution with a bias) is
  represented exactly: our bias-free convolution takes its weight and the BatchNorm after it
  becomes the identity shifted by the bias (gamma 1, beta = bias, mean 0, variance 1 - eps), or,
  when a BatchNorm does follow, takes the bias into its mean; a BatchNorm with another epsilon than
  ours is rewritten exactly (gamma / sqrt(var + eps), variance 1 - our eps).

Our parameter names follow insightface's module paths, so the name mapping is mostly MindSpore's
spelling of the same parameter (BatchNorm/LayerNorm weight/bias/running_mean/running_var ->
gamma/beta/moving_mean/moving_variance, PReLU weight -> w); see `_our_name`.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass

import numpy as np

from src.errors import ArcFaceError
from src.models import IRESNETS, VIT_EMBED_DIMS, VITS, canonical_name, check_backbone_options
from src.safe_pickle import Global, Placeholder, RefusedPickle, describe
from src.safe_pickle import load as safe_load

__all__ = ["Model", "convert", "identify_torch", "map_torch", "read_onnx", "read_torch", "template"]

MAX_PICKLE_BYTES = 64 << 20  # the data.pkl of an r200 state dict has a few hundred KB
MAX_TENSOR_ELEMENTS = 1 << 31  # vit_h's largest tensor has 151M
MAX_TOTAL_BYTES = 8 << 30  # every storage read together (vit_h in float32: 2.5 GB)
MAX_COMPRESSION = 200  # torch stores members uncompressed; a higher ratio is a zip bomb
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]  # torch < 1.6 files start with it


@dataclass(frozen=True)
class Model:
    """The backbone a source holds: what `get_backbone` and the checkpoint meta need. What a file
    claims (a width of 2**30 rows in conv1) is checked against the backbones' bounds on creation,
    before anything is read or built from it."""
    network: str
    width: int
    num_features: int
    detail: str = ""  # what it was recognised by, for messages

    def __post_init__(self):
        check_backbone_options(self.network, int(self.num_features), 0.0, int(self.width))


# ---------------------------------------------------------------- PyTorch zip checkpoints

# numpy dtype of each storage type a state dict may use; "bf16" is read as uint16.
_STORAGES = {"FloatStorage": "f4", "HalfStorage": "f2", "DoubleStorage": "f8", "BFloat16Storage": "bf16",
             "LongStorage": "i8", "IntStorage": "i4"}


class _Storage(Placeholder):
    """A persistent id: which zip member holds the bytes, their dtype and element count."""
    __slots__ = ("key", "code", "numel")

    def __init__(self, key, code, numel):
        self.key, self.code, self.numel = key, code, numel

    @property
    def itemsize(self):
        return 2 if self.code == "bf16" else int(self.code[1])

    def __repr__(self):
        return f"storage {self.key!r}"


class _Tensor(Placeholder):
    """`_rebuild_tensor_v2(...)`, checked to lie inside its storage."""
    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def __repr__(self):
        return f"tensor{self.shape}"


class _Dict(Placeholder):
    """`collections.OrderedDict()`. Unlike the other placeholders it takes SETITEMS, into a plain dict
    of its own (string or int keys, once each), and the `_metadata` attribute a state dict carries as
    BUILD state, which is dropped."""
    __slots__ = ("items",)

    def __init__(self):
        self.items = {}

    def __setitem__(self, key, value):
        if type(key) not in (str, int) or key in self.items:
            raise RefusedPickle(f"OrderedDict key {describe(key)} is not a new string or integer")
        self.items[key] = value

    def __setstate__(self, state):
        if type(state) is not dict or set(state) - {"_metadata"}:
            raise RefusedPickle(f"OrderedDict state {describe(state)} is not a state dict's _metadata")

    def __repr__(self):
        return "OrderedDict"


def _ints(values, what, high):
    if type(values) is not tuple or len(values) > 8 or any(type(v) is not int or not 0 <= v <= high for v in values):
        raise RefusedPickle(f"bad {what} {describe(values)}")
    return values


def _rebuild_tensor(storage, offset, shape, stride, requires_grad, hooks, metadata=None):
    if not isinstance(storage, _Storage):
        raise RefusedPickle(f"expected a storage, got {describe(storage)}")
    (offset,) = _ints((offset,), "storage offset", MAX_TENSOR_ELEMENTS)
    shape = _ints(shape, "size", MAX_TENSOR_ELEMENTS)
    stride = _ints(stride, "stride", MAX_TENSOR_ELEMENTS)
    if len(stride) != len(shape) or type(requires_grad) is not bool:
        raise RefusedPickle(f"bad size/stride/requires_grad {describe((shape, stride, requires_grad))}")
    if not isinstance(hooks, _Dict) or hooks.items or metadata not in (None, {}):
        raise RefusedPickle("a tensor with backward hooks or metadata (conjugate/negative bit) is not supported")
    count = math.prod(shape)
    if count > MAX_TENSOR_ELEMENTS:
        raise RefusedPickle(f"tensor of size {shape} has more than {MAX_TENSOR_ELEMENTS} elements")
    end = offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1 if count else 0
    if end > storage.numel:
        raise RefusedPickle(f"tensor of size {shape}, stride {stride}, offset {offset} needs {end} elements, "
                            f"its {storage!r} has {storage.numel}")
    if count and not _dense(shape, stride):
        # Overlapping elements (a stride of 0 repeats one value 2**30 times) or gaps: a state dict's
        # parameters are dense, and only dense tensors have as many distinct values as elements.
        raise RefusedPickle(f"tensor of size {shape} with stride {stride} is not a dense layout")
    return _Tensor(storage, offset, shape, stride)


def _dense(shape, stride):
    """Whether the elements of a tensor (size, stride) tile a block of memory exactly once, in any
    order of the dimensions (a transposed tensor is dense too)."""
    expected = 1
    for step, size in sorted((s, n) for n, s in zip(shape, stride) if n > 1):
        if step != expected:
            return False
        expected *= size
    return True


def _rebuild_parameter(data, requires_grad, hooks):
    if not isinstance(data, _Tensor):
        raise RefusedPickle(f"expected a tensor, got {describe(data)}")
    return data


_TORCH_GLOBALS = {
    ("collections", "OrderedDict"): _Dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): None for name in _STORAGES},  # named by persistent ids, never called
}


def _persistent_loader(storages):
    """`persistent_load` for torch's storage ids; the same key always names the same storage."""
    def load(pid):
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise RefusedPickle(f"unknown persistent id {describe(pid)}")
        _, kind, key, location, numel = pid
        code = _STORAGES.get(kind.qualname.removeprefix("torch.")) if isinstance(kind, Global) else None
        if code is None or not kind.qualname.startswith("torch."):
            raise RefusedPickle(f"unknown storage type {describe(kind)}")
        if type(key) is not str or not 0 < len(key) <= 64 or type(location) is not str:
            raise RefusedPickle(f"bad storage key/location {describe((key, location))}")
        (numel,) = _ints((numel,), "storage size", MAX_TENSOR_ELEMENTS)
        storage = _Storage(key, code, numel)
        known = storages.setdefault(key, storage)
        if (known.code, known.numel) != (storage.code, storage.numel):
            raise RefusedPickle(f"{storage!r} is named with two types or sizes")
        return known
    return load


def _check_member(info, path, size=None, limit=None):
    """A member's declared size against what the tensors need, the limit and the compression ratio,
    before anything is read or decompressed."""
    if size is not None and info.file_size != size:
        raise ArcFaceError(f"{path}: {info.filename} holds {info.file_size} bytes, the tensors need {size}")
    if limit is not None and info.file_size > limit:
        raise ArcFaceError(f"{path}: {info.filename} is {info.file_size} bytes, more than the {limit} allowed")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_COMPRESSION * max(info.compress_size, 1):
        raise ArcFaceError(f"{path}: {info.filename} expands {info.file_size / max(info.compress_size, 1):.0f} "
                           f"times (a zip bomb?); refusing to decompress it")


def _member(zf, info, path, size=None, limit=None):
    """A member's bytes, checked (`_check_member`) before anything is decompressed."""
    _check_member(info, path, size, limit)
    with zf.open(info) as member:
        data = member.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise ArcFaceError(f"{path}: {info.filename} is damaged ({len(data)} bytes, {info.file_size} declared)")
    return data


def _array(tensor, raw, byteorder):
    """The tensor's values from its storage's bytes (bounds were checked when it was unpickled)."""
    storage = tensor.storage
    code = "u2" if storage.code == "bf16" else storage.code
    flat = np.frombuffer(raw, dtype=np.dtype(byteorder + code), count=storage.numel)
    if not math.prod(tensor.shape):
        values = np.zeros(tensor.shape, flat.dtype)
    else:
        values = np.lib.stride_tricks.as_strided(flat[tensor.offset:], tensor.shape,
                                                 [s * flat.itemsize for s in tensor.stride], writeable=False)
    if storage.code == "bf16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32 if storage.code[0] == "f" else np.int64)


def _state_dict(obj, path):
    """The name -> tensor entries of a state dict, or of an arcface_torch training checkpoint's
    `state_dict_backbone`; a DataParallel `module.` prefix is dropped."""
    if type(obj) is dict and "state_dict_backbone" in obj:
        obj = obj["state_dict_backbone"]
    if not isinstance(obj, _Dict):
        raise ArcFaceError(f"{path}: holds a {describe(obj)}, not a state dict (save one with "
                           f"torch.save(model.state_dict(), path))")
    entries = obj.items
    if entries and all(type(k) is str and k.startswith("module.") for k in entries):
        entries = {k[len("module."):]: v for k, v in entries.items()}
    for key, value in entries.items():
        if type(key) is not str or not isinstance(value, _Tensor):
            raise ArcFaceError(f"{path}: state dict entry {describe(key)} is a {describe(value)}, not a tensor")
    return {k: v for k, v in entries.items() if not k.endswith("num_batches_tracked")}


def read_torch(path, inspect=None):
    """{name: float32 array} of a PyTorch state dict file (zip format, torch >= 1.6). `inspect`, given
    {name: shape}, is called before any tensor's bytes are read (to refuse a model by its shapes)."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head == _LEGACY_MAGIC:
        raise ArcFaceError(f"{path}: a PyTorch file in the legacy (torch < 1.6) format, which is not supported; "
                           f"re-save it with torch >= 1.6: torch.save(torch.load(f), f)")
    if not head.startswith(b"PK\x03\x04"):
        raise ArcFaceError(f"{path}: not a PyTorch checkpoint (a zip written by torch.save) nor an .onnx model")
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_zip(zf, path, inspect)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, RuntimeError, ValueError) as exc:
        raise ArcFaceError(f"{path}: damaged zip file ({type(exc).__name__}: {exc})") from None


def _read_zip(zf, path, inspect=None):
    members = {info.filename: info for info in zf.infolist()}
    archive = next(iter(members), "").partition("/")[0]  # torch names every member <archive>/...
    pkl = members.get(f"{archive}/data.pkl")
    if pkl is None:
        raise ArcFaceError(f"{path}: a zip without <archive>/data.pkl, not written by torch.save")
    if f"{archive}/constants.pkl" in members:
        raise ArcFaceError(f"{path}: a TorchScript archive; save the model's state_dict with torch.save instead")
    byteorder = "<"
    if f"{archive}/byteorder" in members:
        mark = _member(zf, members[f"{archive}/byteorder"], path, limit=16)
        if mark not in (b"little", b"big"):
            raise ArcFaceError(f"{path}: unknown byte order {describe(mark)}")
        byteorder = "<" if mark == b"little" else ">"
    storages = {}
    try:
        obj = safe_load(io.BytesIO(_member(zf, pkl, path, limit=MAX_PICKLE_BYTES)), _TORCH_GLOBALS,
                        persistent_load=_persistent_loader(storages))
    except RefusedPickle as exc:
        raise ArcFaceError(f"{path}: refusing to load: {exc}") from None
    except Exception as exc:  # truncated or garbage pickles raise many exception types
        raise ArcFaceError(f"{path}: damaged data.pkl ({type(exc).__name__}: {exc})") from None
    tensors = _state_dict(obj, path)
    used = {t.storage.key: t.storage for t in tensors.values()}
    # Both what is read (the storages) and what is built (every tensor as float32) are bounded.
    total = max(sum(s.numel * s.itemsize for s in used.values()), 4 * sum(math.prod(t.shape) for t in tensors.values()))
    if total > MAX_TOTAL_BYTES:
        raise ArcFaceError(f"{path}: its tensors claim {total} bytes, more than the {MAX_TOTAL_BYTES} allowed")
    infos = {}
    for key, storage in used.items():
        infos[key] = members.get(f"{archive}/data/{key}")
        if infos[key] is None:
            raise ArcFaceError(f"{path}: no member {archive}/data/{key} for {storage!r}")
        _check_member(infos[key], path, size=storage.numel * storage.itemsize)
    if inspect is not None:
        inspect({name: t.shape for name, t in tensors.items()})
    raw = {key: _member(zf, infos[key], path, size=storage.numel * storage.itemsize) for key, storage in used.items()}
    return {name: _array(t, raw[t.storage.key], byteorder) for name, t in tensors.items()}


def _names(names, count=4):
    names = list(names)
    return ", ".join(names[:count]) + (f", ... ({len(names)} in all)" if len(names) > count else "")


def identify_torch(shapes, network=None):
    """The insightface backbone a state dict holds, from its names and shapes ({name: shape}),
    confirmed against `network` when given."""
    if "patch_embed.proj.weight" in shapes:
        return _confirm(_identify_vit(shapes), network)
    if "conv_sep.layers.0.weight" in shapes:
        return _confirm(_identify_mbf(shapes), network)
    if "conv1.weight" in shapes and "fc.weight" in shapes:
        return _confirm(_identify_iresnet(shapes), network)
    raise ArcFaceError(f"not an insightface iresnet, mbf or ViT state dict (its keys: {_names(shapes)})")


def _dim(shapes, name):
    """The first dimension of tensor `name`, which identifying the network needs."""
    if name not in shapes or not shapes[name]:
        raise ArcFaceError(f"the state dict lacks {name} (its keys: {_names(shapes)})")
    return shapes[name][0]


def _count(shapes, pattern):
    """Per group(1) of `pattern`, 1 + the largest group(2) (block indices) among the names."""
    counts = {}
    for name in shapes:
        match = re.match(pattern, name)
        if match:
            counts[match.group(1)] = max(counts.get(match.group(1), 0), int(match.group(2)) + 1)
    return counts


def _identify_iresnet(shapes):
    from src.models.iresnet import IRESNET_LAYERS
    counts = _count(shapes, r"layer([1-4])\.(\d{1,6})\.")
    depths = tuple(counts.get(str(stage), 0) for stage in (1, 2, 3, 4))
    names = [name for name, layers in IRESNET_LAYERS.items() if layers == depths]
    if not names:
        raise ArcFaceError(f"an iresnet with stage depths {depths}, which is none of {', '.join(IRESNETS)}")
    return Model(names[0], _dim(shapes, "conv1.weight"), _dim(shapes, "fc.weight"), f"stage depths {depths}")


def _identify_mbf(shapes):
    residual = _count(shapes, r"layers\.([1357])\.layers\.(\d{1,6})\.layers\.")
    blocks = (residual.get("1", 1), residual.get("3", 0), residual.get("5", 0), residual.get("7", 0))
    scale = _dim(shapes, "layers.0.layers.0.weight") // 64
    if blocks != (1, 4, 6, 2) or scale != 2:
        raise ArcFaceError(f"a MobileFaceNet with blocks {blocks} and scale {scale}; only mbf (blocks (1, 4, 6, 2), "
                           f"scale 2) is supported")
    return Model("mbf", 64, _dim(shapes, "features.layers.3.weight"), "blocks (1, 4, 6, 2), scale 2")


def _vit_width(name, embed_dim):
    """The width at which ViT `name` has `embed_dim`, or None."""
    from src.models.vit import scaled_embed_dim
    width, rest = divmod(embed_dim * 64, VIT_EMBED_DIMS[name])
    return width if not rest and width and scaled_embed_dim(name, width) == embed_dim else None


def _identify_vit(shapes):
    from src.models.vit import VIT_CONFIGS
    embed_dim = _dim(shapes, "patch_embed.proj.weight")
    depth = _count(shapes, r"(blocks)\.(\d{1,6})\.").get("blocks", 0)
    fits = [name for name in VITS if VIT_CONFIGS[name].depth == depth and _vit_width(name, embed_dim)]
    if not fits:
        raise ArcFaceError(f"a ViT of depth {depth} and embedding dimension {embed_dim}, which is none of "
                           f"{', '.join(VITS)} at any width")
    name = next((n for n in fits if _vit_width(n, embed_dim) == 64), fits[0])  # the published size first
    return Model(name, _vit_width(name, embed_dim), _dim(shapes, "feature.3.weight"),
                 f"depth {depth}, embedding dimension {embed_dim}")


def _confirm(found, network):
    """`found`, or `network` when it names the same architecture (the ViT variants differ only in
    their training options, so any of the same size is accepted and recorded)."""
    if network is None:
        return found
    key = canonical_name(network)
    if key == found.network:
        return found
    if found.network in VITS and key in VITS and VIT_EMBED_DIMS[key] == VIT_EMBED_DIMS[found.network]:
        from src.models.vit import VIT_CONFIGS
        if VIT_CONFIGS[key].depth == VIT_CONFIGS[found.network].depth:
            return Model(key, found.width, found.num_features, found.detail)
    raise ArcFaceError(f"holds {found.network} ({found.detail}), not {key} as --network says")


# Module paths that differ from ours (insightface's GDC is one Sequential, ours has named cells).
_PREFIXES = {"mbf": (("features.layers.0.", "features.conv."), ("features.layers.2.", "features.linear."),
                     ("features.layers.3.", "features.bn."))}
# Our spelling of a parameter name's last part; which one applies depends on the layer type.
_SUFFIXES = {"weight": ("weight", "gamma", "w"), "bias": ("bias", "beta"), "running_mean": ("moving_mean",),
             "running_var": ("moving_variance",)}


def _our_name(name, ours, prefixes):
    """Our parameter for a PyTorch one, or None: the same module path (after `prefixes`) with the
    last part spelled as our layer of that path spells it."""
    for theirs, mine in prefixes:
        if name.startswith(theirs):
            name = mine + name[len(theirs):]
    path, dot, last = name.rpartition(".")
    hits = [path + dot + suffix for suffix in _SUFFIXES.get(last, (last,)) if path + dot + suffix in ours]
    return hits[0] if len(hits) == 1 else None


def map_torch(tensors, model, source="the source"):
    """{our name: value} for a state dict's {name: value}; every name and shape must match."""
    ours = template(model)
    mapped, unexpected = {}, []
    for name, value in tensors.items():
        target = _our_name(name, ours, _PREFIXES.get(model.network, ()))
        if target is None or target in mapped:
            unexpected.append(name)
        else:
            mapped[target] = value
    _check(mapped, unexpected, model, ours, source)
    return {name: mapped[name] for name in ours}


def _check(params, unexpected, model, ours, source):
    missing = [name for name in ours if name not in params]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing: {_names(missing)}"] if missing else []) + \
                ([f"{len(unexpected)} unexpected: {_names(unexpected)}"] if unexpected else [])
        raise ArcFaceError(f"{source} does not hold exactly the parameters of {model.network}: {'; '.join(parts)}")
    wrong = [f"{name} {tuple(np.shape(params[name]))} there, {shape} here" for name, shape in ours.items()
             if tuple(np.shape(params[name])) != shape]
    if wrong:
        raise ArcFaceError(f"{source} does not fit {model.network} (width {model.width}, {model.num_features} "
                           f"features): {len(wrong)} shape(s) differ, e.g. {'; '.join(wrong[:3])}")


def template(model):
    """{name: shape} of our backbone's parameters, in order, built without allocating its weights."""
    from mindspore.nn.utils import no_init_parameters

    from src.models import get_backbone
    with no_init_parameters():
        net = get_backbone(model.network, num_features=model.num_features, width=model.width)
    return {p.name: tuple(p.shape) for p in net.get_parameters()}


# ---------------------------------------------------------------- ONNX models

class _Unmapped(Exception):
    """The graph does not have the structure of one of our backbones."""


# Nodes that only change the shape: followed through between layers (Flatten before the Gemm,
# the Reshapes around a 1-D BatchNorm) and folded when they act on weights (Unsqueeze on a slope).
_SHAPE_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout"}
# What computes a Reshape's target from a tensor's shape, as `x.view(x.size(0), -1)` exports with a
# dynamic batch: Shape -> Gather -> Unsqueeze -> Concat. Shape nodes are not counted as consumers.
_SHAPE_ARITHMETIC = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Identity"}


class _Graph:
    """An ONNX graph walked layer by layer; every node must be used exactly once."""

    def __init__(self, graph):
        self.consts = {t.name: _to_array(t) for t in graph.initializer}
        self.nodes, self.used, self.consumers, self.producers = [], set(), {}, {}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = _to_array(node.attribute[0].t)
            elif node.op_type in _SHAPE_OPS and node.input and node.input[0] in self.consts:
                self.consts[node.output[0]] = self.consts[node.input[0]]  # the values are what matters
            else:
                self.nodes.append(node)
                self.producers.update((name, node) for name in node.output)
                for name in node.input if node.op_type != "Shape" else ():
                    self.consumers.setdefault(name, []).append(node)
        inputs = [value for value in graph.input if value.name not in self.consts]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise _Unmapped(f"{len(inputs)} inputs and {len(graph.output)} outputs, not one of each")
        dims = [d.dim_value or None for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) != 4 or any(d not in (None, want) for d, want in zip(dims[1:], (3, 112, 112))):
            raise _Unmapped(f"its input has shape {dims}, not (batch, 3, 112, 112)")
        self.input, self.output = inputs[0].name, graph.output[0].name

    def follow(self, x):
        """`x` after the shape-only nodes that are its only consumer."""
        seen = {x}
        while len(users := self.consumers.get(x, [])) == 1 and users[0].op_type in _SHAPE_OPS:
            if users[0].output[0] in seen:  # cycles are refused up front; never loop on one regardless
                raise _Unmapped(f"the graph has a cycle through {x!r}")
            seen.add(users[0].output[0])
            self.used.add(id(users[0]))
            todo = list(users[0].input[1:])  # a computed target shape: the nodes computing it
            while todo:
                node = self.producers.get(todo.pop())
                if node is not None and node.op_type in _SHAPE_ARITHMETIC and id(node) not in self.used:
                    self.used.add(id(node))
                    todo += [] if node.op_type == "Shape" else list(node.input)
            x = users[0].output[0]
        return x

    def peek(self, x, *ops):
        found = [n for n in self.consumers.get(x, []) if n.op_type in ops and id(n) not in self.used]
        return found[0] if len(found) == 1 else None

    def take(self, x, *ops):
        """The one unused node of type `ops` that consumes `x` (after shape-only nodes)."""
        x = self.follow(x)
        node = self.peek(x, *ops)
        if node is None:
            found = sorted(n.op_type for n in self.consumers.get(x, []) if id(n) not in self.used)
            raise _Unmapped(f"expected {'/'.join(ops)} after {x!r}, found {', '.join(found) or 'nothing'}")
        self.used.add(id(node))
        return node

    def const(self, node, index):
        if len(node.input) <= index or not node.input[index]:
            return None
        if node.input[index] not in self.consts:
            raise _Unmapped(f"{node.op_type} {node.name!r} takes a computed {node.input[index]!r}, not a weight")
        return self.consts[node.input[index]].astype(np.float32)

    @staticmethod
    def attrs(node):
        from onnx import helper
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def conv(self, x, stride, pad, group=1):
        """(output, weight, bias or None) of the convolution on `x`; group None = depthwise."""
        node = self.take(x, "Conv")
        weight, bias, a = self.const(node, 1), self.const(node, 2), self.attrs(node)
        if weight is None or weight.ndim != 4:
            raise _Unmapped(f"Conv {node.name!r} has a weight of shape {np.shape(weight)}, not a 2-D kernel")
        auto_pad = a.get("auto_pad", b"NOTSET")
        if auto_pad not in (b"NOTSET", b"VALID"):
            raise _Unmapped(f"Conv {node.name!r} pads {auto_pad.decode()}")
        pads = [0] * 4 if auto_pad == b"VALID" else list(a.get("pads", [0] * 4))
        got = (list(a.get("strides", [1, 1])), pads, a.get("group", 1), list(a.get("dilations", [1, 1])))
        want = ([stride] * 2, [pad] * 4, weight.shape[0] if group is None else group, [1, 1])
        if got != want:
            raise _Unmapped(f"Conv {node.name!r} has strides, pads, group, dilations {got}; expected {want}")
        return node.output[0], weight, bias

    def batchnorm(self, x, params, prefix, bias=None, channels=None):
        """Our BatchNorm `prefix` from the BatchNormalization on `x`, with the preceding layer's
        `bias` moved into its mean; with `channels` the BatchNorm may be absent (folded into the
        layer before): then it is the identity shifted by `bias`."""
        from src.models.iresnet import BN_EPS
        y = self.follow(x)
        users = self.consumers.get(y, [])
        if channels is not None and not (len(users) == 1 and users[0].op_type == "BatchNormalization"):
            shift = np.zeros(channels, np.float32) if bias is None else bias.reshape(-1)
            gamma, beta, mean, var = np.ones_like(shift), shift, np.zeros_like(shift), np.full_like(shift, 1 - BN_EPS)
        else:
            node = self.take(y, "BatchNormalization")
            gamma, beta, mean, var = (self.const(node, i) for i in range(1, 5))
            if bias is not None:
                mean = mean - bias.reshape(-1)
            eps = self.attrs(node).get("epsilon", 1e-5)
            if not math.isclose(eps, BN_EPS, rel_tol=1e-5):  # our eps is fixed: express theirs exactly
                gamma, var = gamma / np.sqrt(var + eps), np.full_like(var, 1 - BN_EPS)
            y = node.output[0]
        params.update({f"{prefix}.gamma": gamma, f"{prefix}.beta": beta, f"{prefix}.moving_mean": mean,
                       f"{prefix}.moving_variance": var})
        return y

    def prelu(self, x, params, name, channels):
        node = self.take(x, "PRelu")
        slope = self.const(node, 1).reshape(-1)
        params[name] = np.broadcast_to(slope, (channels,)).copy() if slope.size == 1 else slope
        return node.output[0]

    def dense(self, x):
        """(output, weight (out, in), bias or None) of a Gemm, or a MatMul with an optional Add."""
        node = self.take(x, "Gemm", "MatMul")
        weight, bias = self.const(node, 1), self.const(node, 2)
        if weight is None or weight.ndim != 2:
            raise _Unmapped(f"{node.op_type} {node.name!r} has a weight of shape {np.shape(weight)}, not a matrix")
        if node.op_type == "Gemm":
            a = self.attrs(node)
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise _Unmapped(f"Gemm {node.name!r} scales or transposes its input")
            return node.output[0], weight if a.get("transB", 0) else weight.T, bias
        out, add = node.output[0], self.peek(node.output[0], "Add")
        if add is not None and len(self.consumers[out]) == 1:
            other = add.input[1] if add.input[0] == out else add.input[0]
            if other in self.consts:
                self.used.add(id(add))
                return add.output[0], weight.T, self.consts[other].astype(np.float32)
        return out, weight.T, None

    def add(self, a, b):
        node = self.take(a, "Add")
        if sorted(node.input) != sorted({self.follow(a), self.follow(b)}):
            raise _Unmapped(f"Add {node.name!r} does not join a block with its shortcut")
        return node.output[0]

    def finish(self, y):
        y = self.follow(y)
        if y != self.output:
            raise _Unmapped(f"the backbone ends at {y!r}, the graph's output is {self.output!r}")
        rest = [n for n in self.nodes if id(n) not in self.used]
        if rest:
            raise _Unmapped(f"{len(rest)} node(s) are not part of the backbone, e.g. {rest[0].op_type} "
                            f"{rest[0].name!r}")


def _onnx_iresnet(g):
    from src.models.iresnet import IRESNET_LAYERS
    p = {}
    x, weight, bias = g.conv(g.input, 1, 1)
    p["conv1.weight"], width = weight, weight.shape[0]
    x = g.prelu(g.batchnorm(x, p, "bn1", bias, width), p, "prelu.w", width)
    depths = []
    while (bn := g.peek(g.follow(x), "BatchNormalization")) and g.peek(g.follow(bn.output[0]), "Conv"):
        down = g.peek(x, "Conv") is not None  # the first block of every stage has a strided 1x1 shortcut
        if down:
            depths.append(0)
        elif not depths:
            raise _Unmapped("the first block has no downsampling shortcut")
        block = f"layer{len(depths)}.{depths[-1]}"
        depths[-1] += 1
        y = g.batchnorm(x, p, f"{block}.bn1")
        y, p[f"{block}.conv1.weight"], bias = g.conv(y, 1, 1)
        channels = p[f"{block}.conv1.weight"].shape[0]
        y = g.prelu(g.batchnorm(y, p, f"{block}.bn2", bias, channels), p, f"{block}.prelu.w", channels)
        y, p[f"{block}.conv2.weight"], bias = g.conv(y, 2 if down else 1, 1)
        y = g.batchnorm(y, p, f"{block}.bn3", bias, channels)
        shortcut = x
        if down:
            shortcut, p[f"{block}.downsample.0.weight"], bias = g.conv(x, 2, 0)
            shortcut = g.batchnorm(shortcut, p, f"{block}.downsample.1", bias, channels)
        x = g.add(y, shortcut)
    names = [name for name, layers in IRESNET_LAYERS.items() if layers == tuple(depths)]
    if not names:
        raise _Unmapped(f"an iresnet with stage depths {tuple(depths)}, which is none of {', '.join(IRESNETS)}")
    x = g.batchnorm(x, p, "bn2")
    y, p["fc.weight"], bias = g.dense(x)
    p["fc.bias"] = np.zeros(p["fc.weight"].shape[0], np.float32) if bias is None else bias.reshape(-1)
    g.finish(g.batchnorm(y, p, "features", channels=p["fc.weight"].shape[0]))
    return Model(names[0], width, p["fc.weight"].shape[0], f"stage depths {tuple(depths)}"), p


def _onnx_mbf(g):
    p = {}

    def conv_block(x, prefix, stride, pad, group=1, act=True):
        y, p[f"{prefix}.layers.0.weight"], bias = g.conv(x, stride, pad, group)
        channels = p[f"{prefix}.layers.0.weight"].shape[0]
        y = g.batchnorm(y, p, f"{prefix}.layers.1", bias, channels)
        return g.prelu(y, p, f"{prefix}.layers.2.w", channels) if act else y

    def depthwise(x, prefix, stride):
        y = conv_block(x, f"{prefix}.layers.0", 1, 0)
        y = conv_block(y, f"{prefix}.layers.1", stride, 1, group=None)
        return conv_block(y, f"{prefix}.layers.2", 1, 0, act=False)

    def residual(x, prefix):
        count = 0
        while g.peek(x, "Add") is not None:
            x = g.add(depthwise(x, f"{prefix}.layers.{count}", 1), x)
            count += 1
        return x, count

    x = conv_block(g.input, "layers.0", 2, 1)
    x = conv_block(x, "layers.1", 1, 1, group=64)
    counts = []
    for stage in (2, 4, 6):
        x, count = residual(depthwise(x, f"layers.{stage}", 2), f"layers.{stage + 1}")
        counts.append(count)
    if counts != [4, 6, 2]:
        raise _Unmapped(f"a MobileFaceNet with residual blocks {counts}; our mbf has [4, 6, 2]")
    x = conv_block(x, "conv_sep", 1, 0)
    x = conv_block(x, "features.conv", 1, 0, group=None, act=False)
    y, p["features.linear.weight"], bias = g.dense(x)
    num_features = p["features.linear.weight"].shape[0]
    g.finish(g.batchnorm(y, p, "features.bn", bias, num_features))
    return Model("mbf", 64, num_features, "blocks (1, 4, 6, 2), scale 2"), p


def _graph_tensors(graph):
    """Every TensorProto a graph holds: initializers, sparse initializers, the tensors of node
    attributes (Constant values and others), and those of subgraphs, at any depth."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes):
    for node in nodes:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sparse in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _graph_tensors(sub)


def _refuse_external_data(model, path):
    """A tensor may name a file whose bytes become its values (ONNX external data, resolved against
    the current folder by onnx's helpers): never read one, wherever it sits in the model."""
    from onnx import TensorProto
    tensors = list(_graph_tensors(model.graph)) + list(_node_tensors(n for f in model.functions for n in f.node))
    for tensor in tensors:
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
            where = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise ArcFaceError(f"{path}: tensor {tensor.name!r} keeps its values in an external data file "
                               f"({where[:100]!r}), which this import does not read")


def _acyclic(nodes):
    """Whether the nodes form a directed acyclic graph (Kahn's algorithm over producer -> consumer)."""
    nodes = list(nodes)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    consumers, waiting = [[] for _ in nodes], [0] * len(nodes)
    for j, node in enumerate(nodes):
        for name in set(node.input):
            if name in producer:
                consumers[producer[name]].append(j)
                waiting[j] += 1
    ready = [j for j, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:
        done += 1
        for j in consumers[ready.pop()]:
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    return done == len(nodes)


def _to_array(tensor):
    """A TensorProto's values; a tensor onnx cannot decode (an undefined or unknown type, data that
    does not fit its shape) is a damaged model."""
    from onnx import numpy_helper
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # onnx raises ValueError, TypeError, KeyError, ... for such tensors
        raise ValueError(f"tensor {tensor.name!r}: {type(exc).__name__}: {str(exc)[:200]}") from None


def read_onnx(path):
    """(Model, {our name: array}) of an insightface recognition ONNX file whose graph maps onto one of
    our iresnets or mbf. External data is refused before any tensor is read, and a graph with a cycle
    before it is walked."""
    import onnx
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises its own types
        raise ArcFaceError(f"{path}: cannot read the ONNX model ({type(exc).__name__}: {exc})") from None
    _refuse_external_data(model, path)
    if not _acyclic(model.graph.node):
        raise ArcFaceError(f"{path}: not a valid ONNX model (its graph has a cycle)")
    try:
        g = _Graph(model.graph)
        stem = g.peek(g.input, "Conv")
        if stem is None:
            found = ", ".join(n.op_type for n in g.consumers.get(g.input, [])) or "nothing"
            raise _Unmapped(f"the input goes into {found}, not a convolution; a graph that normalises its input "
                            f"itself takes raw pixels: add --input_mean 0 --input_std 1 to eval_onnx.py")
        return _onnx_mbf(g) if (g.attrs(stem).get("strides") or [1])[0] == 2 else _onnx_iresnet(g)
    except _Unmapped as exc:
        raise ArcFaceError(f"{path}: this ONNX graph does not map onto our iresnets or mbf ({exc}); it can still be "
                           f"evaluated as it is: python eval_onnx.py --eval_url EVAL_DIR --onnx_url {path}") from None
    except ValueError as exc:  # a weight whose data does not fit its shape
        raise ArcFaceError(f"{path}: damaged ONNX model ({exc})") from None


# ---------------------------------------------------------------- the conversion

def convert(source, output, network=None):
    """Write `output` (.ckpt): our backbone with the weights of `source` (.pth/.pt or .onnx) and the
    meta `network`, `width`, `num_features`, `source`. Returns the Model."""
    if not os.path.isfile(source):
        raise ArcFaceError(f"source not found: {source}")
    if not output.endswith(".ckpt"):
        raise ArcFaceError(f"{output}: the output's name must end with .ckpt")
    onnx = source.lower().endswith(".onnx")
    found = {}

    def identify(shapes):
        try:
            found["model"] = identify_torch(shapes, network)
        except ArcFaceError as exc:
            raise ArcFaceError(f"{source}: {exc}") from None

    if onnx:
        found["model"], params = read_onnx(source)
    else:
        tensors = read_torch(source, inspect=identify)
    try:
        model = _confirm(found["model"], network) if onnx else found["model"]
    except ArcFaceError as exc:
        raise ArcFaceError(f"{source}: {exc}") from None
    if onnx:
        ours = template(model)
        _check(params, [], model, ours, source)
        params, kind = {name: params[name] for name in ours}, "insightface ONNX"
    else:
        params, kind = map_torch(tensors, model, source), "PyTorch state dict"
    bad = [name for name, value in params.items() if not np.isfinite(value).all()]
    if bad:
        raise ArcFaceError(f"{source}: {len(bad)} tensor(s) hold NaN/Inf, e.g. {bad[0]}")
    _save(params, model, output, f"{kind} {os.path.abspath(source)}")
    return model


def _save(params, model, output, source):
    import mindspore as ms

    from src.checkpoint import save_checkpoint_atomic
    entries = [{"name": name, "data": ms.Tensor(np.ascontiguousarray(value, np.float32))}
               for name, value in params.items()]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    save_checkpoint_atomic(entries, output, {"network": model.network, "width": int(model.width),
                                             "num_features": int(model.num_features), "source": source})
