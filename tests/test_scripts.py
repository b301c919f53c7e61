"""The shell launchers: argument order, device selection and where results go."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, args, cwd, **env):
    environment = dict(os.environ, **dict({"PYTHON": sys.executable}, **env))
    return subprocess.run(["bash", str(ROOT / "scripts" / name)] + [str(a) for a in args], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", ["run_eval.sh", "run_eval_gpu.sh", "run_eval_ijbc.sh", "run_eval_ijbc_gpu.sh",
                                  "run_eval_onnx.sh", "run_eval_ijbc_onnx.sh",
                                  "run_standalone_train.sh", "run_distribute_train.sh",
                                  "run_distribute_train_gpu.sh", "run_distribute_train_cpu.sh", "run_310_infer.sh"])
def test_usage_without_arguments(name, tmp_path):
    result = run_script(name, [], tmp_path)
    assert result.returncode == 2 and "usage: bash" in result.stderr


def test_run_eval_on_cpu_writes_eval_log(trained_run, tiny_data, tmp_path):
    result = run_script("run_eval.sh", [tiny_data[1].parent, trained_run, "0", "--target", "demo"], tmp_path,
                        DEVICE_TARGET="CPU")
    assert result.returncode == 0, result.stderr
    assert "[demo]Accuracy-Flip:" in (tmp_path / "eval.log").read_text()


@pytest.mark.slow
def test_standalone_cpu_training_writes_to_the_device_folder(tiny_data, tmp_path):
    result = run_script("run_standalone_train_cpu.sh", [tiny_data[0], "--network", "r18", "--width", "8",
                                                         "--batch_size", "8", "--max_steps", "2", "--num_workers", "1"],
                        tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "standalone_train" / "device0" / "ArcFace-1_2.ckpt").is_file()


def test_ijb_scripts_reject_an_unknown_target(tmp_path):
    result = run_script("run_eval_ijbc.sh", [tmp_path, tmp_path / "x.ckpt", "IJBX"], tmp_path)
    assert result.returncode == 2 and "neither IJBB nor IJBC" in result.stderr
    result = run_script("run_eval_ijbc_onnx.sh", [tmp_path, tmp_path / "x.onnx", "nope", "CPU"], tmp_path)
    assert result.returncode == 2 and "usage: bash" in result.stderr


def echo_python(tmp_path):
    """A stand-in interpreter that prints the command line it was given."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\necho \"$@\"\n")
    fake.chmod(0o755)
    return str(fake)


def test_gpu_ijb_script_runs_val_on_the_gpu(tmp_path):
    (tmp_path / "IJBB").mkdir()
    result = run_script("run_eval_ijbc_gpu.sh", [tmp_path / "IJBB", tmp_path / "x.ckpt", "IJBB", "3"], tmp_path,
                        PYTHON=echo_python(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "--target IJBB" in result.stdout and "--device_target GPU --device_id 3" in result.stdout


def test_multi_node_variables_are_checked_and_passed_to_msrun(tmp_path):
    result = run_script("run_distribute_train_cpu.sh", [tmp_path, "2"], tmp_path, NODES="2", NODE_RANK="2")
    assert result.returncode == 2 and "NODE_RANK one of 0 .. NODES-1" in result.stderr
    fake_msrun = tmp_path / "msrun"
    fake_msrun.write_text("#!/usr/bin/env bash\necho msrun \"$@\"\n")
    fake_msrun.chmod(0o755)
    result = run_script("run_distribute_train_cpu.sh", [tmp_path, "8"], tmp_path, NODES="2", NODE_RANK="1",
                        MASTER_ADDR="10.0.0.5", MASTER_PORT="9000", MSRUN=str(fake_msrun), OUT=str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert ("--worker_num=16 --local_worker_num=8 --node_rank=1 --master_addr=10.0.0.5 --master_port=9000"
            in result.stdout) and "--device_num 16" in result.stdout


@pytest.mark.parametrize("args, named", [(["bench/run.py", "--networks", "r18,r999"], "unknown backbone 'r999'"),
                                         (["bench/run.py", "--workers", "1,x"], "--workers"),
                                         (["bench/step_overhead.py", "--network", "r999"], "unknown backbone 'r999'"),
                                         (["bench/dp_speed.py", "--network", "r999"], "unknown backbone 'r999'"),
                                         (["bench/dp_speed.py", "--repo", "/nonexistent-checkout"],
                                          "/nonexistent-checkout: no train.py")])
def test_benchmarks_refuse_bad_arguments_with_one_line(args, named):
    """Checked before any worker process starts: one `error:` line, exit code 2, nothing measured."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable] + args, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert done.stdout == ""


@pytest.mark.parametrize("has_venv, given, expected", [(True, None, "{root}/.venv/bin/python"), (False, None, "python"),
                                                       (True, "/opt/py/bin/python3", "/opt/py/bin/python3")])
def test_the_launchers_prefer_the_repositorys_venv(tmp_path, has_venv, given, expected):
    """After `make demo` the README's script commands work in a new shell: without $PYTHON the
    launchers take the repository's .venv (made by make), else `python`; $PYTHON always wins."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "env.sh").write_text((ROOT / "scripts" / "env.sh").read_text())
    if has_venv:
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / ".venv" / "bin" / "python").write_text("#!/bin/sh\n")
        (root / ".venv" / "bin" / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    if given:
        env["PYTHON"] = given
    done = subprocess.run(["bash", "-c", f'set -euo pipefail; . "{root}/scripts/env.sh"; echo "$PYTHON"'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == expected.format(root=root), done.stderr
