"""The error table over 2 and 3 gloo processes (torchrun) equals one process's, byte for byte; a rank killed
mid-run (SIGKILL) leaves its finished entries cached, and the rerun finishes with the same table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quantmix.measurement.distributed import shard_tensors

WORKER = Path(__file__).with_name("dist_error_table.py")


def _torchrun(n: int, model: Path, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the error entries go to ``cache``, the rest to the usual cache
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(WORKER),
           str(model), str(out), str(cache), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_shard_tensors_balanced_and_deterministic() -> None:
    sizes = [("a", 10), ("b", 7), ("c", 7), ("d", 3), ("e", 1)]
    shares = shard_tensors(sizes, 2)
    assert shares == shard_tensors(list(reversed(sizes)), 2)
    assert sorted(n for s in shares for n in s) == ["a", "b", "c", "d", "e"]
    assert shares == [["a", "d", "e"], ["b", "c"]]
    assert shard_tensors(sizes, 8)[5:] == [[], [], []]


@pytest.fixture(scope="module")
def model() -> Path:
    from quantmix.fixtures.tiny import get_tiny
    return get_tiny("tiny-llama")


@pytest.fixture(scope="module")
def single(model: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("single")
    r = _torchrun(1, model, d / "out", d / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    return (d / "out" / "table-rank0.json").read_bytes()


@pytest.mark.parametrize("n", [2, 3])
def test_ranks_equal_one_process(n: int, model: Path, single: bytes, tmp_path: Path) -> None:
    r = _torchrun(n, model, tmp_path / "out", tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    for k in range(n):
        assert (tmp_path / "out" / f"table-rank{k}.json").read_bytes() == single, k
    computed = [int((tmp_path / "out" / f"computed-rank{k}.txt").read_text()) for k in range(n)]
    assert len(set(computed)) == 1 and computed[0] > 0  # the gathered count of all ranks' measurements


def test_killed_rank_resumes(model: Path, single: bytes, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    r = _torchrun(2, model, tmp_path / "killed", cache, "1", "4")
    assert r.returncode != 0
    assert not (tmp_path / "killed" / "table-rank1.json").exists()
    done = sum(1 for _ in cache.rglob("*.json"))
    assert done > 0  # what finished before the kill is kept
    r = _torchrun(2, model, tmp_path / "again", cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "again" / "table-rank0.json").read_bytes() == single
    total = int((tmp_path / "again" / "computed-rank0.txt").read_text())
    first = len(__import__("json").loads(single)["rows"])
    assert 0 < total < first  # only the missing entries were measured again


def test_optimize_under_torchrun(llamacpp, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m quantmix.cli optimize ...`: the ranks share the error table, rank 1 stops
    after its share, rank 0 writes the same recipe and plan as one process does."""
    from test_catalog import _converted_tiny
    src = _converted_tiny(llamacpp, "tiny-qwen2-moe")
    env = dict(os.environ, OMP_NUM_THREADS="1", QUANTMIX_CACHE=str(tmp_path / "cache"))
    outs = {}
    for n in (2, 1):  # the ranks measure in a fresh cache; one process then plans from the same entries
        out = tmp_path / f"n{n}" / "recipe.txt"
        out.parent.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m",
               "quantmix.cli", "optimize", str(src), "--target-bpw", "5.0", "-o", str(out), "--types",
               "Q4_0,Q4_K,Q6_K,Q8_0", "--device", "cpu", "--quiet"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[n] = (r, out.read_bytes(), out.with_suffix(".plan.json").read_bytes())
    assert outs[2][1:] == outs[1][1:]
    assert "rank 0 plans and writes the outputs" in outs[2][0].stderr
    assert re.search(r"\(0 from the cache, [1-9]\d* measured\)", outs[2][0].stderr), outs[2][0].stderr[-2000:]
