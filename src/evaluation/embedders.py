"""Embedders: callables mapping a float32 NCHW batch normalised to [-1, 1] to (batch, D) embeddings.

The evaluation protocols take any embedder, so MindSpore networks, exported models and
precomputed features all go through the same verification and IJB code.
"""
import os
import sys

import numpy as np

from src.errors import ArcFaceError


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
    from src.models import get_backbone
    path, params, meta = read_checkpoint_or_newest(ckpt_path, log=lambda line: print(line, file=sys.stderr))
    backbone = get_backbone(network or meta.get("network", "r100"),
                            num_features=num_features or meta.get("num_features", 512),
                            width=width or meta.get("width", 64))
    load_backbone(backbone, path, params)
    return backbone


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
        try:
            self.session = ort.InferenceSession(path, providers=providers)
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
