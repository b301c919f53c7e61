"""export.py, the exported models' parity, eval_onnx.py, eval_ijbc_onnx.py, preprocess/postprocess."""
import re

import numpy as np
import pytest

import eval_ijbc_onnx
import eval_onnx
import export
import postprocess
import preprocess
import val
from src.cli import run_main


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    ckpt = str(trained_run / "ArcFace-4_8.ckpt")
    for fmt in ("MINDIR", "ONNX"):
        assert export.main(["--ckpt_file", ckpt, "--file_name", str(out / "model"), "--file_format", fmt]) == 0
    assert export.main(["--ckpt_file", ckpt, "--file_name", str(out / "fixed2"), "--file_format", "ONNX",
                        "--batch_size", "2"]) == 0
    return {"ckpt": ckpt, "mindir": str(out / "model.mindir"), "onnx": str(out / "model.onnx"),
            "fixed2": str(out / "fixed2.onnx")}


def test_onnx_file_is_valid_with_named_symbolic_batch(exported):
    import onnx
    model = onnx.load(exported["onnx"])
    onnx.checker.check_model(model)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "data" and out.name == "embedding"
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["batch", 3, 112, 112] and out_dims == ["batch", 512]
    fixed = onnx.load(exported["fixed2"]).graph.input[0]
    assert [d.dim_value for d in fixed.type.tensor_type.shape.dim] == [2, 3, 112, 112]


