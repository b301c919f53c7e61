"""Every value of the margin interface against its official formulas, written here in float64 numpy:
the logits, d(loss)/d(cos) and d(loss)/d(norms) (central differences of the reference, with what the
official code computes without gradient held fixed), and the running statistics after several
steps, with rows whose target lives on another rank. Then the head around them (norms passed with
their gradient, K centres per class), the options that build them and their bad values."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from src.config import MARGIN_HYPER, TrainConfig, parse_train_args
from src.errors import ArcFaceError
from src.heads.classifier import PartialFC
from src.heads.margin import COS_CLAMP, MARGINS, build_margin, check_hyper
from src.training.step import BackboneWithHead, TrainStep


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


# --- the official formulas in float64 -------------------------------------------------------------
# Each reference: (cos, one_hot, norms, state, hyper, fixed) -> (logits, extra loss, new state, fixed).
# `fixed` holds what the official code computes without gradient (masks, straight-through shifts,
# running statistics); given, it is reused, so that central differences see the official gradient.

def ref_combined(cos, one_hot, norms, state, hp, fixed=None):
    s, m1, m2, m3 = hp["s"], hp.get("m1", 1.0), hp.get("m2", 0.5), hp.get("m3", 0.0)
    threshold = hp.get("interclass_filtering_threshold", 0.0)
    if fixed is None:
        fixed = {"keep": 1.0 - (cos > threshold) * (1 - one_hot) if threshold > 0 else np.ones_like(cos)}
    cos = cos * fixed["keep"]
    target = (cos * one_hot).sum(1, keepdims=True)
    shift = one_hot * (np.cos(m1 * np.arccos(target) + m2) - m3 - target)
    if hp.get("gradient") == "straight":
        shift = fixed.setdefault("shift", shift)
    return s * (cos + shift), 0.0, state, fixed


def ref_adaface(cos, one_hot, norms, state, hp, fixed=None):
    """head.py (exact) / CVLface losses/adaface.py (straight)."""
    s, m, h, t_alpha, eps = hp["s"], hp["m"], hp["h"], hp["t_alpha"], 1e-3
    exact = hp.get("gradient", "exact") == "exact"
    if fixed is None:
        a = np.clip(norms, 0.001, 100)  # detached
        mean = a.mean() * t_alpha + (1 - t_alpha) * state["batch_mean"]
        std = a.std(ddof=1) * t_alpha + (1 - t_alpha) * state["batch_std"]
        fixed = {"z": np.clip(h * (a - mean) / (std + eps), -1, 1), "state": {"batch_mean": mean, "batch_std": std}}
    z = fixed["z"]
    if exact:
        cos = np.clip(cos, -1 + eps, 1 - eps)
        theta = np.clip(np.arccos(cos) + one_hot * (-m * z), eps, math.pi - eps)  # every column, as head.py
        logits = np.cos(theta) - one_hot * (m + m * z)
    else:
        target = (cos * one_hot).sum(1, keepdims=True)
        shift = fixed.setdefault("shift", one_hot * (np.cos(np.arccos(target) - m * z) - (m + m * z) - target))
        logits = cos + shift
    return s * logits, 0.0, fixed["state"], fixed


def ref_curricularface(cos, one_hot, norms, state, hp, fixed=None):
    """head/metrics.py; `state["elsewhere"]` (N, 1): the target cosine of rows whose target lives on
    another rank (what the cross-rank sum brings)."""
    s, m, alpha = hp["s"], hp["m"], hp["alpha"]
    cos = np.clip(cos, -1, 1)
    target = (cos * one_hot).sum(1, keepdims=True)
    if fixed is None:
        every = target + state["elsewhere"]
        every_m = every * math.cos(m) - np.sqrt(1 - every ** 2) * math.sin(m)
        fixed = {"hard": cos > every_m, "t": every.mean() * alpha + (1 - alpha) * state["t"]}
    target_m = target * math.cos(m) - np.sqrt(1 - target ** 2) * math.sin(m)
    final = np.where(target > math.cos(math.pi - m), target_m, target - math.sin(math.pi - m) * m)
    out = np.where(fixed["hard"], cos * (fixed["t"] + cos), cos)
    out = np.where(one_hot > 0, final, out)
    return s * out, 0.0, dict(state, t=fixed["t"]), fixed


def ref_magface(cos, one_hot, norms, state, hp, fixed=None):
    """models/magface.py MagLinear + MagLoss + the trainer's loss_id + lambda_g * loss_g."""
    s, l_a, u_a, l_m, u_m = hp["s"], hp["l_a"], hp["u_a"], hp["l_m"], hp["u_m"]
    a = np.clip(norms, l_a, u_a)
    margin = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    cos = np.clip(cos, -1, 1)
    cos_m = cos * np.cos(margin) - np.sqrt(1 - cos ** 2) * np.sin(margin)
    if hp["easy_margin"]:
        cos_m = np.where(cos > 0, cos_m, cos)
    else:
        cos_m = np.where(cos > np.cos(math.pi - margin), cos_m, cos - np.sin(math.pi - margin) * margin)
    out = one_hot * cos_m + (1 - one_hot) * cos
    regulariser = hp["lambda_g"] * np.mean(a / u_a ** 2 + 1 / a)
    return s * out, regulariser, state, fixed or {}


