"""The C++ inference app (ascend310_infer/): build.sh finds the MindSpore C++ API, the app compiles and
links against MindSpore Lite, and its argument and input checks fail clearly.

The Lite package (2.0.0, the mindspore-lite wheel unzipped: headers + shared libraries) is fetched once
by scripts/fetch_mindspore_lite.sh into ~/.cache/arcface-ms (or $XDG_CACHE_HOME, or
$ARCFACE_LITE_DIR); set MINDSPORE_PATH to test against another install instead.

Lite 2.0.0 reads MindIR version 1, MindSpore 2.10 writes version 3, so an exported ArcFace backbone
cannot run here (tested: the app reports it). To run the app's inference loop all the same (resize,
predict, output and timing files), the tests export single-operator graphs (ReLU, Flatten) whose
encoding did not change and relabel their MindIR version as 1: a test device, not a conversion.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "ascend310_infer"
FETCH = ROOT / "scripts" / "fetch_mindspore_lite.sh"
FACE_BYTES = 3 * 112 * 112 * 4
NO_INSTALL_ENV = {"MINDSPORE_PATH": "", "LITE_HOME": "", "ARCFACE_NO_PIP_SEARCH": "1"}

pytestmark = pytest.mark.cpp


def _env(**overrides):
    env = dict(os.environ)
    env.update(overrides)
    return env


def _run(cmd, timeout=300, **kwargs):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)


def _has_api(path):
    return (Path(path) / "include/api/model.h").is_file() or (Path(path) / "runtime/include/api/model.h").is_file()


def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def lite_path():
    """A folder holding the MindSpore C++ API (include/api/model.h and the libraries)."""
    if shutil.which("bash") is None or shutil.which("cmake") is None or not _compiler():
        pytest.skip("building ascend310_infer needs bash, cmake and a C++ compiler")
    given = os.environ.get("MINDSPORE_PATH")
    if given and _has_api(given):
        return Path(given)
    done = _run(["bash", FETCH], timeout=900, env=_env(PYTHON=sys.executable))
    if done.returncode == 3:
        pytest.skip("cannot download mindspore-lite (no network?): " + done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert (path / "include/api/model.h").is_file()
    return path


@pytest.fixture(scope="module")
def app_copy(tmp_path_factory):
    """The app's sources in a scratch folder, so building leaves the work tree alone."""
    dest = tmp_path_factory.mktemp("infer_app") / "ascend310_infer"
    shutil.copytree(APP, dest, ignore=shutil.ignore_patterns("out"))
    return dest


@pytest.fixture(scope="module")
def binary(lite_path, app_copy):
    done = _run(["bash", app_copy / "build.sh"], env=_env(MINDSPORE_PATH=str(lite_path), LITE_HOME=""))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "found via MINDSPORE_PATH" in done.stdout
    main = app_copy / "out" / "main"
    assert main.is_file() and os.access(main, os.X_OK)
    return main


@pytest.fixture()
def faces(tmp_path):
    """An input folder with two batches (2 faces and 1 face) of float32 NCHW data."""
    folder = tmp_path / "input"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rng.standard_normal((2, 3, 112, 112), dtype=np.float32).tofile(folder / "b_0001.bin")
    rng.standard_normal((1, 3, 112, 112), dtype=np.float32).tofile(folder / "b_0002.bin")
    return folder


def _app_args(tmp_path, mindir, input_dir, *extra):
    return ["--mindir_path", mindir, "--input0_path", input_dir, "--device_type", "CPU",
            "--output_dir", tmp_path / "result_Files", "--time_dir", tmp_path / "time_Result", *extra]


# --- build.sh without an install: only bash is needed -------------------------------------------

@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_build_sh_rejects_folder_without_headers(tmp_path):
    done = _run(["bash", APP / "build.sh"], env=_env(MINDSPORE_PATH=str(tmp_path), LITE_HOME=""))
    assert done.returncode != 0
    assert f"MINDSPORE_PATH={tmp_path} has no include/api/model.h" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_build_sh_rejects_lite_home_without_headers(tmp_path):
    done = _run(["bash", APP / "build.sh"], env=_env(MINDSPORE_PATH="", LITE_HOME=str(tmp_path)))
    assert done.returncode != 0
    assert f"LITE_HOME={tmp_path} has no include/api/model.h" in done.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_build_sh_without_any_install_says_what_to_do():
    done = _run(["bash", APP / "build.sh"], env=_env(**NO_INSTALL_ENV))
    assert done.returncode != 0
    assert "no MindSpore C++ API found" in done.stderr
    assert "mindspore-lite" in done.stderr and "MINDSPORE_PATH=" in done.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_build_sh_reports_pip_installs_without_headers(tmp_path):
    """`pip show mindspore` finds a package without the C++ API (as the mindspore wheel is): named in the error."""
    site = tmp_path / "site-packages"
    (site / "mindspore").mkdir(parents=True)
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\n[ "$1 $2 $3 $4" = "-m pip show mindspore" ] || exit 1\n'
                           f'echo "Name: mindspore"; echo "Location: {site}"\n')
    fake_python.chmod(0o755)
    env = _env(MINDSPORE_PATH="", LITE_HOME="", PYTHON=str(fake_python))
    env.pop("ARCFACE_NO_PIP_SEARCH", None)
    script = tmp_path / "app" / "build.sh"  # away from the repository's .venv, which is searched too
    script.parent.mkdir()
    shutil.copy(APP / "build.sh", script)
    done = _run(["bash", script], env=env)
    assert done.returncode != 0
    assert "no MindSpore C++ API found" in done.stderr
    assert f"mindspore installed at {site}/mindspore (for {fake_python}) has no include/api/model.h" in done.stderr


