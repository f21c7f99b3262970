"""Benchmark: quantize / quant_error / dequantize throughput of quantmix's numerics next to ggml's C quantizer.

Iterates over ``supported_types()``, so every type module that registers numerics is measured, each with
and without an imatrix. Shapes are real layers: a dense FFN (4096 rows x 14336 per row, Llama-3-8B
ffn_down) and GLM-4.6's routed experts (160 experts x 1536 rows x 5120 per row); ``--scale`` keeps the
row length and shrinks the row count, ``--max-weights`` caps each measurement. Weights are synthetic
(heavy-tailed with outlier columns), generated on the measured device.

Every measured tensor is checked: ``--check-rows`` evenly spaced rows are compared byte for byte with
ggml's C quantizer (``ggml_quantize_chunk``), or with quantmix's torch numerics on the CPU where the ggml
library is not available (``exact`` column: ``ggml`` / ``torch`` / ``NO``). GPU times are medians of
``--repeat`` runs between CUDA synchronizations, after a warm-up (kernel compilation excluded).

    .venv/bin/python bench/formats.py                                   # CPU (small sizes)
    .venv/bin/python bench/formats.py --device cuda --scale 1 --no-ggml # GPU, full dense layer

The codebook types (IQ1_* .. IQ3_*) run CUDA kernels (formats/gpu/iqkernels.py) from inside their torch
numerics on CUDA tensors (the ``backend`` column says ``iq-kernel``); ``QUANTMIX_IQ_KERNELS=0`` measures the
pure torch numerics instead. ``--imatrix-only`` skips the paths without an imatrix (and types that cannot
run without one are always skipped there).

Prints a markdown table: millions of weights per second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from quantmix.formats import gpu
from quantmix.formats.api import dequantize, quant_error, quantize, supported_types
from quantmix.formats.registry import get_type

SHAPES = {
    # name: (rows, n_per_row)
    "dense 4096x14336": (4096, 14336),
    "experts 5120x1536x160": (1536 * 160, 5120),
}


def weights(rows: int, n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """Heavy-tailed (student-t, 3 dof) rows with a few outlier columns, like LLM weights."""
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(rows, n, generator=g, device=device)
    chi2 = torch.zeros(rows, n, device=device)
    for _ in range(3):
        chi2 += torch.randn(rows, n, generator=g, device=device).square()
    x = (z / torch.sqrt(chi2 / 3.0) * 0.02).float()
    del z, chi2
    cols = torch.randperm(n, generator=g, device=device)[: max(1, n // 128)]
    x[:, cols] *= 30.0
    return x


def imatrix(n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed + 1)
    return (torch.randn(n, generator=g, device=device) ** 2 * 0.1).float()


def _timed(fn: Callable[[], object], device: str, repeat: int) -> tuple[float, object]:
    """Median seconds of ``repeat`` calls (synchronized on CUDA) and the last result."""
    times = []
    out: object = None
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _ggml_available() -> bool:
    try:
        from quantmix.tools.ggml_oracle import _lib

        _lib()
        return True
    except Exception:  # noqa: BLE001 - no llama.cpp build here: fall back to the torch reference
        return False


def _reference_bytes(x_rows: np.ndarray, qtype: str, im: np.ndarray | None, use_ggml: bool) -> np.ndarray:
    if use_ggml:
        from quantmix.tools.ggml_oracle import oracle_quantize

        return oracle_quantize(x_rows, qtype, im)
    return quantize(torch.from_numpy(x_rows), qtype, None if im is None else torch.from_numpy(im),
                    backend="torch").numpy()


def _iq_kernel(qtype: str) -> bool:
    """The codebook types run CUDA kernels inside their torch numerics (gpu/iqkernels.py) unless
    QUANTMIX_IQ_KERNELS=0."""
    import os

    from quantmix.formats.gpu import iqkernels

    return qtype in iqkernels.TYPES and os.environ.get(iqkernels.ENV_SWITCH, "1") != "0"


def _backend_name(qtype: str, qe: object, device: str) -> str:
    b = str(getattr(qe, "backend", "torch"))
    return "iq-kernel" if b == "torch" and device == "cuda" and _iq_kernel(qtype) else b


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    types = args.types or [t for t in supported_types() if t != "F32"]
    use_ggml = _ggml_available()
    results = []
    for shape_name, (rows0, n) in SHAPES.items():
        if args.shapes and not any(s in shape_name for s in args.shapes):
            continue
        rows = max(1, min(int(round(rows0 * args.scale)), args.max_weights // n))
        x = weights(rows, n, seed=0, device=args.device)
        im = imatrix(n, seed=0, device=args.device)
        check = np.unique(np.linspace(0, rows - 1, min(rows, args.check_rows)).round().astype(np.int64))
        x_check = x[torch.from_numpy(check).to(x.device)].cpu().numpy()
        im_np = im.cpu().numpy()
        for qtype in types:
            t = get_type(qtype)
            if not t.fits_row(n):
                continue
            # the torch numerics on a GPU are far slower than the kernels: measure them on fewer rows
            nrows = rows
            if args.device == "cuda" and not (gpu.has_kernel(qtype) or _iq_kernel(qtype)):
                nrows = max(1, min(rows, args.max_weights_torch // n))
            xt = x[:nrows]
            chk = check[check < nrows]
            for use_im in (False, True):
                if (not use_im and (args.imatrix_only or t.requires_imatrix)):
                    continue  # ggml refuses IQ2_XXS / IQ2_XS / IQ1_S without an imatrix
                m = im if use_im else None
                dequantize(quantize(x[:2], qtype, m), qtype, n)  # warm-up: kernel builds, lazy imports
                quant_error(x[:2], qtype, m)
                tq, q = _timed(lambda: quantize(xt, qtype, m), args.device, args.repeat)
                te, qe = _timed(lambda: quant_error(xt, qtype, m), args.device, args.repeat)
                tdq, _ = _timed(lambda: dequantize(q, qtype, n), args.device, args.repeat)
                assert isinstance(q, torch.Tensor)
                ref = _reference_bytes(x_check[: len(chk)], qtype, im_np if use_im else None, use_ggml)
                same = bool(np.array_equal(q[torch.from_numpy(chk).to(q.device)].cpu().numpy(), ref))
                row = {"shape": f"{shape_name} ({nrows}x{n})", "type": qtype, "imatrix": use_im,
                       "device": args.device, "q": xt.numel() / tq, "err": xt.numel() / te, "dq": xt.numel() / tdq,
                       "backend": _backend_name(qtype, qe, args.device),
                       "exact": ("ggml" if use_ggml else "torch") if same else "NO"}
                if not args.no_ggml and use_ggml:
                    from quantmix.tools.ggml_oracle import oracle_quantize

                    xs = x[: max(1, min(rows, args.ggml_weights // n))].cpu().numpy()
                    tc, _ = _timed(lambda: oracle_quantize(xs, qtype, im_np if use_im else None), "cpu", 1)
                    row["ggml"] = xs.size / tc
                results.append(row)
                print(_fmt_row(row), file=sys.stderr, flush=True)
        del x
    return results


def _fmt_row(r: dict[str, object]) -> str:
    ggml = f"{r['ggml'] / 1e6:.2f}" if "ggml" in r else "-"
    ratio = f"{r['q'] / r['ggml']:.2f}" if "ggml" in r else "-"
    return (f"| {r['shape']} | {r['type']} | {'yes' if r['imatrix'] else 'no'} | {r['device']} | "
            f"{r['q'] / 1e6:.2f} | {r['err'] / 1e6:.2f} ({r['backend']}) | {r['dq'] / 1e6:.1f} | {ggml} | {ratio} | "
            f"{r['exact']} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.01, help="fraction of each shape's rows to use (default 0.01)")
    ap.add_argument("--max-weights", type=int, default=1 << 20,
                    help="cap on the weights of one measured tensor (default 2^20; raise it on a GPU)")
    ap.add_argument("--max-weights-torch", type=int, default=1 << 25,
                    help="on CUDA, cap for types without kernels (torch numerics; default 2^25)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--types", nargs="*", help="types to measure (default: every supported type but F32)")
    ap.add_argument("--shapes", nargs="*", help="substrings of the shape names to measure (default: all)")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per figure, median reported (default 1)")
    ap.add_argument("--check-rows", type=int, default=8, help="rows compared byte for byte with ggml (default 8)")
    ap.add_argument("--ggml-weights", type=int, default=1 << 20, help="weights given to ggml's C quantizer for its column")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; ggml's quantizer is single-threaded)")
    ap.add_argument("--no-ggml", action="store_true", help="skip the ggml C quantizer timing column")
    ap.add_argument("--imatrix-only", action="store_true", help="measure only the imatrix paths")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available")
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} torch thread(s)"
    print(f"quantmix formats benchmark: {dev}, scale {args.scale}, max {args.max_weights} weights; "
          "throughput in millions of weights per second\n")
    print("| shape | type | imatrix | device | quantize Mw/s | quant_error Mw/s (backend) | dequantize Mw/s | "
          "ggml C quantize Mw/s | quantize / ggml | bytes = |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in run(args):
        print(_fmt_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
