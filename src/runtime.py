"""The one place that sets up MindSpore: device, execution mode, CPU tuning, seeds, distributed context."""
import os
import random
import re
import time
from dataclasses import dataclass

import numpy as np

# Must be set before the first convolution runs: on AVX-512 CPUs the oneDNN bundled with
# MindSpore otherwise falls back to a reference convolution that is ~100x slower.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logging: errors only

import mindspore as ms  # noqa: E402  (after the environment above)

from src.errors import ArcFaceError  # noqa: E402


@dataclass
class Runtime:
    device_target: str
    rank: int = 0
    group_size: int = 1

    @property
    def distributed(self):
        return self.group_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def launched_distributed():
    """True when started by msrun/mpirun/a rank table with more than one worker."""
    for var in ("MS_WORKER_NUM", "OMPI_COMM_WORLD_SIZE", "RANK_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return False


def setup(device_target="CPU", device_id=0, mode="graph", seed=None, distributed=None, run_log=None):
    """Select the device, execution mode and seeds; join the communication group when launched
    as one of several workers. Returns a `Runtime` with this process's rank and the world size.
    `run_log`: the file rank 0 logs its steps to, which tells msrun's scheduler process whether a
    worker it lost had been training (see `_cluster_error`)."""
    if device_target not in ("Ascend", "GPU", "CPU"):
        raise ArcFaceError(f"device_target must be Ascend, GPU or CPU, not {device_target!r}")
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    if distributed is None:
        distributed = launched_distributed()
    try:
        if distributed:
            # msrun assigns one device per local worker (set_device takes no id then); a rank-table
            # launch names each process's device in DEVICE_ID.
            if device_target != "CPU" and os.environ.get("DEVICE_ID", "").isdigit():
                ms.set_device(device_target, int(os.environ["DEVICE_ID"]))
            else:
                ms.set_device(device_target)
        else:
            ms.set_device(device_target, device_id)
    except (RuntimeError, ValueError) as exc:
        raise ArcFaceError(f"cannot use device {device_target}:{device_id}: {str(exc).splitlines()[0]}") from None
    rank, group_size = 0, 1
    if distributed:
        from mindspore.communication import get_group_size, get_rank, init
        from mindspore.context import ParallelMode
        started = time.time()
        try:
            init()
            rank, group_size = get_rank(), get_group_size()
        except RuntimeError as exc:
            raise _cluster_error(exc, started, run_log) from None
        ms.set_auto_parallel_context(parallel_mode=ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                     device_num=group_size)
    if seed is not None:
        set_seed(seed)
    return Runtime(device_target=device_target, rank=rank, group_size=group_size)


def _cluster_error(exc, started, run_log=None):
    """The one line for an init() that failed. In msrun's scheduler process (MS_ROLE=MS_SCHED) init()
    runs the cluster for the whole job, so its failure names the worker that stopped answering; when
    rank 0 had logged a line since the job started (or init() ran longer than the topology time-out)
    that rank or its node stopped during the run, not at start-up."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lost = re.search(r"worker (\d+) is the first one timed out", reason)
    if os.environ.get("MS_ROLE") == "MS_SCHED" and lost:
        worker, seconds = lost.group(1), time.time() - started
        topology_timeout = float(os.environ.get("MS_TOPO_TIMEOUT", "0") or 0)
        try:
            trained = bool(run_log) and os.path.getmtime(run_log) >= started
        except OSError:
            trained = False
        if trained or (topology_timeout and seconds > topology_timeout):
            return ArcFaceError(f"the job stopped after {seconds:.0f} s: rank {worker} stopped answering during the "
                                f"run: that rank or its node has stopped (see worker_{worker}.log on its node); the "
                                f"other ranks were stopped; continue with --resume auto")
        return ArcFaceError(f"rank {worker} stopped answering the cluster scheduler after {seconds:.0f} s: it or its "
                            f"node stopped, or it did not join within the cluster time-out (see worker_{worker}.log "
                            f"on its node)")
    launch_vars = ", ".join(f"{v}={os.environ[v]}" for v in ("MS_WORKER_NUM", "OMPI_COMM_WORLD_SIZE", "RANK_SIZE",
                                                              "RANK_TABLE_FILE") if v in os.environ)
    return ArcFaceError(f"cannot start distributed training ({launch_vars}): {reason}; launch with "
                        f"scripts/run_distribute_train*.sh, or unset these for one device")


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    ms.set_seed(seed)
    ms.dataset.config.set_seed(seed)
