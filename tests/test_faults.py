"""Faults made to happen: divergence, kills, full disks, concurrent runs, older checkpoints, damaged
files, hostile inputs. Each has a defined outcome: one `error:` line and exit code 2, nothing lost,
nothing written outside the output folder."""
import errno
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import postprocess
import preprocess
import train
import val
from src import datainfo, pack_rec
from src.checkpoint import list_checkpoints, save_checkpoint_atomic
from src.cli import run_main
from src.data.bins import save_bin
from src.data.face_rec import write_face_dataset
from src.data.recordio import IndexedRecordWriter, pack_header
from src.errors import ArcFaceError

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--network", "r18", "--width", "8", "--batch_size", "8", "--num_workers", "1", "--log_interval", "1"]


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and not [line for line in err.splitlines() if line.startswith("Traceback")], err
    return lines[0]


def face(seed, size=(112, 112)):
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), (size[1], size[0]))
    return cv2.imencode(".jpg", image)[1].tobytes()


def png(width, height):
    """A tiny PNG file that declares width x height pixels (compresses to almost nothing)."""
    raw = zlib.compress(b"".join(b"\0" + bytes(width * 3) for _ in range(height)), 9)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


# --- divergence -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("amp", ["O0", "O2"])
def test_divergence_stops_with_the_step_and_writes_no_checkpoint(tiny_data, tmp_path, capsys, amp):
    """--lr 1e8 makes the weights explode within a few steps: training stops with the step named, exit 2,
    and no checkpoint with NaN/Inf parameters is written (fp32, and fp16 with loss scaling)."""
    out = tmp_path / "out"
    args = ["--data_url", str(tiny_data[0]), "--train_url", str(out), "--epochs", "3", "--lr", "1e8",
            "--amp", amp, "--save_interval", "1"] + SHORT
    assert run_main(train.main, args) == 2
    line = one_error_line(capsys)
    assert "not finite" in line and "global step" in line and "diverged" in line, line
    for path in list_checkpoints(str(out)):  # what was saved before the divergence is finite
        import mindspore as ms
        params = ms.load_checkpoint(path)
        assert all(np.isfinite(v.asnumpy()).all() for k, v in params.items()
                   if not isinstance(v, str) and v.dtype in (ms.float32, ms.float16)), path
    step = int(line.split("global step ")[1].split(")")[0])
    assert all(int(p.rsplit("_", 1)[1][:-5]) < step for p in list_checkpoints(str(out)))


