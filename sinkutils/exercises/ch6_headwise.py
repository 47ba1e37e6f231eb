"""Assignment 6 (chapter 6, head-wise RMSNorm and the other fixes): head-wise RMSNorm, sigmoid attention, and the
effective rank that compares the models' hidden states. The queries and keys are chapter 1's."""
from __future__ import annotations

import math

import torch

from sinkutils import attention, metrics, variants
from sinkutils.exercises.ch1_sink import ATTENTION, attention_cases, attention_scores
from sinkutils.exercises.harness import Probe, Wrong, checker, close, generator, register

CHAPTER = "06_headwise"


_HN = dict(batch=2, tokens=3, heads=4, head_dim=6)


def _headnorm_cases() -> dict[str, tuple]:
    g = generator(601)
    B, T, H, D = _HN.values()
    scale = torch.tensor([0.05, 1.0, 4.0, 20.0])[None, None, :, None]    # heads at very different scales
    o = (torch.randn(B, T, H, D, generator=g) + 0.7) * scale
    o[0, 1, 1] = 0.0                                                      # one head output exactly zero
    weight = 1 + 0.5 * torch.randn(H, D, generator=g)
    return {"eps 1e-6": (o, weight, 1e-6), "eps 0.01": (o, weight, 1e-2)}


def _headnorm_reference(o: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = variants.HeadRMSNorm(*weight.shape, eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(o)


@register(CHAPTER, _headnorm_cases)
def headwise_rmsnorm(p: Probe) -> None:
    """headwise_rmsnorm(o, weight, eps): RMSNorm of each head's attention output over head_dim, o * weight /
    sqrt(mean(o**2 over head_dim) + eps), with the gain weight (heads, head_dim), for o (batch, T, heads,
    head_dim): the paper's fix, applied after value aggregation and before W_O (chapter 6)."""
    for case, (o, weight, eps) in p.cases.items():
        got = p.value(case)
        if torch.is_tensor(got) and tuple(got.shape) == tuple(o.shape) and not torch.isfinite(got.double()).all():
            raise Wrong("NaN where a head's output is all zeros (0 / 0): add eps inside the square root, "
                         "sqrt(mean(o**2) + eps)")
        got = p.tensor(case, tuple(_HN), _HN)
        ref = _headnorm_reference(o, weight, eps)
        if close(got, ref):
            continue
        od, w = o.double(), weight.double()

        def over(dims) -> torch.Tensor:
            return od / (od.pow(2).mean(dims, keepdim=True) + eps).sqrt() * w

        centred = od - od.mean(-1, keepdim=True)
        p.mistakes(got, {
            "normalise each head separately, over its head_dim (the last axis); you normalised all heads' "
            "dimensions together, which is the ordinary (layer-wise) RMSNorm": over((-2, -1)),
            "normalise over head_dim (the last axis), not over the heads": over(-2),
            "multiply by the gain weight (heads, head_dim) after normalising": over(-1) / w,
            "eps goes inside the square root: o / sqrt(mean(o**2) + eps), not o / (sqrt(mean(o**2)) + eps)":
                od / (od.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w,
            "RMSNorm does not subtract the mean (that is LayerNorm): divide o itself by its root mean square":
                centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w,
        })
        p.expect(got, ref, case)


def _sigmoid_reference(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return attention.sigmoid_weights(q, k, None, q.shape[-1] ** -0.5)


@register(CHAPTER, attention_cases)
def sigmoid_attention(p: Probe) -> None:
    """sigmoid_attention(q, k): sigmoid attention weights (batch, heads, T, T) from queries and keys
    (batch, heads, T, head_dim): sigmoid(q.k / sqrt(head_dim) - log T) for keys up to the query, 0 for later
    keys (causal), no normalisation over keys (Ramapuram et al. 2024; chapter 6)."""
    q, k = p.args("random")
    T = q.shape[-2]
    sizes = {"batch": ATTENTION["batch"], "heads": ATTENTION["heads"], "queries": T, "keys": T,
             "head_dim": ATTENTION["head_dim"]}
    value = p.value("random")
    if torch.is_tensor(value) and tuple(value.shape) == tuple(q.shape[:-1]):
        raise Wrong(f"return the weight of every query on every key, shape {tuple(q.shape[:-1]) + (T,)} (batch, "
                     "heads, queries, keys), not one number per query")
    got = p.tensor("random", ("batch", "heads", "queries", "keys"), sizes)
    ref = _sigmoid_reference(q, k)
    second = "later keys changed"
    if close(got, ref) and close(p.tensor(second, ("batch", "heads", "queries", "keys"), sizes),
                                   _sigmoid_reference(*p.args(second))):
        return
    later = ~attention.causal_mask(T, T, "cpu")
    if got[..., later].abs().max() > 1e-6:
        raise Wrong("causal mask missing: a query must give weight 0 to every later key (above the diagonal)")
    if torch.allclose(got.double().sum(-1), torch.ones(()).double(), atol=1e-5):
        raise Wrong("your rows sum to 1, as softmax does; sigmoid attention weighs each key on its own, "
                     "sigmoid(score - log T), with no normalisation over keys")
    s = attention_scores(q, k)
    visible = torch.arange(1, T + 1, dtype=torch.float64)[:, None]

    def sig(scores: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(scores).masked_fill(later, 0.0)

    p.mistakes(got, {
        f"subtract the bias log T (here log {T}) from the scores: without it every weight starts near 1/2 and "
        "a long sequence drowns each query": sig(s),
        "the bias is -log T with T the number of keys in the sequence, the same for every query; you used the "
        "number of keys each query sees (t + 1)": sig(s - visible.log()),
        "scale the scores by 1/sqrt(head_dim) before the sigmoid": sig(attention_scores(q, k, 1.0) - math.log(T)),
    })
    p.expect(got, ref, "random")
    p.expect(p.tensor(second, ("batch", "heads", "queries", "keys"), sizes), _sigmoid_reference(*p.args(second)),
             second)


_RANK = dict(batch=2, tokens=6, width=9)


def _rank_cases() -> dict[str, tuple]:
    g = generator(603)
    B, n, d = _RANK.values()
    x = torch.randn(B, n, d, generator=g) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])[:, None]
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q[:3].float()  # 3 orthonormal rows
    equal = torch.zeros(B, n, d)
    equal[:, :3] = 2.0 * basis
    return {"random": (x,), "three equal singular values": (equal,)}


@register(CHAPTER, _rank_cases)
def effective_rank(p: Probe) -> None:
    """effective_rank(x): the effective rank of each (tokens, width) matrix of x (batch, tokens, width):
    exp of the entropy of its singular values normalised to sum 1 (Roy & Vetterli 2007), giving (batch,);
    k for a matrix with k equal non-zero singular values (Fig 15, 21)."""
    for case, (x,) in p.cases.items():
        value = p.value(case)
        if torch.is_tensor(value) and value.is_floating_point() and value.isnan().any():
            raise Wrong(f"NaN on {case!r}: a zero singular value gives p log p = 0 * log 0 = NaN; count it as 0 "
                         "(torch.special.entr(p) does, or take the log of p.clamp_min(tiny))")
        got = p.tensor(case, ("batch",), _RANK)
        ref = metrics.effective_rank(x)
        if close(got, ref):
            continue
        s = torch.linalg.svdvals(x.double())

        def exp_entropy(w: torch.Tensor) -> torch.Tensor:
            q = w / w.sum(-1, keepdim=True)
            return torch.exp(-(q * q.clamp_min(1e-300).log()).sum(-1))

        entropy = ref.double().log()
        p.mistakes(got, {
            "take exp of the entropy: the effective rank of k equal singular values is k, their entropy log k":
                entropy,
            "normalise the singular values themselves, p_i = s_i / sum_j s_j, not their squares (the "
            "eigenvalues of X X^T)": exp_entropy(s.pow(2)),
            "the effective rank is a smooth count, exp of the entropy of the normalised singular values, not the "
            "number of non-zero singular values": torch.linalg.matrix_rank(x.double()).double(),
            "entropy in nats goes with exp; you raised 2 to an entropy in nats": 2 ** entropy,
            "normalise the singular values to sum 1 before taking the entropy":
                torch.exp(-(s * s.clamp_min(1e-300).log()).sum(-1)),
        })
        p.expect(got, ref, case)


check_headwise_rmsnorm = checker("headwise_rmsnorm")
check_sigmoid_attention = checker("sigmoid_attention")
check_effective_rank = checker("effective_rank")
