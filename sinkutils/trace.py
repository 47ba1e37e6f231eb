"""Record what the chapters measure, and only that, in one context manager.

    with trace.record(model, "attn.sink", "resid") as rec:
        model(input_ids=ids)
    rec["attn.sink"]   # (layers, batch, heads, queries): attention each query gives to the sink key

Quantities (raw Hugging Face numbers, no weight folding):

- ``attn.sink``     attention weight from each query to key ``sink_index`` (default 0), per layer and head
- ``attn.entropy``  entropy (nats) of each query's attention distribution, per layer and head
- ``attn.pattern``  full attention maps (batch, heads, T, S): quadratic in T, so ask for few layers or short
                    inputs (chapter-1 heatmaps)
- ``attn.head_out`` per-head attention outputs after aggregation, before W_O: (batch, T, heads, head_dim)
- ``resid``         residual stream: index 0 is the embedding output, index l+1 the output of layer l
- ``mlp.act``       FFN hidden activations act(gate) * up, the input of ``down_proj``

Sink and entropy never build a (T x T) matrix: one extra fused attention pass per layer uses the keys as
values, giving E_p[k] and the log-partition log Z (``compat.attention_with_lse``). With the sink's logit
s_s, its weight is p_s = exp(s_s - log Z) and the entropy is log Z - scale * q . E_p[k].
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from sinkutils import compat, metrics

ATTN_NAME = "sinkbook"
QUANTITIES = ("attn.sink", "attn.entropy", "attn.pattern", "attn.head_out", "resid", "mlp.act")
_ATTENTION_STATS = ("attn.sink", "attn.entropy", "attn.pattern")


class Recorder:
    """What one ``record`` block captured: ``rec[name]`` stacks the recorded layers in order."""

    def __init__(self, quantities: tuple[str, ...], layers: list[int], sink_index: int):
        self.quantities, self.layers, self.sink_index = quantities, layers, sink_index
        self._data: dict[str, dict[int, torch.Tensor]] = {q: {} for q in quantities}
        self.real: torch.Tensor | None = None  # (batch, T) False at padding queries; None: no padding mask
        self._passes = 0

    def wants(self, name: str, layer: int) -> bool:
        return name in self._data and layer in self.layers

    def put(self, name: str, layer: int, value: torch.Tensor) -> None:
        self._data[name][layer] = value.detach()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._data:
            raise KeyError(f"{name!r} was not recorded; this block recorded {self.quantities}")
        got = self._data[name]
        if not got:
            raise RuntimeError(f"{name!r} is empty: was the model called inside the `with` block?")
        return torch.stack([got[k] for k in sorted(got)])

    def sink_per_layer(self, min_query: int = 4) -> torch.Tensor:
        """Mean attention to the sink key per layer, over batch, heads and queries at positions >= min_query
        (early queries attend to few keys, so their weight on token 0 is high for trivial reasons). Padding
        queries are left out; a sink key that is padding in some row (left padding) is refused."""
        sink = self["attn.sink"].float()
        metrics.check_min_query(min_query, sink.shape[-1])
        if self.real is None:
            return sink[..., min_query:].mean(dim=(1, 2, 3))
        padded = (~self.real[:, self.sink_index]).nonzero().flatten().tolist()
        if padded:
            raise ValueError(f"key {self.sink_index} is padding in rows {padded} (left padding?), so attention to it "
                             f"means nothing there; pad on the right or record those rows without padding")
        real = self.real[None, :, None, min_query:].expand_as(sink[..., min_query:])
        return torch.where(real, sink[..., min_query:], 0).sum(dim=(1, 2, 3)) / real.sum(dim=(1, 2, 3))


_active: list[Recorder] = []
_mask_edits: list = []  # callables (mask, q_len, kv_len, device) -> mask; interventions push here


def _causal_bool(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Causal mask aligned lower-right (a query sees every key up to its own absolute position)."""
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return q >= torch.arange(kv_len, device=device)[None, :]