def test_export_leaves_folder_permissions_alone_and_files_follow_the_umask(exported, tmp_path, monkeypatch):
    """MindSpore's exporter makes the folder owner-only and the file read-only; the README's form
    `--file_name arcface_r100` would do that to the current folder."""
    import os
    import stat
    monkeypatch.chdir(tmp_path)
    os.chmod(tmp_path, 0o755)
    old = os.umask(0o002)
    try:
        for fmt in ("ONNX", "MINDIR"):
            assert export.main(["--ckpt_file", exported["ckpt"], "--file_name", "arcface", "--file_format", fmt]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o755
    assert sorted(os.listdir(tmp_path)) == ["arcface.mindir", "arcface.onnx"]  # no scratch folder left
    for name in ("arcface.onnx", "arcface.mindir"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o664


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_mindspore_mindir_and_onnx_give_the_same_embeddings(exported, batch):
    from src.evaluation.embedders import MindIREmbedder, MindSporeEmbedder, OnnxEmbedder, backbone_from_checkpoint
    x = np.random.default_rng(batch).uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)
    reference = MindSporeEmbedder(backbone_from_checkpoint(exported["ckpt"]))(x)
    assert reference.shape == (batch, 512)
    norm = np.linalg.norm(reference, axis=1).max()
    for other in (MindIREmbedder(exported["mindir"]), OnnxEmbedder(exported["onnx"])):
        assert np.abs(other(x) - reference).max() <= 1e-4 * norm


def test_fixed_batch_onnx_serves_any_batch(exported):
    from src.evaluation.embedders import OnnxEmbedder
    x = np.random.default_rng(0).uniform(-1, 1, (7, 3, 112, 112)).astype(np.float32)
    fixed, dynamic = OnnxEmbedder(exported["fixed2"]), OnnxEmbedder(exported["onnx"])
    assert fixed.fixed_batch == 2 and dynamic.fixed_batch is None
    np.testing.assert_allclose(fixed(x), dynamic(x), atol=1e-5)


def accuracy_flip(text, name="demo"):
    match = re.search(rf"^\[{name}\]Accuracy-Flip: (\d\.\d{{5}})\+-(\d\.\d{{5}})$", text, re.M)
    assert match, text
    return match.group(0)


def test_eval_onnx_reproduces_val(exported, tiny_data, tmp_path, capsys):
    common = ["--eval_url", str(tiny_data[1].parent), "--target", "demo", "--batch_size", "16"]
    assert val.main(common + ["--ckpt_url", exported["ckpt"], "--log", str(tmp_path / "a.log")]) == 0
    from_val = accuracy_flip(capsys.readouterr().out)
    assert eval_onnx.main(common + ["--onnx_url", exported["onnx"], "--log", str(tmp_path / "b.log")]) == 0
    assert accuracy_flip(capsys.readouterr().out) == from_val
    # The log files say when, which model file and which backend each line is about; the line names its set.
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    for log, model, backend in (("a.log", exported["ckpt"], "onnxruntime"), ("b.log", exported["onnx"], "onnxruntime")):
        text = (tmp_path / log).read_text()
        assert re.search(rf"^{stamp} {re.escape(model)} \({backend}\) {re.escape(from_val)}$", text, re.M), text


def test_onnx_embedder_applies_the_models_own_normalisation(tmp_path):
    """A third-party style model: fixed batch 1, raw pixels expected ((x - 0) / 1)."""
    import onnx
    from onnx import TensorProto, helper

    from src.evaluation.embedders import OnnxEmbedder
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input.1"], ["m"], axes=[2, 3], keepdims=0)], "mean",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "third_party.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    embedder = OnnxEmbedder(str(path), input_mean=0.0, input_std=1.0)
    assert embedder.input_name == "input.1" and embedder.fixed_batch == 1
    pixels = np.stack([np.full((3, 112, 112), v, np.float32) for v in (0.0, 100.0, 255.0)])
    out = embedder((pixels - 127.5) / 127.5)  # what the protocol hands every embedder
    np.testing.assert_allclose(out, [[0.0] * 3, [100.0] * 3, [255.0] * 3], atol=1e-3)


@pytest.mark.parametrize("case", ["not_onnx", "wrong_input", "other_network", "air_on_cpu", "missing_ckpt",
                                  "zero_std"])
def test_bad_input_is_one_clear_line(case, exported, tiny_data, tmp_path, capsys):
    if case == "not_onnx":
        bad = tmp_path / "model.onnx"
        bad.write_bytes(b"this is not a model")
        code = run_main(eval_onnx.main, ["--eval_url", str(tiny_data[1].parent), "--target", "demo",
                                         "--onnx_url", str(bad), "--log", str(tmp_path / "x.log")])
        expected = "cannot load ONNX model"
    elif case == "wrong_input":
        import onnx
        from onnx import TensorProto, helper
        graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 64, 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 12288])])
        path = tmp_path / "small.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
        code = run_main(eval_onnx.main, ["--eval_url", str(tiny_data[1].parent), "--target", "demo",
                                         "--onnx_url", str(path), "--log", str(tmp_path / "x.log")])
        expected = "expected (batch, 3, 112, 112)"
    elif case == "other_network":
        code = run_main(export.main, ["--ckpt_file", exported["ckpt"], "--network", "r34",
                                      "--file_name", str(tmp_path / "m")])
        expected = "does not"
    elif case == "air_on_cpu":
        code = run_main(export.main, ["--ckpt_file", exported["ckpt"], "--file_format", "AIR",
                                      "--file_name", str(tmp_path / "m")])
        expected = "AIR export needs an Ascend device"
    elif case == "missing_ckpt":
        code = run_main(export.main, ["--ckpt_file", str(tmp_path / "none.ckpt")])
        expected = "checkpoint not found"
    else:
        code = run_main(eval_onnx.main, ["--eval_url", str(tiny_data[1].parent), "--target", "demo",
                                         "--onnx_url", exported["onnx"], "--input_std", "0",
                                         "--log", str(tmp_path / "x.log")])
        expected = "--input_std must be positive"
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err


