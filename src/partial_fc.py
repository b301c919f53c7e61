"""Partial FC: the combined-margin softmax head with its class centres sharded over the ranks.

With millions of identities the (num_classes, embedding_size) weight, its gradient and its SGD
state no longer fit on one device, and replicating them on every rank (plain data parallelism)
wastes memory and bandwidth. Here rank r holds only the centres of the classes
[class_start, class_stop) (`class_range`: num_classes / world_size each, the remainder spread over
the first ranks).

Forward, on every rank:

1. the embeddings and labels of all ranks are all-gathered (global batch N = world_size x local);
2. cos(theta) between the normalised embeddings and the normalised *local* centres, clamped into
   [-1 + 1e-7, 1 - 1e-7] exactly as `CombinedMarginHead` does; the margin
   s * (cos(m1 * theta + m2) - m3) replaces the target column of the rows whose label is one of
   this rank's classes;
3. the softmax cross-entropy over *all* classes: the row maximum is taken over the ranks (an
   all-gather of the N row maxima, no gradient; CPU has no max all-reduce), and the sums of exp and
   the target logits are summed over the ranks with an all-reduce. The loss is the mean over the
   global batch, the same value on every rank.

Gradients. Each rank differentiates its own copy of the (identical) loss. MindSpore's adjoint of an
all-reduce (sum) is an all-reduce of the incoming gradient and the adjoint of the all-gather here is
a reduce-scatter (sum over ranks, each rank keeping its own rows), so the gradient every rank obtains
is that of the *sum* of the world_size identical losses. The backward pass is therefore started with
sensitivity 1 / world_size (`PartialFCHead.grad_scale`); then

- the gradient of the local centres is exactly d(loss)/d(local centres): it stays on its rank and
  never enters a data-parallel all-reduce;
- the gradient reaching each rank's local embeddings is the complete d(loss)/d(embeddings) of its
  own samples (every rank's contribution, summed by the reduce-scatter);
- so the backbone gradient on rank r is the part of d(loss)/d(theta) that flows through rank r's
  samples, and the full gradient is the all-reduce **SUM** over the ranks (not the mean: the
  1 / global_batch of the mean loss is already inside every per-sample gradient).

`PartialFCTrainStep` does exactly that, with explicit communication ops, whatever the auto-parallel
mode says (STAND_ALONE or the DATA_PARALLEL set by `runtime.setup`: no cell here consults it, so the
head's gradient is never averaged over the ranks). The backbone gradient equals that of a
single-process full `CombinedMarginHead` on the combined batch, hence equals plain data-parallel
training's gradient (mean over the global batch), and the same learning rate applies.

Class-centre sampling (`sample_rate` < 1): every step each rank keeps all the classes of its shard
that occur in the global batch plus random other classes of its shard, `num_sampled_centres` in all,
and computes logits on those rows only (a gather of weight rows; its gradient is scattered back
into a dense (local_classes, D) gradient whose unsampled rows are zero). Unsampled rows are still
updated by SGD from their momentum and weight decay (v <- momentum * v + wd * w; w <- w - lr * v),
exactly as a zero gradient would do in any SGD implementation. The loss is then the softmax
cross-entropy over the sampled centres of all ranks. Each rank draws its negatives from its own
random stream (seeded by seed and rank; it restarts from the seed when a run is resumed). With
sample_rate 1.0 no sampling happens at all: the head is the full softmax.

Checkpoints: every rank writes its shard (head weight plus its SGD slots, with its class range) to
`<checkpoint stem>.head-r<rank>of<world>.ckpt` next to rank 0's usual checkpoint (`HeadShardSaver`),
which then holds everything else (`main_checkpoint_entries`: backbone, its optimizer state, step).
No rank ever holds the full head. `load_partial_fc_train_state` resumes on any number of ranks from
any complete set of shards (each rank reads just the rows of its range), `merge_head_shards` /
`split_head` convert between the sharded and the full weight, and `export_merged_checkpoint` writes
a single-device checkpoint with the full head. The backbone is not sharded and loads as before.
"""
import glob
import math
import os
import re
import sys

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from src.callbacks import CheckpointSaver
from src.checkpoint import CKPT_PREFIX, checkpoint_name, read_checkpoint, save_checkpoint_atomic
from src.errors import ArcFaceError
from src.loss import COS_CLAMP, l2_normalize

