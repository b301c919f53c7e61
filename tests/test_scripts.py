"""The shell launchers: argument order, device selection and where results go."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, args, cwd, **env):
    environment = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(ROOT / "scripts" / name)] + [str(a) for a in args], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", ["run_eval.sh", "run_eval_ijbc.sh", "run_eval_onnx.sh", "run_eval_ijbc_onnx.sh",
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