def ref_subcenter(cos, one_hot, norms, state, hp, fixed=None):
    """insightface's sub-center ArcFace: fc7 reshaped (N, C, K), max over K, then ArcFace."""
    best = cos.reshape(cos.shape[0], -1, hp["k"]).max(axis=2)
    return ref_combined(best, one_hot, norms, state, {"s": hp["s"], "m2": hp["m"],
                                                       "gradient": hp.get("gradient", "exact")}, fixed)


REFERENCES = {"combined": ref_combined, "adaface": ref_adaface, "curricularface": ref_curricularface,
              "magface": ref_magface, "subcenter": ref_subcenter}

CASES = {
    "arcface": ("combined", {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0}),
    "combined_straight_filtered": ("combined", {"s": 32.0, "m1": 1.2, "m2": 0.3, "m3": 0.1, "gradient": "straight",
                                                "interclass_filtering_threshold": 0.55}),
    "adaface": ("adaface", {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.3}),
    "adaface_straight": ("adaface", {"s": 64.0, "m": 0.4, "h": 2.0, "t_alpha": 0.3, "gradient": "straight"}),
    "curricularface": ("curricularface", {"s": 64.0, "m": 0.5, "alpha": 0.3}),
    "magface": ("magface", {"s": 64.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0,
                            "easy_margin": True}),
    "magface_hard_margin": ("magface", {"s": 32.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8,
                                        "lambda_g": 35.0, "easy_margin": False}),
    "subcenter": ("subcenter", {"s": 64.0, "m": 0.5, "k": 3}),
}
INITIAL = {"adaface": {"batch_mean": np.array([20.0]), "batch_std": np.array([100.0])},
           "curricularface": {"t": np.array([0.0])}}


def cross_entropy(logits, one_hot):
    """Mean over rows of log-sum-exp minus the target logit (0 in rows whose target is elsewhere)."""
    top = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float((lse - (logits * one_hot).sum(axis=1)).mean())


def ref_loss(kind, hp, cos, one_hot, norms, state, fixed):
    logits, extra, _, _ = REFERENCES[kind](cos, one_hot, norms, state, hp, fixed)
    return cross_entropy(logits, one_hot) + extra


