"""The one atomic write, and the cleanup of what an interrupted one leaves behind.

Every file the project writes for later use (checkpoints, exports, caches, config.yaml, RecordIO and
.bin sets, converted images, embeddings) goes through `atomic_path`: the content is written to
`.tmp-<pid>-<name>` in the destination's folder, flushed to disk, renamed over the destination and
the folder synced. A crash, a kill or a power loss leaves the earlier file or none, never half of
one; a full disk is one ArcFaceError and no temporary file stays behind.
"""
import contextlib
import os
import re

from src.errors import ArcFaceError

TEMP_PREFIX = ".tmp-"
# What a killed write leaves: `.tmp-<pid>-<name>`, and `<that without its extension>.tmp` which
# MindSpore's own checkpoint writer makes before renaming to the name it was given.
_TEMP_RE = re.compile(r"^\.tmp-\d+-.")


def temporary_name(path):
    """The hidden temporary file beside `path` that this process writes before renaming it to `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{name}")


def fsync_path(path):
    """Flush a file's (or a folder's) data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(path, note="", sync=True):
    """Yields the temporary path to write `path`'s content to; on leaving the block the file is synced
    (unless `sync` is False: for bulk outputs that a re-run checks and redoes, such as millions of
    converted images) and renamed to `path`. An OSError inside or while committing is an ArcFaceError naming `path`
    (plus `note`); the temporary file (and MindSpore's `.tmp` beside it) is removed in every case."""
    tmp = temporary_name(path)
    leftovers = (tmp, os.path.splitext(tmp)[0] + ".tmp")
    try:
        folder = os.path.dirname(tmp)
        os.makedirs(folder, exist_ok=True)
        yield tmp
        if sync:
            fsync_path(tmp)
        os.replace(tmp, path)
        if sync:
            fsync_path(folder)
    except OSError as exc:
        raise ArcFaceError(f"cannot write {path}: {exc.strerror or exc}{note}") from None
    finally:
        for leftover in leftovers:
            _remove(leftover)


def atomic_write(path, content, note="", sync=True):
    """Write `content` (bytes, str as UTF-8, or a function given the open binary file) to `path` atomically."""
    with atomic_path(path, note, sync) as tmp, open(tmp, "wb") as fh:
        if callable(content):
            content(fh)
        else:
            fh.write(content.encode("utf-8") if isinstance(content, str) else content)


def remove_stale_temporaries(directory):
    """Delete what killed writes left in `directory` (names starting `.tmp-<pid>-`); returns their names.
    Call it only while holding the folder's lock: another process's write in progress looks the same."""
    removed = []
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if _TEMP_RE.match(name) and os.path.isfile(os.path.join(directory, name)):
                _remove(os.path.join(directory, name))
                removed.append(name)
    return sorted(removed)
