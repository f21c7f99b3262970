"""DeepSeek's multi-head latent attention (MLA) as llama.cpp computes it, inside transformers' own forward.

transformers expands the normalized latent c (``kv_a_layernorm``'s output, one per token) into per-head keys
and values with one matrix, ``kv_b_proj``. llama.cpp's converter splits that matrix per head into ``attn_k_b``
(the key half, transposed) and ``attn_v_b`` (the value half), and its graph absorbs them
(src/models/deepseek2.cpp, llama-graph.cpp ``build_attn_mha``): ``attn_k_b`` multiplies q_nope (so queries
live in latent space), attention runs over the latent itself (keys [c, k_rope], values c), and ``attn_v_b``
multiplies the attention-weighted latent. The products are the same numbers in exact arithmetic, but the
activations those two matrices see are not: what llama-imatrix counts for them and what llama.cpp rounds to
8 bits before their dot products are q_nope and the attention-weighted latent, never c.

:func:`mla_attention` lets a caller see, or replace, each MLA attention call with the latent in hand, without
rewriting the models' forwards: ``expand_kv`` (where transformers expands c) is wrapped to keep c and the
roped shared key, and the modeling module's ``ALL_ATTENTION_FUNCTIONS`` is swapped for one whose interfaces
call the caller's ``around`` for MLA modules.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["is_mla_attention", "MLACall", "mla_attention", "absorbed_attention"]


def is_mla_attention(mod: nn.Module) -> bool:
    """transformers' DeepSeek-V2/V3 attention: ``kv_b_proj`` expanded from the latent by ``expand_kv``."""
    return all(hasattr(mod, a) for a in ("kv_b_proj", "expand_kv", "kv_lora_rank", "qk_nope_head_dim",
                                         "v_head_dim", "num_heads"))


@dataclass
class MLACall:
    """One attention call of an MLA module: transformers' query / key / value and mask, the interface it would
    call (``fn(module, query, key, value, mask, **kwargs)`` -> (output [b, T, H, v], weights)), and the latent
    ``c`` [b, 1, T, rank] and roped shared key ``k_rot`` [b, 1, T, rope] it was expanded from."""

    module: nn.Module
    name: str
    fn: Callable
    query: torch.Tensor  # [b, H, T, nope + rope]
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    kwargs: dict
    latent: torch.Tensor
    k_rot: torch.Tensor

    def run(self, query: torch.Tensor | None = None, key: torch.Tensor | None = None,
            value: torch.Tensor | None = None) -> torch.Tensor:
        """The model's own attention on these (or replaced) operands: output [b, T, H, d]."""
        q = self.query if query is None else query
        k = self.key if key is None else key
        v = self.value if value is None else value
        return self.fn(self.module, q, k, v, self.mask, **self.kwargs)[0]

    def kv_b_halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj``'s weight per head: the key half [H, nope, rank] and the value half [H, v, rank]."""
        m = self.module
        h, nope, v = self.query.shape[1], int(m.qk_nope_head_dim), int(m.v_head_dim)
        w = m.kv_b_proj.weight.view(h, nope + v, -1)
        return w[:, :nope, :], w[:, nope:, :]


class _Interfaces:
    """Stands in for a modeling module's ``ALL_ATTENTION_FUNCTIONS``; MLA calls go to ``around``."""

    def __init__(self, inner: object, dispatch: Callable) -> None:
        self.inner, self.dispatch = inner, dispatch

    def get_interface(self, name: str, default: Callable) -> Callable:
        fn = self.inner.get_interface(name, default)  # type: ignore[attr-defined]

        def interface(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: torch.Tensor | None, **kwargs: object) -> object:
            return self.dispatch(fn, module, query, key, value, mask, kwargs)
        return interface

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@contextmanager
def mla_attention(root: nn.Module, around: Callable[[MLACall], tuple], prefix: str = "",
                  select: Callable[[str], bool] | None = None) -> Iterator[int]:
    """Within this context every attention call of an MLA module under ``root`` (named ``prefix`` + its name
    there; ``select(name)`` filters them) returns ``around(call)`` instead of the model's own result: a tuple
    (output [b, T, H, v], weights). Yields the number of MLA modules found (0: nothing is changed)."""
    mods: dict[int, tuple[str, nn.Module]] = {}
    for sub, mod in root.named_modules():
        name = f"{prefix}.{sub}" if prefix and sub else (prefix or sub)
        if is_mla_attention(mod) and (select is None or select(name)):
            mods[id(mod)] = (name, mod)
    if not mods:
        yield 0
        return
    latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def dispatch(fn: Callable, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None, kwargs: dict) -> object:
        held = latents.pop(id(module), None)
        if id(module) not in mods or held is None:
            return fn(module, query, key, value, mask, **kwargs)
        return around(MLACall(module, mods[id(module)][0], fn, query, key, value, mask, kwargs, *held))

    def wrap(mod: nn.Module) -> Callable:
        orig = type(mod).expand_kv

        def expand_kv(kv_nope: torch.Tensor, k_rot: torch.Tensor) -> object:
            latents[id(mod)] = (kv_nope, k_rot)
            return orig(mod, kv_nope, k_rot)
        return expand_kv

    pymods = {type(m).__module__: sys.modules[type(m).__module__] for _, m in mods.values()}
    saved = {k: pm.ALL_ATTENTION_FUNCTIONS for k, pm in pymods.items()}
    try:
        for _, m in mods.values():
            m.expand_kv = wrap(m)
        for k, pm in pymods.items():
            pm.ALL_ATTENTION_FUNCTIONS = _Interfaces(saved[k], dispatch)
        yield len(mods)
    finally:
        for _, m in mods.values():
            m.__dict__.pop("expand_kv", None)
        for k, pm in pymods.items():
            pm.ALL_ATTENTION_FUNCTIONS = saved[k]


def absorbed_attention(call: MLACall, k_b_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                       v_b_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> torch.Tensor:
    """The attention output [b, T, H, v] computed as llama.cpp's graph does: q_abs = k_b q_nope per head,
    attention of [q_abs, q_rope] over keys [c, k_rope] with values c, then v_b times the weighted latent.
    ``k_b_input`` / ``v_b_input`` transform the activations those two products see (llama.cpp's rounding)."""
    nope = int(call.module.qk_nope_head_dim)
    w_k, w_v = call.kv_b_halves()  # [H, nope, r], [H, v, r]
    n_head = call.query.shape[1]
    q_abs = torch.einsum("bhtn,hnr->bhtr", k_b_input(call.query[..., :nope]), w_k)
    query = torch.cat([q_abs, call.query[..., nope:]], dim=-1)
    key = torch.cat([call.latent, call.k_rot], dim=-1).expand(-1, n_head, -1, -1)
    lat = call.run(query, key, call.latent.expand(-1, n_head, -1, -1))  # [b, T, H, r]
    return torch.einsum("bthr,hvr->bthv", v_b_input(lat), w_v)
