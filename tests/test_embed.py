"""embed.py and src/evaluation/faces.py: embeddings as the protocol computes them, --compare, --search,
landmark alignment, and one-line errors. Fast tests use a hand-made ONNX model; the numbers that
matter use the tiny trained run from conftest."""
import json
import os
import re

import cv2
import numpy as np
import pytest

import embed
from src.cli import run_main
from src.evaluation import faces
from src.evaluation.verification import embed_pairs, evaluate, l2_normalize

BATCH = 16


def write_png(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def flip_sum(embed_fn, images):
    """What embed.py should write, computed from the protocol's pieces."""
    emb, emb_flip = embed_pairs(embed_fn, images, BATCH, progress=False)
    return l2_normalize(emb.astype(np.float64) + emb_flip)


def decode(paths):
    return np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths])


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# --- a hand-made model: fast, and sensitive to position, so flips matter -------------------------

@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    weight = np.random.default_rng(0).normal(0, 1, (3 * 112 * 112, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["data"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["embedding"])],
        "toy", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(weight, "w")])
    path = tmp_path_factory.mktemp("toy") / "toy.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path)


@pytest.fixture(scope="module")
def toy_faces(tmp_path_factory):
    """Six random 'faces' in a nested folder, one of them 100x100 (resized on reading)."""
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("toy_faces")
    for name in ("z.png", "a/x.png", "a/b/c.png", "a/c.png", "b/1.jpg", "b/small.png"):
        size = 100 if "small" in name else 112
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if name.endswith(".jpg"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / name), image)
        else:
            write_png(root / name, image)
    (root / "a" / "notes.txt").write_text("not an image")
    write_png(root / ".hidden" / "h.png", np.zeros((112, 112, 3), np.uint8))
    return root


def test_folders_are_walked_in_sorted_order_and_rows_are_the_protocols_embedding(toy_onnx, toy_faces, tmp_path,
                                                                                 capsys):
    out = tmp_path / "out" / "emb.npy"
    extra = toy_faces / "z.png"  # a file given explicitly comes where it is given
    assert run_main(embed.main, ["--model", toy_onnx, "--images", str(toy_faces), str(extra),
                                 "--output", str(out), "--batch_size", "4"]) == 0
    captured = capsys.readouterr()
    assert "wrote 7 embeddings of dimension 8" in captured.out
    # the one image that is not 112x112 is resized, with one warning pointing to the ways to align photos
    (warning,) = captured.err.strip().splitlines()
    assert warning.startswith(f"warning: 1 image(s) are not 112x112 aligned faces (e.g. {toy_faces / 'b/small.png'}: "
                              f"100x100) and are resized") and "--detect" in warning and "--landmarks" in warning
    rows = out.with_suffix(".txt").read_text().splitlines()
    expected = ["a/b/c.png", "a/c.png", "a/x.png", "b/1.jpg", "b/small.png", "z.png"]
    assert rows == [str(toy_faces / name) for name in expected] + [str(extra)]
    emb = np.load(out)
    assert emb.dtype == np.float32 and emb.shape == (7, 8)
    from src.data.images import resize
    from src.evaluation.embedders import OnnxEmbedder
    images = np.stack([resize(image, (112, 112)) for image in
                       (cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in rows)])
    np.testing.assert_allclose(emb, flip_sum(OnnxEmbedder(toy_onnx), images), atol=1e-5)
    # quality: the norm of the mean of the face's and its flip's unnormalised features
    raw, raw_flip = embed_pairs(OnnxEmbedder(toy_onnx), images, BATCH, progress=False)
    quality = np.load(tmp_path / "out" / "emb.quality.npy")
    assert quality.dtype == np.float32 and quality.shape == (7,)
    np.testing.assert_allclose(quality, np.linalg.norm((raw.astype(np.float64) + raw_flip) / 2, axis=1), rtol=1e-5)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp")]


