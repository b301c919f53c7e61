"""Training end to end on tiny data: loss falls, checkpoints, resume, NaN guard, bad input."""
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY_TRAIN_ARGS

import train
from src.checkpoint import list_checkpoints, read_checkpoint, save_checkpoint_atomic
from src.cli import run_main
from src.errors import ArcFaceError
from src.training.callbacks import CheckpointSaver
from src.training.lr_schedule import LRSchedule

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(folder):
    """The per-step rows (evaluation rows are tested in test_val)."""
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as fh:
        return [row for row in map(json.loads, fh) if "loss" in row]


def test_loss_falls_and_checkpoints_are_written(trained_run):
    metrics = read_metrics(trained_run)
    assert [m["step"] for m in metrics] == list(range(1, 33))
    losses = np.array([m["loss"] for m in metrics])
    assert np.isfinite(losses).all()
    # Mean loss of the last epoch against the first (single steps are noisy at batch 8).
    assert losses[-8:].mean() < 0.7 * losses[:8].mean(), losses
    names = [os.path.basename(p) for p in list_checkpoints(trained_run)]
    assert names == ["ArcFace-2_8.ckpt", "ArcFace-3_8.ckpt", "ArcFace-4_8.ckpt"]  # keep 3
    params, meta = read_checkpoint(os.path.join(trained_run, "ArcFace-4_8.ckpt"))
    config = meta.pop("config")
    assert meta == {"epoch": 4, "step_in_epoch": 8, "global_step": 32, "network": "r18", "width": 8,
                    "num_features": 512}
    # The run record: the resolved options (num_classes from the data) in the checkpoint and in the folder.
    recorded = yaml.safe_load(config)
    assert recorded["network"] == "r18" and recorded["num_classes"] == 8 and recorded["lr"] == 3.2
    assert yaml.safe_load((trained_run / "config.yaml").read_text()) == recorded
    assert params["head.weight"].shape == (8, 512)  # num_classes read from the property file
    assert any(k.startswith("accum.backbone.") for k in params)  # SGD momentum buffers
    log = (trained_run / "train.log").read_text()
    assert "epoch: 4 step: 8, loss is" in log and "per step time:" in log and "img/s" in log