HEAD_PARAM = "head.weight"  # name of the sharded weight inside BackboneWithHead / the train step
SHARD_META = ("class_start", "class_stop", "num_classes", "rank", "world_size")
SHARD_META_PREFIX = "pfc_"
_SHARD_RE = re.compile(r"\.head-r(\d+)of(\d+)\.ckpt$")
INIT_BLOCK = 4096  # class centres are drawn in blocks of this many rows, each from its own seed


# --- sharding arithmetic --------------------------------------------------------------------------

def class_range(num_classes, rank, world_size):
    """[start, stop) of the classes held by `rank`: num_classes // world_size each, one more for
    the first num_classes % world_size ranks."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ArcFaceError(f"rank {rank} is not in a world of {world_size}")
    if num_classes < world_size:
        raise ArcFaceError(f"Partial FC needs at least one class per rank: {num_classes} classes, "
                           f"{world_size} ranks")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def num_sampled_centres(local_classes, sample_rate, global_batch):
    """Centres one rank uses per step: ceil(sample_rate * local_classes), raised to
    min(local_classes, global_batch) when smaller, so that all positive classes always fit (the
    number has to be fixed for graph mode). sample_rate 1.0 means all of them."""
    if not 0.0 < sample_rate <= 1.0:
        raise ArcFaceError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if sample_rate >= 1.0:
        return local_classes
    wanted = math.ceil(sample_rate * local_classes)
    return min(local_classes, max(wanted, global_batch))


def init_centres(start, stop, embedding_size, seed=0, sigma=0.01):
    """N(0, sigma) rows [start, stop) of the full (num_classes, D) initial weight. Rows are drawn
    in fixed blocks of INIT_BLOCK classes, block b from seed (seed, b), so the initial full weight
    is the same whatever the number of ranks and each rank draws only about its own rows."""
    out = np.empty((stop - start, embedding_size), np.float32)
    for block in range(start // INIT_BLOCK, (stop - 1) // INIT_BLOCK + 1):
        rows = np.random.default_rng([seed, block]).standard_normal((INIT_BLOCK, embedding_size),
                                                                    dtype=np.float32)
        lo, hi = max(start, block * INIT_BLOCK), min(stop, (block + 1) * INIT_BLOCK)
        out[lo - start:hi - start] = rows[lo - block * INIT_BLOCK:hi - block * INIT_BLOCK] * np.float32(sigma)
    return out


def split_head(full_weight, rank, world_size):
    """Rows of `rank` of a full (num_classes, D) head weight (numpy array or Tensor)."""
    full = full_weight.asnumpy() if isinstance(full_weight, Tensor) else np.asarray(full_weight)
    start, stop = class_range(full.shape[0], rank, world_size)
    return full[start:stop].copy()


def communication_info():
    """(rank, world_size) of the initialised communication group, else (0, 1)."""
    try:
        from mindspore.communication import get_group_size, get_rank
        return get_rank(), get_group_size()
    except (RuntimeError, ValueError):
        return 0, 1


# --- the head -------------------------------------------------------------------------------------

class _AllGatherRows(nn.Cell):
    """All-gather along axis 0 whose backward is a reduce-scatter: the gradients of all ranks are
    summed and every rank keeps the rows of its own input. Uses ReduceScatter where the backend has
    it; CPU has no ReduceScatter kernel, so there it is an all-reduce and a slice."""

    def __init__(self, rank, world_size, use_reduce_scatter):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.use_reduce_scatter = use_reduce_scatter
        self.all_gather = ops.AllGather()
        self.all_reduce = ops.AllReduce()
        self.reduce_scatter = ops.ReduceScatter() if use_reduce_scatter else None

    def construct(self, x):
        return self.all_gather(x)

    def bprop(self, x, out, dout):
        if self.use_reduce_scatter:
            return (self.reduce_scatter(dout),)
        rows = x.shape[0]
        return (self.all_reduce(dout)[self.rank * rows:(self.rank + 1) * rows],)


class PartialFCHead(nn.Cell):
    """This rank's class centres `weight` (local_classes, D) and the margin softmax loss over all
    classes of all ranks. `construct(embeddings, labels)` takes the *local* batch and returns the
    mean loss over the global batch (identical on every rank). Start the backward pass with
    sensitivity `grad_scale` (= 1 / world_size) to get exact gradients; `PartialFCTrainStep` does.

    rank / world_size default to the initialised communication group (else 0 / 1: a plain full
    head, handy for tests and single-device use). The initial weight is N(0, 0.01), drawn with
    `init_centres(seed)`, i.e. independent of the number of ranks.
    """

    def __init__(self, num_classes, embedding_size=512, s=64.0, m1=1.0, m2=0.5, m3=0.0, sample_rate=1.0,
                 rank=None, world_size=None, seed=0):
        super().__init__()
        if rank is None or world_size is None:
            rank, world_size = communication_info()
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.class_start, self.class_stop = class_range(self.num_classes, self.rank, self.world_size)
        self.local_classes = self.class_stop - self.class_start
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.has_angular_margin = not (math.isclose(m1, 1.0) and math.isclose(m2, 0.0))
        self.min_sampled = num_sampled_centres(self.local_classes, sample_rate, 1)  # also validates it
        self.sample_rate = float(sample_rate)
        self.sampling = self.sample_rate < 1.0
        self.grad_scale = 1.0 / self.world_size
        self.weight = Parameter(Tensor(init_centres(self.class_start, self.class_stop, self.embedding_size, seed)),
                                name="weight")
        self.class_ids = Tensor(np.arange(self.local_classes, dtype=np.int32))
        self.distributed = self.world_size > 1
        if self.distributed:
            use_reduce_scatter = ms.get_context("device_target") != "CPU"
            self.gather_rows = _AllGatherRows(self.rank, self.world_size, use_reduce_scatter)
            self.all_gather = ops.AllGather()
            self.all_reduce = ops.AllReduce()
        # Per-rank random stream for the negatives; only used when sampling.
        self.uniform = ops.UniformReal(seed=int(seed) + 1, seed2=self.rank + 1)

    # -- pieces, each usable on its own (tests, inspection) --

    def gather_labels(self, labels):
        """Global labels (N,) int32 from the local ones: all ranks' batches in rank order."""
        labels = ops.stop_gradient(ops.cast(labels, ms.int32))
        if self.distributed:
            return self.all_gather(labels)
        return labels

    def gather_batch(self, embeddings, labels):
        """(global embeddings (N, D) float32, global labels (N,)) from the local batch."""
        embeddings = ops.cast(embeddings, ms.float32)
        if self.distributed:
            embeddings = self.gather_rows(embeddings)
        return embeddings, self.gather_labels(labels)

    def sample_centres(self, local_labels):
        """Indices (k,) of the local centres used this step: every local class present in the global
        batch plus random others; k = num_sampled_centres(...). `local_labels` are the global labels
        minus class_start (out-of-shard labels lie outside [0, local_classes))."""
        num = min(self.local_classes, max(self.min_sampled, local_labels.shape[0]))  # num_sampled_centres
        in_shard = ops.logical_and(local_labels >= 0, local_labels < self.local_classes)
        rows = ops.clamp(local_labels, 0, self.local_classes - 1).reshape(-1, 1)
        hits = ops.scatter_nd(rows, ops.cast(in_shard, ms.float32), (self.local_classes,))
        # Positives score >= 2, everything else is uniform in [0, 1): the top k keeps all positives.
        scores = self.uniform((self.local_classes,)) + 2.0 * ops.cast(hits > 0, ms.float32)
        _, index = ops.topk(scores, num)
        return ops.stop_gradient(index)

    def local_logits(self, embeddings, local_labels):
        """(scaled margin logits (N, k), one-hot (N, k)) on this rank's (sampled) centres."""
        if self.sampling:
            index = self.sample_centres(local_labels)
            centres = ops.gather(self.weight, index, 0)
        else:
            index = self.class_ids
            centres = self.weight
        one_hot = ops.cast(ops.equal(local_labels.reshape(-1, 1), index.reshape(1, -1)), ms.float32)
        cos = ops.clamp(ops.matmul(l2_normalize(embeddings), l2_normalize(centres).T), -COS_CLAMP, COS_CLAMP)
        # Zero for rows whose class lives on another rank; the margin term is masked out there.
        target_cos = ops.sum(cos * one_hot, dim=1, keepdim=True)
        if self.has_angular_margin:
            target = ops.cos(self.m1 * ops.acos(target_cos) + self.m2) - self.m3
        else:
            target = target_cos - self.m3
        return self.s * (cos + one_hot * (target - target_cos)), one_hot

    def cross_entropy(self, logits, one_hot):
        """Mean over the global batch of the softmax cross-entropy over all ranks' classes."""
        row_max = ops.max(ops.stop_gradient(logits), axis=1)[0]
        if self.distributed:
            row_max = ops.max(self.all_gather(row_max.reshape(1, -1)), axis=0)[0]
        shifted = logits - ops.stop_gradient(row_max).reshape(-1, 1)
        sum_exp = ops.sum(ops.exp(shifted), dim=1)
        target = ops.sum(shifted * one_hot, dim=1)
        if self.distributed:
            sum_exp = self.all_reduce(sum_exp)
            target = self.all_reduce(target)
        return ops.mean(ops.log(sum_exp) - target)

    def construct(self, embeddings, labels):
        embeddings, labels = self.gather_batch(embeddings, labels)
        logits, one_hot = self.local_logits(embeddings, labels - self.class_start)
        return self.cross_entropy(logits, one_hot)


