"""The assignments' exercises (``assignments/``): prepared inputs, the book's reference, and a diagnosis.

Each exercise names the function a student writes (``attention_to_first``, ``sink_rate``, ...), the chapter
it practises, prepared inputs (small tensors from a fixed seed: milliseconds on a CPU) and a diagnosis. The
diagnosis compares the student's outputs with the reference in ``sinkutils`` (``metrics``, ``measure``,
``interventions``, ``structure``, ``variants``, ``trace``: never a second copy of a formula) and, when they
differ, says which mistake the outputs show (wrong shape or axis, causal mask missing, sample instead of
population variance, ...), not just "wrong".

    exercises.check_sink_rate(sink_rate)     # in a notebook: prints the verdict; a wrong result raises
                                             # ExerciseFailed with the hint; a stub says "not implemented yet"
    exercises.run("sink_rate", sink_rate)    # Result(exercise, passed, message); never raises

The two halves are separate so that grading trusts only outputs: ``collect`` runs the student's function on
the prepared inputs (in the student's kernel), ``judge`` compares and diagnoses (in the grader's process,
``sinkutils.assign``). What a notebook prints or claims never decides a grade.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

import torch

from sinkutils import interventions, measure, metrics, structure, trace, variants

NOT_IMPLEMENTED = "not implemented yet"
_RTOL, _ATOL = 1e-4, 1e-6


class ExerciseFailed(AssertionError):
    """A check found a wrong result; the message is the hint."""


class _Wrong(Exception):
    """Raised inside a diagnosis when it has found what is wrong; the message is the hint."""


@dataclasses.dataclass(frozen=True)
class Result:
    """One exercise's verdict: what the grader writes as a CSV row and what a check prints."""

    exercise: str
    passed: bool
    message: str


@dataclasses.dataclass(frozen=True)
class Exercise:
    """A function to write: its chapter, prepared inputs (case name -> positional arguments) and a diagnosis
    that raises ``_Wrong(hint)`` on the outputs of a wrong function and returns for a right one."""

    name: str
    chapter: str
    summary: str
    cases: Callable[[], dict[str, tuple]]
    diagnose: Callable[["_Probe"], None]


#: exercise name (= the function the student writes) -> Exercise, in the order of the assignments
EXERCISES: dict[str, Exercise] = {}


def _exercise(chapter: str, cases: Callable[[], dict[str, tuple]]):
    """Register the decorated diagnosis as the exercise named like it; its docstring is the summary."""
    def register(diagnose: Callable[[_Probe], None]) -> Callable[[_Probe], None]:
        name = diagnose.__name__
        EXERCISES[name] = Exercise(name, chapter, " ".join(diagnose.__doc__.split()), cases, diagnose)
        return diagnose
    return register


def exercise(name: str) -> Exercise:
    """The registered exercise ``name``, or a KeyError listing the valid names."""
    if name not in EXERCISES:
        raise KeyError(f"unknown exercise {name!r}; choose one of {sorted(EXERCISES)}")
    return EXERCISES[name]


def chapters() -> list[str]:
    """The chapters (assignment names) that have exercises, in order."""
    return sorted({e.chapter for e in EXERCISES.values()})


def of_chapter(chapter: str) -> list[Exercise]:
    """The exercises of one assignment, in the order the notebook poses them."""
    found = [e for e in EXERCISES.values() if e.chapter == chapter]
    if not found:
        raise KeyError(f"no exercises for {chapter!r}; assignments are {chapters()}")
    return found


# ------------------------------------------------------------------------------------------------------------
# Running a function on the prepared inputs, and judging what came out
# ------------------------------------------------------------------------------------------------------------

def plain(value):
    """``value`` as what a grader may load back with ``torch.load(weights_only=True)``: tensors (detached, on
    the CPU), numbers, strings, None, and lists / tuples / dicts of them; numpy arrays become tensors and
    anything else the string ``<unsupported TYPE>``."""
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if type(value).__module__ == "numpy":
        return torch.as_tensor(value).clone()
    return f"<unsupported {type(value).__module__}.{type(value).__qualname__}>"


def collect(name: str, fn: Callable) -> dict[str, dict]:
    """Call ``fn`` on each prepared input of exercise ``name``: per case ``{"value": output, "mutated": bool}``
    (``mutated``: it changed an input tensor in place) or ``{"error": "Type: message"}``. The outputs go
    through ``plain``; in-process callers also get the exception object under ``"exception"``."""
    out: dict[str, dict] = {}
    for case, args in exercise(name).cases().items():
        given = tuple(a.clone() if torch.is_tensor(a) else a for a in args)
        try:
            value = fn(*given)
        except NotImplementedError as err:
            out[case] = {"error": NOT_IMPLEMENTED, "exception": err}
            continue
        except Exception as err:  # the student's bug, reported with the case it happened on
            out[case] = {"error": f"{type(err).__name__}: {err}", "exception": err}
            continue
        mutated = any(torch.is_tensor(a) and (a.shape != b.shape or not torch.equal(a, b)) for a, b in zip(given, args))
        out[case] = {"value": plain(value), "mutated": mutated}
    return out


