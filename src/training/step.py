"""The one train-step cell: fp32 or fp16 with dynamic loss scaling, one rank or many, sampled
centres or not. It always returns (loss, overflow, loss scale) as device tensors.

Per step:
1. forward and backward of backbone + head, the backward started with sensitivity
   loss_scale x head.grad_scale (1 / world_size, see src.heads.classifier);
2. on several ranks the gradients of replicated parameters (the backbone) are summed over the
   ranks; the head's gradients stay on their rank (each holds other classes);
3. gradients are unscaled, and checked for NaN/Inf together with the loss and BatchNorm's moving
   statistics (all ranks agree);
4. a finite step is applied by the optimizer; a non-finite one is skipped (no parameter changes)
   and reported as `overflow`. With loss scaling the scale is lowered on overflow and raised after
   a run of good steps (nn.DynamicLossScaleUpdateCell). The optimizer's step counter advances on
   skipped steps too, so the learning rate always follows the iteration.

A non-finite loss (the forward pass overflowed, or BatchNorm's moving statistics are no longer
finite) or an overflow at loss scale 1 (always so in fp32) cannot be a scaling artefact: the
trainer stops there (the run diverged). Nothing is read back to the host here.
"""
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

LOSS_SCALE_INIT = 2.0 ** 16
LOSS_SCALE_WINDOW = 2000


class BackboneWithHead(nn.Cell):
    """images, labels -> loss."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def construct(self, images, labels):
        return self.head(self.backbone(images), labels)


_sum_over_ranks = ops.MultitypeFuncGraph("_sum_over_ranks")


@_sum_over_ranks.register("Function", "Bool", "Tensor")
def _sum_over_ranks_tensor(all_reduce, replicated, grad):
    return all_reduce(grad) if replicated else grad


_squared_norm = ops.MultitypeFuncGraph("_squared_norm")


@_squared_norm.register("Bool", "Tensor")
def _squared_norm_tensor(counted, grad):
    return ops.sum(ops.square(ops.cast(grad, ms.float32))) if counted else ops.zeros((), ms.float32)


_scale_where = ops.MultitypeFuncGraph("_scale_where")


@_scale_where.register("Tensor", "Bool", "Tensor")
def _scale_where_tensor(factor, scaled, grad):
    return grad * ops.cast(factor, grad.dtype) if scaled else grad


_accumulate = ops.MultitypeFuncGraph("_accumulate")


@_accumulate.register("Tensor", "Tensor")
def _accumulate_tensor(total, grad):
    return ops.assign_add(total, ops.cast(grad, total.dtype))


_take_sum = ops.MultitypeFuncGraph("_take_sum")


@_take_sum.register("Tensor")
def _take_sum_tensor(total):
    """The sum of the accumulated gradients; the buffer is emptied for the next window."""
    summed = total * 1.0
    return ops.depend(summed, ops.assign(total, ops.zeros_like(total)))


_summed = ops.MultitypeFuncGraph("_summed")


# From this size on a tensor is summed as a matrix-vector product: MindSpore's CPU ReduceSum took 30 ms
# for r50's 25088x512 fc gradient where a MatMul with a vector of ones takes about 1 ms (bench/README.md);
# NaN and Inf propagate through the products and sums alike.
_MATMUL_SUM_MIN = 1 << 16


@_summed.register("Tensor")
def _summed_tensor(x):
    x = ops.cast(x, ms.float32)
    if x.ndim >= 2 and x.size >= _MATMUL_SUM_MIN:
        rows = x.reshape(x.shape[0], -1)
        return ops.sum(ops.matmul(rows, ops.ones((rows.shape[1], 1), ms.float32)))
    return ops.sum(x)


_map = ops.HyperMap()


def shape_groups(tensors):
    """Indices of `tensors` (anything with .shape and .dtype) grouped for `all_finite`: float32 tensors
    of one shape together (in first-seen order), every other tensor alone."""
    groups, alone = {}, []
    for index, tensor in enumerate(tensors):
        if tensor.dtype == ms.float32:
            groups.setdefault(tuple(tensor.shape), []).append(index)
        else:
            alone.append((index,))
    return tuple(tuple(group) for group in groups.values()) + tuple(alone)


def all_finite(tensors, groups=None):
    """True when no element of `tensors` (a non-empty tuple) is NaN or Inf. A NaN or Inf anywhere
    makes that tensor's sum NaN or Inf; one sum per tensor takes ~70 ms for an r50's gradients on two
    CPU cores where ms.amp.all_finite's element-wise test takes ~400 ms (bench/step_overhead.py), and
    less with large tensors summed by MatMul (_MATMUL_SUM_MIN). A finite sum reaching Inf needs values
    near 1e38, i.e. a diverged run anyway.

    `groups` (from `shape_groups`, a constant): the tensors of a group are first added element-wise
    (one AddN) and the sum taken of that, so a step launches one AddN and one ReduceSum per shape
    instead of one ReduceSum per tensor: the kernel launches, not the arithmetic, are the cost of
    checking the many small tensors (BatchNorm's parameters and statistics). +Inf and -Inf at the
    same place of two tensors add up to NaN: still not finite. Groups hold float32 tensors only (an
    fp16 AddN could overflow where the tensors are finite). The train step does not group: the
    AddNs' outputs raised the r50 step's peak memory by ~250 MB for a gain below the step's noise."""
    if groups is None:
        sums = _map(_summed, tensors)
    else:
        sums = []
        for group in groups:
            if len(group) == 1:
                sums.append(_summed(tensors[group[0]]))
            else:
                sums.append(ops.sum(ops.addn([tensors[i] for i in group])))
    return ops.isfinite(ops.addn(sums) if len(sums) > 1 else sums[0])  # CPU AddN needs two inputs


_unscale = ops.MultitypeFuncGraph("_unscale")


@_unscale.register("Tensor", "Tensor")
def _unscale_tensor(scale, grad):
    return grad / ops.cast(scale, grad.dtype)


class _ScaledLoss(nn.Cell):
    """(images, labels, sens) -> (loss x sens, loss): what Gradients differentiates."""

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, images, labels, sens):
        loss = self.network(images, labels)
        return loss * sens, loss


