"""One data-parallel worker (launched by msrun from tests/test_distributed.py).

Trains the project's network with the project's train-step cell and the recipe named by argv[3] for a few steps on this rank's
shard of a fixed global batch and saves the trainable parameters as <out>/rank<r>.npz.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy as np  # noqa: E402

from src import runtime  # noqa: E402


def main(out, steps, recipe):
    rt = runtime.setup("CPU", mode="graph", seed=11)
    assert rt.distributed, "expected to be launched by msrun with 2 workers"
    import mindspore as ms
    from dp_common import NUM_CLASSES, RECIPES, global_batch
    from src.training.lr_schedule import LRSchedule
    from src.training.trainer import build_network, build_step
    cfg, lr = RECIPES[recipe]
    net = build_network(cfg, NUM_CLASSES)
    step = build_step(cfg, net, LRSchedule.constant(lr), fp16=False)
    step.set_train(True)
    images, labels = global_batch()
    per_rank = len(images) // rt.group_size
    rows = slice(rt.rank * per_rank, (rt.rank + 1) * per_rank)
    losses = []
    for _ in range(steps):
        losses.append(float(step(ms.Tensor(images[rows]), ms.Tensor(labels[rows]))[0].asnumpy()))
    params = {p.name: p.asnumpy() for p in net.trainable_params()}
    np.savez(os.path.join(out, f"rank{rt.rank}.npz"), losses=np.array(losses), **params)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
