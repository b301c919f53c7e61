"""The optimizer of a run: SGD with momentum (model zoo, arcface_torch's CNN recipes; the weight decay
inside the update kernel) or AdamW (arcface_torch's ViT recipes), and which parameters it decays.

Both evaluate the learning-rate schedule (src.training.lr_schedule) at their own `global_step`,
which the train step advances every iteration.
"""
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8


def parameter_groups(net, weight_decay, decay_batchnorm=False):
    """Weight decay on every trainable parameter; BatchNorm's gamma/beta excluded unless
    `decay_batchnorm` (arcface_torch decays everything)."""
    params = net.trainable_params()
    if decay_batchnorm:
        return [{"params": params, "weight_decay": weight_decay}]
    bn_ids = set()
    for _, cell in net.cells_and_names():
        if isinstance(cell, (nn.BatchNorm1d, nn.BatchNorm2d)):
            bn_ids.update(id(p) for p in cell.get_parameters())
    decay = [p for p in params if id(p) not in bn_ids]
    no_decay = [p for p in params if id(p) in bn_ids]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


_adamw_update = ops.MultitypeFuncGraph("_adamw_update")


@_adamw_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Number", "Tensor", "Tensor", "Tensor", "Tensor")
def _adamw_update_tensor(lr, step_size, bias2_sqrt, eps, weight_decay, param, m, v, grad):
    grad = ops.cast(grad, ms.float32)
    m = ops.assign(m, ADAMW_BETAS[0] * m + (1.0 - ADAMW_BETAS[0]) * grad)
    v = ops.assign(v, ADAMW_BETAS[1] * v + (1.0 - ADAMW_BETAS[1]) * grad * grad)
    decayed = param * (1.0 - lr * weight_decay)
    return ops.assign(param, decayed - step_size * m / (ops.sqrt(v) / bias2_sqrt + eps))


class AdamW(nn.Optimizer):
    """PyTorch's AdamW: decoupled weight decay (p <- p (1 - lr wd)) and bias-corrected moments, betas
    (0.9, 0.999), eps 1e-8, with nn.Optimizer's dynamic learning rate.

    nn.AdamWeightDecay has no bias correction, which makes its first ~1000 updates about 3x larger
    than arcface_torch's; the mint/experimental AdamW set the rate from the host every step."""

    def __init__(self, groups, learning_rate):
        # The decay of each parameter, in the order nn.Optimizer lays the groups out; applied here
        # (decoupled), not by nn.Optimizer (which would add it to the gradient).
        self.decays = tuple(float(group.get("weight_decay", 0.0)) for group in groups for _ in group["params"])
        super().__init__(learning_rate, [{"params": group["params"]} for group in groups])
        self.moment1 = self.parameters.clone(prefix="adam_m", init="zeros")
        self.moment2 = self.parameters.clone(prefix="adam_v", init="zeros")
        # Bias correction counts the updates applied (not the iterations, which global_step counts).
        self.updates = Parameter(Tensor(0, ms.float32), name="adam_updates")
        self.eps = Tensor(ADAMW_EPS, ms.float32)
        self.hyper_map = ops.HyperMap()

    def construct(self, gradients):
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        t = ops.assign_add(self.updates, Tensor(1.0, ms.float32))
        bias1 = 1.0 - ops.pow(Tensor(ADAMW_BETAS[0], ms.float32), t)
        bias2_sqrt = ops.sqrt(1.0 - ops.pow(Tensor(ADAMW_BETAS[1], ms.float32), t))
        step_size = lr / bias1
        return self.hyper_map(ops.partial(_adamw_update, lr, step_size, bias2_sqrt, self.eps), self.decays,
                              self.parameters, self.moment1, self.moment2, gradients)


class SGD(nn.SGD):
    """nn.SGD (the same state: `accum.*`, `stat.*`, `momentum`, `global_step`, so checkpoints load
    either way) whose weight decay is applied inside MindSpore's SGD kernel (its `weight_decay`
    attribute: gradient + weight_decay x weight, then momentum and the update) instead of by a Mul
    and an AddN per decayed parameter before it: two passes over every weight and ~2 x (number of
    parameters) kernel launches fewer per step, the same update (to float32 rounding)."""

    def __init__(self, groups, learning_rate, momentum):
        super().__init__(groups, learning_rate=learning_rate, momentum=momentum)
        if self.is_group:
            decays = [float(wd) for wd in self.group_weight_decay]
        else:
            decays = [float(self.weight_decay.asnumpy()) if flag else 0.0 for flag in self.decay_flags]
        self.opt = tuple(ops.SGD(self.dampening, decay, self.nesterov) for decay in decays)
        self.exec_weight_decay = False  # nn.Optimizer.decay_weight leaves the gradients alone


def build_optimizer(cfg, net, lr_schedule):
    """The optimizer the config names; it evaluates `lr_schedule` (an LRSchedule) at its own step counter."""
    groups = parameter_groups(net, cfg.weight_decay, cfg.weight_decay_bn)
    lr = lr_schedule.cell()
    if cfg.optimizer == "adamw":
        return AdamW(groups, lr)
    return SGD(groups, learning_rate=lr, momentum=cfg.momentum)
