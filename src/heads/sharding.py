"""How the class centres are split over the ranks, sampled, initialised and stored: plain numpy
and file names, no MindSpore (so benchmarks and tools can use the same rules).

Rank r of W holds the centres of the classes [start, stop) = `class_range(C, r, W)`: C // W each,
one more for the first C % W ranks. With one rank it holds all of them.

Head state on disk. A checkpoint `ArcFace-<e>_<s>.ckpt` holds everything every rank has in common
(the backbone, its optimizer state, the step). The head state (the centres and their optimizer
slots) of a run on one rank is stored in that same file; a run on W > 1 ranks writes each rank's
rows to `ArcFace-<e>_<s>.head-r<rank>of<W>.ckpt` next to it, with the class range in its meta
entries. Either form can be read back on any number of ranks.
"""
import glob
import math
import re

import numpy as np

from src.errors import ArcFaceError

SHARD_META = ("class_start", "class_stop", "num_classes", "rank", "world_size")
SHARD_META_PREFIX = "pfc_"
INIT_BLOCK = 4096  # class centres are drawn in blocks of this many rows, each from its own seed
_SHARD_RE = re.compile(r"\.head-r(\d+)of(\d+)\.ckpt$")


def class_range(num_classes, rank, world_size):
    """[start, stop) of the classes held by `rank`."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ArcFaceError(f"rank {rank} is not in a world of {world_size}")
    if num_classes < world_size:
        raise ArcFaceError(f"the head needs at least one class per rank: {num_classes} classes, "
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
    return min(local_classes, max(math.ceil(sample_rate * local_classes), global_batch))


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


def is_head_state(name, head_names=("head.weight",)):
    """The head's parameters and the optimizer slots of them (`accum.head.weight`, `moment1.head.weight`...)."""
    return any(name == own or name.endswith("." + own) for own in head_names)


def checkpoint_stem(checkpoint_path):
    return checkpoint_path[:-len(".ckpt")] if checkpoint_path.endswith(".ckpt") else checkpoint_path


def shard_path(checkpoint_path, rank, world_size):
    """`ArcFace-3_100.ckpt` -> `ArcFace-3_100.head-r<rank>of<world_size>.ckpt` (same folder)."""
    return f"{checkpoint_stem(checkpoint_path)}.head-r{rank}of{world_size}.ckpt"


def find_shards(checkpoint_path):
    """{world_size: {rank: path}} of the shard files written next to `checkpoint_path`."""
    stem = checkpoint_stem(checkpoint_path)
    found = {}
    for path in glob.glob(glob.escape(stem) + ".head-r*of*.ckpt"):
        match = _SHARD_RE.search(path)
        if match and path[:match.start()] == stem:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    return found


def complete_shard_sets(checkpoint_path):
    """{world_size: {rank: path}} restricted to the sets in which every rank wrote its file."""
    return {world: ranks for world, ranks in find_shards(checkpoint_path).items() if len(ranks) == world}


def shard_files_of(checkpoint_path):
    """Every shard file next to `checkpoint_path` (for pruning)."""
    return [path for ranks in find_shards(checkpoint_path).values() for path in ranks.values()]


def check_tiling(infos, what):
    """Check that shard infos ({class_start, class_stop, num_classes, ...}) tile [0, num_classes)
    exactly; returns their order by class_start."""
    order = sorted(range(len(infos)), key=lambda i: infos[i]["class_start"])
    if not order:
        raise ArcFaceError(f"{what}: no head shards")
    num_classes = infos[order[0]]["num_classes"]
    expected = 0
    for i in order:
        if infos[i]["num_classes"] != num_classes or infos[i]["class_start"] != expected:
            raise ArcFaceError(f"{what}: head shards do not tile the {num_classes} classes (gap or overlap "
                               f"at class {expected}; shards of different runs or a missing rank?)")
        expected = infos[i]["class_stop"]
    if expected != num_classes:
        raise ArcFaceError(f"{what}: head shards cover classes [0, {expected}) of {num_classes}")
    return order
