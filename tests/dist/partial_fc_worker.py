"""One rank of the Partial FC tests, launched by msrun (see tests/test_partial_fc.py).

    msrun --worker_num=2 ... partial_fc_worker.py DIR

DIR holds the inputs written by the test (`config.json`, `x.npy` (steps, world, batch, in),
`y.npy` (steps, world, batch), `dense_w.npy`, `dense_b.npy`, `head_w.npy`, `y_sampled.npy`, and per
margin case `margin_<case>_head_w.npy` and `margin_<case>_scores.npy`); this script writes its results
to DIR/rank<r>/ as .npy files and DIR/rank<r>/done when it finished.
The "backbone" is a Dense layer (no BatchNorm, so the per-rank computation is exactly that of the
combined batch).
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from src import runtime  # noqa: E402  (sets the CPU environment before MindSpore starts)

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import nn, ops, Tensor  # noqa: E402

from src.checkpoint import checkpoint_name  # noqa: E402
from src.heads.classifier import PartialFC  # noqa: E402
from src.heads.margin import CombinedMargin, build_margin  # noqa: E402
from src.heads.sharding import class_range  # noqa: E402
from src.training.state import CheckpointWriter, restore  # noqa: E402
from src.training.step import BackboneWithHead, TrainStep  # noqa: E402



def split_rows(full, rank, world_size):
    """Rows of `rank` of a full (num_classes, ...) array."""
    start, stop = class_range(full.shape[0], rank, world_size)
    return np.asarray(full)[start:stop].copy()


class SampledCentres(nn.Cell):
    """Local labels -> (indices of the centres `head` samples for them, global labels), the sampling
    a training step does."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def construct(self, labels):
        global_labels = self.head.gather_labels(labels)
        return self.head.sample_centres(global_labels - self.head.class_start), global_labels


class FixedScores(nn.Cell):
    """Stands in for the head's random stream: the same sampling scores every step, so that the test
    knows which classes each rank samples."""

    def __init__(self, scores):
        super().__init__()
        self.scores = Tensor(scores.astype(np.float32))

    def construct(self, shape):
        return self.scores


class Barrier(nn.Cell):
    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce()

    def construct(self, x):
        return self.all_reduce(x)


def build(cfg, rank, world, dense_w, dense_b, head_w, sample_rate=1.0, num_classes=None, fp16=False):
    backbone = nn.Dense(dense_w.shape[1], dense_w.shape[0])
    backbone.weight.set_data(Tensor(dense_w))
    backbone.bias.set_data(Tensor(dense_b))
    head = PartialFC(num_classes or head_w.shape[0], dense_w.shape[0], CombinedMargin(cfg["s"], *cfg["margins"]),
                     sample_rate=sample_rate, rank=rank, world_size=world, seed=cfg["seed"])
    if head_w is not None:
        head.weight.set_data(Tensor(split_rows(head_w, rank, world)))
    net = BackboneWithHead(backbone, head)
    optimizer = nn.SGD(net.trainable_params(), learning_rate=cfg["lr"], momentum=cfg["momentum"],
                       weight_decay=cfg["weight_decay"])
    return net, head, TrainStep(net, optimizer, fp16=fp16)


