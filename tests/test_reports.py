"""The report folder's parts: the Pareto plot, the sensitivity heatmap and tables, the model-card README.

Rows are shaped as quantmix.evaluation writes them (the keys of runs.jsonl); the PNGs are decoded and checked
for content, and written twice to prove they are byte-identical."""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from quantmix.reports.heatmap import render_sensitivity_table, write_sensitivity_heatmap
from quantmix.reports.model_card import render_model_card
from quantmix.reports.pareto import write_pareto_plot

MIB = 1024**2
N_EL = 134_515_008  # smollm2-768's element count, so the bpw follow from the sizes


def _row(quant: str, bpw: float, kld: float | None, ppl: float | None, family: str | None = None,
         **kw: object) -> dict:
    """A row as quantmix.evaluation writes it, for smollm2-768 at ``bpw`` bits per weight."""
    size = round(bpw * N_EL / 8)
    row = {"key": f"k{quant}", "model": "smollm2-768", "quant": quant, "kind": "recipe", "size_bytes": size,
           "n_elements": N_EL, "bpw": 8.0 * size / N_EL, "kld": kld, "kld_se": None if kld is None else kld / 40,
           "kld_rev": None if kld is None else kld * 1.1, "ppl_q": ppl, "ppl_base": 11.482,
           "same_top_p": None if kld is None else max(0.5, 1 - 3 * kld), "top1": 0.93, "top2": 0.85,
           "top3": 0.77, "top4": 0.70, "top5": 0.63, "n_tokens": 16384, "n_ctx": 512, "n_chunks": 32,
           "scoring": "second-half", "reference_precision": "f32", "act_quant": "none", "device": "cpu",
           "text": "wiki.test (held out)", "cor_ln_ppl": 0.99, "kld_p99": None if kld is None else 6 * kld,
           "dp_rms": 0.03, "ref_size_bytes": N_EL * 4}
    if family is not None:
        row["family"] = family
    row.update(kw)
    return row


def _rows() -> list[dict]:
    return [
        _row("Q2_K", 3.17, 0.412, 16.91, "stock"), _row("Q3_K_M", 3.91, 0.171, 13.20, "stock"),
        _row("Q4_K_M", 4.89, 0.0531, 11.95, "stock"), _row("Q5_K_M", 5.69, 0.0187, 11.63, "stock"),
        _row("quantmix-3.0bpw", 3.16, 0.251, 14.62), _row("quantmix-3.5bpw", 3.90, 0.108, 12.71, "quantmix"),
        _row("quantmix-4.5bpw", 4.88, 0.0339, 11.78, "quantmix"),
        _row("Q4_K", 4.5, 0.0702, 12.10, "uniform"), _row("proxy-3.5bpw", 3.90, 0.139, 12.99, "proxy"),
    ]


def _png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and raw (unfiltered-but-decompressed) image data of a PNG: proves it is one and lets a
    test see that something was drawn."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, chunks = 8, b"", []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        chunks.append(kind)
        if kind == b"IHDR":
            w, h = struct.unpack(">II", data[pos + 8:pos + 16])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    assert b"tEXt" not in chunks and b"tIME" not in chunks and b"iTXt" not in chunks  # no date, no version
    return w, h, zlib.decompress(idat)


def _not_blank(raw: bytes) -> bool:
    return len(set(raw[::7])) > 20


# ------------------------------------------------------------------------------------------------- pareto


def test_pareto_plot_is_deterministic_and_drawn(tmp_path: Path) -> None:
    a = write_pareto_plot(_rows(), tmp_path / "a" / "pareto.png", "smollm2-768: KLD and PPL against size")
    b = write_pareto_plot(_rows(), tmp_path / "b.png", "smollm2-768: KLD and PPL against size")
    assert a == tmp_path / "a" / "pareto.png"
    assert a.read_bytes() == b.read_bytes()
    w, h, raw = _png_pixels(a)
    assert (w, h) == (1210, 506) and _not_blank(raw)
    c = write_pareto_plot(_rows()[:-1], tmp_path / "c.png", "smollm2-768: KLD and PPL against size")
    assert c.read_bytes() != a.read_bytes()  # the data, not just the frame, is in the picture
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left