def judge(name: str, outputs: dict[str, dict]) -> Result:
    """The verdict on the outputs ``collect`` gathered: passed, or the most specific hint found."""
    ex = exercise(name)
    cases = ex.cases()
    if set(outputs) != set(cases):
        return Result(name, False, f"outputs for cases {sorted(outputs)}, expected {sorted(cases)}")
    errors = [(case, o["error"]) for case, o in outputs.items() if "error" in o]
    if any(err == NOT_IMPLEMENTED for _, err in errors):
        return Result(name, False, NOT_IMPLEMENTED)
    if errors:
        case, err = errors[0]
        return Result(name, False, f"raised {err} (on the prepared input {case!r})")
    if any(o.get("mutated") for o in outputs.values()):
        return Result(name, False, "changed its input tensor in place (e.g. `x[...] = ...` or `x.add_()` on an "
                                   "argument), so the caller's data is corrupted; work on a copy: `x = x.clone()`")
    try:
        ex.diagnose(_Probe(cases, outputs))
    except _Wrong as wrong:
        return Result(name, False, str(wrong))
    return Result(name, True, f"correct on all {len(cases)} prepared inputs" if len(cases) > 1 else
                  "correct on the prepared input")


def run(name: str, fn: Callable) -> Result:
    """``judge(name, collect(name, fn))``: the verdict on ``fn`` in this process."""
    return judge(name, collect(name, fn))


class Verdict:
    """What a check returns: true when the function passed, so that a cell can go on with it
    (``if check_x(x): ...``). The check has printed its message already, so the notebook shows nothing more."""

    def __init__(self, result: Result):
        self.result = result

    def __bool__(self) -> bool:
        return self.result.passed

    def __repr__(self) -> str:
        return f"Verdict({self.result.exercise}: {self.result.message})"

    def _ipython_display_(self) -> None:
        pass


def check(name: str, fn: Callable) -> Verdict:
    """Check the student's ``fn`` for exercise ``name``: print the verdict and return it; a wrong function
    raises ExerciseFailed with the hint (from the function's own exception when it raised one). A stub that
    raises NotImplementedError only prints "not implemented yet", so the student edition runs top to bottom."""
    outputs = collect(name, fn)
    result = judge(name, outputs)
    if result.passed:
        print(f"\u2714 {name}: {result.message}")
    elif result.message == NOT_IMPLEMENTED:
        print(f"\u2026 {name}: {NOT_IMPLEMENTED}; write its body above, then run this cell again")
    else:
        cause = next((o["exception"] for o in outputs.values() if "exception" in o), None)
        raise ExerciseFailed(f"{name}: {result.message}") from cause
    return Verdict(result)


def _checker(name: str) -> Callable[[Callable], Verdict]:
    def check_one(fn: Callable) -> Verdict:
        return check(name, fn)
    ex = exercise(name)
    check_one.__name__ = check_one.__qualname__ = f"check_{name}"
    check_one.__doc__ = f"Check your ``{name}`` (chapter {ex.chapter}): {ex.summary}"
    return check_one


# ------------------------------------------------------------------------------------------------------------
# Diagnosis helpers
# ------------------------------------------------------------------------------------------------------------

def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=_RTOL, atol=_ATOL)


def _axes_of(shape: tuple[int, ...], sizes: dict[str, int]) -> list[str]:
    by_size = {v: k for k, v in sizes.items()}
    return [by_size.get(n, "?") for n in shape]


def _shape_hint(got: tuple[int, ...], want: tuple[str, ...], sizes: dict[str, int]) -> str:
    """Expected against got shape, named by axis; says which axis was reduced instead of which."""
    expected = tuple(sizes[a] for a in want)
    msg = f"expected shape {expected} ({', '.join(want)}), got {tuple(got)}"
    names = _axes_of(tuple(got), sizes)
    if "?" in names or len(set(sizes.values())) != len(sizes):
        return msg
    msg += f" ({', '.join(names)})"
    dropped_want = [a for a in sizes if a not in want]
    dropped_got = [a for a in sizes if a not in names]
    if len(names) == len(want) and set(names) != set(want):
        return msg + f": you reduced over {' and '.join(dropped_got)} instead of {' and '.join(dropped_want)}"
    if len(names) > len(want):
        return msg + f": you did not reduce over {' and '.join(a for a in names if a not in want)}"
    if len(names) < len(want):
        return msg + f": you also reduced over {' and '.join(a for a in want if a not in names)}"
    return msg + ": the axes are in the wrong order"


