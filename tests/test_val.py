"""val.py end to end and verification during training, on the tiny run from conftest."""
import json
import re

import numpy as np
import pytest

import val
from src.cli import run_main


def test_val_prints_the_protocol_lines_and_matches_a_direct_computation(trained_run, tiny_data, tmp_path, capsys):
    log = tmp_path / "eval.log"
    args = ["--eval_url", str(tiny_data[1].parent), "--target", "demo,lfw", "--ckpt_url", str(trained_run),
            "--batch_size", "7", "--log", str(log)]
    assert run_main(val.main, args) == 0
    out = capsys.readouterr().out
    assert "[lfw]missing:" in out
    match = re.search(r"^\[demo\]Accuracy-Flip: (\d\.\d{5})\+-(\d\.\d{5})$", out, re.M)
    assert match, out
    assert float(match.group(1)) > 0.6  # chance is 0.5
    assert match.group(0) in log.read_text()

    # The same number from the pieces directly: newest checkpoint, backbone, protocol.
    from src.data.bins import load_bin
    from src.evaluation.embedders import MindSporeEmbedder, backbone_from_checkpoint
    from src.evaluation.verification import embed_pairs, evaluate
    embedder = MindSporeEmbedder(backbone_from_checkpoint(str(trained_run / "ArcFace-4_8.ckpt")))
    images, issame = load_bin(str(tiny_data[1]))
    emb, emb_flip = embed_pairs(embedder, images, 16, progress=False)
    result = evaluate(emb, issame, emb_flip)
    assert f"{result.acc_flip:.5f}" == match.group(1)


def test_val_with_no_set_found_is_an_error(trained_run, tmp_path, capsys):
    args = ["--eval_url", str(tmp_path), "--target", "lfw", "--ckpt_url", str(trained_run),
            "--log", str(tmp_path / "eval.log")]
    assert run_main(val.main, args) == 2
    assert "none of the sets lfw was found" in capsys.readouterr().err


def test_verification_during_training_keeps_the_best_checkpoint(trained_run):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [16, 32]
    accuracies = [r["eval"]["demo"] for r in evals]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    log = (trained_run / "train.log").read_text()
    assert log.count("[demo]Accuracy-Flip:") == 2
    best_step = 16 * (int(np.argmax(accuracies)) + 1)
    assert "saved best.ckpt" in log
    from src.checkpoint import read_checkpoint
    _, meta = read_checkpoint(str(trained_run / "best.ckpt"))
    assert meta["global_step"] == best_step and meta["network"] == "r18" and meta["width"] == 8
    assert (trained_run / "training_curve.png").stat().st_size > 10_000


def test_the_training_curve_has_two_axes_in_two_colours_and_its_legend_outside(trained_run):
    """A curve a person can read later: loss on the left, accuracy on the right, each axis in the colour of
    its lines, the legend above the plot where it covers no line."""
    from matplotlib.colors import to_hex

    from src.training.callbacks import draw_training_curve
    fig = draw_training_curve(str(trained_run / "metrics.jsonl"))
    loss_ax, acc_ax = fig.axes
    (loss,), (accuracy,) = loss_ax.get_lines(), acc_ax.get_lines()
    assert to_hex(loss.get_color()) != to_hex(accuracy.get_color())
    assert to_hex(loss_ax.yaxis.label.get_color()) == to_hex(loss.get_color())
    assert to_hex(acc_ax.yaxis.label.get_color()) == to_hex(accuracy.get_color())
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert legend.y0 >= loss_ax.get_window_extent().y1  # entirely above the plotting area
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["training loss", "demo Accuracy-Flip"]


