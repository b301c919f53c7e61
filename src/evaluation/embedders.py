"""Embedders, and the one way to open a model.

An embedder is a callable mapping a float32 NCHW batch normalised to [-1, 1] to (batch, D) embeddings;
the evaluation protocols take any embedder, so MindSpore networks, exported models and precomputed
features all go through the same verification and IJB code.

`open_model(path, backend, ...)` opens any model a door is given. What a model is (its kind) comes from
the path: a checkpoint (`.ckpt`, or a training folder: its newest readable checkpoint), a `.mindir` or an
`.onnx` file. What runs it (the backend) is a value: OPENERS lists which backend can run which kind,
and `auto` picks for the kind and the device. A checkpoint runs in MindSpore, or in ONNX Runtime through
its export, made once and cached next to it (`.onnx-cache/`); a MINDIR runs in MindSpore only, an ONNX
file in ONNX Runtime only. Options that do not apply to a model's kind are refused, never ignored.

The export cache is checked, not trusted: an export's name holds the hash of the checkpoint bytes it was
made from, the export is made from exactly those bytes (a private copy written while hashing, loaded in
a fresh process), and the hash is stored inside the export (ONNX metadata_props) and compared on every
reuse. So a checkpoint replaced while it is read (best.ckpt rewritten by a running training), a folder
copied with another checkpoint's export in its cache, or a truncated or unloadable export are each
exported again, never served.

Training gets an embedder factory (`embedder_factory`): backbone -> embedder of its current weights.
"""
import functools
import glob
import hashlib
import os
import sys
from dataclasses import dataclass

import numpy as np

from src.cli import BACKENDS
from src.deploy.exporting import export_in_fresh_process
from src.errors import ArcFaceError
from src.files import atomic_path, temporary_name
from src.models import backbone_from_checkpoint

# Part of every cache key: raise it when the export changes, so that no older export is reused.
# 2: exports carry the key in their metadata_props.
ONNX_EXPORT_VERSION = 2
STAMP = "arcface_export_key"  # the metadata entry of a cached export holding its key
KINDS = {".ckpt": "checkpoint", ".mindir": "mindir", ".onnx": "onnx"}
KIND_NAMES = {"checkpoint": "a checkpoint", "mindir": "a MINDIR model", "onnx": "an ONNX model"}
MODEL_TYPES = "a .ckpt checkpoint, a training folder, a .mindir or an .onnx file"


def _stderr(line):
    print(line, file=sys.stderr)


# --- the embedders ----------------------------------------------------------------------------------

class MindSporeEmbedder:
    """A backbone in inference mode."""

    def __init__(self, backbone):
        import mindspore as ms
        self._tensor = ms.Tensor
        self.backbone = backbone
        self.backbone.set_train(False)

    def __call__(self, batch):
        return self.backbone(self._tensor(np.ascontiguousarray(batch, dtype=np.float32))).asnumpy()


class MindIREmbedder:
    """An exported MINDIR file run by MindSpore (nn.GraphCell)."""

    def __init__(self, path):
        import mindspore as ms
        if not os.path.isfile(path):
            raise ArcFaceError(f"MINDIR file not found: {path}")
        try:
            self.cell = ms.nn.GraphCell(ms.load(path))
        except (RuntimeError, ValueError) as exc:
            raise ArcFaceError(f"cannot load MINDIR {path}: {str(exc).splitlines()[0]}") from None
        self._tensor = ms.Tensor

    def __call__(self, batch):
        return self.cell(self._tensor(np.ascontiguousarray(batch, dtype=np.float32))).asnumpy()


class OnnxEmbedder:
    """An ONNX model run by ONNX Runtime. Works with our exports (symbolic batch, input `data`) and
    third-party ArcFace models: the input name and a fixed batch size are read from the model, and
    the model's own normalisation is applied as (pixel - input_mean) / input_std. `metadata` is the
    model's metadata_props."""

    def __init__(self, path, device_target="CPU", input_mean=127.5, input_std=127.5, log=None):
        import onnxruntime as ort
        if input_std <= 0:
            raise ArcFaceError(f"--input_std must be positive, got {input_std}")
        if not os.path.isfile(path):
            raise ArcFaceError(f"ONNX file not found: {path}")
        providers = ["CPUExecutionProvider"]
        if device_target == "GPU":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            elif log:
                log("warning: --device_target GPU but this onnxruntime has no CUDA provider "
                    "(install onnxruntime-gpu); running on the CPU")
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1  # all cores for one batch at a time
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ArcFaceError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0]}") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        shape = list(model_input.shape)
        if len(shape) != 4 or [d if isinstance(d, int) else None for d in shape[1:]] != [3, 112, 112]:
            raise ArcFaceError(f"{path}: the model input {self.input_name} has shape {shape}, "
                               f"expected (batch, 3, 112, 112)")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        # embed_pairs delivers (x - 127.5) / 127.5; re-normalise only when the model wants otherwise.
        self.scale = 127.5 / input_std
        self.shift = (127.5 - input_mean) / input_std
        self.renormalise = not (input_mean == 127.5 and input_std == 127.5)

    def __call__(self, batch):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.renormalise:
            batch = batch * self.scale + self.shift
        if self.fixed_batch is None or len(batch) == self.fixed_batch:
            return self.session.run(None, {self.input_name: batch})[0]
        outputs = []
        for start in range(0, len(batch), self.fixed_batch):
            chunk = batch[start:start + self.fixed_batch]
            rows = len(chunk)
            if rows < self.fixed_batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.fixed_batch - rows, axis=0)])
            outputs.append(self.session.run(None, {self.input_name: chunk})[0][:rows])
        return np.concatenate(outputs)


