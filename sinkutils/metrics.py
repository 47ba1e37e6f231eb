"""Every number the book reports about the paper's claims, each formula once."""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import numbers
import os
from typing import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one CPU thread. For small reductions a second thread only costs: under
    OMP_WAIT_POLICY=PASSIVE (run.sh's setting) every parallel region wakes a sleeping thread, and MKL's batched
    eigvalsh of (8, 128, 128) took 0.31 s on 2 threads against 0.018 s on one (benchmarks/measure_once.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_min_query(min_query: int, length: int) -> int:
    """``min_query`` if it is an integer in 0..length-1 (the first query position averaged over), else a
    ValueError: a negative one would count from the end, one past the sequence leaves nothing (NaN)."""
    if isinstance(min_query, bool) or not isinstance(min_query, numbers.Integral) or not 0 <= min_query < length:
        raise ValueError(f"min_query={min_query!r} must be an integer in 0..{length - 1} for sequences of {length} "
                         f"tokens")
    return int(min_query)


def mean_sink(sink: torch.Tensor, min_query: int = 4) -> torch.Tensor:
    """Mean attention to the sink key per layer (Fig 2, 3) from ``trace`` 's ``attn.sink`` (L, B, H, T),
    over batch, heads and queries at positions >= ``min_query``."""
    if sink.dim() != 4:
        raise ValueError(f"expected attn.sink of shape (layers, batch, heads, T), got {tuple(sink.shape)}")
    check_min_query(min_query, sink.shape[-1])
    return sink[..., min_query:].float().mean(dim=(1, 2, 3))


def sink_rate(sink: torch.Tensor, epsilon: float = 0.3, min_query: int = 4) -> torch.Tensor:
    """Fraction of heads per layer whose mean attention to the sink exceeds ``epsilon`` (Gu et al. 2024)."""
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}")
    check_min_query(min_query, sink.shape[-1])
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
    x = x.double()
    return _effective_rank_of_gram(x @ x.transpose(-1, -2) if x.shape[-2] <= x.shape[-1] else x.transpose(-1, -2) @ x)


def effective_ranks_with_and_without_first(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``effective_rank`` of (..., tokens, dim) and of the same without its first token (Fig 21's two curves), from
    one Gram matrix: without token 0 the tokens' Gram loses its first row and column, the dimensions' Gram the outer
    product x_0 x_0^T."""
    x = x.double()
    if x.shape[-2] <= x.shape[-1]:
        gram = x @ x.transpose(-1, -2)
        later = gram[..., 1:, 1:]
    else:  # the zero singular values the wider Gram adds leave the entropy as it is
        gram = x.transpose(-1, -2) @ x
        later = gram - x[..., 0, :, None] * x[..., 0, None, :]
    return _effective_rank_of_gram(gram), _effective_rank_of_gram(later)


def _effective_rank_of_gram(gram: torch.Tensor) -> torch.Tensor:
    # singular values from the smaller Gram matrix: several times faster than an SVD, and exact to ~1e-8 of the
    # largest singular value, far below what moves the entropy
    s = _eigvalsh(gram).clamp_min(0).sqrt()
    return entropy(s / s.sum(-1, keepdim=True).clamp_min(1e-300)).exp().to(torch.float32)


def _eigvalsh(gram: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.eigvalsh`` of a batch, split over one Python thread per CPU thread, each running LAPACK on one
    thread: a threaded eigvalsh is slower than one thread (``one_thread``), and in a forward hook the other core
    would sit idle. Same values; (8, 128, 128) in 1.9 ms against 3.3 ms on one thread (2 cores)."""
    threads = torch.get_num_threads()
    parts = gram.reshape(-1, *gram.shape[-2:]).chunk(threads) if gram.dim() > 2 else (gram,)
    with one_thread():
        if len(parts) == 1:
            return torch.linalg.eigvalsh(gram)
        return torch.cat(list(_pool(len(parts)).map(torch.linalg.eigvalsh, parts))).reshape(gram.shape[:-1])


@functools.cache
def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sinkbook-eigvalsh")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of the parent's threads


def entropy(p: torch.Tensor) -> torch.Tensor:
    """-sum_j p_j log p_j in nats over the last dimension, with 0 log 0 = 0, of distributions ``p`` (Fig 13: an
    attention row's; Fig 15, 21: the normalised singular values of ``effective_rank``). log n for a uniform p."""
    return torch.special.entr(p).sum(-1)


def kendall_tau(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b between ``x`` and ``y`` along the last dimension, batched over leading ones; ``y``
    broadcasts against ``x`` (Fig 7: one tau per W_O output neuron against token 0's input profile; Fig 12:
    alignment against positivity across heads). Pairs tied in both count in neither; a constant input gives 0.

    Exact, in O(n log n) per row: scipy's tau-b sorts instead of comparing every pair, so 576 neurons x 576
    dimensions (SmolLM2) take a tenth of a second and 4096 x 4096 (Llama-2-7B) seconds, where all pairs took
    seconds and minutes."""
    from scipy import stats

    x, y = torch.broadcast_tensors(torch.as_tensor(x), torch.as_tensor(y))
    n = x.shape[-1]
    if n < 2:
        raise ValueError("Kendall's tau needs at least two observations")
    xs = x.detach().reshape(-1, n).double().cpu().numpy()
    ys = y.detach().reshape(-1, n).double().cpu().numpy()
    taus = [stats.kendalltau(a, b, method="asymptotic").statistic for a, b in zip(xs, ys)]
    return torch.tensor(taus, dtype=torch.float64).nan_to_num(0.0).reshape(x.shape[:-1]).float()


def kendall_null_sd(n: int) -> float:
    """Standard deviation of Kendall's tau between two independent samples of size ``n`` without ties,
    sqrt(2(2n + 5) / (9n(n - 1))): how far from 0 a tau of unrelated weights strays by chance (Fig 7)."""
    if n < 2:
        raise ValueError(f"need n >= 2, got {n}")
    return (2 * (2 * n + 5) / (9 * n * (n - 1))) ** 0.5


def robust_z(x: torch.Tensor) -> torch.Tensor:
    """(x - median) / (1.4826 * MAD) along the last dimension: a z-score the outliers themselves cannot
    inflate (Fig 8's super-neuron rule). 1.4826 makes the MAD estimate a Gaussian's standard deviation."""
    x = x.float()
    med = x.median(-1, keepdim=True).values
    mad = (x - med).abs().median(-1, keepdim=True).values
    return (x - med) / (1.4826 * mad).clamp_min(1e-12)


def excess_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """E[(x - mu)^4] / sigma^4 - 3 along the last dimension: 0 for a Gaussian, large for a heavy-tailed
    vector whose mass sits in a few entries (Fig 10: the super neuron's W_down column)."""
    x = x.double()
    d = x - x.mean(-1, keepdim=True)
    var = d.pow(2).mean(-1)
    return (d.pow(4).mean(-1) / var.pow(2).clamp_min(1e-300) - 3.0).float()


def top_share(x: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the squared L2 norm carried by the ``k`` largest-magnitude entries, along the last
    dimension (Fig 10: how few residual channels a W_down column writes to). k/n for a flat vector."""
    if not 1 <= k <= x.shape[-1]:
        raise ValueError(f"k must lie in 1..{x.shape[-1]}, got {k}")
    sq = x.double().pow(2)
    return (sq.topk(k, dim=-1).values.sum(-1) / sq.sum(-1).clamp_min(1e-300)).float()


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension, broadcasting (Fig 9: token input against the super
    neuron's gate row; Fig 12: sink key against W_Q's principal direction). 0 for a zero vector."""
    x, y = x.double(), y.double()
    return ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-300)).float()


def mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all pairs i != j of the rows of ``x`` (..., n, dim) (Sec. 5, RMSNorm as
    a directional filter): 1 when every row points the same way, about 0 for independent random rows."""
    if x.shape[-2] < 2:
        raise ValueError(f"need at least two vectors, got shape {tuple(x.shape)}")
    u = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
    gram = u @ u.transpose(-1, -2)
    n = x.shape[-2]
    return ((gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))).float()


def positivity_ratio(scores: torch.Tensor) -> torch.Tensor:
    """Fraction of queries whose attention logit toward the sink is positive (Fig 12), along the last dim."""
    return (scores > 0).float().mean(-1)


def dimension_variance(x: torch.Tensor) -> torch.Tensor:
    """Variance across the feature dimension of each vector (Fig 1, 23): for head outputs (..., D) this is
    the "dimension-wise variance" whose discrepancy between token 0 and later tokens the paper measures."""
    x = x.float()
    return (x - x.mean(-1, keepdim=True)).square().mean(-1)  # two passes: 3x faster than Tensor.var on CPU