class SampledCentres(nn.Cell):
    """Local labels -> (indices of the centres `head` samples for them, global labels), the
    sampling a training step does; for inspection and tests."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def construct(self, labels):
        global_labels = self.head.gather_labels(labels)
        return self.head.sample_centres(global_labels - self.head.class_start), global_labels


# --- training step --------------------------------------------------------------------------------

_reduce_grad = ops.MultitypeFuncGraph("_reduce_grad")


@_reduce_grad.register("Function", "Bool", "Tensor")
def _reduce_grad_tensor(all_reduce, replicated, grad):
    if replicated:
        return all_reduce(grad)
    return grad


_unscale = ops.MultitypeFuncGraph("_unscale")


@_unscale.register("Tensor", "Tensor")
def _unscale_tensor(scale, grad):
    return grad / ops.cast(scale, grad.dtype)


def head_parameter_names(head):
    return {p.name for p in head.get_parameters()}


class PartialFCGrads(nn.Cell):
    """(images, labels, sens) -> (loss, gradients of `weights`): the backward pass starts with
    sens * head.grad_scale, then the gradients of replicated (backbone) parameters are summed over
    the ranks while those of the head's shard stay local. With sens 1 the result is the exact
    gradient of the global mean loss."""

    def __init__(self, network, weights, head):
        super().__init__(auto_prefix=False)
        self.network = network
        self.weights = weights
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.grad_scale = head.grad_scale
        self.distributed = head.world_size > 1
        own = head_parameter_names(head)
        self.replicated = tuple(p.name not in own for p in weights)
        self.hyper_map = ops.HyperMap()
        self.all_reduce = ops.AllReduce() if self.distributed else None

    def construct(self, images, labels, sens):
        loss = self.network(images, labels)
        grads = self.grad(self.network, self.weights)(images, labels, sens * self.grad_scale)
        if self.distributed:
            grads = self.hyper_map(ops.partial(_reduce_grad, self.all_reduce), self.replicated, grads)
        return loss, grads


class PartialFCTrainStep(nn.Cell):
    """One SGD step of a backbone + `PartialFCHead` network. `network(images, labels)` returns the
    loss; `optimizer` holds the backbone and head parameters. Without `scale_sense` it returns the
    loss (fp32); with a `nn.DynamicLossScaleUpdateCell` it returns (loss, overflow, loss scale) like
    `nn.TrainOneStepWithLossScaleCell`, and a step overflowing on any rank is skipped on all ranks.
    Parameter names are the network's (auto_prefix off), as in nn.TrainOneStepCell."""

    def __init__(self, network, optimizer, head=None, scale_sense=None):
        super().__init__(auto_prefix=False)
        head = network.head if head is None else head
        if not isinstance(head, PartialFCHead):
            raise TypeError("PartialFCTrainStep needs a network with a PartialFCHead")
        self.network = network
        self.network.set_grad()
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grads = PartialFCGrads(network, self.weights, head)
        self.distributed = head.world_size > 1
        self.all_reduce = ops.AllReduce() if self.distributed else None
        self.loss_scaling_manager = None
        self.scale_sense = None
        if scale_sense is not None:
            self.loss_scaling_manager = scale_sense
            self.scale_sense = Parameter(Tensor(scale_sense.get_loss_scale(), ms.float32), name="scale_sense")
        self.hyper_map = ops.HyperMap()

    def construct(self, images, labels):
        if self.loss_scaling_manager is None:
            loss, grads = self.grads(images, labels, ops.ones((), ms.float32))
            return ops.depend(loss, self.optimizer(grads))
        scale = self.scale_sense
        loss, grads = self.grads(images, labels, ops.cast(scale, ms.float32))
        grads = self.hyper_map(ops.partial(_unscale, scale), grads)
        bad = ops.cast(ops.logical_not(ms.amp.all_finite(grads)), ms.float32)
        if self.distributed:
            bad = self.all_reduce(bad)  # the head's gradients differ per rank: agree on skipping
        overflow = self.loss_scaling_manager(self.scale_sense, bad > 0)
        if not overflow:
            loss = ops.depend(loss, self.optimizer(grads))
        return loss, overflow, scale


