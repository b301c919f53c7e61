"""Partial FC (the class-sharded margin head) on 2 ranks against one process holding all classes,
for every margin, with and without sampling.

The distributed tests share one launch of 2 CPU workers by MindSpore's `msrun`
(tests/dist/partial_fc_worker.py); the reference is computed here, in the test process, from the
same initial weights and batches (exchanged as .npy files). The "backbone" is a Dense layer: it has
no BatchNorm, whose per-rank batch statistics would differ from those of the combined batch, so the
2-rank run must reproduce the 1-process run on the combined batch up to float32 rounding. With
sampling, each rank samples with fixed scores, and the reference is one process computing the
softmax over the union of the classes both ranks sampled.
"""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

import src.runtime  # noqa: F401  (CPU settings before MindSpore runs)
from src.errors import ArcFaceError
from src.heads.classifier import PartialFC, export_merged_checkpoint, merge_shards
from src.heads.margin import CombinedMargin, build_margin
from src.heads.sharding import class_range, find_shards, init_centres, num_sampled_centres
from src.training.state import CheckpointWriter, restore
from src.training.step import BackboneWithHead, TrainStep

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "partial_fc_worker.py"
BIN_DIR = os.path.dirname(sys.executable)
MSRUN = shutil.which("msrun", path=os.pathsep.join([BIN_DIR, os.environ.get("PATH", "")]))
requires_msrun = pytest.mark.skipif(MSRUN is None, reason="MindSpore's msrun launcher is not installed")

WORLD, BATCH, STEPS, IN_DIM, DIM, CLASSES = 2, 4, 3, 12, 16, 41  # 41 classes: shards of 21 and 20
CFG = {"s": 64.0, "margins": [1.0, 0.5, 0.0], "seed": 5, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
       "sampled": {"num_classes": 100, "sample_rate": 0.3, "steps": 5}}
# Every margin, with and without sampling; MagFace's norm bounds are set around the Dense backbone's
# embedding norms (~2-6) so that its norm gradient acts.
MARGIN_KINDS = {
    "combined_filtered": ("combined", {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0,
                                       "interclass_filtering_threshold": 0.2}),
    "adaface": ("adaface", {"s": 64.0, "t_alpha": 0.3}),
    "adaface_straight": ("adaface", {"s": 64.0, "h": 2.0, "t_alpha": 0.3, "gradient": "straight"}),
    "curricularface": ("curricularface", {"s": 64.0, "alpha": 0.3}),
    "magface": ("magface", {"s": 64.0, "l_a": 2.0, "u_a": 8.0}),
    "subcenter": ("subcenter", {"s": 64.0, "k": 3}),
}
MARGIN_CASES = [{"name": f"{name}{'_sampled' if rate < 1 else ''}", "kind": kind, "hyper": hyper,
                 "sample_rate": rate, "num_classes": CLASSES}
                for name, (kind, hyper) in MARGIN_KINDS.items() for rate in (1.0, 0.3)]
CFG["margin_cases"] = MARGIN_CASES
STATISTICS = {"adaface": {"batch_mean": 20.0, "batch_std": 100.0}, "curricularface": {"t": 0.0}}
MSRUN_TIMEOUT = 600  # seconds; a normal run takes ~3 minutes on 2 busy cores