# --- the app, built against MindSpore Lite ---------------------------------------------------------

def test_build_sh_finds_a_pip_installed_lite(lite_path, tmp_path):
    """`pip show mindspore-lite` reporting a site-packages folder with mindspore_lite/include/api/model.h.
    Built here with the full-MindSpore code path (Serialization::Load + Model::Build(GraphCell)), which
    Lite's headers and library also declare, so that variant is compiled and linked too."""
    app = tmp_path / "ascend310_infer"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("out"))
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "mindspore_lite").symlink_to(lite_path, target_is_directory=True)
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\n[ "$1 $2 $3 $4" = "-m pip show mindspore-lite" ] || exit 1\n'
                           f'echo "Name: mindspore-lite"; echo "Location: {site}"\n')
    fake_python.chmod(0o755)
    env = _env(MINDSPORE_PATH="", LITE_HOME="", PYTHON=str(fake_python))
    env.pop("ARCFACE_NO_PIP_SEARCH", None)
    done = _run(["bash", app / "build.sh", "-DARCFACE_INFER_API=graph"], env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"MindSpore C++ API from {site}/mindspore_lite (found via pip show mindspore-lite" in done.stdout
    assert "model build API: graph" in done.stdout
    assert (app / "out" / "main").is_file()


def test_no_flags_prints_usage_and_fails(binary, tmp_path):
    done = _run([binary], cwd=tmp_path)
    assert done.returncode == 2
    assert "missing required flags --mindir_path and --input0_path" in done.stderr
    assert "Usage:" in done.stderr and "--device_type" in done.stderr
    assert not (tmp_path / "result_Files").exists()


def test_help_and_bad_flags(binary, tmp_path):
    done = _run([binary, "--help"], cwd=tmp_path)
    assert done.returncode == 0 and "Usage:" in done.stdout and "--time_dir" in done.stdout
    done = _run([binary, "--mindir_path=a", "--input0_path=b", "--device_type=TPU"], cwd=tmp_path)
    assert done.returncode == 2 and "--device_type must be Ascend, Ascend310, GPU or CPU" in done.stderr
    done = _run([binary, "--mindir_path=a", "--input0_path=b", "--batch=3"], cwd=tmp_path)
    assert done.returncode == 2 and "unknown flag --batch" in done.stderr
    done = _run([binary, "--mindir_path=a", "--input0_path=b", "--device_id=x"], cwd=tmp_path)
    assert done.returncode == 2 and "--device_id must be a non-negative integer" in done.stderr


def test_missing_mindir_is_a_clear_error(binary, tmp_path, faces):
    missing = tmp_path / "nowhere" / "arcface.mindir"
    done = _run([binary] + _app_args(tmp_path, missing, faces), cwd=tmp_path)
    assert done.returncode == 1
    assert f"MINDIR file '{missing}' does not exist or cannot be read" in done.stderr


def test_input_folder_errors(binary, tmp_path):
    mindir = tmp_path / "model.mindir"
    mindir.write_bytes(b"not checked before the inputs")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a batch")
    done = _run([binary] + _app_args(tmp_path, mindir, empty), cwd=tmp_path)
    assert done.returncode == 1 and f"no .bin files in input folder '{empty}'" in done.stderr

    done = _run([binary] + _app_args(tmp_path, mindir, tmp_path / "absent"), cwd=tmp_path)
    assert done.returncode == 1 and "cannot open input folder" in done.stderr

    bad = tmp_path / "bad"
    bad.mkdir()
    np.zeros(FACE_BYTES // 4, np.float32).tofile(bad / "a.bin")
    (bad / "b.bin").write_bytes(b"\0" * (FACE_BYTES + 8))
    done = _run([binary] + _app_args(tmp_path, mindir, bad), cwd=tmp_path)
    assert done.returncode == 1
    assert f"input file '{bad}/b.bin' has {FACE_BYTES + 8} bytes, not a positive multiple of {FACE_BYTES}" \
        in done.stderr


def test_unloadable_mindir_fails_in_the_runtime(binary, tmp_path, faces):
    """Valid inputs, a file that is not a MINDIR: the Lite runtime is loaded and reports the failure."""
    mindir = tmp_path / "junk.mindir"
    mindir.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    done = _run([binary] + _app_args(tmp_path, mindir, faces), cwd=tmp_path, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"error: cannot load or build MINDIR '{mindir}' on CPU" in done.stderr
    assert list((tmp_path / "result_Files").glob("*.bin")) == []
    assert not (tmp_path / "time_Result" / "test_perform_static.txt").exists()


# --- inference on models Lite 2.0.0 can read -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_mindirs(tmp_path_factory):
    """{name: path}: 'relu_dynamic' (input [-1, 3, 112, 112]), 'flatten_batch2' (input [2, 3, 112, 112],
    output [2, 37632]), both relabelled as MindIR version 1, and 'relu_dynamic_v3' as MindSpore wrote it."""
    import mindspore as ms
    from mindspore import nn, ops
    from mindspore.train import mind_ir_pb2

    class Relu(nn.Cell):
        def construct(self, x):
            return ops.relu(x)

    folder = tmp_path_factory.mktemp("tiny_mindirs")
    paths = {}
    for name, net, example in [
            ("relu_dynamic", Relu(), ms.Tensor(shape=[None, 3, 112, 112], dtype=ms.float32)),
            ("flatten_batch2", nn.Flatten(), ms.Tensor(np.zeros((2, 3, 112, 112), np.float32)))]:
        net.set_train(False)
        ms.export(net, example, file_name=str(folder / f"{name}_v3"), file_format="MINDIR")
        written = folder / f"{name}_v3.mindir"
        model = mind_ir_pb2.ModelProto()
        model.ParseFromString(written.read_bytes())
        assert model.mind_ir_version > 1  # if MindSpore ever writes version 1 again, drop the relabelling
        model.mind_ir_version = 1
        paths[name] = folder / f"{name}.mindir"
        paths[name].write_bytes(model.SerializeToString())
        paths[f"{name}_v3"] = written
    return paths


def _write_batches(folder, batches, seed=0):
    """{stem: batch size} -> {stem: float32 array [B, 3, 112, 112]} written as <stem>.bin."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for stem, batch in batches.items():
        arrays[stem] = rng.standard_normal((batch, 3, 112, 112), dtype=np.float32)
        arrays[stem].tofile(folder / f"{stem}.bin")
    return arrays


def test_inference_with_dynamic_batch(binary, tiny_mindirs, tmp_path):
    inputs = _write_batches(tmp_path / "input", {"c": 3, "a": 2, "b": 1})
    done = _run([binary] + _app_args(tmp_path, tiny_mindirs["relu_dynamic"], tmp_path / "input"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "model input x [-1, 3, 112, 112], 3 batch file(s)" in done.stdout
    order = [line.split(":")[0] for line in done.stdout.splitlines() if ": batch " in line]
    assert order == [str(tmp_path / "input" / f"{stem}.bin") for stem in "abc"]  # sorted by name
    for stem, x in inputs.items():
        y = np.fromfile(tmp_path / "result_Files" / f"{stem}_0.bin", np.float32)
        np.testing.assert_array_equal(y, np.maximum(x, 0).ravel())
    assert sorted(p.name for p in (tmp_path / "result_Files").iterdir()) == ["a_0.bin", "b_0.bin", "c_0.bin"]
    timing = (tmp_path / "time_Result" / "test_perform_static.txt").read_text()
    assert re.fullmatch(r"NN inference cost average time: \d+\.\d{3} ms of infer_count 3\n", timing), timing


def test_inference_resizes_a_fixed_batch_model(binary, tiny_mindirs, tmp_path):
    inputs = _write_batches(tmp_path / "input", {"x2": 2, "x1": 1})
    out_dir, time_dir = tmp_path / "deep" / "out", tmp_path / "deep" / "time"  # created as needed
    done = _run([binary, "--mindir_path", tiny_mindirs["flatten_batch2"], "--input0_path", tmp_path / "input",
                 "--device_type=cpu", "--output_dir", out_dir, "--time_dir", time_dir], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "model input x [2, 3, 112, 112]" in done.stdout
    assert "batch 1 -> " in done.stdout and "[1, 37632]" in done.stdout
    for stem, x in inputs.items():
        np.testing.assert_array_equal(np.fromfile(out_dir / f"{stem}_0.bin", np.float32), x.ravel())
    assert "infer_count 2" in (time_dir / "test_perform_static.txt").read_text()


def test_mindir_from_newer_mindspore_is_reported(binary, tiny_mindirs, tmp_path, faces):
    """What happens with an exported ArcFace MINDIR and Lite 2.0.0: a clear failure, no output."""
    env = _env()
    env.pop("GLOG_v", None)  # keep the runtime's error log on stderr
    done = _run([binary] + _app_args(tmp_path, tiny_mindirs["relu_dynamic_v3"], faces), cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert "error: cannot load or build MINDIR" in done.stderr
    assert "mind ir version" in done.stderr  # the runtime's own reason, in its log
    assert list((tmp_path / "result_Files").glob("*.bin")) == []