def build_partial_fc_train_step(net, optimizer, fp16=False):
    """The train-step cell for `net` (a BackboneWithHead whose head is a PartialFCHead), the drop-in
    counterpart of trainer.build_train_step's cells: fp16 adds the same dynamic loss scaling."""
    if fp16:
        scale = nn.DynamicLossScaleUpdateCell(loss_scale_value=2.0 ** 16, scale_factor=2, scale_window=2000)
        return PartialFCTrainStep(net, optimizer, scale_sense=scale)
    return PartialFCTrainStep(net, optimizer)


# --- checkpoints ----------------------------------------------------------------------------------

def shard_path(checkpoint_path, rank, world_size):
    """`ArcFace-3_100.ckpt` -> `ArcFace-3_100.head-r<rank>of<world_size>.ckpt` (same folder)."""
    stem = checkpoint_path[:-len(".ckpt")] if checkpoint_path.endswith(".ckpt") else checkpoint_path
    return f"{stem}.head-r{rank}of{world_size}.ckpt"


def find_head_shards(checkpoint_path):
    """{world_size: {rank: path}} of the shard files written next to `checkpoint_path`."""
    stem = checkpoint_path[:-len(".ckpt")] if checkpoint_path.endswith(".ckpt") else checkpoint_path
    found = {}
    for path in glob.glob(glob.escape(stem) + ".head-r*of*.ckpt"):
        match = _SHARD_RE.search(path)
        if match and path[:match.start()] == stem:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    return found


