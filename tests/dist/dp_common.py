"""What the data-parallel worker and the single-process reference share."""
import numpy as np

from src.config import TrainConfig

CFG = TrainConfig(network="r18", width=8, num_features=64, scale=16.0, weight_decay=5e-4, momentum=0.9)
NUM_CLASSES = 6
GLOBAL_BATCH = 8


def global_batch():
    rng = np.random.default_rng(5)
    images = rng.uniform(-1, 1, (GLOBAL_BATCH, 3, 112, 112)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)
    return images, labels
