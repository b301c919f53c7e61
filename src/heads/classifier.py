"""The classification head: class centres sharded over the ranks (Partial FC), optional sampling of
centres, and the softmax cross-entropy over all ranks' classes. On one rank, without sampling, it
is the plain full-softmax margin head.

Rank r holds the centres of its classes [class_start, class_stop) (`sharding.class_range`). Forward,
on every rank:

1. the embeddings and labels of all ranks are all-gathered (global batch N = world_size x local);
2. the embeddings' norms, cos(theta) between the normalised embeddings and the normalised local
   (sampled) centres, then the margin (src.heads.margin: any value of its interface) turns them
   into logits; the target column of a row is on the rank holding its class;
3. the softmax cross-entropy over all classes: the row maximum is taken over the ranks (all-gather
   of the N row maxima, no gradient; CPU has no max all-reduce), the sums of exp and the target
   logits are summed over the ranks with an all-reduce. The loss is the mean over the global
   batch plus the margin's own term (MagFace's regulariser), the same value on every rank.

K centres per class (`margin.centres_per_class`, sub-center ArcFace): the weight has K rows per
class, class c's at rows c K .. c K + K - 1, so sharding by class, sampling and the shard files
move a class's K centres together; `num_classes` and the class ranges always count classes.

Gradients. Each rank differentiates its own copy of the (identical) loss. The adjoint of an
all-reduce (sum) is an all-reduce of the incoming gradient and the adjoint of the all-gather here is
a reduce-scatter, so every rank obtains the gradient of the *sum* of the world_size identical losses.
The backward pass therefore starts with sensitivity `grad_scale` = 1 / world_size; then the
gradient of the local centres is exactly d loss / d centres and stays on its rank, and the backbone
gradient on rank r is the part flowing through rank r's samples: the full backbone gradient is the
all-reduce SUM over the ranks (src.training.step does both). It equals the gradient of plain data
parallelism (mean over the global batch).

Sampling (`sample_rate` < 1): every step each rank keeps all its classes present in the global batch
plus random others, `num_sampled_centres` classes in all, and computes logits on their centres only. Unsampled
rows get a zero gradient (SGD still applies momentum and weight decay to them, as any SGD does with
a zero gradient). Each rank draws its negatives from its own random stream (seed, rank).

Head state on disk (`save_state` / `load_state`): see src.heads.sharding.
"""
import os

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from src.checkpoint import read_checkpoint, save_checkpoint_atomic
from src.errors import ArcFaceError
from src.heads import sharding
from src.heads.margin import CombinedMargin, clamp_cosine, l2_normalize


def communication_info():
    """(rank, world_size) of the initialised communication group, else (0, 1)."""
    try:
        from mindspore.communication import get_group_size, get_rank
        return get_rank(), get_group_size()
    except (RuntimeError, ValueError):
        return 0, 1


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


