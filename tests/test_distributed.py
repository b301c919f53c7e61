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

pytestmark = pytest.mark.skipif(not MSRUN.exists(), reason="msrun (MindSpore's launcher) is not installed")


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


def single_process_reference():
    """The same steps in one process: per-shard gradients (each shard with its own BatchNorm
    batch statistics, as on its device) averaged, then the same SGD update."""
    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    from dp_common import CFG, NUM_CLASSES, global_batch
    from src import runtime
    from src.trainer import build_network, parameter_groups
    import mindspore as ms
    from mindspore import nn

    runtime.setup("CPU", mode="pynative", seed=11, distributed=False)
    net = build_network(CFG, NUM_CLASSES)
    net.set_train(True)
    optimizer = nn.SGD(parameter_groups(net, CFG.weight_decay), learning_rate=0.1, momentum=CFG.momentum)
    grad_fn = ms.value_and_grad(net, None, optimizer.parameters)
    images, labels = global_batch()
    half = len(images) // 2
    losses = []
    for _ in range(STEPS):
        shard_losses, shard_grads = [], []
        for rows in (slice(0, half), slice(half, None)):
            loss, grads = grad_fn(ms.Tensor(images[rows]), ms.Tensor(labels[rows]))
            shard_losses.append(float(loss.asnumpy()))
            shard_grads.append(grads)
        optimizer(tuple((a + b) / 2 for a, b in zip(*shard_grads)))
        losses.append(shard_losses)
    ms.set_context(mode=ms.GRAPH_MODE)
    return {p.name: p.asnumpy() for p in net.trainable_params()}, np.array(losses)


def test_ranks_stay_identical_and_equal_single_process_training(tmp_path):
    msrun([ROOT / "tests" / "dist" / "dp_worker.py", tmp_path, STEPS], tmp_path / "logs")
    rank0, rank1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    names = [n for n in rank0.files if n != "losses"]
    assert len(names) > 50
    for name in names:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
    reference, losses = single_process_reference()
    assert set(reference) == set(names)
    for name in names:
        np.testing.assert_allclose(rank0[name], reference[name], rtol=1e-4, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(rank0["losses"], losses[:, 0], rtol=1e-4)
    np.testing.assert_allclose(rank1["losses"], losses[:, 1], rtol=1e-4)
    # Training really moved the parameters.
    assert not np.allclose(reference["head.weight"], 0)


def test_train_py_under_msrun_shards_data_and_only_rank0_writes(tiny_data, tmp_path):
    out = tmp_path / "out"
    logs = msrun([ROOT / "train.py", "--data_url", tiny_data[0], "--train_url", out, "--network", "r18",
                  "--width", "8", "--batch_size", "4", "--epochs", "1", "--lr", "3.2", "--num_workers", "1",
                  "--log_interval", "1", "--device_num", "2"], tmp_path / "logs")
    log = (out / "train.log").read_text()
    # 64 images / (2 ranks x 4) = 8 steps per epoch; lr scaled by the global batch of 8.
    assert "2 x CPU" in log and "8 steps/epoch" in log and "lr 0.05" in log
    assert "epoch: 1 step: 8, loss is" in log
    assert [p.name for p in out.glob("ArcFace-*.ckpt")] == ["ArcFace-1_8.ckpt"]
    assert logs.count("saved checkpoint") == 1  # rank 1 logs nothing of its own
