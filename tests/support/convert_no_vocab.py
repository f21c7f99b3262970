"""Run llama.cpp's own convert_hf_to_gguf.py on a model directory, with the vocabulary step skipped.

Test support only: the tiny random models have no tokenizer (and llama.cpp's converter rejects foreign
tokenizers for some architectures), but their tensor list is what the catalog tests compare, and that comes
from the converter's real code. Usage: python convert_no_vocab.py LLAMA_CPP_ROOT MODEL_DIR OUT.gguf
"""

import sys
from pathlib import Path

root, model_dir, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.insert(0, str(root / "gguf-py"))
sys.path.insert(0, str(root))
import convert_hf_to_gguf  # noqa: E402


_real_get_model_class = convert_hf_to_gguf.get_model_class


def _get_model_class_without_vocab(*args, **kwargs):
    """Wrap the converter's class lookup: the returned class skips set_vocab."""
    cls = _real_get_model_class(*args, **kwargs)
    return type(cls.__name__, (cls,), {"set_vocab": lambda self: None, "model_arch": cls.model_arch})


convert_hf_to_gguf.get_model_class = _get_model_class_without_vocab
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", "f32"]
convert_hf_to_gguf.main()
