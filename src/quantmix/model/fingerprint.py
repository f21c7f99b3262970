"""A model directory's identity, taken once per file version rather than by re-reading every byte.

Every cache quantmix keeps (imatrix, sensitivity probes, reference distributions) is keyed by the model it was
computed from. Hashing a 700 GB checkpoint on every call costs hours, so each file's sha256 is remembered in the
cache together with what identifies that version of the file: its size, inode, modification and change times
(``st_ctime`` cannot be set back by a user: any write moves it) and the hash of its first 64 KiB (a safetensors
header: names, shapes, offsets). A file whose stat or header differs is hashed again; one that matches is not
re-read. ``QUANTMIX_REHASH=1`` hashes everything again regardless.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from quantmix.paths import cache_dir, temp_beside

__all__ = ["model_fingerprint", "file_sha256", "file_version", "VersionMemo"]

_HEAD = 1 << 16
_VERSION = 1


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _head_sha(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read(_HEAD)).hexdigest()


def _full_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _memo_path(path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "fingerprints" / f"{key}.json"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, remembered per file version (module docstring)."""
    p = Path(path)
    st = p.stat()
    memo = _memo_path(p)
    head = _head_sha(p)
    if os.environ.get("QUANTMIX_REHASH") != "1":
        try:
            rec = json.loads(memo.read_text())
            if (rec.get("version") == _VERSION and rec.get("stat") == _stat_key(st) and rec.get("head") == head
                    and rec.get("path") == str(p.resolve())):
                return str(rec["sha256"])
        except (OSError, ValueError, KeyError):
            pass
    sha = _full_sha(p)
    if _stat_key(p.stat()) != _stat_key(st):  # written while we read it: do not remember a torn hash
        return sha
    _write_json(memo, {"version": _VERSION, "path": str(p.resolve()), "stat": _stat_key(st), "head": head,
                       "sha256": sha})
    return sha


def _write_json(path: Path, obj: object) -> None:
    """``obj`` as JSON at ``path``, atomically (a reader never sees half a memo)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over every regular file of a model directory (names and each file's sha256, sorted by name)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ValueError(f"{d}: not a model directory")
    h = hashlib.sha256()
    for f in sorted(p for p in d.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode() + b"\0")
    return h.hexdigest()


def file_version(path: str | Path) -> str:
    """What identifies this version of a file without reading it all (path, size, inode, times, first 64 KiB)."""
    p = Path(path)
    return hashlib.sha256(json.dumps([_VERSION, str(p.resolve()), _stat_key(p.stat()), _head_sha(p)]).encode()
                          ).hexdigest()


class VersionMemo:
    """Values computed from a file's bytes (say, one hash per tensor of a GGUF), remembered for that version of
    the file (:func:`file_version`): a warm run reads none of them again, any change to the file forgets them
    all. ``QUANTMIX_REHASH=1`` ignores what is remembered."""

    def __init__(self, path: str | Path, kind: str) -> None:
        self.file = cache_dir() / "fingerprints" / f"{kind}-{file_version(path)[:32]}.json"
        self.values: dict[str, str] = {}
        self._dirty = False
        if os.environ.get("QUANTMIX_REHASH") != "1":
            try:
                self.values = dict(json.loads(self.file.read_text()))
            except (OSError, ValueError, TypeError):
                self.values = {}

    def get(self, key: str) -> str | None:
        return self.values.get(key)

    def put(self, key: str, value: str) -> None:
        self.values[key] = value
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        _write_json(self.file, self.values)
        self._dirty = False
