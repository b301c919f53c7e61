"""The one place that sets up MindSpore: device, execution mode, CPU tuning, seeds, distributed context."""
import os
import random
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


def setup(device_target="CPU", device_id=0, mode="graph", seed=None, distributed=None):
    """Select the device, execution mode and seeds; join the communication group when launched
    as one of several workers. Returns a `Runtime` with this process's rank and the world size."""
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
        try:
            init()
            rank, group_size = get_rank(), get_group_size()
        except RuntimeError as exc:
            launch_vars = ", ".join(f"{v}={os.environ[v]}" for v in ("MS_WORKER_NUM", "OMPI_COMM_WORLD_SIZE",
                                                                      "RANK_SIZE", "RANK_TABLE_FILE")
                                    if v in os.environ)
            reason = str(exc).strip().splitlines()[0]
            raise ArcFaceError(f"cannot start distributed training ({launch_vars}): {reason}; "
                               f"launch with scripts/run_distribute_train*.sh, or unset these for one device") from None
        ms.set_auto_parallel_context(parallel_mode=ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                     device_num=group_size)
    if seed is not None:
        set_seed(seed)
    return Runtime(device_target=device_target, rank=rank, group_size=group_size)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    ms.set_seed(seed)
    ms.dataset.config.set_seed(seed)