def split_rows(full, rank, world_size):
    """Rows of `rank` of a full (num_classes, ...) array."""
    start, stop = class_range(full.shape[0], rank, world_size)
    return np.asarray(full)[start:stop].copy()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_close(got, want, rtol=1e-5):
    """Equal up to rtol relative to the largest magnitude of `want` (float32 sums in another order)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = max(float(np.abs(want).max()), 1e-12)
    assert float(np.abs(got - want).max()) <= rtol * scale, float(np.abs(got - want).max()) / scale


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """Inputs written, 2 workers run under msrun (bounded by `timeout`); returns the folder."""
    if MSRUN is None:
        pytest.skip("MindSpore's msrun launcher is not installed")
    folder = tmp_path_factory.mktemp("partial_fc_dist")
    rng = np.random.default_rng(0)
    np.save(folder / "x.npy", rng.normal(size=(STEPS, WORLD, BATCH, IN_DIM)).astype(np.float32))
    np.save(folder / "y.npy", rng.integers(0, CLASSES, size=(STEPS, WORLD, BATCH)).astype(np.int32))
    np.save(folder / "dense_w.npy", (rng.normal(size=(DIM, IN_DIM)) * 0.3).astype(np.float32))
    np.save(folder / "dense_b.npy", (rng.normal(size=(DIM,)) * 0.1).astype(np.float32))
    np.save(folder / "head_w.npy", (rng.normal(size=(CLASSES, DIM)) * 0.01).astype(np.float32))
    np.save(folder / "y_sampled.npy",
            rng.integers(0, CFG["sampled"]["num_classes"], size=(WORLD, BATCH)).astype(np.int32))
    for case in MARGIN_CASES:
        k = case["hyper"].get("k", 1)
        np.save(folder / f"margin_{case['name']}_head_w.npy",
                (rng.normal(size=(CLASSES * k, DIM)) * 0.01).astype(np.float32))
        np.save(folder / f"margin_{case['name']}_scores.npy", rng.uniform(size=CLASSES).astype(np.float32))
    (folder / "config.json").write_text(json.dumps(CFG))
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", PATH=os.pathsep.join([BIN_DIR, os.environ.get("PATH", "")]),
               PYTHONPATH=str(ROOT))
    cmd = ["timeout", str(MSRUN_TIMEOUT), MSRUN, f"--worker_num={WORLD}", f"--local_worker_num={WORLD}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", f"--log_dir={folder / 'logs'}",
           "--join=True", "--cluster_time_out=120", str(WORKER), str(folder)]
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=MSRUN_TIMEOUT + 30)
    if done.returncode != 0 or not all((folder / f"rank{r}" / "done").is_file() for r in range(WORLD)):
        logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((folder / "logs").glob("worker_*.log")))
        pytest.fail(f"msrun exited with {done.returncode}\n{done.stderr[-2000:]}\n{logs}")
    return folder


def load(folder, rank, name):
    return np.load(folder / f"rank{rank}" / f"{name}.npy")


def reference_net(folder):
    backbone = nn.Dense(IN_DIM, DIM)
    backbone.weight.set_data(Tensor(np.load(folder / "dense_w.npy")))
    backbone.bias.set_data(Tensor(np.load(folder / "dense_b.npy")))
    head = PartialFC(CLASSES, DIM, CombinedMargin(CFG["s"], *CFG["margins"]), rank=0, world_size=1)
    head.weight.set_data(Tensor(np.load(folder / "head_w.npy")))
    return BackboneWithHead(backbone, head)


@pytest.fixture(scope="module")
def reference(dist_run):
    """The full head in one process on the combined batches: loss and gradients of batch 0, then the
    parameters after STEPS SGD steps, and that training cell."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    x, y = np.load(dist_run / "x.npy"), np.load(dist_run / "y.npy")
    combined = lambda t: (Tensor(x[t].reshape(-1, IN_DIM)), Tensor(y[t].reshape(-1)))  # noqa: E731 rank order
    net = reference_net(dist_run)
    loss, grads = ms.value_and_grad(net, None, net.trainable_params())(*combined(0))
    images, labels = combined(0)
    _, grad_emb = ms.value_and_grad(net.head, 0)(net.backbone(images), labels)
    ref = {"loss0": float(loss.asnumpy()), "grad_embeddings": grad_emb.asnumpy(),
           "grads": {p.name: g.asnumpy() for p, g in zip(net.trainable_params(), grads)}}
    optimizer = nn.SGD(net.trainable_params(), learning_rate=CFG["lr"], momentum=CFG["momentum"],
                       weight_decay=CFG["weight_decay"])
    step = nn.TrainOneStepCell(net, optimizer)
    ref["losses"] = [float(step(*combined(t)).asnumpy()) for t in range(STEPS)]
    ref["params"] = {p.name: p.asnumpy() for p in step.get_parameters()}
    return ref


def shard_files(folder):
    sets = find_shards(str(folder / f"ArcFace-1_{STEPS}.ckpt"))
    assert list(sets) == [WORLD] and sorted(sets[WORLD]) == list(range(WORLD))
    return [sets[WORLD][r] for r in range(WORLD)]


