"""Training and inference speed of one or several checkouts, and of the PyTorch reference, side by side
(figures, not a test).

  python bench/train_speed.py --networks r18,r50 --rounds 3
  python bench/train_speed.py --repo /tmp/before --repo . --networks r50     # two versions of our code
  python bench/train_speed.py --torch .venv-bench/bin/python                 # with PyTorch beside ours
  python bench/train_speed.py --repo . --repo .@enable_graph_kernel=True     # a MindSpore context setting

Every variant starts from the same realistic state (bench/step_state.py: the network trained
--warm_steps steps at --lr on random batches, written once to --state_dir) and trains --steps steps
at --lr on the same fixed batches, in a fresh process of its own, the variants alternating for
--rounds rounds (A B C A B C ...): on a shared machine only figures from one run compare. Per process:
the median step's wall and CPU time (after the compilation step and one more), the peak resident
memory after training, then inference img/s of the backbone (MindSpore graph mode, ONNX Runtime on
the exported model; PyTorch eval mode). Per variant: the median over rounds, and the range.

With --torch, the PyTorch reference (bench/torch_iresnet.py, our own definition of the same network)
is first checked against ours on the same weights: trainable parameters, eval-mode embeddings,
train-mode loss and gradients on one batch; the check is printed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
HERE = os.path.dirname(os.path.abspath(__file__))


def _peak_mb():
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM"))


def _cpu_seconds():
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _setup(repo):
    """`repo` is a checkout, optionally followed by @key=value,... : MindSpore context settings to try
    (e.g. `.@enable_graph_kernel=True`); the settings are applied after runtime.setup."""
    repo, _, settings = repo.partition("@")
    sys.path.insert(0, repo)
    sys.path.insert(1, HERE)
    from src import runtime
    runtime.setup("CPU", seed=0, distributed=False)
    if settings:
        import ast

        import mindspore as ms
        for setting in settings.split(","):
            key, _, value = setting.partition("=")
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
            ms.set_context(**{key: value})


def measure_ours(repo, network, width, num_classes, batch_size, ckpt, lr, steps, onnx=True):
    """Figures of `repo`'s code from the state in `ckpt` (run in a fresh process)."""
    _setup(repo)
    import tempfile

    import mindspore as ms
    import step_state
    step, net = step_state.build(network, width, num_classes, lr)
    step_state.load(step, ckpt)
    data = [(ms.Tensor(x), ms.Tensor(y)) for x, y in step_state.batches(batch_size, num_classes)]
    tick = time.perf_counter()
    step(*data[0])[0].asnumpy()
    compile_s = time.perf_counter() - tick
    step(*data[1])[0].asnumpy()
    wall, cpu = [], []
    for i in range(steps):
        tick, used = time.perf_counter(), _cpu_seconds()
        loss, overflow, _ = step(*data[i % len(data)])
        loss = float(loss.asnumpy())
        wall.append((time.perf_counter() - tick) * 1000)
        cpu.append((_cpu_seconds() - used) * 1000)
        if bool(overflow.asnumpy()):
            raise SystemExit("a timed step overflowed")
    result = {"wall_ms": wall, "cpu_ms": cpu, "compile_s": compile_s, "train_peak_mb": _peak_mb(), "loss": loss}
    backbone = net.backbone
    backbone.set_train(False)
    images = data[0][0]
    backbone(images).asnumpy()
    tick = time.perf_counter()
    for i in range(steps):
        backbone(data[i % len(data)][0]).asnumpy()
    result["infer_ips"] = batch_size * steps / (time.perf_counter() - tick)
    if onnx:
        from src.deploy.exporting import export_backbone
        from src.evaluation.embedders import OnnxEmbedder
        with tempfile.TemporaryDirectory() as folder:
            ort = OnnxEmbedder(export_backbone(backbone, os.path.join(folder, "model"), "ONNX"))
            arrays = [x.asnumpy() for x, _ in data]
            ort(arrays[0])
            tick = time.perf_counter()
            for i in range(steps):
                ort(arrays[i % len(arrays)])
            result["infer_ort_ips"] = batch_size * steps / (time.perf_counter() - tick)
    return result


