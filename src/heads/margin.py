"""The combined margin: a pure function of cosine logits, without parameters.

For the target class the logit is s * (cos(m1 * theta + m2) - m3), for the others s * cos(theta),
where cos(theta) is the cosine between an embedding and a class centre. ArcFace is (1, 0.5, 0),
CosFace (1, 0, 0.4), plain normalised softmax (1, 0, 0).

Two gradients of the same value:
- `exact` (the MindSpore model zoo): the gradient flows through arccos and the margin, which
  multiplies the target's gradient by m1 * sin(m1 * theta + m2) / sin(theta);
- `straight` (insightface arcface_torch): the margin is a constant shift of the target logit and
  d loss / d cos = s * (p - onehot), evaluated at the margin-shifted probabilities. The exact
  factor above turns negative for theta > pi - m2 (ArcFace), pushing a very hard or mislabelled
  sample further from its own centre; the straight-through gradient never does.

cos(theta) is clamped strictly inside (-1, 1) before arccos so that neither arccos nor its
derivative become infinite. The clamp lets NaN through (a comparison with NaN is false), so
non-finite weights give a non-finite loss that the train step detects; `ops.clamp` would map
NaN to a finite bound and hide a diverged run.
"""
import math

import mindspore as ms
from mindspore import nn, ops

# Keeps arccos' derivative -1/sqrt(1-x^2) finite; 1 - 1e-7 is still representable in float32.
COS_CLAMP = 1.0 - 1e-7
MARGIN_GRADIENTS = ("exact", "straight")


def l2_normalize(x, axis=-1, eps=1e-12):
    """x / ||x||. Written out because ops.L2Normalize's backward is very slow on CPU."""
    return x / ops.sqrt(ops.sum(x * x, dim=axis, keepdim=True) + eps)


def clamp_cosine(cos):
    """Clamp into [-COS_CLAMP, COS_CLAMP], keeping NaN as NaN."""
    cos = ops.where(cos > COS_CLAMP, ops.full_like(cos, COS_CLAMP), cos)
    return ops.where(cos < -COS_CLAMP, ops.full_like(cos, -COS_CLAMP), cos)


class CombinedMargin(nn.Cell):
    """(cos (N, C) float32, one_hot (N, C) float32) -> scaled margin logits (N, C).

    A row whose one-hot is all zero (its class lives on another rank, or was not sampled) gets
    s * cos everywhere. `interclass_filtering_threshold` > 0 zeroes, in rows that hold their
    target, the non-target cosines above the threshold (arcface_torch's filter for data sets with
    conflicting labels), without gradient through the decision.
    """

    def __init__(self, s=64.0, m1=1.0, m2=0.5, m3=0.0, gradient="exact", interclass_filtering_threshold=0.0):
        super().__init__()
        if gradient not in MARGIN_GRADIENTS:
            raise ValueError(f"margin gradient must be one of {MARGIN_GRADIENTS}, not {gradient!r}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.angular = not (math.isclose(m1, 1.0) and math.isclose(m2, 0.0))
        self.straight = gradient == "straight"
        self.filter_threshold = float(interclass_filtering_threshold)

    def construct(self, cos, one_hot):
        if self.filter_threshold > 0:
            has_target = ops.sum(one_hot, dim=1, keepdim=True)
            dirty = ops.cast(cos > self.filter_threshold, ms.float32) * (1.0 - one_hot) * has_target
            cos = cos * ops.stop_gradient(1.0 - dirty)
        target_cos = ops.sum(cos * one_hot, dim=1, keepdim=True)
        if self.angular:
            target = ops.cos(self.m1 * ops.acos(target_cos) + self.m2) - self.m3
        else:
            target = target_cos - self.m3
        shift = one_hot * (target - target_cos)
        if self.straight:
            shift = ops.stop_gradient(shift)
        return self.s * (cos + shift)
