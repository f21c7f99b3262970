"""Benchmark: the codebook-quant CUDA kernels alone (gpu/iqgrids.cu), weights per second.

Why a separate script: ``bench/formats.py`` times the public API (tensor conversion, chunking, the torch
wrapper); this one times ``iqkernels.quantize_rows`` on one whole layer already on the GPU as float32, so
the figure is the kernel's (BENCHMARKS.md's "kernel only" column). Same data as formats.py: 13107 x 5120
heavy-tailed weights with outlier columns (67 M weights) and a synthetic imatrix. CUDA events around each
call, median of ``--repeat`` after a warm-up (compilation excluded). ``--check-rows`` rows of every type
are compared byte for byte with the torch numerics on the CPU (the same bytes as ggml's; the tests check
those against ggml itself), so a fast wrong kernel cannot pass.

    python bench/iq_kernels.py                       # all seven types
    python bench/iq_kernels.py --types IQ2_XS IQ3_S --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from formats import imatrix, weights  # noqa: E402

from quantmix.formats.api import quantize  # noqa: E402
from quantmix.formats.gpu import iqkernels  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="*", default=list(iqkernels.TYPES), help="types (default: all seven)")
    ap.add_argument("--rows", type=int, default=13107, help="rows of the layer (default 13107)")
    ap.add_argument("--n", type=int, default=5120, help="weights per row, a multiple of 256 (default 5120)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per type, median reported (default 3)")
    ap.add_argument("--check-rows", type=int, default=4, help="rows compared with the CPU numerics (default 4)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("iq_kernels.py: needs a CUDA device", file=sys.stderr)
        return 2
    bad = [t for t in args.types if t not in iqkernels.TYPES]
    if bad:
        print(f"iq_kernels.py: no codebook kernel for {', '.join(bad)} (have {', '.join(iqkernels.TYPES)})", file=sys.stderr)
        return 2
    x = weights(args.rows, args.n, seed=0, device="cuda")
    im = imatrix(args.n, seed=0, device="cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.rows} x {args.n} = {x.numel() / 1e6:.1f} M weights")
    print("| type | split | kernel G w/s | ms | rows checked vs CPU |")
    print("|---|---|---:|---:|---|")
    rows = torch.linspace(0, args.rows - 1, args.check_rows).long().unique()
    for qt in args.types:
        iqkernels.quantize_rows(qt, x[:64], im)  # compile / load, warm caches
        torch.cuda.synchronize()
        times = []
        out = None
        for _ in range(args.repeat):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = iqkernels.quantize_rows(qt, x, im)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        t = statistics.median(times)
        assert out is not None
        cpu = quantize(x[rows].cpu(), qt, im.cpu())  # the torch numerics on the CPU
        ok = bool(torch.equal(out[rows].cpu(), cpu))
        split = "warp per super-block" if qt in iqkernels.WARP_TYPES else "thread per super-block"
        print(f"| {qt} | {split} | {x.numel() / t / 1e9:.2f} | {t * 1e3:.1f} | {'equal' if ok else 'DIFFER'} ({len(rows)}) |")
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
