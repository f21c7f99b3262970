import sys, time
import numpy as np, torch
sys.path.insert(0, "src")
from quantmix.formats.api import quantize, dequantize, supported_types
z = np.load(".devdata/ref.npz")
x = torch.from_numpy(z["x"]).cuda()
print(torch.cuda.get_device_name(), torch.__version__)
bad = 0
for t in [str(s) for s in z["types"]]:
    for k in ("none", "random", "zeros"):
        im = None if k == "none" else torch.from_numpy(z["im_" + k]).cuda()
        ref = z[f"q_{t}_{k}"]
        try:
            q = quantize(x, t, im).cpu().numpy()
        except Exception as e:
            print(f"{t} imatrix={k}: ERROR {type(e).__name__}: {e}"); bad += 1; continue
        rows = np.nonzero((q != ref).any(1))[0]
        dq = dequantize(torch.from_numpy(ref).cuda(), t, x.shape[1]).cpu()
        dqc = dequantize(torch.from_numpy(ref), t, x.shape[1])
        nan = torch.isnan(dqc)
        same_dq = torch.equal(torch.isnan(dq), nan) and torch.equal(dq[~nan].view(torch.int32), dqc[~nan].view(torch.int32))
        status = "exact" if len(rows) == 0 else f"{len(rows)} rows differ {rows[:8].tolist()}"
        if len(rows) or not same_dq: bad += 1
        print(f"{t} imatrix={k}: quantize {status}; dequantize cuda==cpu {same_dq}")
print("CUDA mismatches:", bad)
