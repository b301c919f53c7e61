"""Where a training step's time goes: the top operators of our forward + backward + update, per
backbone, from MindSpore's profiler (figures, not a test).

  python bench/profile_step.py --networks r18,r50
  python bench/profile_step.py --networks r50 --top 25 --lr 0.0     # at lr 0: the weights stay put
  python bench/profile_step.py --networks r18 --onednn --torch_isa native,AVX2

Each backbone runs in a fresh process: the one train-step cell (backbone + ArcFace head + finiteness
check + SGD, fp32, graph mode) starts from the realistic state of bench/step_state.py (trained
--warm_steps steps at --lr; cached in --state_dir and shared with train_speed.py), compiles, takes
one more step, and then --steps steps run under the profiler. Printed per backbone: the wall time
per step, the operators' summed time per step, and per operator type its calls and ms per step,
its share of the operators' time, and how that time splits between the forward pass, the backward
pass and the rest (finiteness check, optimizer); then the slowest single operators.

With the PyTorch bench environment (`make bench-torch`; --torch), the same step of the PyTorch
reference (bench/torch_iresnet.py, from the same state) is profiled next, by torch.profiler (self CPU
time per operator), so that operator families can be compared: convolutions, BatchNorm, PReLU, the
optimizer.

--onednn looks one level lower, at the oneDNN primitives both frameworks call (ONEDNN_VERBOSE=1, one
step after two): per primitive family and per convolution shape, the implementation oneDNN chose and
its time, ours beside PyTorch's (at ours' instruction-set cap and at PyTorch's own). That is where the
convolutions' difference shows: which kernel runs on which memory layout.
"""
import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
HERE = os.path.dirname(os.path.abspath(__file__))


def phase(full_name):
    """forward / backward / update of an operator's scope name."""
    if full_name.startswith("Gradients/"):
        return "backward"
    if "/network-BackboneWithHead/" in full_name or full_name.startswith("Default/network-"):
        return "forward"
    return "update"


def _warm_step(repo, network, width, batch_size, num_classes, warm_steps, lr, state_dir):
    """(our train cell from the bench state after two more steps, the fixed batches as Tensors)."""
    sys.path.insert(0, repo)
    sys.path.insert(1, HERE)
    from src import runtime
    runtime.setup("CPU", seed=0, distributed=False)
    import mindspore as ms
    import step_state
    ckpt, _ = step_state.state_paths(state_dir, network, width, batch_size, num_classes, warm_steps, 0.1)
    step, _ = step_state.build(network, width, num_classes, lr)
    if warm_steps:
        if not os.path.isfile(ckpt):
            raise SystemExit(f"no state {ckpt}: run bench/train_speed.py with the same options first, or "
                             f"--warm_steps 0")
        step_state.load(step, ckpt)
    data = [(ms.Tensor(x), ms.Tensor(y)) for x, y in step_state.batches(batch_size, num_classes)]
    step(*data[0])[0].asnumpy()
    step(*data[1])[0].asnumpy()
    return step, data