def central_difference(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + h
        up = f()
        x[idx] = old - h
        down = f()
        x[idx] = old
        grad[idx] = (up - down) / (2 * h)
    return grad


def assert_close(got, want, rtol):
    """Equal up to rtol of the largest magnitude of `want` (float32 against float64)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(np.abs(want).max()), 1e-12)
    assert float(np.abs(got - want).max()) <= rtol * scale, float(np.abs(got - want).max()) / scale


def make_inputs(kind, hp, seed, rows=7, classes=5):
    """cos (N, C x K) away from every kink of the formulas, a one-hot with rows 2 and 5 empty (target on
    another rank), norms spread over and beyond the clipping ranges, and what the other rank holds."""
    rng = np.random.default_rng(seed)
    k = hp.get("k", 1)
    cos = rng.uniform(-0.7, 0.7, size=(rows, classes * k))
    labels = rng.integers(0, classes, rows)
    one_hot = np.eye(classes)[labels]
    one_hot[[2, 5]] = 0.0
    for i, c in enumerate(labels):  # targets from very easy to past pi - m (theta > 2.64)
        if one_hot[i].any():
            cos[i, c * k + rng.integers(0, k)] = [0.93, 0.6, 0.2, -0.3, -0.91, 0.75, 0.1][i]
    if kind == "magface":
        norms = np.array([[4.0], [12.5], [30.0], [57.0], [96.0], [140.0], [75.0]])
    elif kind == "adaface":  # beyond both clipping bounds too
        norms = np.array([[0.0004], [3.0], [20.0], [45.0], [90.0], [250.0], [30.0]]) * (1 + 0.1 * seed)
    else:
        norms = rng.uniform(2.0, 60.0, size=(rows, 1))
    elsewhere = np.zeros((rows, 1))
    elsewhere[[2, 5]] = [[0.45], [-0.2]]
    return cos, one_hot, norms, elsewhere


def run_margin(margin, cos, one_hot, norms):
    """(logits, loss, d loss / d cos, d loss / d norms) of the MindSpore margin, one forward pass."""
    one_hot_t = Tensor(one_hot.astype(np.float32))

    def loss_fn(c, n):
        logits = margin(c, one_hot_t, n)
        top = ms.ops.stop_gradient(logits.max(axis=1, keepdims=True))
        lse = ms.ops.log(ms.ops.exp(logits - top).sum(axis=1)) + top[:, 0]
        return (lse - (logits * one_hot_t).sum(axis=1)).mean() + margin.loss_term(n), logits

    (loss, logits), (g_cos, g_norms) = ms.value_and_grad(loss_fn, (0, 1), has_aux=True)(
        Tensor(cos.astype(np.float32)), Tensor(norms.astype(np.float32)))
    return logits.asnumpy(), float(loss.asnumpy()), g_cos.asnumpy(), g_norms.asnumpy()


def check_one_step(margin, kind, hp, state, seed):
    """One call of `margin` against the reference; returns the reference's new state and fixed values."""
    cos, one_hot, norms, elsewhere = make_inputs(kind, hp, seed)
    if kind == "curricularface":  # the cross-rank sum brings the targets of rows held elsewhere
        margin.sum_over_ranks = lambda x: x + Tensor(elsewhere.astype(np.float32))
        state = dict(state, elsewhere=elsewhere)
    logits, loss, g_cos, g_norms = run_margin(margin, cos, one_hot, norms)
    want_logits, extra, new_state, fixed = REFERENCES[kind](cos, one_hot, norms, state, hp)
    assert_close(logits, want_logits, 2e-6)
    assert loss == pytest.approx(cross_entropy(want_logits, one_hot) + extra, rel=2e-6)

    def loss_at():
        return ref_loss(kind, hp, cos, one_hot, norms, state, fixed)
    assert_close(g_cos, central_difference(loss_at, cos), 2e-5)
    if kind == "magface":  # the margin and the regulariser depend on the norm, with its gradient
        want = central_difference(loss_at, norms)
        assert np.abs(want).max() > 0.01 and want[0, 0] == 0.0 and want[5, 0] == 0.0  # clipped: no gradient
        assert_close(g_norms, want, 2e-5)
    else:  # AdaFace detaches the norms; the others do not use them
        assert not g_norms.any()
    return new_state, fixed


@pytest.mark.parametrize("case", CASES)
def test_margin_equals_its_official_formulas_over_several_steps(case):
    kind, hp = CASES[case]
    margin = build_margin(kind, **hp)
    state = {key: value.copy() for key, value in INITIAL.get(kind, {}).items()}
    for step in range(4):
        state, fixed = check_one_step(margin, kind, hp, state, seed=step)
        for key in INITIAL.get(kind, {}):  # the running statistics after each step
            assert getattr(margin, key).asnumpy() == pytest.approx(state[key], rel=1e-6), (step, key)
    if kind == "adaface":  # the statistics moved; with h = 2, z was clipped in some rows
        assert abs(float(margin.batch_std.asnumpy()[0]) - 100.0) > 20
        assert (np.abs(fixed["z"]).max() == 1.0) == (hp["h"] == 2.0)


def test_the_margins_change_what_they_should():
    """Sanity of the formulas themselves: AdaFace gives a low-norm image a smaller angular margin;
    CurricularFace raises only the hard negatives; MagFace's margin grows with the norm; a sub-center
    class takes its best centre."""
    cos = np.array([[0.5, 0.2, 0.45, -0.1]])
    one_hot = np.array([[1.0, 0, 0, 0]])
    logits = ref_adaface(np.repeat(cos, 2, 0), np.repeat(one_hot, 2, 0), np.array([[5.0], [80.0]]),
                         INITIAL["adaface"], CASES["adaface"][1])[0]
    assert logits[0, 0] > logits[1, 0]  # the hard (low-norm) image gets the easier target
    state = {"t": np.array([0.3]), "elsewhere": np.zeros((1, 1))}
    out = ref_curricularface(cos, one_hot, None, state, CASES["curricularface"][1])[0][0] / 64
    t = 0.3 * 0.5 + 0.7 * 0.3  # alpha 0.3: t moves towards the mean target cosine before use
    assert out[0] == pytest.approx(math.cos(math.acos(0.5) + 0.5))  # c_m = 0.0237
    np.testing.assert_allclose(out[1:], [0.2 * (t + 0.2), 0.45 * (t + 0.45), -0.1])  # -0.1 < c_m: not hard
    hp = CASES["magface"][1]
    small, big = (ref_magface(cos, one_hot, np.array([[n]]), {}, hp)[0][0, 0] for n in (20.0, 100.0))
    assert small > big
    best = ref_subcenter(np.array([[0.1, 0.6, 0.3, 0.2, 0.0, -0.4]]), np.array([[1.0, 0]]), None, {},
                         {"s": 1.0, "m": 0.0, "k": 3})[0]
    np.testing.assert_allclose(best, [[0.6, 0.2]])


# --- the head around the margins --------------------------------------------------------------------

def numpy_head_loss(kind, hp, emb, weight, labels, state, fixed=None):
    """(loss, what the official code holds without gradient) of the full head in float64."""
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit_w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos = np.clip((emb / norms) @ unit_w.T, -COS_CLAMP, COS_CLAMP)
    classes = weight.shape[0] // hp.get("k", 1)
    one_hot = np.eye(classes)[labels]
    if kind == "curricularface":
        state = dict(state, elsewhere=np.zeros((len(labels), 1)))
    logits, extra, _, fixed = REFERENCES[kind](cos, one_hot, norms, state, hp, fixed)
    return cross_entropy(logits, one_hot) + extra, fixed


@pytest.mark.parametrize("case", ["adaface", "curricularface", "magface", "subcenter"])
def test_the_head_passes_norms_with_their_gradient(case):
    """One rank: the head's loss and its gradients with respect to the raw embeddings (through the
    normalisation and, for MagFace, the norm) and the centres equal the reference's."""
    kind, hp = CASES[case]
    rng = np.random.default_rng(4)
    k = hp.get("k", 1)
    emb = rng.normal(size=(6, 8)) * rng.uniform(0.5, 12.0, size=(6, 1))  # norms ~2-40: MagFace clips some
    weight = rng.normal(size=(5 * k, 8))
    labels = np.array([0, 3, 3, 1, 4, 2])
    head = PartialFC(5, 8, build_margin(kind, **hp), rank=0, world_size=1)
    assert head.weight.shape == (5 * k, 8)
    head.weight.set_data(Tensor(weight.astype(np.float32)))
    grad_fn = ms.value_and_grad(lambda x: head(x, Tensor(labels.astype(np.int32))), 0, head.trainable_params())
    loss, (g_emb, (g_w,)) = grad_fn(Tensor(emb.astype(np.float32)))
    state = INITIAL.get(kind, {})
    want, fixed = numpy_head_loss(kind, hp, emb, weight, labels, state)
    assert float(loss.asnumpy()) == pytest.approx(want, rel=1e-5)
    f = lambda: numpy_head_loss(kind, hp, emb, weight, labels, state, fixed)[0]  # noqa: E731
    assert_close(g_emb.asnumpy(), central_difference(f, emb), 2e-4)
    assert_close(g_w.asnumpy(), central_difference(f, weight), 2e-4)


def test_sub_center_sampling_keeps_a_class_centres_together():
    """Sampling picks classes and takes all K rows of each: sampling every class (12 of 12 with a batch
    of 12) is the full head in another column order, with the same loss and gradients."""
    rng = np.random.default_rng(1)
    emb = Tensor(rng.normal(size=(12, 16)).astype(np.float32))
    labels = Tensor(rng.integers(0, 12, 12).astype(np.int32))
    heads = [PartialFC(12, 16, build_margin("subcenter", s=32.0, k=3), sample_rate=rate, rank=0, world_size=1)
             for rate in (0.5, 1.0)]
    results = [ms.value_and_grad(head, 0, head.trainable_params())(emb, labels) for head in heads]
    (loss, (g_emb, (g_w,))), (want, (w_emb, (w_w,))) = results
    assert heads[0].weight.shape == (36, 16)
    assert float(loss.asnumpy()) == pytest.approx(float(want.asnumpy()), rel=1e-6)
    assert_close(g_emb.asnumpy(), w_emb.asnumpy(), 1e-5)
    assert_close(g_w.asnumpy(), w_w.asnumpy(), 1e-5)
    # a sampled subset keeps whole classes: rows of a class get a gradient together or not at all
    small = PartialFC(40, 16, build_margin("subcenter", s=32.0, k=3), sample_rate=0.3, rank=0, world_size=1)
    _, (_, (g,)) = ms.value_and_grad(small, 0, small.trainable_params())(emb, labels)
    touched = np.abs(g.asnumpy()).sum(axis=1).reshape(40, 3) > 0
    assert touched.any(axis=1).sum() == 12  # ceil(0.3 x 40) classes, each through its best centre


def test_running_statistics_advance_once_per_step_and_are_saved(tmp_path):
    """In a train step (pynative mode too) AdaFace's statistics move once per step; they are common
    state in the checkpoint and come back with restore()."""
    from src.training.state import CheckpointWriter, restore

    def step_with(seed):
        ms.set_seed(seed)
        net = BackboneWithHead(nn.Dense(6, 4), PartialFC(5, 4, build_margin("adaface", s=16.0, t_alpha=0.5),
                                                         rank=0, world_size=1, seed=seed))
        return net, TrainStep(net, nn.SGD(net.trainable_params(), learning_rate=0.1, momentum=0.9))
    net, step = step_with(1)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 6)).astype(np.float32) * 4
    labels = Tensor(rng.integers(0, 5, 8).astype(np.int32))
    norms = np.linalg.norm(net.backbone(Tensor(images)).asnumpy().astype(np.float64), axis=1)
    step(Tensor(images), labels)
    assert net.head.margin.batch_mean.asnumpy()[0] == pytest.approx(0.5 * norms.mean() + 0.5 * 20, rel=1e-5)
    assert net.head.margin.batch_std.asnumpy()[0] == pytest.approx(0.5 * norms.std(ddof=1) + 0.5 * 100, rel=1e-5)
    CheckpointWriter(step, net.head, str(tmp_path), keep=1).save({"epoch": 1, "step_in_epoch": 1, "global_step": 1})
    saved = ms.load_checkpoint(str(tmp_path / "ArcFace-1_1.ckpt"))
    assert {"head.margin.batch_mean", "head.margin.batch_std"} <= set(saved)
    other_net, other = step_with(2)
    restore(other, other_net.head, str(tmp_path / "ArcFace-1_1.ckpt"))
    for name in ("batch_mean", "batch_std"):
        np.testing.assert_array_equal(getattr(other_net.head.margin, name).asnumpy(),
                                      getattr(net.head.margin, name).asnumpy())