# --- opening a model --------------------------------------------------------------------------------

@dataclass
class Model:
    embed: object  # batch (B, 3, 112, 112) float32 in [-1, 1] -> (B, D)
    key: str       # the weights' files and the options that change embeddings, for caches of embeddings
    description: str = ""  # the model file and how it runs, for logs: "outputs/r100/ArcFace-25_1.ckpt (onnxruntime)"


@dataclass(frozen=True)
class Options:
    """How to open a model; an option left None is not given (it takes the model's own value)."""
    device_target: str = "CPU"
    device_id: int = 0
    network: str = None
    width: int = None
    num_features: int = None
    input_mean: float = None
    input_std: float = None
    cache_dir: str = None
    log: object = _stderr


_A_KIND = {"checkpoint": "a checkpoint", "mindir": "a MINDIR model", "onnx": "an ONNX model"}
_HOW_TO_EVALUATE = {
    "checkpoint": "evaluate it with python val.py --ckpt_url {path} (embed faces: python embed.py --model {path})",
    "onnx": "evaluate it with python eval_onnx.py --onnx_url {path} (embed faces: python embed.py --model {path})",
    "mindir": "embed faces with python embed.py --model {path}, or export the checkpoint it came from as ONNX and use "
              "eval_onnx.py",
}


def model_kind(path):
    """'checkpoint', 'mindir' or 'onnx', from what `path` is."""
    if not os.path.exists(path):
        raise ArcFaceError(f"model not found: {path}")
    if os.path.isdir(path):
        return "checkpoint"
    extension = os.path.splitext(path)[1].lower()
    kind = KINDS.get(extension)
    if kind is None:
        hint = ": import a PyTorch state dict with python convert.py first" if extension in (".pth", ".pt") else ""
        raise ArcFaceError(f"unknown model type: {path} (expected {MODEL_TYPES}){hint}")
    return kind


def onnxruntime_available():
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _mindspore_device(o):
    from src import runtime
    runtime.setup(o.device_target, o.device_id, distributed=False)


def _checkpoint_in_mindspore(path, o):
    _mindspore_device(o)
    return MindSporeEmbedder(backbone_from_checkpoint(path, o.network, o.width, o.num_features, log=o.log))


def _checkpoint_in_onnxruntime(path, o):
    from src.checkpoint import read_checkpoint_or_newest
    if os.path.isdir(path):
        path = read_checkpoint_or_newest(path, log=o.log)[0]
    elif not os.path.isfile(path):
        raise ArcFaceError(f"checkpoint not found: {path}")
    return cached_onnx_embedder(path, o)


def _mindir_in_mindspore(path, o):
    _mindspore_device(o)
    return MindIREmbedder(path)


def _onnx_in_onnxruntime(path, o):
    return OnnxEmbedder(path, o.device_target, 127.5 if o.input_mean is None else o.input_mean,
                        127.5 if o.input_std is None else o.input_std, log=o.log)


# Which backend runs which kind of model. A new way to run models is a new entry.
OPENERS = {
    ("checkpoint", "mindspore"): _checkpoint_in_mindspore,
    ("checkpoint", "onnxruntime"): _checkpoint_in_onnxruntime,
    ("mindir", "mindspore"): _mindir_in_mindspore,
    ("onnx", "onnxruntime"): _onnx_in_onnxruntime,
}


