"""EXL3 on the lent GPU: build exllamav3's extension, quantize real-shaped synthetic linears at every rate, and keep
small fixtures for the CPU tests.

Run there (see bench/exl3_device.sh): it times the extension's build, quantizes each shape at each rate with
exllamav3's own quantizer (quantize_exl3, a Hessian from synthetic activations), checks that the stored tensors
reconstruct the returned weight (LinearEXL3.get_weight_tensor), and writes
  $OUT/exl3-rates.jsonl      one line per (shape, rate): proxy error, relative MSE, seconds, stored bytes
  $OUT/exl3-fixture.safetensors  one 256x512 linear at rates 2, 3.5 and 4 as exllamav3 stores it (suh, svh, trellis,
                             mul1) plus the source weight and H, for tests/test_exl3.py
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def synthetic(k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [in, out] and an input Hessian with a few outlier channels, as real activations have."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(k, n, generator=g) * 0.02
    x = torch.randn(4096, k, generator=g)
    x[:, :8] *= 20.0
    h = (x.T @ x) / x.shape[0]
    return w, h


def quantize(w: torch.Tensor, h: torch.Tensor, rate: float, seed: int):
    from exllamav3.modules.quant.exl3_lib.quantize import quantize_exl3
    hd = {"H": h.cuda().clone(), "packed": False, "n": h.shape[0], "first_key": "x", "count": 1,
          "finalized": False, "num_total": 0, "inf_nan": torch.zeros(2, dtype=torch.long, device="cuda"),
          "device": torch.device("cuda")}
    qa = {"seed": seed, "K": rate, "devices": [0], "device_ratios": None, "apply_out_scales": None,
          "debug_dir": "/tmp/exl3-debug", "mul1": True}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    wq, proxy, tensors = quantize_exl3(w.cuda(), hd, qa, return_weight_q=True)
    torch.cuda.synchronize()
    return wq, float(proxy), tensors, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--shapes", default="256x512,5120x1536,1536x5120,5120x12288")
    ap.add_argument("--rates", default="1,1.5,2,2.5,3,3.5,4,5,6,8")
    args = ap.parse_args()
    t0 = time.perf_counter()
    from exllamav3.ext import exllamav3_ext  # noqa: F401  (builds on first import)
    from exllamav3.modules.quant.exl3 import LinearEXL3
    print(f"extension ready in {time.perf_counter() - t0:.1f} s", flush=True)
    rates = [float(r) if "." in r else int(r) for r in args.rates.split(",")]
    fixture: dict[str, torch.Tensor] = {}
    with open(os.path.join(args.out, "exl3-rates.jsonl"), "w") as f:
        for si, shape in enumerate(args.shapes.split(",")):
            k, n = (int(v) for v in shape.split("x"))
            w, h = synthetic(k, n, si)
            if shape == "256x512":
                fixture["weight"], fixture["H"] = w.contiguous(), h.contiguous()
            for rate in rates:
                wq, proxy, tensors, secs = quantize(w, h, rate, si)
                lin = LinearEXL3(None, k, n, suh=tensors["suh"], svh=tensors["svh"], trellis=tensors["trellis"],
                                 mul1=tensors.get("mul1"))
                rec = lin.get_weight_tensor().float()
                err = w.cuda() - wq.float()
                rel = float((err.pow(2).sum() / w.cuda().pow(2).sum()).item())
                hw = float(torch.trace(err.T.double() @ h.cuda().double() @ err.double())
                           / torch.trace(w.cuda().T.double() @ h.cuda().double() @ w.cuda().double()))
                line = {"shape": shape, "rate": rate, "proxy_err": proxy, "h_weighted_err": hw, "rel_mse": rel,
                        "seconds": round(secs, 3), "rec_max_diff": float((rec - wq.float()).abs().max()),
                        "rec_shape": list(rec.shape),
                        "bytes": {name: t.numel() * t.element_size() for name, t in tensors.items()},
                        "trellis_shape": list(tensors["trellis"].shape)}
                print(json.dumps(line), flush=True)
                f.write(json.dumps(line) + "\n")
                if shape == "256x512" and rate in (2, 3.5, 4):
                    for name, t in tensors.items():
                        fixture[f"k{rate}.{name}"] = t.cpu().contiguous()
                    fixture[f"k{rate}.weight_q"] = wq.float().cpu().contiguous()
    if fixture:
        from safetensors.torch import save_file
        save_file(fixture, os.path.join(args.out, "exl3-fixture.safetensors"))


if __name__ == "__main__":
    main()