def test_a_checkpoint_with_nan_parameters_is_never_written(tmp_path):
    import mindspore as ms
    net = ms.nn.Dense(2, 2)
    net.weight.set_data(ms.Tensor(np.array([[1.0, np.nan], [0.0, 1.0]], np.float32)))
    with pytest.raises(ArcFaceError, match="hold NaN/Inf"):
        save_checkpoint_atomic(net, str(tmp_path / "ArcFace-1_1.ckpt"))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option,value,message", [
    ("--lr", "nan", "--lr must be a finite number"), ("--lr", "inf", "--lr must be a finite number"),
    ("--momentum", "nan", "--momentum must be a finite number"), ("--momentum", "-3", "--momentum must be at least 0"),
    ("--weight_decay", "-1", "--weight_decay must be at least 0"), ("--scale", "0", "--scale must be greater than 0"),
    ("--scale", "-64", "--scale must be greater than 0"), ("--scale", "nan", "--scale must be a finite number"),
    ("--warmup_epochs", "nan", "--warmup_epochs must be a finite number"),
    ("--margin", "nan,nan,nan", "--margin 'nan,nan,nan'"), ("--gamma", "-1", "--gamma must be greater than 0"),
    ("--schedule=-5,100", None, "--schedule must be at least 0"), ("--network", "r51", "unknown backbone 'r51'"),
    ("--width", "0", "--width must be at least 1"), ("--num_features", "-2", "--num_features must be at least 1"),
    ("--epochs", "1.5", "--epochs '1.5': invalid value"), ("--sample_rate", "0", "--sample_rate must be greater"),
])
def test_bad_options_are_one_line_before_any_work(option, value, message, tmp_path, capsys):
    # The data folder does not exist: an option error must come first, before the data is opened.
    args = ["--data_url", str(tmp_path / "absent"), "--train_url", str(tmp_path / "out"), option]
    args += [value] if value is not None else []
    assert run_main(train.main, args) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_yaml_types_and_a_file_as_output_folder_are_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("epochs: true\n")
    assert run_main(train.main, ["--config", str(tmp_path / "c.yaml")]) == 2
    assert "--epochs True" in one_error_line(capsys)
    (tmp_path / "a_file").write_text("x")
    assert run_main(train.main, ["--data_url", str(tmp_path), "--train_url", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a folder" in one_error_line(capsys)


# --- resume, concurrent runs, kills, full disks ---------------------------------------------------

@pytest.mark.slow
def test_resuming_from_an_older_checkpoint_in_its_own_folder_is_refused(trained_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = sorted(p.name for p in out.iterdir())
    assert run_main(train.main, ["--train_url", str(out), "--resume", str(out / "ArcFace-2_8.ckpt")]) == 2
    line = one_error_line(capsys)
    assert "already holds the later ArcFace-4_8.ckpt" in line and "another --train_url" in line
    assert sorted(p.name for p in out.iterdir()) == before


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    """A run continued into a folder holding later checkpoints (e.g. copied in by hand) keeps its own
    newest file even when it sorts first."""
    import mindspore as ms

    from src.heads.classifier import PartialFC
    from src.training.state import CheckpointWriter
    from src.training.step import BackboneWithHead, TrainStep
    net = BackboneWithHead(ms.nn.Dense(3, 4), PartialFC(10, 4, rank=0, world_size=1))
    step = TrainStep(net, ms.nn.SGD(net.trainable_params(), learning_rate=0.1))
    for name in ("ArcFace-5_1.ckpt", "ArcFace-6_1.ckpt"):
        save_checkpoint_atomic(step, str(tmp_path / name))
    writer = CheckpointWriter(step, net.head, str(tmp_path), keep=2)
    writer.save({"epoch": 1, "step_in_epoch": 1, "global_step": 1})
    assert (tmp_path / "ArcFace-1_1.ckpt").is_file()


def start_training(out, data, extra=()):
    command = [sys.executable, str(ROOT / "train.py"), "--data_url", str(data), "--train_url", str(out),
               "--epochs", "500"] + SHORT + list(extra)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "epoch: 1 step: 2," in log.read_text()):
        if process.poll() is not None:
            raise AssertionError(process.communicate()[1][-3000:])
        time.sleep(0.3)
    return process


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    first = start_training(out, tiny_data[0])
    try:
        args = ["--data_url", str(tiny_data[0]), "--train_url", str(out), "--resume", "auto"] + SHORT
        assert run_main(train.main, args) == 2
        line = one_error_line(capsys)
        assert "in use by another training run" in line and f"pid {first.pid}" in line, line
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert "in use" not in (out / "train.log").read_text()  # the refused run wrote nothing into its log


def test_an_output_folder_that_cannot_be_written_is_one_line_and_a_refused_run_leaves_nothing(tiny_data, tmp_path,
                                                                                            capsys):
    (tmp_path / "a_file").write_text("not a folder")
    args = ["--data_url", str(tiny_data[0]), "--train_url", str(tmp_path / "a_file" / "out")] + SHORT
    assert run_main(train.main, args) == 2
    assert "cannot write into the output folder" in one_error_line(capsys)
    # A run refused after it took the folder (here: no checkpoint to resume) leaves no folder behind.
    args = ["--data_url", str(tiny_data[0]), "--train_url", str(tmp_path / "new"), "--resume", "auto"] + SHORT
    assert run_main(train.main, args) == 2
    assert "no ArcFace-*.ckpt checkpoint" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_the_lock_is_taken_again_when_its_file_was_replaced(tmp_path):
    """A run that ends removes its lock file: a second run that opened the old file just before must not
    hold a lock that the file now at the path does not carry."""
    from src.training.lock import RunLock
    first = RunLock(str(tmp_path)).acquire()
    stale = os.open(first.path, os.O_RDWR)
    first.release()
    assert not (tmp_path / ".lock").exists()
    second = RunLock(str(tmp_path)).acquire()
    assert os.path.samestat(os.fstat(second.fd), os.stat(second.path))
    with pytest.raises(ArcFaceError, match="in use by another training run"):
        RunLock(str(tmp_path)).acquire()
    os.close(stale)
    second.release()


@pytest.mark.slow
def test_resume_loads_quietly_and_a_nan_checkpoint_is_refused_before_training(trained_run, tiny_data, tmp_path,
                                                                               capfd):
    import mindspore as ms

    from src.checkpoint import read_checkpoint
    out = tmp_path / "out"
    shutil.copytree(trained_run, out)
    args = ["--data_url", str(tiny_data[0]), "--train_url", str(out), "--resume", "auto", "--epochs", "5",
            "--eval_url", ""]
    assert run_main(train.main, args) == 0
    err = capfd.readouterr().err
    assert "are not loaded" not in err and "resumed from" in (out / "train.log").read_text()
    # --ckpt_url of a checkpoint holding NaN (saved by other software): refused, naming it, before a step.
    params, meta = read_checkpoint(str(list_checkpoints(str(out))[-1]))
    name = next(n for n in params if n.endswith("conv1.weight"))
    params[name] = ms.Tensor(np.full(params[name].shape, np.nan, np.float32))
    ms.save_checkpoint([{"name": n, "data": v} for n, v in params.items()], str(tmp_path / "nan.ckpt"))
    args = ["--data_url", str(tiny_data[0]), "--train_url", str(tmp_path / "fine_tune"), "--ckpt_url",
            str(tmp_path / "nan.ckpt")] + SHORT + ["--max_steps", "1"]
    assert run_main(train.main, args) == 2
    line = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error: ")]
    assert line == [f"error: checkpoint {tmp_path / 'nan.ckpt'} holds NaN/Inf in 1 parameter(s), e.g. {name}: it "
                    f"comes from a diverged run; use an earlier checkpoint"], line


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_no_temporary_file_behind(tiny_data, tmp_path, capsys):
    """What a killed save leaves (MindSpore's `.tmp` and our `.tmp-<pid>-...ckpt`) is removed by the
    next run in that folder; a full disk is one error line and leaves no temporary file."""
    out = tmp_path / "out"
    out.mkdir()
    for name in (".tmp-4242-ArcFace-1_8.tmp", ".tmp-4242-ArcFace-1_8.ckpt"):
        (out / name).write_bytes(b"\0" * 100_000)
    args = ["--data_url", str(tiny_data[0]), "--train_url", str(out), "--epochs", "1", "--max_steps", "2"] + SHORT
    assert train.main(args) == 0
    assert not list(out.glob(".tmp-*"))
    assert "left by an interrupted save" in (out / "train.log").read_text()


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import mindspore as ms
    net = ms.nn.Dense(3, 2)
    good = tmp_path / "ArcFace-1_1.ckpt"
    save_checkpoint_atomic(net, str(good))
    before = good.read_bytes()
    real_save = ms.save_checkpoint

    def disk_fills_up(cell, path, **kwargs):
        real_save(cell, path, **kwargs)  # MindSpore wrote its temporary file, then the disk is full
        with open(path[:-5] + ".tmp", "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ms, "save_checkpoint", disk_fills_up)
    with pytest.raises(ArcFaceError, match=r"cannot write .*ArcFace-1_2\.ckpt: No space left on device; the earlier"):
        save_checkpoint_atomic(net, str(tmp_path / "ArcFace-1_2.ckpt"))
    assert sorted(os.listdir(tmp_path)) == ["ArcFace-1_1.ckpt"] and good.read_bytes() == before


@pytest.mark.slow
def test_a_write_limit_in_a_real_run_is_one_error_line(tiny_data, tmp_path):
    """The kernel refuses to write past a file-size limit (EFBIG), as a full disk refuses (ENOSPC)."""
    out = tmp_path / "out"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    command = [sys.executable, str(ROOT / "train.py"), "--data_url", str(tiny_data[0]), "--train_url", str(out),
               "--epochs", "1", "--max_steps", "2"] + SHORT
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot write") and "File too large" in lines[-1], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not list(out.glob(".tmp-*")) and not list_checkpoints(str(out))


ATOMIC_WRITERS = """
import sys
from src.data.bins import save_bin
from src.data.face_rec import write_face_dataset
from src.errors import ArcFaceError
from src.files import atomic_write
folder = sys.argv[1]
writers = {"set.bin": lambda path: save_bin(path, [b"x" * 300_000] * 2, [True]),
           "config.yaml": lambda path: atomic_write(path, "epochs: 1\\n" * 50_000),
           "rec/train.rec": lambda path: write_face_dataset(path[:-len("/train.rec")], [(b"x" * 300_000, 0)])}
for name, write in writers.items():
    try:
        write(folder + "/" + name)
        print(name, "written")
    except ArcFaceError as exc:
        print(f"error: {exc}")
"""


def test_every_atomic_write_keeps_the_earlier_file_and_no_temporary_on_a_full_disk(tmp_path):
    """The one atomic write behind .bin sets, config.yaml and RecordIO sets: the kernel refuses to
    write past a file-size limit (EFBIG) as a full disk refuses (ENOSPC); each is one error naming the
    file, the earlier file stays as it was and no temporary file stays behind."""
    (tmp_path / "rec").mkdir()
    earlier = {"set.bin": b"earlier set", "config.yaml": b"epochs: 3\n", "rec/train.rec": b"earlier records"}
    for name, data in earlier.items():
        (tmp_path / name).write_bytes(data)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    done = subprocess.run([sys.executable, "-c", ATOMIC_WRITERS, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: cannot write ") and line.endswith("File too large")
                                   for line in lines), done.stdout
    for name, data in earlier.items():
        assert (tmp_path / name).read_bytes() == data
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["config.yaml", "rec",
                                                                                 "rec/train.rec", "set.bin"]


@pytest.mark.parametrize("role, seconds, logged, expected", [
    ("MS_SCHED", 60.0, True, "the job stopped after 60 s: rank 1 stopped answering during the run: that rank or its "
                             "node has stopped (see worker_1.log on its node)"),
    ("MS_SCHED", 500.0, False, "the job stopped after 500 s: rank 1 stopped answering during the run"),
    ("MS_SCHED", 20.0, False, "rank 1 stopped answering the cluster scheduler after 20 s: it or its node stopped, or "
                              "it did not join within the cluster time-out"),
    ("MS_WORKER", 20.0, True, "cannot start distributed training (MS_WORKER_NUM=2): The total number of timed out"),
])
def test_a_cluster_time_out_names_the_rank_that_stopped(monkeypatch, tmp_path, role, seconds, logged, expected):
    """msrun's scheduler runs the cluster inside init() for the whole job: when a rank dies after rank 0
    logged its first line (or after the topology time-out) its time-out is reported as that rank
    stopping during the run, not as a failed start of the survivor."""
    from src.runtime import _cluster_error
    for var in ("OMPI_COMM_WORLD_SIZE", "RANK_SIZE", "RANK_TABLE_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MS_ROLE", role)
    monkeypatch.setenv("MS_WORKER_NUM", "2")
    monkeypatch.setenv("MS_TOPO_TIMEOUT", "300")
    started = time.time() - seconds
    if logged:
        (tmp_path / "train.log").write_text("epoch: 1 step: 1, loss is 9.0\n")
    reason = RuntimeError("The total number of timed out node is 1. Timed out node list is: [const vector]{1}, "
                          "worker 1 is the first one timed out, please check its log.\n\n- C++ Call Stack: ...")
    message = str(_cluster_error(reason, started, str(tmp_path / "train.log")))
    assert expected in message, message


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["poly", "cosine", "step"])
def test_a_billion_epochs_cost_no_memory(tiny_data, tmp_path, schedule):
    """The learning rate is a formula of the step: --epochs 1e9 with --max_steps 2 trains two steps under
    an 8 GiB address-space limit (a per-step table would take 64 GB here, 90 TB for MS1MV2)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    command = [sys.executable, str(ROOT / "train.py"), "--data_url", str(tiny_data[0]), "--train_url",
               str(tmp_path / "out"), "--epochs", "1000000000", "--max_steps", "2", "--lr_schedule", schedule,
               "--warmup_epochs", "0.5"] + SHORT
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch: 1 step: 2, loss is" in done.stdout and list_checkpoints(str(tmp_path / "out"))


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_skipped_with_a_warning(trained_run, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("ArcFace-3_8.ckpt", "ArcFace-4_8.ckpt"):
        shutil.copy(trained_run / name, out)
    with open(out / "ArcFace-4_8.ckpt", "r+b") as fh:  # power loss: the newest file lost its end
        fh.truncate(os.path.getsize(out / "ArcFace-4_8.ckpt") // 3)
    assert val.main(["--eval_url", str(tiny_data[1].parent), "--target", "demo", "--ckpt_url", str(out)]) == 0
    assert "skipping an unreadable checkpoint" in capsys.readouterr().err
    assert train.main(["--train_url", str(out), "--resume", "auto", "--epochs", "5", "--eval_url", ""]) == 0
    log = (out / "train.log").read_text()
    assert "skipping an unreadable checkpoint" in log and "resumed from" in log and "ArcFace-3_8.ckpt" in log
    # The damaged file is set aside, not deleted, and not taken for the newest checkpoint any more.
    assert (out / "ArcFace-4_8.ckpt.unusable").is_file() and (out / "ArcFace-5_8.ckpt").is_file()


@pytest.mark.slow
def test_a_half_written_metrics_line_does_not_stop_a_resumed_run(trained_run, tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained_run / "ArcFace-4_8.ckpt", out)
    shutil.copy(trained_run / "metrics.jsonl", out)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 4, "step": 33, "eval": {"demo": 0.')  # killed in the middle of a line
    assert train.main(["--train_url", str(out), "--resume", "auto", "--epochs", "5", "--eval_interval", "8"]) == 0
    assert (out / "training_curve.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[-3:]]
    assert rows[-1]["step"] == 40


# --- data -----------------------------------------------------------------------------------------

def pipeline_shapes(path):
    from src.data.pipeline import checked_iterator, create_train_dataset
    from src.data.sources import open_source
    dataset = create_train_dataset(open_source(str(path)), 2, num_workers=2, shuffle=False)
    return [images.shape for images, _ in checked_iterator(dataset.create_tuple_iterator(num_epochs=1,
                                                                                          output_numpy=True))]


def test_images_of_other_sizes_are_resized_in_every_kind_of_source(tmp_path):
    from src import mindrecord
    sizes = [(112, 112), (100, 80), (150, 150), (112, 112)]
    folder = tmp_path / "folder"
    for i, size in enumerate(sizes):
        (folder / str(i // 2)).mkdir(parents=True, exist_ok=True)
        (folder / str(i // 2) / f"{i}.jpg").write_bytes(face(i, size))
    write_face_dataset(str(tmp_path / "rec"), [(face(i, size), i // 2) for i, size in enumerate(sizes)])
    assert mindrecord.main(["--input", str(tmp_path / "rec"), "--output", str(tmp_path / "mr"), "--skip_bad"]) == 0
    for path in (folder, tmp_path / "rec"):
        assert pipeline_shapes(path) == [(2, 3, 112, 112)] * 2, path


@pytest.mark.parametrize("label,message", [
    ([float("nan"), 5.0], "header record announces"), ([5.0, 3e9], "does not fit the index"),
    ([40.0, 41.0], "does not fit the index"), ([1e30, 1e30], "does not fit the index"),
])
def test_a_corrupt_recordio_header_is_one_line(tmp_path, capsys, label, message):
    path = tmp_path / "data"
    path.mkdir()
    with IndexedRecordWriter(path / "train.rec", path / "train.idx") as writer:
        writer.write(0, pack_header(label))
        for key in range(1, 5):
            writer.write(key, pack_header(float(key % 2)) + face(key))
    tick = time.time()
    assert run_main(datainfo.main, [str(path), "--verify"]) == 2
    assert message in one_error_line(capsys) and time.time() - tick < 30
    assert run_main(train.main, ["--data_url", str(path), "--train_url", str(tmp_path / "out")] + SHORT) == 2
    assert message in one_error_line(capsys)


def test_an_image_only_the_decoder_rejects_is_named_and_nothing_lands_in_the_current_folder(tmp_path, monkeypatch):
    """Passes the format check (JPEG start and end markers) but cannot be decoded."""
    from src.data.pipeline import checked_iterator, create_train_dataset
    from src.data.sources import open_source
    bad = b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)) + b"\xff\xd9"
    samples = [(face(i), i // 2) for i in range(4)]
    samples[2] = (bad, 1)
    write_face_dataset(str(tmp_path / "rec"), samples)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    dataset = create_train_dataset(open_source(str(tmp_path / "rec")), 2, num_workers=1, shuffle=False)
    with pytest.raises(ArcFaceError, match=r"train\.rec: key 3 at offset \d+: cannot be decoded"):
        list(checked_iterator(dataset.create_tuple_iterator(num_epochs=1)))
    assert not list(work.iterdir())


def test_a_huge_declared_image_in_a_bin_is_refused_without_the_memory(tmp_path):
    images = [face(i) for i in range(19)] + [png(16000, 16000)]
    save_bin(tmp_path / "big.bin", images, [True] * 10)
    # VmHWM, not ru_maxrss: the latter survives exec and would report the pytest parent's size.
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from src.data.bins import load_bin\nfrom src.errors import ArcFaceError\n"
            f"try:\n    load_bin({str(tmp_path / 'big.bin')!r})\nexcept ArcFaceError as exc:\n    print(exc)\n"
            "print([int(v.split()[1]) // 1024 for v in open('/proc/self/status') if v.startswith('VmHWM')][0])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    message, peak_mb = done.stdout.strip().splitlines()
    assert "image 19 could not be decoded" in message and int(peak_mb) < 600, done.stdout


def test_a_property_declaring_billions_of_classes_is_reported(tmp_path, capsys):
    write_face_dataset(str(tmp_path / "rec"), [(face(i), i // 2) for i in range(8)])
    (tmp_path / "rec" / "property").write_text("2000000000,112,112\n")
    assert datainfo.main([str(tmp_path / "rec")]) == 1
    assert "declares 2000000000 classes but the labels use only 0..3" in capsys.readouterr().out
    assert run_main(train.main, ["--data_url", str(tmp_path / "rec"), "--train_url", str(tmp_path / "out")]
                    + SHORT) == 2
    assert "declares 2000000000 classes" in one_error_line(capsys)


def test_a_control_character_in_a_class_folder_name_is_refused(tmp_path, capsys):
    for name in ("alice", "bob\nsmith"):
        (tmp_path / "in" / name).mkdir(parents=True)
        (tmp_path / "in" / name / "a.jpg").write_bytes(face(len(name)))
    assert run_main(pack_rec.main, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 2
    assert "'bob\\nsmith'" in one_error_line(capsys)
    assert not (tmp_path / "out" / "classes.txt").exists()


# --- evaluation and deployment files --------------------------------------------------------------

def test_preprocess_refuses_a_bin_without_pairs(tmp_path, capsys):
    save_bin(tmp_path / "none.bin", [], [])
    assert run_main(preprocess.main, ["--dataset_path", str(tmp_path / "none.bin"), "--result_dir",
                                      str(tmp_path / "r"), "--label_dir", str(tmp_path / "l")]) == 2
    assert "no pairs" in one_error_line(capsys)


@pytest.mark.parametrize("case", ["bad_json", "empty_dict", "batch_zero", "wrong_types", "pickled_issame",
                                  "issame_2d", "issame_floats"])
def test_postprocess_on_damaged_label_files(case, tmp_path, capsys):
    labels, results = tmp_path / "labels", tmp_path / "results"
    labels.mkdir()
    results.mkdir()
    meta = {"images": 4, "batch_size": 2}
    issame = np.array([True, False])
    if case == "bad_json":
        (labels / "demo_meta.json").write_text('{"images": 4, "batch')
    else:
        meta = {"empty_dict": {}, "batch_zero": {"images": 4, "batch_size": 0},
                "wrong_types": {"images": "4", "batch_size": [2]}}.get(case, meta)
        (labels / "demo_meta.json").write_text(json.dumps(meta))
    if case == "pickled_issame":
        np.save(labels / "demo_issame_list.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif case == "issame_2d":
        np.save(labels / "demo_issame_list.npy", np.ones((2, 2), bool))
    elif case == "issame_floats":
        np.save(labels / "demo_issame_list.npy", np.array([0.5, 1.0]))
    else:
        np.save(labels / "demo_issame_list.npy", issame)
    for stem in ("demo_00000", "demo_00001", "demo_flip_00000", "demo_flip_00001"):
        np.zeros((2, 8), np.float32).tofile(results / f"{stem}_0.bin")
    assert run_main(postprocess.main, ["--result_dir", str(results), "--label_dir", str(labels),
                                       "--data_set", "demo"]) == 2
    assert "demo_" in one_error_line(capsys)


def test_ijb_image_names_outside_loose_crop_are_refused(tmp_path):
    from test_ijb import _write_release

    from src.evaluation.ijb import load_meta
    _write_release(str(tmp_path), "IJBC", 6, 20, seed=1)
    meta = tmp_path / "IJB_release" / "IJBC" / "meta"
    for path in (meta / "ijbc_face_tid_mid.txt", meta / "ijbc_name_5pts_score.txt"):
        lines = path.read_text().splitlines()
        lines[0] = "../../secret.jpg" + lines[0][lines[0].index(" "):]
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ArcFaceError, match=r"image name '\.\./\.\./secret\.jpg' points outside loose_crop/"):
        load_meta(str(tmp_path / "IJB_release" / "IJBC"), "IJBC")


def test_the_merge_tool_refuses_an_output_without_the_ckpt_suffix(tmp_path, capsys):
    from src import partial_fc
    assert run_main(partial_fc.main, ["--merge", str(tmp_path / "ArcFace-1_1.ckpt"), "--output",
                                      str(tmp_path / "merged")]) == 2
    assert "must end with .ckpt" in one_error_line(capsys)
    assert not list(tmp_path.iterdir())


# --- the ONNX export cache of checkpoints ---------------------------------------------------------

@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two checkpoints `model.ckpt` of one small architecture with different weights, each in its own
    folder with its ONNX export cached by a first evaluation, and that export's embeddings of a batch."""
    import mindspore as ms

    from src import runtime
    from src.evaluation.embedders import open_model
    from src.models import get_backbone
    runtime.setup("CPU", distributed=False)  # as every door does before MindSpore runs anything
    root = tmp_path_factory.mktemp("two_models")
    batch = np.random.default_rng(0).uniform(-1, 1, (6, 3, 112, 112)).astype(np.float32)
    models = {"batch": batch}
    for name, seed in (("A", 1), ("B", 2)):
        ms.set_seed(seed)
        (root / name).mkdir()
        save_checkpoint_atomic(get_backbone("r18", width=8, num_features=32), str(root / name / "model.ckpt"),
                               {"network": "r18", "width": 8, "num_features": 32})
        models[name] = {"folder": root / name, "ckpt": root / name / "model.ckpt",
                        "embeddings": open_model(str(root / name / "model.ckpt"), "onnxruntime").embed(batch)}
        models[name]["export"], = (root / name / ".onnx-cache").glob("model.ckpt.*.onnx")
    assert np.abs(models["A"]["embeddings"] - models["B"]["embeddings"]).max() > 0.1  # told apart below
    return models


def cached_export(folder):
    """The one export in a folder's cache, and the key stamped inside it."""
    import onnx
    exports = list((folder / ".onnx-cache").glob("*.onnx"))
    assert len(exports) == 1, exports
    stamps = {p.key: p.value for p in onnx.load(str(exports[0])).metadata_props}
    return exports[0], stamps["arcface_export_key"]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["after_hashing", "after_copying"])
def test_a_checkpoint_replaced_while_it_is_exported_never_leaves_a_mislabelled_export(two_models, tmp_path,
                                                                                      monkeypatch, moment):
    """best.ckpt rewritten by a running training (an atomic rename) while evaluation exports it: made to
    happen right after the read that keys the cache, and right after the read whose bytes are exported.
    What is served is exactly one of the two checkpoints, the cache names and stamps it by the bytes it
    was made from, and the next evaluation of the new file gets the new weights (the earlier cache
    stored the old weights under the new content's key and served them from then on)."""
    from src.evaluation import embedders
    folder = tmp_path / "run"
    folder.mkdir()
    ckpt = folder / "best.ckpt"
    shutil.copy(two_models["A"]["ckpt"], ckpt)
    original = getattr(embedders, {"after_hashing": "export_key", "after_copying": "copy_with_key"}[moment])
    replaced = []

    def read_then_replace(*args, **kwargs):
        result = original(*args, **kwargs)
        if not replaced:
            shutil.copy(two_models["B"]["ckpt"], folder / "new.ckpt.tmp")
            os.replace(folder / "new.ckpt.tmp", ckpt)
            replaced.append(moment)
        return result

    monkeypatch.setattr(embedders, original.__name__, read_then_replace)
    served = embedders.open_model(str(ckpt), "onnxruntime").embed(two_models["batch"])
    monkeypatch.undo()
    assert replaced
    made_from = "A" if moment == "after_copying" else "B"  # the bytes that were read for the export
    np.testing.assert_array_equal(served, two_models[made_from]["embeddings"])
    export, stamp = cached_export(folder)
    options = embedders.Options()
    key = embedders.export_key(str(two_models[made_from]["ckpt"]), options)
    assert stamp == key and export.name == f"best.ckpt.{key[:20]}.onnx"
    assert not [p for p in (folder / ".onnx-cache").iterdir() if p.name.startswith(".tmp-")]
    again = embedders.open_model(str(ckpt), "onnxruntime").embed(two_models["batch"])
    np.testing.assert_array_equal(again, two_models["B"]["embeddings"])
    assert cached_export(folder)[1] == embedders.export_key(str(ckpt), options)


@pytest.mark.slow
def test_a_copied_cache_holding_another_checkpoints_export_is_detected_and_exported_again(two_models, tmp_path):
    """A folder copied with its .onnx-cache whose export under the checkpoint's key is another
    checkpoint's (what a checkpoint replaced during an export left behind before, or a cache copied by
    hand): the stamp inside the export does not match, so it is exported again, and the embeddings are
    a fresh export's."""
    from src.evaluation.embedders import open_model
    copied = tmp_path / "copied"
    shutil.copytree(two_models["B"]["folder"], copied)
    export, _ = cached_export(copied)
    export.unlink()
    shutil.copy(two_models["A"]["export"], export)  # A's weights under B's name
    notes = []
    served = open_model(str(copied / "model.ckpt"), "onnxruntime", log=notes.append).embed(two_models["batch"])
    assert "was not made from this checkpoint's bytes" in notes[0] and "exporting model.ckpt again" in notes[0]
    np.testing.assert_array_equal(served, two_models["B"]["embeddings"])
    (export_now, stamp_now), (b_export, b_stamp) = cached_export(copied), cached_export(two_models["B"]["folder"])
    assert export_now.name == b_export.name and stamp_now == b_stamp


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "unloadable"])
def test_a_damaged_cached_export_is_removed_and_exported_again(two_models, tmp_path, damage):
    """A cached export cut short (a full disk, a copy interrupted) or one ONNX Runtime cannot load
    stopped every evaluation until it was deleted by hand; now it is made again."""
    import onnx
    from onnx import TensorProto, helper

    from src.evaluation.embedders import open_model
    copied = tmp_path / "copied"
    shutil.copytree(two_models["A"]["folder"], copied)
    export, stamp = cached_export(copied)
    content = export.read_bytes()
    export.unlink()
    if damage == "truncated":
        export.write_bytes(content[:len(content) // 2])
    else:  # a well-formed ONNX file with an operator no runtime has, stamped like the real one
        graph = helper.make_graph([helper.make_node("NoSuchOperator", ["data"], ["embedding"])], "g",
                                  [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 112, 112])],
                                  [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 32])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.metadata_props.add(key="arcface_export_key", value=stamp)
        onnx.save(model, str(export))
    notes = []
    served = open_model(str(copied / "model.ckpt"), "onnxruntime", log=notes.append).embed(two_models["batch"])
    assert notes[0].startswith("warning: the cached ONNX export cannot be used (cannot load ONNX model"), notes
    np.testing.assert_array_equal(served, two_models["A"]["embeddings"])
    assert export.read_bytes() != content[:len(content) // 2] and cached_export(copied)[1] == stamp
    assert len(notes) == 2  # the warning and the note of the new export; the next use takes it as it is
    open_model(str(copied / "model.ckpt"), "onnxruntime", log=notes.append)
    assert len(notes) == 2


def test_a_checkpoint_the_export_process_cannot_read_is_one_line_naming_it(tmp_path, capsys):
    """The export runs in a fresh process on a private copy: its error names the user's file."""
    ckpt = tmp_path / "ArcFace-1_1.ckpt"
    ckpt.write_bytes(b"not a checkpoint" * 100)
    assert run_main(val.main, ["--eval_url", str(tmp_path), "--ckpt_url", str(ckpt), "--backend", "onnxruntime",
                               "--log", str(tmp_path / "eval.log")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot read checkpoint {ckpt}: "), line
    assert not [p.name for p in (tmp_path / ".onnx-cache").iterdir()]


# --- launchers and ModelArts ----------------------------------------------------------------------

def test_the_demo_never_deletes_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    env = dict(os.environ, DEMO_OUT=str(precious), DEMO_DATA=str(tmp_path / "no_data"), PYTHON="false")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "run_demo.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "was not made by the demo" in done.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_modelarts_copies_the_data_once_per_node_and_every_rank_pushes_its_shards(tmp_path, monkeypatch):
    import threading
    import types

    from src.training import modelarts
    calls = []

    def copy_parallel(src, dst):
        calls.append((src, dst))
        time.sleep(0.2)  # the other ranks arrive while the copy is under way
        shutil.copytree(src, dst, dirs_exist_ok=True)
    fake = types.SimpleNamespace(file=types.SimpleNamespace(copy_parallel=copy_parallel, copy=shutil.copy))
    monkeypatch.setitem(sys.modules, "moxing", fake)
    (tmp_path / "obs" / "data").mkdir(parents=True)
    (tmp_path / "obs" / "data" / "train.rec").write_bytes(b"records")
    ranks = [threading.Thread(target=modelarts.fetch_once, args=(str(tmp_path / "obs" / "data"),
                                                                   str(tmp_path / "cache" / "data")))
             for _ in range(4)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    assert len(calls) == 1 and (tmp_path / "cache" / "data" / "train.rec").read_bytes() == b"records"
    out = tmp_path / "cache" / "output"
    out.mkdir()
    for name in ("ArcFace-1_8.ckpt", "ArcFace-1_8.head-r0of2.ckpt", "ArcFace-1_8.head-r1of2.ckpt", "train.log"):
        (out / name).write_text(name)
    (tmp_path / "obs" / "out").mkdir()
    modelarts.push_results(str(out), str(tmp_path / "obs" / "out"), rank=1, world_size=2)
    assert sorted(p.name for p in (tmp_path / "obs" / "out").iterdir()) == ["ArcFace-1_8.head-r1of2.ckpt"]
    modelarts.push_results(str(out), str(tmp_path / "obs" / "out"), rank=0, world_size=2)
    assert len(list((tmp_path / "obs" / "out").iterdir())) == 4


def test_recorded_config_is_a_valid_config_file(tmp_path):
    from src.config import TrainConfig, parse_train_args, record_text
    (tmp_path / "config.yaml").write_text("# a comment\n" + record_text(TrainConfig(network="r50", lr=0.2)))
    cfg, given = parse_train_args(["--config", str(tmp_path / "config.yaml")])
    assert cfg.network == "r50" and cfg.lr == 0.2 and "epochs" in given
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["schedule"] == [10, 16, 21]


# --- embed.py: hostile faces, galleries, caches and landmarks -------------------------------------

def toy_onnx(path, nan=False):
    """A hand-made 8-d ONNX 'face model' (a random projection of the pixels); `nan`: its outputs pass
    through Sqrt, which gives NaN for the negative ones."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    weight = np.random.default_rng(0).normal(0, 1, (3 * 112 * 112, 8)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["data"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["projected" if nan else "embedding"])]
    if nan:
        nodes.append(helper.make_node("Sqrt", ["projected"], ["embedding"]))
    graph = helper.make_graph(nodes, "toy",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["b", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["b", 8])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path)


def write_face(path, seed, size=112):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy model, a gallery of three identities (two faces each) and three query faces."""
    root = tmp_path_factory.mktemp("embed_world")
    for i, identity in enumerate(("alice", "bob", "carol")):
        for k in range(2):
            write_face(root / "gallery" / identity / f"{k}.png", 10 * i + k)
    for k in range(3):
        write_face(root / "queries" / f"q{k}.png", 100 + k)
    return {"root": root, "model": toy_onnx(root / "toy.onnx"), "gallery": root / "gallery",
            "queries": root / "queries"}


def snapshot(*folders):
    """{path: bytes} of every regular file under the folders (links not followed)."""
    files = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and not path.is_symlink():
                files[path] = path.read_bytes()
    return files


def run_embed(args, capsys):
    import embed
    code = run_main(embed.main, [str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def search_args(world, cache=None, gallery=None):
    args = ["--model", world["model"], "--images", world["queries"], "--search", gallery or world["gallery"],
            "--threshold", "0.2"]
    return args + (["--gallery_cache", cache] if cache else [])


def hostile_cache_paths(world, folder):
    """(case, a --gallery_cache path that must be refused, what the one error line says)."""
    yield "gallery image", world["gallery"] / "alice" / "0.png", "--gallery_cache must name a .npz file"
    yield ".npy", folder / "cache.npy", "--gallery_cache must name a .npz file"
    yield "inside the gallery", world["gallery"] / "bob" / "cache.npz", "lies inside"
    yield "inside the queries", world["queries"] / "cache.npz", "lies inside"
    notes = folder / "notes.npz"
    notes.write_text("my notes, not a cache\n")
    yield "text file", notes, "is not a gallery cache (a .npz written by embed.py --search); pass --overwrite"
    arrays = folder / "arrays.npz"
    np.savez(arrays, weights=np.arange(5))
    yield "other arrays", arrays, "exists and is not a gallery cache"
    fifo = folder / "fifo.npz"
    os.mkfifo(fifo)
    yield "FIFO", fifo, "exists and is not a regular file"


def test_a_gallery_cache_path_that_is_not_a_cache_is_refused_and_left_alone(world, tmp_path, capsys):
    for case, path, expected in hostile_cache_paths(world, tmp_path):
        before, existed = snapshot(world["root"], tmp_path), os.path.lexists(path)
        code, out, err = run_embed(search_args(world, path), capsys)
        assert code == 2 and out == "" and expected in error_line(err), (case, err)
        assert snapshot(world["root"], tmp_path) == before and os.path.lexists(path) == existed, case
    # --overwrite replaces a file that is not a cache (and only then)
    notes = tmp_path / "notes.npz"
    code, out, _ = run_embed(search_args(world, notes) + ["--overwrite"], capsys)
    assert code == 0 and len(out.splitlines()) == 3
    from src.evaluation.faces import is_gallery_cache
    assert is_gallery_cache(str(notes))


def damaged_caches():
    """(case, how a good cache's arrays are damaged, what the warning says)."""
    def nan_row(a):
        a["embeddings"][1] = np.nan
    yield "NaN row", nan_row, "holds NaN/Inf values"

    def other_size(a):
        a["embeddings"] = (a["embeddings"][:, :3] / np.linalg.norm(a["embeddings"][:, :3], axis=1,
                                                                    keepdims=True)).astype(np.float32)
    yield "embeddings of another size", other_size, "does not hold this model's embeddings"

    def shuffled(a):
        a["embeddings"] = a["embeddings"][::-1].copy()
    yield "other unit vectors", shuffled, "does not hold this model's embeddings"

    def float64(a):
        a["embeddings"] = a["embeddings"].astype(np.float64)
    yield "float64 embeddings", float64, "expected (6, D) float32"

    def stamps(a):
        a["stamps"] = a["stamps"][:, 0]
    yield "1-d stamps", stamps, "holds stamps of shape (6,) int64 for 6 files"

    def rows(a):
        a["embeddings"] = a["embeddings"][:4]
    yield "missing rows", rows, "holds embeddings of shape (4, 8)"

    def scaled(a):
        a["embeddings"] = a["embeddings"] * 3
    yield "not unit vectors", scaled, "not unit vectors"

    def twice(a):
        a["files"][1] = a["files"][0]
    yield "a file listed twice", twice, "lists a file twice"

    def older(a):
        del a["quality"]
    yield "an older cache", older, "has no quality"


def test_a_damaged_gallery_cache_is_rebuilt_with_a_warning(world, tmp_path, capsys):
    cache = tmp_path / "gallery.npz"
    code, clean, err = run_embed(search_args(world, cache), capsys)
    assert code == 0 and err == "" and len(clean.splitlines()) == 3
    with np.load(cache) as data:
        good = {name: data[name] for name in data.files}
    for case, damage, expected in damaged_caches():
        arrays = {name: value.copy() for name, value in good.items()}
        damage(arrays)
        np.savez(cache, **arrays)
        code, out, err = run_embed(search_args(world, cache), capsys)
        assert code == 0 and expected in err and "re-embedding" in err, (case, err)
        assert out == clean and "nan" not in out, case  # the same ranking as without a cache, never `alice nan`
        with np.load(cache) as data:
            assert {name: data[name].tolist() for name in data.files} == {n: v.tolist() for n, v in good.items()}, case


def test_a_fifo_among_the_images_is_not_read(world, tmp_path):
    """A FIFO named like an image would block a plain read forever: a folder walk keeps regular files
    only, and a FIFO named on the command line is refused (run in a process that cannot hang the test)."""
    folder = tmp_path / "faces"
    for name in ("a.png", "c.png"):
        write_face(folder / name, len(name))
    os.mkfifo(folder / "b.png")
    out = tmp_path / "emb.npy"
    command = [sys.executable, str(ROOT / "embed.py"), "--model", world["model"], "--output", str(out), "--images"]
    done = subprocess.run(command + [str(folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.with_suffix(".txt").read_text().splitlines() == [str(folder / "a.png"), str(folder / "c.png")]
    done = subprocess.run(command + [str(folder / "b.png")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr == f"error: {folder / 'b.png'} is a FIFO, not an image file\n"


def test_a_symlink_loop_in_a_gallery_is_an_unreadable_image(world, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    shutil.copytree(world["gallery"], gallery)
    os.symlink("loop.png", gallery / "bob" / "loop.png")   # an image that points at itself
    os.symlink("dave", gallery / "dave")                    # an identity folder that does
    before = snapshot(gallery)
    code, out, err = run_embed(search_args(world, gallery=gallery), capsys)
    assert code == 2 and out == ""
    assert error_line(err) == (f"error: cannot read {gallery / 'bob' / 'loop.png'}: Too many levels of symbolic links "
                               f"(--skip_bad leaves such images out)")
    code, out, err = run_embed(search_args(world, gallery=gallery) + ["--skip_bad"], capsys)
    assert code == 0 and len(out.splitlines()) == 3
    assert f"warning: skipping cannot read {gallery / 'bob' / 'loop.png'}" in err
    assert snapshot(gallery) == before


def test_a_line_break_in_a_file_name_is_refused_or_skipped(world, tmp_path, capsys):
    folder = tmp_path / "faces"
    write_face(folder / "a.png", 1)
    write_face(folder / "evil\nname.png", 2)
    write_face(folder / "z.png", 3)
    out = tmp_path / "emb.npy"
    args = ["--model", world["model"], "--images", folder, "--output", out]
    code, stdout, err = run_embed(args, capsys)
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert err.startswith(f"error: {folder}/evil\\nname.png: a file name with a line break") and "--skip_bad" in err
    assert not list(tmp_path.glob("emb*"))
    code, stdout, err = run_embed(args + ["--skip_bad"], capsys)
    assert code == 0 and err.count("\n") == 1 and err.startswith("warning: skipping ")
    rows = out.with_suffix(".txt").read_text().splitlines()
    assert rows == [str(folder / "a.png"), str(folder / "z.png")] and np.load(out).shape == (2, 8)


def impossible_landmarks():
    """(case, five landmarks in a 240x200 photo that cannot be a face there, what the error says)."""
    from src.data.align import ARCFACE_TEMPLATE
    face = ARCFACE_TEMPLATE * 1.5 + (30, 10)
    yield "far outside", face + (400, 0), "outside the 240x200 image, more than the face's eye distance"
    yield "huge", face * 1000, "larger than any image"
    yield "tiny", face.mean(axis=0) + (ARCFACE_TEMPLATE - ARCFACE_TEMPLATE.mean(axis=0)) * 0.02, "far smaller than any"
    yield "collinear", np.stack([np.linspace(60, 180, 5), np.linspace(90, 100, 5)], axis=1), "nearly on one line"


def test_landmarks_that_cannot_be_a_face_are_refused_or_skipped(world, tmp_path, capsys):
    photo = write_face(tmp_path / "photo.png", 5, size=1)
    assert cv2.imwrite(str(photo), np.full((200, 240, 3), 128, np.uint8))
    from src.data.align import ARCFACE_TEMPLATE
    good = ",".join(f"{v:.3f}" for v in (ARCFACE_TEMPLATE * 1.5 + (30, 10)).ravel())
    for case, points, expected in impossible_landmarks():
        csv_file = tmp_path / "lm.csv"
        csv_file.write_text(f"photo.png,{good}\nphoto.png," + ",".join(f"{v:.3f}" for v in points.ravel()) + "\n")
        out = tmp_path / f"{case}.npy"
        args = ["--model", world["model"], "--landmarks", csv_file, "--output", out]
        code, stdout, err = run_embed(args, capsys)
        line = error_line(err)
        assert code == 2 and expected in line and f"({csv_file} line 2)" in line and "--skip_bad" in line, (case, line)
        assert not out.exists()
        code, stdout, err = run_embed(args + ["--skip_bad"], capsys)
        assert code == 0 and expected in err and err.startswith(f"warning: skipping {photo}#1: "), (case, err)
        assert out.with_suffix(".txt").read_text() == f"{photo}#0\n"


def test_a_model_giving_nan_embeddings_is_one_line_naming_the_face(world, tmp_path, capsys):
    model = toy_onnx(tmp_path / "nan.onnx", nan=True)
    code, out, err = run_embed(["--model", model, "--images", world["queries"], "--output", tmp_path / "e.npy"],
                               capsys)
    assert code == 2 and not list(tmp_path.glob("e*"))
    assert error_line(err) == (f"error: {world['queries'] / 'q0.png'}: the model's embedding of it is not finite "
                               f"(NaN/Inf) (--skip_bad leaves such images out)")