def _describe_difference(got: torch.Tensor, ref: torch.Tensor) -> str:
    diff = (got.double() - ref.double()).abs().nan_to_num(float("inf"))
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.dim() else ()
    return (f"largest difference {float(diff.max()):.3g} at index {idx}: got {float(got[idx]):.6g}, expected "
            f"{float(ref[idx]):.6g}")


class _Probe:
    """The prepared inputs and the student's outputs, with the checks every diagnosis needs."""

    def __init__(self, cases: dict[str, tuple], outputs: dict[str, dict]):
        self.cases, self.outputs = cases, outputs

    def args(self, case: str) -> tuple:
        return self.cases[case]

    def value(self, case: str):
        return self.outputs[case]["value"]

    def tensor(self, case: str, want: tuple[str, ...], sizes: dict[str, int]) -> torch.Tensor:
        """The output on ``case`` if it is a tensor of the named axes ``want``, else _Wrong with a hint."""
        v = self.value(case)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not want:
            v = torch.tensor(float(v))
        if not torch.is_tensor(v):
            raise _Wrong(f"return a tensor, got {type(v).__name__ if not isinstance(v, str) else v}")
        if tuple(v.shape) != tuple(sizes[a] for a in want):
            raise _Wrong(_shape_hint(tuple(v.shape), want, sizes))
        if v.is_complex():
            raise _Wrong("return real numbers, got a complex tensor")
        if v.dtype != torch.bool and not torch.isfinite(v.double()).all():
            bad = tuple(int(i) for i in (~torch.isfinite(v.double())).nonzero()[0])
            raise _Wrong(f"your output has a NaN or an infinity at index {bad} (on the prepared input {case!r})")
        return v

    @staticmethod
    def mistakes(got: torch.Tensor, candidates: dict[str, torch.Tensor]) -> None:
        """_Wrong with the hint of the first known mistake whose result the output equals."""
        for hint, value in candidates.items():
            if _close(got, value):
                raise _Wrong(hint)

    @staticmethod
    def expect(got: torch.Tensor, ref: torch.Tensor, case: str) -> None:
        if not _close(got, ref):
            raise _Wrong(f"wrong values on the prepared input {case!r}: {_describe_difference(got, ref)}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q . k / sqrt(D) (or times ``scale``): the logits every attention exercise starts from."""
    return (q.double() @ k.double().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)


# ------------------------------------------------------------------------------------------------------------
# Chapter 1: the sink
# ------------------------------------------------------------------------------------------------------------

_ATT = dict(batch=2, heads=3, tokens=7, head_dim=8)
_FUTURE = 4  # the "future keys" case changes keys 4.. : queries 0..3 must not notice


def _attention_cases() -> dict[str, tuple]:
    g = _gen(101)
    shape = (_ATT["batch"], _ATT["heads"], _ATT["tokens"], _ATT["head_dim"])
    q, k = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    k_future = k.clone()
    k_future[:, :, _FUTURE:] = 3 * torch.randn(k_future[:, :, _FUTURE:].shape, generator=g)
    return {"random": (q, k), "later keys changed": (q, k_future)}


def _first_reference(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return trace.attention_stats(q, k, None, q.shape[-1] ** -0.5, 0, ("attn.sink",))["attn.sink"]


@_exercise("01_sink", _attention_cases)
def attention_to_first(p: _Probe) -> None:
    """attention_to_first(q, k): the weight every query gives to key 0, (batch, heads, T), from queries and
    keys (batch, heads, T, head_dim) under causal softmax attention with scale 1/sqrt(head_dim) (Fig 3)."""
    q, k = p.args("random")
    full = p.value("random")
    if torch.is_tensor(full) and tuple(full.shape) == tuple(q.shape[:-1]) + (q.shape[-2],):
        raise _Wrong("you returned the whole attention map (batch, heads, T, T); keep only what each query gives "
                     "to key 0, the first column: weights[..., 0]")
    want = ("batch", "heads", "tokens")
    got = p.tensor("random", want, _ATT)
    ref = _first_reference(q, k)
    later = p.tensor("later keys changed", want, _ATT)
    if _close(got, ref) and _close(later, _first_reference(*p.args("later keys changed"))):
        return
    if not _close(later[..., :_FUTURE], got[..., :_FUTURE]):
        raise _Wrong(f"causal mask missing: the weights of queries 0..{_FUTURE - 1} changed when only keys "
                     f"{_FUTURE}.. changed; query t may see keys 0..t only: set the scores of later keys to -inf "
                     "before the softmax")
    if not torch.allclose(got[..., 0].double(), torch.ones(()).double(), atol=1e-5):
        raise _Wrong(f"query 0 sees only key 0, so its weight on key 0 must be 1, got {float(got[0, 0, 0]):.4g}: "
                     "normalise over the keys, softmax(dim=-1) on (..., queries, keys) scores, not over the queries")
    mask = trace._causal_bool(q.shape[-2], q.shape[-2], "cpu")
    p.mistakes(got, {
        "forgot the scale: divide q . k by sqrt(head_dim) before the softmax":
            _scores(q, k, 1.0).masked_fill(~mask, -math.inf).softmax(-1)[..., 0],
        "you returned what query 0 gives to each key (row 0 of the map); the sink is what each query gives to "
        "key 0 (column 0): weights[..., :, 0]":
            _scores(q, k).masked_fill(~mask, -math.inf).softmax(-1)[..., 0, :],
    })
    p.expect(got, ref, "random")
    p.expect(later, _first_reference(*p.args("later keys changed")), "later keys changed")


_SINK = dict(layers=3, batch=2, heads=5, tokens=10)


def _sink_cases() -> dict[str, tuple]:
    g = _gen(102)
    L, B, H, T = _SINK.values()
    level = torch.rand(L, 1, H, 1, generator=g) * 0.5 + 0.05          # each head's typical attention to token 0
    sink = (level + 0.15 * torch.randn(L, B, H, T, generator=g)).clamp(0, 1)
    sink[..., :4] = 0.9 + 0.1 * torch.rand(L, B, H, 4, generator=g)   # early queries: see few keys, sink a lot
    sink[..., 0] = 1.0                                                # query 0 sees only key 0
    return {"epsilon 0.3, min_query 4": (sink, 0.3, 4), "epsilon 0.2, min_query 2": (sink, 0.2, 2)}


@_exercise("01_sink", _sink_cases)
def sink_rate(p: _Probe) -> None:
    """sink_rate(sink, epsilon, min_query): per layer, the fraction of heads whose mean attention to token 0,
    over sequences and queries t >= min_query, exceeds epsilon; sink is (layers, batch, heads, T) (Fig 3)."""
    want = ("layers",)
    results = {}
    for case, (sink, eps, mq) in p.cases.items():
        sizes = dict(_SINK)
        got = p.value(case)
        if torch.is_tensor(got) and tuple(got.shape) == (sizes["layers"], sizes["heads"]):
            raise _Wrong(f"{_shape_hint(tuple(got.shape), want, sizes)}: threshold each head's mean, then take "
                         "the fraction of heads above epsilon per layer")
        results[case] = (p.tensor(case, want, sizes), sink, eps, mq)
    for case, (got, sink, eps, mq) in results.items():
        ref = metrics.sink_rate(sink, eps, mq)
        if _close(got, ref):
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
        if _close(got, metrics.sink_rate(sink, eps0, mq0)):
            raise _Wrong(f"use the epsilon and min_query arguments; on the input {case!r} your result is the one "
                         f"for epsilon={eps0}, min_query={mq0}")
        p.expect(got, ref, case)


# ------------------------------------------------------------------------------------------------------------
# Chapter 2: the variance discrepancy
# ------------------------------------------------------------------------------------------------------------

_HEAD = dict(batch=2, tokens=5, heads=3, head_dim=8)


def _head_out_cases() -> dict[str, tuple]:
    g = _gen(201)
    B, T, H, D = _HEAD.values()
    x = torch.randn(B, T, H, D, generator=g) * torch.rand(B, T, H, 1, generator=g) * 3 \
        + torch.randn(B, T, H, 1, generator=g)  # each vector its own scale and its own mean
    return {"attention outputs": (x,)}


@_exercise("02_variance", _head_out_cases)
def dimension_variance(p: _Probe) -> None:
    """dimension_variance(head_out): the variance across head_dim of each head's attention output, from
    (batch, T, heads, head_dim) to (batch, T, heads): population variance, divide by head_dim (Fig 1)."""
    (x,) = p.args("attention outputs")
    got = p.tensor("attention outputs", ("batch", "tokens", "heads"), _HEAD)
    ref = metrics.dimension_variance(x)
    if _close(got, ref):
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
    g = _gen(202)
    B, H, T, S = _AGG.values()
    visible = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # the last T of S positions are the queries
    pattern = (2 * torch.randn(B, H, T, S, generator=g)).masked_fill(~visible, -math.inf).softmax(-1)
    value_var = torch.rand(B, H, S, generator=g) * 2 + 0.1
    return {"attention maps": (pattern, value_var)}


@_exercise("02_variance", _aggregation_cases)
def predicted_variance(p: _Probe) -> None:
    """predicted_variance(pattern, value_var): sum_j p_tj^2 var(v_j), the variance an attention output would
    have if the value vectors were independent, from maps (batch, heads, T, S) and value variances
    (batch, heads, S), giving (batch, heads, T) (chapter 2's prediction)."""
    pattern, value_var = p.args("attention maps")
    sizes = dict(_AGG)
    got = p.tensor("attention maps", ("batch", "heads", "queries"), sizes)
    ref, _ = measure.aggregation_prediction(pattern, value_var)
    if _close(got, ref):
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


# ------------------------------------------------------------------------------------------------------------
# Chapter 3: moving the sink
# ------------------------------------------------------------------------------------------------------------

_MASK_T = 9


def _mask_cases() -> dict[str, tuple]:
    causal = trace._causal_bool(_MASK_T, _MASK_T, "cpu")
    hidden = causal.clone()
    hidden[:, [1, 3]] = False                    # keys 1 and 3 hidden from everyone (padding, say)
    hidden[[1, 3], [1, 3]] = True                # ... but each still sees itself
    return {"causal, k=5": (causal, 5), "causal, k=2": (causal.clone(), 2), "keys 1 and 3 hidden, k=6": (hidden, 6)}


@_exercise("03_interventions", _mask_cases)
def mask_intervention(p: _Probe) -> None:
    """mask_intervention(mask, k): the mask intervention of Fig 5 on a (T, T) bool mask (True = the query in
    that row may attend to the key in that column): query k may attend only to key k (itself), as token 0
    always does; every other row stays as it was. Return a new mask; leave the argument unchanged."""
    for case, (mask, k) in p.cases.items():
        got = p.value(case)
        if torch.is_tensor(got) and got.dtype != torch.bool and got.shape == mask.shape:
            raise _Wrong(f"return a bool mask (True = may attend), got dtype {got.dtype}")
        got = p.tensor(case, ("queries", "keys"), {"queries": _MASK_T, "keys": _MASK_T})
        ref = interventions.block_row(mask, k, _MASK_T, _MASK_T, mask.device)
        if torch.equal(got, ref):
            continue
        others = torch.arange(_MASK_T) != k
        if not torch.equal(got[others], mask[others]):
            changed = (got != mask)[others].nonzero()
            if changed.numel() and (changed[:, 1] == k).all():
                raise _Wrong(f"you edited column {k} (which queries see key {k}); the intervention edits row {k} "
                             f"(which keys query {k} sees): mask[{k}, :]")
            raise _Wrong(f"rows other than {k} must stay as given (on {case!r} the mask hides some keys); edit row "
                         f"{k} of the mask you got, do not build a new causal mask")
        row = got[k]
        if not row.any():
            raise _Wrong(f"query {k} now sees no key at all, and a softmax over nothing but -inf is NaN; it must "
                         f"still see key {k}, itself")
        if row[0] and not row[k]:
            raise _Wrong(f"query {k} must attend to itself (key {k}), as token 0 attends to itself; you let it see "
                         f"token 0 instead")
        raise _Wrong(f"row {k} must allow key {k} only; yours allows keys {row.nonzero().flatten().tolist()}")


_OUT = dict(batch=2, tokens=4, heads=3, head_dim=8)


def _head_vectors(seed: int) -> torch.Tensor:
    g = _gen(seed)
    B, T, H, D = _OUT.values()
    mean = torch.randn(B, T, H, 1, generator=g)
    mean[0, 0] = -mean[0, 0].abs() - 0.5   # some vectors with clearly negative means
    mean[1, 1] = mean[1, 1].abs() + 0.5
    return mean + torch.randn(B, T, H, D, generator=g) * (0.5 + torch.rand(B, T, H, 1, generator=g))


def _amplify_cases() -> dict[str, tuple]:
    x = _head_vectors(301)
    return {"lambda 2.5": (x, 2.5), "lambda 0.5": (x, 0.5)}


@_exercise("03_interventions", _amplify_cases)
def amplified(p: _Probe) -> None:
    """amplified(o, lam): the variance amplification of Fig 6 on attention outputs (..., head_dim):
    each vector's deviation from its own mean (over head_dim) grows by lam, so its dimension-wise variance
    grows by lam**2 while its mean stays."""
    for case, (o, lam) in p.cases.items():
        got = p.tensor(case, tuple(_OUT), _OUT)
        ref = interventions.amplified(o, lam)
        if _close(got, ref):
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


@_exercise("03_interventions", _norm_cases)
def norm_scaled(p: _Probe) -> None:
    """norm_scaled(o, lam): the control of Fig 6, lam >= 1: each vector (..., head_dim) gets lam times its
    norm and the same dimension-wise variance, by adding one constant to all its coordinates (the mean
    moves, away from zero on its own side)."""
    for case, (o, lam) in p.cases.items():
        got = p.tensor(case, tuple(_OUT), _OUT)
        ref = interventions.norm_scaled(o, lam)
        if _close(got, ref):
            continue
        var_in, var_out = metrics.dimension_variance(o).double(), metrics.dimension_variance(got).double()
        if not torch.allclose(var_out, var_in, rtol=1e-3, atol=1e-6):
            ratio = float((var_out / var_in).median())
            raise _Wrong(f"the control must keep the dimension-wise variance; yours multiplied it by about "
                         f"{ratio:.3g}{' (that is lam**2: lam * o scales the deviations too)' if abs(ratio - lam ** 2) < 1e-2 else ''}"
                         ": add one constant to every coordinate of a vector instead, so only its mean moves")
        norm_in, norm_out = o.double().norm(dim=-1), got.double().norm(dim=-1)
        if not torch.allclose(norm_out, lam * norm_in, rtol=1e-4):
            raise _Wrong(f"the norm must become lam * |o| exactly (got {float((norm_out / norm_in).median()):.4g} "
                         f"times it for lam={lam}): with |o|^2 = D (mean^2 + var) and var fixed, solve for the new "
                         "mean: new_mean^2 = mean^2 + (lam^2 - 1) |o|^2 / D")
        flipped = (got.double().mean(-1) * o.double().mean(-1) < 0).nonzero()
        if len(flipped):
            raise _Wrong(f"keep the mean on its own side: the vector at {tuple(flipped[0].tolist())} has a negative "
                         "mean and yours made it positive (move it away from zero: the smallest shift that works)")
        p.expect(got, ref, case)


# ------------------------------------------------------------------------------------------------------------
# Chapter 4: super neurons
# ------------------------------------------------------------------------------------------------------------

_TAU = dict(rows=4, observations=12)


def _kendall_cases() -> dict[str, tuple]:
    g = _gen(401)
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


@_exercise("04_super_neurons", _kendall_cases)
def kendall_tau(p: _Probe) -> None:
    """kendall_tau(x, y): Kendall's tau-b between x and y along the last axis, one value per row of
    (rows, n) inputs: (concordant - discordant pairs) / sqrt((n0 - ties in x)(n0 - ties in y)) (Fig 7)."""
    want = ("rows",)
    got = {case: p.tensor(case, want, _TAU) for case in p.cases}
    ref = {case: metrics.kendall_tau(*args) for case, args in p.cases.items()}
    if all(_close(got[c], ref[c]) for c in p.cases):
        return
    plain_case, mono = "no ties", "y through exp(3y), an increasing map"
    x, y = p.args(plain_case)
    if not _close(got[mono], got[plain_case]):
        raise _Wrong("Kendall's tau depends only on the order of the values: an increasing map of y must not change "
                     "it, and yours changed; count concordant and discordant pairs (sign(x_i - x_j) * "
                     "sign(y_i - y_j)) instead of correlating the values")
    p.mistakes(got[plain_case], {
        "that is Pearson's correlation of the values; Kendall's tau counts concordant minus discordant pairs":
            _pearson(x, y),
        "that is Spearman's rank correlation (Pearson on ranks); Kendall's tau counts concordant minus discordant "
        "pairs": _pearson(x.argsort(-1).argsort(-1), y.argsort(-1).argsort(-1)),
        "the sign is flipped: concordant pairs (both differences of one sign) count +1": -ref[plain_case],
    })
    if _close(got[plain_case], ref[plain_case]) and _close(got[mono], ref[mono]):
        raise _Wrong("right without ties, wrong with ties: a pair tied in x or in y is neither concordant nor "
                     "discordant, and tau-b divides by sqrt((n0 - n_x)(n0 - n_y)), n_x and n_y the pairs tied in x "
                     "and in y, not by n0 = n(n-1)/2 (that is tau-a)")
    for case in p.cases:
        p.expect(got[case], ref[case], case)


_FFN = dict(neurons=64, width=24)
_SUPER = (5, 40, 17)


def _ffn_cases() -> dict[str, tuple]:
    g = _gen(402)
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


@_exercise("04_super_neurons", _ffn_cases)
def super_neurons(p: _Probe) -> None:
    """super_neurons(w_gate, w_up, z_threshold): the FFN neurons n whose score ||W_gate[n]|| * ||W_up[n]|| has
    a robust z-score (median and MAD, metrics.robust_z) above z_threshold, largest score first, as a list of
    ints; W_gate and W_up are (neurons, width) in nn.Linear layout (Fig 8)."""
    got, ref = {}, {}
    for case, (gate, up, z_threshold) in p.cases.items():
        value = p.value(case)
        if torch.is_tensor(value) and value.dtype == torch.bool:
            raise _Wrong("return the neurons' indices (a list of ints, largest score first), not a mask")
        got[case] = _as_indices(value)
        if got[case] is None:
            raise _Wrong(f"return a list of ints (neuron indices), got {value!r:.80}")
        ref[case] = structure.ffn_norms_of(gate, up, z_threshold=z_threshold).super_neurons
    wrong = [case for case in p.cases if got[case] != ref[case]]
    if not wrong:
        return
    case = wrong[0]
    if sorted(got[case]) == sorted(ref[case]):
        raise _Wrong(f"the right neurons in the wrong order: list them largest score first ({ref[case]}), you gave "
                     f"{got[case]}")
    # a mistake is recognised when it explains the outputs on every prepared input
    per_case = {c: _super_mistakes(*args) for c, args in p.cases.items()}
    for hint in per_case[case]:
        if all(got[c] == per_case[c][hint] for c in p.cases):
            raise _Wrong(hint)
    raise _Wrong(f"on the prepared input {case!r} the super neurons are {ref[case]}, you found {got[case]}")


# ------------------------------------------------------------------------------------------------------------
# Chapter 5: dimension disparity
# ------------------------------------------------------------------------------------------------------------

_RES = dict(batch=2, tokens=5, width=16)


def _residual_cases() -> dict[str, tuple]:
    g = _gen(501)
    x = torch.randn(*_RES.values(), generator=g)
    x[:, 0, 3] = -40.0   # token 0: one massive (negative) coordinate
    x[1, 2, 7] = 12.0
    return {"hidden states": (x,)}


@_exercise("05_disparity", _residual_cases)
def dominance_ratio(p: _Probe) -> None:
    """dominance_ratio(x): max_i |x_i| / mean_i |x_i| over the last axis of hidden states (batch, T, width),
    giving (batch, T): about 3 for a Gaussian vector of width 16, large when one coordinate is massive
    (Fig 11)."""
    (x,) = p.args("hidden states")
    got = p.tensor("hidden states", ("batch", "tokens"), _RES)
    ref = metrics.dominance_ratio(x)
    if _close(got, ref):
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
    g = _gen(502)
    shared = torch.randn(3, 1, 7, generator=g) * torch.tensor([0.0, 1.0, 4.0])[:, None, None]
    return {"three levels of agreement": (shared + torch.randn(*_COS.values(), generator=g),)}


@_exercise("05_disparity", _cosine_cases)
def mean_pairwise_cosine(p: _Probe) -> None:
    """mean_pairwise_cosine(x): the mean cosine similarity over all pairs i != j of the vectors x[..., i, :]
    of (batch, n, width), giving (batch,): 1 when every vector points the same way, about 0 for independent
    random vectors (RMSNorm as a directional filter, chapter 5)."""
    (x,) = p.args("three levels of agreement")
    got = p.tensor("three levels of agreement", ("batch",), _COS)
    ref = metrics.mean_pairwise_cosine(x)
    if _close(got, ref):
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


# ------------------------------------------------------------------------------------------------------------
# Chapter 6: head-wise RMSNorm and the other fixes
# ------------------------------------------------------------------------------------------------------------

_HN = dict(batch=2, tokens=3, heads=4, head_dim=6)


def _headnorm_cases() -> dict[str, tuple]:
    g = _gen(601)
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


@_exercise("06_headwise", _headnorm_cases)
def headwise_rmsnorm(p: _Probe) -> None:
    """headwise_rmsnorm(o, weight, eps): RMSNorm of each head's attention output over head_dim, o * weight /
    sqrt(mean(o**2 over head_dim) + eps), with the gain weight (heads, head_dim), for o (batch, T, heads,
    head_dim): the paper's fix, applied after value aggregation and before W_O (chapter 6)."""
    for case, (o, weight, eps) in p.cases.items():
        got = p.value(case)
        if torch.is_tensor(got) and tuple(got.shape) == tuple(o.shape) and not torch.isfinite(got.double()).all():
            raise _Wrong("NaN where a head's output is all zeros (0 / 0): add eps inside the square root, "
                         "sqrt(mean(o**2) + eps)")
        got = p.tensor(case, tuple(_HN), _HN)
        ref = _headnorm_reference(o, weight, eps)
        if _close(got, ref):
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
    return variants.sigmoid_weights(q, k, None, q.shape[-1] ** -0.5)


@_exercise("06_headwise", _attention_cases)
def sigmoid_attention(p: _Probe) -> None:
    """sigmoid_attention(q, k): sigmoid attention weights (batch, heads, T, T) from queries and keys
    (batch, heads, T, head_dim): sigmoid(q.k / sqrt(head_dim) - log T) for keys up to the query, 0 for later
    keys (causal), no normalisation over keys (Ramapuram et al. 2024; chapter 6)."""
    q, k = p.args("random")
    T = q.shape[-2]
    sizes = {"batch": _ATT["batch"], "heads": _ATT["heads"], "queries": T, "keys": T, "head_dim": _ATT["head_dim"]}
    value = p.value("random")
    if torch.is_tensor(value) and tuple(value.shape) == tuple(q.shape[:-1]):
        raise _Wrong(f"return the weight of every query on every key, shape {tuple(q.shape[:-1]) + (T,)} (batch, "
                     "heads, queries, keys), not one number per query")
    got = p.tensor("random", ("batch", "heads", "queries", "keys"), sizes)
    ref = _sigmoid_reference(q, k)
    second = "later keys changed"
    if _close(got, ref) and _close(p.tensor(second, ("batch", "heads", "queries", "keys"), sizes),
                                   _sigmoid_reference(*p.args(second))):
        return
    later = ~trace._causal_bool(T, T, "cpu")
    if got[..., later].abs().max() > 1e-6:
        raise _Wrong("causal mask missing: a query must give weight 0 to every later key (above the diagonal)")
    if torch.allclose(got.double().sum(-1), torch.ones(()).double(), atol=1e-5):
        raise _Wrong("your rows sum to 1, as softmax does; sigmoid attention weighs each key on its own, "
                     "sigmoid(score - log T), with no normalisation over keys")
    s = _scores(q, k)
    visible = torch.arange(1, T + 1, dtype=torch.float64)[:, None]

    def sig(scores: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(scores).masked_fill(later, 0.0)

    p.mistakes(got, {
        f"subtract the bias log T (here log {T}) from the scores: without it every weight starts near 1/2 and "
        "a long sequence drowns each query": sig(s),
        "the bias is -log T with T the number of keys in the sequence, the same for every query; you used the "
        "number of keys each query sees (t + 1)": sig(s - visible.log()),
        "scale the scores by 1/sqrt(head_dim) before the sigmoid": sig(_scores(q, k, 1.0) - math.log(T)),
    })
    p.expect(got, ref, "random")
    p.expect(p.tensor(second, ("batch", "heads", "queries", "keys"), sizes), _sigmoid_reference(*p.args(second)),
             second)


_RANK = dict(batch=2, tokens=6, width=9)


def _rank_cases() -> dict[str, tuple]:
    g = _gen(603)
    B, n, d = _RANK.values()
    x = torch.randn(B, n, d, generator=g) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])[:, None]
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q[:3].float()  # 3 orthonormal rows
    equal = torch.zeros(B, n, d)
    equal[:, :3] = 2.0 * basis
    return {"random": (x,), "three equal singular values": (equal,)}


@_exercise("06_headwise", _rank_cases)
def effective_rank(p: _Probe) -> None:
    """effective_rank(x): the effective rank of each (tokens, width) matrix of x (batch, tokens, width):
    exp of the entropy of its singular values normalised to sum 1 (Roy & Vetterli 2007), giving (batch,);
    k for a matrix with k equal non-zero singular values (Fig 15, 21)."""
    for case, (x,) in p.cases.items():
        value = p.value(case)
        if torch.is_tensor(value) and value.is_floating_point() and value.isnan().any():
            raise _Wrong(f"NaN on {case!r}: a zero singular value gives p log p = 0 * log 0 = NaN; count it as 0 "
                         "(torch.special.entr(p) does, or take the log of p.clamp_min(tiny))")
        got = p.tensor(case, ("batch",), _RANK)
        ref = metrics.effective_rank(x)
        if _close(got, ref):
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


check_attention_to_first = _checker("attention_to_first")
check_sink_rate = _checker("sink_rate")
check_dimension_variance = _checker("dimension_variance")
check_predicted_variance = _checker("predicted_variance")
check_mask_intervention = _checker("mask_intervention")
check_amplified = _checker("amplified")
check_norm_scaled = _checker("norm_scaled")
check_kendall_tau = _checker("kendall_tau")
check_super_neurons = _checker("super_neurons")
check_dominance_ratio = _checker("dominance_ratio")
check_mean_pairwise_cosine = _checker("mean_pairwise_cosine")
check_headwise_rmsnorm = _checker("headwise_rmsnorm")
check_sigmoid_attention = _checker("sigmoid_attention")
check_effective_rank = _checker("effective_rank")