class Gradients(nn.Cell):
    """(images, labels, sens) -> (loss, gradients of `weights`): the backward pass starts with
    sens x head.grad_scale; on several ranks the gradients of replicated (backbone) parameters are
    summed over the ranks while the head's stay local. With sens 1 the result is the exact gradient
    of the global mean loss on every rank. The forward pass runs once (value and gradient together),
    so running statistics updated in it (BatchNorm's, the margin's) advance once per step in
    pynative mode too."""

    def __init__(self, network, weights):
        super().__init__(auto_prefix=False)
        head = network.head
        self.network = network
        self.weights = weights
        self.scaled_loss = _ScaledLoss(network)
        self.value_and_grad = ms.value_and_grad(self.scaled_loss, None, weights, has_aux=True)
        self.grad_scale = float(head.grad_scale)
        self.distributed = head.world_size > 1
        head_names = {p.name for p in head.get_parameters()}
        self.replicated = tuple(p.name not in head_names for p in weights)
        # One fusion group: the graph compiler merges the per-tensor sums into few collectives
        # (as nn.DistributedGradReducer does) instead of one per parameter.
        self.all_reduce = ops.AllReduce().add_prim_attr("fusion", 1) if self.distributed else None
        self.hyper_map = ops.HyperMap()

    def construct(self, images, labels, sens):
        (_, loss), grads = self.value_and_grad(images, labels, sens * self.grad_scale)
        if self.distributed:
            grads = self.hyper_map(ops.partial(_sum_over_ranks, self.all_reduce), self.replicated, grads)
        return loss, grads