def has_complete_shards(checkpoint_path):
    """True when every rank of some world size wrote its head shard next to `checkpoint_path`."""
    return any(len(ranks) == world for world, ranks in find_head_shards(checkpoint_path).items())


def head_state_names(train_cell, head):
    """Names of the sharded state in `train_cell`: the head's weight and the optimizer slots of it
    (for nn.SGD `accum.head.weight` and `stat.head.weight`)."""
    own = head_parameter_names(head)
    return sorted(p.name for p in train_cell.get_parameters()
                  if p.name in own or any(p.name.endswith("." + name) for name in own))


def main_checkpoint_entries(train_cell, head):
    """What rank 0's usual checkpoint needs with Partial FC: every parameter of `train_cell` but the
    sharded head state (each rank's shard file holds that). A list of {"name", "data"} entries that
    refer to the live parameters, so it can be built once and handed to CheckpointSaver /
    VerificationMonitor in place of the cell (ms.save_checkpoint reads the values when saving)."""
    sharded = set(head_state_names(train_cell, head))
    return [{"name": p.name, "data": p} for p in train_cell.get_parameters() if p.name not in sharded]


def save_head_shard(train_cell, head, path, meta=None):
    """Write this rank's head state (weight + optimizer slots) and its class range to `path`."""
    params = {p.name: p for p in train_cell.get_parameters()}
    entries = [{"name": name, "data": params[name]} for name in head_state_names(train_cell, head)]
    info = {SHARD_META_PREFIX + key: getattr(head, key) for key in SHARD_META}
    info.update(meta or {})
    save_checkpoint_atomic(entries, path, info)


def _as_numpy(value):
    return value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)


