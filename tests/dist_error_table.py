"""One rank of tests/test_distributed.py, launched by torchrun: the sharded error table of a model, saved per rank.
argv: MODEL OUT_DIR ERRORS_CACHE [KILL_RANK KILL_AFTER] (that rank kills itself, SIGKILL, before its KILL_AFTER-th entry)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from quantmix.measurement.distributed import init_from_env, sharded_error_table, world


def main() -> None:
    model, out, errors = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    kill_rank, kill_after = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (-1, 0)
    init_from_env("cpu")
    rank, _size = world()
    seen = [0]

    def hook(_tensor: str, _qtype: str) -> None:
        seen[0] += 1
        if rank == kill_rank and seen[0] >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    table = sharded_error_table(model, None, candidates=["Q4_0", "Q8_0", "Q4_K"], device="cpu", progress=False,
                                on_compute=hook, cache_root=errors)
    table.save(out / f"table-rank{rank}.json")
    (out / f"computed-rank{rank}.txt").write_text(str(table.computed))
    import torch.distributed as dist
    if dist.is_initialized():  # a gloo rank left with its group alive can abort at exit
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
