"""Interrupts leave nothing behind: SIGTERM / SIGHUP unwind like Ctrl-C (no temporary file beside the output,
the exit status says which signal), and the temporary file of a writer killed outright (kill -9) is removed by
the next run that writes the same output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantmix.paths import remove_stale_temps, temp_beside


def _quantize_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "quantmix.cli", "quantize", str(src), "-o", str(out), "--ftype", "Q4_K_M", "--device",
            "cpu"]


def _stop_when(proc: subprocess.Popen, ready, sig: int = signal.SIGKILL, timeout: float = 600) -> None:  # noqa: ANN001
    """Send ``sig`` to ``proc`` once ``ready()`` holds (polled); it must still be running then, and exit as
    that signal makes it exit (-9 for kill -9, 128 + signal when it unwinds)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be stopped: {proc.stderr.read()[-500:]!r}"
    proc.send_signal(sig)
    proc.wait()
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig)


def _json_field(path: Path, key: str) -> int:
    try:
        return int(json.loads(path.read_text()).get(key, 0))
    except (OSError, ValueError):
        return 0


def _tiny_gguf() -> Path:
    from quantmix.fixtures.tiny import get_tiny
    from quantmix.job import resolve_model

    return resolve_model(get_tiny("tiny-llama", vocab=True)).gguf