def read_head_shard(source):
    """(arrays {name: ndarray}, info {class_start, class_stop, num_classes, rank, world_size}) of a
    shard file or of the dict ms.load_checkpoint returned for one."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ArcFaceError(f"head shard not found: {source}")
        try:
            source = ms.load_checkpoint(str(source))
        except (ValueError, RuntimeError, OSError) as exc:
            raise ArcFaceError(f"cannot read head shard: {str(exc).splitlines()[0]}") from None
    arrays, info = {}, {}
    for key, value in source.items():
        if key.startswith("meta_" + SHARD_META_PREFIX):
            info[key[len("meta_" + SHARD_META_PREFIX):]] = int(_as_numpy(value))
        elif not key.startswith("meta_"):
            arrays[key] = _as_numpy(value)
    missing = [key for key in SHARD_META if key not in info]
    if missing:
        raise ArcFaceError(f"not a Partial FC head shard (no {', '.join(missing)})")
    return arrays, info


def _complete(shards, what):
    """Check that the shards' class ranges tile [0, num_classes) exactly; return them sorted."""
    shards = sorted(shards, key=lambda shard: shard[1]["class_start"])
    if not shards:
        raise ArcFaceError(f"{what}: no head shards")
    num_classes = shards[0][1]["num_classes"]
    expected = 0
    for _, info in shards:
        if info["num_classes"] != num_classes or info["class_start"] != expected:
            raise ArcFaceError(f"{what}: head shards do not tile the {num_classes} classes (gap or overlap "
                               f"at class {expected}; shards of different runs or a missing rank?)")
        expected = info["class_stop"]
    if expected != num_classes:
        raise ArcFaceError(f"{what}: head shards cover classes [0, {expected}) of {num_classes}")
    return shards


def merge_head_shards(sources, name=HEAD_PARAM):
    """Full (num_classes, D) array of `name` (the head weight, or an optimizer slot such as
    `accum.head.weight`) from the shards of all ranks: paths or ms.load_checkpoint dicts, any order."""
    shards = _complete([read_head_shard(source) for source in sources], "merge_head_shards")
    for arrays, info in shards:
        if name not in arrays:
            raise ArcFaceError(f"head shard of rank {info['rank']} has no {name}")
    return np.concatenate([arrays[name] for arrays, _ in shards], axis=0)


def load_head_shard(train_cell, head, checkpoint_path):
    """Load this rank's rows of the head state from the shard files of `checkpoint_path`. Shards of
    any world size can be read (each rank takes the rows of its own range), so a run can also be
    resumed on another number of ranks."""
    sets = find_head_shards(checkpoint_path)
    complete = {world: ranks for world, ranks in sets.items() if len(ranks) == world}
    if not complete:
        raise ArcFaceError(f"no complete set of Partial FC head shards next to {checkpoint_path} "
                           f"(expected {os.path.basename(shard_path(checkpoint_path, 0, head.world_size))} ...)")
    world = head.world_size if head.world_size in complete else max(complete)
    params = {p.name: p for p in train_cell.get_parameters()}
    names = head_state_names(train_cell, head)
    rows = {name: [] for name in names}
    infos = []
    for rank in range(world):
        start, stop = class_range(head.num_classes, rank, world)
        if stop <= head.class_start or start >= head.class_stop:
            continue
        arrays, info = read_head_shard(complete[world][rank])
        if info["num_classes"] != head.num_classes or (info["class_start"], info["class_stop"]) != (start, stop):
            raise ArcFaceError(f"{complete[world][rank]}: classes [{info['class_start']}, {info['class_stop']}) "
                               f"of {info['num_classes']}, expected [{start}, {stop}) of {head.num_classes} "
                               f"(another --num_classes?)")
        lo, hi = max(start, head.class_start) - start, min(stop, head.class_stop) - start
        for name in names:
            if name not in arrays:
                raise ArcFaceError(f"{complete[world][rank]} has no {name} (another optimizer?)")
            rows[name].append(arrays[name][lo:hi])
        infos.append(info)
    for name in names:
        value = np.concatenate(rows[name], axis=0)
        if value.shape != tuple(params[name].shape):
            raise ArcFaceError(f"head shards give {name} the shape {value.shape}, this model has "
                               f"{tuple(params[name].shape)} (another --num_features?)")
        params[name].set_data(Tensor(value, params[name].dtype))
    return world