def test_preprocess_app_layout_postprocess_equals_val(exported, tiny_data, tmp_path, capsys):
    """preprocess -> (the exported MINDIR run in Python, written like the C++ app) -> postprocess."""
    from src.evaluation.embedders import MindIREmbedder
    batches, labels, results = tmp_path / "pre", tmp_path / "labels", tmp_path / "result_Files"
    assert preprocess.main(["--dataset_path", str(tiny_data[1]), "--result_dir", str(batches),
                            "--label_dir", str(labels), "--batch_size", "32"]) == 0
    assert (labels / "demo_issame_list.npy").is_file()
    files = sorted(batches.glob("*.bin"))
    assert [f.name for f in files][:2] == ["demo_00000.bin", "demo_00001.bin"]
    embedder = MindIREmbedder(exported["mindir"])
    results.mkdir()
    for f in files:  # what the C++ app does for every file, in sorted order
        data = np.fromfile(f, np.float32).reshape(-1, 3, 112, 112)
        embedder(data).astype(np.float32).tofile(results / f"{f.stem}_0.bin")
    capsys.readouterr()
    assert postprocess.main(["--result_dir", str(results), "--label_dir", str(labels), "--data_set", "demo"]) == 0
    from_post = accuracy_flip(capsys.readouterr().out)
    assert val.main(["--eval_url", str(tiny_data[1].parent), "--target", "demo", "--ckpt_url", exported["ckpt"],
                     "--log", str(tmp_path / "v.log")]) == 0
    assert accuracy_flip(capsys.readouterr().out) == from_post

    (results / "demo_00001_0.bin").unlink()
    assert run_main(postprocess.main, ["--result_dir", str(results), "--label_dir", str(labels),
                                       "--data_set", "demo"]) == 2
    assert "missing inference result" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_main(postprocess.main, ["--result_dir", str(empty), "--label_dir", str(labels),
                                       "--data_set", "demo"]) == 2
    assert "no inference results" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ijb_release(tmp_path_factory):
    from test_ijb import _write_release
    root = tmp_path_factory.mktemp("ijb")
    _write_release(str(root), "IJBC", 6, 40, seed=5)
    return root / "IJB_release"


def test_ijb_through_val_and_eval_ijbc_onnx(exported, ijb_release, tmp_path, capsys):
    header = ["Methods", "1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]  # column widths follow the TARs
    assert val.main(["--eval_url", str(ijb_release / "IJBC"), "--target", "IJBC", "--ckpt_url", exported["ckpt"],
                     "--batch_size", "5", "--log", str(tmp_path / "v.log"), "--result_dir", str(tmp_path / "ms")]) == 0
    out = capsys.readouterr().out
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines() if "Methods" in line]
    assert cells == [header] and "| ijbc-IJBC |" in out
    assert eval_ijbc_onnx.main(["--image-path", str(ijb_release / "IJBC"), "--onnx_url", exported["onnx"],
                                "--target", "IJBC", "--batch_size", "7", "--result-dir", str(tmp_path / "onnx"),
                                "--log", str(tmp_path / "o.log")]) == 0
    onnx_out = capsys.readouterr().out
    row = re.search(r"^\| ijbc-IJBC \|.*$", onnx_out, re.M).group(0)
    assert row in out  # the same TARs from MindSpore and ONNX Runtime
    ms_scores = np.load(tmp_path / "ms" / "IJBC_scores.npy")
    onnx_scores = np.load(tmp_path / "onnx" / "IJBC_scores.npy")
    np.testing.assert_allclose(ms_scores, onnx_scores, atol=1e-4)
    assert (tmp_path / "onnx" / "IJBC_roc.png").stat().st_size > 10_000


def test_the_doors_share_one_model_option_group(capsys):
    """One definition of each model/device option (src.cli.MODEL_OPTIONS); a door differs only where the
    model zoo's seed does: no Ascend for the ONNX doors, a batch of 128 for IJB, a dynamic batch for export."""
    import embed
    from src.cli import MODEL_OPTIONS
    required = {val: ["--eval_url", "e", "--ckpt_url", "c"], eval_onnx: ["--eval_url", "e", "--onnx_url", "o"],
                eval_ijbc_onnx: ["--image-path", "i", "--onnx_url", "o"], embed: ["--model", "m"],
                export: ["--ckpt_file", "c"]}
    batch = {val: 64, eval_onnx: 64, eval_ijbc_onnx: 128, embed: 64, export: None}
    for door, args in required.items():
        parsed = door.build_parser().parse_args(args)
        assert parsed.batch_size == batch[door] and parsed.device_target == "CPU", door.__name__
        helps = {action.dest: action.help for action in door.build_parser()._actions}
        for name in ("network", "backend", "input_mean", "device_id"):
            assert helps.get(name, MODEL_OPTIONS[name]["help"]) == MODEL_OPTIONS[name]["help"], (door.__name__, name)
        ascend = args + ["--device_target", "Ascend"]
        if door in (eval_onnx, eval_ijbc_onnx):
            with pytest.raises(SystemExit):
                door.build_parser().parse_args(ascend)
            assert "invalid choice: 'Ascend' (choose from 'GPU', 'CPU')" in capsys.readouterr().err
        else:
            assert door.build_parser().parse_args(ascend).device_target == "Ascend"
