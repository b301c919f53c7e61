"""Margins: what turns the cosines between embeddings and class centres into the logits of the
softmax cross-entropy. One interface, several values:

    margin = build_margin(name, **hyper)
    logits = margin(cos, one_hot, norms)        # scaled logits (N, C)
    loss = cross_entropy(logits) + margin.loss_term(norms)

- `cos` (N, C x K) float32: cosines between the normalised embeddings of the global batch and this
  rank's (sampled) normalised centres, clamped inside (-1, 1); K = `margin.centres_per_class`
  consecutive centres per class (1 except for sub-center ArcFace);
- `one_hot` (N, C) float32: 1 at a row's class; an all-zero row has its class on another rank (or,
  never with Partial FC's sampling, not sampled): such a row's target logit is that rank's work;
- `norms` (N, 1) float32: the embeddings' L2 norms before normalisation (with their gradient).

Running statistics (AdaFace's norm mean/std, CurricularFace's t) are Parameters of the margin, so
they are saved and restored with the checkpoint; they are computed from the global batch (all
ranks' rows, or a cross-rank sum of the target cosines), so they are identical on every rank. The
head calls `set_world_size` once; margins that need a cross-rank sum use `sum_over_ranks`.

The values of `name`, with their hyper-parameters named as the official code names them:
- `combined` (s, m1, m2, m3, gradient, interclass_filtering_threshold): target s (cos(m1 theta + m2)
  - m3), others s cos; ArcFace (1, 0.5, 0), CosFace (1, 0, 0.4). insightface's original combined
  margin: all three margins at once (arcface_torch's CombinedMarginLoss keeps only m3 when m3 > 0).
- `adaface` (s, m, h, t_alpha, gradient): the margin adapts to the image quality, measured by the
  feature norm relative to its running mean/std (mk-minchul/AdaFace).
- `curricularface` (s, m, alpha): ArcFace on the target; hard negatives (cos above the target's
  cos(theta + m)) are raised to cos (t + cos), with t the running mean of the target cosine
  (HuangYG123/CurricularFace).
- `magface` (s, l_a, u_a, l_m, u_m, lambda_g, easy_margin): the angular margin grows linearly with the
  feature norm a, and lambda_g mean(a / u_a^2 + 1 / a) is added to the loss, so the norm becomes a
  quality score (IrvingMeng/MagFace).
- `subcenter` (s, m, k, gradient): K centres per class; a class's cosine is the largest of its K,
  then ArcFace (insightface's sub-center ArcFace, for noisy labels; see src.subcenter_drop).

Two gradients of the same value for the ArcFace-like margins (`gradient`):
- `exact` (the MindSpore model zoo, AdaFace's head.py): the gradient flows through arccos and the
  margin, which multiplies the target's gradient by m1 sin(m1 theta + m2) / sin(theta) for ArcFace;
- `straight` (insightface arcface_torch, AdaFace's Partial FC form in CVLface): the margin is a
  constant shift of the target logit, d loss / d cos = s (p - onehot) at the margin-shifted
  probabilities. The exact factor turns negative for theta > pi - m2, pushing a very hard or
  mislabelled sample further from its own centre; the straight-through gradient never does.

Clamps let NaN through (a comparison with NaN is false), so non-finite weights give a non-finite
loss that the train step detects; `ops.clamp` would map NaN to a finite bound and hide a diverged run.
"""
import inspect
import math

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from src.errors import ArcFaceError

# Keeps arccos' derivative -1/sqrt(1-x^2) finite; 1 - 1e-7 is still representable in float32.
COS_CLAMP = 1.0 - 1e-7
MARGIN_GRADIENTS = ("exact", "straight")


def l2_normalize(x, axis=-1, eps=1e-12):
    """x / ||x||. Written out because ops.L2Normalize's backward is very slow on CPU."""
    return x / ops.sqrt(ops.sum(x * x, dim=axis, keepdim=True) + eps)


def clamp_between(x, low, high):
    """Clamp into [low, high], keeping NaN as NaN."""
    x = ops.where(x > high, ops.full_like(x, high), x)
    return ops.where(x < low, ops.full_like(x, low), x)


def clamp_cosine(cos):
    """Clamp into [-COS_CLAMP, COS_CLAMP], keeping NaN as NaN."""
    return clamp_between(cos, -COS_CLAMP, COS_CLAMP)