def test_existing_outputs_are_kept_unless_overwrite(toy_onnx, toy_faces, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    args = ["--model", toy_onnx, "--images", str(toy_faces / "a"), "--output", str(out)]
    assert run_main(embed.main, args) == 0
    before = out.read_bytes()
    out.with_suffix(".txt").write_text("earlier\n")
    assert run_main(embed.main, args) == 2
    assert "emb.npy exists; pass --overwrite" in one_error_line(capsys)
    assert out.read_bytes() == before and out.with_suffix(".txt").read_text() == "earlier\n"
    assert run_main(embed.main, args + ["--overwrite"]) == 0
    assert len(out.with_suffix(".txt").read_text().splitlines()) == 3


def test_skip_bad_warns_per_file_and_leaves_them_out(toy_onnx, toy_faces, tmp_path, capsys):
    folder = tmp_path / "mixed"
    good = write_png(folder / "0.png", cv2.imread(str(toy_faces / "z.png"))[:, :, ::-1].copy())
    (folder / "1.png").write_bytes(good.read_bytes()[:200])            # truncated
    (folder / "2.jpg").write_bytes(b"plain text, not a JPEG")           # not an image
    write_png(folder / "3.png", cv2.imread(str(toy_faces / "a/x.png"))[:, :, ::-1].copy())
    out = tmp_path / "emb.npy"
    args = ["--model", toy_onnx, "--images", str(folder), "--output", str(out)]
    assert run_main(embed.main, args) == 2
    err = one_error_line(capsys)
    assert "1.png: truncated PNG" in err and "--skip_bad" in err
    assert run_main(embed.main, args + ["--skip_bad"]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: skipping ") for w in warnings)
    assert "1.png: truncated PNG" in warnings[0] and "2.jpg: not a JPEG/PNG/BMP image" in warnings[1]
    assert "(2 face(s) left out)" in captured.out
    assert out.with_suffix(".txt").read_text().splitlines() == [str(folder / "0.png"), str(folder / "3.png")]
    alone = tmp_path / "alone.npy"
    assert run_main(embed.main, ["--model", toy_onnx, "--images", str(folder / "0.png"), str(folder / "3.png"),
                                 "--output", str(alone)]) == 0
    np.testing.assert_array_equal(np.load(out), np.load(alone))


def test_landmark_files_csv_and_json(tmp_path):
    for name in ("a.png", "sub/b.png"):
        write_png(tmp_path / "photos" / name, np.zeros((200, 200, 3), np.uint8))
    points = [[60, 70], [120, 70], [90, 100], [65, 130], [115, 130]]
    flat = ",".join(str(v) for p in points for v in p)
    csv_file = tmp_path / "photos" / "lm.csv"
    csv_file.write_text(f"image,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n# a comment\n\na.png,{flat}\n"
                        f"{tmp_path / 'photos' / 'sub' / 'b.png'},{flat}\n")
    from_csv = faces.read_landmarks(str(csv_file))
    assert [f.path for f in from_csv.faces] == [str(tmp_path / "photos" / "a.png"),
                                                str(tmp_path / "photos" / "sub" / "b.png")]
    assert from_csv.faces[0].origin == f"{csv_file} line 4"
    json_file = tmp_path / "lm.json"
    json_file.write_text(json.dumps({"photos/sub/b.png": points, "photos/a.png": sum(points, [])}))
    from_json = faces.read_landmarks(str(json_file))
    assert [os.path.basename(f.path) for f in from_json.faces] == ["b.png", "a.png"]
    for face in from_csv.faces + from_json.faces:
        np.testing.assert_array_equal(face.landmarks, np.array(points, np.float64))
    # --images with a landmark file: every image must be listed there
    listed = from_csv.faces_of([str(tmp_path / "photos" / "sub")])
    assert [f.path for f in listed] == [str(tmp_path / "photos" / "sub" / "b.png")]
    write_png(tmp_path / "photos" / "c.png", np.zeros((200, 200, 3), np.uint8))
    with pytest.raises(Exception, match="c.png: no landmarks for this image in"):
        from_csv.faces_of([str(tmp_path / "photos")])


def test_gallery_cache_reuses_unchanged_images(toy_onnx, tmp_path):
    from src.evaluation.embedders import Model, OnnxEmbedder
    rng = np.random.default_rng(2)
    for identity in ("ann", "bob", "cid"):
        for k in range(3):
            write_png(tmp_path / "gallery" / identity / f"{k}.png", rng.integers(0, 256, (112, 112, 3), np.uint8))
    onnx = OnnxEmbedder(toy_onnx)
    embedded = []

    def counting(batch):
        embedded.append(len(batch))
        return onnx(batch)

    model = Model(counting, "toy")
    gallery, cache = str(tmp_path / "gallery"), str(tmp_path / "cache.npz")
    names, first = faces.gallery_templates(model, gallery, 4, cache=cache, progress=False)
    assert names == ["ann", "bob", "cid"] and sum(embedded) == 2 * 12  # 9 images in batches of 4, with flips
    embedded.clear()
    names, again = faces.gallery_templates(model, gallery, 4, cache=cache, progress=False)
    # only one image is embedded again: the cache proves it holds this model's embeddings
    assert sum(embedded) == 2 * 4 and np.allclose(again, first, atol=1e-6)
    write_png(tmp_path / "gallery" / "bob" / "1.png", rng.integers(0, 256, (112, 112, 3), np.uint8))
    os.utime(tmp_path / "gallery" / "bob" / "1.png", ns=(1, 1))  # a changed file, even within the mtime tick
    embedded.clear()
    _, changed = faces.gallery_templates(model, gallery, 4, cache=cache, progress=False)
    assert sum(embedded) == 2 * 4  # only that image and the proof (one padded batch, with flips)
    assert np.allclose(changed[[0, 2]], first[[0, 2]], atol=1e-6) and not np.allclose(changed[1], first[1])
    embedded.clear()
    notes = []
    faces.gallery_templates(Model(counting, "another model"), gallery, 4, cache=cache, progress=False,
                            warn=notes.append)
    assert sum(embedded) == 2 * 12 and "made with another model" in notes[0]


def test_the_backend_that_runs_a_model_kind_may_be_named(toy_onnx, toy_faces, tmp_path):
    """--backend is what runs the model: an ONNX file runs in ONNX Runtime, named or chosen by auto."""
    outputs = []
    for backend in ("auto", "onnxruntime"):
        outputs.append(tmp_path / f"{backend}.npy")
        assert run_main(embed.main, ["--model", toy_onnx, "--images", str(toy_faces / "a"), "--backend", backend,
                                     "--output", str(outputs[-1])]) == 0
    np.testing.assert_array_equal(np.load(outputs[0]), np.load(outputs[1]))
    assert np.load(outputs[0]).shape == (3, 8)


def test_threshold_sources_are_printed_and_the_default_is_marked_uncalibrated(toy_onnx, toy_faces, capsys):
    a, b = str(toy_faces / "a" / "x.png"), str(toy_faces / "z.png")
    assert run_main(embed.main, ["--model", toy_onnx, "--compare", a, b]) == 0
    captured = capsys.readouterr()
    line = captured.out.strip()
    match = re.fullmatch(r".* vs .*: cosine (-?\d\.\d{5}) -> (same|different) \(threshold 0\.30000, "
                         r"uncalibrated default, not measured for this model; calibrate with --calibration SET\.bin "
                         r"or set --threshold\)", line)
    assert match, line
    (warning,) = captured.err.strip().splitlines()  # and said plainly, with how to calibrate
    assert warning.startswith("warning: same/different at an uncalibrated threshold (0.3)")
    assert "--calibration SET.bin" in warning and "threshold.json" in warning
    cosine = float(match.group(1))
    assert run_main(embed.main, ["--model", toy_onnx, "--compare", a, b, "--threshold", f"{cosine - 0.01}"]) == 0
    captured = capsys.readouterr()
    assert "-> same (threshold" in captured.out and captured.err == ""
    assert run_main(embed.main, ["--model", toy_onnx, "--compare", a, b, "--threshold", f"{cosine + 0.01}"]) == 0
    assert "-> different (threshold" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no_images", "missing_path", "unknown_model", "missing_model", "row_length",
                                  "not_a_number", "missing_landmark_image", "landmark_json", "onnx_option",
                                  "backend_for_onnx", "backend_for_mindir", "onnx_input_for_checkpoint",
                                  "onnx_on_ascend",
                                  "threshold_range", "output_suffix", "output_with_compare", "no_output",
                                  "threshold_and_calibration", "gallery_not_imagefolder"])
