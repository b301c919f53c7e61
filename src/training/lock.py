"""One training run per output folder: an exclusive lock held for the whole run.

Two runs writing into one folder would prune each other's checkpoints and interleave their metrics.
Rank 0 takes an `fcntl` lock on `<folder>/.lock` before it touches anything there; the lock is
released by the kernel when the process ends, however it ends, so a killed run never leaves the
folder locked. The file names the holder, for the error a second run gets; a run that ends removes it
(and the folder, when the run made it and left nothing in it).
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
        self.made_folder = False

    def acquire(self):
        self.made_folder = not os.path.isdir(self.folder)
        try:
            os.makedirs(self.folder, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
                    os.close(fd)
                    raise ArcFaceError(f"{self.folder} is in use by another training run ({holder}): wait for it "
                                       f"to end, or use another --train_url") from None
                # The holder removes the file when it ends: a lock taken on a file no longer at the
                # path would not exclude the next run, so take it again on the current file.
                if _same_file(fd, self.path):
                    break
                os.close(fd)
        except OSError as exc:
            self._remove_folder()
            raise ArcFaceError(f"cannot write into the output folder {self.folder}: {exc.strerror or exc} "
                               f"(use another --train_url)") from None
        holder = (f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{' '.join(sys.argv)[:300]}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode("utf-8") + b"\n", 0)
        self.fd = fd
        return self

    def release(self):
        """Remove the lock file (while still holding it) and, when this run made the folder and left
        nothing in it (a refused run), the folder."""
        if self.fd is not None:
            try:
                os.remove(self.path)
            except OSError:
                pass
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None
            self._remove_folder()

    def _remove_folder(self):
        if self.made_folder:
            try:
                os.rmdir(self.folder)  # only when empty
            except OSError:
                pass


def _same_file(fd, path):
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False
