"""val.py end to end and verification during training, on the tiny run from conftest."""
import json
import re

import numpy as np

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