def test_bad_input_is_one_clear_line(case, toy_onnx, toy_faces, tmp_path, capsys):
    face = str(toy_faces / "z.png")
    args = ["--model", toy_onnx, "--images", face, "--output", str(tmp_path / "e.npy")]
    lm = tmp_path / "lm.csv"
    if case == "no_images":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        args[3], expected = str(tmp_path / "empty"), "no images (.jpg/.jpeg/.png/.bmp) found in"
    elif case == "missing_path":
        args[3], expected = str(tmp_path / "nowhere"), "image path not found"
    elif case == "unknown_model":
        (tmp_path / "model.pt").write_bytes(b"weights")
        args[1], expected = str(tmp_path / "model.pt"), "unknown model type"
    elif case == "missing_model":
        args[1], expected = str(tmp_path / "model.onnx"), "model not found"
    elif case in ("row_length", "not_a_number", "missing_landmark_image"):
        row = {"row_length": f"{face},1,2,3,4,5,6,7,8,9", "not_a_number": f"{face},1,2,3,4,5,6,7,8,9,ten",
               "missing_landmark_image": "gone.png,1,2,3,4,5,6,7,8,9,10"}[case]
        lm.write_text(f"{face},1,2,3,4,5,6,7,8,9,10\n{row}\n")
        args = args[:2] + ["--landmarks", str(lm)] + args[4:]
        expected = {"row_length": "lm.csv line 2: expected an image and 10 numbers (x1,y1,...,x5,y5), got 9 values",
                    "not_a_number": "lm.csv line 2: 'ten' is not a number",
                    "missing_landmark_image": "lm.csv line 2: image not found"}[case]
    elif case == "landmark_json":
        lm = tmp_path / "lm.json"
        lm.write_text(json.dumps({face: [[1, 2], [3, 4]]}))
        args = args[:2] + ["--landmarks", str(lm)] + args[4:]
        expected = "expected five [x, y] points"
    elif case == "onnx_option":
        args += ["--network", "r50"]
        expected = "--network/--width/--num_features apply to checkpoints only"
    elif case == "backend_for_onnx":
        args += ["--backend", "mindspore"]
        expected = "--backend mindspore cannot run an ONNX model; it runs with onnxruntime (--backend auto)"
    elif case in ("backend_for_mindir", "onnx_input_for_checkpoint"):
        # refused from the file name and the options alone, before the file is read
        model = tmp_path / ("m.mindir" if case == "backend_for_mindir" else "m.ckpt")
        model.write_bytes(b"never read")
        args[1] = str(model)
        args += ["--backend", "onnxruntime"] if case == "backend_for_mindir" else ["--input_mean", "0"]
        expected = ("--backend onnxruntime cannot run a MINDIR model; it runs with mindspore (--backend auto)"
                    if case == "backend_for_mindir" else "--input_mean/--input_std apply to ONNX models only")
    elif case == "onnx_on_ascend":
        args += ["--device_target", "Ascend"]
        expected = "ONNX models run with ONNX Runtime on CPU or GPU; on Ascend use the .mindir or the checkpoint"
    elif case == "threshold_range":
        args = ["--model", toy_onnx, "--compare", face, face, "--threshold", "1.5"]
        expected = "--threshold is a cosine similarity in [-1, 1]"
    elif case == "output_suffix":
        args[-1], expected = str(tmp_path / "e.txt"), "--output must name a .npy file"
    elif case == "output_with_compare":
        args += ["--compare", face, face]
        expected = "--output does not go with --compare"
    elif case == "no_output":
        args, expected = args[:4], "pass --output EMB.npy"
    elif case == "threshold_and_calibration":
        args = ["--model", toy_onnx, "--compare", face, face, "--threshold", "0.2", "--calibration", "x.bin"]
        expected = "give --threshold or --calibration, not both"
    else:
        args = ["--model", toy_onnx, "--images", face, "--search", str(toy_faces / "a" / "b")]
        expected = "no identity sub-folders with images"
    assert run_main(embed.main, args) == 2
    assert expected in one_error_line(capsys)


