"""Every difference between transformers versions (4.48 through 5.x) that sinkbook touches, in one place."""
from __future__ import annotations

from typing import Callable

import torch
import transformers
from packaging.version import Version

TRANSFORMERS = Version(transformers.__version__)


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


def set_attention(model, name: str) -> str:
    """Switch a loaded model's attention implementation; returns the previous name."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    for sub in model.modules():  # some versions copy the config into sub-configs
        cfg = getattr(sub, "config", None)
        if cfg is not None and cfg is not model.config and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name
    return previous


def dtype_kwarg(dtype) -> dict:
    """``torch_dtype=`` became ``dtype=`` in 4.56."""
    return {"dtype": dtype} if TRANSFORMERS >= Version("4.56") else {"torch_dtype": dtype}


def layer_output(output) -> torch.Tensor:
    """Decoder layers return a tuple before 4.54 and a tensor after."""
    return output[0] if isinstance(output, tuple) else output


def align_mask(mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """On 4.48-4.52 the float mask can be one longer than the keys."""
    return None if mask is None else mask[..., :kv_len]