def main(data_dir):
    tick = time.time()
    rt = runtime.setup("CPU", mode="graph", seed=1, distributed=True)
    rank, world = rt.rank, rt.group_size
    out = os.path.join(data_dir, f"rank{rank}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(data_dir, "config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    x, y = np.load(os.path.join(data_dir, "x.npy")), np.load(os.path.join(data_dir, "y.npy"))
    dense_w, dense_b = np.load(os.path.join(data_dir, "dense_w.npy")), np.load(os.path.join(data_dir, "dense_b.npy"))
    head_w = np.load(os.path.join(data_dir, "head_w.npy"))
    save = lambda name, value: np.save(os.path.join(out, name + ".npy"),  # noqa: E731
                                       value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value))
    timings = {}

    # 1. Loss and gradients of one batch (sample_rate 1.0).
    net, head, step = build(cfg, rank, world, dense_w, dense_b, head_w)
    images, labels = Tensor(x[0, rank]), Tensor(y[0, rank])
    loss, grads = step.gradients(images, labels, Tensor(1.0, ms.float32))
    names = [p.name for p in step.weights]
    save("loss0", loss)
    for name, grad in zip(names, grads):
        save("grad_" + name, grad)
    embeddings = net.backbone(images)
    grad_emb = ops.GradOperation(sens_param=True)(head)(embeddings, labels, Tensor(head.grad_scale, ms.float32))
    save("grad_embeddings", grad_emb)
    save("class_range", np.array([head.class_start, head.class_stop]))
    timings["grads"] = time.time() - tick

    # 2. A few SGD steps, saving the last two the way training does (rank 0: the usual checkpoint
    #    without the head; every rank: its head shard; keep=1, so only the last step's files remain).
    steps = x.shape[0]
    writer = CheckpointWriter(step, head, data_dir, keep=1, is_main=rank == 0)
    losses = []
    for t in range(steps):
        losses.append(float(step(Tensor(x[t, rank]), Tensor(y[t, rank]))[0].asnumpy()))
        if t >= steps - 2:
            writer.save({"epoch": 1, "step_in_epoch": t + 1, "global_step": t + 1})
    save("losses", np.array(losses))
    for param in step.get_parameters():
        save("param_" + param.name, param)
    main_ckpt = os.path.join(data_dir, checkpoint_name(1, steps))
    Barrier()(Tensor(np.ones(1, np.float32))).asnumpy()  # all files written before anyone reads
    timings["train"] = time.time() - tick

    # 3. Resume: a fresh train step (other initial head) takes everything back from the files.
    _, head2, step2 = build(cfg, rank, world, dense_w * 0, dense_b * 0, None, num_classes=head_w.shape[0])
    restore(step2, head2, main_ckpt)
    restored = {p.name: p.asnumpy() for p in step2.get_parameters()}
    mismatched = [p.name for p in step.get_parameters()
                  if p.name != "learning_rate" and not np.array_equal(p.asnumpy(), restored[p.name])]
    save("resume_mismatched", np.array(mismatched or [""]))
    timings["resume"] = time.time() - tick

    # 4. Class-centre sampling, trained with the loss-scaling train step (the fp16 path; the Dense
    #    backbone itself stays fp32): the sampled set and a few steps on one batch.
    sampled_cfg = cfg["sampled"]
    _, head_s, step_s = build(cfg, rank, world, dense_w, dense_b, None, sample_rate=sampled_cfg["sample_rate"],
                              num_classes=sampled_cfg["num_classes"], fp16=True)
    y_s = np.load(os.path.join(data_dir, "y_sampled.npy"))
    sampler = SampledCentres(head_s)
    index, global_labels = sampler(Tensor(y_s[rank]))
    save("sampled_index", index)
    save("sampled_index_again", sampler(Tensor(y_s[rank]))[0])  # other random negatives
    save("sampled_global_labels", global_labels)
    save("sampled_range", np.array([head_s.class_start, head_s.class_stop]))
    images_s, labels_s = Tensor(x[0, rank]), Tensor(y_s[rank])
    outputs = [step_s(images_s, labels_s) for _ in range(sampled_cfg["steps"])]
    save("sampled_losses", np.array([float(o[0].asnumpy()) for o in outputs]))
    save("sampled_overflow", np.array([bool(o[1].asnumpy()) for o in outputs]))
    timings["sampled"] = time.time() - tick

    # 5. Every margin, with and without sampling: loss and gradients of one batch, then a few SGD
    #    steps (running statistics included), saved and restored the way training does.
    for case in cfg["margin_cases"]:
        name, k = case["name"], case["hyper"].get("k", 1)
        full_w = np.load(os.path.join(data_dir, f"margin_{name}_head_w.npy"))
        scores = np.load(os.path.join(data_dir, f"margin_{name}_scores.npy"))

        def build_case():
            backbone = nn.Dense(dense_w.shape[1], dense_w.shape[0])
            backbone.weight.set_data(Tensor(dense_w))
            backbone.bias.set_data(Tensor(dense_b))
            head = PartialFC(case["num_classes"], dense_w.shape[0], build_margin(case["kind"], **case["hyper"]),
                             sample_rate=case["sample_rate"], rank=rank, world_size=world, seed=cfg["seed"])
            start, stop = head.class_start, head.class_stop
            head.weight.set_data(Tensor(full_w[start * k:stop * k]))
            if head.sampling:
                head.uniform = FixedScores(scores[start:stop])
            net = BackboneWithHead(backbone, head)
            optimizer = nn.SGD(net.trainable_params(), learning_rate=cfg["lr"], momentum=cfg["momentum"],
                               weight_decay=cfg["weight_decay"])
            return net, head, TrainStep(net, optimizer)

        net, head, step = build_case()
        images, labels = Tensor(x[0, rank]), Tensor(y[0, rank])
        loss, grads = step.gradients(images, labels, Tensor(1.0, ms.float32))
        save(f"{name}_loss0", loss)
        for param, grad in zip(step.weights, grads):
            save(f"{name}_grad_{param.name}", grad)
        grad_emb = ops.GradOperation(sens_param=True)(head)(net.backbone(images), labels,
                                                           Tensor(head.grad_scale, ms.float32))
        save(f"{name}_grad_embeddings", grad_emb)
        if head.sampling:
            save(f"{name}_sampled_index", SampledCentres(head)(labels)[0])

        net, head, step = build_case()
        losses = [float(step(Tensor(x[t, rank]), Tensor(y[t, rank]))[0].asnumpy()) for t in range(steps)]
        save(f"{name}_losses", np.array(losses))
        for param in step.get_parameters():
            save(f"{name}_param_{param.name}", param)
        folder = os.path.join(data_dir, f"margin_{name}")
        CheckpointWriter(step, head, folder, keep=1, is_main=rank == 0).save(
            {"epoch": 1, "step_in_epoch": steps, "global_step": steps})
        Barrier()(Tensor(np.ones(1, np.float32))).asnumpy()
        _, head2, step2 = build_case()
        restore(step2, head2, os.path.join(folder, checkpoint_name(1, steps)))
        restored = {p.name: p.asnumpy() for p in step2.get_parameters()}
        save(f"{name}_resume_mismatched", np.array([p.name for p in step.get_parameters() if p.name != "learning_rate"
                                                    and not np.array_equal(p.asnumpy(), restored[p.name])] or [""]))
        timings[name] = time.time() - tick
    with open(os.path.join(out, "done"), "w", encoding="utf-8") as fh:
        json.dump(timings, fh)


if __name__ == "__main__":
    main(sys.argv[1])