def test_training_records_the_calibrated_threshold_beside_best_ckpt(trained_run, tiny_data):
    """threshold.json: the protocol's threshold (mean of the folds' best squared distances, as a cosine)
    of best.ckpt's weights on the first verification set, its accuracy and step, tied to best.ckpt's bytes."""
    import hashlib

    from src.data.bins import load_bin
    from src.evaluation.embedders import open_model
    from src.evaluation.verification import embed_pairs, evaluate
    record = json.loads((trained_run / "threshold.json").read_text())
    best = trained_run / "best.ckpt"
    assert record["checkpoint"] == "best.ckpt" and record["set"] == "demo"
    assert record["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["eval"]["demo"], -r["step"]) for r in rows if "eval" in r]
    assert record["step"] == -max(evals)[1]  # the first evaluation with the best accuracy
    images, issame = load_bin(str(tiny_data[1]))
    emb, emb_flip = embed_pairs(open_model(str(best)).embed, images, 16, progress=False)
    result = evaluate(emb, issame, emb_flip)
    assert record["threshold"] == pytest.approx(1 - float(np.mean(result.best_thresholds)) / 2, abs=1e-12)
    assert record["accuracy"] == pytest.approx(result.acc_flip, abs=1e-12)
    assert record["sets"]["demo"]["threshold"] == record["threshold"] and -1 < record["threshold"] < 1


def test_norm_flip_fusion_gives_the_sums_lines(trained_run, tiny_data, tmp_path, capsys):
    """AdaFace's fusion (each feature normalised, times its own norm, summed) is the sum's direction:
    val.py --flip_fusion norm prints the same lines as the default."""
    lines = {}
    for fusion in ("sum", "norm"):
        args = ["--eval_url", str(tiny_data[1].parent), "--target", "demo", "--ckpt_url", str(trained_run),
                "--log", str(tmp_path / "eval.log"), "--flip_fusion", fusion]
        assert run_main(val.main, args) == 0
        lines[fusion] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[demo]")]
    assert lines["sum"] == lines["norm"] and len(lines["sum"]) == 4


def same_lines(ours, theirs):
    """The protocol's lines of two backends: accuracies and VAL identical to 5 decimals; XNorm, a mean
    norm of about 90 printed to 7 significant digits, to 1e-6 relative (float32 sums in another order)."""
    assert len(ours) == len(theirs) == 4
    # each line starts with the time, the model file and its backend: compare from the set's name on
    ours, theirs = ([line[line.index("[demo]"):] for line in lines] for lines in (ours, theirs))
    for a, b in zip(ours, theirs):
        if "XNorm" in a:
            assert float(a.split(": ")[1]) == pytest.approx(float(b.split(": ")[1]), rel=1e-6)
        else:
            assert a == b


def test_onnxruntime_backend_gives_the_same_lines_and_caches_the_export(trained_run, tiny_data, tmp_path, capsys):
    """--backend onnxruntime (the CPU default) prints the MindSpore backend's lines to 5 decimals; the
    checkpoint is exported once, next to it, and a changed checkpoint never reuses an old export."""
    import shutil

    import mindspore as ms
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "ArcFace-4_8.ckpt", run)
    common = ["--eval_url", str(tiny_data[1].parent), "--target", "demo", "--ckpt_url", str(run), "--batch_size", "16"]
    lines = {}
    for backend in ("mindspore", "onnxruntime"):
        assert val.main(common + ["--backend", backend, "--log", str(tmp_path / f"{backend}.log")]) == 0
        lines[backend] = (tmp_path / f"{backend}.log").read_text().splitlines()
    same_lines(lines["mindspore"], lines["onnxruntime"])
    assert "exporting ArcFace-4_8.ckpt to ONNX" in capsys.readouterr().err
    exports = list((run / ".onnx-cache").glob("ArcFace-4_8.ckpt.*.onnx"))
    assert len(exports) == 1
    stamp = exports[0].stat().st_mtime_ns
    assert val.main(common + ["--log", str(tmp_path / "auto.log")]) == 0  # auto = ONNX Runtime on the CPU
    assert "exporting" not in capsys.readouterr().err and exports[0].stat().st_mtime_ns == stamp
    same_lines((tmp_path / "auto.log").read_text().splitlines(), lines["mindspore"])
    # Another checkpoint under the same name: a new export replaces the old one.
    params = ms.load_checkpoint(str(run / "ArcFace-4_8.ckpt"))
    params["backbone.fc.bias"].set_data(params["backbone.fc.bias"] + 1.0)
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items() if not isinstance(v, str)],
                       str(run / "ArcFace-4_8.ckpt"),
                       append_dict={k: v for k, v in params.items() if isinstance(v, str)} | {"meta_network": "r18",
                                                                                              "meta_width": 8})
    assert val.main(common + ["--log", str(tmp_path / "changed.log")]) == 0
    assert "exporting" in capsys.readouterr().err
    assert [p for p in (run / ".onnx-cache").glob("*.onnx")] != exports and \
        len(list((run / ".onnx-cache").glob("*.onnx"))) == 1


