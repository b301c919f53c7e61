"""Memory of the margin head per rank with Partial FC (figures, not a test).

  python bench/head_memory.py                      # estimates, capacities, CPU measurements
  python bench/head_memory.py --no-measure --embedding_size 512 --batch_per_device 128

Per rank, in float32, for num_classes identities on `ranks` ranks (the largest shard,
local = ceil(num_classes / ranks)), a per-device batch b (global batch N = b x ranks) and a sample
rate r (k = num_sampled_centres(local, r, N) centres used per step):

  weight         local x D x 4
  gradient       local x D x 4      dense, also when sampling (unsampled rows are zero)
  SGD state      local x D x 8      MindSpore's SGD keeps `accum` (momentum) and a same-shaped `stat`
  logits         N x k x 4          one buffer; the forward and backward of the head create a
                                    number F of such N x k buffers (cos, one-hot, logits, exp,
                                    their gradients, ...); how many are alive at the peak depends
                                    on the backend's memory reuse

  head peak = weight + gradient + SGD state + F x logits

F is an assumption: --logit_buffers (default 6: a backend whose graph memory planner reuses
buffers, the assumption for GPU/Ascend, not measured here) and 30, the value measured below on CPU
in graph mode (the head on one device, all classes, shows the same factor there: the CPU backend
keeps almost every intermediate N x k buffer of the step alive).

"fits" assumes the head may use HEAD_SHARE of the device memory: the rest is left to the backbone
(an iresnet100 with its gradient and SGD state is ~1 GB), its activations at the given batch,
the framework's workspace and fragmentation.

The measurements build the head for one rank's shard on CPU (one process stands for one rank of a
larger run: its batch is the global batch) and report the sizes of the tensors actually created
(parameters, optimizer state, the gradient of the weight, the logits) and the process's peak RSS
growth over a training step of the head alone.
"""
import argparse
import json
import math
import os
import subprocess
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from src.heads.sharding import num_sampled_centres  # noqa: E402  (plain Python: no MindSpore import)

GB = 1024 ** 3
HEAD_SHARE = 0.5          # of the device memory, for the head (see the docstring)
CPU_LOGIT_BUFFERS = 30   # N x k float32 buffers alive at the head's peak on CPU, graph mode (measured)


def head_bytes(num_classes, ranks, rate, dim, batch_per_device, logit_buffers=6):
    local = math.ceil(num_classes / ranks)
    global_batch = batch_per_device * ranks
    k = num_sampled_centres(local, rate, global_batch)
    sizes = {"local": local, "k": k, "weight": local * dim * 4, "grad": local * dim * 4,
             "state": local * dim * 8, "logits": global_batch * k * 4}
    sizes["peak"] = sizes["weight"] + sizes["grad"] + sizes["state"] + logit_buffers * sizes["logits"]
    return sizes