# --- the trained model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tiny_data, tmp_path_factory):
    """The demo .bin's images (held-out identities) as PNG files: pairNN/0.png, pairNN/1.png. PNG is
    lossless, so the files decode to the pixels load_bin gives."""
    from src.data.bins import load_bin
    images, issame = load_bin(str(tiny_data[1]))
    root = tmp_path_factory.mktemp("demo_png")
    paths = [write_png(root / f"pair{k // 2:02d}" / f"{k % 2}.png", image) for k, image in enumerate(images)]
    return {"root": root, "paths": paths, "images": images, "issame": issame, "bin": str(tiny_data[1])}


@pytest.fixture(scope="module")
def reference(trained_run):
    """The newest checkpoint of the run as an embedder, and the same network exported to ONNX and MINDIR."""
    from src.deploy.exporting import export_backbone
    from src.evaluation.embedders import MindSporeEmbedder, backbone_from_checkpoint
    ckpt = str(trained_run / "ArcFace-4_8.ckpt")
    backbone = backbone_from_checkpoint(ckpt)
    name = str(trained_run.parent / "embed_test_model")
    return {"embed": MindSporeEmbedder(backbone), "onnx": export_backbone(backbone, name, "ONNX"),
            "mindir": export_backbone(backbone, name, "MINDIR")}


def test_embeddings_equal_the_protocol_and_exported_models_give_the_same(trained_run, demo, reference, tmp_path):
    """The checkpoint run by MindSpore against the protocol's pieces; by ONNX Runtime (the CPU default,
    through its cached export), the exported ONNX and MINDIR files against it."""
    outputs = {}
    for kind, model, options in (("ckpt", str(trained_run), ["--backend", "mindspore"]), ("auto", str(trained_run), []),
                                 ("onnx", reference["onnx"], ["--batch_size", "7"]),
                                 ("mindir", reference["mindir"], ["--batch_size", "5"])):
        outputs[kind] = tmp_path / f"{kind}.npy"
        assert run_main(embed.main, ["--model", model, "--images", str(demo["root"]), "--output",
                                     str(outputs[kind]), "--batch_size", str(BATCH)] + options) == 0
        # pair00/0.png, pair00/1.png, pair01/0.png, ...: the .bin's order
        assert outputs[kind].with_suffix(".txt").read_text().splitlines() == [str(p) for p in demo["paths"]]
    expected = flip_sum(reference["embed"], demo["images"])
    from_ckpt = np.load(outputs["ckpt"])
    assert from_ckpt.shape == (80, 512) and from_ckpt.dtype == np.float32
    assert np.abs(from_ckpt - expected).max() <= 1e-5
    for kind in ("auto", "onnx", "mindir"):
        assert np.abs(np.load(outputs[kind]) - from_ckpt).max() <= 1e-4, kind


