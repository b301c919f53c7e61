"""One training run per output folder: an exclusive lock held for the whole run.

Two runs writing into one folder would prune each other's checkpoints and interleave their metrics.
Rank 0 takes an `fcntl` lock on `<folder>/.lock` before it touches anything there; the lock is
released by the kernel when the process ends, however it ends, so a killed run never leaves the
folder locked. The file names the holder, for the error a second run gets.
"""
import fcntl
import os
import socket
import sys
import time

from src.errors import ArcFaceError

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd = None

    def acquire(self):
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise ArcFaceError(f"{self.folder} is in use by another training run ({holder}): wait for it to end, "
                               f"or use another --train_url") from None
        holder = (f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{' '.join(sys.argv)[:300]}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode("utf-8") + b"\n", 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None