class TrainStep(nn.Cell):
    """One optimizer step of `network` (a BackboneWithHead). `fp16` adds dynamic loss scaling;
    `clip_norm` > 0 clips the backbone's gradient to that global norm (after unscaling, before the
    update; the head is not clipped, as in arcface_torch); `accumulate` = k applies the sum of the
    gradients of k micro-batches every k-th call, clipped as a whole, as arcface_torch does (a
    non-finite micro-batch adds nothing to it). `scale_window`: good steps before the loss scale
    doubles (PyTorch's GradScaler: growth_interval, 100 in arcface_torch).
    Parameter names are the network's and the optimizer's (auto_prefix off, as nn.TrainOneStepCell),
    so checkpoints hold `backbone.*`, `head.weight`, `accum.*`, `global_step`, `scale_sense`."""

    def __init__(self, network, optimizer, fp16=False, clip_norm=0.0, accumulate=1, loss_scale=LOSS_SCALE_INIT,
                 scale_window=LOSS_SCALE_WINDOW):
        super().__init__(auto_prefix=False)
        self.network = network
        self.network.set_grad()
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.gradients = Gradients(network, self.weights)
        # Updated by the forward pass, not by the optimizer (BatchNorm's moving mean/variance): a
        # diverging run can make them Inf while every gradient is still finite.
        self.statistics = ms.ParameterTuple(p for p in network.get_parameters()
                                            if not p.requires_grad and p.dtype in (ms.float32, ms.float16))
        self.distributed = network.head.world_size > 1
        self.all_reduce = ops.AllReduce() if self.distributed else None
        self.hyper_map = ops.HyperMap()
        self.loss_scaling = bool(fp16)
        if self.loss_scaling:
            self.scale_manager = nn.DynamicLossScaleUpdateCell(loss_scale_value=loss_scale, scale_factor=2,
                                                               scale_window=scale_window)
            self.scale_sense = Parameter(Tensor(loss_scale, ms.float32), name="scale_sense")
        else:
            # A constant, not a parameter: fp32 checkpoints carry no loss scale, so a run resumed in
            # fp16 starts from the initial scale.
            self.scale_manager = None
            self.scale_sense = Tensor(1.0, ms.float32)
        self.clip_norm = float(clip_norm)
        self.backbone_flags = self.gradients.replicated  # the head's gradient is not clipped
        self.accumulate = int(accumulate)
        if self.accumulate > 1:
            self.accumulated = self.weights.clone(prefix="grad_acc", init="zeros")
            self.micro_step = Parameter(Tensor(0, ms.int32), name="micro_step")
        self.one = Tensor([1], ms.int32)

    def clip(self, grads):
        """torch.nn.utils.clip_grad_norm_ on the backbone's gradients: scaled by max_norm / (norm + 1e-6)
        when that is below 1."""
        norm = ops.sqrt(ops.addn(self.hyper_map(_squared_norm, self.backbone_flags, grads)))
        factor = ops.minimum(self.clip_norm / (norm + 1e-6), 1.0)
        return self.hyper_map(ops.partial(_scale_where, factor), self.backbone_flags, grads)

    def apply(self, grads):
        if self.clip_norm > 0:
            grads = self.clip(grads)
        return self.optimizer(grads)

    def construct(self, images, labels):
        scale = self.scale_sense
        loss, grads = self.gradients(images, labels, ops.cast(scale, ms.float32))
        if self.loss_scaling:
            grads = self.hyper_map(ops.partial(_unscale, scale), grads)
        # Non-finite moving statistics cannot recover (they average themselves): report such a step
        # with a NaN loss, which the trainer treats as divergence whatever the loss scale.
        if self.statistics:
            loss = ops.select(all_finite(self.statistics), loss, ops.full_like(loss, float("nan")))
        finite = ops.logical_and(all_finite(grads), ops.isfinite(loss))
        bad = ops.cast(ops.logical_not(finite), ms.float32)
        if self.distributed:
            bad = self.all_reduce(bad)  # the head's gradients differ per rank: agree on skipping
        overflow = bad > 0
        if self.loss_scaling:
            overflow = self.scale_manager(self.scale_sense, overflow)
        if self.accumulate > 1:
            if not overflow:
                loss = ops.depend(loss, self.hyper_map(_accumulate, self.accumulated, grads))
            count = ops.assign_add(self.micro_step, Tensor(1, ms.int32))
            if count % self.accumulate == 0:
                summed = self.hyper_map(_take_sum, self.accumulated)
                loss = ops.depend(loss, self.apply(summed))
            else:
                loss = ops.depend(loss, ops.assign_add(self.optimizer.global_step, self.one))
        elif overflow:
            loss = ops.depend(loss, ops.assign_add(self.optimizer.global_step, self.one))
        else:
            loss = ops.depend(loss, self.apply(grads))
        return loss, overflow, scale