def test_compare_uses_the_calibrated_threshold(trained_run, demo, reference, capsys):
    emb, emb_flip = embed_pairs(reference["embed"], demo["images"], BATCH, progress=False)
    result = evaluate(emb, demo["issame"], emb_flip)
    threshold = 1 - float(np.mean(result.best_thresholds)) / 2
    unit = l2_normalize(emb.astype(np.float64) + emb_flip)
    cosines = np.sum(unit[0::2] * unit[1::2], axis=1)
    genuine = int(np.argmax(np.where(demo["issame"], cosines, -np.inf)))     # the clearest of each kind
    impostor = int(np.argmin(np.where(demo["issame"], np.inf, cosines)))
    assert cosines[genuine] > threshold > cosines[impostor]
    for pair, verdict in ((genuine, "same"), (impostor, "different")):
        a, b = demo["paths"][2 * pair], demo["paths"][2 * pair + 1]
        assert run_main(embed.main, ["--model", reference["onnx"], "--compare", str(a), str(b),
                                     "--calibration", demo["bin"], "--batch_size", str(BATCH)]) == 0
        line = capsys.readouterr().out.strip()
        match = re.fullmatch(rf"{re.escape(str(a))} vs {re.escape(str(b))}: cosine (-?\d\.\d{{5}}) -> (\w+) "
                             rf"\(threshold (\d\.\d{{5}}), calibrated on {re.escape(demo['bin'])}: mean of the 10 "
                             rf"folds' best squared distances \d\.\d{{4}}, Accuracy-Flip {result.acc_flip:.5f}\)",
                             line)
        assert match, line
        assert abs(float(match.group(1)) - cosines[pair]) <= 1e-4 and match.group(2) == verdict
        assert float(match.group(3)) == pytest.approx(threshold, abs=1e-5)

    # two folders: the mean of each folder's unit embeddings, renormalised
    folder_a, folder_b = demo["root"] / "pair00", demo["root"] / "pair01"
    assert run_main(embed.main, ["--model", reference["onnx"], "--compare", str(folder_a), str(folder_b),
                                 "--threshold", "0.5"]) == 0
    line = capsys.readouterr().out
    mean_a, mean_b = (l2_normalize(unit[k:k + 2].mean(axis=0, keepdims=True))[0] for k in (0, 2))
    assert abs(float(re.search(r"cosine (-?\d\.\d{5})", line).group(1)) - mean_a @ mean_b) <= 1e-4
    assert "(threshold 0.50000, from --threshold)" in line


