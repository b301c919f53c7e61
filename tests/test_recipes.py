"""The arcface_torch recipe's pieces against formulas: AdamW (PyTorch's, bias-corrected), weight decay
on BatchNorm, backbone gradient clipping (after unscaling, skipped-step safe), gradient accumulation,
the torch initialisation, and the options reaching the network."""
import itertools

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from src.config import TrainConfig
from src.heads.classifier import PartialFC
from src.heads.margin import CombinedMargin
from src.training.lr_schedule import LRSchedule
from src.training.optim import SGD, AdamW, build_optimizer, parameter_groups
from src.training.step import BackboneWithHead, TrainStep, all_finite, shape_groups


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


def torch_adamw(param, grads, lrs, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """PyTorch's AdamW update rule in float64."""
    p, m, v = param.astype(np.float64), np.zeros(param.shape), np.zeros(param.shape)
    for t, (g, lr) in enumerate(zip(grads, lrs), 1):
        p = p * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr * (m / (1 - betas[0] ** t)) / (np.sqrt(v / (1 - betas[1] ** t)) + eps)
    return p


def test_adamw_is_pytorchs_with_decoupled_decay_and_bias_correction():
    rng = np.random.default_rng(0)
    net = nn.Dense(4, 3)
    w0, b0 = net.weight.asnumpy().copy(), net.bias.asnumpy().copy()
    lrs = np.array([0.1, 0.05, 0.02, 0.01, 0.0], np.float32)
    optimizer = AdamW([{"params": [net.weight], "weight_decay": 0.1}, {"params": [net.bias], "weight_decay": 0.0}],
                      Tensor(lrs))
    grads_w = [rng.normal(size=(3, 4)) for _ in range(5)]
    grads_b = [rng.normal(size=(3,)) for _ in range(5)]
    for gw, gb in zip(grads_w, grads_b):
        optimizer((Tensor(gw.astype(np.float32)), Tensor(gb.astype(np.float32))))
    np.testing.assert_allclose(net.weight.asnumpy(), torch_adamw(w0, grads_w, lrs, 0.1), atol=5e-6)
    np.testing.assert_allclose(net.bias.asnumpy(), torch_adamw(b0, grads_b, lrs, 0.0), atol=5e-6)
    assert int(optimizer.global_step.asnumpy()[0]) == 5


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_sgd_with_the_decay_in_the_kernel_is_nn_sgd(mode):
    """The run's SGD (weight decay inside the SGD kernel) updates weights, momentum and step exactly as
    nn.SGD with the same groups (decayed and not decayed), over several steps with changing rates; its
    state has nn.SGD's names."""
    ms.set_context(mode=mode)
    rng = np.random.default_rng(4)
    lrs = Tensor(np.array([0.1, 0.3, 0.05, 0.2], np.float32))

    def build():
        return nn.SequentialCell(nn.Dense(5, 4), nn.BatchNorm1d(4), nn.Dense(4, 3))

    def run(kind):
        net = build()
        for p in net.trainable_params():
            p.set_data(Tensor(start[p.name]))
        optimizer = kind(parameter_groups(net, 0.05), learning_rate=lrs, momentum=0.9)
        for grads in steps:  # in the optimizer's order of its parameters (the groups')
            optimizer(tuple(Tensor(grads[p.name]) for p in optimizer.parameters))
        return {p.name: p.asnumpy().copy() for p in optimizer.get_parameters() if p.name != "learning_rate"}

    shapes = {p.name: p.shape for p in build().trainable_params()}
    start = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    steps = [{name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()} for _ in range(4)]
    ours, reference = run(SGD), run(nn.SGD)
    assert sorted(ours) == sorted(reference) and any(name.startswith("accum.") for name in ours)
    for name in reference:
        np.testing.assert_allclose(ours[name], reference[name], rtol=1e-6, atol=1e-7, err_msg=name)
    moved = {name: ours[name] - start[name] for name in start}
    assert all(np.abs(m).max() > 0 for m in moved.values())


def test_weight_decay_on_batchnorm_only_when_asked():
    net = nn.SequentialCell(nn.Dense(3, 4), nn.BatchNorm1d(4))
    zoo = parameter_groups(net, 5e-4)
    assert [len(g["params"]) for g in zoo] == [2, 2] and zoo[1]["weight_decay"] == 0.0
    everything = parameter_groups(net, 5e-4, decay_batchnorm=True)
    assert len(everything) == 1 and len(everything[0]["params"]) == 4 and everything[0]["weight_decay"] == 5e-4


def tiny_step(clip=0.0, accumulate=1, fp16=False, lr=1.0, scale_window=2000):
    """A Dense "backbone" + the head on one rank, SGD without momentum: an update is -lr * gradient."""
    ms.set_seed(3)
    net = BackboneWithHead(nn.Dense(6, 4), PartialFC(5, 4, CombinedMargin(8.0, 1.0, 0.5, 0.0), rank=0, world_size=1))
    optimizer = nn.SGD(net.trainable_params(), learning_rate=Tensor(np.full(10, lr, np.float32)), momentum=0.0)
    return net, TrainStep(net, optimizer, fp16=fp16, clip_norm=clip, accumulate=accumulate, scale_window=scale_window)


def batch(seed):
    rng = np.random.default_rng(seed)
    return Tensor(rng.normal(size=(8, 6)).astype(np.float32) * 5), Tensor(rng.integers(0, 5, 8).astype(np.int32))


def params_of(net):
    return {p.name: p.asnumpy().copy() for p in net.trainable_params()}


def gradients(step, images, labels):
    _, grads = step.gradients(images, labels, Tensor(1.0, ms.float32))
    return {w.name: g.asnumpy() for w, g in zip(step.weights, grads)}


@pytest.mark.parametrize("fp16", [False, True])
def test_clipping_scales_the_backbone_gradient_to_the_norm_and_leaves_the_head(fp16):
    net, step = tiny_step(clip=0.01, fp16=fp16)
    images, labels = batch(0)
    grads = gradients(step, images, labels)
    backbone = ["backbone.weight", "backbone.bias"]
    norm = np.sqrt(sum((grads[n] ** 2).sum() for n in backbone))
    assert norm > 0.01  # the clip is active
    before = params_of(net)
    loss, overflow, _ = step(images, labels)
    assert not bool(overflow.asnumpy())
    after = params_of(net)
    for name in backbone:  # lr 1, no momentum: the update is the clipped gradient
        np.testing.assert_allclose(before[name] - after[name], grads[name] * 0.01 / (norm + 1e-6), rtol=1e-3,
                                   atol=1e-7)
    np.testing.assert_allclose(before["head.weight"] - after["head.weight"], grads["head.weight"], rtol=1e-3,
                               atol=1e-7)


def test_a_non_finite_step_is_skipped_even_when_clipping():
    net, step = tiny_step(clip=0.5)
    images, labels = batch(0)
    before = params_of(net)
    bad = images.asnumpy()
    bad[0, 0] = np.inf
    loss, overflow, scale = step(Tensor(bad), labels)
    assert bool(overflow.asnumpy()) and float(scale.asnumpy()) == 1.0
    for name, value in params_of(net).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert int(step.optimizer.global_step.asnumpy()[0]) == 1  # the schedule still follows the iteration


def test_accumulation_applies_the_summed_gradient_every_k_micro_batches():
    """arcface_torch calls backward() on every micro-batch and steps every k-th: the update is the
    sum of the k gradients (clipped as a whole), not their mean."""
    net, step = tiny_step(accumulate=2, lr=1.0)
    before = params_of(net)
    (x1, y1), (x2, y2) = batch(1), batch(2)
    g1 = gradients(step, x1, y1)
    step(x1, y1)
    unchanged = params_of(net)
    for name in before:
        np.testing.assert_array_equal(unchanged[name], before[name], err_msg=name)
    g2 = gradients(step, x2, y2)
    step(x2, y2)
    after = params_of(net)
    for name in before:
        np.testing.assert_allclose(before[name] - after[name], g1[name] + g2[name], rtol=1e-4, atol=1e-7)
    assert int(step.optimizer.global_step.asnumpy()[0]) == 2
    assert not step.accumulated[0].asnumpy().any()  # emptied for the next window


def test_accumulation_clips_the_summed_gradient():
    """The clip acts once per update, on the norm of the summed backbone gradient (arcface_torch's
    clip_grad_norm_ before opt.step() every k-th micro-batch)."""
    net, step = tiny_step(clip=0.05, accumulate=2, lr=1.0)
    before = params_of(net)
    (x1, y1), (x2, y2) = batch(1), batch(2)
    g1 = gradients(step, x1, y1)
    step(x1, y1)
    g2 = gradients(step, x2, y2)
    step(x2, y2)
    after = params_of(net)
    backbone = ["backbone.weight", "backbone.bias"]
    summed = {name: g1[name] + g2[name] for name in before}
    norm = np.sqrt(sum((summed[n] ** 2).sum() for n in backbone))
    assert norm > 0.05  # the clip is active
    for name in backbone:
        np.testing.assert_allclose(before[name] - after[name], summed[name] * 0.05 / (norm + 1e-6), rtol=1e-3,
                                   atol=1e-7)
    np.testing.assert_allclose(before["head.weight"] - after["head.weight"], summed["head.weight"], rtol=1e-4,
                               atol=1e-7)


def test_the_loss_scale_doubles_after_a_window_of_good_steps_and_halves_on_overflow():
    """arcface_torch's GradScaler(growth_interval=100) is --loss_scale_window 100; here a window of 3."""
    net, step = tiny_step(fp16=True, lr=1e-3, scale_window=3)
    start = float(step.scale_sense.asnumpy())
    after = []  # the scale after each step
    for i in range(7):
        step(*batch(i))
        after.append(float(step.scale_sense.asnumpy()))
    assert after == [start, start, 2 * start, 2 * start, 2 * start, 4 * start, 4 * start]
    bad, labels = batch(9)
    spoiled = bad.asnumpy()
    spoiled[0, 0] = np.inf
    assert bool(step(Tensor(spoiled), labels)[1].asnumpy())
    assert float(step.scale_sense.asnumpy()) == 2 * start


def test_accumulation_skips_a_non_finite_micro_batch():
    net, step = tiny_step(accumulate=2, lr=1.0)
    before = params_of(net)
    x1, y1 = batch(1)
    bad = x1.asnumpy()
    bad[0, 0] = np.nan
    step(Tensor(bad), y1)
    x2, y2 = batch(2)
    g2 = gradients(step, x2, y2)
    step(x2, y2)
    after = params_of(net)
    for name in before:  # only the finite micro-batch contributes
        np.testing.assert_allclose(before[name] - after[name], g2[name], rtol=1e-4, atol=1e-7)


def test_every_config_file_loads_and_the_arcface_torch_ones_match_its_recipe():
    """Every yaml in configs/ is a valid set of options; arcface_torch's grow the loss scale every 100
    good steps (its GradScaler), its MS1MV2 r50 decays by 5e-4; each loss recipe names its margin and its
    published figures."""
    from pathlib import Path

    from src.config import parse_train_args
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 15
    for path in files:
        cfg, _ = parse_train_args(["--config", str(path)])
        if path.parent.name == "arcface_torch":
            assert cfg.loss_scale_window == 100 and cfg.margin_grad == "straight", path
        if path.parent.name == "losses":
            assert path.name.startswith(cfg.margin_type) and "Published" in path.read_text(), path
    r50, _ = parse_train_args(["--config", str(root / "arcface_torch" / "ms1mv2_r50.yaml")])
    assert r50.weight_decay == 5e-4
    losses = {path.stem for path in (root / "losses").glob("*.yaml")}
    assert {"adaface_ms1mv2_r100", "adaface_webface4m_r100", "curricularface_ms1mv2_r100", "magface_ms1mv2_r100",
            "subcenter_ms1mv0_r50"} <= losses


def test_torch_initialisation_of_an_iresnet():
    from src.models import apply_init, get_backbone
    zoo = get_backbone("r18")
    torch_like = apply_init(get_backbone("r18"), "r18", "torch", seed=1)
    conv = torch_like.layer4[0].conv1.weight.asnumpy()  # 512 x 256 x 3 x 3
    assert abs(conv.std() - 0.1) < 0.002 and abs(zoo.layer4[0].conv1.weight.asnumpy().std() - 0.1) > 0.05
    fc = torch_like.fc.weight.asnumpy()
    bound = 1 / np.sqrt(torch_like.fc.in_channels)
    assert np.abs(fc).max() <= bound and np.abs(fc).max() > 0.99 * bound
    mbf = get_backbone("mbf")
    before = mbf.conv_sep.layers[0].weight.asnumpy().copy()
    apply_init(mbf, "mbf", "torch")  # arcface_torch initialises mbf as we do: unchanged
    np.testing.assert_array_equal(mbf.conv_sep.layers[0].weight.asnumpy(), before)


def test_recipe_options_reach_the_network_and_the_step():
    from src.training.trainer import build_network, build_step
    cfg = TrainConfig(network="r18", width=8, margin="cosface", margin_grad="straight",
                      interclass_filtering_threshold=0.4, optimizer="adamw", weight_decay=0.1, weight_decay_bn=True,
                      clip_grad_norm=5.0, gradient_acc=3, init="torch")
    net = build_network(cfg, 10)
    assert net.head.margin.straight and net.head.margin.filter_threshold == 0.4 and net.head.margin.m3 == 0.4
    step = build_step(cfg, net, LRSchedule.constant(1e-3), fp16=False)
    assert isinstance(step.optimizer, AdamW) and step.clip_norm == 5.0 and step.accumulate == 3
    fp16_step = build_step(TrainConfig(network="r18", width=8, loss_scale_window=100), net,
                           LRSchedule.constant(1e-3), fp16=True)
    assert fp16_step.scale_manager.scale_window == 100
    assert all(wd == pytest.approx(0.1) for wd in step.optimizer.decays)  # BatchNorm decayed too
    sgd = build_optimizer(TrainConfig(network="r18", width=8), net, LRSchedule.constant(0.1))
    assert isinstance(sgd, SGD) and isinstance(sgd, nn.SGD)


def test_adamw_state_is_saved_and_restored(tmp_path):
    """A run resumed from a checkpoint continues AdamW exactly: moments and update count come back, and
    the next step gives the same parameters as the uninterrupted run."""
    from src.training.state import CheckpointWriter, restore

    def adamw_step(seed):
        ms.set_seed(seed)
        net = BackboneWithHead(nn.Dense(6, 4), PartialFC(5, 4, CombinedMargin(8.0, 1.0, 0.5, 0.0), rank=0,
                                                         world_size=1, seed=seed))
        optimizer = AdamW(parameter_groups(net, 0.1, decay_batchnorm=True), Tensor(np.full(8, 1e-2, np.float32)))
        return TrainStep(net, optimizer, clip_norm=1.0)
    first, other = adamw_step(1), adamw_step(2)
    for seed in (1, 2):
        first(*batch(seed))
    CheckpointWriter(first, first.network.head, str(tmp_path), keep=1).save(
        {"epoch": 1, "step_in_epoch": 2, "global_step": 2})
    restore(other, other.network.head, str(tmp_path / "ArcFace-1_2.ckpt"))
    names = [p.name for p in first.get_parameters()]
    assert {"adam_m.head.weight", "adam_v.backbone.weight", "adam_updates"} <= set(names)
    for mine, theirs in zip(first.get_parameters(), other.get_parameters()):
        if mine.name != "learning_rate":
            np.testing.assert_array_equal(mine.asnumpy(), theirs.asnumpy(), err_msg=mine.name)
    first(*batch(3))
    other(*batch(3))
    for mine, theirs in zip(first.get_parameters(), other.get_parameters()):
        np.testing.assert_allclose(mine.asnumpy(), theirs.asnumpy(), rtol=1e-6, atol=1e-7, err_msg=mine.name)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_the_finiteness_check_finds_one_bad_element_among_many(mode):
    """The check sums each tensor instead of testing every element: one NaN, one Inf, or +Inf and -Inf
    in different tensors (whose sum is NaN) must still be found, in fp32 and fp16; large finite values
    are finite."""
    ms.set_context(mode=mode)

    class Check(nn.Cell):
        def construct(self, tensors):
            return all_finite(tensors)

    check = Check()

    def finite(*arrays):
        return bool(check(tuple(Tensor(a) for a in arrays)).asnumpy())

    rng = np.random.default_rng(0)
    # (64, 300): summed by ReduceSum; (300, 400): by MatMul (step._MATMUL_SUM_MIN)
    for dtype, shape in itertools.product((np.float32, np.float16), ((64, 300), (300, 400))):
        big = rng.normal(size=shape).astype(dtype) * (1e4 if dtype == np.float16 else 1e30)
        small = rng.normal(size=(17,)).astype(dtype)
        assert np.isfinite(big).all() and finite(big, small), dtype
        for bad in (np.nan, np.inf, -np.inf):
            spoiled = big.copy()
            spoiled[40, 123] = bad
            assert not finite(spoiled, small), (dtype, bad)
        plus, minus = small.copy(), small.copy()
        plus[3], minus[5] = np.inf, -np.inf
        assert not finite(big, plus, minus)
        assert finite(small) and not finite(plus)  # a single tensor


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_the_grouped_finiteness_check_finds_what_the_per_tensor_one_finds(mode):
    """The train step's check adds same-shaped float32 tensors before summing (shape_groups): it gives
    the per-tensor check's answer on finite sets, one NaN or Inf anywhere, +Inf and -Inf at the same
    place of two same-shaped tensors (their element-wise sum is NaN) or in different groups, and keeps
    fp16 tensors out of the groups."""
    ms.set_context(mode=mode)
    rng = np.random.default_rng(1)
    shapes = [(64, 300), (17,), (64, 300), (17,), (3, 3, 4, 4), (64, 300), (17,), (5,)]
    arrays = [rng.normal(size=shape).astype(np.float32) * 1e30 for shape in shapes]
    arrays.append(rng.normal(size=(64, 300)).astype(np.float16) * 1e4)
    groups = shape_groups([Tensor(a) for a in arrays])
    assert groups == ((0, 2, 5), (1, 3, 6), (4,), (7,), (8,))

    class Check(nn.Cell):
        def __init__(self, grouped):
            super().__init__()
            self.groups = groups if grouped else None

        def construct(self, tensors):
            return all_finite(tensors, self.groups)

    grouped, per_tensor = Check(True), Check(False)

    def both(spoil):
        spoiled = [a.copy() for a in arrays]
        spoil(spoiled)
        tensors = tuple(Tensor(a) for a in spoiled)
        answers = bool(grouped(tensors).asnumpy()), bool(per_tensor(tensors).asnumpy())
        assert answers[0] == answers[1]
        return answers[0]

    assert both(lambda a: None)
    for index in range(len(arrays)):
        for bad in (np.nan, np.inf, -np.inf):
            def spoil(a, index=index, bad=bad):
                a[index].flat[a[index].size // 2] = bad
            assert not both(spoil), (index, bad)

    def opposite_infinities_same_place(a):
        a[0][10, 20], a[2][10, 20] = np.inf, -np.inf

    def opposite_infinities_apart(a):
        a[1][4], a[4][0, 0, 1, 1] = np.inf, -np.inf
    assert not both(opposite_infinities_same_place)
    assert not both(opposite_infinities_apart)
