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


def single_process_reference(out, recipe):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'dist'}")
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "dist" / "dp_reference.py"), str(out), str(STEPS),
                             recipe],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = dict(np.load(out / "reference.npz"))
    clip_factors = reference.pop("clip_factors")
    return dict(np.load(out / "initial.npz")), reference, reference.pop("losses"), clip_factors


@pytest.mark.parametrize("recipe", ["zoo", "arcface_torch"])
def test_ranks_stay_identical_and_equal_single_process_training(tmp_path, recipe):
    """The project's train step on 2 ranks (backbone replicated, head sharded: each rank holds half of
    the classes) equals one process averaging the two shards' gradients of the full head, with SGD,
    and with AdamW, weight decay on BatchNorm and a clipped backbone gradient (clipped after the
    ranks' gradients are summed, so the same on every rank)."""
    msrun([ROOT / "tests" / "dist" / "dp_worker.py", tmp_path, STEPS, recipe], tmp_path / "logs")
    rank0, rank1 = (dict(np.load(tmp_path / f"rank{r}.npz")) for r in (0, 1))
    sharded = [n for n in rank0 if n.endswith("head.weight")]
    assert sharded == ["head.weight"] and rank0["head.weight"].shape[0] + rank1["head.weight"].shape[0] == 6
    rank0["head.weight"] = np.concatenate([rank0["head.weight"], rank1.pop("head.weight")])
    names = [n for n in rank0 if n not in ("losses", "head.weight")]
    assert len(names) > 50
    for name in names:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
    initial, reference, losses, clip_factors = single_process_reference(tmp_path, recipe)
    assert recipe == "zoo" or (clip_factors < 1).all()  # the clip acted at every step
    names.append("head.weight")
    assert set(reference) == set(names)
    # CPU kernels are not bit-deterministic, and the gradient of a BatchNorm beta followed by
    # another BatchNorm is mathematically ~0, i.e. rounding noise; so the parameters are compared as
    # one vector, relative to how far training moved them (repeated single-process runs differ by
    # up to ~2e-4 of it; summed instead of averaged gradients, or one rank's alone, by 50-100%).
    # AdamW moves every parameter by about lr per step whatever the size of its gradient, so those
    # whose gradient is rounding noise drift apart by ~lr: a looser bound there (a wrong reduction or
    # clip would differ by 50-100% of the move).
    moved = np.sqrt(sum(((reference[n] - initial[n]) ** 2).sum() for n in names))
    apart = np.sqrt(sum(((rank0[n] - reference[n]) ** 2).sum() for n in names))
    assert moved > 0.1 and apart <= (1e-3 if recipe == "zoo" else 5e-3) * moved, (apart, moved)
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


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: two "nodes" with their own addresses on this
    machine, so that msrun starts its scheduler on node 0 only, as on a real cluster."""
    tag = f"af{os.getpid() % 100000}"
    hosts = [f"{tag}a", f"{tag}b"]
    commands = [["ip", "netns", "add", hosts[0]], ["ip", "netns", "add", hosts[1]],
                ["ip", "link", "add", f"{tag}0", "type", "veth", "peer", "name", f"{tag}1"],
                ["ip", "link", "set", f"{tag}0", "netns", hosts[0]],
                ["ip", "link", "set", f"{tag}1", "netns", hosts[1]],
                ["ip", "-n", hosts[0], "addr", "add", "10.251.0.1/24", "dev", f"{tag}0"],
                ["ip", "-n", hosts[1], "addr", "add", "10.251.0.2/24", "dev", f"{tag}1"]]
    for host, dev in zip(hosts, (f"{tag}0", f"{tag}1")):
        commands += [["ip", "-n", host, "link", "set", dev, "up"], ["ip", "-n", host, "link", "set", "lo", "up"]]
    try:
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot make network namespaces here ({' '.join(command)}: {done.stderr.strip()})")
        yield hosts
    finally:
        for host in hosts:
            subprocess.run(["ip", "netns", "del", host], capture_output=True)


def launch_node(host, node_rank, nodes, port, data, out, extra=(), epochs=1):
    """scripts/run_distribute_train_cpu.sh on `host` as node `node_rank` of `nodes`, one worker each."""
    env = dict(os.environ, NODES=str(nodes), NODE_RANK=str(node_rank), MASTER_ADDR="10.251.0.1",
               MASTER_PORT=str(port), OUT=str(out), PYTHON=sys.executable, CLUSTER_TIME_OUT="120",
               CONFIG=str(ROOT / "configs" / "demo.yaml"))
    command = ["ip", "netns", "exec", host, "bash", str(ROOT / "scripts" / "run_distribute_train_cpu.sh"), str(data),
               "1", "--network", "r18", "--width", "8", "--batch_size", "4", "--epochs", str(epochs), "--num_workers",
               "1", "--log_interval", "1", "--lr", "0.4"] + list(extra)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_two_nodes_train_to_a_checkpoint(two_hosts, tiny_data, tmp_path):
    """Two launcher invocations as two nodes of one worker each (RANK_SIZE=1, NODES=2, NODE_RANK=0/1)."""
    out, port = tmp_path / "out", free_port()
    nodes = [launch_node(host, rank, 2, port, tiny_data[0], out) for rank, host in enumerate(two_hosts)]
    outputs = [node.communicate(timeout=420)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "node 1 of 2, 1 x CPU here, 2 workers in all" in outputs[1]
    log = (out / "train.log").read_text()
    assert "2 x CPU" in log and "8 steps/epoch" in log  # 64 images / (2 workers x 4)
    # global rank 0 writes the checkpoint, every rank its head shard
    assert sorted(p.name for p in out.glob("ArcFace-*.ckpt")) == [
        "ArcFace-1_8.ckpt", "ArcFace-1_8.head-r0of2.ckpt", "ArcFace-1_8.head-r1of2.ckpt"]


def worker_pid(out, rank):
    """The training process of global rank `rank` writing into `out`."""
    for pid in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(out).encode() in cmdline and f"RANK_ID={rank}".encode() in environ \
                and b"MS_ROLE=MS_WORKER" in environ:
            return int(pid)
    return None


def test_a_dead_rank_ends_the_job_and_resume_auto_continues(two_hosts, tiny_data, tmp_path):
    """Node 1's worker is killed mid-run: node 0's worker must not wait in a collective forever; it
    stops within the cluster time-out with a clear line, and --resume auto (here on one process)
    continues from the newest checkpoint whose head shards are complete."""
    import signal
    import time
    out, port = tmp_path / "out", free_port()
    nodes = [launch_node(host, rank, 2, port, tiny_data[0], out, ["--save_interval", "4"], epochs=200)
             for rank, host in enumerate(two_hosts)]
    try:
        log = out / "train.log"
        deadline = time.time() + 300
        while time.time() < deadline and not (log.exists() and "epoch: 2 step: 2," in log.read_text()):
            time.sleep(0.5)
        victim = worker_pid(out, 1)
        assert victim, log.read_text()[-2000:] if log.exists() else "no log"
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        nodes[0].communicate(timeout=240)
        stopped_after = time.time() - killed
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
            node.communicate()
    assert nodes[0].returncode != 0 and stopped_after < 200, stopped_after
    worker0 = (out / "worker_0.log").read_text(errors="replace")
    assert "another rank or node has stopped" in worker0 or "another rank stopped answering" in worker0, worker0[-3000:]
    # msrun's scheduler (node 0) names the rank that stopped, never the survivor or the start-up.
    scheduler = (out / "scheduler.log").read_text(errors="replace")
    errors = [line for line in scheduler.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "rank 1 stopped answering during the run" in errors[0], scheduler[-3000:]
    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), "--train_url", str(out), "--resume", "auto",
                              "--epochs", "3", "--data_url", str(tiny_data[0])], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    text = (out / "train.log").read_text()
    assert "resumed from" in text and "nothing to do" not in text