def test_search_ranks_the_own_identity_first(trained_run, reference, tmp_path, capsys):
    """New identities of the demo generator (make_demo_data only writes RecordIO and pairs; its
    random_identity/render give labelled faces): 4 gallery faces and 3 queries each."""
    from src.data.demo_data import random_identity, render
    rng = np.random.default_rng(11)
    identities = [random_identity(rng) for _ in range(8)]
    for i, identity in enumerate(identities):
        for k in range(4):
            write_png(tmp_path / "gallery" / f"person{i}" / f"{k}.png", render(identity, rng))
        for k in range(3):
            write_png(tmp_path / "queries" / f"person{i}_{k}.png", render(identity, rng))
    args = ["--model", reference["onnx"], "--images", str(tmp_path / "queries"), "--search",
            str(tmp_path / "gallery"), "--top_k", "3", "--gallery_cache", str(tmp_path / "gallery.npz")]
    assert run_main(embed.main, args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 24
    first = in_top3 = 0
    for line in lines:
        match = re.fullmatch(r".*/person(\d)_\d\.png: (person\d) (-?\d\.\d{5}), (person\d) (-?\d\.\d{5}), "
                             r"(person\d) (-?\d\.\d{5})", line)
        assert match, line
        scores = [float(match.group(k)) for k in (3, 5, 7)]
        assert scores == sorted(scores, reverse=True)
        own = f"person{match.group(1)}"
        first += match.group(2) == own
        in_top3 += own in match.group(2, 4, 6)
    # Chance: 3 of 24 first, 9 of 24 in the top 3. The tiny model (4 epochs on 8 other identities, not
    # bit-reproducible across runs) measured 12-13 first and 18-21 in the top 3 over repeated runs.
    assert first >= 10 and in_top3 >= 15, lines
    assert run_main(embed.main, args) == 0  # from the cache: the same lines
    assert capsys.readouterr().out.strip().splitlines() == lines


def test_landmarks_realign_a_warped_face(demo, reference, tmp_path, capsys):
    """Warp an aligned face into a bigger photo by a known similarity; the template points moved with
    it are its landmarks; aligning them back gives nearly the original embedding."""
    from src.data.align import ARCFACE_TEMPLATE
    original = demo["images"][0]
    angle, scale = np.deg2rad(25), 1.7
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = np.hstack([rotation, [[150.0], [40.0]]])
    photo = cv2.warpAffine(original, matrix, (360, 300), flags=cv2.INTER_CUBIC)
    write_png(tmp_path / "photos" / "photo.png", photo)
    landmarks = ARCFACE_TEMPLATE @ matrix[:, :2].T + matrix[:, 2]
    (tmp_path / "photos" / "lm.csv").write_text("photo.png," + ",".join(repr(float(v)) for v in landmarks.ravel()))
    (tmp_path / "lm.json").write_text(json.dumps({"photos/photo.png": landmarks.tolist()}))
    for name, landmark_file in (("csv", tmp_path / "photos" / "lm.csv"), ("json", tmp_path / "lm.json")):
        assert run_main(embed.main, ["--model", reference["onnx"], "--landmarks", str(landmark_file),
                                     "--output", str(tmp_path / f"{name}.npy")]) == 0
    aligned = np.load(tmp_path / "csv.npy")
    np.testing.assert_array_equal(aligned, np.load(tmp_path / "json.npy"))
    assert (tmp_path / "csv.txt").read_text() == f"{tmp_path / 'photos' / 'photo.png'}\n"
    direct = flip_sum(reference["embed"], original[None])
    cosine = float(aligned[0] @ direct[0])
    unaligned = flip_sum(reference["embed"], cv2.resize(photo, (112, 112))[None])
    assert cosine > 0.99 and cosine > float(unaligned[0] @ direct[0]) + 0.05, cosine


# --- photos: --detect, several faces per photo, align.py's faces.csv --------------------------------

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """photos/one.png (one face), photos/two.jpg (two faces), photos/zz_none.jpg (no face): the test
    fixture's real face pasted under known similarity transforms."""
    from face_photos import background, make_photo
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(31)
    for name, placements in (("one.png", [(0.9, 8, (300, 230))]),
                             ("two.jpg", [(0.5, -20, (460, 180)), (1.0, 12, (210, 270))])):
        write_png(root / "photos" / name, make_photo(rng, placements)[0])
    write_png(root / "photos" / "zz_none.png", np.clip(background(rng, 300, 400), 0, 255).astype(np.uint8))
    return root


def test_detect_embeds_the_faces_align_py_writes_and_several_per_photo(toy_onnx, photos, tmp_path, capsys):
    import align
    folder = photos / "photos"
    assert run_main(align.main, ["--input", str(folder), "--output", str(tmp_path / "aligned")]) == 0
    capsys.readouterr()
    out = tmp_path / "det.npy"
    args = ["--model", toy_onnx, "--images", str(folder), "--detect", "--all_faces", "--output", str(out)]
    assert run_main(embed.main, args) == 2  # a photo without a face stops the run ...
    assert one_error_line(capsys) == (f"error: no face found in {folder / 'zz_none.png'} (--skip_bad leaves such "
                                      f"photos out)")
    assert run_main(embed.main, args + ["--skip_bad"]) == 0  # ... or is left out with a warning
    captured = capsys.readouterr()
    assert captured.err == f"warning: skipping no face found in {folder / 'zz_none.png'}\n"
    names = out.with_suffix(".txt").read_text().splitlines()
    assert names == [str(folder / "one.png"), f"{folder / 'two.jpg'}#0", f"{folder / 'two.jpg'}#1"]
    # the faces align.py found and wrote, embedded as aligned crops: the same embeddings
    crops = tmp_path / "crops.npy"
    assert run_main(embed.main, ["--model", toy_onnx, "--images", str(tmp_path / "aligned" / "one_0.png"),
                                 str(tmp_path / "aligned" / "two_0.png"), str(tmp_path / "aligned" / "two_1.png"),
                                 "--output", str(crops)]) == 0
    detected = np.load(out)
    np.testing.assert_allclose(detected, np.load(crops), atol=2e-3)
    # align.py's faces.csv lists two faces of two.jpg: each row is a face, named as --detect names them
    from_csv = tmp_path / "csv.npy"
    assert run_main(embed.main, ["--model", toy_onnx, "--landmarks", str(tmp_path / "aligned" / "faces.csv"),
                                 "--output", str(from_csv)]) == 0
    assert [os.path.normpath(n) for n in from_csv.with_suffix(".txt").read_text().splitlines()] == names
    np.testing.assert_allclose(np.load(from_csv), detected, atol=2e-3)
    # without --all_faces: the largest face of each photo, named by the photo
    largest = tmp_path / "largest.npy"
    assert run_main(embed.main, ["--model", toy_onnx, "--images", str(folder / "one.png"), str(folder / "two.jpg"),
                                 "--detect", "--output", str(largest)]) == 0
    assert largest.with_suffix(".txt").read_text().splitlines() == [str(folder / "one.png"), str(folder / "two.jpg")]
    np.testing.assert_array_equal(np.load(largest), detected[:2])


def test_compare_and_search_find_the_faces_of_photos(toy_onnx, photos, tmp_path, capsys):
    folder = photos / "photos"
    emb = tmp_path / "e.npy"
    assert run_main(embed.main, ["--model", toy_onnx, "--images", str(folder / "one.png"), str(folder / "two.jpg"),
                                 "--detect", "--output", str(emb)]) == 0
    one, two = np.load(emb).astype(np.float64)
    assert run_main(embed.main, ["--model", toy_onnx, "--compare", str(folder / "one.png"), str(folder / "two.jpg"),
                                 "--detect", "--threshold", "0.5"]) == 0
    cosine = float(re.search(r"cosine (-?\d\.\d{5})", capsys.readouterr().out).group(1))
    assert cosine == pytest.approx(one @ two, abs=1e-5)
    # a gallery of photos: the query photo is one of them, so its identity scores 1
    gallery = tmp_path / "gallery"
    for identity, name in (("ann", "one.png"), ("bob", "two.jpg")):
        (gallery / identity).mkdir(parents=True)
        (gallery / identity / name).write_bytes((folder / name).read_bytes())
    assert run_main(embed.main, ["--model", toy_onnx, "--images", str(folder / "one.png"), "--search", str(gallery),
                                 "--detect", "--threshold", "0.5"]) == 0
    assert capsys.readouterr().out == f"{folder / 'one.png'}: ann 1.00000, bob {one @ two:.5f}\n"
    assert run_main(embed.main, ["--model", toy_onnx, "--compare", str(folder / "one.png"), str(folder / "two.jpg"),
                                 "--detect", "--all_faces"]) == 2
    assert "--all_faces does not go with --compare" in one_error_line(capsys)
    assert run_main(embed.main, ["--model", toy_onnx, "--images", str(folder), "--all_faces", "--output",
                                 str(tmp_path / "x.npy")]) == 2
    assert "--all_faces needs --detect" in one_error_line(capsys)


def test_landmark_rows_listed_twice_with_the_same_points_are_refused(tmp_path):
    write_png(tmp_path / "p.png", np.zeros((200, 200, 3), np.uint8))
    row = "p.png," + ",".join(str(v) for v in (60, 70, 120, 70, 90, 100, 65, 130, 115, 130))
    (tmp_path / "lm.csv").write_text(f"{row}\n{row}\n")
    with pytest.raises(Exception, match=r"lm.csv line 2: p.png is listed twice with the same landmarks \(also "):
        faces.read_landmarks(str(tmp_path / "lm.csv"))


def test_search_says_no_match_below_the_threshold(toy_onnx, toy_faces, capsys):
    gallery = toy_faces / "a"  # one identity: a/b, holding c.png
    query = str(toy_faces / "a" / "b" / "c.png")
    for threshold in ("0.999", "-1"):
        assert run_main(embed.main, ["--model", toy_onnx, "--images", query, "--search", str(gallery),
                                     "--threshold", threshold]) == 0
        # the query is the identity's only face: cosine 1, above any threshold but 1 ...
        assert capsys.readouterr().out == f"{query}: b 1.00000\n"
    assert run_main(embed.main, ["--model", toy_onnx, "--images", str(toy_faces / "z.png"), "--search", str(gallery),
                                 "--threshold", "0.999"]) == 0
    line = capsys.readouterr().out  # ... another face is not that identity at 0.999
    assert re.fullmatch(rf"{re.escape(str(toy_faces / 'z.png'))}: no match above 0\.99900: b -?\d\.\d{{5}}\n", line)


def test_min_quality_leaves_out_the_faces_below_it(toy_onnx, toy_faces, tmp_path, capsys):
    out = tmp_path / "all.npy"
    assert run_main(embed.main, ["--model", toy_onnx, "--images", str(toy_faces / "a"), "--output", str(out)]) == 0
    quality = np.load(tmp_path / "all.quality.npy")
    names = out.with_suffix(".txt").read_text().splitlines()
    cut = float(np.median(quality))
    kept = tmp_path / "kept.npy"
    capsys.readouterr()
    assert run_main(embed.main, ["--model", toy_onnx, "--images", str(toy_faces / "a"), "--output", str(kept),
                                 "--min_quality", f"{cut}"]) == 0
    captured = capsys.readouterr()
    assert kept.with_suffix(".txt").read_text().splitlines() == [n for n, q in zip(names, quality) if q >= cut]
    np.testing.assert_array_equal(np.load(kept), np.load(out)[quality >= cut])
    notes = captured.err.strip().splitlines()
    assert len(notes) == int(np.sum(quality < cut)) >= 1
    assert all(line.startswith("note: leaving out ") and f"is below --min_quality {cut:g}" in line for line in notes)
    assert "(1 face(s) left out)" in captured.out
    assert run_main(embed.main, ["--model", toy_onnx, "--images", str(toy_faces / "a"), "--output",
                                 str(tmp_path / "none.npy"), "--min_quality", "1e9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # a note per face, then the error
    assert err[-1] == "error: none of the 3 face(s) reaches --min_quality 1e+09" and len(err) == 4


# --- thresholds a training run recorded; embeddings that collapse -----------------------------------

def compare_line(model, a, b, capsys, *extra):
    assert run_main(embed.main, ["--model", str(model), "--compare", str(a), str(b), "--batch_size", str(BATCH)]
                    + list(extra)) == 0
    return capsys.readouterr()


def test_the_threshold_a_run_recorded_is_used_for_its_models(trained_run, demo, tmp_path, capsys):
    import shutil
    record = json.loads((trained_run / "threshold.json").read_text())
    a, b = demo["paths"][:2]
    source = (f"recorded by the training run in {trained_run / 'threshold.json'}: calibrated on demo at step "
              f"{record['step']}, Accuracy-Flip {record['accuracy']:.5f}; ")
    other = "recorded for best.ckpt of this run; this checkpoint may differ slightly"
    last = trained_run / "ArcFace-4_8.ckpt"  # the same bytes as best.ckpt when the last evaluation was the best
    same = last.read_bytes() == (trained_run / "best.ckpt").read_bytes()
    for model, options, which in (
            (trained_run, ["--backend", "mindspore"], other),
            (last, ["--backend", "mindspore"], "this checkpoint is best.ckpt" if same else other),
            (trained_run / "best.ckpt", [], "this checkpoint is best.ckpt")):
        captured = compare_line(model, a, b, capsys, *options)
        assert f"(threshold {record['threshold']:.5f}, {source}{which}" in captured.out, captured.out
        assert "uncalibrated" not in captured.err
    # the verified ONNX export of best.ckpt (made by the last run) is known as best.ckpt's
    (export,) = (trained_run / ".onnx-cache").glob("best.ckpt.*.onnx")
    captured = compare_line(export, a, b, capsys)
    assert f"{source}this model is the export of best.ckpt)" in captured.out
    # a record that does not hold what it should, or does not describe the best.ckpt beside it, is not used
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(trained_run / "best.ckpt", copy / "best.ckpt")
    (copy / "threshold.json").write_text(json.dumps(dict(record, threshold=7.0)))
    captured = compare_line(copy / "best.ckpt", a, b, capsys, "--backend", "mindspore")
    assert "threshold 0.30000, uncalibrated default" in captured.out
    assert f"warning: {copy / 'threshold.json'} does not hold a threshold (a cosine in [-1, 1])" in captured.err
    (copy / "threshold.json").write_text(json.dumps(record))
    other_bytes = next(p for p in sorted(trained_run.glob("ArcFace-*.ckpt"))
                       if p.read_bytes() != (trained_run / "best.ckpt").read_bytes())
    shutil.copy(other_bytes, copy / "best.ckpt")
    captured = compare_line(copy / "best.ckpt", a, b, capsys, "--backend", "mindspore")
    assert "threshold 0.30000, uncalibrated default" in captured.out
    assert f"warning: {copy / 'threshold.json'} does not describe a best.ckpt beside it" in captured.err


def test_collapsed_embeddings_are_measured_as_the_mean_cosine_between_different_people():
    rows = l2_normalize(np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]]))
    # cosines: 0.6, 0, -0.6, 0.8, 0.28, 0.8 -> mean 1.88 / 6
    assert faces.mean_pairwise_cosine(rows) == pytest.approx(1.88 / 6, abs=1e-12)
    assert faces.collapse_problem(0.5, "x") is None
    problem = faces.collapse_problem(0.62, "the 8 gallery identities")
    assert "(the 8 gallery identities: mean cosine 0.620;" in problem and "--input_mean/--input_std" in problem