# --- options and bad values -------------------------------------------------------------------------

def test_config_defaults_are_the_published_hyper_parameters():
    """Each --<type>_<name> option's default is build_margin's default (the official value), and the
    config builds each margin with them."""
    import inspect
    cfg = TrainConfig()
    for kind, names in MARGIN_HYPER.items():
        defaults = {p.name: p.default for p in inspect.signature(MARGINS[kind].__init__).parameters.values()}
        for name in names:
            assert getattr(cfg, f"{kind}_{name}") == defaults[name], (kind, name)
        cfg.margin_type = kind
        margin = build_margin(kind, **cfg.margin_hyper)
        assert isinstance(margin, MARGINS[kind]) and margin.s == 64.0
    assert (CASES["adaface"][0], TrainConfig().adaface_m, TrainConfig().adaface_h) == ("adaface", 0.4, 0.333)


def test_options_reach_the_head(tmp_path):
    from src.training.trainer import build_network
    cfg, _ = parse_train_args(["--network", "r18", "--width", "8", "--margin_type", "subcenter", "--subcenter_k",
                               "2", "--scale", "30", "--margin_grad", "straight", "--num_features", "16"])
    net = build_network(cfg, 7)
    assert net.head.weight.shape == (14, 16) and net.head.margin.arcface.straight and net.head.margin.s == 30.0
    cfg, _ = parse_train_args(["--network", "r18", "--width", "8", "--margin_type", "magface", "--magface_u_a", "90",
                               "--magface_easy_margin", "false"])
    margin = build_network(cfg, 7).head.margin
    assert (margin.u_a, margin.easy_margin, margin.lambda_g) == (90.0, False, 35.0)


