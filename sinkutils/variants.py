"""Attention variants of chapter 6 (Fig 2, 14, 15, 16, 23) as a flag on a Llama config (``config.sink_variant``),
applied inside the registered attention function (``attention.attend``), so the transformers layer code is never
copied. This module builds, saves and loads variant models; ``sinkutils.attention`` holds their arithmetic.

- ``baseline``: softmax attention, exactly transformers' sdpa.
- ``headwise_rmsnorm``: the paper's fix. Each head's attention output is RMS-normalised over head_dim right
  after value aggregation, before W_O, with a learnable gain per (head, dim): every head enters W_O at the
  same scale, so a low-entropy head can no longer hand one token a high-variance output (Fig 13, 14).
- ``sigmoid``: sigmoid attention (Ramapuram et al. 2024): weights sigmoid(q.k * scale + b), b = -log(S) with
  S the number of keys in the forward pass, masked keys weight 0, no normalisation over keys.
- ``gated``: softmax attention times an elementwise gate sigmoid(x W_g), x the normalised hidden state
  entering ``self_attn``, W_g: hidden -> heads * head_dim, before W_O (Qiu et al. 2025, their G1 gate).

Parameters live in a submodule of every ``self_attn``, so they are in ``state_dict()`` and in what
``save_pretrained`` writes: ``model.layers.{l}.self_attn.head_norm.weight`` (heads, head_dim) and
``model.layers.{l}.self_attn.attn_gate.weight`` (heads * head_dim, hidden). ``from_pretrained`` does not know
them and drops them, so ``attach(model, folder)`` (``models.load`` calls it) re-creates the submodules and
loads their trained weights from the folder's safetensors. A variant model refuses to run under any other
attention implementation rather than silently computing the baseline.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from sinkutils import compat
from sinkutils.attention import ATTN_NAME, GATE_INPUT, SUBMODULES, variant_of

VARIANTS = {
    "baseline": "softmax attention, transformers' sdpa",
    "headwise_rmsnorm": "softmax attention, then RMSNorm over head_dim of each head's output before W_O",
    "sigmoid": "sigmoid(q.k * scale - log S) per key, no normalisation (Ramapuram et al. 2024)",
    "gated": "softmax attention times sigmoid(x W_g) elementwise, before W_O (Qiu et al. 2025)",
}


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last axis (head_dim) of (..., heads, head_dim), gain per (head, dim); Llama's RMSNorm
    arithmetic (float32 statistics, gain applied in the input dtype)."""

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _check(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return variant


def build(config, variant: str = "baseline") -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of the given variant, running the sinkbook attention.

    The shared parameters are drawn before the variant's own, so under one seed every variant starts from
    the same Llama weights (chapter 6 compares them from a common initialisation)."""
    from transformers import LlamaForCausalLM

    config.sink_variant = _check(variant)
    compat.choose_attention(config, ATTN_NAME)
    model = LlamaForCausalLM(config)
    attach(model)
    return model


def attach(model, source: str | os.PathLike | None = None) -> None:
    """Give a model its variant's submodules and pre-hook; with ``source`` (a folder or hub id), also their
    trained weights from its safetensors. No-op for ``baseline``; safe to call twice."""
    variant = variant_of(model)
    if variant not in VARIANTS:
        raise ValueError(f"model says sink_variant={variant!r}; this sinkbook knows {sorted(VARIANTS)}")
    if variant == "baseline":
        return
    compat.set_attention(model, ATTN_NAME)
    for attn in (block.self_attn for block in model.model.layers):  # a Llama, built or checked by models.load
        if _before_attention in attn._forward_pre_hooks.values():  # attached already
            continue
        part = _new_submodule(variant, attn)
        if part is not None:
            ref = attn.q_proj.weight
            attn.add_module(SUBMODULES[variant], part.to(device=ref.device, dtype=ref.dtype))
        attn.register_forward_pre_hook(_before_attention, with_kwargs=True)
    if source is not None and variant in SUBMODULES:
        _load_submodules(model, variant, source)


def _new_submodule(variant: str, attn) -> nn.Module | None:
    config, heads = attn.config, attn.config.num_attention_heads
    if variant == "headwise_rmsnorm":
        return HeadRMSNorm(heads, attn.head_dim, config.rms_norm_eps)
    if variant == "gated":  # initialised like the other projections (transformers' normal init)
        gate = nn.Linear(config.hidden_size, heads * attn.head_dim, bias=config.attention_bias)
        nn.init.normal_(gate.weight, std=config.initializer_range)
        if gate.bias is not None:
            nn.init.zeros_(gate.bias)
        return gate
    return None


def _before_attention(attn, args: tuple, kwargs: dict):
    """Forward pre-hook of a variant ``self_attn``: refuse other attention implementations (they would drop
    the variant silently) and pass the layer input x on to the attention function for the gate."""
    if (chosen := compat.attention_of(attn.config)) != ATTN_NAME:
        raise RuntimeError(f"this is a {variant_of(attn)!r} model: it only runs with attn_implementation="
                           f"{ATTN_NAME!r}, not {chosen!r}")
    if variant_of(attn) == "gated":
        kwargs[GATE_INPUT] = args[0] if args else kwargs["hidden_states"]
        return args, kwargs
    return None


def _load_submodules(model, variant: str, source: str | os.PathLike) -> None:
    """Copy the variant's tensors from the checkpoint's safetensors (single file or sharded) into the model."""
    from huggingface_hub import snapshot_download
    from safetensors import safe_open

    folder = Path(source) if Path(source).is_dir() else Path(snapshot_download(
        str(source), allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
    wanted = {k for k in model.state_dict() if f".self_attn.{SUBMODULES[variant]}." in k}
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    found: dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).exists():
            continue
        with safe_open(folder / name, framework="pt") as f:
            found |= {k: f.get_tensor(k) for k in wanted & set(f.keys())}
    missing = sorted(wanted - found.keys())
    if missing:
        raise ValueError(f"{source} says sink_variant={variant!r} but its safetensors lack {len(missing)} of the "
                         f"variant's tensors (e.g. {missing[0]}); was it saved from a {variant} model?")
    model.load_state_dict(found, strict=False)
