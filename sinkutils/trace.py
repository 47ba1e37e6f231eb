"""Record what the chapters measure, and only that, in one context manager.

    with trace.record(model, "attn.sink", "resid") as rec:
        model(input_ids=ids)
    rec["attn.sink"]   # (layers, batch, heads, queries): attention each query gives to the sink key

Quantities (raw Hugging Face numbers, no weight folding), per recorded layer:

- ``attn.in``       the normalised hidden state the attention block reads (``input_layernorm``'s output), (B, T, d)
- ``attn.q``        queries after RoPE, (B, T, heads, head_dim)
- ``attn.k``        keys after RoPE, (B, T, kv_heads, head_dim): under grouped-query attention fewer heads than the
                    queries (``attention.expand_kv`` repeats them)
- ``attn.v``        values, the ``v_proj`` output, (B, T, kv_heads, head_dim)
- ``attn.sink``     attention weight from each query to key ``sink_index`` (default 0), (B, heads, T)
- ``attn.entropy``  entropy (nats) of each query's attention distribution, (B, heads, T)
- ``attn.pattern``  full attention maps (B, heads, T, S): quadratic in T, so ask for few layers or short inputs
                    (chapter-1 heatmaps)
- ``attn.head_out`` per-head attention outputs after aggregation, before W_O, (B, T, heads, head_dim)
- ``mlp.in``        the FFN input, ``post_attention_layernorm`` of the residual after attention, (B, T, d)
- ``mlp.act``       FFN hidden activations act(gate) * up, the input of ``down_proj``, (B, T, ffn)
- ``resid``         residual stream: index 0 is the embedding output, index l+1 the output of layer l, (B, T, d)

The attention quantities come from the registered attention function (``sinkutils.attention``), which already
holds the post-RoPE queries and keys: nothing is recomputed. Sink and entropy never build a (T x T) matrix
(``attention.softmax_stats``). A recorder belongs to the model it was opened on: a forward pass of any other
model does not write into it.

Spread models (``models.load(device_map=...)``: consecutive layers on different GPUs, or offloaded to the CPU or
disk) are recorded as well: each quantity is computed where its layer runs (the attention statistics inside the
attention call, on that layer's device) and moved to the CPU as it is recorded, so ``rec[name]`` stacks layers that
ran anywhere and no GPU holds more than its own layers' activations.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from sinkutils import attention, compat, metrics, models
from sinkutils.attention import ATTN_NAME
from sinkutils.models import decoder_layers

QUANTITIES = ("attn.in", "attn.q", "attn.k", "attn.v", "attn.sink", "attn.entropy", "attn.pattern",
              "attn.head_out", "mlp.in", "mlp.act", "resid")
_ATTENTION_STATS = ("attn.sink", "attn.entropy", "attn.pattern")
_FROM_ATTENTION = ("attn.q", "attn.k", "attn.v") + _ATTENTION_STATS  # what the attention function hands over


class Recorder:
    """What one ``record`` block captured: ``rec[name]`` stacks the recorded layers in order."""

    def __init__(self, quantities: tuple[str, ...], layers: list[int], sink_index: int,
                 home: torch.device | None = None):
        self.quantities, self.layers, self.sink_index = quantities, layers, sink_index
        self.home = home  # where recorded values are gathered: the CPU for a spread model, else where they ran
        self._data: dict[str, dict[int, torch.Tensor]] = {q: {} for q in quantities}
        self.real: torch.Tensor | None = None  # (batch, T) False at padding queries; None: no padding mask
        self._passes = 0

    def put(self, name: str, layer: int, value: torch.Tensor) -> None:
        self._data[name][layer] = self.gathered(value.detach())

    def gathered(self, value: torch.Tensor | None) -> torch.Tensor | None:
        """``value`` on ``home`` (the CPU for a spread model); unchanged on a model on one device."""
        return value if value is None or self.home is None else value.to(self.home)

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
        if self.real is None:
            return metrics.mean_sink(sink, min_query)
        metrics.check_min_query(min_query, sink.shape[-1])
        padded = (~self.real[:, self.sink_index]).nonzero().flatten().tolist()
        if padded:
            raise ValueError(f"key {self.sink_index} is padding in rows {padded} (left padding?), so attention to it "
                             f"means nothing there; pad on the right or record those rows without padding")
        real = self.real[None, :, None, min_query:].expand_as(sink[..., min_query:])
        return torch.where(real, sink[..., min_query:], 0).sum(dim=(1, 2, 3)) / real.sum(dim=(1, 2, 3))


def mask_edit(edit, model=None, layers: list[int] | None = None) -> contextlib.AbstractContextManager[None]:
    """Inside the block, the attention mask passes through ``edit(mask, q_len, kv_len, device) -> mask`` before
    attention and statistics use it (chapter 3's interventions): in ``model``'s ``layers`` (default: all), or in
    every model running the sinkbook attention when no model is given (the assignments' form). ``mask`` arrives in
    any of the three forms (None means plain causal); ``attention.as_additive`` converts. Requires the sinkbook
    attention (``models.load`` sets it; ``interventions.block_aggregation`` sets it for its block)."""
    if model is None:
        return attention.mask_edit(edit)
    return attention.mask_edit(edit, attention_modules(model, layers))


def attention_modules(model, layers: list[int] | None = None) -> list[torch.nn.Module]:
    """The ``self_attn`` modules of ``model``'s ``layers`` (default: all), checked by ``models.check_layers``."""
    blocks = decoder_layers(model)
    return [blocks[l].self_attn for l in models.check_layers(model, layers)]


@contextlib.contextmanager
def record(model, *quantities: str, layers: list[int] | None = None, sink_index: int = 0) -> Iterator[Recorder]:
    """Record the named quantities of ``model``'s ``layers`` (default: all) during the forward pass inside the
    block (see the module docstring); only ``model``'s own forward pass writes into the recorder."""
    unknown = [q for q in quantities if q not in QUANTITIES]
    if unknown or not quantities:
        raise ValueError(f"unknown or no quantities {unknown or quantities}; choose from {QUANTITIES}")
    blocks = decoder_layers(model)
    layers = models.check_layers(model, layers, allow_empty=True)  # none: only the embedding output of ``resid``
    rec = Recorder(tuple(quantities), layers, sink_index, torch.device("cpu") if models.spread(model) else None)
    index = {block.self_attn: l for l, block in enumerate(blocks) if l in layers}
    want = tuple(q for q in _ATTENTION_STATS if q in quantities)

    def count_pass(_m, _args):
        # a second pass would overwrite the first one's layers, silently keeping only the last
        rec._passes += 1
        if rec._passes > 1:
            raise RuntimeError("trace.record holds one forward pass, and the model was called again inside the "
                               "block (generate() calls it once per token): open one `record` block per pass")

    def from_attention(module, query, key, value, mask, scaling):
        l = index[module]
        for name, x in (("attn.q", query), ("attn.k", key), ("attn.v", value)):
            if name in quantities:
                rec.put(name, l, x.transpose(1, 2))  # (B, T, heads, head_dim), as attn.head_out
        if want:
            T, S = query.shape[2], key.shape[2]
            rec.real = rec.gathered(attention.real_queries(mask, T, S))
            for name, x in attention.stats(module, query, key, mask, scaling, sink_index, want).items():
                rec.put(name, l, x)

    def first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    hooks = [blocks[0].register_forward_pre_hook(count_pass)]
    if "resid" in quantities:
        def embed_hook(_m, _inp, out):
            rec._data["resid"][-1] = rec.gathered(out.detach())
        hooks.append(model.get_input_embeddings().register_forward_hook(embed_hook))
    for l, block in enumerate(blocks):
        if l not in layers:
            continue
        attn = block.self_attn
        if "resid" in quantities:
            hooks.append(block.register_forward_hook(
                lambda _m, _i, out, l=l: rec.put("resid", l, compat.layer_output(out))))
        if "attn.in" in quantities:
            hooks.append(attn.register_forward_pre_hook(
                lambda _m, args, kwargs, l=l: rec.put("attn.in", l, first_arg(args, kwargs)), with_kwargs=True))
        if "attn.head_out" in quantities:
            hooks.append(attn.o_proj.register_forward_pre_hook(
                lambda _m, inp, a=attn, l=l: rec.put("attn.head_out", l,
                                                     inp[0].unflatten(-1, (-1, a.head_dim)))))
        if "mlp.in" in quantities:
            hooks.append(block.mlp.register_forward_pre_hook(
                lambda _m, args, kwargs, l=l: rec.put("mlp.in", l, first_arg(args, kwargs)), with_kwargs=True))
        if "mlp.act" in quantities:
            hooks.append(block.mlp.down_proj.register_forward_pre_hook(
                lambda _m, inp, l=l: rec.put("mlp.act", l, inp[0])))
    tapping = set(quantities) & set(_FROM_ATTENTION)
    previous = compat.set_attention(model, ATTN_NAME) if tapping else None
    try:
        with attention.tap(index if tapping else [], from_attention):
            yield rec
    finally:
        for h in hooks:
            h.remove()
        if previous is not None:
            compat.set_attention(model, previous)
    if "resid" in quantities and -1 in rec._data["resid"]:
        # store layer outputs at index l+1 after the embedding at 0
        data = rec._data["resid"]
        rec._data["resid"] = {0: data.pop(-1)} | {l + 1: v for l, v in data.items()}