def as_additive(mask: torch.Tensor | None, q_len: int, kv_len: int, dtype, device) -> torch.Tensor:
    """Any of the three mask forms (None = causal, bool = True attends, float additive) as a float mask."""
    mask = compat.align_mask(mask, kv_len)
    if mask is None:
        mask = _causal_bool(q_len, kv_len, device)[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    return x.repeat_interleave(n_heads // x.shape[1], dim=1) if x.shape[1] != n_heads else x


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


def _real_queries(mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor | None:
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
        return {"is_causal": True} if q_len == kv_len else {"attn_mask": _causal_bool(q_len, kv_len, device)}
    return {"attn_mask": mask if mask.dtype == torch.bool else mask.float()}


def attention_stats(query, key, mask, scaling: float, sink_index: int, want: tuple[str, ...]) -> dict:
    """Sink weight, entropy and/or full pattern for one layer, from post-RoPE q (B,H,T,D) and k (B,Hkv,S,D)."""
    B, H, T, D = query.shape
    S = key.shape[2]
    out: dict[str, torch.Tensor] = {}
    if "attn.pattern" in want:
        k = _expand_kv(key, H).float()
        scores = (query.float() @ k.transpose(-1, -2)) * scaling + as_additive(mask, T, S, torch.float32,
                                                                                query.device)
        out["attn.pattern"] = scores.softmax(-1)
    if not {"attn.sink", "attn.entropy"} & set(want):
        return out
    if not 0 <= sink_index < S:
        raise ValueError(f"sink_index {sink_index} is outside the {S} keys of this forward pass")
    # one fused pass with the keys as values: E_p[k] and the log-partition log Z give everything.
    q, k = query.float(), _expand_kv(key, H).float()
    expected_k, log_z = compat.attention_with_lse(q, k, k, scaling, **_sdpa_mask(mask, T, S, q.device))
    s_sink = (q * k[:, :, sink_index, None, :]).sum(-1) * scaling + _mask_column(mask, T, S, sink_index, q.device)
    if "attn.sink" in want:
        out["attn.sink"] = torch.exp(s_sink - log_z)
    if "attn.entropy" in want:
        out["attn.entropy"] = log_z - scaling * (q * expected_k).sum(-1)
    return out


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: sdpa's own output, then what the active recorder asks for."""
    from sinkutils import variants

    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    T, S = query.shape[2], key.shape[2]
    for edit in _mask_edits:
        attention_mask = edit(compat.align_mask(attention_mask, S), T, S, query.device)
    out, weights = variants.attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    layer = module.layer_idx
    for rec in _active:
        want = tuple(q for q in _ATTENTION_STATS if rec.wants(q, layer))
        if want:
            rec.real = _real_queries(attention_mask, T, S)
            stats = variants.stats(module, query, key, attention_mask, scaling, rec.sink_index, want)
            for name, value_ in stats.items():
                rec.put(name, layer, value_)
    return out, weights


compat.register_attention(ATTN_NAME, attention)


@contextlib.contextmanager
def mask_edit(edit) -> Iterator[None]:
    """Inside the block, every attention mask passes through ``edit(mask, q_len, kv_len, device) -> mask``
    before attention and statistics use it (chapter 3's interventions). ``mask`` arrives in any of the
    three forms (None means plain causal); ``as_additive`` converts. Requires the sinkbook attention
    (``models.load`` sets it; ``record`` sets it for its block)."""
    _mask_edits.append(edit)
    try:
        yield
    finally:
        _mask_edits.remove(edit)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's decoder layers (Llama-like models keep them at ``model.model.layers``), else a TypeError
    naming what was passed (e.g. one layer, or the inner ``model.model``, instead of the causal LM)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"expected a Llama-like causal LM with decoder layers at .model.layers (what models.load "
                        f"returns), got {type(model).__name__}")
    return layers


@contextlib.contextmanager
def record(model, *quantities: str, layers: list[int] | None = None, sink_index: int = 0) -> Iterator[Recorder]:
    """Record the named quantities during the forward passes inside the block (see module docstring)."""
    unknown = [q for q in quantities if q not in QUANTITIES]
    if unknown or not quantities:
        raise ValueError(f"unknown or no quantities {unknown or quantities}; choose from {QUANTITIES}")
    from sinkutils.models import check_layers

    blocks = decoder_layers(model)
    layers = check_layers(model, layers, allow_empty=True)  # none: only the embedding output of ``resid``
    rec = Recorder(tuple(quantities), layers, sink_index)

    def count_pass(_m, _args):
        # a second pass would overwrite the first one's layers, silently keeping only the last
        rec._passes += 1
        if rec._passes > 1:
            raise RuntimeError("trace.record holds one forward pass, and the model was called again inside the "
                               "block (generate() calls it once per token): open one `record` block per pass")

    hooks = [blocks[0].register_forward_pre_hook(count_pass)]
    if "resid" in quantities:
        def embed_hook(_m, _inp, out):
            rec._data["resid"][-1] = out.detach()
        hooks.append(model.get_input_embeddings().register_forward_hook(embed_hook))
    for l, block in enumerate(blocks):
        if l not in layers:
            continue
        if "resid" in quantities:
            hooks.append(block.register_forward_hook(
                lambda _m, _i, out, l=l: rec.put("resid", l, compat.layer_output(out))))
        if "attn.head_out" in quantities:
            attn = block.self_attn
            hooks.append(attn.o_proj.register_forward_pre_hook(
                lambda _m, inp, a=attn, l=l: rec.put("attn.head_out", l,
                                                     inp[0].unflatten(-1, (-1, a.head_dim)))))
        if "mlp.act" in quantities:
            hooks.append(block.mlp.down_proj.register_forward_pre_hook(
                lambda _m, inp, l=l: rec.put("mlp.act", l, inp[0])))
    previous = compat.set_attention(model, ATTN_NAME) if set(quantities) & set(_ATTENTION_STATS) else None
    _active.append(rec)
    try:
        yield rec
    finally:
        _active.remove(rec)
        for h in hooks:
            h.remove()
        if previous is not None:
            compat.set_attention(model, previous)
    if "resid" in quantities and -1 in rec._data["resid"]:
        # store layer outputs at index l+1 after the embedding at 0
        data = rec._data["resid"]
        rec._data["resid"] = {0: data.pop(-1)} | {l + 1: v for l, v in data.items()}
