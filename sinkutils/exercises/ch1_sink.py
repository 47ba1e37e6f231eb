"""Assignment 1 (chapter 1, the sink): the weight every query gives to token 0, and the sink rate."""
from __future__ import annotations

import math

import torch

from sinkutils import attention, metrics
from sinkutils.exercises.harness import Probe, Wrong, checker, close, generator, register, shape_hint

CHAPTER = "01_sink"


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q . k / sqrt(D) (or times ``scale``): the logits every attention exercise starts from."""
    return (q.double() @ k.double().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)


ATTENTION = dict(batch=2, heads=3, tokens=7, head_dim=8)
_FUTURE = 4  # the "future keys" case changes keys 4.. : queries 0..3 must not notice


def attention_cases() -> dict[str, tuple]:
    """Queries and keys (batch, heads, T, head_dim), and the same with keys 4.. redrawn: the prepared inputs of
    attention_to_first here and of sigmoid_attention (chapter 6)."""
    g = generator(101)
    shape = tuple(ATTENTION.values())
    q, k = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    k_future = k.clone()
    k_future[:, :, _FUTURE:] = 3 * torch.randn(k_future[:, :, _FUTURE:].shape, generator=g)
    return {"random": (q, k), "later keys changed": (q, k_future)}


def _first_reference(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return attention.softmax_stats(q, k, None, q.shape[-1] ** -0.5, 0, ("attn.sink",))["attn.sink"]


@register(CHAPTER, attention_cases)
def attention_to_first(p: Probe) -> None:
    """attention_to_first(q, k): the weight every query gives to key 0, (batch, heads, T), from queries and
    keys (batch, heads, T, head_dim) under causal softmax attention with scale 1/sqrt(head_dim) (Fig 3)."""
    q, k = p.args("random")
    full = p.value("random")
    if torch.is_tensor(full) and tuple(full.shape) == tuple(q.shape[:-1]) + (q.shape[-2],):
        raise Wrong("you returned the whole attention map (batch, heads, T, T); keep only what each query gives "
                     "to key 0, the first column: weights[..., 0]")
    want = ("batch", "heads", "tokens")
    got = p.tensor("random", want, ATTENTION)
    ref = _first_reference(q, k)
    later = p.tensor("later keys changed", want, ATTENTION)
    if close(got, ref) and close(later, _first_reference(*p.args("later keys changed"))):
        return
    if not close(later[..., :_FUTURE], got[..., :_FUTURE]):
        raise Wrong(f"causal mask missing: the weights of queries 0..{_FUTURE - 1} changed when only keys "
                     f"{_FUTURE}.. changed; query t may see keys 0..t only: set the scores of later keys to -inf "
                     "before the softmax")
    if not torch.allclose(got[..., 0].double(), torch.ones(()).double(), atol=1e-5):
        raise Wrong(f"query 0 sees only key 0, so its weight on key 0 must be 1, got {float(got[0, 0, 0]):.4g}: "
                     "normalise over the keys, softmax(dim=-1) on (..., queries, keys) scores, not over the queries")
    mask = attention.causal_mask(q.shape[-2], q.shape[-2], "cpu")
    p.mistakes(got, {
        "forgot the scale: divide q . k by sqrt(head_dim) before the softmax":
            attention_scores(q, k, 1.0).masked_fill(~mask, -math.inf).softmax(-1)[..., 0],
        "you returned what query 0 gives to each key (row 0 of the map); the sink is what each query gives to "
        "key 0 (column 0): weights[..., :, 0]":
            attention_scores(q, k).masked_fill(~mask, -math.inf).softmax(-1)[..., 0, :],
    })
    p.expect(got, ref, "random")
    p.expect(later, _first_reference(*p.args("later keys changed")), "later keys changed")


_SINK = dict(layers=3, batch=2, heads=5, tokens=10)


def _sink_cases() -> dict[str, tuple]:
    g = generator(102)
    L, B, H, T = _SINK.values()
    level = torch.rand(L, 1, H, 1, generator=g) * 0.5 + 0.05          # each head's typical attention to token 0
    sink = (level + 0.15 * torch.randn(L, B, H, T, generator=g)).clamp(0, 1)
    sink[..., :4] = 0.9 + 0.1 * torch.rand(L, B, H, 4, generator=g)   # early queries: see few keys, sink a lot
    sink[..., 0] = 1.0                                                # query 0 sees only key 0
    return {"epsilon 0.3, min_query 4": (sink, 0.3, 4), "epsilon 0.2, min_query 2": (sink, 0.2, 2)}


@register(CHAPTER, _sink_cases)
def sink_rate(p: Probe) -> None:
    """sink_rate(sink, epsilon, min_query): per layer, the fraction of heads whose mean attention to token 0,
    over sequences and queries t >= min_query, exceeds epsilon; sink is (layers, batch, heads, T) (Fig 3)."""
    want = ("layers",)
    results = {}
    for case, (sink, eps, mq) in p.cases.items():
        sizes = dict(_SINK)
        got = p.value(case)
        if torch.is_tensor(got) and tuple(got.shape) == (sizes["layers"], sizes["heads"]):
            raise Wrong(f"{shape_hint(tuple(got.shape), want, sizes)}: threshold each head's mean, then take "
                         "the fraction of heads above epsilon per layer")
        results[case] = (p.tensor(case, want, sizes), sink, eps, mq)
    for case, (got, sink, eps, mq) in results.items():
        ref = metrics.sink_rate(sink, eps, mq)
        if close(got, ref):
            continue
        p.mistakes(got, {
            "leave out the queries before min_query (early queries see few keys and sink for a trivial reason): "
            "average over sink[..., min_query:] only":
                metrics.sink_rate(sink, eps, 0),
            "average each head over sequences and queries first, then compare that mean with epsilon; you "
            "thresholded every single weight":
                (sink[..., mq:] > eps).double().mean((1, 2, 3)),
            "threshold each head separately, then take the fraction of heads; you averaged the heads first, so a "
            "layer comes out as all (1) or nothing (0)":
                (sink[..., mq:].double().mean((1, 2, 3)) > eps).double(),
            f"a rate is a fraction: divide the number of sinking heads by the number of heads ({sink.shape[2]})":
                (sink[..., mq:].double().mean((1, 3)) > eps).double().sum(-1),
        })
        other = [c for c in results if c != case][0]
        _, _, eps0, mq0 = results[other]
        if close(got, metrics.sink_rate(sink, eps0, mq0)):
            raise Wrong(f"use the epsilon and min_query arguments; on the input {case!r} your result is the one "
                         f"for epsilon={eps0}, min_query={mq0}")
        p.expect(got, ref, case)


check_attention_to_first = checker("attention_to_first")
check_sink_rate = checker("sink_rate")
