"""What our train step costs beyond the bare minimum (figures, not a test).

  python bench/step_overhead.py --network r50 --batch_size 16 --num_classes 1000 --rounds 3

Times, in alternating rounds in one process, (a) the project's step: backbone + class-sharded head
(normalised embeddings and centres, combined margin, log-sum-exp cross-entropy) + the one train-step
cell (finiteness checks, skip logic) + SGD with the per-step lr array; (b) the bare step: the same
backbone + a plain Dense(512 -> classes) + MindSpore's sparse softmax cross-entropy + nn.TrainOneStepCell
with SGD. Both fp32, graph mode, the same batch, the loss read back once per round. Prints ms/step
of each and the overhead of (a) over (b).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="r50")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from src import runtime
    runtime.setup("CPU", seed=0, distributed=False)
    import mindspore as ms
    import numpy as np
    from mindspore import nn

    from src.config import TrainConfig
    from src.models import get_backbone
    from src.training.trainer import build_network, build_step

    class Bare(nn.Cell):
        def __init__(self, backbone, classes):
            super().__init__()
            self.backbone = backbone
            self.fc = nn.Dense(backbone.num_features, classes)
            self.loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

        def construct(self, images, labels):
            return self.loss(self.fc(self.backbone(images)), labels)

    cfg = TrainConfig(network=args.network, width=args.width)
    ours = build_step(cfg, build_network(cfg, args.num_classes), np.full(10 ** 5, 0.01, np.float32), fp16=False)
    bare_net = Bare(get_backbone(args.network, width=args.width), args.num_classes)
    bare = nn.TrainOneStepCell(bare_net, nn.SGD(bare_net.trainable_params(), learning_rate=0.01, momentum=0.9))
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.uniform(-1, 1, (args.batch_size, 3, 112, 112)).astype(np.float32))
    y = ms.Tensor(rng.integers(0, args.num_classes, args.batch_size).astype(np.int32))
    steps = {"ours": lambda: ours(x, y)[0], "bare": lambda: bare(x, y)}
    for step in steps.values():  # compile
        step().asnumpy()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            tick = time.perf_counter()
            for _ in range(args.steps):
                loss = step()
            loss.asnumpy()
            times[name].append((time.perf_counter() - tick) / args.steps * 1000)
    ours_ms, bare_ms = statistics.median(times["ours"]), statistics.median(times["bare"])
    print(f"{args.network} width {args.width}, batch {args.batch_size}, {args.num_classes} classes, fp32, "
          f"{args.rounds} alternating rounds of {args.steps} steps")
    print(f"  ours: {ours_ms:.0f} ms/step  (rounds: {', '.join(f'{t:.0f}' for t in times['ours'])})")
    print(f"  bare: {bare_ms:.0f} ms/step  (rounds: {', '.join(f'{t:.0f}' for t in times['bare'])})")
    print(f"  overhead of ours: {100 * (ours_ms / bare_ms - 1):+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
