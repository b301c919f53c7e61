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


def main(out, steps, recipe):
    runtime.setup("CPU", mode="pynative", seed=11, distributed=False)
    import mindspore as ms
    from dp_common import NUM_CLASSES, RECIPES, global_batch
    from src.training.lr_schedule import LRSchedule
    from src.training.optim import build_optimizer
    from src.training.trainer import build_network

    cfg, lr = RECIPES[recipe]
    net = build_network(cfg, NUM_CLASSES)
    net.set_train(True)
    np.savez(os.path.join(out, "initial.npz"), **{p.name: p.asnumpy() for p in net.trainable_params()})
    optimizer = build_optimizer(cfg, net, LRSchedule.constant(lr))
    grad_fn = ms.value_and_grad(net, None, optimizer.parameters)
    images, labels = global_batch()
    half = len(images) // 2
    losses, clip_factors = [], []
    for _ in range(steps):
        shard_losses, shard_grads = [], []
        for rows in (slice(0, half), slice(half, None)):
            loss, grads = grad_fn(ms.Tensor(images[rows]), ms.Tensor(labels[rows]))
            shard_losses.append(float(loss.asnumpy()))
            shard_grads.append(grads)
        grads = [(a + b) / 2 for a, b in zip(*shard_grads)]
        if cfg.clip_grad_norm:  # torch.nn.utils.clip_grad_norm_ on the backbone's gradients
            backbone = [i for i, p in enumerate(optimizer.parameters) if p.name.startswith("backbone.")]
            norm = float(np.sqrt(sum((grads[i].asnumpy().astype(np.float64) ** 2).sum() for i in backbone)))
            factor = min(1.0, cfg.clip_grad_norm / (norm + 1e-6))
            clip_factors.append(factor)
            for i in backbone:
                grads[i] = grads[i] * factor
        optimizer(tuple(grads))
        losses.append(shard_losses)
    params = {p.name: p.asnumpy() for p in net.trainable_params()}
    np.savez(os.path.join(out, "reference.npz"), losses=np.array(losses), clip_factors=np.array(clip_factors),
             **params)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