def test_plots_are_identical_across_processes(tmp_path: Path) -> None:
    """Another interpreter, another hash seed: the same bytes (no set order or state leaks into the PNGs)."""
    here = [write_pareto_plot(_rows(), tmp_path / "p1.png", "t"),
            write_sensitivity_heatmap(_contrib(6, moe=True), tmp_path / "h1.png", "t")]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; import test_reports as t; "
            "t.write_pareto_plot(t._rows(), Path(sys.argv[2]) / 'p2.png', 't'); "
            "t.write_sensitivity_heatmap(t._contrib(6, moe=True), Path(sys.argv[2]) / 'h2.png', 't')")
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path)], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "12345", "MPLBACKEND": "svg"}, timeout=120)
    assert here[0].read_bytes() == (tmp_path / "p2.png").read_bytes()
    assert here[1].read_bytes() == (tmp_path / "h2.png").read_bytes()


@pytest.mark.parametrize("rows", [
    [_row("Q4_K_M", 4.89, 0.0531, 11.95, "stock")],                       # one row
    [_row("F32", 32.0, 0.0, 11.482, "uniform"), _row("q", 4.5, 0.07, 12.1)],  # kld = 0 on a log axis
    [_row("noeval", 4.0, None, None), _row("Q4_K", 4.5, None, 12.1, "uniform")],  # kld None
    [_row("a", 3.5, 0.1, 13.0, "mine"), _row("b", 4.0, 0.05, None, "theirs"), _row("c", 3.7, 0.2, 14.0, "stock")],
    [_row("nan", 3.5, float("nan"), 13.0, ppl_base=None, kld_se=None)],   # NaN as a missing value, no reference
])
def test_pareto_plot_edge_cases(tmp_path: Path, rows: list[dict]) -> None:
    out = write_pareto_plot(rows, tmp_path / "p.png", "edge")
    assert _not_blank(_png_pixels(out)[2])


def test_pareto_plot_rejects_bad_rows(tmp_path: Path) -> None:
    bad = _row("Q3_K_S", 3.6, 0.2, 13.0)
    del bad["size_bytes"]
    with pytest.raises(ValueError, match="Q3_K_S.*size_bytes"):
        write_pareto_plot([*_rows(), bad], tmp_path / "x.png", "t")
    with pytest.raises(ValueError, match="IQ2_S.*kld"):
        write_pareto_plot([{**_row("IQ2_S", 2.6, 0.3, 15.0), "kld": "0.3"}], tmp_path / "x.png", "t")
    with pytest.raises(ValueError, match="Q8_0.*size_bytes"):
        write_pareto_plot([_row("Q8_0", 0, 0.001, 11.5)], tmp_path / "x.png", "t")
    with pytest.raises(ValueError, match="no evaluation rows"):
        write_pareto_plot([], tmp_path / "x.png", "t")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------ heatmap

CLASSES = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def _contrib(n_layer: int = 8, moe: bool = False) -> dict[tuple[int, str], float]:
    """A sensitivity profile of the usual shape: first and last layers, attn_v and ffn_down matter most."""
    c: dict[tuple[int, str], float] = {(-1, "token_embd"): 3.1e-3, (-1, "output"): 8.7e-3}
    weight = {"attn_q": 0.4, "attn_k": 0.5, "attn_v": 2.0, "attn_output": 0.9, "ffn_gate": 0.7, "ffn_up": 0.8,
              "ffn_down": 2.5}
    classes = CLASSES if not moe else CLASSES[:4] + ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
                                                     "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]
    for layer in range(n_layer):
        edge = 3.0 if layer in (0, n_layer - 1) else 1.0
        for cls in classes:
            w = weight.get(cls.split("_exps")[0].split("_shexp")[0], 1.0)
            c[(layer, cls)] = 1e-3 * w * edge * (1 + 0.1 * ((layer * 7 + len(cls)) % 5))
    return c


def test_heatmap_is_deterministic_and_drawn(tmp_path: Path) -> None:
    c = _contrib()
    a = write_sensitivity_heatmap(c, tmp_path / "heat.png", "smollm2-768: KLD contribution")
    b = write_sensitivity_heatmap(dict(reversed(list(c.items()))), tmp_path / "heat2.png",
                                  "smollm2-768: KLD contribution")
    assert a.read_bytes() == b.read_bytes()  # the order of the mapping does not matter
    assert _not_blank(_png_pixels(a)[2])
    c2 = dict(c)
    c2[(3, "ffn_down")] *= 10
    assert write_sensitivity_heatmap(c2, tmp_path / "heat3.png", "smollm2-768: KLD contribution").read_bytes() \
        != a.read_bytes()


