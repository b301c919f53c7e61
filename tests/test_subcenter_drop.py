"""src.subcenter_drop (sub-center ArcFace's cleaning step) on a crafted checkpoint whose decisions the
test computes itself: the dominant sub-centre by votes, the angles, the kept and dropped images,
classes left empty, the renumbering, head shards of a 2-rank run, and its error lines."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from src.checkpoint import read_checkpoint, save_checkpoint_atomic
from src.cli import run_main
from src.config import TrainConfig, record_text
from src.data.sources import open_source
from src.errors import ArcFaceError
from src.heads import sharding
from src.models import get_backbone
from src.subcenter_drop import Embedder, dominant_and_angles, main

ms.set_device("CPU")  # before any kernel runs: the tool's runtime.setup sets it again
K, CLASSES, EMPTY_CLASS = 2, 8, 3


def test_dominant_centre_by_votes_and_angles():
    centres = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    embeddings = np.array([[0, c, s], [s, c, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    dominant, angles = dominant_and_angles(embeddings, centres)
    assert dominant == 1  # three votes against one and one
    np.testing.assert_allclose(angles, [20, 20, 0, 90, 90], atol=1e-6)
    assert dominant_and_angles(embeddings[3:], centres)[0] == 0  # a tie goes to the first


def write_checkpoint(folder, tiny_data, shards=False):
    """A narrow r18 (random weights) and a crafted K=2 head: for class c, centre 1 is the mean direction
    of its first six images, centre 0 its last image (so centre 1 wins the vote), except class
    EMPTY_CLASS, whose centres point away from every image. Returns (path, unit embeddings, labels)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(0)
    backbone = get_backbone("r18", num_features=32, width=8)
    meta = {"network": "r18", "width": 8, "num_features": 32, "epoch": 1, "step_in_epoch": 1, "global_step": 1,
            "config": record_text(TrainConfig(network="r18", width=8, num_features=32, num_classes=CLASSES,
                                              margin_type="subcenter", subcenter_k=K))}
    path = str(folder / "ArcFace-1_1.ckpt")
    entries = [{"name": "backbone." + p.name, "data": p} for p in backbone.get_parameters()]
    save_checkpoint_atomic(entries, path, meta)
    embedder = Embedder(path, meta, batch_size=16)
    source = open_source(str(tiny_data[0]))
    labels = np.asarray(source.labels())
    from src.data.images import decode_image
    images = [decode_image(source.read(i)) for i in range(len(source))]
    embeddings = np.concatenate([embedder(images[i:i + 16]) for i in range(0, len(images), 16)])
    weight = np.zeros((CLASSES, K, 32))
    rng = np.random.default_rng(1)
    for c in range(CLASSES):
        mine = embeddings[labels == c]
        weight[c, 1], weight[c, 0] = mine[:6].mean(axis=0), mine[-1]
        if c == EMPTY_CLASS:
            away = rng.normal(size=(K, 32))
            weight[c] = away - (away @ mine.mean(axis=0))[:, None] * mine.mean(axis=0) * 3  # anti-aligned
    weight = (weight * 5.0).reshape(CLASSES * K, 32).astype(np.float32)
    if not shards:
        save_checkpoint_atomic(entries + [{"name": "head.weight", "data": Tensor(weight)}], path, meta)
        return path, embeddings, labels
    for rank in range(2):
        start, stop = sharding.class_range(CLASSES, rank, 2)
        info = {sharding.SHARD_META_PREFIX + "class_start": start, sharding.SHARD_META_PREFIX + "class_stop": stop,
                sharding.SHARD_META_PREFIX + "num_classes": CLASSES, sharding.SHARD_META_PREFIX + "rank": rank,
                sharding.SHARD_META_PREFIX + "world_size": 2}
        save_checkpoint_atomic([{"name": "head.weight", "data": Tensor(weight[start * K:stop * K])}],
                               sharding.shard_path(path, rank, 2), info)
    return path, embeddings, labels


