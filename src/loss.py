"""Combined-margin softmax head: ArcFace, CosFace and plain normalised softmax in one cell.

For the target class the logit is s * (cos(m1 * theta + m2) - m3), for the others s * cos(theta),
where cos(theta) is the cosine between the embedding and the class centre. ArcFace is (1, 0.5, 0),
CosFace (1, 0, 0.4). The whole head runs in float32 whatever the backbone's precision, and
cos(theta) is clamped strictly inside (-1, 1) before arccos so that neither the value nor the
gradient of arccos can become infinite (the model zoo does not clamp).
"""
import math

import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import initializer, Normal

# Keeps arccos' derivative -1/sqrt(1-x^2) finite; 1 - 1e-7 is still representable in float32.
COS_CLAMP = 1.0 - 1e-7


def l2_normalize(x, axis=-1, eps=1e-12):
    """x / ||x||. Written out because ops.L2Normalize's backward is very slow on CPU."""
    return x / ops.sqrt(ops.sum(x * x, dim=axis, keepdim=True) + eps)


class CombinedMarginHead(nn.Cell):
    """Class centres (num_classes, embedding_size) ~ N(0, 0.01) and the margin softmax loss.

    `construct(embeddings, labels)` returns the mean cross-entropy; `logits(...)` the scaled
    margin logits (useful for evaluation and tests).
    """

    def __init__(self, num_classes, embedding_size=512, s=64.0, m1=1.0, m2=0.5, m3=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.has_angular_margin = not (math.isclose(m1, 1.0) and math.isclose(m2, 0.0))
        self.weight = Parameter(initializer(Normal(sigma=0.01), (num_classes, embedding_size), ms.float32),
                                name="weight")

    def cosine(self, embeddings):
        emb = l2_normalize(ops.cast(embeddings, ms.float32))
        centres = l2_normalize(self.weight)
        return ops.clamp(ops.matmul(emb, centres.T), -COS_CLAMP, COS_CLAMP)

    def logits(self, embeddings, labels):
        return self._logits(embeddings, self._one_hot(labels))

    def _one_hot(self, labels):
        return ops.one_hot(labels, self.num_classes, ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32))

    def _logits(self, embeddings, one_hot):
        cos = self.cosine(embeddings)
        target_cos = ops.sum(cos * one_hot, dim=1, keepdim=True)
        if self.has_angular_margin:
            target = ops.cos(self.m1 * ops.acos(target_cos) + self.m2) - self.m3
        else:
            target = target_cos - self.m3
        # Replace the target column only; the gradient flows exactly through both branches.
        return self.s * (cos + one_hot * (target - target_cos))

    def construct(self, embeddings, labels):
        one_hot = self._one_hot(labels)
        return softmax_cross_entropy(self._logits(embeddings, one_hot), one_hot)


def softmax_cross_entropy(logits, one_hot):
    """Mean cross-entropy via log-sum-exp. nn.SoftmaxCrossEntropyWithLogits returns inf on CPU once
    the target probability underflows (a target logit ~90 below the others), which margins at s=64
    reach easily."""
    shifted = logits - ops.stop_gradient(ops.max(logits, axis=1, keepdims=True)[0])
    log_sum_exp = ops.log(ops.sum(ops.exp(shifted), dim=1))
    return ops.mean(log_sum_exp - ops.sum(shifted * one_hot, dim=1))
