"""Huawei ModelArts jobs (--modelarts): data and checkpoints live in OBS buckets and are copied
with `moxing` (installed on ModelArts only) to and from the job's local disk.

Each node copies the data once: the ranks of a node take turns on a file lock and the first one
copies, the others find the copy complete. At the end every rank copies back what it wrote itself
(rank 0: the whole output folder; the other ranks: their head shards), so the shards of ranks on
other nodes reach the bucket too, and no rank waits for another.
"""
import fcntl
import glob
import os

from src.errors import ArcFaceError

CACHE = "/cache"  # the local disk of a ModelArts job
_COMPLETE = ".copy-complete"


def _moxing():
    try:
        import moxing
    except ImportError:
        raise ArcFaceError("--modelarts needs the moxing package, available on ModelArts") from None
    return moxing


def fetch_once(src, dst):
    """Copy the OBS folder `src` to the local `dst` once per node (concurrent ranks wait for it)."""
    mox = _moxing()
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with open(os.path.abspath(dst) + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        marker = os.path.join(dst, _COMPLETE)
        if not os.path.isfile(marker):
            mox.file.copy_parallel(src, dst)
            os.makedirs(dst, exist_ok=True)
            open(marker, "w").close()


def push_results(output_dir, train_url, rank, world_size):
    """Copy this rank's results back to OBS: rank 0 the whole folder, another rank its own shards."""
    mox = _moxing()
    if rank == 0:
        mox.file.copy_parallel(output_dir, train_url)
        return
    for path in glob.glob(os.path.join(glob.escape(output_dir), f"*.head-r{rank}of{world_size}.ckpt")):
        mox.file.copy(path, os.path.join(train_url, os.path.basename(path)))
