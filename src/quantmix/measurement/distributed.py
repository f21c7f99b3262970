"""The error table spread over the processes of a ``torchrun`` launch (torch.distributed: gloo on CPUs, NCCL on
GPUs), sharded by tensor.

Each rank measures a share of the tensors (balanced by bytes, largest first: deterministic from the model alone),
through the same :func:`quantmix.measurement.error_table.error_table` with its per-(tensor, type) cache; the rows
are gathered with ``all_gather_object`` and put back in the single-process order, so every rank holds the table
one process would have made, row for row. A rank killed mid-run leaves its finished entries in the cache: the
rerun measures only what is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from quantmix.measurement import error_table as _et
from quantmix.measurement.error_table import ErrorTable, _n_bytes, _sources

__all__ = ["world", "init_from_env", "is_rank_zero", "in_group", "rank_device", "leave_group", "shard_tensors",
           "sharded_error_table"]


def world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's once initialized, else torchrun's environment."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def in_group() -> bool:
    """Whether this process has joined a process group (init_from_env under torchrun)."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def is_rank_zero() -> bool:
    return world()[0] == 0


def init_from_env(device: str | None = None) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT); False when run alone. CPU
    ranks use gloo; CUDA ranks NCCL, each on its LOCAL_RANK's GPU."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    if not dist.is_initialized():
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return True


def rank_device(device: str | None) -> str:
    """This rank's device: its LOCAL_RANK's GPU where the job runs on CUDA (``cuda`` or unset with a GPU present)."""
    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device or "cpu"


def leave_group() -> bool:
    """After the sharded work: wait for every rank, then leave the group (a gloo rank left with its group alive can
    abort at exit). True on rank 0, which carries on alone."""
    import torch.distributed as dist
    rank = world()[0]
    if in_group():
        dist.barrier()
        dist.destroy_process_group()
    return rank == 0


def shard_tensors(sizes: list[tuple[str, int]], n: int) -> list[list[str]]:
    """Tensors into ``n`` shares of near-equal bytes: largest first onto the lightest share (ties by name, then by
    share index), so every rank computes the same split."""
    shares: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for name, size in sorted(sizes, key=lambda x: (-x[1], x[0])):
        k = min(range(n), key=lambda i: (load[i], i))
        shares[k].append(name)
        load[k] += size
    return shares


def sharded_error_table(gguf_path: str | Path, imatrix_path: str | Path | None = None, **kwargs: Any) -> ErrorTable:
    """:func:`error_table` over all ranks of the process group (one process: exactly error_table, looked up when
    called, so that a caller's replacement of ``error_table.error_table`` holds here too)."""
    error_table = _et.error_table
    import torch.distributed as dist
    rank, size = world()
    if size <= 1 or not dist.is_initialized():
        return error_table(gguf_path, imatrix_path, **kwargs)
    cat, src, _ident = _sources(Path(gguf_path))
    wanted = kwargs.pop("tensors", None)
    order = [t.name for t in cat if t.quantizable and (wanted is None or t.name in set(wanted))]
    shares = shard_tensors([(n, _n_bytes(src[n])) for n in order], size)
    progress = kwargs.pop("progress", True) and rank == 0
    mine = error_table(gguf_path, imatrix_path, tensors=shares[rank], progress=progress, **kwargs) \
        if shares[rank] else None
    parts: list[Any] = [None] * size
    dist.all_gather_object(parts, (mine.rows, mine.computed) if mine is not None else ([], 0))
    head = mine if mine is not None else error_table(gguf_path, imatrix_path, tensors=[], progress=False, **kwargs)
    by_tensor: dict[str, list] = {}
    for rows, _computed in parts:
        for r in rows:
            by_tensor.setdefault(r.tensor, []).append(r)
    table = ErrorTable(head.gguf, head.imatrix, head.bias, head.bias_note, head.bias_lambda)
    table.rows = [r for n in order for r in by_tensor.get(n, [])]
    table.computed = sum(c for _rows, c in parts)
    return table