def _target(cos, one_hot):
    """Each row's target cosine (N, 1); 0 in a row whose class is elsewhere."""
    return ops.sum(cos * one_hot, dim=1, keepdim=True)


class Margin(nn.Cell):
    """The interface (see the module docstring). Subclasses implement construct(cos, one_hot, norms)."""

    centres_per_class = 1

    def __init__(self, s):
        super().__init__()
        self.s = float(s)
        self.world_size = 1
        self.all_reduce = None

    def set_world_size(self, world_size):
        """Called by the head: the number of ranks its classes are sharded over."""
        self.world_size = int(world_size)
        self.all_reduce = ops.AllReduce() if self.world_size > 1 else None

    def sum_over_ranks(self, x):
        """The sum of `x` over the ranks holding the head (x itself on one rank)."""
        if self.world_size > 1:
            return self.all_reduce(x)
        return x

    def loss_term(self, norms):
        """Added to the mean cross-entropy by the head: nothing, except for MagFace."""
        return ops.zeros((), ms.float32)


def _is_straight(gradient):
    if gradient not in MARGIN_GRADIENTS:
        raise ArcFaceError(f"margin gradient must be one of {', '.join(MARGIN_GRADIENTS)}, not {gradient!r}")
    return gradient == "straight"


class CombinedMargin(Margin):
    """s (cos(m1 theta + m2) - m3) for the target, s cos for the others.

    `interclass_filtering_threshold` > 0 zeroes the non-target cosines above the threshold in every
    row (arcface_torch's filter for data sets with conflicting labels; in a row whose class lives on
    another rank every cosine here is a non-target one), without gradient through the decision.
    """

    def __init__(self, s=64.0, m1=1.0, m2=0.5, m3=0.0, gradient="exact", interclass_filtering_threshold=0.0):
        super().__init__(s)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        self.angular = not (math.isclose(m1, 1.0) and math.isclose(m2, 0.0))
        self.straight = _is_straight(gradient)
        self.filter_threshold = float(interclass_filtering_threshold)

    def construct(self, cos, one_hot, norms=None):
        if self.filter_threshold > 0:
            dirty = ops.cast(cos > self.filter_threshold, ms.float32) * (1.0 - one_hot)
            cos = cos * ops.stop_gradient(1.0 - dirty)
        target_cos = _target(cos, one_hot)
        if self.angular:
            target = ops.cos(self.m1 * ops.acos(target_cos) + self.m2) - self.m3
        else:
            target = target_cos - self.m3
        shift = one_hot * (target - target_cos)
        if self.straight:
            shift = ops.stop_gradient(shift)
        return self.s * (cos + shift)


class AdaFaceMargin(Margin):
    """AdaFace. a = clip(norm, 0.001, 100), without gradient; the running mean and (unbiased) std of a
    over the global batch are updated first (EMA with t_alpha, initially 20 and 100), then
    z = clip(h (a - mean) / (std + 1e-3), -1, 1), and the target becomes
    cos(theta - m z) - (m + m z): a low-norm (hard, low-quality) image gets a smaller angular and a
    larger additive margin, a high-norm one the reverse.

    `exact` is AdaFace's head.py: every cosine clamped to [-1 + 1e-3, 1 - 1e-3], the target angle
    clipped to [1e-3, pi - 1e-3], gradient through the margin. `straight` is its Partial FC form
    (CVLface): no such clamps, the target shifted without gradient.
    """

    EPS = 1e-3

    def __init__(self, s=64.0, m=0.4, h=0.333, t_alpha=0.01, gradient="exact"):
        super().__init__(s)
        self.m, self.h, self.t_alpha = float(m), float(h), float(t_alpha)
        self.straight = _is_straight(gradient)
        self.batch_mean = Parameter(Tensor([20.0], ms.float32), name="batch_mean", requires_grad=False)
        self.batch_std = Parameter(Tensor([100.0], ms.float32), name="batch_std", requires_grad=False)

    def construct(self, cos, one_hot, norms):
        a = ops.stop_gradient(clamp_between(norms, 0.001, 100.0))
        n = a.shape[0]
        mean = ops.mean(a)
        std = ops.sqrt(ops.sum(ops.square(a - mean)) / max(n - 1, 1))  # unbiased as torch's (0, not NaN, for n 1)
        batch_mean = self.t_alpha * mean + (1.0 - self.t_alpha) * self.batch_mean
        batch_std = self.t_alpha * std + (1.0 - self.t_alpha) * self.batch_std
        updated = ops.depend(ops.assign(self.batch_mean, batch_mean), ops.assign(self.batch_std, batch_std))
        z = clamp_between(self.h * (a - batch_mean) / (batch_std + self.EPS), -1.0, 1.0)
        z = ops.depend(z, updated)
        if not self.straight:
            cos = clamp_between(cos, -1.0 + self.EPS, 1.0 - self.EPS)
        target_cos = _target(cos, one_hot)
        theta = ops.acos(target_cos) - self.m * z
        if not self.straight:
            theta = clamp_between(theta, self.EPS, math.pi - self.EPS)
        shift = one_hot * (ops.cos(theta) - self.m * (1.0 + z) - target_cos)
        if self.straight:
            shift = ops.stop_gradient(shift)
        return self.s * (cos + shift)