def profile(repo, network, width, batch_size, num_classes, warm_steps, lr, steps, state_dir):
    step, data = _warm_step(repo, network, width, batch_size, num_classes, warm_steps, lr, state_dir)
    from mindspore.profiler import Profiler
    with tempfile.TemporaryDirectory() as folder:
        profiler = Profiler(output_path=folder)
        tick = time.perf_counter()
        for i in range(steps):
            step(*data[i % len(data)])[0].asnumpy()
        wall = (time.perf_counter() - tick) / steps * 1000
        profiler.stop()
        profiler.analyse()
        details = glob.glob(os.path.join(folder, "**", "cpu_op_detail_info_*.csv"), recursive=True)
        if not details:
            raise SystemExit("the profiler wrote no cpu_op_detail_info")
        with open(details[0], encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    ops = [{"type": r["op_type"], "name": r["full_op_name"], "calls": int(r["op_occurrences"]) / steps,
            "ms": float(r["op_total_time(ms)"]) / steps} for r in rows]
    return {"wall_ms": wall, "ops": ops}


def onednn_step(repo, network, width, batch_size, num_classes, warm_steps, lr, state_dir):
    """Our train cell from the bench state, the marker, then the step whose oneDNN primitives are read
    (the process runs with ONEDNN_VERBOSE=1)."""
    step, data = _warm_step(repo, network, width, batch_size, num_classes, warm_steps, lr, state_dir)
    import step_state
    print(step_state.ONEDNN_MARKER, flush=True)
    step(*data[2])[0].asnumpy()
    return {"done": True}


def primitives(stdout):
    """[(primitive, implementation, prop_kind, problem, ms)] of the oneDNN verbose lines after the marker."""
    from step_state import ONEDNN_MARKER
    if ONEDNN_MARKER not in stdout:
        raise SystemExit("no marker in the worker's output")
    rows = []
    for line in stdout.split(ONEDNN_MARKER, 1)[1].splitlines():
        fields = line.split(",")
        if len(fields) > 8 and fields[0] == "onednn_verbose" and fields[2:4] == ["primitive", "exec"]:
            rows.append((fields[5], fields[6], fields[7], fields[-2], float(fields[-1])))
    return rows


def report_onednn(network, runs, top):
    """runs: {label: primitives(...)}: per family and per convolution shape, ms and implementation."""
    labels = list(runs)

    def summary(rows, key):
        total = defaultdict(float)
        impls = defaultdict(lambda: defaultdict(float))
        for row in rows:
            total[key(row)] += row[4]
            impls[key(row)][row[1]] += row[4]
        return {k: (total[k], max(impls[k], key=impls[k].get)) for k in total}

    def cell(figures, k):
        return f"{figures[k][0]:8.1f} {figures[k][1][:18]:<18}" if k in figures else f"{'-':>8} {'':<18}"

    print(f"\n{network}: oneDNN primitives of one training step, ms (implementation)")
    print(f"{'primitive':<42}" + "".join(f"{label[:27]:<28}" for label in labels))
    families = {label: summary(rows, lambda r: f"{r[0]} {r[2]}") for label, rows in runs.items()}
    keys = sorted({k for f in families.values() for k in f}, key=lambda k: -max(f.get(k, (0,))[0]
                                                                                for f in families.values()))
    for k in keys:
        print(f"{k[:41]:<42}" + "".join(cell(families[label], k) + " " for label in labels))
    print(f"{'all':<42}" + "".join(f"{sum(r[4] for r in runs[label]):8.1f} {'':<18} " for label in labels))
    kinds = {"forward_training": "fwd", "forward_inference": "fwd", "backward_data": "bwd data",
             "backward_weights": "bwd weights"}
    shapes = {label: summary([r for r in rows if r[0] == "convolution"],
                             lambda r: f"{kinds.get(r[2], r[2])} {r[3]}")
              for label, rows in runs.items()}
    first = shapes[labels[0]]
    print(f"slowest convolutions of {labels[0]} (prop kind, shape; summed over calls):")
    for k in sorted(first, key=lambda k: -first[k][0])[:top]:
        print(f"  {k[:78]:<80}" + "".join(f"{shapes[label][k][0]:8.1f}" if k in shapes[label] else f"{'-':>8}"
                                         for label in labels))


def report_torch(network, result, top):
    ops = result["ops"]
    total = sum(o["ms"] for o in ops)
    print(f"\n{network} PyTorch: {result['wall_ms']:.0f} ms per step (wall), operators (self CPU) {total:.0f} ms "
          f"per step")
    print(f"{'operator':<44}{'calls':>7}{'ms/step':>10}{'share':>8}")
    for o in sorted(ops, key=lambda o: -o["ms"])[:top]:
        print(f"{o['type'][:43]:<44}{o['calls']:>7.0f}{o['ms']:>10.1f}{100 * o['ms'] / total:>7.1f}%")


def report(network, result, top):
    ops = result["ops"]
    total = sum(o["ms"] for o in ops)
    by_type = defaultdict(lambda: {"calls": 0.0, "ms": 0.0, "forward": 0.0, "backward": 0.0, "update": 0.0})
    for o in ops:
        entry = by_type[o["type"]]
        entry["calls"] += o["calls"]
        entry["ms"] += o["ms"]
        entry[phase(o["name"])] += o["ms"]
    phases = {p: sum(o["ms"] for o in ops if phase(o["name"]) == p) for p in ("forward", "backward", "update")}
    print(f"\n{network}: {result['wall_ms']:.0f} ms per step (wall), operators {total:.0f} ms per step "
          f"(forward {phases['forward']:.0f}, backward {phases['backward']:.0f}, check + update "
          f"{phases['update']:.0f})")
    print(f"{'operator':<28}{'calls':>7}{'ms/step':>10}{'share':>8}   forward / backward / other ms")
    for name, e in sorted(by_type.items(), key=lambda kv: -kv[1]["ms"])[:top]:
        print(f"{name:<28}{e['calls']:>7.0f}{e['ms']:>10.1f}{100 * e['ms'] / total:>7.1f}%   "
              f"{e['forward']:.0f} / {e['backward']:.0f} / {e['update']:.0f}")
    print("slowest single operators (ms per call):")
    for o in sorted(ops, key=lambda o: -o["ms"] / max(o["calls"], 1))[:8]:
        print(f"  {o['ms'] / max(o['calls'], 1):8.1f}  {o['name']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default="r18,r50")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--warm_steps", type=int, default=60, help="start from the state after this many steps at "
                                                                   "lr 0.1 (bench/step_state.py); 0: initial weights")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate of the profiled steps")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--repo", default=ROOT, help="checkout whose src/ is profiled")
    parser.add_argument("--state_dir", default=os.path.join(ROOT, "outputs", "bench_state"))
    parser.add_argument("--torch", default="auto", help="python with torch to profile the PyTorch reference too: a "
                                                         "path, 'auto' (.venv-bench when present) or 'none'")
    parser.add_argument("--onednn", action="store_true", help="instead of the profilers: the oneDNN primitives of "
                                                             "one step, ours beside PyTorch's (ONEDNN_VERBOSE=1)")
    parser.add_argument("--torch_isa", default="native", help="instruction sets the PyTorch reference runs at, "
                        "comma-separated: 'native' (as installed: PyTorch's oneDNN uses AVX-512 where the CPU has "
                        "it) and/or a ONEDNN_MAX_CPU_ISA value such as AVX2 (ours' cap)")
    parser.add_argument("--json", help="also write the per-operator figures to this file")
    parser.add_argument("--_network", help=argparse.SUPPRESS)
    parser.add_argument("--_onednn", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._network:
        if args._onednn:
            print(json.dumps(onednn_step(os.path.abspath(args.repo), args._network, args.width, args.batch_size,
                                         args.num_classes, args.warm_steps, args.lr, args.state_dir)))
            return 0
        print(json.dumps(profile(os.path.abspath(args.repo), args._network, args.width, args.batch_size,
                                 args.num_classes, args.warm_steps, args.lr, args.steps, args.state_dir)))
        return 0
    sys.path.insert(0, HERE)
    import step_state
    ours_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "AVX2")
    verbose = {"ONEDNN_VERBOSE": "1"} if args.onednn else {}
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=ours_isa, GLOG_v="3", **verbose)
    torch_python = _torch_python(args.torch)
    results = {}
    for network in args.networks.split(","):
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--_network", network] + [
            f"--{k}={getattr(args, k)}" for k in ("width", "batch_size", "num_classes", "warm_steps", "lr", "steps",
                                                  "repo", "state_dir")] + (["--_onednn"] if args.onednn else []),
            env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        if args.onednn:
            runs = {"ours": primitives(done.stdout)}
        else:
            results[network] = json.loads(done.stdout.strip().splitlines()[-1])
            report(network, results[network], args.top)
        _, npz = step_state.state_paths(args.state_dir, network, args.width, args.batch_size, args.num_classes,
                                        args.warm_steps, 0.1)
        for isa in (args.torch_isa.split(",") if torch_python else []):
            torch_env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
            torch_env.update(verbose, **({} if isa == "native" else {"ONEDNN_MAX_CPU_ISA": isa}))
            done = subprocess.run([torch_python, os.path.join(HERE, "torch_iresnet.py"),
                                   "--onednn" if args.onednn else "--profile", "--network", network, "--width",
                                   str(args.width), "--num_classes", str(args.num_classes), "--batch_size",
                                   str(args.batch_size), "--npz", npz, "--lr", str(args.lr), "--steps",
                                   str(args.steps)], env=torch_env, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            if args.onednn:
                runs[f"PyTorch ({isa})"] = primitives(done.stdout)
            else:
                results[f"{network} PyTorch {isa}"] = json.loads(done.stdout.strip().splitlines()[-1])
                report_torch(f"{network} ({isa})", results[f"{network} PyTorch {isa}"], args.top)
        if args.onednn:
            results[network] = runs
            report_onednn(network, runs, args.top)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


def _torch_python(choice):
    if choice == "none":
        return None
    if choice != "auto":
        return choice
    path = os.path.join(ROOT, ".venv-bench", "bin", "python")
    return path if os.access(path, os.X_OK) else None


if __name__ == "__main__":
    sys.exit(main())
