"""Run llama.cpp's convert_hf_to_gguf.py so that it writes everything but the tensor data.

Usage (in a subprocess, quantmix's own gguf-py is not imported): ``python convert_meta.py LLAMA_CPP_ROOT
MODEL_DIR OUT [converter arguments]``. The converter runs as it always does, lazily (its model classes yield
each tensor as a lazy expression of the checkpoint's), but its writer's last step writes the key-values and
tensor infos and then only extends the file to its full length, sparsely: no weight is read, no data block
occupies the disk, and the header is byte for byte the one a full conversion writes. quantmix then writes the
quantized GGUF from this header and the checkpoint's tensors (:mod:`quantmix.model.hf_tensors`).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    root, model, out, *rest = sys.argv[1:]
    sys.path[:0] = [str(Path(root) / "gguf-py"), root]
    import gguf
    from gguf.gguf_writer import GGUFWriter, WriterState

    def metadata_only(self: GGUFWriter, *, progress: bool = False) -> None:
        self.write_ti_data_to_file()
        for fout, tensors in zip(self.fout, self.tensors):
            self.write_padding(fout, fout.tell())
            end = fout.tell() + sum(GGUFWriter.ggml_pad(ti.nbytes, self.data_alignment) for ti in tensors.values())
            fout.flush()
            fout.truncate(end)  # a hole: the data's place, never written
            fout.seek(end)
        self.state = WriterState.WEIGHTS

    GGUFWriter.write_tensors_to_file = metadata_only
    assert gguf  # imported from the vendored gguf-py, which the converter needs
    sys.argv = [str(Path(root) / "convert_hf_to_gguf.py"), model, "--outfile", out, *rest]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