def test_stale_temp_of_a_dead_writer_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.gguf.{dead.pid}.abc123.tmp"
    stale.write_bytes(b"x" * 100)
    mine = tmp_path / f".m.gguf.{os.getpid()}.def456.tmp"  # a live writer's (this process): kept
    mine.write_bytes(b"y")
    other = tmp_path / ".n.gguf.1.abc.tmp"  # another output's: not ours to judge
    other.write_bytes(b"z")
    fd, tmp = temp_beside(out)
    os.close(fd)
    assert not stale.exists() and mine.exists() and other.exists() and tmp.name.startswith(f".m.gguf.{os.getpid()}.")
    tmp.unlink()
    assert remove_stale_temps(out) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_signal_mid_write_leaves_nothing(tmp_path: Path, sig: int) -> None:
    """The writer is stopped by ``sig`` once its partial file exists, before any progress was saved; after
    SIGTERM / SIGHUP nothing is left and the exit status is 128 + signal; after SIGKILL the partial file is
    written over by the next run, which writes the same bytes as an uninterrupted one."""
    src = _tiny_gguf()
    out = tmp_path / "m.gguf"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_quantize_cmd(src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while not (tmp_path / ".m.gguf.partial").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail(f"the writer finished before it could be interrupted: {proc.stderr.read().decode()[-500:]}")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and (tmp_path / ".m.gguf.partial").exists()
        subprocess.run(_quantize_cmd(src, out), check=True, capture_output=True, env=env)
        again = tmp_path / "again.gguf"
        subprocess.run(_quantize_cmd(src, again), check=True, capture_output=True, env=env)
        assert out.read_bytes() == again.read_bytes()
    else:
        assert proc.returncode == 128 + sig, err.decode()[-500:]
        assert b"terminated" in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_imatrix_killed_mid_run_resumes_where_it_stopped(tmp_path: Path, sig: int) -> None:
    """kill -9 (or SIGTERM) once the job state holds a few layers; the rerun continues after the last saved
    layer (it says so) and writes the bytes of an uninterrupted run; no state is left."""
    from quantmix.fixtures.store import get_fixture

    hf = get_fixture("smollm2-768").hf_dir
    cmd = [sys.executable, "-m", "quantmix.cli", "imatrix", str(hf), "--chunks", "4", "--ctx", "512", "--device",
           "cpu", "--save-every", "0", "--quiet"]
    clean = tmp_path / "clean.imatrix.gguf"
    subprocess.run([*cmd, "-o", str(clean)], check=True, capture_output=True)
    out = tmp_path / "m.imatrix.gguf"
    state = tmp_path / ".m.imatrix.gguf.state" / "imatrix-state.pt"
    proc = subprocess.Popen([*cmd, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: list[float] = []

    def saved() -> bool:  # a layer or more saved
        if state.exists() and not seen:
            seen.append(time.time())
        return bool(seen) and time.time() - seen[0] > 0.5

    _stop_when(proc, saved, sig)
    assert state.exists() and not out.exists()
    again = subprocess.run([*cmd, "-o", str(out)], check=True, capture_output=True, text=True)
    assert "resuming after layer" in again.stderr
    assert out.read_bytes() == clean.read_bytes()
    assert not state.exists()


def test_writer_killed_mid_run_resumes_after_the_last_saved_tensor(tmp_path: Path) -> None:
    """kill -9 once a few tensors of a split output are saved; the same command continues after them (it says
    so) and writes the bytes of an uninterrupted run; a different recipe never reuses the partial file."""
    from quantmix.fixtures.store import get_fixture

    src = get_fixture("smollm2-768").gguf_f32
    cmd = [*_quantize_cmd(src, tmp_path / "m.gguf"), "--save-every", "0", "--split-max-size", "60M"]
    clean = [*_quantize_cmd(src, tmp_path / "clean.gguf"), "--split-max-size", "60M"]
    subprocess.run(clean, check=True, capture_output=True)
    state = tmp_path / ".m-00001-of-00003.gguf.partial.json"

    def into_second_shard() -> bool:
        return _json_field(state, "shard") >= 1 and _json_field(state, "tensors") >= 3

    _stop_when(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE), into_second_shard)
    assert state.exists() and not list(tmp_path.glob("m-*.gguf"))
    other = [*_quantize_cmd(src, tmp_path / "m.gguf"), "--split-max-size", "60M"]
    other[other.index("Q4_K_M")] = "Q5_K_M"  # another recipe: the partial files are not its
    mix = subprocess.run(other, check=True, capture_output=True, text=True)
    assert "resuming" not in mix.stderr
    want5 = [*_quantize_cmd(src, tmp_path / "q5.gguf"), "--split-max-size", "60M"]
    want5[want5.index("Q4_K_M")] = "Q5_K_M"
    subprocess.run(want5, check=True, capture_output=True)
    for i in (1, 2, 3):
        assert (tmp_path / f"m-0000{i}-of-00003.gguf").read_bytes() == \
            (tmp_path / f"q5-0000{i}-of-00003.gguf").read_bytes()
        (tmp_path / f"m-0000{i}-of-00003.gguf").unlink()
    # killed again, then resumed by the same command
    _stop_when(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE), into_second_shard)
    again = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert "resuming after" in again.stderr
    for i in (1, 2, 3):
        assert (tmp_path / f"m-0000{i}-of-00003.gguf").read_bytes() == \
            (tmp_path / f"clean-0000{i}-of-00003.gguf").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("sig", [signal.SIGKILL])  # SIGTERM unwinds as in the imatrix and quantize tests
def test_optimize_killed_mid_refinement_resumes_to_the_same_recipe(tmp_path: Path, sig: int) -> None:
    """kill -9 while optimize refines (error table, sensitivity and some rounds done); the same command then
    reuses what was measured, continues the search from its saved state, and writes the recipe of a run never
    interrupted (each run in its own empty cache, so nothing comes from the other)."""
    from quantmix.fixtures.tiny import get_tiny
    from quantmix.job import resolve_model
    from quantmix.paths import cache_dir

    hf = get_tiny("tiny-llama", vocab=True)
    gguf = resolve_model(hf).gguf

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "quantmix.cli", "optimize", str(gguf), "--hf", str(hf), "--target-bpw", "4.5",
                "--sensitivity", "quick", "--refine-moves", "8", "-o", str(out), "--device", "cpu", "--quiet"]

    def env(name: str) -> dict:
        c = tmp_path / name
        c.mkdir()
        (c / "src").symlink_to(cache_dir() / "src")  # ggml's quantizer library, built once
        return dict(os.environ, QUANTMIX_CACHE=str(c))

    clean = tmp_path / "clean" / "r.txt"
    subprocess.run(cmd(clean), check=True, capture_output=True, env=env("cache-a"))
    e = env("cache-b")
    out = tmp_path / "resumed" / "r.txt"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e)
    states = Path(e["QUANTMIX_CACHE"]) / "refine"
    _stop_when(proc, lambda: any(_json_field(f, "n_tried") >= 2 for f in states.glob("*.json")), sig)
    assert not out.exists()
    again = subprocess.run([a for a in cmd(out) if a != "--quiet"], check=True, capture_output=True, text=True,
                           env=e)
    assert "refine: resuming after" in again.stderr and ", 0 measured)" in again.stderr  # the table from the cache
    assert out.read_bytes() == clean.read_bytes()
    assert (out.parent / "r.txt.ik").read_bytes() == (clean.parent / "r.txt.ik").read_bytes()