class CurricularFaceMargin(Margin):
    """CurricularFace. With c_m = cos(theta_y + m) of each row's target, the target becomes c_m where
    cos_y > cos(pi - m), else cos_y - m sin(pi - m); t <- alpha mean(cos_y) + (1 - alpha) t over the
    global batch (no gradient, initially 0, updated before use); a non-target cosine above c_m (a hard
    negative) becomes cos (t + cos), so hard negatives weigh more as training advances.

    A row's target cosine lives on one rank; the others need it for the hard-negative test and the
    mean: it is summed over the ranks (without gradient).
    """

    def __init__(self, s=64.0, m=0.5, alpha=0.01):
        super().__init__(s)
        self.m, self.alpha = float(m), float(alpha)
        self.cos_m, self.sin_m = math.cos(self.m), math.sin(self.m)
        self.threshold = math.cos(math.pi - self.m)
        self.mm = math.sin(math.pi - self.m) * self.m
        self.t = Parameter(Tensor([0.0], ms.float32), name="t", requires_grad=False)

    def construct(self, cos, one_hot, norms=None):
        target_cos = _target(cos, one_hot)
        every_target = ops.stop_gradient(self.sum_over_ranks(ops.stop_gradient(target_cos)))
        t = self.alpha * ops.mean(every_target) + (1.0 - self.alpha) * self.t
        t = ops.depend(t, ops.assign(self.t, t))
        target_m = target_cos * self.cos_m - ops.sqrt(1.0 - target_cos * target_cos) * self.sin_m
        target = ops.where(target_cos > self.threshold, target_m, target_cos - self.mm)
        every_m = every_target * self.cos_m - ops.sqrt(1.0 - every_target * every_target) * self.sin_m
        hard = ops.logical_and(cos > every_m, one_hot < 0.5)
        cos = ops.where(ops.stop_gradient(hard), cos * (t + cos), cos)
        return self.s * (cos + one_hot * (target - target_cos))


class MagFaceMargin(Margin):
    """MagFace. a = clip(norm, l_a, u_a) *with* its gradient, m(a) = (u_m - l_m) / (u_a - l_a) (a - l_a)
    + l_m; the target becomes cos(theta + m(a)) (with `easy_margin` only where cos_y > 0, else
    cos(theta + m) where cos_y > cos(pi - m), cos_y - m sin(pi - m) elsewhere); the loss gains
    lambda_g mean(a / u_a^2 + 1 / a), which rewards a larger norm for an image that can take the
    larger margin: the norm becomes a quality score."""

    def __init__(self, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, easy_margin=True):
        super().__init__(s)
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)
        self.easy_margin = bool(easy_margin)
        self.slope = (self.u_m - self.l_m) / (self.u_a - self.l_a)

    def clipped(self, norms):
        return clamp_between(norms, self.l_a, self.u_a)

    def construct(self, cos, one_hot, norms):
        m = self.slope * (self.clipped(norms) - self.l_a) + self.l_m
        target_cos = _target(cos, one_hot)
        target_m = target_cos * ops.cos(m) - ops.sqrt(1.0 - target_cos * target_cos) * ops.sin(m)
        if self.easy_margin:
            target = ops.where(target_cos > 0, target_m, target_cos)
        else:
            target = ops.where(target_cos > ops.cos(math.pi - m), target_m, target_cos - ops.sin(math.pi - m) * m)
        return self.s * (cos + one_hot * (target - target_cos))

    def loss_term(self, norms):
        a = self.clipped(norms)
        return self.lambda_g * ops.mean(a / (self.u_a * self.u_a) + 1.0 / a)


