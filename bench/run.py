"""`make bench`: what this machine does with each backbone, in one table (figures, not a test).

  python bench/run.py                                   # r18, r50, mbf, vit_t; a few minutes on 2 cores
  python bench/run.py --networks r50 --steps 5 --json bench.json

Per backbone, each in a fresh process (so that its peak memory is its own):
  GFLOPs/img    floating-point operations of one 112x112 forward pass (2 x the multiply-adds that
                insightface's tables call "GFLOPs": r100 24.2 = 2 x 12.1)
  train img/s   one training step (backbone + ArcFace head with --num_classes classes + SGD, fp32,
                graph mode) at --batch_size, after compilation
  infer img/s   inference at --batch_size: MindSpore graph mode, and ONNX Runtime on the exported model
  peak MB       the process's peak resident memory (training and inference)
  % peak        achieved GFLOP/s as a share of this machine's single-precision matmul peak, measured
                in the same run (a numpy float32 4096^2 matmul); training counts 3 forward passes per
                image (forward + backward)
Plus the data pipeline's rate (decode, flip, normalise, batch) per source kind and worker count, and
how many images per second an r50 training step needs, for comparison.

When the PyTorch bench environment exists (`make bench-torch` makes .venv-bench), r18 and r50 are
then also measured beside PyTorch by bench/train_speed.py: the same network checked equal, trained
from the same realistic state, ours and PyTorch alternating in rounds, train and inference img/s and
their ratio.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from src.cli import run_main  # noqa: E402
from src.errors import ArcFaceError  # noqa: E402


def matmul_peak(n=4096, repeats=3):
    """GFLOP/s of a float32 n x n matmul (numpy's BLAS, all cores): the ceiling to compare with."""
    import numpy as np
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn):
    tick = time.perf_counter()
    fn()
    return time.perf_counter() - tick


def _peak_mb():
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM"))


def measure_backbone(network, batch_size, num_classes, steps, width):
    """Figures of one backbone (run in its own process)."""
    from src import runtime
    runtime.setup("CPU", seed=0, distributed=False)
    import mindspore as ms
    import numpy as np

    from src.config import TrainConfig
    from src.deploy.exporting import export_backbone
    from src.evaluation.embedders import OnnxEmbedder
    from src.models.flops import gmacs
    from src.training.lr_schedule import LRSchedule
    from src.training.trainer import build_network, build_step

    cfg = TrainConfig(network=network, width=width)
    net = build_network(cfg, num_classes)
    macs = gmacs(net.backbone)
    # Learning rate 0: the step does all its work, but the weights stay put, so the figure does not
    # depend on where a few random-data updates moved them (PReLU's CPU kernels run at a
    # data-dependent speed; see bench/README.md).
    step = build_step(cfg, net, LRSchedule.constant(0.0), fp16=False)
    step.set_train(True)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.uniform(-1, 1, (batch_size, 3, 112, 112)).astype(np.float32))
    y = ms.Tensor(rng.integers(0, num_classes, batch_size).astype(np.int32))
    compile_s = _timed(lambda: step(x, y)[0].asnumpy())

    def train():
        for _ in range(steps):
            out = step(x, y)
        out[0].asnumpy()
    train_ips = batch_size * steps / _timed(train)

    backbone = net.backbone
    backbone.set_train(False)
    backbone(x).asnumpy()
    ms_ips = batch_size * steps / _timed(lambda: [backbone(x).asnumpy() for _ in range(steps)])
    with tempfile.TemporaryDirectory() as folder:
        onnx = OnnxEmbedder(export_backbone(backbone, os.path.join(folder, "model"), "ONNX"))
        batch = x.asnumpy()
        onnx(batch)
        ort_ips = batch_size * steps / _timed(lambda: [onnx(batch) for _ in range(steps)])
    return {"network": network, "width": width, "gflops": 2 * macs, "compile_s": compile_s, "train_ips": train_ips,
            "infer_ms_ips": ms_ips, "infer_ort_ips": ort_ips, "peak_mb": _peak_mb()}


def measure_data(workers_list, images=1200):
    """Images/s of the training pipeline per source kind and worker count."""
    from src import runtime
    runtime.setup("CPU", seed=0, distributed=False)
    from src import mindrecord, rec2jpg_dataset
    from src.data.demo_data import make_demo_data
    from src.data.pipeline import create_train_dataset
    from src.data.sources import open_source

    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        rec, _ = make_demo_data(os.path.join(folder, "demo"), num_train_ids=images // 20, images_per_id=20,
                                num_test_ids=2, num_pairs=10, seed=0, progress=False)
        kinds = {"recordio": rec, "imagefolder": os.path.join(folder, "jpg"),
                 "mindrecord": os.path.join(folder, "mr")}
        rec2jpg_dataset.convert(rec, kinds["imagefolder"], no_progress=True)
        mindrecord.convert(rec, kinds["mindrecord"], no_progress=True)
        for kind, path in kinds.items():
            for workers in workers_list:
                dataset = create_train_dataset(open_source(path), 32, num_workers=workers)
                iterator = dataset.create_tuple_iterator(num_epochs=2, output_numpy=True)
                next(iterator)  # the pipeline starts
                count, tick = 0, time.perf_counter()
                for images_batch, _ in iterator:
                    count += len(images_batch)
                rates[f"{kind}/{workers}"] = count / (time.perf_counter() - tick)
    return rates