def expected(embeddings, labels, path, threshold):
    """Kept (index, new label) and dropped indices, computed here from the crafted head."""
    params, _ = read_checkpoint(path)
    if "head.weight" in params:
        weight = params["head.weight"].asnumpy()
    else:
        weight = np.concatenate([read_checkpoint(sharding.shard_path(path, r, 2))[0]["head.weight"].asnumpy()
                                 for r in range(2)])
    centres = weight.reshape(CLASSES, K, -1).astype(np.float64)
    centres /= np.linalg.norm(centres, axis=2, keepdims=True)
    kept, dropped, new = [], [], 0
    for c in range(CLASSES):
        index = np.flatnonzero(labels == c)
        e = embeddings[index]
        dominant = np.argmax(np.bincount(np.argmax(e @ centres[c].T, axis=1), minlength=K))
        angles = np.degrees(np.arccos(np.clip(e @ centres[c, dominant], -1, 1)))
        dropped += index[angles > threshold].tolist()
        if (angles <= threshold).any():
            kept += [(i, new) for i in index[angles <= threshold]]
            new += 1
    return kept, dropped


@pytest.mark.parametrize("shards", [False, True])
def test_drop_writes_the_cleaned_set_and_the_lists(tiny_data, tmp_path, shards):
    path, embeddings, labels = write_checkpoint(tmp_path, tiny_data, shards)
    centre_angles = []  # a threshold that drops some images of the other classes too
    for c in range(CLASSES):
        mine = embeddings[labels == c]
        centre = mine[:6].mean(axis=0) / np.linalg.norm(mine[:6].mean(axis=0))
        centre_angles += np.degrees(np.arccos(np.clip(mine @ centre, -1, 1))).tolist()
    threshold = float(np.percentile(centre_angles, 70))
    kept, dropped = expected(embeddings, labels, path, threshold)
    assert 0 < len(dropped) < len(labels) and EMPTY_CLASS not in {labels[i] for i, _ in kept}
    out = tmp_path / "clean"
    assert main(["--ckpt", path, "--data_url", str(tiny_data[0]), "--output", str(out), "--threshold",
                 str(threshold), "--batch_size", "16"]) == 0
    source, clean = open_source(str(tiny_data[0])), open_source(str(out))
    assert len(clean) == len(kept) and clean.num_classes == CLASSES - 1
    assert sorted(zip([source.read(i) for i, _ in kept], [n for _, n in kept])) == \
        sorted(zip([clean.read(j) for j in range(len(clean))], clean.labels().tolist()))
    rows = [line.split("\t") for line in (out / "dropped.tsv").read_text().splitlines()[1:]]
    assert sorted(int(r[0]) for r in rows) == sorted(source.key(i) for i in dropped)
    assert all(float(r[2]) > threshold for r in rows)
    classes = [line.split("\t") for line in (out / "classes.tsv").read_text().splitlines()[1:]]
    assert [int(old) for _, old in classes] == [c for c in range(CLASSES) if c != EMPTY_CLASS]


def test_drop_errors_are_one_line(tiny_data, tmp_path, capsys):
    path, _, _ = write_checkpoint(tmp_path, tiny_data)
    plain = str(tmp_path / "plain.ckpt")
    save_checkpoint_atomic([{"name": "head.weight", "data": Tensor(np.ones((CLASSES, 4), np.float32))}], plain,
                           {"config": record_text(TrainConfig(num_classes=CLASSES))})
    cases = [(["--ckpt", plain], "was trained with --margin_type combined, not subcenter"),
             (["--ckpt", path, "--threshold", "200"], "--threshold must be an angle between 0 and 180"),
             (["--ckpt", path, "--output", str(tiny_data[0])], "--output must differ from --data_url")]
    for extra, message in cases:
        argv = ["--data_url", str(tiny_data[0]), "--output", str(tmp_path / "out")] + extra
        assert run_main(main, argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    with pytest.raises(ArcFaceError, match="has labels up to 7, but .* was trained on 2 classes"):
        from src.subcenter_drop import drop
        small = TrainConfig(network="r18", width=8, num_features=32, num_classes=2, margin_type="subcenter",
                            subcenter_k=K)
        params, _ = read_checkpoint(path)
        entries = [{"name": n, "data": v} for n, v in params.items() if n != "head.weight"]
        entries.append({"name": "head.weight", "data": Tensor(np.ones((2 * K, 32), np.float32))})
        save_checkpoint_atomic(entries, str(tmp_path / "small.ckpt"), {"config": record_text(small), "network": "r18",
                                                                        "width": 8, "num_features": 32})
        drop(str(tmp_path / "small.ckpt"), str(tiny_data[0]), str(tmp_path / "o2"))