def max_identities(device_gb, ranks, rate, dim, batch_per_device, logit_buffers):
    """Largest num_classes whose head peak fits HEAD_SHARE of every device."""
    budget = HEAD_SHARE * device_gb * GB
    peak = lambda per_rank: head_bytes(per_rank * ranks, ranks, rate, dim, batch_per_device,  # noqa: E731
                                       logit_buffers)["peak"]
    lo, hi = 0, 1
    while peak(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # binary search on the per-rank shard size
        mid = (lo + hi) // 2
        if peak(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo * ranks


def fmt(n):
    if n >= GB:
        return f"{n / GB:.2f} GB"
    return f"{n / 1024 ** 2:.1f} MB"


def estimates(args):
    from prettytable import PrettyTable
    table = PrettyTable(["identities", "ranks", "rate", "classes/rank", "k", "weight", "gradient", "SGD state",
                         "logits", "head peak", "32 GB", "64 GB"])
    for num_classes in args.identities:
        for ranks in args.ranks:
            for rate in args.rates:
                s = head_bytes(num_classes, ranks, rate, args.embedding_size, args.batch_per_device,
                               args.logit_buffers)
                fits = ["yes" if s["peak"] <= HEAD_SHARE * gb * GB else "no" for gb in (32, 64)]
                table.add_row([f"{num_classes:,}", ranks, rate, f"{s['local']:,}", f"{s['k']:,}", fmt(s["weight"]),
                               fmt(s["grad"]), fmt(s["state"]), fmt(s["logits"]), fmt(s["peak"])] + fits)
    table.align = "r"
    print(f"Head memory per rank, fp32, D={args.embedding_size}, {args.batch_per_device} images per device "
          f"(global batch = {args.batch_per_device} x ranks); head peak = weight + gradient + SGD state + "
          f"{args.logit_buffers} x logits; 'fits' = head peak <= {HEAD_SHARE:.0%} of the device")
    print(table)

    buffers = [args.logit_buffers] + ([CPU_LOGIT_BUFFERS] if args.logit_buffers != CPU_LOGIT_BUFFERS else [])
    table = PrettyTable(["device", "ranks", "rate"] + [f"fit, F={f}" for f in buffers] +
                        [f"per device, F={f}" for f in buffers])
    for gb in (32, 64):
        for ranks in args.ranks:
            for rate in args.rates:
                totals = [max_identities(gb, ranks, rate, args.embedding_size, args.batch_per_device, f)
                          for f in buffers]
                table.add_row([f"{gb} GB", ranks, rate] + [f"{t:,}" for t in totals] +
                              [f"{t // ranks:,}" for t in totals])
    table.align = "r"
    print(f"\nIdentities that fit with the head given {HEAD_SHARE:.0%} of each device "
          f"({HEAD_SHARE * 32:.0f} of 32 GB, {HEAD_SHARE * 64:.0f} of 64 GB), D={args.embedding_size}, "
          f"{args.batch_per_device} images per device, F = N x k buffers at the peak:")
    print(table)


# --- measurements on CPU (each case in its own process, for a clean peak RSS) ---------------------

def _rss():
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_case(local, dim, global_batch, rate):
    """One rank's shard of `local` classes, a global batch of `global_batch`: sizes of what the code
    creates and the peak RSS growth of a train step (graph mode, compile included)."""
    import numpy as np

    from src import runtime
    runtime.setup("CPU", mode="graph", seed=0, distributed=False)
    import mindspore as ms
    from mindspore import Tensor, nn

    from src.heads.classifier import PartialFC
    from src.training.step import TrainStep

    class Identity(nn.Cell):
        def construct(self, x):
            return x

    class HeadOnly(nn.Cell):
        def __init__(self, head):
            super().__init__()
            self.backbone = Identity()
            self.head = head

        def construct(self, x, y):
            return self.head(self.backbone(x), y)

    rng = np.random.default_rng(0)
    x = Tensor(rng.normal(size=(global_batch, dim)).astype(np.float32))
    y = Tensor(rng.integers(0, local, global_batch).astype(np.int32))
    # warm-up of the runtime with a tiny head, so that the growth below is the big head's
    tiny = HeadOnly(PartialFC(16, dim, rank=0, world_size=1, sample_rate=rate))
    TrainStep(tiny, nn.SGD(tiny.trainable_params(), learning_rate=0.1, momentum=0.9))(
        x, Tensor(np.zeros(global_batch, np.int32)))
    base = _rss()
    head = PartialFC(local, dim, rank=0, world_size=1, sample_rate=rate)
    net = HeadOnly(head)
    optimizer = nn.SGD(net.trainable_params(), learning_rate=0.1, momentum=0.9)
    step = TrainStep(net, optimizer)
    built = _rss()
    step(x, y)[0].asnumpy()
    peak = _peak_rss()
    after = _rss()
    state = sum(p.asnumpy().nbytes for p in step.get_parameters() if p.name.startswith(("accum.", "stat.")))
    grads = step.gradients(x, y, Tensor(1.0, ms.float32))[1]
    logits = head.local_logits(x, y)[0]
    return {"weight": head.weight.asnumpy().nbytes, "state": state, "grad": grads[0].asnumpy().nbytes,
            "grad_shape": list(grads[0].shape), "logits": logits.asnumpy().nbytes, "k": int(logits.shape[1]),
            "built_growth": built - base, "step_peak_growth": peak - base, "after_step_growth": after - base}


def measurements(args):
    from prettytable import PrettyTable
    table = PrettyTable(["classes/rank", "D", "global batch", "rate", "k", "weight", "gradient", "SGD state",
                         "logits", "RSS: built", "RSS: step peak", "F implied"])
    for local, dim, batch, rate in args.cases:
        env = dict(os.environ, ONEDNN_MAX_CPU_ISA=os.environ.get("ONEDNN_MAX_CPU_ISA", "AVX2"), GLOG_v="3")
        case = json.dumps([local, dim, batch, rate])
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--_case", case], env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            print(f"case {local},{dim},{batch},{rate} failed:\n{done.stderr[-2000:]}")
            continue
        m = json.loads(done.stdout.strip().splitlines()[-1])
        expected = head_bytes(local, 1, rate, dim, batch)
        assert m["weight"] == expected["weight"] and m["state"] == expected["state"], (m, expected)
        assert m["grad"] == expected["grad"] and m["logits"] == expected["logits"], (m, expected)
        fixed = m["weight"] + m["grad"] + m["state"]
        table.add_row([f"{local:,}", dim, batch, rate, f"{m['k']:,}", fmt(m["weight"]), fmt(m["grad"]),
                       fmt(m["state"]), fmt(m["logits"]), fmt(m["built_growth"]), fmt(m["step_peak_growth"]),
                       f"{(m['step_peak_growth'] - fixed) / m['logits']:.1f}"])
    table.align = "r"
    print("\nMeasured on CPU (one process = one rank's shard; a step of the head alone, graph mode; tensor sizes "
          "are those of the created tensors and equal the formulas; RSS growth is over a warmed-up runtime and "
          "includes the gradient, the compiled graph and the allocator's slack; F implied = (peak - weight - "
          "gradient - SGD state) / logits, an upper bound on F as (local x D) temporaries count in it too):")
    print(table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", default="85742,1000000,2000000,10000000")
    parser.add_argument("--ranks", default="1,8,32")
    parser.add_argument("--rates", default="1.0,0.1")
    parser.add_argument("--embedding_size", type=int, default=512)
    parser.add_argument("--batch_per_device", type=int, default=128)
    parser.add_argument("--logit_buffers", type=int, default=6,
                        help="F: N x k float32 buffers alive at the head's peak (30 measured on CPU)")
    parser.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure small cases on CPU (about a minute)")
    parser.add_argument("--cases", default="50000:128:256:1.0,50000:128:256:0.1,200000:64:64:1.0",
                        help="measured cases classes:D:global_batch:rate, comma-separated")
    parser.add_argument("--_case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._case:
        print(json.dumps(measure_case(*json.loads(args._case))))
        return 0
    args.identities = [int(v) for v in args.identities.split(",")]
    args.ranks = [int(v) for v in args.ranks.split(",")]
    args.rates = [float(v) for v in args.rates.split(",")]
    args.cases = [(int(a), int(b), int(c), float(d)) for a, b, c, d in (v.split(":") for v in args.cases.split(","))]
    estimates(args)
    if args.measure:
        measurements(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