def parity_ours(network, width, num_classes, batch_size, ckpt, out):
    """Write what the PyTorch side compares against: weights, a batch, eval-mode embeddings, train-mode
    loss and gradients (no update)."""
    _setup(ROOT)
    import mindspore as ms
    import numpy as np
    import step_state

    from src.training.step import Gradients
    step, net = step_state.build(network, width, num_classes, 0.0)
    step_state.load(step, ckpt)
    images, labels = step_state.batches(batch_size, num_classes, count=1, seed=7)[0]
    arrays = {"w." + p.name: p.asnumpy().copy() for p in net.get_parameters()}  # asnumpy shares memory
    net.backbone.set_train(False)
    arrays["embeddings"] = net.backbone(ms.Tensor(images)).asnumpy()
    net.set_train(True)
    weights = ms.ParameterTuple(net.trainable_params())
    loss, grads = Gradients(net, weights)(ms.Tensor(images), ms.Tensor(labels), ms.Tensor(1.0, ms.float32))
    arrays.update({"g." + p.name: g.asnumpy() for p, g in zip(weights, grads)})
    arrays.update(images=images, labels=labels, loss=loss.asnumpy(), meta_network=np.array(network),
                  meta_width=np.array(width), meta_classes=np.array(num_classes),
                  meta_params=np.array(sum(p.size for p in net.backbone.trainable_params())))
    np.savez(out, **arrays)
    return {"written": out}


def _run(python, args, repo=ROOT, timeout=3600, isa=None):
    """Run a worker; `isa` "native" lets its oneDNN use what the CPU has, else the cap (ours: AVX2)."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa or os.environ.get("ONEDNN_MAX_CPU_ISA", "AVX2"), GLOG_v="3")
    if isa == "native":
        del env["ONEDNN_MAX_CPU_ISA"]
    done = subprocess.run([python] + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=repo)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _absolute(spec):
    path, at, settings = spec.partition("@")
    return os.path.abspath(path) + at + settings


def default_torch():
    """The bench environment's python when `make bench-torch` made it, else None."""
    path = os.path.join(ROOT, ".venv-bench", "bin", "python")
    return path if os.access(path, os.X_OK) else None


