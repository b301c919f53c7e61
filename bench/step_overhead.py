"""What our train step costs beyond the bare minimum (figures, not a test).

  python bench/step_overhead.py --network r50 --batch_size 16 --num_classes 1000 --rounds 3

Times (a) the project's step: backbone + class-sharded head (normalised embeddings and centres,
combined margin, log-sum-exp cross-entropy) + the one train-step cell (finiteness checks, skip
logic) + SGD with the per-step lr array, against (b) the bare step: the same backbone + a plain
Dense(512 -> classes) + MindSpore's sparse softmax cross-entropy + nn.TrainOneStepCell with the same
SGD (momentum, weight decay off BatchNorm). Both fp32, graph mode, the same batch, learning rate 0.
Each variant runs in a fresh process (MindSpore's CPU memory pool makes a second large graph in one
process slower than the first, which would measure the order, not the step), alternating a and b
for --rounds; per process the fastest step and the CPU time per step are kept.

Why learning rate 0: the optimizer still runs every operation, but the weights, and so the
activations, stay identical in both variants. With a learning rate the two heads move the
weights differently within a few steps, and MindSpore's CPU PReLU kernels run at data-dependent
speed (the bare step became ~15% faster than at its initial weights after three steps at lr 0.01
on random data), which measures where the weights went, not what the step costs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from src.cli import run_main  # noqa: E402


def measure(variant, network, width, batch_size, num_classes, steps):
    """(fastest step's wall ms, median CPU ms per step) of one variant, after the compilation step."""
    from src import runtime
    runtime.setup("CPU", seed=0, distributed=False)
    import mindspore as ms
    import numpy as np
    from mindspore import nn

    from src.config import TrainConfig
    from src.models import get_backbone
    from src.training.lr_schedule import LRSchedule
    from src.training.optim import build_optimizer
    from src.training.trainer import build_network, build_step

    class Bare(nn.Cell):
        def __init__(self, backbone, classes):
            super().__init__()
            self.backbone = backbone
            self.fc = nn.Dense(backbone.num_features, classes)
            self.loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

        def construct(self, images, labels):
            return self.loss(self.fc(self.backbone(images)), labels)

    cfg = TrainConfig(network=network, width=width)
    lrs = LRSchedule.constant(0.0)
    if variant == "ours":
        step = build_step(cfg, build_network(cfg, num_classes), lrs, fp16=False)
    else:
        net = Bare(get_backbone(network, width=width), num_classes)
        step = nn.TrainOneStepCell(net, build_optimizer(cfg, net, lrs))
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.uniform(-1, 1, (batch_size, 3, 112, 112)).astype(np.float32))
    y = ms.Tensor(rng.integers(0, num_classes, batch_size).astype(np.int32))

    def run():
        out = step(x, y)
        return out[0] if isinstance(out, tuple) else out
    run().asnumpy()
    wall, cpu = [], []
    for _ in range(steps):
        tick, used = time.perf_counter(), _cpu_seconds()
        run().asnumpy()
        wall.append((time.perf_counter() - tick) * 1000)
        cpu.append((_cpu_seconds() - used) * 1000)
    return min(wall), statistics.median(cpu)


