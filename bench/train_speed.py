"""Training and inference throughput of the backbones on this machine (figures, not a test).

  python bench/train_speed.py --networks r18,r50 --batch_size 16 --steps 5 --device_target CPU

Prints images/s for one training step (backbone + ArcFace head + SGD, graph mode) and for
inference, after one warm-up step that includes graph compilation.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default="r18,r50,mbf", help="comma-separated backbones")
    parser.add_argument("--width", type=int, default=64, help="iresnet width")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
    parser.add_argument("--device_target", default="CPU", choices=["Ascend", "GPU", "CPU"])
    parser.add_argument("--amp", default="auto", choices=["auto", "O0", "O2"])
    args = parser.parse_args(argv)

    import numpy as np
    from prettytable import PrettyTable

    from src import runtime
    runtime.setup(args.device_target, seed=0, distributed=False)
    import mindspore as ms

    from src.config import TrainConfig
    from src.training.trainer import build_network, build_step, resolve_amp

    table = PrettyTable(["network", "batch", "precision", "compile+1st step s", "train img/s", "infer img/s"])
    x = ms.Tensor(np.random.default_rng(0).uniform(-1, 1, (args.batch_size, 3, 112, 112)).astype(np.float32))
    y = ms.Tensor(np.random.default_rng(1).integers(0, args.num_classes, args.batch_size).astype(np.int32))
    for name in args.networks.split(","):
        cfg = TrainConfig(network=name, width=args.width if name != "mbf" else 64, amp=args.amp,
                          device_target=args.device_target)
        fp16 = resolve_amp(cfg)
        net = build_network(cfg, args.num_classes, fp16=fp16)
        step = build_step(cfg, net, np.full(args.steps + 1, 0.01, np.float32), fp16)
        step.set_train(True)
        tick = time.time()
        step(x, y)
        first = time.time() - tick
        tick = time.time()
        for _ in range(args.steps):
            out = step(x, y)
        out[0].asnumpy()
        train_ips = args.batch_size * args.steps / (time.time() - tick)
        backbone = net.backbone
        backbone.set_train(False)
        backbone(x).asnumpy()
        tick = time.time()
        for _ in range(args.steps):
            backbone(x).asnumpy()
        infer_ips = args.batch_size * args.steps / (time.time() - tick)
        table.add_row([name, args.batch_size, "fp16" if fp16 else "fp32", f"{first:.1f}", f"{train_ips:.1f}",
                       f"{infer_ips:.1f}"])
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
