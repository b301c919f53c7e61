"""Data-parallel training with 2 CPU workers launched by msrun."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MSRUN = Path(sys.executable).parent / "msrun"
STEPS = 3

pytestmark = [pytest.mark.dist, pytest.mark.slow,
              pytest.mark.skipif(not MSRUN.exists(), reason="msrun (MindSpore's launcher) is not installed")]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def msrun(script_and_args, log_dir, workers=2, timeout=420):
    # msrun starts the workers with the `python` found on PATH: make it this interpreter.
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'dist'}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [str(MSRUN), f"--worker_num={workers}", f"--local_worker_num={workers}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True", "--cluster_time_out=180"]
    result = subprocess.run(command + [str(a) for a in script_and_args], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    logs = "".join(p.read_text(errors="replace") for p in sorted(Path(log_dir).glob("worker_*.log")))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + logs[-4000:]
    return logs


def single_process_reference(out):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'dist'}")
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "dist" / "dp_reference.py"), str(out), str(STEPS)],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = dict(np.load(out / "reference.npz"))
    return dict(np.load(out / "initial.npz")), reference, reference.pop("losses")


def test_ranks_stay_identical_and_equal_single_process_training(tmp_path):
    """The project's train step on 2 ranks (backbone replicated, head sharded: each rank holds half of
    the classes) equals one process averaging the two shards' gradients of the full head."""
    msrun([ROOT / "tests" / "dist" / "dp_worker.py", tmp_path, STEPS], tmp_path / "logs")
    rank0, rank1 = (dict(np.load(tmp_path / f"rank{r}.npz")) for r in (0, 1))
    sharded = [n for n in rank0 if n.endswith("head.weight")]
    assert sharded == ["head.weight"] and rank0["head.weight"].shape[0] + rank1["head.weight"].shape[0] == 6
    rank0["head.weight"] = np.concatenate([rank0["head.weight"], rank1.pop("head.weight")])
    names = [n for n in rank0 if n not in ("losses", "head.weight")]
    assert len(names) > 50
    for name in names:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
    initial, reference, losses = single_process_reference(tmp_path)
    names.append("head.weight")
    assert set(reference) == set(names)
    # CPU kernels are not bit-deterministic, and the gradient of a BatchNorm beta followed by
    # another BatchNorm is mathematically ~0, i.e. rounding noise; so the parameters are compared as
    # one vector, relative to how far training moved them (repeated single-process runs differ by
    # up to ~2e-4 of it; summed instead of averaged gradients, or one rank's alone, by 50-100%).
    moved = np.sqrt(sum(((reference[n] - initial[n]) ** 2).sum() for n in names))
    apart = np.sqrt(sum(((rank0[n] - reference[n]) ** 2).sum() for n in names))
    assert moved > 0.1 and apart <= 1e-3 * moved, (apart, moved)
    # Every rank reports the loss of the global batch: the mean of the two shards' losses.
    np.testing.assert_allclose(rank0["losses"], losses.mean(axis=1), rtol=1e-4)
    np.testing.assert_allclose(rank1["losses"], losses.mean(axis=1), rtol=1e-4)


def test_train_py_under_msrun_shards_data_and_only_rank0_writes(tiny_data, tmp_path):
    out = tmp_path / "out"
    logs = msrun([ROOT / "train.py", "--data_url", tiny_data[0], "--train_url", out, "--network", "r18",
                  "--width", "8", "--batch_size", "4", "--epochs", "1", "--lr", "3.2", "--num_workers", "1",
                  "--log_interval", "1", "--device_num", "2"], tmp_path / "logs")
    log = (out / "train.log").read_text()
    # 64 images / (2 ranks x 4) = 8 steps per epoch; lr scaled by the global batch of 8.
    assert "2 x CPU" in log and "8 steps/epoch" in log and "lr 0.05" in log
    assert "epoch: 1 step: 8, loss is" in log
    # rank 0 writes the checkpoint, every rank the shard of the head it holds
    assert sorted(p.name for p in out.glob("ArcFace-*.ckpt")) == [
        "ArcFace-1_8.ckpt", "ArcFace-1_8.head-r0of2.ckpt", "ArcFace-1_8.head-r1of2.ckpt"]
    assert logs.count("saved checkpoint") == 1  # rank 1 logs nothing of its own
