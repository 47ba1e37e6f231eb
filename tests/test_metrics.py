"""Every formula of sinkutils.metrics against values computed by hand (and scipy where it has the same one)."""
import math

import pytest
import torch

from sinkutils import metrics


def test_kendall_tau_hand_value_and_perfect_orders():
    # pairs of [1,2,3] vs [1,3,2]: (0,1) concordant, (0,2) concordant, (1,2) discordant -> (2 - 1) / 3
    assert metrics.kendall_tau(torch.tensor([1., 2., 3.]), torch.tensor([1., 3., 2.])).item() == pytest.approx(1 / 3)
    x = torch.arange(10.)
    assert metrics.kendall_tau(x, 2 * x + 1).item() == pytest.approx(1.0)
    assert metrics.kendall_tau(x, -x).item() == pytest.approx(-1.0)


def test_kendall_tau_is_rank_based():
    """|W| and W^2 give the same tau (the chapter-4 choice does not matter)."""
    g = torch.Generator().manual_seed(0)
    w, v = torch.randn(6, 40, generator=g), torch.rand(40, generator=g)
    torch.testing.assert_close(metrics.kendall_tau(w.abs(), v), metrics.kendall_tau(w ** 2, v.sqrt()))


def pairwise_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b by its definition, every pair compared: (concordant - discordant) / sqrt(n_x n_y), where n_x
    (n_y) counts the pairs not tied in x (y)."""
    s = n_x = n_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
            s, n_x, n_y = s + dx * dy, n_x + (dx != 0), n_y + (dy != 0)
    return s / (n_x * n_y) ** 0.5 if n_x and n_y else 0.0


def test_kendall_tau_is_tau_b_with_ties_batched_and_broadcast():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 5, (7, 30), generator=g).float()  # many ties
    y = torch.randint(0, 4, (30,), generator=g).float()
    expected = torch.tensor([pairwise_tau_b(row.tolist(), y.tolist()) for row in x])
    torch.testing.assert_close(metrics.kendall_tau(x, y), expected, atol=1e-6, rtol=1e-5)  # y broadcasts
    assert metrics.kendall_tau(x.reshape(7, 1, 30), y).shape == (7, 1)
    assert metrics.kendall_tau(torch.ones(5), torch.arange(5.)).item() == 0.0  # a constant row: 0, not NaN


def test_kendall_null_sd():
    assert metrics.kendall_null_sd(10) == pytest.approx((50 / 810) ** 0.5)  # 2(2*10+5) / (9*10*9)
    taus = metrics.kendall_tau(torch.randn(4000, 30, generator=torch.Generator().manual_seed(5)), torch.arange(30.))
    assert taus.std().item() == pytest.approx(metrics.kendall_null_sd(30), rel=0.08)


def test_kendall_tau_degenerate_inputs():
    assert metrics.kendall_tau(torch.ones(5), torch.arange(5.)).item() == 0.0
    with pytest.raises(ValueError, match="two observations"):
        metrics.kendall_tau(torch.ones(1), torch.ones(1))


def test_effective_rank_of_known_spectra():
    assert metrics.effective_rank(torch.eye(4)[:3]).item() == pytest.approx(3.0, rel=1e-5)  # 3 equal values
    assert metrics.effective_rank(torch.outer(torch.arange(1., 6.), torch.ones(4))).item() == pytest.approx(1.0)
    # singular values 3 and 1: p = (3/4, 1/4), rank = exp(H(p))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert metrics.effective_rank(torch.diag(torch.tensor([3., 1.]))).item() == pytest.approx(math.exp(h), rel=1e-5)
    batch = torch.stack([torch.eye(3), torch.diag(torch.tensor([1., 0., 0.]))])
    torch.testing.assert_close(metrics.effective_rank(batch), torch.tensor([3.0, 1.0]))
    with pytest.raises(ValueError, match="matrix"):
        metrics.effective_rank(torch.ones(3))


def test_effective_rank_agrees_with_the_svd_definition_when_one_row_is_massive():
    x = torch.randn(3, 20, 50, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x[:, 0] *= 1000  # token 0 with a massive norm, as in a trained model
    for m in (x, x.transpose(-1, -2)):  # tall and wide
        s = torch.linalg.svdvals(m)
        p = s / s.sum(-1, keepdim=True)
        expected = torch.exp(-(p * p.log()).sum(-1)).float()
        torch.testing.assert_close(metrics.effective_rank(m), expected, rtol=1e-6, atol=1e-6)


def test_dominance_ratio():
    assert metrics.dominance_ratio(torch.tensor([10., -1., 1., 1.])).item() == pytest.approx(10 / 3.25)
    assert metrics.dominance_ratio(torch.ones(2, 8)).tolist() == [1.0, 1.0]


def test_robust_z_ignores_the_outlier_it_flags():
    z = metrics.robust_z(torch.tensor([1., 2., 3., 4., 100.]))  # median 3, MAD 1
    torch.testing.assert_close(z, torch.tensor([-2., -1., 0., 1., 97.]) / 1.4826)


def test_excess_kurtosis():
    assert metrics.excess_kurtosis(torch.tensor([1., -1., 1., -1.])).item() == pytest.approx(-2.0)
    gauss = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    assert abs(metrics.excess_kurtosis(gauss).item()) < 0.1
    spike = torch.zeros(1000)
    spike[3] = 1.0  # one entry carries everything: kurtosis about n
    assert metrics.excess_kurtosis(spike).item() > 900


def test_top_share():
    assert metrics.top_share(torch.tensor([3., -4., 0.]), 1).item() == pytest.approx(16 / 25)
    assert metrics.top_share(torch.ones(10), 2).item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="1..3"):
        metrics.top_share(torch.ones(3), 4)


def test_cosine_and_mean_pairwise_cosine():
    assert metrics.cosine(torch.tensor([1., 0.]), torch.tensor([1., 1.])).item() == pytest.approx(2 ** -0.5)
    assert metrics.cosine(torch.zeros(3), torch.ones(3)).item() == 0.0
    e = torch.eye(3)
    assert metrics.mean_pairwise_cosine(e).item() == pytest.approx(0.0)
    assert metrics.mean_pairwise_cosine(torch.ones(4, 3) * torch.arange(1., 5.)[:, None]).item() == pytest.approx(1.0)
    # rows e1, e1, e2: pair cosines 1, 0, 0
    assert metrics.mean_pairwise_cosine(torch.stack([e[0], e[0], e[1]])).item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="two vectors"):
        metrics.mean_pairwise_cosine(torch.ones(1, 3))


def test_positivity_and_sink_summaries():
    assert metrics.positivity_ratio(torch.tensor([1., -1., 2., 0.])).item() == 0.5
    sink = torch.zeros(2, 1, 2, 6)
    sink[0, :, 0, 4:] = 1.0  # layer 0: head 0 attends to token 0 from query 4 on, head 1 never
    torch.testing.assert_close(metrics.mean_sink(sink, min_query=4), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(metrics.sink_rate(sink, epsilon=0.3, min_query=4), torch.tensor([0.5, 0.0]))
    assert metrics.dimension_variance(torch.tensor([1., 3.])).item() == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(3, 6, 9), (2, 9, 6), (7, 7)])
def test_effective_ranks_with_and_without_first_equal_two_effective_ranks(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    x[..., 0, :] *= 30  # a massive first token, as in the models
    full, later = metrics.effective_ranks_with_and_without_first(x)
    torch.testing.assert_close(full, metrics.effective_rank(x), rtol=1e-6, atol=0)
    torch.testing.assert_close(later, metrics.effective_rank(x[..., 1:, :]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(5,), (3, 5), (1,), ()])
def test_eigvalsh_split_over_threads_equals_lapack_on_one_thread(shape):
    x = torch.randn(*shape, 12, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    gram = x @ x.transpose(-1, -2)
    with metrics.one_thread():
        want = torch.linalg.eigvalsh(gram)
    got = metrics._eigvalsh(gram)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)


def test_dimension_variance_equals_the_population_variance():
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(5)) * 3 + 10
    torch.testing.assert_close(metrics.dimension_variance(x), x.double().var(-1, unbiased=False).float(),
                               rtol=1e-6, atol=0)


def test_a_forked_child_splits_eigvalsh_over_its_own_threads():
    """The eigvalsh threads are not inherited by fork (DataLoader workers, multiprocessing): the child makes its own
    instead of queueing work for threads it does not have."""
    import multiprocessing

    x = torch.randn(4, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    gram = x @ x.transpose(-1, -2)
    parent = metrics._eigvalsh(gram)  # the parent's threads exist now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(metrics._eigvalsh, (gram,)).get(timeout=30)
    torch.testing.assert_close(child, parent, rtol=0, atol=0)
