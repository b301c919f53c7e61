"""The training state step benchmarks start from, shared by train_speed.py and profile_step.py.

MindSpore's CPU PReLU kernels ran at a speed that depends on the activations (bench/README.md), so a
step is timed at realistic weights: `make_state` trains the network for `warm_steps` steps at
learning rate `lr` on random batches and writes the whole train cell (weights, BatchNorm statistics,
momentum) to a checkpoint, plus the backbone and head weights as an .npz for the PyTorch reference.
Every variant of a comparison loads the same files, so all start from identical numbers.

The timed batches (`batches`) are fixed random images and labels, the same in every process.
"""
import os

import numpy as np

# Printed by a worker before the one step whose oneDNN primitives bench/profile_step.py --onednn reads.
ONEDNN_MARKER = "== the measured step =="


def state_paths(folder, network, width, batch_size, num_classes, warm_steps, lr):
    stem = os.path.join(folder, f"{network}_w{width}_b{batch_size}_c{num_classes}_warm{warm_steps}_lr{lr:g}")
    return stem + ".ckpt", stem + ".npz"


def batches(batch_size, num_classes, count=4, seed=1):
    """`count` (images (B, 3, 112, 112) float32 in [-1, 1], labels (B,) int32), the same for every caller."""
    rng = np.random.default_rng(seed)
    return [(rng.uniform(-1, 1, (batch_size, 3, 112, 112)).astype(np.float32),
             rng.integers(0, num_classes, batch_size).astype(np.int32)) for _ in range(count)]


def build(network, width, num_classes, lr):
    """(train cell, network) of this checkout's `src` (whichever is first on sys.path), fp32, SGD at `lr`."""
    from src.config import TrainConfig
    from src.training.lr_schedule import LRSchedule
    from src.training.trainer import build_network, build_step

    cfg = TrainConfig(network=network, width=width)
    net = build_network(cfg, num_classes)
    step = build_step(cfg, net, LRSchedule.constant(lr), fp16=False)
    step.set_train(True)
    return step, net


def load(step, ckpt):
    """Load a state written by `make_state` into a train cell; every parameter must be there."""
    import mindspore as ms
    params = ms.load_checkpoint(ckpt)
    missing = [p.name for p in step.get_parameters() if p.name not in params]
    if missing:
        raise SystemExit(f"{ckpt} lacks {missing[:5]}")
    ms.load_param_into_net(step, params, strict_load=True)


def make_state(network, width, batch_size, num_classes, warm_steps, lr, folder):
    """Train `warm_steps` steps at `lr` from the initial weights and write (ckpt, npz); returns the loss curve."""
    import mindspore as ms

    ckpt, npz = state_paths(folder, network, width, batch_size, num_classes, warm_steps, lr)
    step, net = build(network, width, num_classes, lr)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(warm_steps):
        x = rng.uniform(-1, 1, (batch_size, 3, 112, 112)).astype(np.float32)
        y = rng.integers(0, num_classes, batch_size).astype(np.int32)
        loss, overflow, _ = step(ms.Tensor(x), ms.Tensor(y))
        losses.append(float(loss.asnumpy()))
        if bool(overflow.asnumpy()):
            raise SystemExit(f"warm-up diverged at step {len(losses)}")
    os.makedirs(folder, exist_ok=True)
    ms.save_checkpoint(step, ckpt[:-len(".ckpt")] + ".tmp.ckpt")  # the saver insists on .ckpt
    os.replace(ckpt[:-len(".ckpt")] + ".tmp.ckpt", ckpt)
    arrays = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    np.savez(npz + ".tmp.npz", **arrays)
    os.replace(npz + ".tmp.npz", npz)
    return losses