def resolve_backend(kind, backend, device_target):
    """The backend that runs a model of `kind`. 'auto': a checkpoint runs in ONNX Runtime on the CPU
    when it is installed (1.5-3x faster there than MindSpore's CPU kernels) and in MindSpore otherwise
    and on GPU/Ascend; a MINDIR in MindSpore, an ONNX file in ONNX Runtime: the only ones that can."""
    if backend not in BACKENDS:
        raise ArcFaceError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    runners = [b for k, b in OPENERS if k == kind]
    if backend == "auto":  # the only one that can, else ONNX Runtime where it is the faster (the CPU)
        faster = device_target == "CPU" and onnxruntime_available()
        backend = runners[0] if len(runners) == 1 else "onnxruntime" if faster else "mindspore"
    if backend not in runners:
        raise ArcFaceError(f"--backend {backend} cannot run {KIND_NAMES[kind]}; it runs with "
                           f"{' or '.join(runners)} (--backend auto)")
    if backend == "onnxruntime" and device_target == "Ascend":
        instead = "the .mindir or the checkpoint" if kind == "onnx" else "--backend mindspore (or auto)"
        raise ArcFaceError(f"ONNX models run with ONNX Runtime on CPU or GPU; on Ascend use {instead}")
    if backend == "onnxruntime" and not onnxruntime_available():
        raise ArcFaceError("--backend onnxruntime needs the onnxruntime package (pip install onnxruntime)")
    return backend


def _refuse_what_does_not_apply(kind, o):
    if kind != "onnx" and (o.input_mean is not None or o.input_std is not None):
        raise ArcFaceError("--input_mean/--input_std apply to ONNX models only")
    if kind != "checkpoint" and (o.network or o.width or o.num_features):
        raise ArcFaceError("--network/--width/--num_features apply to checkpoints only")


def _model_key(path, backend, o):
    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(glob.escape(path), "*.ckpt")))
    stamps = [f"{os.path.abspath(f)}:{os.path.getsize(f)}:{os.stat(f).st_mtime_ns}" for f in files]
    return ";".join(stamps + [f"{backend} {o.input_mean} {o.input_std} {o.network} {o.width} {o.num_features}"])


def open_model(path, backend="auto", kind=None, *, device_target="CPU", device_id=0, network=None, width=None,
               num_features=None, input_mean=None, input_std=None, cache_dir=None, log=None):
    """The one way to open a model: a Model(embed, key) for `path` run by `backend` (see OPENERS).

    `kind` is what the door takes ('checkpoint', 'mindir', 'onnx'; None: read from the path).
    network/width/num_features rebuild a checkpoint's backbone (default: as it records);
    input_mean/input_std are an ONNX model's pixel normalisation (default 127.5); `cache_dir` holds a
    checkpoint's ONNX export (default: `.onnx-cache/` next to it); `log` gets notes and warnings
    (default: stderr). Options that do not apply to the model are refused."""
    o = Options(device_target, device_id, network, width, num_features, input_mean, input_std, cache_dir,
                log or _stderr)
    if kind and os.path.isfile(path) and model_kind(path) != kind:
        raise ArcFaceError(f"{path} is {_A_KIND[model_kind(path)]}, not {_A_KIND[kind]}: "
                           f"{_HOW_TO_EVALUATE[model_kind(path)].format(path=path)}")
    kind = kind or model_kind(path)
    _refuse_what_does_not_apply(kind, o)
    backend = resolve_backend(kind, backend, device_target)
    key = _model_key(path, backend, o) if os.path.exists(path) else ""
    return Model(OPENERS[kind, backend](path, o), key, f"{_model_file(path)} ({backend})")


def _model_file(path):
    """The file a model path stands for: a training folder's newest checkpoint."""
    if os.path.isdir(path):
        from src.checkpoint import list_checkpoints
        found = list_checkpoints(path)
        return found[-1] if found else path
    return path


OPEN_OPTIONS = ("backend", "device_target", "device_id", "network", "width", "num_features", "input_mean",
                "input_std")


def model_from_args(args, path, kind=None, log=None):
    """open_model with the shared model/device options a door declared (src.cli.add_model_options)."""
    given = {name: getattr(args, name) for name in OPEN_OPTIONS if hasattr(args, name)}
    return open_model(path, kind=kind, log=log, **given)


# --- the verified ONNX export cache of checkpoints --------------------------------------------------

def _cache_folder(path, cache_dir):
    if cache_dir:
        return cache_dir
    folder = os.path.join(os.path.dirname(os.path.abspath(path)), ".onnx-cache")
    try:
        os.makedirs(folder, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "arcface-ms", "onnx")


def _new_digest(o):
    """The hash an export's key starts from: the export's version and the architecture options given."""
    options = {"network": o.network, "width": o.width, "num_features": o.num_features}
    return hashlib.sha256(f"{ONNX_EXPORT_VERSION} {sorted(options.items())}".encode())