# --- 2 workers under msrun ------------------------------------------------------------------------

@requires_msrun
def test_loss_and_gradients_equal_the_full_head(dist_run, reference):
    """sample_rate 1.0: loss, backbone gradients (all-reduced SUM), each rank's head-shard gradient
    and the gradient reaching each rank's own embeddings (all-gather backward) are those of the full
    head on the combined batch."""
    for rank in range(WORLD):
        start, stop = load(dist_run, rank, "class_range")
        assert (start, stop) == class_range(CLASSES, rank, WORLD)
        assert float(load(dist_run, rank, "loss0")) == pytest.approx(reference["loss0"], rel=1e-6)
        for name in ("backbone.weight", "backbone.bias"):
            assert_close(load(dist_run, rank, "grad_" + name), reference["grads"][name])
            np.testing.assert_array_equal(load(dist_run, rank, "grad_" + name), load(dist_run, 0, "grad_" + name))
        assert_close(load(dist_run, rank, "grad_head.weight"), reference["grads"]["head.weight"][start:stop])
        assert_close(load(dist_run, rank, "grad_embeddings"),
                     reference["grad_embeddings"][rank * BATCH:(rank + 1) * BATCH])


@requires_msrun
def test_sgd_steps_equal_the_full_head(dist_run, reference):
    """After STEPS SGD steps (momentum, weight decay) the backbone is bit-identical on both ranks and
    equals the single-process run; each head shard and its momentum are the matching rows."""
    for rank in range(WORLD):
        np.testing.assert_allclose(load(dist_run, rank, "losses"), reference["losses"], rtol=1e-5)
        start, stop = load(dist_run, rank, "class_range")
        for name, want in reference["params"].items():
            if name == "learning_rate":
                continue
            got = load(dist_run, rank, "param_" + name)
            if name.endswith("head.weight"):
                want = want[start:stop]
            else:
                np.testing.assert_array_equal(got, load(dist_run, 0, "param_" + name))
            assert_close(got, want)


@requires_msrun
def test_sampling_keeps_every_positive_and_learns(dist_run):
    """sample_rate 0.3 of 100 classes (50 per rank): 15 distinct centres per rank containing every
    class of the global batch that lives on the rank, random negatives that change between steps; the
    loss-scaled train step brings the (sampled-softmax) loss down and never overflows."""
    sampled = CFG["sampled"]
    for rank in range(WORLD):
        start, stop = load(dist_run, rank, "sampled_range")
        local = stop - start
        expected = num_sampled_centres(local, sampled["sample_rate"], WORLD * BATCH)
        assert expected == math.ceil(sampled["sample_rate"] * local) == 15
        index = load(dist_run, rank, "sampled_index")
        assert index.shape == (expected,) and len(set(index.tolist())) == expected
        assert index.min() >= 0 and index.max() < local
        labels = load(dist_run, rank, "sampled_global_labels")
        np.testing.assert_array_equal(labels, np.load(dist_run / "y_sampled.npy").reshape(-1))
        positives = {int(v) - start for v in labels if start <= v < stop}
        assert positives and positives <= set(index.tolist())
        again = load(dist_run, rank, "sampled_index_again")
        assert positives <= set(again.tolist()) and set(again.tolist()) != set(index.tolist())
        losses = load(dist_run, rank, "sampled_losses")
        assert np.all(np.isfinite(losses)) and losses[-1] < 0.6 * losses[0], losses
        np.testing.assert_array_equal(losses, load(dist_run, 0, "sampled_losses"))  # same loss on all ranks
        assert not load(dist_run, rank, "sampled_overflow").any()