class PartialFC(nn.Cell):
    """This rank's class centres `weight` (local_classes x K, D) and the margin softmax loss over all
    classes of all ranks. `construct(embeddings, labels)` takes the local batch and returns the mean
    loss over the global batch (identical on every rank); start its backward pass with `grad_scale`.

    rank / world_size default to the initialised communication group (else 0 / 1: the full head).
    The initial weight is N(0, 0.01), drawn by `sharding.init_centres(seed)`, i.e. the same full
    weight whatever the number of ranks.
    """

    def __init__(self, num_classes, embedding_size=512, margin=None, sample_rate=1.0, rank=None, world_size=None,
                 seed=0):
        super().__init__()
        if rank is None or world_size is None:
            rank, world_size = communication_info()
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.class_start, self.class_stop = sharding.class_range(self.num_classes, self.rank, self.world_size)
        self.local_classes = self.class_stop - self.class_start
        self.margin = margin if margin is not None else CombinedMargin()
        self.margin.set_world_size(self.world_size)
        self.k = int(self.margin.centres_per_class)
        self.min_sampled = sharding.num_sampled_centres(self.local_classes, sample_rate, 1)  # also validates it
        self.sampling = float(sample_rate) < 1.0
        self.grad_scale = 1.0 / self.world_size
        self.weight = Parameter(Tensor(sharding.init_centres(self.class_start * self.k, self.class_stop * self.k,
                                                             self.embedding_size, seed)), name="weight")
        self.class_ids = Tensor(np.arange(self.local_classes, dtype=np.int32))
        self.centre_offsets = Tensor(np.arange(self.k, dtype=np.int32).reshape(1, -1))
        self.distributed = self.world_size > 1
        if self.distributed:
            use_reduce_scatter = ms.get_context("device_target") != "CPU"
            self.gather_rows = _AllGatherRows(self.rank, self.world_size, use_reduce_scatter)
            self.all_gather = ops.AllGather()
            self.all_reduce = ops.AllReduce()
        # Per-rank random stream for the negatives.
        self.uniform = ops.UniformReal(seed=int(seed) + 1, seed2=self.rank + 1) if self.sampling else None

    # -- the forward pass, in pieces that tests can call one by one --

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
        batch plus random others (k = num_sampled_centres). `local_labels` are the global labels minus
        class_start (labels of other ranks lie outside [0, local_classes))."""
        num = min(self.local_classes, max(self.min_sampled, local_labels.shape[0]))
        in_shard = ops.logical_and(local_labels >= 0, local_labels < self.local_classes)
        rows = ops.clamp(local_labels, 0, self.local_classes - 1).reshape(-1, 1)
        hits = ops.scatter_nd(rows, ops.cast(in_shard, ms.float32), (self.local_classes,))
        # Positives score >= 2, everything else is uniform in [0, 1): the top k keeps all positives.
        scores = self.uniform((self.local_classes,)) + 2.0 * ops.cast(hits > 0, ms.float32)
        _, index = ops.topk(scores, num)
        return ops.stop_gradient(index)

    def local_logits(self, embeddings, local_labels):
        """(scaled margin logits (N, k), one-hot (N, k)) on this rank's k (sampled) classes, and the
        embeddings' norms (N, 1)."""
        if self.sampling:
            index = self.sample_centres(local_labels)
            rows = index.reshape(-1, 1) * self.k + self.centre_offsets if self.k > 1 else index
            centres = ops.gather(self.weight, rows.reshape(-1), 0)
        else:
            index = self.class_ids
            centres = self.weight
        one_hot = ops.cast(ops.equal(local_labels.reshape(-1, 1), index.reshape(1, -1)), ms.float32)
        norms = ops.sqrt(ops.sum(embeddings * embeddings, dim=1, keepdim=True) + 1e-12)
        cos = clamp_cosine(ops.matmul(embeddings / norms, l2_normalize(centres).T))
        return self.margin(cos, one_hot, norms), one_hot, norms

    def cross_entropy(self, logits, one_hot):
        """Mean over the global batch of the softmax cross-entropy over all ranks' classes, via
        log-sum-exp (nn.SoftmaxCrossEntropyWithLogits returns inf on CPU once the target probability
        underflows, which margins at s=64 reach easily)."""
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
        logits, one_hot, norms = self.local_logits(embeddings, labels - self.class_start)
        return self.cross_entropy(logits, one_hot) + self.margin.loss_term(norms)

    # -- the head's state on disk --

    def state_names(self, train_cell):
        """Names of this head's rank-local state in `train_cell`: its weight and the optimizer slots of
        it. (The margin's running statistics are the same on every rank: they are common state.)"""
        return sorted(p.name for p in train_cell.get_parameters() if sharding.is_head_state(p.name, [self.weight.name]))

    def rank_local_names(self, train_cell):
        """What differs between ranks and so stays out of rank 0's checkpoint: the head state of a
        run on several ranks; nothing on one rank."""
        return self.state_names(train_cell) if self.distributed else []

    def save_state(self, train_cell, checkpoint_path, meta=None):
        """Write this rank's head state next to `checkpoint_path` (several ranks only: on one rank the
        head is part of the checkpoint itself). Returns the file written, or None."""
        names = self.rank_local_names(train_cell)
        if not names:
            return None
        params = {p.name: p for p in train_cell.get_parameters()}
        info = {sharding.SHARD_META_PREFIX + key: getattr(self, key) for key in sharding.SHARD_META}
        info.update(meta or {})
        path = sharding.shard_path(checkpoint_path, self.rank, self.world_size)
        save_checkpoint_atomic([{"name": name, "data": params[name]} for name in names], path, info)
        return path

    def load_state(self, train_cell, checkpoint_path, params):
        """Set this rank's rows of the head state from a checkpoint (`params`: its entries) whatever
        number of ranks wrote it: the full state stored in the checkpoint, else its shard files."""
        names = self.state_names(train_cell)
        if all(name in params for name in names):
            full = {name: params[name].asnumpy() for name in names}
            self._set_rows(train_cell, names, full, 0, self.num_classes, checkpoint_path)
            return
        sets = sharding.complete_shard_sets(checkpoint_path)
        if not sets:
            raise ArcFaceError(f"{checkpoint_path} holds no classification head: neither head.weight nor a complete "
                               f"set of head shards next to it "
                               f"({os.path.basename(sharding.shard_path(checkpoint_path, 0, 2))} ...)")
        world = self.world_size if self.world_size in sets else max(sets)
        rows = {name: [] for name in names}
        for rank in range(world):
            start, stop = sharding.class_range(self.num_classes, rank, world)
            if stop <= self.class_start or start >= self.class_stop:
                continue
            arrays, info = read_shard(sets[world][rank])
            if info["num_classes"] != self.num_classes or (info["class_start"], info["class_stop"]) != (start, stop):
                raise ArcFaceError(f"{sets[world][rank]}: classes [{info['class_start']}, {info['class_stop']}) "
                                   f"of {info['num_classes']}, expected [{start}, {stop}) of {self.num_classes} "
                                   f"(another --num_classes?)")
            lo, hi = max(start, self.class_start) - start, min(stop, self.class_stop) - start
            for name in names:
                if name not in arrays:
                    raise ArcFaceError(f"{sets[world][rank]} has no {name} (another optimizer?)")
                rows[name].append(arrays[name][lo * self.k:hi * self.k])
        local = {name: np.concatenate(rows[name], axis=0) for name in names}
        self._set_rows(train_cell, names, local, self.class_start, self.class_stop, checkpoint_path)

    def _set_rows(self, train_cell, names, arrays, start, stop, source):
        """Set the classes [class_start, class_stop) of every state entry from `arrays` holding the
        classes [start, stop) (K rows per class)."""
        params = {p.name: p for p in train_cell.get_parameters()}
        k = self.k
        for name in names:
            value = arrays[name]
            if value.shape[0] != (stop - start) * k or value.shape[1:] != tuple(params[name].shape[1:]):
                raise ArcFaceError(f"{source}: {name} has shape {value.shape}, this model needs "
                                   f"({self.num_classes * k}, {', '.join(map(str, params[name].shape[1:]))}) "
                                   f"(another --num_classes, --num_features or sub-center k?)")
            value = value[(self.class_start - start) * k:(self.class_stop - start) * k]
            params[name].set_data(Tensor(np.ascontiguousarray(value), params[name].dtype))