def _read_blocks(path):
    try:
        with open(path, "rb") as fh:
            yield from iter(lambda: fh.read(1 << 20), b"")
    except OSError as exc:
        raise ArcFaceError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None


def export_key(path, o):
    """The cache key of checkpoint `path` as it is now: a hash of its bytes and the export options."""
    digest = _new_digest(o)
    for block in _read_blocks(path):
        digest.update(block)
    return digest.hexdigest()


def copy_with_key(path, copy, o):
    """Copy checkpoint `path` to `copy` and return the key of the bytes copied: one read, so the copy
    (what is exported) and the key (what the export is named and stamped by) cannot disagree."""
    digest = _new_digest(o)
    try:
        with open(copy, "wb") as out:
            for block in _read_blocks(path):
                digest.update(block)
                out.write(block)
    except OSError as exc:
        raise ArcFaceError(f"cannot copy {path} for its ONNX export to {copy}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _export_path(folder, stem, key):
    return os.path.join(folder, f"{stem}.{key[:20]}.onnx")


def _open_stamped(target, key, o):
    """(the embedder of a cached export, None), or (None, why it cannot be used)."""
    try:
        embedder = OnnxEmbedder(target, o.device_target, log=o.log)
    except ArcFaceError as exc:
        return None, str(exc)
    if embedder.metadata.get(STAMP) != key:
        return None, f"{target} was not made from this checkpoint's bytes"
    return embedder, None


def cached_onnx_embedder(path, o, announce=True):
    """ONNX Runtime on the export of checkpoint file `path`, made on first use (in a fresh process,
    from a private copy of the bytes its key hashes) and checked against the checkpoint on each use:
    an export that cannot be loaded or holds another key is removed and made again. Older exports of
    the same checkpoint name are removed when a new one is written. `announce`: log a new export."""
    folder = _cache_folder(path, o.cache_dir)
    os.makedirs(folder, exist_ok=True)
    stem = os.path.basename(path)
    key = export_key(path, o)
    target = _export_path(folder, stem, key)
    if os.path.isfile(target):
        embedder, problem = _open_stamped(target, key, o)
        if embedder is not None:
            return embedder
        o.log(f"warning: the cached ONNX export cannot be used ({problem}); exporting {stem} again")
        _remove(target)
    if announce:
        o.log(f"exporting {stem} to ONNX for ONNX Runtime (once; cached in {folder})")
    copy = temporary_name(os.path.join(folder, stem))
    try:
        key = copy_with_key(path, copy, o)
        target = _export_path(folder, stem, key)
        with atomic_path(target) as tmp:
            export_in_fresh_process(copy, tmp, o.network, o.width, o.num_features, {STAMP: key}, shown_as=path)
    finally:
        _remove(copy)
    for old in glob.glob(os.path.join(glob.escape(folder), glob.escape(stem) + ".*.onnx")):
        if old != target:
            _remove(old)
    embedder, problem = _open_stamped(target, key, o)
    if embedder is None:
        raise ArcFaceError(f"the ONNX export of {path} cannot be used: {problem}")
    return embedder


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# --- evaluation during training ---------------------------------------------------------------------

def _live_mindspore(backbone, device_target, work_dir, record, log):
    return MindSporeEmbedder(backbone)


def _live_onnxruntime(backbone, device_target, work_dir, record, log):
    """The backbone's current weights as a checkpoint, opened through the export cache: the export runs
    in a fresh process because this one compiled the backbone's training graph."""
    from src.checkpoint import bare_name, save_checkpoint_atomic
    os.makedirs(work_dir, exist_ok=True)
    weights = os.path.join(work_dir, "evaluation.ckpt")
    save_checkpoint_atomic([{"name": bare_name(p.name), "data": p} for p in backbone.get_parameters()], weights,
                           record)
    return cached_onnx_embedder(weights, Options(device_target, cache_dir=work_dir, log=log), announce=False)


LIVE = {"mindspore": _live_mindspore, "onnxruntime": _live_onnxruntime}


def embedder_factory(backend, device_target, work_dir, record, log=None):
    """For evaluation during training: `factory(backbone) -> embedder` of the backbone's weights at the
    time of the call, run by `backend` as open_model runs a checkpoint (`auto` alike). `work_dir` holds
    the ONNX backend's checkpoint and export; `record` is the backbone's {network, width, num_features};
    `log` gets warnings (default: stderr)."""
    backend = resolve_backend("checkpoint", backend, device_target)
    return functools.partial(LIVE[backend], device_target=device_target, work_dir=work_dir, record=dict(record),
                             log=log or _stderr)
