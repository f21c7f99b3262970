"""Benchmark: quantize / dequantize throughput of quantmix's numerics next to ggml's C quantizer.

Iterates over ``supported_types()``, so every type module that registers numerics is measured.
Shapes are real layers: a dense FFN (rows 4096 x 14336 per row, Llama-3-8B ffn_down) and a stack of
MoE experts (160 experts x 1536 rows x 5120 per row); ``--scale`` keeps the row length and shrinks
the row count (CPU runs need it). Also checks the bytes against ggml's on every measured tensor.

    .venv/bin/python bench/formats.py --scale 0.01                # CPU
    .venv/bin/python bench/formats.py --device cuda --scale 0.25  # GPU (ggml column still on CPU)

Prints a markdown table: weights per second (millions) for each type, with and without an imatrix.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from quantmix.formats.api import dequantize, quantize, supported_types
from quantmix.formats.registry import get_type

SHAPES = {
    # name: (rows, n_per_row)
    "dense 4096x14336": (4096, 14336),
    "experts 5120x1536x160": (1536 * 160, 5120),
}


def weights(rows: int, n: int, seed: int) -> torch.Tensor:
    """Heavy-tailed (student-t, 3 dof) rows with a few outlier columns, like LLM weights."""
    g = torch.Generator().manual_seed(seed)
    x = _student_t(rows, n, g)
    cols = torch.randperm(n, generator=g)[: max(1, n // 128)]
    x[:, cols] *= 30.0
    return x


def _student_t(rows: int, n: int, g: torch.Generator) -> torch.Tensor:
    z = torch.randn(rows, n, generator=g)
    chi2 = torch.randn(rows, n, 3, generator=g).square().sum(-1)
    return (z / torch.sqrt(chi2 / 3.0) * 0.02).float()


def imatrix(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(n, generator=g) ** 2 * 0.1).float()


def _timed(fn, device: str) -> tuple[float, object]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    from quantmix.tools.ggml_oracle import oracle_quantize

    types = args.types or [t for t in supported_types() if t != "F32"]
    results = []
    for shape_name, (rows0, n) in SHAPES.items():
        rows = max(1, int(round(rows0 * args.scale)))
        x_cpu = weights(rows, n, seed=0)
        im_cpu = imatrix(n, seed=0)
        x = x_cpu.to(args.device)
        im = im_cpu.to(args.device)
        x_np = x_cpu.numpy()
        for qtype in types:
            t = get_type(qtype)
            if not t.fits_row(n):
                continue
            for use_im in (False, True):
                m = im if use_im else None
                dequantize(quantize(x[:2], qtype, m), qtype, n)  # warm-up (CUDA kernels, lazy imports)
                tq, q = _timed(lambda: quantize(x, qtype, m), args.device)
                tdq, _ = _timed(lambda: dequantize(q, qtype, n), args.device)
                row = {"shape": f"{shape_name} ({rows}x{n})", "type": qtype, "imatrix": use_im,
                       "device": args.device, "q": x.numel() / tq, "dq": x.numel() / tdq}
                if not args.no_ggml:
                    tc, ref = _timed(lambda: oracle_quantize(x_np, qtype, im_cpu.numpy() if use_im else None), "cpu")
                    row["ggml"] = x.numel() / tc
                    row["exact"] = bool(np.array_equal(q.cpu().numpy(), ref))
                results.append(row)
                print(_fmt_row(row), file=sys.stderr, flush=True)
    return results


def _fmt_row(r: dict[str, object]) -> str:
    ggml = f"{r['ggml'] / 1e6:.2f}" if "ggml" in r else "-"
    ratio = f"{r['q'] / r['ggml']:.2f}" if "ggml" in r else "-"
    exact = {True: "yes", False: "NO"}.get(r.get("exact"), "-")  # type: ignore[arg-type]
    return (f"| {r['shape']} | {r['type']} | {'yes' if r['imatrix'] else 'no'} | {r['device']} | "
            f"{r['q'] / 1e6:.2f} | {r['dq'] / 1e6:.1f} | {ggml} | {ratio} | {exact} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.01, help="fraction of each shape's rows to use (default 0.01)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--types", nargs="*", help="types to measure (default: every supported type but F32)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; ggml's quantizer is single-threaded)")
    ap.add_argument("--no-ggml", action="store_true", help="skip the ggml C quantizer column")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available")
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} torch thread(s)"
    print(f"quantmix formats benchmark: {dev}, scale {args.scale}; throughput in millions of weights per second\n")
    print("| shape | type | imatrix | device | quantize Mw/s | dequantize Mw/s | ggml C quantize Mw/s | quantize / ggml | bytes = ggml |")
    print("|---|---|---|---|---:|---:|---:|---:|---|")
    for r in run(args):
        print(_fmt_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