def test_the_run_says_what_is_about_to_happen_and_how_long_it_takes(trained_run):
    """Before the graph is compiled: network, size, cost, data, steps, batch x devices, recipe,
    precision; a few steps in: the time per step, per epoch and for the rest of the run."""
    from src.models import get_backbone
    parameters = sum(int(np.prod(p.shape)) for p in get_backbone("r18", width=8).trainable_params())
    lines = (trained_run / "train.log").read_text().splitlines()
    text = "\n".join(re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", "", line) for line in lines)  # no stamps
    block = f"training r18 width 8: {parameters / 1e6:.1f} M parameters, "
    assert block in text
    assert re.search(r"^  loss       arcface \(combined margin 1,0.5,0\), scale 16$", text, re.M), text
    assert re.search(r"^  data       recordio .*: 64 images, 8 classes$", text, re.M)
    assert re.search(r"^  steps      32 to go of 32 \(8 steps/epoch x 4 epoch\(s\)\), batch 8 per device x 1 x CPU "
                     r"= 8 images per step$", text, re.M)
    assert re.search(r"^  precision  fp32, graph mode$", text, re.M)
    assert text.index(block) < text.index("compiling the training graph")
    estimate = re.search(r"^about ([\d.e+-]+) s per step \(([\d.]+) img/s\): an epoch takes about (\d+) s, the rest "
                         r"of the run about (\d+) s$", text, re.M)
    assert estimate, text
    per_step, epoch, rest = float(estimate.group(1)), int(estimate.group(3)), int(estimate.group(4))
    assert abs(epoch - 8 * per_step) <= 1 and abs(rest - 26 * per_step) <= 1  # estimated after step 6 of 32
    assert "note: " not in text  # a narrow r18 trains fine on a CPU


def test_a_large_network_on_a_cpu_is_announced_as_slow():
    from types import SimpleNamespace

    from src.config import TrainConfig
    from src.models import get_backbone
    from src.training.loop import Schedule
    from src.training.lr_schedule import LRSchedule
    from src.training.trainer import describe_run
    cfg = TrainConfig(network="r50", num_classes=85742)
    run = SimpleNamespace(cfg=cfg, data_dir="/data/faces_emore", rt=SimpleNamespace(group_size=1))
    source = type("Source", (), {"kind": "recordio", "__len__": lambda self: 5822653})()
    schedule = Schedule(90978, 90978 * 25, 0, 64, LRSchedule("step", 0.01, 90978, 25, [10, 16, 21]))
    text = describe_run(run, source, SimpleNamespace(backbone=get_backbone("r50")), schedule, fp16=False)
    assert text.startswith("training r50: 43.6 M parameters, 12.6")  # insightface's "GFLOPs" of r50: 6.3 G MACs
    assert "5822653 images, 85742 classes" in text and "2274450 to go of 2274450 (90978 steps/epoch x 25" in text
    assert text.splitlines()[-1].startswith("note: r50 has 44 M parameters: training it on a CPU takes seconds per "
                                            "image") and "configs/demo.yaml" in text


def test_durations_read_naturally():
    from src.training.callbacks import duration
    assert [duration(s) for s in (42, 600, 3 * 3600, 5 * 86400)] == ["42 s", "10 min", "3.0 h", "5.0 days"]


def test_lr_schedule_in_log(trained_run):
    lrs = [m["lr"] for m in read_metrics(trained_run)]
    # 3.2 for a batch of 512 -> 0.05 at batch 8, halved from epoch 3 on (0-based).
    np.testing.assert_allclose(lrs[:24], 0.05, rtol=1e-6)
    np.testing.assert_allclose(lrs[24:], 0.025, rtol=1e-6)


def test_resume_continues_at_the_right_step_with_the_same_lr(trained_run, tiny_data, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(trained_run / "ArcFace-2_8.ckpt", out)
    assert train.main(["--data_url", str(tiny_data[0]), "--train_url", str(out), "--resume", "auto"]
                      + TINY_TRAIN_ARGS) == 0
    resumed = read_metrics(out)
    original = read_metrics(trained_run)
    assert [m["step"] for m in resumed] == list(range(17, 33))
    assert [m["epoch"] for m in resumed] == [3] * 8 + [4] * 8
    np.testing.assert_allclose([m["lr"] for m in resumed], [m["lr"] for m in original[16:]])
    assert "resumed from" in (out / "train.log").read_text()
    # Optimizer state came back too: the global step of the optimizer continued from 16.
    params, meta = read_checkpoint(str(out / "ArcFace-4_8.ckpt"))
    assert meta["global_step"] == 32
    assert int(params["global_step"].asnumpy().reshape(-1)[0]) == 32
    # The resumed epoch continues from the trained network, not from a fresh one.
    resumed_losses, first_epoch = [m["loss"] for m in resumed[:8]], [m["loss"] for m in original[:8]]
    assert np.mean(resumed_losses) < 0.85 * np.mean(first_epoch), (resumed_losses, first_epoch)


def test_resume_starts_from_the_record_and_refuses_to_change_the_network(trained_run, tiny_data, tmp_path, capsys):
    """--resume takes every option from the checkpoint's record (here: the data, the network, the
    schedule; only --epochs is given anew), and refuses a change of what the network is."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(trained_run / "ArcFace-4_8.ckpt", out)
    assert run_main(train.main, ["--train_url", str(out), "--resume", "auto", "--network", "r50"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained with --network r18, not r50" in err, err
    assert run_main(train.main, ["--train_url", str(out), "--resume", "auto", "--margin", "cosface"]) == 2
    assert "trained with --margin arcface, not cosface" in capsys.readouterr().err
    for option, value, recorded_value in (("--margin_type", "adaface", "combined"), ("--subcenter_k", "2", "3")):
        assert run_main(train.main, ["--train_url", str(out), "--resume", "auto", option, value]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"trained with {option} {recorded_value}, not {value}" in err, err
    assert train.main(["--train_url", str(out), "--resume", "auto", "--epochs", "5", "--eval_url", ""]) == 0
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["margin_type"] == "combined" and recorded["adaface_h"] == 0.333
    assert recorded["epochs"] == 5 and recorded["data_url"] == str(tiny_data[0]) and recorded["width"] == 8
    assert recorded["schedule"] == [3] and recorded["lr"] == 3.2 and recorded["resume"] == "auto"
    rows = read_metrics(out)
    assert [m["step"] for m in rows] == list(range(33, 41)) and rows[0]["lr"] == pytest.approx(0.025)


@pytest.mark.slow
def test_resume_checks_shapes_of_a_checkpoint_without_a_record(trained_run, tiny_data, tmp_path, capsys):
    """Checkpoints of earlier versions carry no record: a shape mismatch is still one clear line."""
    import mindspore as ms
    params = ms.load_checkpoint(str(trained_run / "ArcFace-2_8.ckpt"))
    old = tmp_path / "ArcFace-2_8.ckpt"
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items() if not isinstance(v, str)], str(old),
                       append_dict={k: v for k, v in params.items() if isinstance(v, str) and k != "meta_config"})
    args = ["--data_url", str(tiny_data[0]), "--train_url", str(tmp_path / "out"),
            "--resume", str(old)] + TINY_TRAIN_ARGS + ["--width", "16"]
    assert run_main(train.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint") and "does not fit" in err and len(err.splitlines()) == 1, err


class FakeStep:
    """Stands in for the train-step cell: returns (loss, overflow, loss scale) one step after the other."""

    def __init__(self, results):
        self.results = iter(results)

    def set_train(self, mode):
        pass

    def __call__(self, images, labels):
        import mindspore as ms
        loss, overflow, scale = next(self.results)
        return ms.Tensor(np.float32(loss)), ms.Tensor(overflow), ms.Tensor(np.float32(scale))


class FakeDataset:
    def __init__(self, steps):
        self.steps = steps

    def repeat(self, count):
        self.count = count
        return self

    def create_tuple_iterator(self, num_epochs):
        return iter([(None, None)] * self.steps * self.count)


class Recorder(CheckpointSaver):
    """A CheckpointSaver that writes nothing: the syncs it saw and the positions it would save."""

    def __init__(self, interval):
        super().__init__(writer=None, interval=interval)
        self.synced, self.saved = [], []

    def on_sync(self, s):
        self.synced.append((s.global_step, s.steps, s.skipped, s.loss_scale))
        super().on_sync(s)

    def save(self, s):
        self.saved.append(s.global_step)


def test_loop_reads_results_at_sync_points_and_stops_on_divergence():
    """Results are read only at sync points (log interval 2, a save every 3 steps, epoch ends); skipped
    fp16 steps are counted; a non-finite step at loss scale 1 stops training, naming it, before any
    later save."""
    from src.training.loop import Schedule, run_loop
    ok, skip, bad = (1.0, False, 4.0), (1.2, True, 4.0), (float("nan"), True, 1.0)
    recorder = Recorder(interval=3)
    schedule = Schedule(steps_per_epoch=4, total_steps=9, start_step=0, global_batch=8,
                        lr=LRSchedule.constant(0.1), log_interval=2)
    with pytest.raises(ArcFaceError, match=r"not finite \(loss nan\) at epoch 2 step 3 \(global step 7\)"):
        run_loop(FakeStep([ok, skip, ok, ok, ok, ok, bad, ok, ok]), FakeDataset(4), schedule, [recorder])
    assert recorder.synced == [(2, 2, 1, 4.0), (3, 1, 0, 4.0), (4, 1, 0, 4.0), (6, 2, 0, 4.0)]
    assert recorder.saved == [3, 6]


def test_sunk_blocks_of_steps_are_read_at_their_ends(monkeypatch, capsys):
    """--sink_size: MindSpore's data sink runs a block of steps per call (GPU/Ascend); the loop counts
    the block's steps and reads the last one's results at its end. (On the CPU it is refused.)"""
    import mindspore as ms

    from src.training.loop import Schedule, run_loop
    calls = []

    def data_sink(fn, dataset, sink_size):
        def run():
            calls.append(sink_size)
            for _ in range(sink_size):
                out = fn(None, None)
            return out
        return run
    monkeypatch.setattr(ms, "data_sink", data_sink)
    recorder = Recorder(interval=0)
    schedule = Schedule(steps_per_epoch=4, total_steps=12, start_step=0, global_batch=8,
                        lr=LRSchedule("poly", 1.2, 4, 3), log_interval=1, sink_size=4)
    state = run_loop(FakeStep([(1.0, False, 4.0)] * 12), FakeDataset(4), schedule, [recorder])
    assert calls == [4, 4, 4] and recorder.synced == [(4, 4, 0, 4.0), (8, 4, 0, 4.0), (12, 4, 0, 4.0)]
    assert state.global_step == 12 and state.lr == pytest.approx(1.2 / 12) and state.epoch == 3
    assert run_main(train.main, ["--sink_size", "4", "--data_url", "x"]) == 2
    assert "--sink_size needs --device_target GPU or Ascend" in capsys.readouterr().err


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    import mindspore as ms
    net = ms.nn.Dense(3, 2)
    good = tmp_path / "ArcFace-1_5.ckpt"
    save_checkpoint_atomic(net, str(good), {"global_step": 5})
    before = good.read_bytes()

    def crash(cell, path, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(ms, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_atomic(net, str(good), {"global_step": 6})
    assert good.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ArcFace-1_5.ckpt"]


@pytest.mark.parametrize("case", ["missing", "neither", "empty", "num_classes", "config", "config_key",
                                  "negative", "used_folder"])
def test_bad_input_is_one_clear_line(case, tiny_data, tmp_path, capsys):
    args = ["--train_url", str(tmp_path / "out")]
    if case == "missing":
        args += ["--data_url", str(tmp_path / "nope")]
        expected = "training data folder not found"
    elif case == "neither":
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "notes.txt").write_text("x")
        args += ["--data_url", str(tmp_path / "data")]
        expected = "neither train.rec/train.idx nor one sub-folder per identity"
    elif case == "empty":
        (tmp_path / "data" / "0").mkdir(parents=True)
        args += ["--data_url", str(tmp_path / "data")]
        expected = "contains no images"
    elif case == "num_classes":
        args += ["--data_url", str(tiny_data[0]), "--num_classes", "5"]
        expected = "--num_classes 5 is smaller than the labels"
    elif case == "config":
        (tmp_path / "bad.yaml").write_text("lr: [unclosed\n")
        args += ["--config", str(tmp_path / "bad.yaml")]
        expected = "is not valid yaml"
    elif case == "config_key":
        (tmp_path / "bad.yaml").write_text("learning_rate: 0.1\n")
        args += ["--config", str(tmp_path / "bad.yaml")]
        expected = "unknown option(s) learning_rate"
    elif case == "negative":
        args += ["--data_url", str(tiny_data[0]), "--max_steps", "-1"]
        expected = "--max_steps must be at least 0, not -1"
    else:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "ArcFace-3_10.ckpt").write_bytes(b"an earlier run")
        args += ["--data_url", str(tiny_data[0])]
        expected = "already holds checkpoints (ArcFace-3_10.ckpt): use --resume auto"
    assert run_main(train.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err


def test_imagefolder_orders_numeric_class_folders_numerically(tmp_path):
    import cv2

    from src.data.sources import open_source, resolve_num_classes
    image = cv2.imencode(".jpg", np.zeros((112, 112, 3), np.uint8))[1].tobytes()
    for name in ("10", "2", "1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.jpg").write_bytes(image)
        (tmp_path / name / "readme.txt").write_text("not an image")
    source = open_source(str(tmp_path))
    assert source.kind == "imagefolder" and source.classes == ["1", "2", "10"]
    assert source.labels().tolist() == [0, 1, 2]
    assert resolve_num_classes(source, 0) == 3


def test_num_classes_from_labels_without_property(tiny_data, tmp_path):
    from src.data.sources import open_source, resolve_num_classes
    for name in ("train.rec", "train.idx"):
        shutil.copy(tiny_data[0] / name, tmp_path)
    assert resolve_num_classes(open_source(str(tmp_path)), 0) == 8
    assert resolve_num_classes(open_source(str(tmp_path)), 20) == 20


def test_weight_decay_skips_batchnorm():
    from src.config import TrainConfig
    from src.training.optim import parameter_groups
    from src.training.trainer import build_network
    net = build_network(TrainConfig(network="r18", width=8), num_classes=4)
    decay, no_decay = parameter_groups(net, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.name.endswith(("gamma", "beta")) for p in no_decay["params"])
    assert not any(p.name.endswith(("gamma", "beta")) for p in decay["params"])
    assert any(p.name == "head.weight" for p in decay["params"])


@pytest.mark.slow
def test_corrupt_image_stops_with_its_key_unless_skip_corrupt(tiny_data, tmp_path, capsys):
    from src.data.face_rec import FaceRecordDataset, write_face_dataset
    good = FaceRecordDataset(str(tiny_data[0]))
    samples = [good[i] for i in range(len(good))]
    samples[5] = (samples[5][0][: len(samples[5][0]) // 2], samples[5][1])  # a truncated JPEG
    data = tmp_path / "data"
    write_face_dataset(str(data), samples)
    args = ["--data_url", str(data), "--network", "r18", "--width", "8", "--batch_size", "8", "--epochs", "1",
            "--num_workers", "1", "--log_interval", "1"]
    assert run_main(train.main, args + ["--train_url", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.rec" in err and "key 6" in err and "--skip_corrupt" in err, err
    assert run_main(train.main, args + ["--train_url", str(tmp_path / "b"), "--skip_corrupt", "true"]) == 0
    assert (tmp_path / "b" / "ArcFace-1_8.ckpt").is_file()


def _wait_for_step(log, process_alive, step_text="epoch: 1 step: 3,"):
    import time
    deadline = time.time() + 300
    while time.time() < deadline and process_alive() and not (log.exists() and step_text in log.read_text()):
        time.sleep(0.5)


TRAIN_LONG = ["--network", "r18", "--width", "8", "--batch_size", "8", "--epochs", "50", "--num_workers", "1",
              "--log_interval", "1"]


@pytest.mark.slow
def test_sigterm_saves_the_last_completed_step_and_is_named(tiny_data, tmp_path):
    import signal
    import subprocess
    import sys
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "train.py"), "--data_url", str(tiny_data[0]), "--train_url", str(out)]
    process = subprocess.Popen(command + TRAIN_LONG, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    log = out / "train.log"
    _wait_for_step(log, lambda: process.poll() is None)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    text = log.read_text()
    step = int(re.search(r"stopped by SIGTERM \(a job scheduler.* after global step (\d+): saving", text).group(1))
    assert step >= 3
    assert (out / f"ArcFace-1_{step}.ckpt").is_file()


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_is_named_ctrl_c_and_saves(tiny_data, tmp_path):
    """Ctrl-C typed in the terminal the run is in the foreground of: MindSpore turns the SIGINT into a
    SIGTERM while a step runs; the log must not blame a job scheduler or another rank."""
    import os
    import pty
    import sys
    import time
    out = tmp_path / "out"
    pid, terminal = pty.fork()
    if pid == 0:  # the child: the run, with the pseudo-terminal as its controlling terminal
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "train.py", "--data_url", str(tiny_data[0]), "--train_url",
                                  str(out)] + TRAIN_LONG)
    output = bytearray()

    def drain():
        import select
        try:
            while True:
                ready, _, _ = select.select([terminal], [], [], 0)
                if not ready:
                    return True
                chunk = os.read(terminal, 65536)
                if not chunk:
                    return False
                output.extend(chunk)
        except OSError:
            return False
    log = out / "train.log"
    _wait_for_step(log, drain)
    os.write(terminal, b"\x03")  # Ctrl-C
    deadline = time.time() + 120
    while time.time() < deadline and drain():
        if os.waitpid(pid, os.WNOHANG)[0]:
            break
        time.sleep(0.2)
    else:
        os.waitpid(pid, 0)
    os.close(terminal)
    text = log.read_text()
    found = re.search(r"stopped by (SIGINT \(Ctrl-C\)|Ctrl-C \(which MindSpore passes on as SIGTERM while a step "
                      r"runs\) or SIGTERM) after global step (\d+): saving", text)
    assert found, text[-2000:] + output.decode(errors="replace")[-2000:]
    epoch, step = divmod(int(found.group(2)) - 1, 8)  # 64 images, batch 8
    assert (out / f"ArcFace-{epoch + 1}_{step + 1}.ckpt").is_file()


@pytest.mark.slow
def test_fp16_backbone_with_dynamic_loss_scaling_trains(tiny_data, tmp_path):
    """The GPU/Ascend default (--amp auto there), run on the CPU: fp16 body, loss-scaled step."""
    out = tmp_path / "amp"
    assert train.main(["--data_url", str(tiny_data[0]), "--train_url", str(out), "--amp", "O2", "--max_steps", "3"]
                      + TINY_TRAIN_ARGS) == 0
    assert "fp16 backbone + loss scaling" in (out / "train.log").read_text()
    losses = [m["loss"] for m in read_metrics(out)]
    assert len(losses) == 3 and np.isfinite(losses).all()
    params, _ = read_checkpoint(str(out / "ArcFace-1_3.ckpt"))
    assert params["backbone.conv1.weight"].dtype == ms_float32()  # master weights stay fp32
    assert "scale_sense" in params


def ms_float32():
    import mindspore as ms
    return ms.float32


def test_yaml_values_are_converted_and_best_score_is_read_back(tmp_path):
    from src.config import parse_train_args
    from src.training.callbacks import best_eval_score
    (tmp_path / "c.yaml").write_text("skip_corrupt: 1\npartial_fc: no\nschedule: [3, 5]\nlr: 0.2\n")
    cfg, given = parse_train_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.3"])
    assert given == {"skip_corrupt", "partial_fc", "schedule", "lr"}
    assert cfg.skip_corrupt is True and cfg.partial_fc is False and cfg.schedule == [3, 5] and cfg.lr == 0.3
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "eval": {"a": 0.9, "b": 0.8}}\n'
                       '{"step": 4, "eval": {"a": 0.7, "b": 0.8}}\n')
    assert best_eval_score(str(metrics)) == pytest.approx(0.85)
    assert best_eval_score(str(tmp_path / "none.jsonl")) is None


def test_pruning_removes_head_shards_and_auto_resume_skips_incomplete_sets(tmp_path):
    """Checkpoints of a run on 2 ranks (rank 0's file + one head shard per rank): pruning takes the
    shards with their checkpoint, and --resume auto skips a checkpoint whose shard set is incomplete."""
    import mindspore as ms

    from src.training.state import latest_resumable, remove_checkpoint
    dense = ms.nn.Dense(2, 2)
    for step in (1, 2, 3):
        save_checkpoint_atomic([{"name": "global_step", "data": ms.Tensor(step)}],
                               str(tmp_path / f"ArcFace-1_{step}.ckpt"))
        for rank in (0, 1) if step < 3 else (0,):  # rank 1 was killed before writing its shard of step 3
            save_checkpoint_atomic(dense, str(tmp_path / f"ArcFace-1_{step}.head-r{rank}of2.ckpt"))
    remove_checkpoint(str(tmp_path / "ArcFace-1_1.ckpt"))
    assert not list(tmp_path.glob("ArcFace-1_1*"))
    assert os.path.basename(latest_resumable(str(tmp_path))[0]) == "ArcFace-1_2.ckpt"


@pytest.mark.slow
def test_modelarts_copies_data_in_results_out_and_resumes(tiny_data, tmp_path, monkeypatch, capsys):
    """moxing exists only on ModelArts: a stand-in copies folders like mox.file.copy_parallel."""
    import sys
    import types

    import src.training.modelarts
    monkeypatch.setattr(src.training.modelarts, "CACHE", str(tmp_path / "cache"))
    args = ["--modelarts", "true", "--data_url", str(tiny_data[0]), "--train_url", str(tmp_path / "obs"),
            "--network", "r18", "--width", "8", "--batch_size", "8", "--num_workers", "1", "--epochs", "2"]
    monkeypatch.setitem(sys.modules, "moxing", None)
    assert run_main(train.main, args + ["--max_steps", "1"]) == 2
    assert "--modelarts needs the moxing package" in capsys.readouterr().err

    def copy_parallel(src, dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    fake = types.SimpleNamespace(file=types.SimpleNamespace(copy_parallel=copy_parallel, copy=shutil.copy))
    monkeypatch.setitem(sys.modules, "moxing", fake)
    assert train.main(args + ["--max_steps", "8"]) == 0
    assert (tmp_path / "cache" / "data" / "train.rec").is_file()
    assert (tmp_path / "obs" / "ArcFace-1_8.ckpt").is_file() and (tmp_path / "obs" / "train.log").is_file()
    shutil.rmtree(tmp_path / "cache")  # a new job starts with an empty local disk
    assert train.main(args + ["--resume", "auto", "--max_steps", "0"]) == 0  # the record had --max_steps 8
    assert "resumed from" in (tmp_path / "obs" / "train.log").read_text()
    assert (tmp_path / "obs" / "ArcFace-2_8.ckpt").is_file()


def test_help_lists_every_backbone(capsys):
    from src.models import BACKBONES
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert all(f" {name}," in text or f" {name} " in text for name in BACKBONES), text
