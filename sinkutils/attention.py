"""The sinkbook attention: the one attention function registered with transformers (``attn_implementation=
"sinkbook"``). It computes every attention variant of chapter 6 (``variants`` builds the models; the flag
``config.sink_variant`` selects the arithmetic here), lets chapter 3's mask edits change the mask first, and hands
the post-RoPE queries and keys and the values to whatever is tapping that layer (``trace.record``).

Shapes follow transformers: queries (B, H, T, D), keys and values (B, Hkv, S, D), with Hkv < H under grouped-query
attention (``expand_kv``). Masks arrive in three forms: None (plain causal), bool (True attends) or float additive
(``as_additive`` converts).

Nothing here is process-wide: a tap or a mask edit belongs to the ``self_attn`` modules it was opened on, so a
forward pass of another model never sees it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sinkutils import compat, metrics

ATTN_NAME = "sinkbook"
#: kwarg that the gated variant's pre-hook adds, so this function sees the layer input x (``variants.attach``)
GATE_INPUT = "sinkbook_gate_input"
#: the submodule of ``self_attn`` holding each variant's parameters (``variants`` creates them)
SUBMODULES = {"headwise_rmsnorm": "head_norm", "gated": "attn_gate"}
_TINY = 1e-30

# self_attn module -> callables fn(module, query, key, value, mask, scaling) run after the attention output
_taps: dict[nn.Module, list[Callable]] = {}
# (self_attn modules or None for every module, edit(mask, q_len, kv_len, device) -> mask)
_mask_edits: list[tuple[frozenset | None, Callable]] = []
# how many edits of attention outputs are open (``interventions.edit_head_output``)
_output_edits = [0]


def variant_of(module) -> str:
    """The variant a model, or one of its ``self_attn`` modules, was built as (``baseline`` if unset)."""
    return getattr(module.config, "sink_variant", "baseline")


# --- masks ------------------------------------------------------------------------------------------------

def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """(q_len, kv_len) bool, True where a query sees a key: causal, aligned lower-right (a query sees every key up
    to its own absolute position, also when the first kv_len - q_len keys come from a cache)."""
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return q >= torch.arange(kv_len, device=device)[None, :]


def as_additive(mask: torch.Tensor | None, q_len: int, kv_len: int, dtype, device) -> torch.Tensor:
    """Any of the three mask forms (None = causal, bool = True attends, float additive) as a float mask."""
    mask = compat.align_mask(mask, kv_len)
    if mask is None:
        mask = causal_mask(q_len, kv_len, device)[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _mask_column(mask: torch.Tensor | None, q_len: int, kv_len: int, index: int, device) -> torch.Tensor:
    """Additive mask values of one key column, (..., T): enough for the sink logit, no (T x S) needed."""
    mask = compat.align_mask(mask, kv_len)
    if mask is None:
        visible = torch.arange(kv_len - q_len, kv_len, device=device) >= index
        return torch.zeros(q_len, device=device).masked_fill(~visible, float("-inf"))
    col = mask[..., index]
    if col.dtype == torch.bool:
        return torch.zeros(col.shape, device=device).masked_fill(~col, float("-inf"))
    return col.float()


def real_queries(mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor | None:
    """(batch, q_len) True where the query sees its own key: False exactly at padding queries (left padding
    masks their whole row, right padding at least their own key); None for a plain causal mask."""
    mask = compat.align_mask(mask, kv_len)
    if mask is None:
        return None
    own = mask.diagonal(offset=kv_len - q_len, dim1=-2, dim2=-1)  # (batch, heads or 1, q_len)
    own = own if own.dtype == torch.bool else own > torch.finfo(own.dtype).min / 2
    return own.all(dim=1)


def _sdpa_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> dict:
    """SDPA arguments for the mask: plain causal uses ``is_causal`` (the fused kernel, no T x S matrix)."""
    mask = compat.align_mask(mask, kv_len)
    if mask is None:
        return {"is_causal": True} if q_len == kv_len else {"attn_mask": causal_mask(q_len, kv_len, device)}
    return {"attn_mask": mask if mask.dtype == torch.bool else mask.float()}


# --- the arithmetic -----------------------------------------------------------------------------------------

def expand_kv(x: torch.Tensor, n_heads: int, dim: int = 1) -> torch.Tensor:
    """Grouped-query attention: repeat each key/value head along ``dim`` for the query heads that share it
    (key head j serves query heads j * H/Hkv .. (j+1) * H/Hkv - 1, transformers' ``repeat_kv``)."""
    return x.repeat_interleave(n_heads // x.shape[dim], dim=dim) if x.shape[dim] != n_heads else x


def softmax_stats(query, key, mask, scaling: float, sink_index: int, want: tuple[str, ...]) -> dict:
    """Sink weight, entropy and/or full pattern of softmax attention for one layer, from post-RoPE queries
    (B, H, T, D) and keys (B, Hkv, S, D); ``want`` names them as ``trace`` does (``attn.sink``, ``attn.entropy``,
    ``attn.pattern``). Sink and entropy never build a (T x S) matrix (``softmax_key_weights``)."""
    out: dict[str, torch.Tensor] = {}
    if "attn.pattern" in want:
        out["attn.pattern"] = next(softmax_pattern_chunks(query, key, mask, scaling, chunk=query.shape[2]))[1]
    if not {"attn.sink", "attn.entropy"} & set(want):
        return out
    weights, entropy = softmax_key_weights(query, key, mask, scaling, (sink_index,), "attn.entropy" in want)
    if "attn.sink" in want:
        out["attn.sink"] = weights[0]
    if entropy is not None:
        out["attn.entropy"] = entropy
    return out


def softmax_key_weights(query, key, mask, scaling: float, keys: tuple[int, ...],
                        entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(len(keys), B, H, T) softmax weight each query gives each key of ``keys``, and with ``entropy`` the (B, H, T)
    entropy of each query's distribution, without a (T x S) matrix: one fused attention pass with the keys as values
    gives E_p[k] and the log-partition log Z (``compat.attention_with_lse``). With key j's logit s_j its weight is
    p_j = exp(s_j - log Z), and the entropy is log Z - scale * q . E_p[k]."""
    H, T = query.shape[1:3]
    S = key.shape[2]
    for j in keys:
        check_sink_index(j, S)
    q, k = query.float(), expand_kv(key, H).float()
    expected_k, log_z = compat.attention_with_lse(q, k, k, scaling, **_sdpa_mask(mask, T, S, q.device))
    weights = torch.stack([torch.exp((q * k[:, :, j, None, :]).sum(-1) * scaling + _mask_column(mask, T, S, j, q.device)
                                     - log_z) for j in keys])
    return weights, (log_z - scaling * (q * expected_k).sum(-1)) if entropy else None


def softmax_pattern_chunks(query, key, mask, scaling: float, chunk: int = 256) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first query, (B, H, c, S) attention maps of queries first..first+c-1)`` in float32, ``chunk`` queries at a
    time: every row of the full map, with memory of one chunk (a softmax row needs only its own logits)."""
    H, T = query.shape[1:3]
    S = key.shape[2]
    k = expand_kv(key, H).float().transpose(-1, -2)
    additive = as_additive(mask, T, S, torch.float32, query.device)
    for start in range(0, T, chunk):
        scores = (query[:, :, start:start + chunk].float() @ k) * scaling + additive[..., start:start + chunk, :]
        yield start, scores.softmax(-1)


def check_sink_index(sink_index: int, n_keys: int) -> None:
    if not 0 <= sink_index < n_keys:
        raise ValueError(f"sink_index {sink_index} is outside the {n_keys} keys of this forward pass")


def sigmoid_weights(query, key, mask, scaling: float) -> torch.Tensor:
    """Sigmoid attention weights (B, H, T, S) in float32: sigmoid(scale * q.k - log S), 0 on masked keys."""
    T, S = query.shape[2], key.shape[2]
    add = as_additive(mask, T, S, torch.float32, query.device)
    scores = query.float() @ expand_kv(key, query.shape[1]).float().transpose(-1, -2)
    return torch.sigmoid(scores * scaling + add - math.log(S))


def stats(module, query, key, mask, scaling: float, sink_index: int, want: tuple[str, ...]) -> dict:
    """Attention statistics under the module's variant (``softmax_stats`` for the softmax variants).

    For ``sigmoid`` the weights do not sum to 1: ``attn.sink`` and ``attn.pattern`` report the raw sigmoid weights
    (what the sink key really receives), and ``attn.entropy`` is the entropy of each query's weights normalised to
    sum 1 (0 for a row of zeros)."""
    if variant_of(module) != "sigmoid":
        return softmax_stats(query, key, mask, scaling, sink_index, want)
    out: dict[str, torch.Tensor] = {}
    if "attn.pattern" in want:
        out["attn.pattern"] = sigmoid_weights(query, key, mask, scaling)
    if {"attn.sink", "attn.entropy"} & set(want):
        weights, entropy = key_weights(module, query, key, mask, scaling, (sink_index,), "attn.entropy" in want)
        out |= {"attn.sink": weights[0]} if "attn.sink" in want else {}
        out |= {"attn.entropy": entropy} if entropy is not None else {}
    return out


def key_weights(module, query, key, mask, scaling: float, keys: tuple[int, ...],
                entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softmax_key_weights`` under the module's variant: for ``sigmoid`` the raw sigmoid weights of ``keys`` and the
    entropy of each query's weights normalised to sum 1 (0 for a row of zeros), as ``stats`` reports them."""
    if variant_of(module) != "sigmoid":
        return softmax_key_weights(query, key, mask, scaling, keys, entropy)
    weights = sigmoid_weights(query, key, mask, scaling)
    for j in keys:
        check_sink_index(j, weights.shape[-1])
    return torch.stack([weights[..., j] for j in keys]), pattern_entropy(module, weights) if entropy else None


def pattern_entropy(module, pattern: torch.Tensor) -> torch.Tensor:
    """The entropy of each row of a ``pattern_chunks`` map, as ``key_weights`` reports it: for ``sigmoid`` of the
    row's weights normalised to sum 1 (0 for a row of zeros)."""
    if variant_of(module) == "sigmoid":
        pattern = pattern / pattern.sum(-1, keepdim=True).clamp_min(_TINY)
    return metrics.entropy(pattern)


def pattern_chunks(module, query, key, mask, scaling: float, chunk: int = 256) -> Iterator[tuple[int, torch.Tensor]]:
    """``softmax_pattern_chunks`` under the module's variant (sigmoid: its raw weights, in one chunk)."""
    if variant_of(module) != "sigmoid":
        return softmax_pattern_chunks(query, key, mask, scaling, chunk)
    return iter([(0, sigmoid_weights(query, key, mask, scaling))])


def attend(module, query, key, value, mask, scaling: float, dropout: float,
           **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention output of ``module``'s variant, (B, T, H, D), and optional weights (``variants`` describes
    each variant). The baseline is transformers' own sdpa function, so its outputs stay bit-identical to it."""
    variant = variant_of(module)
    gate_input = kwargs.pop(GATE_INPUT, None)
    if variant == "sigmoid":
        weights = sigmoid_weights(query, key, mask, scaling).to(value.dtype)
        if dropout:
            weights = F.dropout(weights, p=dropout)
        return (weights @ expand_kv(value, query.shape[1])).transpose(1, 2).contiguous(), weights
    out, weights = compat.sdpa_forward()(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    if variant == "baseline":
        return out, weights
    if variant in SUBMODULES and not hasattr(module, SUBMODULES[variant]):
        raise RuntimeError(f"this {variant!r} model lacks self_attn.{SUBMODULES[variant]}: create it with "
                           f"variants.build, or load it with models.load (which calls variants.attach)")
    if variant == "headwise_rmsnorm":
        return module.head_norm(out), weights
    return out * torch.sigmoid(module.attn_gate(gate_input)).unflatten(-1, out.shape[-2:]), weights


# --- the registered function, its taps and mask edits ----------------------------------------------------

def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: the mask edits open on ``module``, the variant's output, then every
    tap open on ``module`` sees (module, query, key, value, mask, scaling)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    T, S = query.shape[2], key.shape[2]
    for modules, edit in _mask_edits:
        if modules is None or module in modules:
            attention_mask = edit(compat.align_mask(attention_mask, S), T, S, query.device)
    out, weights = attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    for tap_fn in _taps.get(module, ()):
        tap_fn(module, query, key, value, attention_mask, scaling)
    return out, weights


compat.register_attention(ATTN_NAME, forward)


@contextlib.contextmanager
def tap(modules: Iterable[nn.Module], fn: Callable) -> Iterator[None]:
    """Inside the block, ``fn(module, query, key, value, mask, scaling)`` runs after each attention call of one
    of ``modules`` (``self_attn`` modules running the sinkbook attention), and of no other module."""
    modules = list(modules)
    for m in modules:
        _taps.setdefault(m, []).append(fn)
    try:
        yield
    finally:
        for m in modules:
            _taps[m].remove(fn)
            if not _taps[m]:
                del _taps[m]


@contextlib.contextmanager
def mask_edit(edit: Callable, modules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """Inside the block, the attention mask of ``modules`` (default: every module running the sinkbook attention)
    passes through ``edit(mask, q_len, kv_len, device) -> mask`` before attention and statistics use it."""
    entry = (None if modules is None else frozenset(modules), edit)
    _mask_edits.append(entry)
    try:
        yield
    finally:
        _mask_edits.remove(entry)


@contextlib.contextmanager
def output_edit() -> Iterator[None]:
    """Mark an edit of attention outputs as open for the block (``interventions.edit_head_output``; ``editing``)."""
    _output_edits[0] += 1
    try:
        yield
    finally:
        _output_edits[0] -= 1


def editing() -> bool:
    """True while a mask edit or an edit of attention outputs is open: what is measured now is not the unedited
    model's, so ``store`` neither reuses nor keeps it."""
    return bool(_mask_edits) or _output_edits[0] > 0
