"""Chapter 3's causal checks (Fig 5, 6, 19, 20), each a context manager around ordinary forward passes.

    with interventions.block_aggregation(model, k=10):        # token 10 attends only to itself
        with trace.record(model, "attn.sink", sink_index=10) as rec:
            model(input_ids=ids)

- ``block_aggregation(model, k)``: query k sees only key k (as token 0 always does), every other row keeps
  its causal/padding mask. Applied in all layers or in the ``layers`` given.
- ``amplify_variance(model, k, lam, layer)``: token k's per-head attention output at ``layer`` (after value
  aggregation, before W_O) becomes ``mean + lam * (o - mean)`` over head_dim: its dimension-wise variance
  grows by ``lam**2``, its mean stays.
- ``scale_norm(model, k, lam, layer)``: the control. The same output's norm grows by ``lam`` while its
  dimension-wise variance stays: since ``|o|^2 = D (mean^2 + var)``, the only way to change the norm and not
  the variance is to move the mean, so the control adds a constant ``c`` to every coordinate.

Why the attention output: it is where chapter 2 measures the variance discrepancy, so "amplify by lam"
multiplies exactly the chapter-2 quantity by ``lam**2`` (blocking aggregation raises it by ``1 / sum_j p_kj^2``),
and everything downstream (W_O, the FFN, RMSNorm) acts on it as it acts on token 0's.

Hook order matters: enter these blocks *before* ``trace.record`` so that the recorder's hooks (registered
later, run later) see the modified states.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Callable, Iterator, Sequence

import torch

from sinkutils import attention, compat, models, trace


def check_position(k: int, seq_len: int | None = None, attended: bool = False, first: bool = False) -> int:
    """``k`` if it is a valid intervention position (1..T-1; 1..T-2 when ``attended``, i.e. when later queries
    must exist to attend to it; from 0 with ``first``, for edits of token 0 itself), else a ValueError saying
    what is valid."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"position k must be an integer, got {k!r}")
    k = int(k)
    if k < 0 or (k == 0 and not first):
        raise ValueError(f"position k={k} is not allowed: token 0 already attends only to itself; "
                         f"choose k in 1..T-1")
    if seq_len is not None and k >= seq_len:
        raise ValueError(f"position k={k} is beyond the sequence of {seq_len} tokens; choose k in 1..{seq_len - 1}")
    if attended and seq_len is not None and k == seq_len - 1:
        raise ValueError(f"position k={k} is the last of {seq_len} tokens: no later query can attend to it; "
                         f"choose k in 1..{seq_len - 2}")
    return k