def test_heatmap_edge_cases(tmp_path: Path) -> None:
    # MoE classes with dense first layer (missing cells), a zero and a negative fitted contribution, 40 layers
    c = _contrib(40, moe=True)
    for cls in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        del c[(0, cls)]
    c[(0, "ffn_down")] = 0.002
    c[(5, "attn_k")] = 0.0
    c[(6, "attn_q")] = -1e-5
    assert _not_blank(_png_pixels(write_sensitivity_heatmap(c, tmp_path / "moe.png", "moe"))[2])
    write_sensitivity_heatmap({(-1, "output"): 0.01}, tmp_path / "one.png", "one cell")
    write_sensitivity_heatmap({(0, "attn_q"): 0.0}, tmp_path / "zero.png", "nothing positive")


def _table_rows(md: str, section: str) -> list[list[str]]:
    part = md.split(f"### {section}")[1].split("###")[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in part.splitlines()
            if line.startswith("|") and not line.startswith("| ---") and not line.startswith("| Rank")
            and not line.startswith("| Class") and not line.startswith("| Layer")]


def test_sensitivity_table_totals(tmp_path: Path) -> None:
    c = _contrib(30, moe=True)
    total = math.fsum(c.values())
    md = render_sensitivity_table(c, top=5)
    assert f"Total predicted KLD: {total:.6g} over {len(c)}" in md

    per_class = _table_rows(md, "KLD per tensor class")
    assert per_class[-1][0] == "**total**" and float(per_class[-1][1]) == pytest.approx(total, rel=1e-5)
    body = per_class[:-1]
    assert {r[0] for r in body} == {cls for _, cls in c}
    assert math.fsum(float(r[1]) for r in body) == pytest.approx(total, rel=1e-5)
    assert sum(int(r[3]) for r in body) == len(c)
    assert [float(r[1]) for r in body] == sorted((float(r[1]) for r in body), reverse=True)
    assert sum(float(r[2].rstrip("%")) for r in body) == pytest.approx(100.0, abs=0.1 * len(body))
    by_class = {k: math.fsum(v for (_, c2), v in c.items() if c2 == k) for k in {c2 for _, c2 in c}}
    assert body[0][0] == max(by_class, key=by_class.__getitem__) and body[0][0].startswith("ffn_down")

    per_layer = _table_rows(md, "KLD per layer")
    assert per_layer[0][0] == "non-layer (token_embd, output)"
    assert float(per_layer[0][1]) == pytest.approx(c[(-1, "token_embd")] + c[(-1, "output")], rel=1e-5)
    assert [r[0] for r in per_layer[1:-1]] == [str(i) for i in range(30)]
    assert math.fsum(float(r[1]) for r in per_layer[:-1]) == pytest.approx(total, rel=1e-5)

    top = _table_rows(md, "Top 5 cells")
    ranked = sorted(c.values(), reverse=True)[:5]
    assert [float(r[3]) for r in top] == pytest.approx(ranked, rel=1e-5)
    assert float(top[-1][5].rstrip("%")) == pytest.approx(100 * sum(ranked) / total, abs=0.06)
    assert top[0][1] in ("0", "29")  # an edge layer leads
    # non-layer tensors are listed even when only they exist
    only = render_sensitivity_table({(-1, "token_embd"): 0.5, (-1, "output"): 1.5})
    assert "| non-layer (token_embd, output) | 2 | 100.0% |" in only
    assert "| 1 | non-layer | output | 1.5 | 75.0% | 75.0% |" in only


