"""Plain-text tables for the terminal (the catalog; size tables live with size accounting)."""

from __future__ import annotations

from quantmix.model.catalog import Catalog


def render_catalog(cat: Catalog) -> str:
    """One line per tensor: GGUF name, shape (ggml order), class, layer, elements, quantized?, HF source."""
    hp = cat.hparams
    lines = [
        f"{cat.source}: arch {hp.arch}, {hp.n_layer} blocks"
        + (f" ({hp.n_nextn} NextN)" if hp.n_nextn else "")
        + (f", {hp.n_expert} experts ({hp.n_expert_used} used)" if hp.n_expert else "")
        + f", {len(cat)} tensors, {cat.n_elements:,} elements",
        f"{'name':<36} {'shape':<20} {'class':<15} {'layer':>5} {'elements':>13} {'quant':>5}  source",
    ]
    for t in cat:
        shape = "x".join(str(d) for d in t.shape)
        src = t.source_type or (t.hf_sources[0] + (f" (+{len(t.hf_sources) - 1})" if len(t.hf_sources) > 1 else "")
                                if t.hf_sources else "")
        layer = "" if t.layer is None else str(t.layer)
        lines.append(f"{t.name:<36} {shape:<20} {t.tensor_class:<15} {layer:>5} {t.n_elements:>13,} "
                     f"{'yes' if t.quantizable else 'no':>5}  {src}")
    return "\n".join(lines)
