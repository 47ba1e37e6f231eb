"""Every number the book reports about the paper's claims, each formula once."""
from __future__ import annotations

import torch


def mean_sink(sink: torch.Tensor, min_query: int = 4) -> torch.Tensor:
    """Mean attention to the sink key per layer (Fig 2, 3) from ``trace`` 's ``attn.sink`` (L, B, H, T),
    over batch, heads and queries at positions >= ``min_query``."""
    if sink.dim() != 4:
        raise ValueError(f"expected attn.sink of shape (layers, batch, heads, T), got {tuple(sink.shape)}")
    if sink.shape[-1] <= min_query:
        raise ValueError(f"min_query={min_query} leaves no queries in a sequence of {sink.shape[-1]}")
    return sink[..., min_query:].float().mean(dim=(1, 2, 3))


def sink_rate(sink: torch.Tensor, epsilon: float = 0.3, min_query: int = 4) -> torch.Tensor:
    """Fraction of heads per layer whose mean attention to the sink exceeds ``epsilon`` (Gu et al. 2024)."""
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}")
    per_head = sink[..., min_query:].float().mean(dim=(1, 3))  # (L, H)
    return (per_head > epsilon).float().mean(-1)


def dominance_ratio(x: torch.Tensor) -> torch.Tensor:
    """max_i |x_i| / mean_i |x_i| over the last dimension (Fig 11, 14): about 3-4 for a Gaussian vector of
    width 4096, hundreds when one coordinate carries a massive activation."""
    a = x.float().abs()
    return a.amax(-1) / a.mean(-1).clamp_min(1e-12)


def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of a (tokens, dim) matrix
    (Fig 15, 21). Equals k for a matrix with k equal non-zero singular values."""
    if x.dim() < 2:
        raise ValueError(f"effective_rank needs a matrix (..., tokens, dim), got shape {tuple(x.shape)}")
    s = torch.linalg.svdvals(x.double())
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return entropy.exp().to(torch.float32)


def kendall_tau(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b between ``x`` and ``y`` along the last dimension, batched over leading ones
    (Fig 7: W_O neuron weights against token 0's input variance). Pairs tied in both count in neither."""
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[-1] < 2:
        raise ValueError("Kendall's tau needs at least two observations")
    dx = torch.sign(x[..., :, None] - x[..., None, :]).double()
    dy = torch.sign(y[..., :, None] - y[..., None, :]).double()
    concord = (dx * dy).sum((-1, -2))
    n_x = (dx != 0).double().sum((-1, -2))
    n_y = (dy != 0).double().sum((-1, -2))
    return (concord / (n_x * n_y).sqrt().clamp_min(1e-300)).float()


def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of attention distributions along the last dimension (Fig 13)."""
    w = weights.float()
    return -(w * w.clamp_min(1e-45).log()).sum(-1)


def positivity_ratio(scores: torch.Tensor) -> torch.Tensor:
    """Fraction of queries whose attention logit toward the sink is positive (Fig 12), along the last dim."""
    return (scores > 0).float().mean(-1)


def dimension_variance(x: torch.Tensor) -> torch.Tensor:
    """Variance across the feature dimension of each vector (Fig 1, 23): for head outputs (..., D) this is
    the "dimension-wise variance" whose discrepancy between token 0 and later tokens the paper measures."""
    return x.float().var(-1, unbiased=False)
