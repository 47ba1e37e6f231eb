"""Assignment 2 (chapter 2, the variance discrepancy): the dimension-wise variance of an attention output,
and the variance that averaging independent values predicts."""
from __future__ import annotations

import math

import torch

from sinkutils import measure, metrics
from sinkutils.exercises.harness import Probe, checker, close, generator, register

CHAPTER = "02_variance"


_HEAD = dict(batch=2, tokens=5, heads=3, head_dim=8)


def _head_out_cases() -> dict[str, tuple]:
    g = generator(201)
    B, T, H, D = _HEAD.values()
    x = torch.randn(B, T, H, D, generator=g) * torch.rand(B, T, H, 1, generator=g) * 3 \
        + torch.randn(B, T, H, 1, generator=g)  # each vector its own scale and its own mean
    return {"attention outputs": (x,)}


@register(CHAPTER, _head_out_cases)
def dimension_variance(p: Probe) -> None:
    """dimension_variance(head_out): the variance across head_dim of each head's attention output, from
    (batch, T, heads, head_dim) to (batch, T, heads): population variance, divide by head_dim (Fig 1)."""
    (x,) = p.args("attention outputs")
    got = p.tensor("attention outputs", ("batch", "tokens", "heads"), _HEAD)
    ref = metrics.dimension_variance(x)
    if close(got, ref):
        return
    D = x.shape[-1]
    p.mistakes(got, {
        f"population variance: divide by head_dim ({D}), not head_dim - 1 (var(..., unbiased=False) or "
        "correction=0)": x.double().var(-1, correction=1),
        "you returned the standard deviation; the variance is its square": ref.double().sqrt(),
        "subtract each vector's own mean before squaring: mean(x**2) is not the variance when the mean is not 0":
            x.double().pow(2).mean(-1),
    })
    p.expect(got, ref, "attention outputs")


_AGG = dict(batch=2, heads=3, queries=6, keys=7)


def _aggregation_cases() -> dict[str, tuple]:
    g = generator(202)
    B, H, T, S = _AGG.values()
    visible = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # the last T of S positions are the queries
    pattern = (2 * torch.randn(B, H, T, S, generator=g)).masked_fill(~visible, -math.inf).softmax(-1)
    value_var = torch.rand(B, H, S, generator=g) * 2 + 0.1
    return {"attention maps": (pattern, value_var)}


@register(CHAPTER, _aggregation_cases)
def predicted_variance(p: Probe) -> None:
    """predicted_variance(pattern, value_var): sum_j p_tj^2 var(v_j), the variance an attention output would
    have if the value vectors were independent, from maps (batch, heads, T, S) and value variances
    (batch, heads, S), giving (batch, heads, T) (chapter 2's prediction)."""
    pattern, value_var = p.args("attention maps")
    sizes = dict(_AGG)
    got = p.tensor("attention maps", ("batch", "heads", "queries"), sizes)
    ref, _ = measure.aggregation_prediction(pattern, value_var)
    if close(got, ref):
        return
    pd, vd = pattern.double(), value_var.double()
    p.mistakes(got, {
        "the weights enter squared: var(sum_j p_j v_j) = sum_j p_j^2 var(v_j) for independent v_j; you summed "
        "p_j var(v_j)": (pd @ vd[..., None])[..., 0],
        "multiply each squared weight by that key's variance var(v_j) before summing; you summed p_j^2 alone":
            pd.pow(2).sum(-1),
        "sum over the keys j (the last axis of the pattern), not average: the prediction for token 0 is its own "
        "var(v_0)": (pd.pow(2) * vd[..., None, :]).mean(-1),
    })
    p.expect(got, ref, "attention maps")


check_dimension_variance = checker("dimension_variance")
check_predicted_variance = checker("predicted_variance")