@requires_msrun
def test_shards_merge_split_and_resume(dist_run, reference):
    """The shard files merge into the single-process head (weight and momentum), split back into each
    rank's parameters, and each rank resumed its exact state from them and rank 0's checkpoint (which
    leaves the head out); keep=1 pruned the older checkpoint and shards."""
    paths = shard_files(dist_run)
    assert sorted(p.name for p in dist_run.glob("ArcFace-*.ckpt")) == [
        f"ArcFace-1_{STEPS}.ckpt", f"ArcFace-1_{STEPS}.head-r0of2.ckpt", f"ArcFace-1_{STEPS}.head-r1of2.ckpt"]
    main = ms.load_checkpoint(str(dist_run / f"ArcFace-1_{STEPS}.ckpt"))
    assert "backbone.weight" in main and not [k for k in main if k.endswith("head.weight")]
    merged = merge_shards(paths)
    assert merged.shape == (CLASSES, DIM)
    assert_close(merged, reference["params"]["head.weight"])
    assert_close(merge_shards(paths[::-1], "accum.head.weight"), reference["params"]["accum.head.weight"])
    merged_from_dicts = merge_shards([ms.load_checkpoint(p) for p in paths])
    np.testing.assert_array_equal(merged_from_dicts, merged)
    for rank in range(WORLD):
        np.testing.assert_array_equal(split_rows(merged, rank, WORLD), load(dist_run, rank, "param_head.weight"))
        assert load(dist_run, rank, "resume_mismatched").tolist() == [""]
    with pytest.raises(ArcFaceError, match="tile"):
        merge_shards(paths[1:])


@requires_msrun
def test_export_and_resume_on_one_device(dist_run, reference, tmp_path):
    """A 2-rank run continues on one device: as a plain CombinedMarginHead run (exported checkpoint,
    loaded by the ordinary --resume code) and as a 1-rank Partial FC run reading the 2 shards."""
    main_ckpt = str(dist_run / f"ArcFace-1_{STEPS}.ckpt")
    merged_ckpt = str(tmp_path / "merged.ckpt")
    assert export_merged_checkpoint(main_ckpt, merged_ckpt) == CLASSES
    from src.partial_fc import main as merge_cli
    assert merge_cli(["--merge", main_ckpt, "--output", str(tmp_path / "cli.ckpt")]) == 0
    assert (tmp_path / "cli.ckpt").stat().st_size == os.path.getsize(merged_ckpt)
    for checkpoint in (merged_ckpt, main_ckpt):  # the whole head in the file, or read from the 2 shards
        net = reference_net(dist_run)
        step = TrainStep(net, nn.SGD(net.trainable_params(), learning_rate=CFG["lr"], momentum=CFG["momentum"],
                                     weight_decay=CFG["weight_decay"]))
        assert restore(step, net.head, checkpoint)["global_step"] == STEPS
        for param in step.get_parameters():
            if param.name != "learning_rate":
                assert_close(param.asnumpy(), reference["params"][param.name])


def sampled_classes(case, scores, labels):
    """The classes the ranks sample for the global `labels` with the fixed `scores`: on each rank all
    its classes of the batch plus the best-scored others, num_sampled_centres in all."""
    chosen = []
    for rank in range(WORLD):
        start, stop = class_range(case["num_classes"], rank, WORLD)
        local = stop - start
        count = min(local, max(num_sampled_centres(local, case["sample_rate"], 1), len(labels)))
        hits = np.zeros(local)
        hits[[int(v) - start for v in labels if start <= v < stop]] = 1
        chosen.extend(start + np.argsort(-(scores[start:stop] + 2 * hits), kind="stable")[:count])
    return sorted(int(c) for c in chosen)


