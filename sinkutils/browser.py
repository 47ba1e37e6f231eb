"""The embedded models for the reader's browser: an ONNX export run by ONNX Runtime Web on the "try it" page.

    python -m sinkutils.browser OUT_DIR      # OUT_DIR/<name>.onnx, tokenizer.json and models.json per model

Why a second formulation of the model: the recorded quantities (``trace``) come from hooks and a registered
attention function, which ``torch.onnx`` cannot carry into a graph. ``BrowserModel`` is the same network written
plainly (embedding, RMSNorm, RoPE, attention with the variant of ``sinkutils.variants``, SwiGLU FFN), sharing the
loaded model's parameters, with everything the page shows as graph outputs:

- inputs ``input_ids`` (1, T) int64 and ``attention_mask`` (1, 1, T, T) float32, *additive* and complete
  (causal part included): 0 where a query may attend, ``MASKED`` where it may not. The mask intervention of
  chapter 3 (``interventions.block_aggregation``) is then just another mask (``additive_mask(T, k)``).
- outputs ``logits`` (1, T, vocab), ``attentions`` (layers, heads, T, T) (for ``sigmoid`` the raw weights, as
  ``trace`` records them) and ``hidden_norms`` (layers + 1, T): the L2 norm of every token's residual stream,
  index 0 the embedding output, l + 1 the output of layer l (``trace``'s ``resid`` numbering).

``tests/test_browser_model.py`` checks it against ``sinkutils`` within 1e-4, in PyTorch and in onnxruntime,
with and without the mask at k; ``tests/test_browser_page.py`` checks the numbers the page displays.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from sinkutils import compat, models, variants

#: additive mask value for a key a query may not see: exp(-1e9) and sigmoid(-1e9) are exactly 0 in float32,
#: and unlike -inf it cannot turn into NaN through inf - inf
MASKED = -1e9
OPSET = 17
INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("logits", "attentions", "hidden_norms")


def additive_mask(T: int, k: int | None = None) -> torch.Tensor:
    """(1, 1, T, T) float32: causal; with ``k``, query k sees only key k (``interventions.block_row``)."""
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    if k is not None:
        allowed[k] = torch.arange(T) == k
    return torch.zeros(1, 1, T, T).masked_fill(~allowed, MASKED)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class BrowserModel(nn.Module):
    """A float32 Llama of ``models.load`` written out plainly (see module docstring); batch size 1."""

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.variant = variants.variant_of(model)
        if self.variant not in variants.VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}")
        if cfg.model_type != "llama" or cfg.num_key_value_heads != cfg.num_attention_heads:
            raise ValueError("BrowserModel exports Llama models without grouped-query attention (the embedded ones)")
        theta = compat.default_rope_theta(cfg)  # ValueError for other kinds of RoPE
        self.inner = model.model
        self.lm_head = model.lm_head
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _attention(self, attn, x: torch.Tensor, mask: torch.Tensor, cos, sin):
        T = x.shape[1]
        q, k, v = (proj(x).view(1, T, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5 + mask
        if self.variant == "sigmoid":  # sigmoid(q.k * scale - log S), S the number of keys (variants.sigmoid_weights)
            # S from the scores' shape, not a Python float: a float would be frozen into the graph at export
            n_keys = torch.ones_like(scores[..., :1, :]).sum(-1, keepdim=True)
            weights = torch.sigmoid(scores - n_keys.log())
        else:
            weights = scores.softmax(-1)
        out = (weights @ v).transpose(1, 2)  # (1, T, H, D)
        if self.variant == "headwise_rmsnorm":
            out = attn.head_norm(out)
        elif self.variant == "gated":
            out = out * torch.sigmoid(attn.attn_gate(x)).view(1, T, self.heads, self.head_dim)
        return attn.o_proj(out.reshape(1, T, -1)), weights[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        T = input_ids.shape[1]
        freqs = torch.arange(T, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        h = self.inner.embed_tokens(input_ids)
        norms, maps = [h.norm(dim=-1)[0]], []
        for block in self.inner.layers:
            a, w = self._attention(block.self_attn, _rms(h, block.input_layernorm.weight, self.eps),
                                   attention_mask, cos, sin)
            h = h + a
            m = _rms(h, block.post_attention_layernorm.weight, self.eps)
            h = h + block.mlp.down_proj(nn.functional.silu(block.mlp.gate_proj(m)) * block.mlp.up_proj(m))
            norms.append(h.norm(dim=-1)[0])
            maps.append(w)
        logits = self.lm_head(_rms(h, self.inner.norm.weight, self.eps))
        return logits, torch.stack(maps), torch.stack(norms)


def export(name: str, out_dir: Path) -> dict:
    """``out_dir/<name>.onnx`` from the embedded model ``name``; returns its entry for ``models.json``."""
    model, _tok = models.load(name, device="cpu", dtype=torch.float32)
    wrapped = BrowserModel(model).eval()
    T = 8
    ids = torch.arange(1, T + 1)[None]
    path = out_dir / f"{name}.onnx"
    # TracerWarnings name shape checks of the embedding that do not depend on T; tests run the graph at other T
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(wrapped, (ids, additive_mask(T)), str(path), input_names=list(INPUTS),
                          output_names=list(OUTPUTS), opset_version=OPSET, dynamo=False,
                          dynamic_axes={"input_ids": {1: "T"}, "attention_mask": {2: "T", 3: "T"},
                                        "logits": {1: "T"}, "attentions": {2: "T", 3: "T"}, "hidden_norms": {1: "T"}})
    cfg = model.config
    return {"name": name, "file": path.name, "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "variant": variants.variant_of(model),
            "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "vocab": cfg.vocab_size,
            "bos": cfg.bos_token_id}


#: the page refuses longer inputs: the maps are (layers, heads, T, T) and the budget is stated at 128 tokens
MAX_TOKENS = 128


def export_all(out_dir: Path, names: list[str] | None = None) -> Path:
    """Every embedded model (they share one tokenizer, copied once) and ``models.json`` describing them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(models.EMBEDDED) if names is None else names
    tokenizers = {(models.CHECKPOINTS / models.EMBEDDED[n] / "tokenizer.json").read_bytes() for n in names}
    if len(tokenizers) != 1:
        raise ValueError("the embedded models do not share one tokenizer.json; the page loads only one")
    shutil.copy2(models.CHECKPOINTS / models.EMBEDDED[names[0]] / "tokenizer.json", out_dir / "tokenizer.json")
    shutil.copy2(models.CHECKPOINTS / models.EMBEDDED[names[0]] / "tokenizer_config.json",
                 out_dir / "tokenizer_config.json")
    entries = [export(n, out_dir) for n in names]
    if len({e["bos"] for e in entries}) != 1:
        raise ValueError("the embedded models do not share one BOS id")
    shared = {"bos": entries[0]["bos"], "masked": MASKED, "max_tokens": MAX_TOKENS, "opset": OPSET}
    (out_dir / "models.json").write_text(json.dumps({**shared, "models": entries}, indent=1))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sinkutils.browser", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--models", nargs="*", default=None, help=f"default: all of {sorted(models.EMBEDDED)}")
    args = p.parse_args(argv)
    out = export_all(args.out_dir, args.models)
    for e in json.loads((out / "models.json").read_text())["models"]:
        print(f"{out / e['file']}: {e['bytes'] / 1e6:.2f} MB ({e['variant']})")


if __name__ == "__main__":
    main()