@pytest.mark.parametrize("argv,message", [
    (["--adaface_m", "-0.1"], "--adaface_m must be at least 0"),
    (["--adaface_h", "-1"], "--adaface_h must be at least 0"),
    (["--subcenter_k", "0"], "--subcenter_k must be at least 1"),
    (["--magface_l_a", "110"], "--magface_l_a 110 must be below --magface_u_a 110"),
    (["--curricularface_m", "nan"], "--curricularface_m must be a finite number"),
    (["--magface_lambda_g", "inf"], "--magface_lambda_g must be a finite number"),
    (["--margin_type", "arcface2"], "--margin_type must be one of combined, adaface"),
])
def test_bad_margin_options_are_one_error_line(argv, message, capsys):
    import train
    from src.cli import run_main
    assert run_main(train.main, argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("name,hyper,message", [
    ("adaface", {"m": -0.5}, "adaface m must be at least 0"),
    ("adaface", {"h": float("nan")}, "adaface h must be a finite number"),
    ("subcenter", {"k": 0}, "subcenter k must be at least 1"),
    ("subcenter", {"k": 2.5}, "whole number"),
    ("magface", {"l_a": 50.0, "u_a": 20.0}, "magface l_a must be below u_a"),
    ("curricularface", {"h": 1.0}, "curricularface has no hyper-parameter 'h'"),
    ("combined", {"gradient": "smooth"}, "margin gradient must be one of exact, straight"),
    ("cosineface", {}, "unknown margin 'cosineface'"),
])
def test_build_margin_refuses_bad_values(name, hyper, message):
    with pytest.raises(ArcFaceError, match=message):
        build_margin(name, **hyper)
    check_hyper("magface", {"l_a": 1.0, "u_a": 2.0})  # a good one passes


@pytest.mark.slow
def test_training_with_a_margin_type_logs_records_and_saves_it(tiny_data, tmp_path):
    """train.py --margin_type curricularface: the start-of-run block names the margin and its hyper-parameters,
    config.yaml records them, and the checkpoint holds the running t, moved from its initial 0."""
    import yaml

    import train
    from src.checkpoint import read_checkpoint
    out = tmp_path / "run"
    assert train.main(["--data_url", str(tiny_data[0]), "--train_url", str(out), "--network", "r18", "--width", "8",
                       "--batch_size", "8", "--epochs", "1", "--lr", "0.8", "--scale", "16", "--num_workers", "1",
                       "--log_interval", "1", "--margin_type", "curricularface", "--curricularface_alpha", "0.5",
                       "--max_steps", "3"]) == 0
    log = (out / "train.log").read_text()
    assert "training r18 width 8: " in log
    assert "  loss       curricularface m 0.5 alpha 0.5, scale 16\n" in log
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["margin_type"] == "curricularface" and recorded["curricularface_alpha"] == 0.5
    params, _ = read_checkpoint(str(out / "ArcFace-1_3.ckpt"))
    t = float(params["head.margin.t"].asnumpy()[0])
    assert 0.0 < abs(t) < 1.0 and params["head.weight"].shape == (8, 512)