def test_a_wrong_pixel_normalisation_is_warned_about(trained_run, demo, reference, tmp_path, capsys):
    """Raw pixels (--input_mean 0 --input_std 1) instead of (x - 127.5) / 127.5: the embeddings of
    different people collapse (measured on the tiny model: mean cosine 0.88-0.90 against 0.46-0.48)."""
    from src.data.demo_data import random_identity, render
    rng = np.random.default_rng(12)
    for i in range(6):
        identity = random_identity(rng)
        for k in range(2):
            write_png(tmp_path / "gallery" / f"p{i}" / f"{k}.png", render(identity, rng))
    query = str(tmp_path / "gallery" / "p0" / "0.png")
    for options in ([], ["--input_mean", "0", "--input_std", "1"]):
        assert run_main(embed.main, ["--model", reference["onnx"], "--images", query, "--search",
                                     str(tmp_path / "gallery"), "--threshold", "0.5"] + options) == 0
        warned = re.search(r"warning: the embeddings of different people point nearly the same way \(the 6 gallery "
                           r"identities: mean cosine (\d\.\d{3});", capsys.readouterr().err)
        if options:
            assert warned and float(warned.group(1)) > 0.7
    # on a calibration set: its impostor pairs
    a, b = demo["paths"][:2]
    captured = compare_line(reference["onnx"], a, b, capsys, "--calibration", demo["bin"], "--input_mean", "0",
                            "--input_std", "1")
    warned = re.search(rf"the {int(np.sum(~demo['issame']))} impostor pairs of {re.escape(demo['bin'])}: mean "
                       rf"cosine (\d\.\d{{3}})", captured.err)
    assert warned and float(warned.group(1)) > 0.7
