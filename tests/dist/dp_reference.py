"""The data-parallel workers' steps in one process (run by tests/test_distributed.py in a fresh
interpreter, so no earlier test's global state can touch it): per-shard gradients (each shard
with its own BatchNorm batch statistics, as on its device) averaged, then the same SGD update.
Saves the initial and final trainable parameters (<out>/initial.npz, reference.npz) and the
per-shard losses."""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy as np  # noqa: E402

from src import runtime  # noqa: E402


def main(out, steps):
    runtime.setup("CPU", mode="pynative", seed=11, distributed=False)
    import mindspore as ms
    from mindspore import nn
    from dp_common import CFG, NUM_CLASSES, global_batch
    from src.training.optim import parameter_groups
    from src.training.trainer import build_network

    net = build_network(CFG, NUM_CLASSES)
    net.set_train(True)
    np.savez(os.path.join(out, "initial.npz"), **{p.name: p.asnumpy() for p in net.trainable_params()})
    optimizer = nn.SGD(parameter_groups(net, CFG.weight_decay), learning_rate=0.1, momentum=CFG.momentum)
    grad_fn = ms.value_and_grad(net, None, optimizer.parameters)
    images, labels = global_batch()
    half = len(images) // 2
    losses = []
    for _ in range(steps):
        shard_losses, shard_grads = [], []
        for rows in (slice(0, half), slice(half, None)):
            loss, grads = grad_fn(ms.Tensor(images[rows]), ms.Tensor(labels[rows]))
            shard_losses.append(float(loss.asnumpy()))
            shard_grads.append(grads)
        optimizer(tuple((a + b) / 2 for a, b in zip(*shard_grads)))
        losses.append(shard_losses)
    params = {p.name: p.asnumpy() for p in net.trainable_params()}
    np.savez(os.path.join(out, "reference.npz"), losses=np.array(losses), **params)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