def check_lambda(lam: float, minimum: float = 0.0) -> float:
    """``lam`` as a float if it is a finite number >= ``minimum``, else a ValueError (an infinite lambda
    turns the edited output, and every curve after it, into NaN)."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
        raise ValueError(f"lambda must be a finite number, got {lam!r}")
    if lam < minimum:
        raise ValueError(f"lambda={lam} is not allowed: it must be >= {minimum}")
    return float(lam)


def check_edit_layer(model, layer: int) -> int:
    """``layer`` if an edit of its attention output can change attention somewhere (every layer but the
    last), else a ValueError naming the valid range."""
    n = models.n_layers(model)
    try:
        return models.check_index(layer, n - 1, "layer")
    except ValueError:
        raise ValueError(f"layer {layer} cannot be edited usefully: an edit after attention changes only later "
                         f"layers' attention; this model has layers 0..{n - 1}, so choose 0..{n - 2}") from None


def block_row(mask: torch.Tensor | None, k: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """``mask`` (None = causal, bool = True attends, or float additive) with the row of absolute position
    ``k`` restricted to key ``k``: that query attends only to itself. Other rows are untouched; the form is
    kept (None becomes bool). A key k the row could not see before (padding) stays unseen."""
    if k >= kv_len:
        raise ValueError(f"position k={k} is beyond the sequence of {kv_len} tokens; choose k in 1..{kv_len - 1}")
    row = k - (kv_len - q_len)  # queries are the last q_len positions
    if mask is None:
        mask = attention.causal_mask(q_len, kv_len, device)[None, None]
    if not 0 <= row < q_len:
        return mask
    mask = mask.clone()
    others = torch.arange(kv_len, device=mask.device) != k
    if mask.dtype == torch.bool:
        mask[..., row, :] &= ~others
    else:
        mask[..., row, :] = mask[..., row, :].masked_fill(others, torch.finfo(mask.dtype).min)
    return mask


@contextlib.contextmanager
def block_aggregation(model, k: int, layers: Sequence[int] | None = None) -> Iterator[None]:
    """Mask intervention (Fig 5, 19): token ``k`` attends only to itself in ``layers`` (default: all), so its
    attention output is its own value vector, as token 0's always is. Nothing else changes, in this model or any
    other."""
    k = check_position(k)
    modules = trace.attention_modules(model, layers)
    previous = compat.set_attention(model, attention.ATTN_NAME)
    try:
        with attention.mask_edit(lambda mask, q_len, kv_len, device: block_row(mask, k, q_len, kv_len, device),
                                 modules):
            yield
    finally:
        compat.set_attention(model, previous)


def amplified(x: torch.Tensor, lam: float) -> torch.Tensor:
    """``mean + lam * (x - mean)`` over the last dimension: variance times ``lam**2``, mean unchanged (Fig 6)."""
    lam = check_lambda(lam)
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    return (mean + lam * (xf - mean)).to(x.dtype)


def norm_scaled(x: torch.Tensor, lam: float) -> torch.Tensor:
    """``x + c`` with the constant ``c`` that makes the norm ``lam * |x|`` while the variance over the last
    dimension stays (the control of Fig 6, 20). The mean moves away from zero on its own side. Needs lam >= 1:
    the norm cannot shrink below the part the variance carries."""
    lam = check_lambda(lam, minimum=1.0)
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    second = xf.pow(2).mean(-1, keepdim=True)  # mean^2 + var = |x|^2 / D
    sign = torch.where(mean < 0, -1.0, 1.0)
    new_mean = sign * (mean.pow(2) + (lam ** 2 - 1) * second).sqrt()
    return (xf + (new_mean - mean)).to(x.dtype)


@contextlib.contextmanager
def edit_head_output(model, k: int, layer: int, transform: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace token ``k``'s per-head attention outputs (heads, head_dim) at ``layer`` by ``transform`` of
    them, in the input of W_O. Enter before ``trace.record`` so the recorder sees the edited outputs. ``k`` may be
    0 (``origin.sink_origin`` zeroes token 0's output)."""
    k = check_position(k, first=True)
    attn = models.decoder_layers(model)[models.check_layer(model, layer)].self_attn

    def hook(_m, args):
        x = args[0]
        check_position(k, x.shape[1], first=True)
        x = x.clone()
        heads = x[:, k].unflatten(-1, (-1, attn.head_dim))
        x[:, k] = transform(heads).flatten(-2)
        return (x,) + tuple(args[1:])

    handle = attn.o_proj.register_forward_pre_hook(hook)
    try:
        with attention.output_edit():
            yield
    finally:
        handle.remove()


def amplify_variance(model, k: int, lam: float, layer: int):
    """Variance amplification (Fig 6, 20): token ``k``'s attention output at ``layer``, per head, gets
    ``lam**2`` times its dimension-wise variance (see ``amplified``)."""
    lam = check_lambda(lam)
    return edit_head_output(model, k, layer, lambda o: amplified(o, lam))


def scale_norm(model, k: int, lam: float, layer: int):
    """The control (Fig 6, 20): token ``k``'s attention output at ``layer``, per head, gets ``lam`` times its
    norm and the same dimension-wise variance (see ``norm_scaled``)."""
    lam = check_lambda(lam, minimum=1.0)
    return edit_head_output(model, k, layer, lambda o: norm_scaled(o, lam))


INTERVENTIONS = {"amplify": amplify_variance, "norm": scale_norm}
