"""Data-parallel training speed and memory on this machine's CPU workers (figures, not a test).

  python bench/dp_speed.py --workers 2 --num_classes 50000 --steps 24
  python bench/dp_speed.py --repo /path/to/another/checkout ...   # the same run with other code

Runs `train.py` of each `--repo` (default: this checkout) under msrun with the same synthetic data
and options, alternating the checkouts `--rounds` times, and prints per checkout the training
throughput (median of the logged img/s after the first log line, which includes compilation) and
the peak resident memory of the largest worker. Use it to compare two versions side by side in
one run (e.g. `git worktree add /tmp/before HEAD~1`).
"""
import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from src.cli import run_main  # noqa: E402
from src.errors import ArcFaceError  # noqa: E402


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_once(repo, data, work, args):
    """(median img/s, peak RSS of the largest worker in MB) of one msrun launch of repo/train.py."""
    out = os.path.join(work, "out")
    shutil.rmtree(out, ignore_errors=True)
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), PYTHONPATH=repo)
    command = [os.path.join(bin_dir, "msrun"), f"--worker_num={args.workers}", f"--local_worker_num={args.workers}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", f"--log_dir={os.path.join(work, 'logs')}",
               "--join=True", "--cluster_time_out=300", os.path.join(repo, "train.py"),
               "--data_url", data, "--train_url", out, "--network", args.network, "--width", str(args.width),
               "--batch_size", str(args.batch_size), "--num_classes", str(args.num_classes), "--epochs", "100",
               "--max_steps", str(args.steps), "--log_interval", str(args.log_interval), "--num_workers", "1",
               "--save_interval", "0", "--device_num", str(args.workers)]
    # A fresh launcher process per run: its children's peak RSS is this run's alone.
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--_launch", json.dumps(command)], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=3600)
    peak_kb = int(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else 0
    log_path = os.path.join(out, "train.log")
    if done.returncode != 0 or not os.path.isfile(log_path):
        raise SystemExit(f"{repo}: msrun failed ({done.returncode})\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    with open(log_path, encoding="utf-8") as fh:
        rates = [float(m.group(1)) for m in re.finditer(r"loss is .*?, ([0-9.]+) img/s", fh.read())]
    if len(rates) < 2:
        raise SystemExit(f"{repo}: too few log lines to time; raise --steps")
    return statistics.median(rates[1:]), peak_kb / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", action="append", help="checkout to run (repeatable; default: this one)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--network", default="r18")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16, help="per worker")
    parser.add_argument("--num_classes", type=int, default=50000, help="head size (the data has 100 identities)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--log_interval", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per checkout")
    parser.add_argument("--_launch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._launch:  # run msrun, print the peak RSS (KB) of the largest descendant
        done = subprocess.run(json.loads(args._launch), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        return done.returncode
    from src.models import check_backbone_options
    check_backbone_options(args.network, width=args.width)  # one error line rather than a failed launch
    repos = [os.path.abspath(r) for r in (args.repo or [ROOT])]
    for repo in repos:
        if not os.path.isfile(os.path.join(repo, "train.py")):
            raise ArcFaceError(f"--repo {repo}: no train.py there (give a checkout of this project)")

    from prettytable import PrettyTable

    from src.data.demo_data import make_demo_data
    with tempfile.TemporaryDirectory() as work:
        data, _ = make_demo_data(os.path.join(work, "data"), num_train_ids=100, images_per_id=8, num_test_ids=10,
                                 num_pairs=20, seed=0, progress=False)
        results = {repo: [] for repo in repos}
        for round_ in range(args.rounds):
            for repo in repos:
                rate, rss = run_once(repo, data, work, args)
                results[repo].append((rate, rss))
                print(f"round {round_ + 1}: {repo}: {rate:.1f} img/s, largest worker peak RSS {rss:.0f} MB",
                      flush=True)
    table = PrettyTable(["checkout", "img/s (median of rounds)", "img/s per round", "peak RSS MB (max)"])
    for repo, rows in results.items():
        table.add_row([repo, f"{statistics.median(r for r, _ in rows):.1f}",
                       " ".join(f"{r:.1f}" for r, _ in rows), f"{max(m for _, m in rows):.0f}"])
    print(f"\n{args.workers} CPU workers, {args.network} width {args.width}, batch {args.batch_size} per worker, "
          f"{args.num_classes} classes, {args.steps} steps")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
