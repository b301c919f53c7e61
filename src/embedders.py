"""Embedders: callables mapping a float32 NCHW batch normalised to [-1, 1] to (batch, D) embeddings.

The evaluation protocols take any embedder, so MindSpore networks, exported models and
precomputed features all go through the same verification and IJB code.
"""
import os

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


def resolve_checkpoint(path):
    """A checkpoint file, or for a training folder its latest `ArcFace-*.ckpt`."""
    from src.checkpoint import latest_checkpoint
    if os.path.isdir(path):
        return latest_checkpoint(path)
    if not os.path.isfile(path):
        raise ArcFaceError(f"checkpoint not found: {path}")
    return path


def backbone_from_checkpoint(network, ckpt_path, num_features=512):
    """Build `network` and load its weights from a training or backbone-only checkpoint."""
    from src.backbones import get_backbone
    from src.checkpoint import load_backbone
    backbone = get_backbone(network, num_features=num_features)
    load_backbone(backbone, resolve_checkpoint(ckpt_path))
    return backbone
