"""Attention variants of chapter 6 as a flag on a Llama config (``config.sink_variant``), applied inside
the registered attention function, so the transformers layer code is never copied.

- ``baseline``: softmax attention, exactly transformers' sdpa.
"""
from __future__ import annotations

import torch

from sinkutils import compat

VARIANTS = {"baseline": "softmax attention, transformers' sdpa"}


def variant_of(module) -> str:
    return getattr(module.config, "sink_variant", "baseline")


def build(config, variant: str = "baseline"):
    """A randomly initialised ``LlamaForCausalLM`` of the given variant, running the sinkbook attention."""
    from transformers import LlamaForCausalLM

    from sinkutils import trace

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    config.sink_variant = variant
    config._attn_implementation = trace.ATTN_NAME
    return LlamaForCausalLM(config)


def attach(model, source: str | None = None) -> None:
    """Give a loaded model its variant's extra modules (none for ``baseline``)."""
    variant = variant_of(model.model.layers[0].self_attn)
    if variant not in VARIANTS:
        raise ValueError(f"model says sink_variant={variant!r}; this sinkbook knows {sorted(VARIANTS)}")


def attend(module, query, key, value, mask, scaling: float, dropout: float, **kwargs):
    """The attention output of ``module``'s variant: (B, T, H, D) and optional weights."""
    return compat.sdpa_forward()(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def stats(module, query, key, mask, scaling: float, sink_index: int, want: tuple[str, ...]) -> dict:
    """Attention statistics under the module's variant (see ``trace.attention_stats``)."""
    from sinkutils import trace

    return trace.attention_stats(query, key, mask, scaling, sink_index, want)
