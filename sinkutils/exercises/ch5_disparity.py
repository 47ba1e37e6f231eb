"""Assignment 5 (chapter 5, dimension disparity): the dominance ratio of a hidden state, and the mean pairwise
cosine that says how input-independent a direction is."""
from __future__ import annotations

import torch

from sinkutils import metrics
from sinkutils.exercises.harness import Probe, checker, close, generator, register

CHAPTER = "05_disparity"


_RES = dict(batch=2, tokens=5, width=16)


def _residual_cases() -> dict[str, tuple]:
    g = generator(501)
    x = torch.randn(*_RES.values(), generator=g)
    x[:, 0, 3] = -40.0   # token 0: one massive (negative) coordinate
    x[1, 2, 7] = 12.0
    return {"hidden states": (x,)}


@register(CHAPTER, _residual_cases)
def dominance_ratio(p: Probe) -> None:
    """dominance_ratio(x): max_i |x_i| / mean_i |x_i| over the last axis of hidden states (batch, T, width),
    giving (batch, T): about 3 for a Gaussian vector of width 16, large when one coordinate is massive
    (Fig 11)."""
    (x,) = p.args("hidden states")
    got = p.tensor("hidden states", ("batch", "tokens"), _RES)
    ref = metrics.dominance_ratio(x)
    if close(got, ref):
        return
    a = x.double().abs()
    p.mistakes(got, {
        "take absolute values before the max: a massive activation can be negative (token 0 here has -40)":
            x.double().amax(-1) / a.mean(-1),
        "take absolute values: max |x_i| / mean |x_i|": x.double().amax(-1) / x.double().mean(-1),
        f"divide by the mean of |x_i|, not the sum (a flat vector has ratio 1; yours is {x.shape[-1]} times too "
        "small)": a.amax(-1) / a.sum(-1),
        "upside down: the ratio is max |x_i| / mean |x_i|, at least 1": a.mean(-1) / a.amax(-1),
    })
    p.expect(got, ref, "hidden states")


_COS = dict(batch=3, vectors=5, width=7)


def _cosine_cases() -> dict[str, tuple]:
    g = generator(502)
    shared = torch.randn(3, 1, 7, generator=g) * torch.tensor([0.0, 1.0, 4.0])[:, None, None]
    return {"three levels of agreement": (shared + torch.randn(*_COS.values(), generator=g),)}


@register(CHAPTER, _cosine_cases)
def mean_pairwise_cosine(p: Probe) -> None:
    """mean_pairwise_cosine(x): the mean cosine similarity over all pairs i != j of the vectors x[..., i, :]
    of (batch, n, width), giving (batch,): 1 when every vector points the same way, about 0 for independent
    random vectors (RMSNorm as a directional filter, chapter 5)."""
    (x,) = p.args("three levels of agreement")
    got = p.tensor("three levels of agreement", ("batch",), _COS)
    ref = metrics.mean_pairwise_cosine(x)
    if close(got, ref):
        return
    n = x.shape[-2]
    xd = x.double()
    dots = xd @ xd.transpose(-1, -2)
    p.mistakes(got, {
        f"leave out the {n} pairs of a vector with itself (cosine 1): average over i != j, n(n-1) pairs":
            (ref.double() * n * (n - 1) + n) / n ** 2,
        "divide each dot product by both vectors' norms: cosine, not the raw dot product":
            (dots.sum((-1, -2)) - dots.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1)),
        "the vectors are the rows x[..., i, :] (one per input); you compared the columns (the dimensions)":
            metrics.mean_pairwise_cosine(x.transpose(-1, -2)),
        "compare every pair i != j, not only the first vector with the others":
            metrics.cosine(x[..., :1, :], x[..., 1:, :]).double().mean(-1),
    })
    p.expect(got, ref, "three levels of agreement")


check_dominance_ratio = checker("dominance_ratio")
check_mean_pairwise_cosine = checker("mean_pairwise_cosine")
