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
