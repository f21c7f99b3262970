"""The type registry: block sizes and bytes per block of every type, ik_llama.cpp row metadata."""

import gguf
import pytest

from quantmix.formats.registry import UnknownTypeError, all_types, get_type, type_from_id

# REFERENCE.md: elements per block / bytes per block
REFERENCE = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "IQ4_NL": (32, 18),
    "MXFP4": (32, 17), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176),
    "Q6_K": (256, 210), "IQ1_S": (256, 50), "IQ1_M": (256, 56), "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74),
    "IQ2_S": (256, 82), "IQ3_XXS": (256, 98), "IQ3_S": (256, 110), "IQ4_XS": (256, 136), "TQ1_0": (256, 54),
    "TQ2_0": (256, 66), "Q1_0": (128, 18), "Q2_0": (64, 18), "NVFP4": (64, 36), "F16": (1, 2), "BF16": (1, 2),
    "F32": (1, 4),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_mainline_sizes_match_reference(name: str) -> None:
    t = get_type(name)
    assert (t.block_size, t.type_size) == REFERENCE[name]


def test_sizes_match_gguf_py() -> None:
    for qt, (blck, size) in gguf.GGML_QUANT_SIZES.items():
        if qt.name == "Q8_1":  # gguf-py lists 40 bytes; ggml-common.h's block_q8_1 is 2 halves + 32 = 36
            assert get_type("Q8_1").type_size == 36
            continue
        t = type_from_id(int(qt))
        assert (t.block_size, t.type_size) == (blck, size), qt.name
        assert t.name == qt.name


def test_lookup_is_case_insensitive_and_unknown_is_an_error() -> None:
    assert get_type("q4_k") is get_type("Q4_K")
    with pytest.raises(UnknownTypeError, match="Q4_KK"):
        get_type("Q4_KK")


def test_row_and_tensor_bytes() -> None:
    q4k = get_type("Q4_K")
    assert q4k.tensor_bytes((4096, 14336)) == 14336 * 16 * 144
    assert get_type("IQ4_KS").row_bytes(4096) == 4 + 16 * 136  # ik: 4 bytes of row scale
    assert get_type("IQ2_KS").row_bytes(256) == 2 + 70
    with pytest.raises(ValueError, match="not a multiple"):
        q4k.row_bytes(576)


def test_ik_bpw_match_reference() -> None:
    ref = {"IQ2_KS": 2.1875, "IQ2_K": 2.375, "IQ2_KL": 2.6875, "IQ3_KS": 3.1875, "IQ3_K": 3.4375,
           "IQ4_KSS": 4.0, "IQ4_KS": 4.25, "IQ4_K": 4.5, "IQ5_KS": 5.25, "IQ5_K": 5.5, "IQ6_K": 6.625,
           "IQ1_KT": 1.75, "IQ2_KT": 2.125, "IQ3_KT": 3.125, "IQ4_KT": 4.0}
    for name, bpw in ref.items():
        assert get_type(name).bits_per_weight() == bpw, name
    assert len({t.name for t in all_types()}) == len(all_types())
