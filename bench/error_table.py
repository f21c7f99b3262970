"""Benchmark of the error table (`quantmix.measurement.error_table`) on real big-MoE layer shapes.

Not a test. Builds, on the machine it runs on, a synthetic float GGUF holding whole layers of a big MoE with
the real tensor names and shapes (GLM-4.6: 160 routed experts x 1536 x 5120, 96-head attention, one shared
expert; or DeepSeek-V3: 256 experts x 2048 x 7168, MLA attention), filled with seeded heavy-tailed weights
(student-t, 3 dof, 1/128 outlier columns x30), plus a synthetic imatrix in llama-imatrix's GGUF format
(per-expert token counts with a skewed routing, in_sum2 and in_sum), then times ``error_table`` on it:

* per candidate set (k-quants; every type with numerics), cold (empty cache: ``cache_root`` in a new temp
  folder; the GGUF itself sits in the page cache) and warm (every (tensor, type) served from the cache);
* where the time goes: hashing, the per-tensor measurement pass (all missing types at once), and for one
  expert's slab the old host path (numpy conversion, pageable float32 copy), the new one (raw bytes into pinned
  memory, upload, conversion on the device) and the GPU's quant_error alone per type;
* ``--check``: the table on ``--device`` equals the CPU table (the torch path, byte-exact with ggml) within
  1e-6 relative, every type, on a small GGUF of the same architecture (per expert too).

    python bench/error_table.py --device cuda --check --sets kquants,all --json out.json

Weights/s counts each weight of the measured tensors once per candidate set ("model w/s") or once per
candidate type ("w x type/s"); pairs/s counts (tensor, type) entries.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantmix.calibration.imatrix_io import Imatrix, ImatrixEntry, write_imatrix
from quantmix.formats import staging
from quantmix.formats.api import supported_types
from quantmix.measurement import error_table as et

KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@dataclass(frozen=True)
class Spec:
    """One tensor of the synthetic GGUF: ggml shape (ne0 first) and the input space its imatrix row lives in."""

    name: str
    shape: tuple[int, ...]
    space: str  # imatrix input space ("" = no imatrix entry: norms, biases)
    f32: bool = False  # stored as F32 (norms, biases, router bias), as the converters do


def glm46_layer(b: int, n_expert: int, d: int = 5120, ff: int = 1536, heads: int = 96, kv: int = 8,
                hd: int = 128) -> list[Spec]:
    """One MoE layer of GLM-4.6 (config.json of zai-org/GLM-4.6), llama.cpp names (arch glm4moe)."""
    p = f"blk.{b}."
    return [
        Spec(p + "attn_norm.weight", (d,), "", True),
        Spec(p + "attn_q.weight", (d, heads * hd), "attn"),
        Spec(p + "attn_q.bias", (heads * hd,), "", True),
        Spec(p + "attn_k.weight", (d, kv * hd), "attn"),
        Spec(p + "attn_k.bias", (kv * hd,), "", True),
        Spec(p + "attn_v.weight", (d, kv * hd), "attn"),
        Spec(p + "attn_v.bias", (kv * hd,), "", True),
        Spec(p + "attn_q_norm.weight", (hd,), "", True),
        Spec(p + "attn_k_norm.weight", (hd,), "", True),
        Spec(p + "attn_output.weight", (heads * hd, d), "attn_out"),
        Spec(p + "post_attention_norm.weight", (d,), "", True),
        Spec(p + "ffn_gate_inp.weight", (d, n_expert), "ffn", True),
        Spec(p + "exp_probs_b.bias", (n_expert,), "", True),
        Spec(p + "ffn_gate_exps.weight", (d, ff, n_expert), "ffn_exps"),
        Spec(p + "ffn_up_exps.weight", (d, ff, n_expert), "ffn_exps"),
        Spec(p + "ffn_down_exps.weight", (ff, d, n_expert), "down_exps"),
        Spec(p + "ffn_gate_shexp.weight", (d, ff), "ffn"),
        Spec(p + "ffn_up_shexp.weight", (d, ff), "ffn"),
        Spec(p + "ffn_down_shexp.weight", (ff, d), "down_shexp"),
    ]


def dsv3_layer(b: int, n_expert: int, d: int = 7168, ff: int = 2048, heads: int = 128) -> list[Spec]:
    """One MoE layer of DeepSeek-V3 (q_lora 1536, kv_lora 512, rope 64, nope 128, v 128), arch deepseek2."""
    p = f"blk.{b}."
    return [
        Spec(p + "attn_norm.weight", (d,), "", True),
        Spec(p + "attn_q_a.weight", (d, 1536), "attn"),
        Spec(p + "attn_q_a_norm.weight", (1536,), "", True),
        Spec(p + "attn_q_b.weight", (1536, heads * 192), "q_b"),
        Spec(p + "attn_kv_a_mqa.weight", (d, 512 + 64), "attn"),
        Spec(p + "attn_kv_a_norm.weight", (512,), "", True),
        Spec(p + "attn_kv_b.weight", (512, heads * 256), "kv_b"),
        Spec(p + "attn_output.weight", (heads * 128, d), "attn_out"),
        Spec(p + "ffn_norm.weight", (d,), "", True),
        Spec(p + "ffn_gate_inp.weight", (d, n_expert), "ffn", True),
        Spec(p + "exp_probs_b.bias", (n_expert,), "", True),
        Spec(p + "ffn_gate_exps.weight", (d, ff, n_expert), "ffn_exps"),
        Spec(p + "ffn_up_exps.weight", (d, ff, n_expert), "ffn_exps"),
        Spec(p + "ffn_down_exps.weight", (ff, d, n_expert), "down_exps"),
        Spec(p + "ffn_gate_shexp.weight", (d, ff), "ffn"),
        Spec(p + "ffn_up_shexp.weight", (d, ff), "ffn"),
        Spec(p + "ffn_down_shexp.weight", (ff, d), "down_shexp"),
    ]


PRESETS = {
    # name: (gguf arch, layer builder, default experts, experts used, key-values)
    "glm4.6": ("glm4moe", glm46_layer, 160, 8, dict(embedding_length=5120, head_count=96, head_count_kv=8,
                                                  key_length=128, value_length=128)),
    "deepseek-v3": ("deepseek2", dsv3_layer, 256, 8, dict(embedding_length=7168, head_count=128,
                                                         head_count_kv=128, key_length=192, value_length=128)),
}


def small_layer(b: int, n_expert: int) -> list[Spec]:
    """A small layer of the same architecture (glm4moe) for the CPU-vs-device check and CPU smoke runs."""
    return glm46_layer(b, n_expert, d=512, ff=256, heads=4, kv=2, hd=64)


# ------------------------------------------------------------------------------------------------ data


def heavy_tailed(rows: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """Student-t (3 dof) rows x 0.02 with 1/128 outlier columns x30, float32, on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(rows, n, generator=g, device=device)
    chi2 = torch.zeros(rows, n, device=device)
    for _ in range(3):
        chi2 += torch.randn(rows, n, generator=g, device=device).square()
    x = z / torch.sqrt(chi2 / 3.0) * 0.02
    del z, chi2
    x[:, torch.randperm(n, generator=g, device=device)[: max(1, n // 128)]] *= 30.0
    return x


def _float_bits(x: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 -> F16 or BF16 (round to nearest even, as torch converts) as a uint16 / float16 host array."""
    if dtype == "F16":
        return x.half().cpu().numpy()
    return x.bfloat16().view(torch.int16).cpu().numpy().view(np.uint16)


def write_gguf(path: Path, arch: str, kv: dict, n_expert: int, n_used: int, specs: list[Spec], dtype: str,
               seed: int, device: torch.device) -> int:
    """Stream the synthetic GGUF to ``path`` (one expert at a time); returns the number of weights."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_string("general.name", f"synthetic {arch} layers (quantmix bench/error_table.py, seed {seed})")
    n_layer = 1 + max(int(s.name.split(".")[1]) for s in specs)
    w.add_uint32(f"{arch}.block_count", n_layer)
    w.add_uint32(f"{arch}.context_length", 131072)
    w.add_uint32(f"{arch}.embedding_length", kv["embedding_length"])
    w.add_uint32(f"{arch}.attention.head_count", kv["head_count"])
    w.add_uint32(f"{arch}.attention.head_count_kv", kv["head_count_kv"])
    w.add_uint32(f"{arch}.attention.key_length", kv["key_length"])
    w.add_uint32(f"{arch}.attention.value_length", kv["value_length"])
    w.add_uint32(f"{arch}.expert_count", n_expert)
    w.add_uint32(f"{arch}.expert_used_count", n_used)
    w.add_uint32("general.file_type", 1 if dtype == "F16" else 32)
    raw = gguf.GGMLQuantizationType.F16 if dtype == "F16" else gguf.GGMLQuantizationType.BF16
    for s in specs:
        n = int(np.prod(s.shape))
        if s.f32:
            w.add_tensor_info(s.name, tuple(reversed(s.shape)), np.dtype(np.float32), 4 * n)
        else:
            w.add_tensor_info(s.name, tuple(reversed(s.shape)), np.dtype(np.float16), 2 * n, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = 0
    for i, s in enumerate(specs):
        n = int(np.prod(s.shape))
        total += n
        if s.f32:
            g = np.random.default_rng([seed, i])
            v = (1.0 + 0.1 * g.standard_normal(n)) if "norm" in s.name else 0.02 * g.standard_normal(n)
            w.write_tensor_data(v.astype(np.float32).reshape(tuple(reversed(s.shape))))
            continue
        ne0 = s.shape[0]
        mats = s.shape[2] if len(s.shape) > 2 else 1
        per = n // ne0 // mats
        buf = np.empty((mats, per, ne0), dtype=np.float16 if dtype == "F16" else np.uint16)
        for e in range(mats):  # one expert (or the whole matrix) at a time: bounded device memory
            buf[e] = _float_bits(heavy_tailed(per, ne0, seed * 1_000_003 + i * 1009 + e, device), dtype)
        w.write_tensor_data(buf.reshape(tuple(reversed(s.shape))))
        del buf
    w.close()
    return total


def write_synthetic_imatrix(path: Path, specs: list[Spec], n_expert: int, n_used: int, seed: int,
                            chunks: int = 100, chunk_size: int = 512) -> Path:
    """llama-imatrix-style statistics: per input space a heavy-tailed channel profile (a few hot channels),
    experts with skewed routing (lognormal popularity, top-k), in_sum2 = count * E[a^2], in_sum = count * E[a]."""
    rng = np.random.default_rng(seed)
    tokens = chunks * chunk_size
    pop = rng.lognormal(0.0, 1.0, n_expert)
    counts_e = np.floor(pop / pop.sum() * tokens * n_used).astype(np.int64)
    counts_e[rng.integers(0, n_expert)] = 0  # one expert never routed to (weighs nothing)
    spaces: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    entries: dict[str, ImatrixEntry] = {}
    for s in specs:
        if not s.space:
            continue
        ne0 = s.shape[0]
        mats = s.shape[2] if len(s.shape) > 2 else 1
        key = (s.space, ne0)
        if key not in spaces:
            r = np.random.default_rng([seed, len(spaces) + 1])
            ms = r.lognormal(-1.0, 1.0, (mats, ne0)) * (1 + 50 * (r.random((1, ne0)) < 0.005))
            mean = r.standard_normal((mats, ne0)) * np.sqrt(ms) * 0.3
            spaces[key] = (ms.astype(np.float64), mean.astype(np.float64))
        ms, mean = spaces[key]
        counts = counts_e if mats > 1 else np.array([tokens], dtype=np.int64)
        c = counts.astype(np.float64)[:, None]
        entries[s.name] = ImatrixEntry(sums=(ms * c).astype(np.float32), counts=counts.copy(),
                                       in_sum=(mean * c).astype(np.float32))
    im = Imatrix(path=path, entries=entries, datasets=["synthetic (bench/error_table.py)"], chunk_count=chunks,
                 chunk_size=chunk_size)
    return write_imatrix(im, path)


# ------------------------------------------------------------------------------------------------ timing


class Probe:
    """Wraps error_table's private _measure and _hash_bytes to attribute time (the table is unchanged)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.measure: list[tuple[str, tuple[str, ...], int, float]] = []  # tensor, types measured, weights, s
        self.hash_s = 0.0
        self._orig = (et._measure, et._hash_bytes)

    def __enter__(self) -> Probe:
        m, h = self._orig

        def measure(data, src_type, shape, qtypes, st, device, name, feeder=None):  # type: ignore[no-untyped-def]
            _sync(self.device)
            t0 = time.perf_counter()
            r = m(data, src_type, shape, qtypes, st, device, name, feeder)
            _sync(self.device)
            self.measure.append((name, tuple(qtypes), int(np.prod(shape)), time.perf_counter() - t0))
            return r

        def hash_bytes(data, threads=None):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            r = h(data, threads)
            self.hash_s += time.perf_counter() - t0
            return r

        et._measure, et._hash_bytes = measure, hash_bytes
        return self

    def __exit__(self, *exc: object) -> None:
        et._measure, et._hash_bytes = self._orig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_table(gguf_path: Path, im_path: Path, cands: list[str], device: torch.device, cache_root: Path,
                tensors: list[str] | None) -> tuple[et.ErrorTable, float, Probe]:
    with Probe(device) as pr:
        _sync(device)
        t0 = time.perf_counter()
        tab = et.error_table(gguf_path, im_path, cands, device, progress=False, cache_root=cache_root,
                             tensors=tensors)
        _sync(device)
        return tab, time.perf_counter() - t0, pr


def _np_to_f32(raw: np.ndarray, type_name: str) -> np.ndarray:
    """The host conversion error_table used before 2026-11-23 (numpy, one thread), for the comparison."""
    if type_name == "F16":
        return raw.view("<f2").astype(np.float32)
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def slab_breakdown(gguf_path: Path, im_path: Path, device: torch.device, types: list[str], repeat: int = 3) -> dict:
    """For one expert of the first routed-expert tensor: the old host path (numpy float conversion, pageable
    copy of the float32 slab), the new one (copy of the raw bytes into pinned memory, upload, conversion on the
    device), the device's quant_error alone per type (input already on the device), medians of ``repeat``;
    and the tensor hash, piece-parallel vs one thread."""
    from quantmix.calibration.imatrix_io import read_imatrix
    from quantmix.export.gguf_writer import open_source
    from quantmix.formats.api import quant_error

    src = {t.name: t for t in open_source(gguf_path).tensors}
    name = next(n for n in src if n.endswith("ffn_gate_exps.weight"))
    s = src[name]
    shape = tuple(int(d) for d in s.shape)
    st = et._stats(read_imatrix(im_path), name, shape)
    ne0, rows = shape[0], shape[1]
    nbytes = ne0 * rows * (s.data.size // int(np.prod(shape)))
    e = int(np.argmax(st.counts))
    raw = s.data[e * nbytes:(e + 1) * nbytes]
    out: dict = {"tensor": name, "expert": e, "weights": ne0 * rows}

    def med(fn) -> float:  # type: ignore[no-untyped-def]
        ts = []
        for _ in range(repeat):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    out["old_np_to_f32_s"] = med(lambda: _np_to_f32(raw, s.type_name))
    x_host = torch.from_numpy(_np_to_f32(raw, s.type_name).reshape(rows, ne0))
    out["old_h2d_pageable_f32_s"] = med(lambda: x_host.to(device))
    if device.type == "cuda":
        pinned = torch.empty(raw.size, dtype=torch.uint8, pin_memory=True)
        out["new_copy_to_pinned_s"] = med(lambda: np.copyto(pinned.numpy(), raw))
        out["new_h2d_pinned_raw_s"] = med(lambda: pinned.to(device, non_blocking=True))
        raw_dev = pinned.to(device)
        out["new_convert_on_device_s"] = med(lambda: staging.to_f32(raw_dev, s.type_name))
        x = staging.to_f32(raw_dev, s.type_name).reshape(rows, ne0)
        assert torch.equal(x.cpu(), x_host), "device conversion differs from the host's"
    else:
        x = x_host
    w = torch.from_numpy(st.w[e].copy()).to(device)
    wa = (w.double() * torch.from_numpy(st.a[e].copy()).to(device).double())
    for q in types:
        quant_error(x, q, w, wa)  # warm-up (kernel build / load)
        out[f"quant_error_{q}_s"] = med(lambda q=q: quant_error(x, q, w, wa))
    t0 = time.perf_counter()
    et._hash_bytes(s.data)
    out["hash_whole_tensor_s"] = time.perf_counter() - t0
    out["hash_threads"] = torch.get_num_threads()
    t0 = time.perf_counter()
    et._hash_bytes(s.data, 1)
    out["hash_whole_tensor_1thread_s"] = time.perf_counter() - t0
    out["hash_whole_tensor_bytes"] = int(s.data.size)
    return out


def warm_up(device: torch.device, types: list[str]) -> float:
    """Build / load every kernel once (NVRTC and the codebook kernels), so no timing below includes it."""
    from quantmix.formats.api import quant_error

    t0 = time.perf_counter()
    x = heavy_tailed(64, 512, 1, device)
    w = torch.rand(512, device=device) + 0.1
    for q in types:
        quant_error(x, q, w, w.double())
    _sync(device)
    return time.perf_counter() - t0


def write_phase(gguf_path: Path, im_path: Path, device: torch.device, work: Path, ftypes: list[str]) -> dict:
    """The GGUF writer (``quantmix quantize``'s quantize_gguf) on ``device``: seconds and bytes per mix."""
    from quantmix.export.gguf_writer import quantize_gguf
    from quantmix.planning.recipe import RecipeSpec

    out: dict = {}
    for ft in ftypes:
        dst = work / f"out-{ft}.gguf"
        _sync(device)
        t0 = time.perf_counter()
        quantize_gguf(gguf_path, RecipeSpec(ftype=ft), dst, im_path, device=device, progress=False)
        _sync(device)
        out[ft] = {"s": time.perf_counter() - t0, "bytes": dst.stat().st_size}
        dst.unlink()
    return out


def write_check(work: Path, device: torch.device, dtype: str, seed: int, ftypes: list[str]) -> dict:
    """The writer's bytes on ``device`` equal the CPU path's (small glm4moe GGUF, 8 experts): sha256 of each."""
    import hashlib

    from quantmix.export.gguf_writer import quantize_gguf
    from quantmix.planning.recipe import RecipeSpec

    specs = small_layer(0, 8)
    g = work / "wcheck.gguf"
    write_gguf(g, "glm4moe", PRESETS["glm4.6"][4], 8, 2, specs, dtype, seed + 9, torch.device("cpu"))
    im = write_synthetic_imatrix(work / "wcheck.imatrix.gguf", specs, 8, 2, seed + 9, chunks=4)
    res = {}
    for ft in ftypes:
        digests = {}
        for dev in ("cpu", device):
            dst = work / f"wcheck-{ft}-{torch.device(dev).type}.gguf"
            quantize_gguf(g, RecipeSpec(ftype=ft), dst, im, device=dev, progress=False)
            digests[torch.device(dev).type] = hashlib.sha256(dst.read_bytes()).hexdigest()
            dst.unlink()
        res[ft] = {"same_bytes": len(set(digests.values())) == 1, **digests}
    return res


def check_against_cpu(work: Path, device: torch.device, dtype: str, seed: int) -> dict:
    """The table on ``device`` vs the CPU (torch) table on a small glm4moe GGUF, every type, no cache."""
    specs = small_layer(0, 8)
    g = work / "check.gguf"
    write_gguf(g, "glm4moe", PRESETS["glm4.6"][4], 8, 2, specs, dtype, seed + 7, torch.device("cpu"))
    im = write_synthetic_imatrix(work / "check.imatrix.gguf", specs, 8, 2, seed + 7, chunks=4)
    only = ["blk.0.ffn_down_exps.weight", "blk.0.attn_k.weight"]  # 3-D per-expert path and a 2-D one
    t0 = time.perf_counter()
    cpu = et.error_table(g, im, None, "cpu", cache=False, progress=False, tensors=only)
    t_cpu = time.perf_counter() - t0
    t0 = time.perf_counter()
    dev = et.error_table(g, im, None, device, cache=False, progress=False, tensors=only)
    t_dev = time.perf_counter() - t0
    worst = 0.0
    where = ""
    n = 0
    for a, b in zip(cpu.rows, dev.rows, strict=True):
        assert (a.tensor, a.type) == (b.tensor, b.type)
        pairs = [(a.rel_err, b.rel_err), (a.bias_term, b.bias_term)]
        for ea, eb in zip(a.experts or [], b.experts or [], strict=True):
            pairs += [(ea[1], eb[1]), (ea[2], eb[2])]
        for u, v in pairs:
            n += 1
            r = abs(u - v) / max(abs(u), 1e-300) if u != v else 0.0
            if r > worst:
                worst, where = r, f"{a.tensor} {a.type} ({a.backend} vs {b.backend})"
    return {"rows": len(cpu.rows), "values": n, "worst_rel_diff": worst, "worst_at": where, "pass": worst <= 1e-6,
            "cpu_s": t_cpu, "device_s": t_dev,
            "device_backends": sorted({r.backend for r in dev.rows})}


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="glm4.6")
    ap.add_argument("--experts", type=int, default=None, help="routed experts per layer (default: the model's)")
    ap.add_argument("--layers", type=int, default=1, help="MoE layers in the synthetic GGUF")
    ap.add_argument("--small", action="store_true", help="small shapes (512-wide, 8 experts): CPU smoke runs")
    ap.add_argument("--dtype", choices=["BF16", "F16"], default="BF16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sets", default="kquants,all", help="comma list of candidate sets: kquants, all")
    ap.add_argument("--all-tensors", default="",
                    help="for the 'all' set, measure only tensors whose name contains one of these (comma list)")
    ap.add_argument("--check", action="store_true", help="device table == CPU table within 1e-6 (small GGUF)")
    ap.add_argument("--breakdown", action="store_true", help="time one expert slab's steps")
    ap.add_argument("--workdir", default=None, help="where the GGUF, imatrix and caches go (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--write", default="", help="also time the GGUF writer for these file types (comma list, "
                    "e.g. Q4_K_M,IQ4_XS), and check its bytes on --device against the CPU's on a small GGUF")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    res: dict = {"argv": sys.argv[1:], "device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="qm-etbench-"))
    work.mkdir(parents=True, exist_ok=True)

    def dump() -> None:
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1, default=str))

    all_types = [q for q in supported_types() if q not in et.FLOAT_TYPES]
    if device.type == "cuda":
        res["kernel_warmup_s"] = warm_up(device, all_types)
        print(f"kernel build/load: {res['kernel_warmup_s']:.1f} s", flush=True)
    if a.check:
        res["check"] = check_against_cpu(work, device, a.dtype, a.seed)
        print("check vs CPU:", json.dumps(res["check"]), flush=True)
        dump()

    arch, layer_fn, n_exp_default, n_used, kv = PRESETS[a.preset]
    n_exp = a.experts or n_exp_default
    specs = [s for b in range(a.layers) for s in (small_layer(b, n_exp) if a.small else layer_fn(b, n_exp))]
    gpath, ipath = work / "model.gguf", work / "model.imatrix.gguf"
    gen_dev = device if device.type == "cuda" else torch.device("cpu")
    t0 = time.perf_counter()
    n_w = write_gguf(gpath, "glm4moe" if a.small else arch, kv, n_exp, n_used, specs, a.dtype, a.seed, gen_dev)
    write_synthetic_imatrix(ipath, specs, n_exp, n_used, a.seed)
    res["gguf"] = {"preset": a.preset, "small": a.small, "experts": n_exp, "layers": a.layers, "dtype": a.dtype,
                   "weights": n_w, "bytes": gpath.stat().st_size, "build_s": time.perf_counter() - t0}
    print("gguf:", json.dumps(res["gguf"]), flush=True)
    dump()

    if a.write:
        fts = a.write.split(",")
        if device.type == "cuda":
            res["write_check"] = write_check(work, device, a.dtype, a.seed, fts)
            print("writer bytes vs CPU:", json.dumps(res["write_check"]), flush=True)
        res["write"] = write_phase(gpath, ipath, device, work, fts)
        print("writer:", json.dumps(res["write"]), flush=True)
        dump()

    if a.breakdown:
        res["breakdown"] = slab_breakdown(gpath, ipath, device, all_types)
        print("breakdown:", json.dumps(res["breakdown"]), flush=True)
        dump()

    res["sets"] = {}
    for set_name in [s for s in a.sets.split(",") if s]:
        cands = KQUANTS if set_name == "kquants" else all_types if set_name == "all" else set_name.split("+")
        tensors = None
        if set_name == "all" and a.all_tensors:
            from quantmix.model.catalog import catalog_from_gguf

            keys = a.all_tensors.split(",")
            tensors = [t.name for t in catalog_from_gguf(gpath) if t.quantizable and any(k in t.name for k in keys)]
        root = work / f"cache-{set_name}"
        runs = {}
        for phase in ("cold", "warm"):
            tab, secs, pr = timed_table(gpath, ipath, cands, device, root, tensors)
            names = sorted({r.tensor for r in tab.rows})
            w_model = sum(int(np.prod(next(s.shape for s in specs if s.name == n))) for n in names)
            w_pairs = sum(int(np.prod(next(s.shape for s in specs if s.name == r.tensor))) for r in tab.rows)
            runs[phase] = {"s": secs, "pairs": len(tab.rows), "tensors": len(names), "weights": w_model,
                           "types": len({r.type for r in tab.rows}),
                           "model_w_per_s": w_model / secs, "w_x_type_per_s": w_pairs / secs,
                           "pairs_per_s": len(tab.rows) / secs, "hash_s": pr.hash_s,
                           "measure_s": sum(m[3] for m in pr.measure),
                           "measured_pairs": sum(len(m[1]) for m in pr.measure)}
            if phase == "cold":
                runs["per_tensor_class"] = {}
                for n_, qs, nw, s_ in pr.measure:  # one pass per tensor measures all its types
                    k = n_.split(".")[2]
                    v = runs["per_tensor_class"].setdefault(k, {"weights": 0, "w_x_type": 0, "s": 0.0})
                    v["weights"] += nw
                    v["w_x_type"] += nw * len(qs)
                    v["s"] += s_
            print(f"[{set_name} {phase}] " + json.dumps(runs[phase]), flush=True)
        res["sets"][set_name] = runs
        dump()

    # summary table (last, so the tail of the output carries it)
    print(f"\n{res.get('gpu', device)}; {res['gguf']}")
    print("| candidate set | types | tensors | (tensor,type) | weights | phase | s | model w/s | w x type/s | pairs/s |"
          " hash s | measure s |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for sn, runs in res["sets"].items():
        for ph in ("cold", "warm"):
            r = runs[ph]
            print(f"| {sn} | {r['types']} | {r['tensors']} | {r['pairs']} | {r['weights'] / 1e9:.3f} G | {ph} "
                  f"| {r['s']:.1f} | {r['model_w_per_s'] / 1e9:.3f} G | {r['w_x_type_per_s'] / 1e9:.2f} G "
                  f"| {r['pairs_per_s']:.2f} | {r['hash_s']:.1f} | {r['measure_s']:.1f} |")
    for sn, runs in res["sets"].items():
        print(f"\nper tensor class, {sn} cold (inside the one pass per tensor, all its types):")
        print("| tensor | weights | s | model G w/s | G w x type/s |")
        print("|---|---:|---:|---:|---:|")
        for k, v in runs.get("per_tensor_class", {}).items():
            print(f"| {k} | {v['weights'] / 1e9:.3f} G | {v['s']:.2f} | {v['weights'] / v['s'] / 1e9:.3f} "
                  f"| {v['w_x_type'] / v['s'] / 1e9:.2f} |")
    if "breakdown" in res:
        b = res["breakdown"]
        print("\nbreakdown (ms): " + ", ".join(f"{k[:-2]} {v * 1e3:.2f}" for k, v in b.items() if k.endswith("_s")))
    dump()
    if "check" in res and not res["check"]["pass"]:
        print("CHECK FAILED", res["check"], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