def margin_reference(folder, case):
    """One process (pynative) holding every class, with the union of what the ranks sampled: loss and
    gradients of batch 0, then the parameters after STEPS steps of the project's train step."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    x, y = np.load(folder / "x.npy"), np.load(folder / "y.npy")
    full_w = np.load(folder / f"margin_{case['name']}_head_w.npy")
    scores = np.load(folder / f"margin_{case['name']}_scores.npy")

    def build():
        backbone = nn.Dense(IN_DIM, DIM)
        backbone.weight.set_data(Tensor(np.load(folder / "dense_w.npy")))
        backbone.bias.set_data(Tensor(np.load(folder / "dense_b.npy")))
        head = PartialFC(case["num_classes"], DIM, build_margin(case["kind"], **case["hyper"]),
                         sample_rate=case["sample_rate"], rank=0, world_size=1)
        head.weight.set_data(Tensor(full_w))
        return BackboneWithHead(backbone, head)

    def batch(net, t):
        labels = y[t].reshape(-1)
        if case["sample_rate"] < 1:
            union = Tensor(np.array(sampled_classes(case, scores, labels), np.int32))
            net.head.sample_centres = lambda local_labels: union
        return Tensor(x[t].reshape(-1, IN_DIM)), Tensor(labels)

    net = build()
    images, labels = batch(net, 0)
    loss, grads = ms.value_and_grad(net, None, net.trainable_params())(images, labels)
    _, grad_emb = ms.value_and_grad(net.head, 0)(net.backbone(images), labels)
    ref = {"loss0": float(loss.asnumpy()), "grad_embeddings": grad_emb.asnumpy(),
           "grads": {p.name: g.asnumpy() for p, g in zip(net.trainable_params(), grads)}}
    net = build()
    step = TrainStep(net, nn.SGD(net.trainable_params(), learning_rate=CFG["lr"], momentum=CFG["momentum"],
                                 weight_decay=CFG["weight_decay"]))
    ref["losses"] = [float(step(*batch(net, t))[0].asnumpy()) for t in range(STEPS)]
    ref["params"] = {p.name: p.asnumpy() for p in step.get_parameters()}
    return ref


@requires_msrun
@pytest.mark.parametrize("case", MARGIN_CASES, ids=[case["name"] for case in MARGIN_CASES])
def test_every_margin_on_two_ranks_equals_one_process(dist_run, case):
    """For each margin, with and without sampling: the loss, the backbone gradient, each rank's
    head-shard gradient (K rows per class for sub-center), the gradient reaching each rank's
    embeddings (MagFace's through the norm too), and after STEPS SGD steps the parameters and the
    running statistics, identical on both ranks and equal to one process holding all classes; the
    2-rank checkpoint (statistics in rank 0's file, the head in shards) restores every rank exactly."""
    name, k = case["name"], case["hyper"].get("k", 1)
    ref = margin_reference(dist_run, case)
    for rank in range(WORLD):
        def get(what, rank=rank):
            return load(dist_run, rank, f"{name}_{what}")
        start, stop = class_range(CLASSES, rank, WORLD)
        assert float(get("loss0")) == pytest.approx(ref["loss0"], rel=1e-6)
        for param in ("backbone.weight", "backbone.bias"):
            assert_close(get("grad_" + param), ref["grads"][param])
        assert_close(get("grad_head.weight"), ref["grads"]["head.weight"][start * k:stop * k])
        assert_close(get("grad_embeddings"), ref["grad_embeddings"][rank * BATCH:(rank + 1) * BATCH])
        if case["sample_rate"] < 1:
            labels = np.load(dist_run / "y.npy")[0].reshape(-1)
            scores = np.load(dist_run / f"margin_{name}_scores.npy")
            mine = {c for c in sampled_classes(case, scores, labels) if start <= c < stop}
            assert {start + int(i) for i in get("sampled_index")} == mine and len(mine) < stop - start
        np.testing.assert_allclose(get("losses"), ref["losses"], rtol=1e-5)
        for param, want in ref["params"].items():
            if param == "learning_rate":
                continue
            got = get("param_" + param)
            if param.endswith("head.weight"):
                want = want[start * k:stop * k]
            else:
                np.testing.assert_array_equal(got, load(dist_run, 0, f"{name}_param_{param}"))
            assert_close(got, want)
        for stat, initial in STATISTICS.get(case["kind"], {}).items():  # they moved (and equal the reference)
            assert abs(float(get(f"param_head.margin.{stat}")[0]) - initial) > 1e-3
        assert get("resume_mismatched").tolist() == [""]
    shards = find_shards(str(dist_run / f"margin_{name}" / f"ArcFace-1_{STEPS}.ckpt"))[WORLD]
    merged = merge_shards([shards[r] for r in range(WORLD)])  # K rows per class, in class order
    assert merged.shape == (CLASSES * k, DIM)
    assert_close(merged, ref["params"]["head.weight"])
    if case["kind"] == "combined":  # the filter acted on rows whose target is on the other rank
        assert ref["loss0"] != pytest.approx(reference_loss_without_filter(dist_run, case), rel=1e-3)


def reference_loss_without_filter(folder, case):
    plain = dict(case, name=case["name"], hyper={key: value for key, value in case["hyper"].items()
                                                if key != "interclass_filtering_threshold"})
    return margin_reference(folder, plain)["loss0"]


# --- single process -------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes,world", [(41, 2), (10, 3), (85742, 8), (7, 7)])
def test_class_ranges_tile_the_classes(num_classes, world):
    ranges = [class_range(num_classes, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_class_range_and_sample_rate_errors():
    with pytest.raises(ArcFaceError, match="at least one class per rank"):
        class_range(3, 0, 4)
    with pytest.raises(ArcFaceError, match="sample_rate"):
        num_sampled_centres(10, 0.0, 4)
    assert num_sampled_centres(1000, 0.1, 64) == 100
    assert num_sampled_centres(1000, 0.01, 64) == 64  # raised so that all positives fit
    assert num_sampled_centres(30, 0.01, 64) == 30


def test_initial_centres_do_not_depend_on_the_world_size():
    full = init_centres(0, 9000, 8, seed=3)
    for world in (2, 3):
        parts = [init_centres(*class_range(9000, r, world), 8, seed=3) for r in range(world)]
        np.testing.assert_array_equal(np.concatenate(parts), full)
    assert abs(float(full.std()) - 0.01) < 5e-4 and not np.array_equal(full, init_centres(0, 9000, 8, seed=4))


def test_one_rank_sampling_all_centres_is_the_full_softmax():
    """Sampling 50% of 12 classes with a global batch of 12 must take all 12 (num_sampled_centres), so
    the sampled path is the full softmax in another column order: same loss and gradients."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(1)
    emb = Tensor(rng.normal(size=(12, 16)).astype(np.float32))
    labels = Tensor(rng.integers(0, 12, 12).astype(np.int32))
    sampled = PartialFC(12, 16, CombinedMargin(64.0, 1.0, 0.5, 0.0), sample_rate=0.5, rank=0, world_size=1)
    full = PartialFC(12, 16, CombinedMargin(64.0, 1.0, 0.5, 0.0), rank=0, world_size=1)
    np.testing.assert_array_equal(sampled.weight.asnumpy(), full.weight.asnumpy())  # same seed, same centres
    loss, (g_emb, (g_w,)) = ms.value_and_grad(sampled, 0, sampled.trainable_params())(emb, labels)
    want, (w_emb, (w_w,)) = ms.value_and_grad(full, 0, full.trainable_params())(emb, labels)
    assert float(loss.asnumpy()) == pytest.approx(float(want.asnumpy()), rel=1e-6)
    assert_close(g_emb.asnumpy(), w_emb.asnumpy())
    assert_close(g_w.asnumpy(), w_w.asnumpy())


def test_one_rank_keeps_the_head_in_the_checkpoint_and_prunes(tmp_path):
    """On one rank the head and its optimizer slots are part of the checkpoint (no shard files), the
    writer keeps the newest `keep` files, and restore() brings every parameter back."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = BackboneWithHead(nn.Dense(3, 4), PartialFC(10, 4, rank=0, world_size=1))
    step = TrainStep(net, nn.SGD(net.trainable_params(), learning_rate=0.1, momentum=0.9))
    writer = CheckpointWriter(step, net.head, str(tmp_path), keep=2, meta={"network": "dense"})
    for global_step in (1, 2, 3):
        writer.save({"epoch": 1, "step_in_epoch": global_step, "global_step": global_step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ArcFace-1_2.ckpt", "ArcFace-1_3.ckpt"]
    saved = ms.load_checkpoint(str(tmp_path / "ArcFace-1_3.ckpt"))
    assert {"head.weight", "accum.head.weight", "backbone.weight", "global_step"} <= set(saved)
    other = BackboneWithHead(nn.Dense(3, 4), PartialFC(10, 4, rank=0, world_size=1, seed=9))
    other_step = TrainStep(other, nn.SGD(other.trainable_params(), learning_rate=0.1, momentum=0.9))
    assert restore(other_step, other.head, str(tmp_path / "ArcFace-1_3.ckpt"))["network"] == "dense"
    for mine, theirs in zip(step.get_parameters(), other_step.get_parameters()):
        np.testing.assert_array_equal(mine.asnumpy(), theirs.asnumpy(), err_msg=mine.name)
