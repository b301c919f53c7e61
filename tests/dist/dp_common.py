"""What the data-parallel worker and the single-process reference share: two recipes (the model
zoo's; arcface_torch's with AdamW, weight decay on BatchNorm, a straight-through CosFace margin,
PyTorch-style init and a backbone gradient clipped at a norm small enough to act) and one batch."""
import numpy as np

from src.config import TrainConfig

RECIPES = {
    "zoo": (TrainConfig(network="r18", width=8, num_features=64, scale=16.0, weight_decay=5e-4, momentum=0.9), 0.1),
    "arcface_torch": (TrainConfig(network="r18", width=8, num_features=64, scale=16.0, margin="cosface",
                                  margin_grad="straight", optimizer="adamw", weight_decay=0.1, weight_decay_bn=True,
                                  clip_grad_norm=0.5, init="torch"), 1e-3),
}
NUM_CLASSES = 6
GLOBAL_BATCH = 8


def global_batch():
    rng = np.random.default_rng(5)
    images = rng.uniform(-1, 1, (GLOBAL_BATCH, 3, 112, 112)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)
    return images, labels
