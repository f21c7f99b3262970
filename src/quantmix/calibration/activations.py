"""Activation statistics of a Hugging Face model's weight inputs, gathered with forward hooks.

For every weight matrix W (y = x W^T) we accumulate, per input channel j, what llama.cpp's imatrix holds:
``in_sum2[j] = sum_t x_tj^2``, ``in_sum[j] = sum_t x_tj`` and the token count. Accumulators are float64
so long runs do not lose precision. Each statistic has a leading "matrix" axis (``n_mat``): 1 for a
plain linear layer, ``n_expert`` for a fused 3-D expert tensor, where a token adds only to the rows of the
experts it was routed to (as llama-imatrix does for ``*_exps`` tensors).

Optionally the raw inputs of chosen modules are kept (MoEfication clustering, router fitting).

Statistics are keyed by the weight's parameter name in the model (``model.layers.0.mlp.down_proj.weight``,
``model.layers.0.mlp.experts.gate_up_proj``), so they map one-to-one onto tensors when exporting.

``ActivationStats.all_experts`` makes the expert collector send every token through every expert (statistics
only; the module's output keeps the real routing), as ExLlamaV3 does, so that no expert is left uncalibrated.
Accumulators live on the device of the activations they receive (no host round trip per call).

Adding a module kind: write a collector ``(stats, module_name, module, args, kwargs, output) -> None``
and put it in ``COLLECTORS`` with a predicate; :func:`collect_activations` hooks every module that a
predicate accepts.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "ActivationStats",
    "ChannelStats",
    "collect_activations",
    "hook_modules",
    "token_chunks",
    "COLLECTORS",
]


@dataclass
class ChannelStats:
    """Per-input-channel sums for one weight tensor: ``in_sum2``/``in_sum`` [n_mat, n_in], ``counts`` [n_mat]."""

    in_sum2: torch.Tensor
    in_sum: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def zeros(cls, n_mat: int, n_in: int, device: torch.device | str | None = None) -> ChannelStats:
        z = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(n_mat, n_in, **z), torch.zeros(n_mat, n_in, **z), torch.zeros(n_mat, **z))

    @property
    def n_mat(self) -> int:
        return int(self.counts.shape[0])

    def add(self, x: torch.Tensor, mat: int = 0) -> None:
        """Add the rows of ``x`` [tokens, n_in] to matrix ``mat``."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if x.shape[1] != self.in_sum2.shape[1]:
            raise ValueError(f"input has {x.shape[1]} channels, statistics hold {self.in_sum2.shape[1]}")
        dev = self.in_sum2.device
        self.in_sum2[mat] += (x * x).sum(0).to(dev)
        self.in_sum[mat] += x.sum(0).to(dev)
        self.counts[mat] += x.shape[0]

    def add_all(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` [tokens, n_in] to every matrix (every expert sees every token)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        dev = self.in_sum2.device
        self.in_sum2 += (x * x).sum(0).to(dev)[None, :]
        self.in_sum += x.sum(0).to(dev)[None, :]
        self.counts += x.shape[0]

    def cpu(self) -> ChannelStats:
        """The same statistics on the host."""
        return ChannelStats(self.in_sum2.cpu(), self.in_sum.cpu(), self.counts.cpu())

    def mean_sq(self) -> torch.Tensor:
        """E[x^2] per channel [n_mat, n_in] (0 where a matrix saw no token)."""
        return self.in_sum2 / self.counts.clamp(min=1)[:, None]

    def mean(self) -> torch.Tensor:
        """E[x] per channel [n_mat, n_in] (0 where a matrix saw no token)."""
        return self.in_sum / self.counts.clamp(min=1)[:, None]

    def merge(self, other: ChannelStats) -> None:
        if other.in_sum2.shape != self.in_sum2.shape:
            raise ValueError(f"cannot merge statistics of shape {tuple(other.in_sum2.shape)} "
                             f"into {tuple(self.in_sum2.shape)}")
        dev = self.in_sum2.device
        self.in_sum2 += other.in_sum2.to(dev)
        self.in_sum += other.in_sum.to(dev)
        self.counts += other.counts.to(dev)


@dataclass
class ActivationStats:
    """Statistics per weight tensor, kept raw inputs per module, and the number of tokens run.

    ``all_experts``: expert collectors count every token for every expert (see the module docstring).
    """

    stats: dict[str, ChannelStats] = field(default_factory=dict)
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    n_tokens: int = 0
    all_experts: bool = False

    def channel(self, weight_name: str, n_mat: int, n_in: int,
                device: torch.device | str | None = None) -> ChannelStats:
        """The statistics of ``weight_name``, created on first use (on ``device``, default the host)."""
        st = self.stats.get(weight_name)
        if st is None:
            st = self.stats[weight_name] = ChannelStats.zeros(n_mat, n_in, device)
        elif st.in_sum2.shape != (n_mat, n_in):
            raise ValueError(f"{weight_name}: statistics of shape {tuple(st.in_sum2.shape)}, "
                             f"input of shape ({n_mat}, {n_in})")
        return st

    def kept(self, module_name: str) -> torch.Tensor:
        """All kept inputs of ``module_name`` as one [tokens, n_in] tensor."""
        if module_name not in self.inputs:
            raise KeyError(f"no inputs kept for {module_name!r}; kept: {sorted(self.inputs)[:8]}...")
        return torch.cat(self.inputs[module_name], 0)

    def __getitem__(self, weight_name: str) -> ChannelStats:
        return self.stats[weight_name]

    def merge(self, other: ActivationStats) -> None:
        for k, v in other.stats.items():
            if k in self.stats:
                self.stats[k].merge(v)
            else:
                self.stats[k] = ChannelStats(v.in_sum2.clone(), v.in_sum.clone(), v.counts.clone())
        for k, xs in other.inputs.items():
            self.inputs.setdefault(k, []).extend(xs)
        self.n_tokens += other.n_tokens


# ---------------------------------------------------------------- collectors

Collector = Callable[[ActivationStats, str, nn.Module, tuple, dict, object], None]


def _first_arg(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    if args:
        return args[0]
    if name in kwargs:
        return kwargs[name]
    raise ValueError(f"module called without its input ({name})")


def _collect_linear(stats: ActivationStats, name: str, mod: nn.Module, args: tuple, kwargs: dict,
                    output: object) -> None:
    x = _first_arg(args, kwargs, "input")
    stats.channel(f"{name}.weight", 1, mod.in_features, x.device).add(x)  # type: ignore[attr-defined]


def _is_router(mod: nn.Module) -> bool:
    """transformers 5.x MoE routers (``*TopKRouter``): a bare 2-D ``weight`` [n_expert, hidden], not nn.Linear."""
    w = getattr(mod, "weight", None)
    return (not isinstance(mod, nn.Linear) and "router" in type(mod).__name__.lower()
            and isinstance(w, torch.Tensor) and w.dim() == 2)


def _collect_router(stats: ActivationStats, name: str, mod: nn.Module, args: tuple, kwargs: dict,
                    output: object) -> None:
    x = _first_arg(args, kwargs, "hidden_states")
    n_in = int(mod.weight.shape[1])  # type: ignore[union-attr]
    if x.shape[-1] != n_in:
        raise ValueError(f"{name}: router input has {x.shape[-1]} channels, its weight {n_in}")
    stats.channel(f"{name}.weight", 1, n_in, x.device).add(x)


def _is_fused_experts(mod: nn.Module) -> bool:
    """transformers 5.x MoE experts: 3-D ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] parameters."""
    gu = getattr(mod, "gate_up_proj", None)
    dp = getattr(mod, "down_proj", None)
    return (isinstance(gu, torch.Tensor) and isinstance(dp, torch.Tensor) and gu.dim() == 3 and dp.dim() == 3
            and hasattr(mod, "act_fn"))


def _is_gpt_oss_experts(mod: nn.Module) -> bool:
    """gpt-oss experts: ``gate_up_proj`` [E, H, 2I] (gate and up interleaved) with biases, ``down_proj`` [E, I, H],
    the clamped GLU in ``_apply_gate``."""
    gu = getattr(mod, "gate_up_proj", None)
    return (isinstance(gu, torch.Tensor) and gu.dim() == 3 and hasattr(mod, "_apply_gate")
            and isinstance(getattr(mod, "gate_up_proj_bias", None), torch.Tensor) and hasattr(mod, "limit"))


def _collect_fused_experts(stats: ActivationStats, name: str, mod: nn.Module, args: tuple, kwargs: dict,
                           output: object) -> None:
    """Per-expert statistics: a token adds to an expert's row only when routed to it (every expert's row
    with ``stats.all_experts``).

    The down projection's input (act(gate) * up) is internal to the module (computed in a loop or grouped,
    depending on transformers' experts implementation), so it is recomputed here for each expert's tokens.
    """
    hidden = args[0] if len(args) > 0 else kwargs["hidden_states"]
    top_k_index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
    gu_w: torch.Tensor = mod.gate_up_proj  # type: ignore[assignment]
    if _is_gpt_oss_experts(mod):  # x @ W + b, then the clamped GLU of interleaved gate / up
        n_exp, hid, two_i = gu_w.shape
        bias: torch.Tensor = mod.gate_up_proj_bias  # type: ignore[assignment]

        def down_input(x: torch.Tensor, e: int) -> torch.Tensor:
            return mod._apply_gate(x @ gu_w[e] + bias[e])  # type: ignore[operator]
    else:
        n_exp, two_i, hid = gu_w.shape

        def down_input(x: torch.Tensor, e: int) -> torch.Tensor:
            g, u = nn.functional.linear(x, gu_w[e]).chunk(2, dim=-1)
            return mod.act_fn(g) * u  # type: ignore[operator]
    inter = two_i // 2
    if hidden.shape[-1] != hid:
        raise ValueError(f"{name}: expert input has {hidden.shape[-1]} channels, gate_up_proj {tuple(gu_w.shape)}")
    hidden = hidden.detach().reshape(-1, hid)
    dev = hidden.device
    gu_st = stats.channel(f"{name}.gate_up_proj", n_exp, hid, dev)
    dp_st = stats.channel(f"{name}.down_proj", n_exp, inter, dev)
    if stats.all_experts:
        gu_st.add_all(hidden)
        for e in range(n_exp):
            dp_st.add(down_input(hidden, e), e)
        return
    idx = top_k_index.reshape(hidden.shape[0], -1)
    flat = idx.flatten()
    used = torch.unique(flat[(flat >= 0) & (flat < n_exp)])  # out-of-range ids mean "no expert" in some models
    for e in used.tolist():
        tok = (idx == e).any(-1).nonzero().flatten()
        x = hidden[tok]
        gu_st.add(x, e)
        dp_st.add(down_input(x, e), e)


COLLECTORS: list[tuple[Callable[[nn.Module], bool], Collector]] = [
    (lambda m: isinstance(m, nn.Linear), _collect_linear),
    (_is_fused_experts, _collect_fused_experts),
    (_is_gpt_oss_experts, _collect_fused_experts),
    (_is_router, _collect_router),
]


@contextmanager
def _mla_taps(root: nn.Module, stats: ActivationStats, prefix: str,
              modules: Sequence[str] | None) -> Iterator[None]:
    """Statistics of MLA's absorbed matrices, which llama.cpp multiplies but transformers never does
    (:mod:`quantmix.model.mla`): ``attn_k_b`` (per head, input q_nope) and ``attn_v_b`` (per head, input the
    attention-weighted latent, from the model's own attention run once more with the latent as the values).
    Keyed ``<attention>.k_b_proj.weight`` / ``.v_b_proj.weight``, [n_head, n_in] each, as llama-imatrix
    accumulates them (deepseek2.cpp ``ggml_mul_mat(wk_b, q_nope)``, llama-graph.cpp ``ggml_mul_mat(v_mla, kqv)``)."""
    from quantmix.model.mla import MLACall, mla_attention

    def around(call: MLACall) -> tuple:
        out = call.run()
        n_head, nope = call.query.shape[1], int(call.module.qk_nope_head_dim)
        rank = call.latent.shape[-1]
        q_nope = call.query[..., :nope].transpose(0, 1).reshape(n_head, -1, nope)  # [H, b*T, nope]
        lat = call.run(value=call.latent.expand(-1, n_head, -1, -1))  # [b, T, H, rank]
        lat = lat.transpose(0, 2).reshape(n_head, -1, rank)
        k_b = stats.channel(f"{call.name}.k_b_proj.weight", n_head, nope, out.device)
        v_b = stats.channel(f"{call.name}.v_b_proj.weight", n_head, rank, out.device)
        for h in range(n_head):
            k_b.add(q_nope[h], h)
            v_b.add(lat[h], h)
        return out, None

    with mla_attention(root, around, prefix, lambda name: _matches(f"{name}.kv_b_proj", modules)):
        yield


def _collector_for(mod: nn.Module) -> Collector | None:
    for pred, fn in COLLECTORS:
        if pred(mod):
            return fn
    return None


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


# ---------------------------------------------------------------- driver

def token_chunks(ids: Sequence[int] | torch.Tensor, n_ctx: int, max_chunks: int | None = None,
                 batch_size: int = 1) -> list[torch.Tensor]:
    """Cut a token stream into [batch, n_ctx] batches of consecutive full chunks (the tail is dropped)."""
    t = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = t.numel() // n_ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise ValueError(f"{t.numel()} tokens do not fill one chunk of {n_ctx}")
    chunks = t[: n * n_ctx].view(n, n_ctx)
    return [chunks[i:i + batch_size] for i in range(0, n, batch_size)]


@contextmanager
def hook_modules(
    root: nn.Module,
    stats: ActivationStats,
    prefix: str = "",
    modules: Sequence[str] | None = None,
    keep_inputs: Sequence[str] = (),
    keep_dtype: torch.dtype = torch.float32,
) -> Iterator[int]:
    """Hook every supported module under ``root`` (named ``prefix`` + its name inside ``root``) so that each
    forward call adds to ``stats``; yields the number of hooks, removes them on exit.

    ``modules`` / ``keep_inputs`` as in :func:`collect_activations`. Hooking one decoder layer at a time with
    its full name as ``prefix`` gives the same statistics keys as hooking the whole model.
    """
    handles = []
    taps = ExitStack()

    def make_hook(name: str, fn: Collector | None, keep: bool):  # noqa: ANN202 - closure factory
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if fn is not None:
                fn(stats, name, mod, args, kwargs, output)
            if keep:
                x = _first_arg(args, kwargs, "input").detach()
                stats.inputs.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).to(keep_dtype).clone())
        return hook

    try:
        taps.enter_context(_mla_taps(root, stats, prefix, modules))
        for sub, mod in root.named_modules():
            name = f"{prefix}.{sub}" if prefix and sub else (prefix or sub)
            fn = _collector_for(mod) if _matches(name, modules) else None
            keep = any(fnmatch.fnmatchcase(name, p) for p in keep_inputs)
            if fn is None and not keep:
                continue
            handles.append(mod.register_forward_hook(make_hook(name, fn, keep), with_kwargs=True))
        yield len(handles)
    finally:
        for h in handles:
            h.remove()
        taps.close()


def _forward(model: nn.Module, ids: torch.Tensor) -> None:
    """One forward pass; causal LMs are asked for the last position's logits only (the head is costly)."""
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep (e.g. a bare decoder)
        model(input_ids=ids, use_cache=False)


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    token_batches: Iterable[torch.Tensor],
    modules: Sequence[str] | None = None,
    keep_inputs: Sequence[str] = (),
    keep_dtype: torch.dtype = torch.float32,
    stats: ActivationStats | None = None,
) -> ActivationStats:
    """Run ``model`` on each [batch, seq] token batch and gather input statistics.

    ``modules``: fnmatch patterns of module names to gather statistics for (None: every supported module,
    i.e. every nn.Linear, fused expert block and router). ``keep_inputs``: patterns of module names whose raw
    inputs (flattened to [tokens, n_in], cast to ``keep_dtype``) are kept in ``stats.inputs``. Pass ``stats``
    to keep accumulating into an earlier result. The whole model is resident; for models larger than memory
    see :mod:`quantmix.calibration.imatrix` (layer by layer).
    """
    stats = stats if stats is not None else ActivationStats()
    with hook_modules(model, stats, "", modules, keep_inputs, keep_dtype) as n_hooks:
        if not n_hooks:
            raise ValueError(f"no module of {type(model).__name__} matches modules={modules!r} "
                             f"or keep_inputs={list(keep_inputs)!r}")
        for batch in token_batches:
            batch = torch.as_tensor(batch, dtype=torch.long)
            if batch.dim() == 1:
                batch = batch[None]
            _forward(model, batch)
            stats.n_tokens += batch.numel()
    return stats