def _in_subprocess(args):
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=os.environ.get("ONEDNN_MAX_CPU_ISA", "AVX2"), GLOG_v="3")
    done = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, env=env, capture_output=True, text=True,
                          timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"bench {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default="r18,r50,mbf,vit_t", help="comma-separated backbones")
    parser.add_argument("--width", type=int, default=64, help="iresnet/ViT width (64 = the published networks)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after the compilation step)")
    parser.add_argument("--workers", default="1,2", help="data pipeline worker counts to measure")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--torch", default="auto", help="python of the PyTorch bench environment for the side-by-side "
                                                         "comparison: a path, 'auto' (.venv-bench when present) or "
                                                         "'none'")
    parser.add_argument("--_backbone", help=argparse.SUPPRESS)
    parser.add_argument("--_data", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._backbone:
        print(json.dumps(measure_backbone(args._backbone, args.batch_size, args.num_classes, args.steps,
                                          args.width if args._backbone != "mbf" else 64)))
        return 0
    from src.models import check_backbone_options
    networks = args.networks.split(",")
    for network in networks:  # one error line here rather than a failed worker process later
        check_backbone_options(network, width=args.width if network != "mbf" else 64)
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        raise ArcFaceError(f"--workers takes comma-separated worker counts, not {args.workers!r}") from None
    if args._data:
        print(json.dumps(measure_data(workers)))
        return 0

    from prettytable import PrettyTable
    peak = matmul_peak()
    print(f"single-precision matmul peak of this machine: {peak:.0f} GFLOP/s ({os.cpu_count()} cores)", flush=True)
    rows = []
    for network in networks:
        row = _in_subprocess(["--_backbone", network, "--batch_size", str(args.batch_size), "--num_classes",
                              str(args.num_classes), "--steps", str(args.steps), "--width", str(args.width)])
        row["train_share"] = row["train_ips"] * 3 * row["gflops"] / peak
        row["infer_ms_share"] = row["infer_ms_ips"] * row["gflops"] / peak
        row["infer_ort_share"] = row["infer_ort_ips"] * row["gflops"] / peak
        rows.append(row)
        print(f"measured {network}", flush=True)
    table = PrettyTable(["network", "GFLOPs/img", "train img/s", "infer img/s MindSpore", "infer img/s ONNX Runtime",
                         "ORT / MS", "peak MB", "% peak: train / infer MS / infer ORT"])
    for r in rows:
        table.add_row([r["network"], f"{r['gflops']:.2f}", f"{r['train_ips']:.2f}", f"{r['infer_ms_ips']:.2f}",
                       f"{r['infer_ort_ips']:.2f}", f"{r['infer_ort_ips'] / r['infer_ms_ips']:.2f}x",
                       f"{r['peak_mb']:.0f}", f"{100 * r['train_share']:.0f} / {100 * r['infer_ms_share']:.0f} / "
                       f"{100 * r['infer_ort_share']:.0f}"])
    table.align = "r"
    print(f"\nfp32, batch {args.batch_size}, {args.num_classes} classes, graph mode, {os.cpu_count()} CPU cores")
    print(table)

    data = _in_subprocess(["--_data", "--workers", args.workers])
    kinds = sorted({key.split("/")[0] for key in data})
    data_table = PrettyTable(["source"] + [f"{w} worker(s) img/s" for w in workers])
    for kind in kinds:
        data_table.add_row([kind] + [f"{data[f'{kind}/{w}']:.0f}" for w in workers])
    data_table.align = "r"
    need = next((r["train_ips"] for r in rows if r["network"] == "r50"), None)
    print("\ndata pipeline (decode + flip + normalise + batch of 32)"
          + (f"; an r50 training step needs {need:.1f} img/s" if need else ""))
    print(data_table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"matmul_peak_gflops": peak, "cpu_count": os.cpu_count(), "batch_size": args.batch_size,
                       "num_classes": args.num_classes, "backbones": rows, "data_pipeline_ips": data}, fh, indent=2)
        print(f"wrote {args.json}")
    torch_python = _torch_python(args.torch)
    if torch_python:
        compared = [n for n in networks if n in ("r18", "r50")]
        if compared:
            print(f"\n{', '.join(compared)} beside PyTorch (bench/train_speed.py):", flush=True)
            done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_speed.py"), "--networks",
                                   ",".join(compared), "--batch_size", str(args.batch_size), "--num_classes",
                                   str(args.num_classes), "--torch", torch_python], timeout=4 * 3600)
            if done.returncode != 0:
                raise SystemExit("bench/train_speed.py failed")
    else:
        print("\n(no PyTorch bench environment: `make bench-torch` adds the comparison with PyTorch)")
    return 0


def _torch_python(choice):
    if choice == "none":
        return None
    if choice != "auto":
        return choice
    path = os.path.join(ROOT, ".venv-bench", "bin", "python")
    return path if os.access(path, os.X_OK) else None


if __name__ == "__main__":
    sys.exit(run_main(main))
