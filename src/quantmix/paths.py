"""Where quantmix keeps what is slow to rebuild: fixtures, llama.cpp builds, caches (outside the repo)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$QUANTMIX_CACHE`` or ``~/.cache/quantmix``."""
    root = Path(os.environ.get("QUANTMIX_CACHE", Path.home() / ".cache" / "quantmix")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """An inter-process lock in the cache, so two processes never build the same thing at once."""
    locks = cache_dir() / "locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files that writers of ``path`` (:func:`temp_beside`) left when they were killed
    (kill -9, power loss): ``.NAME.PID.XXXX.tmp`` whose process is gone. Returns what was removed."""
    import glob

    gone = []
    for f in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = f.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            f.unlink(missing_ok=True)
            gone.append(f)
    return gone


def temp_beside(path: Path) -> tuple[int, Path]:
    """A new temporary file next to ``path`` (open fd, path), named ``.NAME.PID.XXXX.tmp`` so that a later run
    can tell its own stale ones, after removing those of killed writers. Write it, then ``os.replace`` it onto
    ``path``: a reader never sees a half-written file, and an interrupted write leaves nothing behind for long."""
    import tempfile

    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    return fd, Path(tmp)