def load_partial_fc_train_state(train_cell, head, path):
    """--resume for Partial FC: backbone, optimizer and step from rank 0's checkpoint `path` (a copy
    of rank 0's head state in it, as when the whole cell was saved, is ignored), this rank's head
    state from the shard files next to it, whatever world size wrote them. Returns the meta dict,
    like checkpoint.load_train_state."""
    from src.checkpoint import NOT_RESTORED
    params, meta = read_checkpoint(path)
    if "global_step" not in meta:
        raise ArcFaceError(f"{path} is not a training checkpoint of this project (no global_step)")
    sharded = set(head_state_names(train_cell, head))
    params = {k: v for k, v in params.items() if k not in sharded and not k.endswith(NOT_RESTORED)}
    for param in train_cell.get_parameters():
        if param.name in params and tuple(params[param.name].shape) != tuple(param.shape):
            raise ArcFaceError(f"checkpoint {path} does not fit this model: {param.name} has shape "
                               f"{tuple(params[param.name].shape)} there and {tuple(param.shape)} here")
    missing = [p.name for p in train_cell.get_parameters()
               if p.name not in params and p.name not in sharded and not p.name.endswith(NOT_RESTORED)]
    if missing:
        raise ArcFaceError(f"checkpoint {path} lacks {len(missing)} parameter(s) of this model, e.g. {missing[0]}")
    ms.load_param_into_net(train_cell, params)
    load_head_shard(train_cell, head, path)
    return meta


def export_merged_checkpoint(checkpoint_path, out_path):
    """A single-device checkpoint from a Partial FC one: everything of `checkpoint_path` with the
    sharded entries replaced by their merged (num_classes, D) arrays. It loads like any checkpoint
    of a plain (CombinedMarginHead) run: evaluation, export, --ckpt_url, even --resume on one
    device. Returns the number of classes."""
    params, meta = read_checkpoint(checkpoint_path)
    sets = find_head_shards(checkpoint_path)
    complete = [ranks for world, ranks in sorted(sets.items()) if len(ranks) == world]
    if not complete:
        raise ArcFaceError(f"no complete set of Partial FC head shards next to {checkpoint_path}")
    shards = [ms.load_checkpoint(path) for _, path in sorted(complete[-1].items())]
    names = sorted(read_head_shard(shards[0])[0])
    entries = [{"name": key, "data": value} for key, value in params.items() if key not in names]
    for name in names:
        entries.append({"name": name, "data": Tensor(merge_head_shards(shards, name))})
    save_checkpoint_atomic(entries, out_path, meta)
    return read_head_shard(shards[0])[1]["num_classes"]


class HeadShardSaver(CheckpointSaver):
    """Run on *every* rank next to rank 0's CheckpointSaver (same interval and keep): writes this
    rank's head shard for each checkpoint, `ArcFace-<epoch>_<step>.head-r<rank>of<world>.ckpt`,
    and keeps the newest `keep` of its own shards."""

    def __init__(self, cell, head, directory, interval=0, keep=5):  # pylint: disable=super-init-not-called
        self.cell, self.head, self.directory, self.interval, self.keep = cell, head, directory, interval, keep
        self.last_saved_step = None
        os.makedirs(directory, exist_ok=True)

    def save(self, s):
        if self.last_saved_step == s.global_step:
            return
        main = os.path.join(self.directory, checkpoint_name(s.epoch, s.step_in_epoch))
        path = shard_path(main, self.head.rank, self.head.world_size)
        save_head_shard(self.cell, self.head, path, {"epoch": s.epoch, "step_in_epoch": s.step_in_epoch,
                                                     "global_step": s.global_step})
        self.last_saved_step = s.global_step
        suffix = f".head-r{self.head.rank}of{self.head.world_size}.ckpt"
        own = []
        for other in glob.glob(os.path.join(glob.escape(self.directory), f"{CKPT_PREFIX}-*{suffix}")):
            match = re.match(rf"^{CKPT_PREFIX}-(\d+)_(\d+)" + re.escape(suffix) + "$", os.path.basename(other))
            if match:
                own.append((int(match.group(1)), int(match.group(2)), other))
        for _, _, old in sorted(own)[:-self.keep]:
            try:
                os.remove(old)
            except FileNotFoundError:  # rank 0 removed it with its main checkpoint
                pass


def main(argv=None):
    """`python -m src.partial_fc --merge CKPT --output OUT`: one single-device checkpoint."""
    import argparse
    parser = argparse.ArgumentParser(description="Merge the head shards written next to a Partial FC checkpoint "
                                                 "into a single-device checkpoint (whole head).")
    parser.add_argument("--merge", required=True, help="rank 0's checkpoint, e.g. train_parallel/ArcFace-25_1421.ckpt")
    parser.add_argument("--output", required=True, help="checkpoint file to write")
    args = parser.parse_args(argv)
    classes = export_merged_checkpoint(args.merge, args.output)
    print(f"wrote {args.output} with the whole head ({classes} classes)")
    return 0


if __name__ == "__main__":
    from src.cli import run_main
    sys.exit(run_main(main))