@pytest.mark.parametrize("bad, msg", [
    ({(0, "attn_q"): float("nan")}, r"\(0, 'attn_q'\).*not finite"),
    ({("3", "attn_q"): 0.1}, "layer '3' is not an integer"),
    ({(-2, "output"): 0.1}, "layer -2"),
    ({(0, ""): 0.1}, "tensor class"),
    ({(1, "attn_v"): "big"}, "'big' is not a number"),
    ({"blk.1.attn_v": 0.1}, "not a \\(layer, tensor_class\\) pair"),
])
def test_sensitivity_rejects_bad_input(tmp_path: Path, bad: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        render_sensitivity_table(bad)
    with pytest.raises(ValueError, match=msg):
        write_sensitivity_heatmap(bad, tmp_path / "h.png", "t")
    assert not (tmp_path / "h.png").exists()


# --------------------------------------------------------------------------------------------- model card

RECIPES = {"quantmix-3.0bpw": "recipes/quantmix-3.0bpw.txt", "quantmix-3.5bpw": "recipes/quantmix-3.5bpw.txt",
           "quantmix-4.5bpw": "recipes/quantmix-4.5bpw.txt"}
REPRO = "quantmix run smollm2-768 --targets 3.0,3.5,4.5 -o report/"


def test_model_card(tmp_path: Path) -> None:
    from quantmix.reports.eval_table import render_eval_table, render_llama_table

    rows = _rows()
    card = render_model_card("smollm2-768", rows, RECIPES, ["pareto.png", "plots/sensitivity.png"], REPRO,
                             notes="Made on the test fixture.")
    assert card == render_model_card("smollm2-768", rows, RECIPES, ["pareto.png", "plots/sensitivity.png"],
                                     REPRO, notes="Made on the test fixture.")
    assert card.startswith("---\n") and "\n# smollm2-768: " in card
    assert render_eval_table(rows) in card and render_llama_table(rows) in card
    for q, f in RECIPES.items():
        sec = card.split(f"### {q}\n")[1].split("\n### ")[0].split("\n## ")[0]
        assert f"[`{f}`]({f})" in sec and f"--tensor-type-file {f} " in sec
        assert f"--custom-q \"$(cat {f}.ik)\"" in sec
        r = next(r for r in rows if r["quant"] == q)
        assert f"{r['bpw']:.3f} BPW" in sec and f"{r['kld']:.5f}" in sec
        assert f"smollm2-768-BF16.gguf smollm2-768-{q}.gguf Q8_0" in sec
    assert "![pareto](pareto.png)" in card and "![sensitivity](plots/sensitivity.png)" in card
    assert f"```bash\n{REPRO}\n```" in card and "## Notes\n\nMade on the test fixture." in card
    assert "`llama-quantize --imatrix imatrix.gguf smollm2-768-BF16.gguf OUT.gguf Q4_K_M`" in card
    assert "`llama-quantize --pure --imatrix imatrix.gguf smollm2-768-BF16.gguf OUT.gguf Q4_K`" in card
    assert "- tokens scored: `16384`" in card and "- scoring: `second-half`" in card
    assert "## How KLD was measured" in card and "--kl-divergence-base" in card
    # quants are listed largest first, as in the tables
    assert [m for m in re.findall(r"^### (\S+)$", card, re.M)] == ["quantmix-4.5bpw", "quantmix-3.5bpw",
                                                                   "quantmix-3.0bpw"]
    custom = render_model_card("models/SmolLM2-135M/", rows, {}, [], REPRO, source_gguf="in.gguf",
                               imatrix="im.dat", base_model="HuggingFaceTB/SmolLM2-135M")
    assert "base_model: HuggingFaceTB/SmolLM2-135M" in custom and "# SmolLM2-135M: " in custom
    assert "No quantmix recipes" in custom and "in.gguf OUT.gguf Q2_K" in custom and "im.dat" in custom


@pytest.mark.parametrize("change, msg", [
    (lambda rows, rec: rows[0].pop("size_bytes"), "'Q2_K' has no 'size_bytes'"),
    (lambda rows, rec: rows[5].pop("bpw"), "'quantmix-3.5bpw' has no 'bpw'"),
    (lambda rows, rec: rec.update({"Q9_K": "recipes/q9.txt"}), "recipes/q9.txt.*'Q9_K'.*no evaluation row"),
    (lambda rows, rec: rows.append(dict(rows[0])), "two evaluation rows for quant 'Q2_K'"),
    (lambda rows, rec: rows[1].pop("quant"), "row #1 .*no quant name"),
])
def test_model_card_rejects_bad_input(change, msg: str) -> None:
    rows, rec = _rows(), dict(RECIPES)
    change(rows, rec)
    with pytest.raises(ValueError, match=msg):
        render_model_card("smollm2-768", rows, rec, [], REPRO)


def test_model_card_rejects_absolute_plot_and_empty_reproduce() -> None:
    with pytest.raises(ValueError, match="/tmp/pareto.png.*relative"):
        render_model_card("smollm2-768", _rows(), RECIPES, ["/tmp/pareto.png"], REPRO)
    with pytest.raises(ValueError, match="reproduces"):
        render_model_card("smollm2-768", _rows(), RECIPES, [], "  ")