def read_shard(source):
    """(arrays {name: ndarray}, info {class_start, class_stop, num_classes, rank, world_size}) of a
    shard file or of the dict ms.load_checkpoint returned for one."""
    if isinstance(source, (str, os.PathLike)):
        params, meta = read_checkpoint(str(source))
    else:
        params = {k: v for k, v in source.items() if not k.startswith("meta_")}
        meta = {k[len("meta_"):]: v for k, v in source.items() if k.startswith("meta_")}
    info = {}
    for key in sharding.SHARD_META:
        value = meta.get(sharding.SHARD_META_PREFIX + key)
        if value is None:
            raise ArcFaceError(f"not a head shard (no {key}): {source if isinstance(source, str) else 'entries'}")
        info[key] = int(value.asnumpy()) if hasattr(value, "asnumpy") else int(value)
    arrays = {k: v.asnumpy() if hasattr(v, "asnumpy") else np.asarray(v) for k, v in params.items()}
    return arrays, info


def merge_shards(sources, name="head.weight"):
    """Full (num_classes x K, ...) array of `name` (the head weight, or an optimizer slot such as
    `accum.head.weight`) from the shards of all ranks: paths or ms.load_checkpoint dicts, any order."""
    shards = [read_shard(source) for source in sources]
    order = sharding.check_tiling([info for _, info in shards], "merging head shards")
    for arrays, info in shards:
        if name not in arrays:
            raise ArcFaceError(f"head shard of rank {info['rank']} has no {name}")
    return np.concatenate([shards[i][0][name] for i in order], axis=0)


def export_merged_checkpoint(checkpoint_path, out_path):
    """A checkpoint holding the whole head, from one of a run on several ranks: its entries plus the
    merged head state. It loads like the checkpoint of a one-rank run (evaluation, export, --ckpt_url,
    --resume on one device). Returns the number of classes."""
    if not out_path.endswith(".ckpt"):
        raise ArcFaceError(f"--output {out_path}: the merged checkpoint's name must end with .ckpt")
    params, meta = read_checkpoint(checkpoint_path)
    sets = sharding.complete_shard_sets(checkpoint_path)
    if not sets:
        raise ArcFaceError(f"no complete set of head shards next to {checkpoint_path}")
    paths = [path for _, path in sorted(sets[max(sets)].items())]
    shards = [read_shard(path) for path in paths]
    names = sorted(shards[0][0])
    entries = [{"name": key, "data": value} for key, value in params.items() if key not in names]
    for name in names:
        entries.append({"name": name, "data": Tensor(merge_shards(paths, name))})
    save_checkpoint_atomic(entries, out_path, meta)
    return shards[0][1]["num_classes"]
