"""Assignment 4 (chapter 4, super neurons): Kendall's tau-b, and the rule that finds super neurons from the FFN's
weights."""
from __future__ import annotations

import torch

from sinkutils import metrics, structure
from sinkutils.exercises.harness import Probe, Wrong, checker, close, generator, register

CHAPTER = "04_super_neurons"


_TAU = dict(rows=4, observations=12)


def _kendall_cases() -> dict[str, tuple]:
    g = generator(401)
    R, n = _TAU.values()
    x = torch.randn(R, n, generator=g)
    y = 0.6 * x + torch.randn(R, n, generator=g)
    y[1] = -y[1]
    return {"no ties": (x, y),
            "y through exp(3y), an increasing map": (x, torch.exp(3 * y)),
            "ties": (torch.randint(0, 4, (R, n), generator=g).float(), torch.randint(0, 3, (R, n), generator=g).float())}


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.double() - x.double().mean(-1, keepdim=True), y.double() - y.double().mean(-1, keepdim=True)
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))


@register(CHAPTER, _kendall_cases)
def kendall_tau(p: Probe) -> None:
    """kendall_tau(x, y): Kendall's tau-b between x and y along the last axis, one value per row of
    (rows, n) inputs: (concordant - discordant pairs) / sqrt((n0 - ties in x)(n0 - ties in y)) (Fig 7)."""
    want = ("rows",)
    got = {case: p.tensor(case, want, _TAU) for case in p.cases}
    ref = {case: metrics.kendall_tau(*args) for case, args in p.cases.items()}
    if all(close(got[c], ref[c]) for c in p.cases):
        return
    plain_case, mono = "no ties", "y through exp(3y), an increasing map"
    x, y = p.args(plain_case)
    if not close(got[mono], got[plain_case]):
        raise Wrong("Kendall's tau depends only on the order of the values: an increasing map of y must not change "
                     "it, and yours changed; count concordant and discordant pairs (sign(x_i - x_j) * "
                     "sign(y_i - y_j)) instead of correlating the values")
    p.mistakes(got[plain_case], {
        "that is Pearson's correlation of the values; Kendall's tau counts concordant minus discordant pairs":
            _pearson(x, y),
        "that is Spearman's rank correlation (Pearson on ranks); Kendall's tau counts concordant minus discordant "
        "pairs": _pearson(x.argsort(-1).argsort(-1), y.argsort(-1).argsort(-1)),
        "the sign is flipped: concordant pairs (both differences of one sign) count +1": -ref[plain_case],
    })
    if close(got[plain_case], ref[plain_case]) and close(got[mono], ref[mono]):
        raise Wrong("right without ties, wrong with ties: a pair tied in x or in y is neither concordant nor "
                     "discordant, and tau-b divides by sqrt((n0 - n_x)(n0 - n_y)), n_x and n_y the pairs tied in x "
                     "and in y, not by n0 = n(n-1)/2 (that is tau-a)")
    for case in p.cases:
        p.expect(got[case], ref[case], case)


_FFN = dict(neurons=64, width=24)
_SUPER = (5, 40, 17)


def _ffn_cases() -> dict[str, tuple]:
    g = generator(402)
    F, d = _FFN.values()
    gate, up = 0.02 * torch.randn(F, d, generator=g), 0.02 * torch.randn(F, d, generator=g)
    for n, (sg, su) in zip(_SUPER, ((12, 12), (6, 6), (1, 25))):  # the last one is large in W_up only
        gate[n] *= sg
        up[n] *= su
    z = structure.ffn_norms_of(gate, up).z
    top = z[list(_SUPER)].sort(descending=True).values
    return {"threshold 8": (gate, up, 8.0), "a threshold between the 2nd and 3rd": (gate, up, float(top[1:].mean())),
            "threshold 3": (gate, up, 3.0)}


def _as_indices(value) -> list[int] | None:
    if torch.is_tensor(value) and value.dtype != torch.bool and not value.is_floating_point() and value.dim() <= 1:
        return [int(i) for i in value.flatten()]
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) or
                                                 torch.is_tensor(i) and i.numel() == 1 and not i.is_floating_point()
                                                 for i in value):
        return [int(i) for i in value]
    return None


def _above(score: torch.Tensor, z: torch.Tensor, z_threshold: float) -> list[int]:
    """Neurons with z above the threshold, largest score first: the rule, fed with a (possibly wrong) score."""
    idx = (z > z_threshold).nonzero().flatten()
    return [int(i) for i in idx[score[idx].argsort(descending=True)]]


def _super_mistakes(gate: torch.Tensor, up: torch.Tensor, z_threshold: float) -> dict[str, list[int]]:
    g_rows, u_rows = gate.double().norm(dim=1), up.double().norm(dim=1)
    score, cols = g_rows * u_rows, gate.double().norm(dim=0) * up.double().norm(dim=0)
    return {
        "nn.Linear stores W_gate as (neurons, width): neuron n's weights are row n, so take the norm over dim=1; "
        "you took column norms": _above(cols, metrics.robust_z(cols), z_threshold),
        "the super neurons inflate the mean and standard deviation they are measured against; use the robust "
        "z-score, (s - median) / (1.4826 MAD) (metrics.robust_z)":
            _above(score, (score - score.mean()) / score.std(), z_threshold),
        "the score is the product ||W_gate[n]|| * ||W_up[n]||: a neuron large in W_up alone is a super neuron too":
            _above(g_rows, metrics.robust_z(g_rows), z_threshold),
        "the score is the product ||W_gate[n]|| * ||W_up[n]||, not the sum":
            _above(g_rows + u_rows, metrics.robust_z(g_rows + u_rows), z_threshold),
        "use the z_threshold argument, not a fixed 8": _above(score, metrics.robust_z(score), 8.0),
    }


@register(CHAPTER, _ffn_cases)
def super_neurons(p: Probe) -> None:
    """super_neurons(w_gate, w_up, z_threshold): the FFN neurons n whose score ||W_gate[n]|| * ||W_up[n]|| has
    a robust z-score (median and MAD, metrics.robust_z) above z_threshold, largest score first, as a list of
    ints; W_gate and W_up are (neurons, width) in nn.Linear layout (Fig 8)."""
    got, ref = {}, {}
    for case, (gate, up, z_threshold) in p.cases.items():
        value = p.value(case)
        if torch.is_tensor(value) and value.dtype == torch.bool:
            raise Wrong("return the neurons' indices (a list of ints, largest score first), not a mask")
        got[case] = _as_indices(value)
        if got[case] is None:
            raise Wrong(f"return a list of ints (neuron indices), got {value!r:.80}")
        ref[case] = structure.ffn_norms_of(gate, up, z_threshold=z_threshold).super_neurons
    wrong = [case for case in p.cases if got[case] != ref[case]]
    if not wrong:
        return
    case = wrong[0]
    if sorted(got[case]) == sorted(ref[case]):
        raise Wrong(f"the right neurons in the wrong order: list them largest score first ({ref[case]}), you gave "
                     f"{got[case]}")
    # a mistake is recognised when it explains the outputs on every prepared input
    per_case = {c: _super_mistakes(*args) for c, args in p.cases.items()}
    for hint in per_case[case]:
        if all(got[c] == per_case[c][hint] for c in p.cases):
            raise Wrong(hint)
    raise Wrong(f"on the prepared input {case!r} the super neurons are {ref[case]}, you found {got[case]}")


check_kendall_tau = checker("kendall_tau")
check_super_neurons = checker("super_neurons")