def test_backend_embeddings_agree(trained_run):
    from src.evaluation.embedders import open_model
    batch = np.random.default_rng(0).uniform(-1, 1, (5, 3, 112, 112)).astype(np.float32)
    ms_emb = open_model(str(trained_run / "ArcFace-4_8.ckpt"), "mindspore").embed(batch)
    ort_emb = open_model(str(trained_run / "ArcFace-4_8.ckpt"), "onnxruntime").embed(batch)
    assert float(np.abs(ms_emb - ort_emb).max() / np.abs(ms_emb).max()) <= 1e-4


def test_evaluation_during_training_gives_the_same_numbers_with_both_backends(tiny_data, tmp_path):
    import types

    from src.data.bins import load_bin
    from src.evaluation.embedders import embedder_factory
    from src.models import get_backbone
    from src.training.callbacks import SyncState, VerificationMonitor
    backbone = get_backbone("r18", width=8, num_features=32)
    sets = {"demo": load_bin(str(tiny_data[1]))}
    writer = types.SimpleNamespace(directory=str(tmp_path), write=lambda *args, **kwargs: None)
    state = SyncState(1, 1, 1, 1, 1, 1.0, 0.1, 1, 1.0, 8)
    results = {}
    for backend in ("mindspore", "onnxruntime"):
        factory = embedder_factory(backend, "CPU", str(tmp_path / ".onnx-cache"),
                                   {"network": "r18", "width": 8, "num_features": 32})
        monitor = VerificationMonitor(backbone, sets, 1, 16, writer, factory,
                                      metrics_path=str(tmp_path / f"{backend}.jsonl"))
        monitor.evaluate(state)
        results[backend] = json.loads((tmp_path / f"{backend}.jsonl").read_text())["eval"]["demo"]
    assert results["mindspore"] == results["onnxruntime"]
    assert backbone.training  # back in training mode


@pytest.mark.parametrize("door, args, expected", [
    ("val", ["--eval_url", "{data}", "--ckpt_url", "{data}/model.onnx"],
     "{data}/model.onnx is an ONNX model, not a checkpoint: evaluate it with python eval_onnx.py --onnx_url "
     "{data}/model.onnx"),
    ("val", ["--eval_url", "{data}/demo.bin", "--ckpt_url", "{data}/model.ckpt"],
     "--eval_url takes the folder holding the verification sets (<set>.bin, or IJB_release/<IJBB|IJBC>), not the "
     "file {data}/demo.bin: use --eval_url {data} --target demo"),
    ("eval_onnx", ["--eval_url", "{data}", "--onnx_url", "{data}/model.ckpt"],
     "{data}/model.ckpt is a checkpoint, not an ONNX model: evaluate it with python val.py --ckpt_url "
     "{data}/model.ckpt"),
    ("val", ["--eval_url", "{data}", "--ckpt_url", "{data}/backbone.pth"],
     "unknown model type: {data}/backbone.pth (expected a .ckpt checkpoint, a training folder, a .mindir or an .onnx "
     "file): import a PyTorch state dict with python convert.py first"),
])
def test_a_file_of_the_wrong_kind_says_what_is_expected(door, args, expected, tmp_path, capsys):
    import importlib
    for name in ("model.onnx", "model.ckpt", "demo.bin", "backbone.pth"):
        (tmp_path / name).write_bytes(b"\0" * 64)
    argv = [a.format(data=tmp_path) for a in args]
    assert run_main(importlib.import_module(door).main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {expected.format(data=tmp_path)}"), err
