"""Embedders: callables mapping a float32 NCHW batch normalised to [-1, 1] to (batch, D) embeddings.

The evaluation protocols take any embedder, so MindSpore networks, exported models and
precomputed features all go through the same verification and IJB code.
"""
import glob
import hashlib
import os
import sys

import numpy as np

from src.errors import ArcFaceError
from src.files import atomic_path


class MindSporeEmbedder:
    """A backbone in inference mode."""

    def __init__(self, backbone):
        import mindspore as ms
        self._tensor = ms.Tensor
        self.backbone = backbone
        self.backbone.set_train(False)

    def __call__(self, batch):
        return self.backbone(self._tensor(np.ascontiguousarray(batch, dtype=np.float32))).asnumpy()


def backbone_from_checkpoint(ckpt_path, network=None, width=None, num_features=None):
    """Build the backbone a checkpoint was trained with and load its weights. The architecture is
    read from the checkpoint; arguments given explicitly override it (needed for checkpoints that
    do not record it: then r100, width 64, 512 features are assumed)."""
    from src.checkpoint import load_backbone, read_checkpoint_or_newest
    path, params, meta = read_checkpoint_or_newest(ckpt_path, log=lambda line: print(line, file=sys.stderr))
    backbone = _build(_architecture(meta, network, width, num_features))
    load_backbone(backbone, path, params)
    return backbone


def _architecture(meta, network=None, width=None, num_features=None):
    return {"network": network or meta.get("network", "r100"), "width": width or meta.get("width", 64),
            "num_features": num_features or meta.get("num_features", 512)}


def _build(arch):
    from src.models import get_backbone
    return get_backbone(arch["network"], num_features=arch["num_features"], width=arch["width"])


# --- the ONNX Runtime backend for checkpoints -----------------------------------------------------

BACKENDS = ("auto", "mindspore", "onnxruntime")
# Part of every cache key: raise it when the export changes, so that no older export is reused.
ONNX_EXPORT_VERSION = 1


def onnxruntime_available():
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend, device_target):
    """'auto': ONNX Runtime on the CPU when it is installed (it runs our networks 1.5-2x faster than
    MindSpore's CPU kernels), MindSpore otherwise and on GPU/Ascend."""
    if backend not in BACKENDS:
        raise ArcFaceError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        return "onnxruntime" if device_target == "CPU" and onnxruntime_available() else "mindspore"
    if backend == "onnxruntime" and not onnxruntime_available():
        raise ArcFaceError("--backend onnxruntime needs the onnxruntime package (pip install onnxruntime)")
    return backend


def checkpoint_embedder(ckpt_path, backend="auto", device_target="CPU", network=None, width=None, num_features=None,
                        cache_dir=None, log=None):
    """An embedder for a checkpoint (file or training folder): the MindSpore backbone, or the ONNX
    export of it run by ONNX Runtime. The export is made once and cached, keyed by the checkpoint's
    content and the architecture, next to the checkpoint (`.onnx-cache/`) or in `cache_dir`."""
    from src.checkpoint import read_checkpoint_or_newest
    if resolve_backend(backend, device_target) == "mindspore":
        return MindSporeEmbedder(backbone_from_checkpoint(ckpt_path, network, width, num_features))
    note = log or (lambda line: print(line, file=sys.stderr))
    path, params, meta = read_checkpoint_or_newest(ckpt_path, log=note)
    arch = _architecture(meta, network, width, num_features)
    onnx_path = cached_onnx(path, arch, params, cache_dir, note)
    return OnnxEmbedder(onnx_path, device_target, log=log)


def _cache_key(path, arch):
    digest = hashlib.sha256(f"{ONNX_EXPORT_VERSION} {sorted(arch.items())}".encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


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


def cached_onnx(path, arch, params, cache_dir=None, log=print):
    """The ONNX export of checkpoint `path`, made on first use. The file name holds a hash of the
    checkpoint's bytes and the architecture, so a changed checkpoint never reuses an old export;
    older exports of the same checkpoint name are removed when a new one is written."""
    from src.checkpoint import load_backbone
    from src.deploy.exporting import export_backbone
    folder = _cache_folder(path, cache_dir)
    os.makedirs(folder, exist_ok=True)
    stem = os.path.basename(path)
    target = os.path.join(folder, f"{stem}.{_cache_key(path, arch)}.onnx")
    if os.path.isfile(target):
        return target
    log(f"exporting {stem} to ONNX for ONNX Runtime (once; cached in {folder})")
    backbone = _build(arch)
    load_backbone(backbone, path, params)
    with atomic_path(target) as tmp:
        export_backbone(backbone, tmp, "ONNX")
    for old in glob.glob(os.path.join(glob.escape(folder), glob.escape(stem) + ".*.onnx")):
        if old != target:
            os.remove(old)
    return target


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
    the model's own normalisation is applied as (pixel - input_mean) / input_std."""

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
