"""Assignment 3 (chapter 3, moving the sink): the mask intervention, variance amplification and its norm-only
control, as pure functions of a mask or of attention outputs (``interventions`` applies them to a model)."""
from __future__ import annotations

import torch

from sinkutils import attention, interventions, metrics
from sinkutils.exercises.harness import Probe, Wrong, checker, close, generator, register

CHAPTER = "03_interventions"


_MASK_T = 9


def _mask_cases() -> dict[str, tuple]:
    causal = attention.causal_mask(_MASK_T, _MASK_T, "cpu")
    hidden = causal.clone()
    hidden[:, [1, 3]] = False                    # keys 1 and 3 hidden from everyone (padding, say)
    hidden[[1, 3], [1, 3]] = True                # ... but each still sees itself
    return {"causal, k=5": (causal, 5), "causal, k=2": (causal.clone(), 2), "keys 1 and 3 hidden, k=6": (hidden, 6)}


@register(CHAPTER, _mask_cases)
def mask_intervention(p: Probe) -> None:
    """mask_intervention(mask, k): the mask intervention of Fig 5 on a (T, T) bool mask (True = the query in
    that row may attend to the key in that column): query k may attend only to key k (itself), as token 0
    always does; every other row stays as it was. Return a new mask; leave the argument unchanged."""
    for case, (mask, k) in p.cases.items():
        got = p.value(case)
        if torch.is_tensor(got) and got.dtype != torch.bool and got.shape == mask.shape:
            raise Wrong(f"return a bool mask (True = may attend), got dtype {got.dtype}")
        got = p.tensor(case, ("queries", "keys"), {"queries": _MASK_T, "keys": _MASK_T})
        ref = interventions.block_row(mask, k, _MASK_T, _MASK_T, mask.device)
        if torch.equal(got, ref):
            continue
        others = torch.arange(_MASK_T) != k
        if not torch.equal(got[others], mask[others]):
            changed = (got != mask)[others].nonzero()
            if changed.numel() and (changed[:, 1] == k).all():
                raise Wrong(f"you edited column {k} (which queries see key {k}); the intervention edits row {k} "
                             f"(which keys query {k} sees): mask[{k}, :]")
            raise Wrong(f"rows other than {k} must stay as given (on {case!r} the mask hides some keys); edit row "
                         f"{k} of the mask you got, do not build a new causal mask")
        row = got[k]
        if not row.any():
            raise Wrong(f"query {k} now sees no key at all, and a softmax over nothing but -inf is NaN; it must "
                         f"still see key {k}, itself")
        if row[0] and not row[k]:
            raise Wrong(f"query {k} must attend to itself (key {k}), as token 0 attends to itself; you let it see "
                         f"token 0 instead")
        raise Wrong(f"row {k} must allow key {k} only; yours allows keys {row.nonzero().flatten().tolist()}")


_OUT = dict(batch=2, tokens=4, heads=3, head_dim=8)


def _head_vectors(seed: int) -> torch.Tensor:
    g = generator(seed)
    B, T, H, D = _OUT.values()
    mean = torch.randn(B, T, H, 1, generator=g)
    mean[0, 0] = -mean[0, 0].abs() - 0.5   # some vectors with clearly negative means
    mean[1, 1] = mean[1, 1].abs() + 0.5
    return mean + torch.randn(B, T, H, D, generator=g) * (0.5 + torch.rand(B, T, H, 1, generator=g))


def _amplify_cases() -> dict[str, tuple]:
    x = _head_vectors(301)
    return {"lambda 2.5": (x, 2.5), "lambda 0.5": (x, 0.5)}


@register(CHAPTER, _amplify_cases)
def amplified(p: Probe) -> None:
    """amplified(o, lam): the variance amplification of Fig 6 on attention outputs (..., head_dim):
    each vector's deviation from its own mean (over head_dim) grows by lam, so its dimension-wise variance
    grows by lam**2 while its mean stays."""
    for case, (o, lam) in p.cases.items():
        got = p.tensor(case, tuple(_OUT), _OUT)
        ref = interventions.amplified(o, lam)
        if close(got, ref):
            continue
        od = o.double()
        mean = od.mean(-1, keepdim=True)
        p.mistakes(got, {
            "lam * o scales the mean too; only the deviation from the mean grows: mean + lam * (o - mean)": lam * od,
            "the variance grows by lam**2 when the deviations grow by lam; you multiplied them by lam**2 "
            "(variance x lam**4)": mean + lam ** 2 * (od - mean),
            "you multiplied the deviations by sqrt(lam), so the variance grew by lam only; the exercise wants "
            "lam**2, i.e. deviations times lam": mean + lam ** 0.5 * (od - mean),
            "add the mean back: the intervention changes the spread around the mean, not the mean":
                lam * (od - mean),
            "take each vector's own mean over head_dim (the last axis), mean(-1, keepdim=True), not a mean over "
            "tokens or heads": od.mean(-2, keepdim=True) + lam * (od - od.mean(-2, keepdim=True)),
        })
        p.expect(got, ref, case)


def _norm_cases() -> dict[str, tuple]:
    x = _head_vectors(302)
    return {"lambda 3": (x, 3.0), "lambda 1.5": (x, 1.5)}


@register(CHAPTER, _norm_cases)
def norm_scaled(p: Probe) -> None:
    """norm_scaled(o, lam): the control of Fig 6, lam >= 1: each vector (..., head_dim) gets lam times its
    norm and the same dimension-wise variance, by adding one constant to all its coordinates (the mean
    moves, away from zero on its own side)."""
    for case, (o, lam) in p.cases.items():
        got = p.tensor(case, tuple(_OUT), _OUT)
        ref = interventions.norm_scaled(o, lam)
        if close(got, ref):
            continue
        var_in, var_out = metrics.dimension_variance(o).double(), metrics.dimension_variance(got).double()
        if not torch.allclose(var_out, var_in, rtol=1e-3, atol=1e-6):
            ratio = float((var_out / var_in).median())
            raise Wrong(f"the control must keep the dimension-wise variance; yours multiplied it by about "
                         f"{ratio:.3g}{' (that is lam**2: lam * o scales the deviations too)' if abs(ratio - lam ** 2) < 1e-2 else ''}"
                         ": add one constant to every coordinate of a vector instead, so only its mean moves")
        norm_in, norm_out = o.double().norm(dim=-1), got.double().norm(dim=-1)
        if not torch.allclose(norm_out, lam * norm_in, rtol=1e-4):
            raise Wrong(f"the norm must become lam * |o| exactly (got {float((norm_out / norm_in).median()):.4g} "
                         f"times it for lam={lam}): with |o|^2 = D (mean^2 + var) and var fixed, solve for the new "
                         "mean: new_mean^2 = mean^2 + (lam^2 - 1) |o|^2 / D")
        flipped = (got.double().mean(-1) * o.double().mean(-1) < 0).nonzero()
        if len(flipped):
            raise Wrong(f"keep the mean on its own side: the vector at {tuple(flipped[0].tolist())} has a negative "
                         "mean and yours made it positive (move it away from zero: the smallest shift that works)")
        p.expect(got, ref, case)


check_mask_intervention = checker("mask_intervention")
check_amplified = checker("amplified")
check_norm_scaled = checker("norm_scaled")