class SubCenterMargin(Margin):
    """Sub-center ArcFace: `k` centres per class (consecutive columns of `cos`); a class's cosine is
    the largest of its k (the gradient goes to that centre), then the ArcFace margin
    cos(theta + m). A clean sample gathers around one dominant centre of its class, noisy ones around
    the others: src.subcenter_drop removes them before retraining with plain ArcFace."""

    def __init__(self, s=64.0, m=0.5, k=3, gradient="exact"):
        super().__init__(s)
        self.m, self.k = float(m), int(k)
        self.centres_per_class = self.k
        self.arcface = CombinedMargin(s, 1.0, self.m, 0.0, gradient=gradient)

    def construct(self, cos, one_hot, norms=None):
        if self.k > 1:
            cos = ops.max(cos.reshape(cos.shape[0], -1, self.k), axis=2)[0]
        return self.arcface(cos, one_hot, norms)


MARGINS = {"combined": CombinedMargin, "adaface": AdaFaceMargin, "curricularface": CurricularFaceMargin,
           "magface": MagFaceMargin, "subcenter": SubCenterMargin}

# What each hyper-parameter must be: (lowest, whether the lowest is allowed, highest).
_BOUNDS = {"s": (0.0, False, None), "m1": (0.0, False, None), "m": (0.0, True, None), "h": (0.0, True, None),
           "t_alpha": (0.0, True, 1.0), "alpha": (0.0, True, 1.0), "l_a": (0.0, False, None),
           "u_a": (0.0, False, None), "l_m": (0.0, True, None), "u_m": (0.0, True, None),
           "lambda_g": (0.0, True, None), "k": (1, True, None), "interclass_filtering_threshold": (0.0, True, 1.0)}


def check_hyper(name, hyper):
    """ArcFaceError unless `hyper` are valid hyper-parameters of margin `name`: known names, finite
    numbers within their bounds, l_a < u_a and l_m <= u_m, a known gradient."""
    if name not in MARGINS:
        raise ArcFaceError(f"unknown margin {name!r}: one of {', '.join(MARGINS)}")
    known = [p for p in inspect.signature(MARGINS[name].__init__).parameters if p != "self"]
    for key, value in hyper.items():
        if key not in known:
            raise ArcFaceError(f"margin {name} has no hyper-parameter {key!r} (it has {', '.join(known)})")
        if key == "gradient":
            _is_straight(value)
            continue
        if key == "easy_margin":
            if not isinstance(value, bool):
                raise ArcFaceError(f"{name} easy_margin must be true or false, not {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ArcFaceError(f"{name} {key} must be a finite number, not {value!r}")
        if key == "k" and int(value) != value:
            raise ArcFaceError(f"{name} k must be a whole number of centres per class, not {value!r}")
        low, inclusive, high = _BOUNDS.get(key, (None, True, None))
        if low is not None and (value < low or (value == low and not inclusive)):
            raise ArcFaceError(f"{name} {key} must be {'at least' if inclusive else 'greater than'} {low:g}, "
                               f"not {value:g}")
        if high is not None and value > high:
            raise ArcFaceError(f"{name} {key} must be at most {high:g}, not {value:g}")
    defaults = {p.name: p.default for p in inspect.signature(MARGINS[name].__init__).parameters.values()}
    full = dict(defaults, **hyper)
    if name == "magface" and not full["l_a"] < full["u_a"]:
        raise ArcFaceError(f"magface l_a must be below u_a, not {full['l_a']:g} >= {full['u_a']:g}")
    if name == "magface" and not full["l_m"] <= full["u_m"]:
        raise ArcFaceError(f"magface l_m must not exceed u_m, not {full['l_m']:g} > {full['u_m']:g}")


def build_margin(name, **hyper):
    """The margin `name` ("combined", "adaface", "curricularface", "magface", "subcenter") with its
    hyper-parameters (the official names; defaults are the published values). Bad values are an
    ArcFaceError."""
    check_hyper(name, hyper)
    return MARGINS[name](**hyper)