def _cpu_seconds():
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def components(network, width, num_classes, batch_size, repeats=6):
    """ms of the pieces ours adds, each alone: the head's forward + backward (against a Dense head),
    and the finiteness check of a gradient set of `network`'s shapes (fresh tensors each call)."""
    from src import runtime
    runtime.setup("CPU", seed=0, distributed=False)
    import mindspore as ms
    import numpy as np
    from mindspore import nn

    from src.heads.classifier import PartialFC
    from src.heads.margin import CombinedMargin
    from src.models import get_backbone
    from src.training.step import all_finite

    class Dense(nn.Cell):
        def __init__(self):
            super().__init__()
            self.fc = nn.Dense(512, num_classes)
            self.loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

        def construct(self, embeddings, labels):
            return self.loss(self.fc(embeddings), labels)

    class OnFeatures(nn.Cell):  # a Dense "backbone" in front, trained by a plain TrainOneStepCell
        def __init__(self, head):
            super().__init__()
            self.backbone, self.head = nn.Dense(512, 512), head

        def construct(self, features, labels):
            return self.head(self.backbone(features), labels)

    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.normal(size=(batch_size, 512)).astype(np.float32))
    y = ms.Tensor(rng.integers(0, num_classes, batch_size).astype(np.int32))
    out = {}
    for name, head in (("dense head", Dense()), ("our head", PartialFC(num_classes, 512, CombinedMargin(), rank=0,
                                                                      world_size=1))):
        net = OnFeatures(head)
        step = nn.TrainOneStepCell(net, nn.SGD(net.trainable_params(), 0.0, 0.9))
        step(x, y).asnumpy()
        tick = time.perf_counter()
        for _ in range(repeats * 5):
            loss = step(x, y)
        loss.asnumpy()
        out[name] = (time.perf_counter() - tick) / (repeats * 5) * 1000
    backbone = get_backbone(network, width=width)
    gradient_shapes = [p.shape for p in backbone.trainable_params()]
    statistics_shapes = [p.shape for p in backbone.get_parameters() if not p.requires_grad]

    class Sums(nn.Cell):
        def construct(self, grads):
            return all_finite(grads)

    class AllFinite(nn.Cell):
        def construct(self, grads):
            return ms.amp.all_finite(grads)

    checks = {"finiteness check of the gradients (sums)": (Sums(), gradient_shapes),
              "the same with ms.amp.all_finite": (AllFinite(), gradient_shapes),
              "finiteness check of BatchNorm's statistics (sums)": (Sums(), statistics_shapes)}
    for name, (check, shapes) in checks.items():
        sets = [tuple(ms.Tensor(rng.random(shape, dtype=np.float32)) for shape in shapes) for _ in range(3)]
        check(sets[0]).asnumpy()
        tick = time.perf_counter()
        for i in range(repeats):
            check(sets[i % 3]).asnumpy()
        out[name] = (time.perf_counter() - tick) / repeats * 1000
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="r50")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--_variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args._variant:  # one error line here rather than a failed worker process later
        from src.models import check_backbone_options
        check_backbone_options(args.network, width=args.width)
    if args._variant:
        if args._variant == "components":
            result = components(args.network, args.width, args.num_classes, args.batch_size)
        else:
            result = measure(args._variant, args.network, args.width, args.batch_size, args.num_classes, args.steps)
        print(json.dumps(result))
        return 0
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=os.environ.get("ONEDNN_MAX_CPU_ISA", "AVX2"), GLOG_v="3")

    def run(variant):
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--_variant", variant, "--network",
                               args.network, "--width", str(args.width), "--batch_size", str(args.batch_size),
                               "--num_classes", str(args.num_classes), "--steps", str(args.steps)],
                              env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    rounds = [(run("ours"), run("bare")) for _ in range(args.rounds)]
    print(f"{args.network} width {args.width}, batch {args.batch_size}, {args.num_classes} classes, fp32, "
          f"{args.rounds} alternating rounds of {args.steps} steps, one process each")
    for i, what in enumerate(("fastest step, wall", "median step, CPU")):
        ratios = [ours[i] / bare[i] for ours, bare in rounds]
        per_round = ", ".join(f"{100 * (r - 1):+.1f}" for r in ratios)
        print(f"  {what} ms/step: ours {statistics.median(o[i] for o, _ in rounds):.0f}, bare "
              f"{statistics.median(b[i] for _, b in rounds):.0f}; overhead per round {per_round} %, "
              f"median {100 * (statistics.median(ratios) - 1):+.1f} %")
    parts = run("components")
    print("  the pieces alone: " + ", ".join(f"{name} {value:.1f} ms" for name, value in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
