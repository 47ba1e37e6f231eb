"""Every difference between transformers versions (4.48 through 5.x) that sinkbook touches, in one place."""
from __future__ import annotations

from typing import Callable

import torch
import transformers
from packaging.version import Version

TRANSFORMERS = Version(transformers.__version__)

# The releases besides requirements.txt's pin that tests/test_versions.py runs the unit tests and the embedded
# models on (the oldest pyproject admits and one in between), each with the tokenizers and huggingface_hub it needs.
OTHER_TESTED_RELEASES = {
    "4.48.3": ("tokenizers==0.21.4", "huggingface_hub==0.36.0"),
    "4.57.6": ("tokenizers==0.22.1", "huggingface_hub==0.36.0"),
}


def register_attention(name: str, fn: Callable) -> None:
    """Make ``fn`` selectable as ``attn_implementation=name``, with sdpa's mask builder.

    From 4.53 a name without a registered mask function gets ``attention_mask=None`` even with padding.
    """
    try:
        from transformers import AttentionInterface
    except ImportError:  # before 4.51: the plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[name] = fn
    else:
        AttentionInterface.register(name, fn)
    try:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError:
        return
    AttentionMaskInterface.register(name, sdpa_mask)


def sdpa_forward() -> Callable:
    """transformers' own sdpa attention function: calling it keeps outputs bit-identical to "sdpa"."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def attention_of(config) -> str | None:
    """The attention implementation a config selects (a private field in every version so far)."""
    return getattr(config, "_attn_implementation", None)


def choose_attention(config, name: str) -> None:
    """Select attention implementation ``name`` on a config before a model is built from it."""
    config._attn_implementation = name


def set_attention(model, name: str) -> str:
    """Switch a loaded model's attention implementation; returns the previous name."""
    previous = attention_of(model.config)
    choose_attention(model.config, name)
    for sub in model.modules():  # some versions copy the config into sub-configs
        cfg = getattr(sub, "config", None)
        if cfg is not None and cfg is not model.config and attention_of(cfg) is not None:
            choose_attention(cfg, name)
    return previous


def default_rope_theta(config) -> float:
    """RoPE's base of a config that uses plain RoPE: 5.x keeps it in ``rope_parameters``, 4.x in ``rope_theta``
    (with ``rope_scaling`` for the other kinds); ValueError for any other kind of RoPE."""
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"RoPE type {kind!r}: only the default RoPE is implemented here")
    return float(params.get("rope_theta", getattr(config, "rope_theta", None)))


def dtype_kwarg(dtype) -> dict:
    """``torch_dtype=`` became ``dtype=`` in 4.56."""
    return {"dtype": dtype} if TRANSFORMERS >= Version("4.56") else {"torch_dtype": dtype}


def layer_output(output) -> torch.Tensor:
    """Decoder layers return a tuple before 4.54 and a tensor after."""
    return output[0] if isinstance(output, tuple) else output


def align_mask(mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """On 4.48-4.52 the float mask can be one longer than the keys."""
    return None if mask is None else mask[..., :kv_len]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                       chunk: int = 256, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention output and its log-partition (B, H, T), from a fused kernel when torch exposes one.

    The fused kernels compute the log-sum-exp anyway but the public SDPA drops it; their names are private
    and move between torch versions, so they are reached only here, with an exact chunked fallback (memory
    of one (chunk x S) block per head) for devices or versions without them.
    """
    try:
        if not fused:
            raise RuntimeError("fallback asked for")
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)[:2]
            return out, lse
        if q.device.type == "cuda":
            bias = None if attn_mask is None else (
                torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
                if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype))
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, bias, True, 0.0, is_causal, scale=scale)[:2]
            return out, lse[..., :q.shape[2]]
    except (AttributeError, RuntimeError, TypeError):
        pass
    T, S = q.shape[2], k.shape[2]
    outs, lses = [], []
    for start in range(0, T, chunk):
        qc = q[:, :, start:start + chunk]
        s = (qc @ k.transpose(-1, -2)) * scale
        if is_causal:
            rows = torch.arange(start, start + qc.shape[2], device=q.device)[:, None]
            s = s.masked_fill(rows < torch.arange(S, device=q.device)[None, :], float("-inf"))
        if attn_mask is not None:
            m = attn_mask[..., start:start + chunk, :]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
        lses.append(s.logsumexp(-1))
        outs.append(s.softmax(-1) @ v)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def make_portable(folder) -> None:
    """Rewrite the config and tokenizer files that ``save_pretrained`` wrote into ``folder`` so that every
    supported version reads them: 5.x names the tokenizer class ``TokenizersBackend`` (unknown before 5.0; the
    same fast tokenizer is ``PreTrainedTokenizerFast`` in both) and writes RoPE only as ``rope_parameters``
    (4.x reads ``rope_theta``). Only keys are added or renamed; the values stay those saved."""
    import json
    from pathlib import Path

    folder = Path(folder)
    cfg_path, tok_path = folder / "config.json", folder / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" not in cfg and "rope_theta" in rope:
            if rope.get("rope_type", "default") != "default":
                raise ValueError(f"{cfg_path}: RoPE type {rope['rope_type']!r} has no 4.x form written by sinkbook")
            cfg["rope_theta"] = rope["rope_theta"]
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tok_path.exists():
        tok = json.loads(tok_path.read_text())
        if tok.get("tokenizer_class") == "TokenizersBackend":
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        for key in ("backend", "is_local", "local_files_only"):  # 5.x bookkeeping that 4.x would store as kwargs
            tok.pop(key, None)
        tok_path.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")