def summarise(rows, batch_size):
    """img/s per round from the median step, and (median, low, high) over rounds."""
    rates = [batch_size * 1000 / statistics.median(r["wall_ms"]) for r in rows]
    cpu = [statistics.median(r["cpu_ms"]) for r in rows]
    return {"train": (statistics.median(rates), min(rates), max(rates)), "rates": rates,
            "cpu_ms": statistics.median(cpu),
            "infer": statistics.median(r["infer_ips"] for r in rows),
            "infer_ort": statistics.median(r["infer_ort_ips"] for r in rows) if "infer_ort_ips" in rows[0] else None,
            "peak": max(r["train_peak_mb"] for r in rows), "loss": rows[-1]["loss"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default="r18,r50")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate of the warm-up and the timed steps")
    parser.add_argument("--warm_steps", type=int, default=60, help="steps trained before timing (cached)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repo", action="append", help="checkout to measure (repeatable; default: this one)")
    parser.add_argument("--torch", default="auto", help="python with torch for the reference: a path, 'auto' "
                                                         "(.venv-bench when present) or 'none'")
    parser.add_argument("--torch_isa", default="native,AVX2",
                        help="instruction sets the PyTorch reference runs at, comma-separated: 'native' (as "
                             "installed: its oneDNN uses AVX-512 where the CPU has it) and/or a ONEDNN_MAX_CPU_ISA "
                             "value such as AVX2, the cap ours needs (src/runtime.py)")
    parser.add_argument("--no_onnx", action="store_true", help="skip ONNX Runtime inference")
    parser.add_argument("--state_dir", default=os.path.join(ROOT, "outputs", "bench_state"))
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common = ["--width", str(args.width), "--num_classes", str(args.num_classes), "--batch_size",
              str(args.batch_size), "--lr", str(args.lr)]
    if args._worker:
        kind, repo, network = args._worker.split("|")
        if kind == "state":
            sys.path.insert(0, repo)
            sys.path.insert(1, HERE)
            from src import runtime
            runtime.setup("CPU", seed=0, distributed=False)
            import step_state
            out = step_state.make_state(network, args.width, args.batch_size, args.num_classes, args.warm_steps,
                                        args.lr, args.state_dir)
            result = {"losses": out}
        elif kind == "parity":
            result = parity_ours(network, args.width, args.num_classes, args.batch_size, args._ckpt,
                                 os.path.join(args.state_dir, f"parity_{network}.npz"))
        else:
            result = measure_ours(repo, network, args.width, args.num_classes, args.batch_size, args._ckpt,
                                  args.lr, args.steps, onnx=not args.no_onnx)
        print(json.dumps(result))
        return 0

    sys.path.insert(0, HERE)
    import step_state
    torch_python = default_torch() if args.torch == "auto" else (None if args.torch == "none" else args.torch)
    repos = [_absolute(r) for r in (args.repo or [ROOT])]
    me = os.path.abspath(__file__)
    torch_worker = os.path.join(HERE, "torch_iresnet.py")
    report = {"batch_size": args.batch_size, "num_classes": args.num_classes, "lr": args.lr,
              "warm_steps": args.warm_steps, "cpu_count": os.cpu_count(), "networks": {}}
    for network in args.networks.split(","):
        ckpt, npz = step_state.state_paths(args.state_dir, network, args.width, args.batch_size, args.num_classes,
                                           args.warm_steps, args.lr)
        if not (os.path.isfile(ckpt) and os.path.isfile(npz)):
            print(f"{network}: training {args.warm_steps} warm-up steps at lr {args.lr} (once; cached in "
                  f"{args.state_dir})", flush=True)
            losses = _run(sys.executable, [me, "--_worker", f"state|{repos[0]}|{network}", "--warm_steps",
                                           str(args.warm_steps), "--state_dir", args.state_dir] + common)["losses"]
            if losses:
                print(f"  loss {losses[0]:.2f} -> {losses[-1]:.2f}", flush=True)
        if torch_python:
            _run(sys.executable, [me, "--_worker", f"parity|{ROOT}|{network}", "--_ckpt", ckpt, "--state_dir",
                                  args.state_dir] + common)
            check = _run(torch_python, [torch_worker, "--parity", os.path.join(args.state_dir,
                                                                               f"parity_{network}.npz")],
                         isa="native")
            print(f"{network} PyTorch reference on the same weights: trainable parameters {check['params_torch']:,} "
                  f"(ours {check['params_ours']:,}); eval embeddings max |diff| {check['embedding_max_abs']:.1e} "
                  f"(values up to {check['embedding_scale']:.1f}); train loss {check['loss_torch']:.6f} "
                  f"(ours {check['loss_ours']:.6f}); gradients max |diff| / max |g| {check['grad_max_rel']:.1e} "
                  f"(backbone, worst {check['grad_worst']}), {check['head_grad_max_rel']:.1e} (head)", flush=True)
        variants = [(repo, None, [sys.executable, me, "--_worker", f"ours|{repo}|{network}", "--_ckpt", ckpt,
                                  "--steps", str(args.steps)] + common + (["--no_onnx"] if args.no_onnx else []))
                    for repo in repos]
        for isa in (args.torch_isa.split(",") if torch_python else []):
            variants.append((_torch_name(isa), isa, [torch_python, torch_worker, "--network", network, "--npz", npz,
                                                     "--steps", str(args.steps)] + common))
        rows = {name: [] for name, _, _ in variants}
        for round_ in range(args.rounds):
            for name, isa, command in variants:
                folder = name.partition("@")[0]
                row = _run(command[0], command[1:], repo=folder if os.path.isdir(folder) else ROOT, isa=isa)
                rows[name].append(row)
                rate = args.batch_size * 1000 / statistics.median(row["wall_ms"])
                print(f"  {network} round {round_ + 1}: {name}: {rate:.2f} img/s train, {row['infer_ips']:.1f} infer",
                      flush=True)
        if args.rounds:
            report["networks"][network] = {name: summarise(r, args.batch_size) for name, r in rows.items()}
    print_table(report, torch_python is not None)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return 0


def _torch_name(isa):
    return "PyTorch" if isa == "native" else f"PyTorch {isa}"


def print_table(report, with_torch):
    print(f"\nfp32, batch {report['batch_size']}, {report['num_classes']} classes, SGD lr {report['lr']} after "
          f"{report['warm_steps']} warm-up steps, {report['cpu_count']} CPU cores; img/s median of rounds [range]")
    header = ["network", "variant", "train img/s", "CPU ms/step", "infer MindSpore", "infer ONNX Runtime",
              "infer PyTorch", "train peak MB"]
    torch_names = sorted({name for variants in report["networks"].values() for name in variants
                          if name.startswith("PyTorch")}, key=len)
    if with_torch:
        header += [f"train / {name}" for name in torch_names] + [f"best infer / {name}" for name in torch_names]
    print(" | ".join(header))
    for network, variants in report["networks"].items():
        for name, s in variants.items():
            train = f"{s['train'][0]:.2f} [{s['train'][1]:.2f}-{s['train'][2]:.2f}]"
            is_torch = name.startswith("PyTorch")
            cells = [network, name if is_torch else os.path.basename(name) or name, train, f"{s['cpu_ms']:.0f}",
                     "" if is_torch else f"{s['infer']:.1f}",
                     "" if is_torch or s["infer_ort"] is None else f"{s['infer_ort']:.1f}",
                     f"{s['infer']:.1f}" if is_torch else "", f"{s['peak']:.0f}"]
            if with_torch:
                if is_torch:
                    cells += [""] * (2 * len(torch_names))
                else:
                    best = max(s["infer"], s["infer_ort"] or 0)
                    cells += [f"{s['train'][0] / variants[t]['train'][0]:.2f}" if t in variants else ""
                              for t in torch_names]
                    cells += [f"{best / variants[t]['infer']:.2f}" if t in variants else "" for t in torch_names]
            print(" | ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
