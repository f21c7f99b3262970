"""Source tensor bytes -> float32 slabs on the compute device, the way every pass over a checkpoint reads them.

Why one module: the error table and the GGUF writer both stream a tensor's raw little-endian slabs (F32, F16,
BF16, or MXFP4 blocks as released) to the device and need exactly the same float32 values there (the writer's
bytes must equal llama-quantize's, the table must measure those bytes). On CUDA the raw bytes travel (half the
traffic of float32 for BF16) through pinned staging buffers filled by a worker thread, and are converted on the
device.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from quantmix.formats import api as _api
from quantmix.formats.registry import RELEASE_QUANT_TYPES, get_type


def to_f32(raw: torch.Tensor, type_name: str) -> torch.Tensor:
    """Raw little-endian bytes (uint8, on any device) -> float32, exactly as the GGUF writer converts them
    (BF16: the 16 bits become the high half of a float32; F16: IEEE half -> single; MXFP4: ggml's to_float)."""
    if type_name == "F32":
        return raw.view(torch.float32)
    if type_name == "F16":
        return raw.view(torch.float16).float()
    if type_name == "BF16":
        return (raw.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    if type_name in RELEASE_QUANT_TYPES:  # MXFP4 experts: independent blocks, dequantized as one-block rows
        t = get_type(type_name)
        return _api.dequantize(raw, t, t.block_size).reshape(-1)
    raise AssertionError(type_name)


def host_f32(raw: np.ndarray, type_name: str) -> torch.Tensor:
    """The CPU path's conversion (a fresh float32 array; the memmap is read-only): numpy's shift for BF16, torch
    for F16, whichever is faster on the host."""
    if type_name == "BF16":
        return torch.from_numpy((raw.view("<u2").astype(np.uint32) << 16).view(np.float32))
    return to_f32(torch.from_numpy(np.array(raw)), type_name)


class SlabFeeder:
    """Moves raw slab bytes to the device once and converts them there. On CUDA the bytes go through two pinned
    staging buffers: a worker thread copies the next slab into one while the device works on the current one
    from the other (an event guards each buffer's reuse until its upload is done)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._bufs: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._pool = ThreadPoolExecutor(1) if self.cuda else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _buffers(self, nbytes: int) -> None:
        if not self._bufs or self._bufs[0].numel() < nbytes:
            for ev in self._events:
                if ev is not None:
                    ev.synchronize()
            self._bufs = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._events = [None, None]

    def slabs(self, raws: list[np.ndarray], src_type: str, ne0: int):  # type: ignore[no-untyped-def]
        """Yield each raw slab as float32 [rows, ne0] on the device, in order."""
        if not self.cuda:
            for raw in raws:
                yield host_f32(raw, src_type).reshape(-1, ne0)
            return
        assert self._pool is not None
        self._buffers(max(r.size for r in raws))

        def stage(k: int) -> torch.Tensor:
            buf = self._bufs[k % 2][:raws[k].size]
            np.copyto(buf.numpy(), raws[k])
            return buf

        fut = self._pool.submit(stage, 0)
        for k in range(len(raws)):
            host = fut.result()
            dev = host.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._events[k % 2] = ev
            if k + 1 < len(raws):
                nxt = self._events[(k + 1) % 2]
                if nxt is not None:
                    nxt.synchronize()  # the upload that last read that buffer is done
                fut = self._pool.submit(stage, k + 1)
            yield to_f32(dev, src_type).reshape(-1, ne0)
