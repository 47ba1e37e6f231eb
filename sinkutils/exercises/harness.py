"""The exercises' harness: registering an exercise, running a function on its prepared inputs, judging the
outputs, reporting the verdict, and the helpers every diagnosis uses. The exercises themselves are in one
module per chapter (``ch1_sink`` ... ``ch6_headwise``); ``sinkutils.exercises`` gathers both.

The two halves of a verdict are separate so that grading trusts only outputs: ``collect`` runs the student's
function on the prepared inputs (in the student's kernel), ``judge`` compares and diagnoses (in the grader's
process, ``sinkutils.assign``). What a notebook prints or claims never decides a grade.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import torch

NOT_IMPLEMENTED = "not implemented yet"
_RTOL, _ATOL = 1e-4, 1e-6


class ExerciseFailed(AssertionError):
    """A check found a wrong result; the message is the hint."""


class Wrong(Exception):
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
    that raises ``Wrong(hint)`` on the outputs of a wrong function and returns for a right one."""

    name: str
    chapter: str
    summary: str
    cases: Callable[[], dict[str, tuple]]
    diagnose: Callable[["Probe"], None]


#: exercise name (= the function the student writes) -> Exercise, in the order of the assignments
EXERCISES: dict[str, Exercise] = {}


def register(chapter: str, cases: Callable[[], dict[str, tuple]]):
    """Register the decorated diagnosis as the exercise named like it, in assignment ``chapter`` (e.g.
    ``"01_sink"``); its docstring is the summary."""
    def add(diagnose: Callable[[Probe], None]) -> Callable[[Probe], None]:
        name = diagnose.__name__
        if name in EXERCISES:
            raise ValueError(f"exercise {name!r} is registered twice")
        EXERCISES[name] = Exercise(name, chapter, " ".join(diagnose.__doc__.split()), cases, diagnose)
        return diagnose
    return add


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
        ex.diagnose(Probe(cases, outputs))
    except Wrong as wrong:
        return Result(name, False, str(wrong))
    return Result(name, True, f"correct on all {len(cases)} prepared inputs" if len(cases) > 1 else
                  "correct on the prepared input")


def run(name: str, fn: Callable) -> Result:
    """``judge(name, collect(name, fn))``: the verdict on ``fn`` in this process; never raises."""
    return judge(name, collect(name, fn))


# ------------------------------------------------------------------------------------------------------------
# Reporting in a notebook: the check_NAME functions
# ------------------------------------------------------------------------------------------------------------

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


def checker(name: str) -> Callable[[Callable], Verdict]:
    """``check_NAME(fn)``, the function a notebook's check cell calls: ``check(name, fn)``, documented with the
    exercise's summary."""
    def check_one(fn: Callable) -> Verdict:
        return check(name, fn)
    ex = exercise(name)
    check_one.__name__ = check_one.__qualname__ = f"check_{name}"
    check_one.__doc__ = f"Check your ``{name}`` (chapter {ex.chapter}): {ex.summary}"
    return check_one


# ------------------------------------------------------------------------------------------------------------
# What every diagnosis uses
# ------------------------------------------------------------------------------------------------------------

def generator(seed: int) -> torch.Generator:
    """The CPU generator a chapter's prepared inputs are drawn from."""
    return torch.Generator().manual_seed(seed)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and equal within the exercises' tolerance (compared in float64)."""
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=_RTOL, atol=_ATOL)


def _axes_of(shape: tuple[int, ...], sizes: dict[str, int]) -> list[str]:
    by_size = {v: k for k, v in sizes.items()}
    return [by_size.get(n, "?") for n in shape]


def shape_hint(got: tuple[int, ...], want: tuple[str, ...], sizes: dict[str, int]) -> str:
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


class Probe:
    """The prepared inputs and the student's outputs, with the checks every diagnosis needs."""

    def __init__(self, cases: dict[str, tuple], outputs: dict[str, dict]):
        self.cases, self.outputs = cases, outputs

    def args(self, case: str) -> tuple:
        return self.cases[case]

    def value(self, case: str):
        return self.outputs[case]["value"]

    def tensor(self, case: str, want: tuple[str, ...], sizes: dict[str, int]) -> torch.Tensor:
        """The output on ``case`` if it is a tensor of the named axes ``want``, else Wrong with a hint."""
        v = self.value(case)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not want:
            v = torch.tensor(float(v))
        if not torch.is_tensor(v):
            raise Wrong(f"return a tensor, got {type(v).__name__ if not isinstance(v, str) else v}")
        if tuple(v.shape) != tuple(sizes[a] for a in want):
            raise Wrong(shape_hint(tuple(v.shape), want, sizes))
        if v.is_complex():
            raise Wrong("return real numbers, got a complex tensor")
        if v.dtype != torch.bool and not torch.isfinite(v.double()).all():
            bad = tuple(int(i) for i in (~torch.isfinite(v.double())).nonzero()[0])
            raise Wrong(f"your output has a NaN or an infinity at index {bad} (on the prepared input {case!r})")
        return v

    @staticmethod
    def mistakes(got: torch.Tensor, candidates: dict[str, torch.Tensor]) -> None:
        """Wrong with the hint of the first known mistake whose result the output equals."""
        for hint, value in candidates.items():
            if close(got, value):
                raise Wrong(hint)

    @staticmethod
    def expect(got: torch.Tensor, ref: torch.Tensor, case: str) -> None:
        """Wrong, naming the largest difference, unless ``got`` equals the reference ``ref``."""
        if not close(got, ref):
            raise Wrong(f"wrong values on the prepared input {case!r}: {_describe_difference(got, ref)}")
