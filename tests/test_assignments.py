"""The assignments (``assignments/``, the ``sinkutils.exercises`` package, ``sinkutils.assign``).

Every check accepts the book's reference and recognises realistic wrong implementations by their hint; the
student edition holds stubs only and executes under papermill; the instructor edition executes with every check
passing. The grader's tests are in ``tests/test_grader.py``.
"""
import copy
import math
import os

import nbformat
import pytest
import torch

from sinkutils import (assign, attention, book, exercises, interventions, measure, metrics, models, project,
                       structure, variants)
from sinkutils.exercises import (ch1_sink, ch2_variance, ch3_interventions, ch4_super_neurons, ch5_disparity,
                                 ch6_headwise)
from limits import STALL

needs_model = pytest.mark.skipif(not (models.CHECKPOINTS / "sinkbook-tiny" / "config.json").exists(),
                                 reason="embedded model sinkbook-tiny not trained yet")


# --------------------------------------------------------------------------------------------------------------
# The checks: the reference passes, each realistic mistake fails with its own hint
# --------------------------------------------------------------------------------------------------------------

def _headwise_reference(o, weight, eps):
    norm = variants.HeadRMSNorm(*weight.shape, eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(o)


#: the book's reference for each exercise, called with the exercise's signature
REFERENCES = {
    "attention_to_first": lambda q, k: attention.softmax_stats(q, k, None, q.shape[-1] ** -0.5, 0, ("attn.sink",))["attn.sink"],
    "sink_rate": metrics.sink_rate,
    "dimension_variance": metrics.dimension_variance,
    "predicted_variance": lambda p, v: measure.aggregation_prediction(p, v)[0],
    "mask_intervention": lambda m, k: interventions.block_row(m, k, m.shape[-2], m.shape[-1], m.device),
    "amplified": interventions.amplified,
    "norm_scaled": interventions.norm_scaled,
    "kendall_tau": metrics.kendall_tau,
    "super_neurons": lambda g, u, z: structure.ffn_norms_of(g, u, z_threshold=z).super_neurons,
    "dominance_ratio": metrics.dominance_ratio,
    "mean_pairwise_cosine": metrics.mean_pairwise_cosine,
    "headwise_rmsnorm": _headwise_reference,
    "sigmoid_attention": lambda q, k: attention.sigmoid_weights(q, k, None, q.shape[-1] ** -0.5),
    "effective_rank": metrics.effective_rank,
}

# Wrong implementations as students write them, each with (part of) the hint its check must give.
T_ = lambda x: x.transpose(-1, -2)  # noqa: E731


def causal(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


def attn_scores(q, k, scale=True):
    return q @ T_(k) / (math.sqrt(q.shape[-1]) if scale else 1.0)


WRONG = {
    "attention_to_first": {
        "causal mask missing": lambda q, k: attn_scores(q, k).softmax(-1)[..., 0],
        "forgot the scale": lambda q, k: attn_scores(q, k, False).masked_fill(~causal(q.shape[-2]), -math.inf).softmax(-1)[..., 0],
        "normalise over the keys": lambda q, k: attn_scores(q, k).masked_fill(~causal(q.shape[-2]), -math.inf).softmax(-2)[..., 0],
        "(row 0 of the map)": lambda q, k: attn_scores(q, k).masked_fill(~causal(q.shape[-2]), -math.inf).softmax(-1)[..., 0, :],
        "whole attention map": lambda q, k: attn_scores(q, k).masked_fill(~causal(q.shape[-2]), -math.inf).softmax(-1),
    },
    "sink_rate": {
        "leave out the queries before min_query": lambda s, eps, mq: (s.mean(dim=(1, 3)) > eps).float().mean(-1),
        "you thresholded every single weight": lambda s, eps, mq: (s[..., mq:] > eps).float().mean(dim=(1, 2, 3)),
        "you averaged the heads first": lambda s, eps, mq: (s[..., mq:].mean(dim=(1, 2, 3)) > eps).float(),
        "a rate is a fraction": lambda s, eps, mq: (s[..., mq:].mean(dim=(1, 3)) > eps).float().sum(-1),
        "threshold each head's mean": lambda s, eps, mq: (s[..., mq:].mean(dim=(1, 3)) > eps).float(),
        "use the epsilon and min_query arguments": lambda s, eps, mq: (s[..., 4:].mean(dim=(1, 3)) > 0.3).float().mean(-1),
    },
    "dimension_variance": {
        "population variance": lambda x: x.var(dim=-1),
        "standard deviation": lambda x: x.std(dim=-1, unbiased=False),
        "subtract each vector's own mean": lambda x: x.pow(2).mean(dim=-1),
        "you reduced over heads instead of head_dim": lambda x: x.var(dim=-2, unbiased=False),
    },
    "predicted_variance": {
        "the weights enter squared": lambda p, v: (p * v[..., None, :]).sum(-1),
        "multiply each squared weight": lambda p, v: p.pow(2).sum(-1),
        "sum over the keys": lambda p, v: (p.pow(2) * v[..., None, :]).mean(-1),
    },
}


def _column(mask, k):
    m = mask.clone(); m[:, k] = False; m[k, k] = True; return m
def _noself(mask, k):
    m = mask.clone(); m[k] = False; return m
def _zero(mask, k):
    m = mask.clone(); m[k] = False; m[k, 0] = True; return m
def _inplace(mask, k):
    mask[k] = False; mask[k, k] = True; return mask
def _scratch(mask, k):
    m = torch.ones(mask.shape, dtype=torch.bool).tril(); m[k] = False; m[k, k] = True; return m
def _float(mask, k):
    m = mask.clone(); m[k] = False; m[k, k] = True; return m.float()


WRONG["mask_intervention"] = {"you edited column": _column, "sees no key at all": _noself,
                              "attend to itself (key": _zero, "changed its input tensor in place": _inplace,
                              "rows other than": _scratch, "return a bool mask": _float}
mean = lambda o, d=-1: o.mean(dim=d, keepdim=True)
WRONG["amplified"] = {
    "lam * o scales the mean too": lambda o, lam: lam * o,
    "you multiplied them by lam**2": lambda o, lam: mean(o) + lam ** 2 * (o - mean(o)),
    "add the mean back": lambda o, lam: lam * (o - mean(o)),
    "each vector's own mean over head_dim": lambda o, lam: mean(o, -2) + lam * (o - mean(o, -2)),
}


def _positive_mean(o, lam):
    m, sq = mean(o), o.pow(2).mean(-1, keepdim=True)
    return o + (torch.sqrt(m ** 2 + (lam ** 2 - 1) * sq) - m)


WRONG["norm_scaled"] = {
    "lam * o scales the deviations too": lambda o, lam: lam * o,
    "the norm must become lam * |o|": lambda o, lam: o + (lam - 1) * mean(o),
    "keep the mean on its own side": _positive_mean,
}


def _signs(x):
    return torch.sign(x[..., :, None] - x[..., None, :])


def _pearson(x, y):
    x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))


WRONG["kendall_tau"] = {
    "depends only on the order": _pearson,
    "that is tau-a": lambda x, y: (_signs(x) * _signs(y)).sum((-1, -2)) / (x.shape[-1] * (x.shape[-1] - 1)),
    "Spearman": lambda x, y: _pearson(x.argsort(-1).argsort(-1).float(), y.argsort(-1).argsort(-1).float()),
    "sign is flipped": lambda x, y: -(_signs(x) * _signs(y)).sum((-1, -2)) / torch.sqrt((_signs(x) != 0).sum((-1, -2)) * (_signs(y) != 0).sum((-1, -2))),
    "you also reduced over rows": lambda x, y: (_signs(x) * _signs(y)).sum() / torch.sqrt((_signs(x) != 0).sum() * (_signs(y) != 0).sum()),
}


def _robust(s):
    med = s.median(); return (s - med) / (1.4826 * (s - med).abs().median())


def _pick(score, z, zt):
    idx = (z > zt).nonzero().flatten(); return idx[score[idx].argsort(descending=True)].tolist()


WRONG["super_neurons"] = {
    "column norms": lambda g, u, zt: _pick(g.norm(dim=0) * u.norm(dim=0), _robust(g.norm(dim=0) * u.norm(dim=0)), zt),
    "use the robust z-score": lambda g, u, zt: _pick(g.norm(dim=1) * u.norm(dim=1), ((g.norm(dim=1) * u.norm(dim=1)) - (g.norm(dim=1) * u.norm(dim=1)).mean()) / (g.norm(dim=1) * u.norm(dim=1)).std(), zt),
    "a neuron large in W_up alone": lambda g, u, zt: _pick(g.norm(dim=1), _robust(g.norm(dim=1)), zt),
    "in the wrong order": lambda g, u, zt: (_robust(g.norm(dim=1) * u.norm(dim=1)) > zt).nonzero().flatten().tolist(),
    "not a mask": lambda g, u, zt: _robust(g.norm(dim=1) * u.norm(dim=1)) > zt,
    "use the z_threshold argument": lambda g, u, zt: _pick(g.norm(dim=1) * u.norm(dim=1), _robust(g.norm(dim=1) * u.norm(dim=1)), 8.0),
}
WRONG["dominance_ratio"] = {
    "take absolute values before the max": lambda x: x.amax(-1) / x.abs().mean(-1),
    "not the sum": lambda x: x.abs().amax(-1) / x.abs().sum(-1),
    "upside down": lambda x: x.abs().mean(-1) / x.abs().amax(-1),
    "you reduced over tokens instead of width": lambda x: x.abs().amax(-2) / x.abs().mean(-2),
}


def _gram(x):
    u = x / x.norm(dim=-1, keepdim=True); return u @ T_(u)


WRONG["mean_pairwise_cosine"] = {
    "pairs of a vector with itself": lambda x: _gram(x).mean((-1, -2)),
    "divide each dot product": lambda x: ((x @ T_(x)).sum((-1, -2)) - (x * x).sum((-1, -2))) / (x.shape[-2] * (x.shape[-2] - 1)),
    "you compared the columns": lambda x: (_gram(T_(x)).sum((-1, -2)) - x.shape[-1]) / (x.shape[-1] * (x.shape[-1] - 1)),
    "not only the first vector": lambda x: _gram(x)[..., 0, 1:].mean(-1),
}
rms = lambda o, d, eps: torch.sqrt(o.pow(2).mean(dim=d, keepdim=True) + eps)
WRONG["headwise_rmsnorm"] = {
    "normalise each head separately": lambda o, w, eps: o / rms(o, (-2, -1), eps) * w,
    "not over the heads": lambda o, w, eps: o / rms(o, -2, eps) * w,
    "multiply by the gain": lambda o, w, eps: o / rms(o, -1, eps),
    "eps goes inside the square root": lambda o, w, eps: o / (o.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w,
    "NaN where a head's output is all zeros": lambda o, w, eps: o / o.pow(2).mean(-1, keepdim=True).sqrt() * w,
    "does not subtract the mean": lambda o, w, eps: (o - mean(o)) / rms(o - mean(o), -1, eps) * w,
}


def _sig(q, k, bias, scale=True, mask=True):
    s = torch.sigmoid(attn_scores(q, k, scale) - bias)
    return s.masked_fill(~causal(q.shape[-2]), 0.0) if mask else s


WRONG["sigmoid_attention"] = {
    "subtract the bias log T": lambda q, k: _sig(q, k, 0.0),
    "number of keys each query sees": lambda q, k: _sig(q, k, torch.arange(1, q.shape[-2] + 1)[:, None].log()),
    "causal mask missing": lambda q, k: _sig(q, k, math.log(q.shape[-2]), mask=False),
    "rows sum to 1": lambda q, k: attn_scores(q, k).masked_fill(~causal(q.shape[-2]), -math.inf).softmax(-1),
    "scale the scores": lambda q, k: _sig(q, k, math.log(q.shape[-2]), scale=False),
}


def _entropy(p):
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


WRONG["effective_rank"] = {
    "take exp of the entropy": lambda x: _entropy(torch.linalg.svdvals(x) / torch.linalg.svdvals(x).sum(-1, keepdim=True)),
    "not their squares": lambda x: torch.exp(_entropy(torch.linalg.svdvals(x) ** 2 / (torch.linalg.svdvals(x) ** 2).sum(-1, keepdim=True))),
    "smooth count": lambda x: torch.linalg.matrix_rank(x).float(),
    "0 * log 0 = NaN": lambda x: torch.exp(-(torch.linalg.svdvals(x) / torch.linalg.svdvals(x).sum(-1, keepdim=True) * (torch.linalg.svdvals(x) / torch.linalg.svdvals(x).sum(-1, keepdim=True)).log()).sum(-1)),
}


CHAPTER_MODULES = [ch1_sink, ch2_variance, ch3_interventions, ch4_super_neurons, ch5_disparity, ch6_headwise]


def test_each_chapter_module_holds_its_assignments_exercises_and_their_checks():
    assert [m.CHAPTER for m in CHAPTER_MODULES] == exercises.chapters()
    for module in CHAPTER_MODULES:
        for ex in exercises.of_chapter(module.CHAPTER):
            assert ex.diagnose.__module__ == module.__name__, ex.name
            check = getattr(exercises, f"check_{ex.name}")
            assert check is getattr(module, f"check_{ex.name}") and f"check_{ex.name}" in exercises.__all__
    assert sorted(n for n in exercises.__all__ if n.startswith("check_")) == \
        sorted(f"check_{name}" for name in exercises.EXERCISES)


def test_every_exercise_has_a_reference_and_at_least_three_mistakes():
    assert set(REFERENCES) == set(exercises.EXERCISES) == set(WRONG)
    assert all(len(WRONG[name]) >= 3 for name in WRONG)
    for chapter in exercises.chapters():
        assert len(exercises.of_chapter(chapter)) >= 2, chapter


@pytest.mark.parametrize("name", list(exercises.EXERCISES))
def test_check_accepts_the_reference(name):
    result = exercises.run(name, REFERENCES[name])
    assert result.passed, result.message


@pytest.mark.parametrize("name, hint", [(n, h) for n, ws in WRONG.items() for h in ws])
def test_check_rejects_a_realistic_mistake_with_its_hint(name, hint):
    result = exercises.run(name, WRONG[name][hint])
    assert not result.passed
    assert hint in result.message, result.message


def _solutions(path) -> dict:
    """The functions an assignment's solution cells define (the instructor's answers)."""
    namespace = {"torch": torch, "math": math}
    for cell in nbformat.read(path, as_version=4).cells:
        if "solution" in cell.metadata.get("tags", []):
            exec(cell.source, namespace)
    return namespace


@pytest.mark.parametrize("path", assign.sources(), ids=lambda p: p.stem)
def test_instructor_solutions_pass_their_checks(path):
    solutions = _solutions(path)
    for ex in exercises.of_chapter(path.stem):
        result = exercises.run(ex.name, solutions[ex.name])
        assert result.passed, (ex.name, result.message)


def test_check_prints_passes_raises_with_the_hint_and_tolerates_a_stub(capsys):
    assert exercises.check_dominance_ratio(REFERENCES["dominance_ratio"])
    assert "\u2714 dominance_ratio: correct on the prepared input" in capsys.readouterr().out

    def stub(x):
        raise NotImplementedError("write the body of dominance_ratio")

    assert not exercises.check_dominance_ratio(stub)  # falsy, so `if check(...)` skips the cell's use of it
    assert "dominance_ratio: not implemented yet" in capsys.readouterr().out
    with pytest.raises(exercises.ExerciseFailed, match="take absolute values before the max"):
        exercises.check_dominance_ratio(WRONG["dominance_ratio"]["take absolute values before the max"])

    def crashes(x):
        return x.abs().amax(-1) / x.abs().mean(-2)  # shapes (2, 5) and (2, 16) do not broadcast

    with pytest.raises(exercises.ExerciseFailed, match=r"raised RuntimeError: .* \(on the prepared input 'hidden states'\)") as info:
        exercises.check_dominance_ratio(crashes)
    assert isinstance(info.value.__cause__, RuntimeError)  # the student's own traceback stays visible
    assert exercises.check_dominance_ratio.__doc__.startswith("Check your ``dominance_ratio`` (chapter 05_disparity)")


def test_outputs_survive_the_trip_from_kernel_to_grader(tmp_path):
    """What the grading cell saves loads with weights_only=True and judges as in-process."""
    for name, fn in (("sink_rate", REFERENCES["sink_rate"]), ("super_neurons", REFERENCES["super_neurons"]),
                     ("kendall_tau", WRONG["kendall_tau"]["Spearman"])):
        outputs = {case: {k: v for k, v in out.items() if k != "exception"}
                   for case, out in exercises.collect(name, fn).items()}
        torch.save(outputs, tmp_path / "o.pt")
        loaded = torch.load(tmp_path / "o.pt", weights_only=True)
        assert exercises.judge(name, loaded) == exercises.run(name, fn)
    import numpy as np

    plain = exercises.plain({"a": np.arange(3), "b": (np.float32(1.5), [np.int64(2)]), "c": object()})
    assert torch.equal(plain["a"], torch.arange(3)) and plain["b"] == (1.5, [2])
    assert plain["c"] == "<unsupported builtins.object>"


def test_a_submission_that_mutates_its_input_is_told_so():
    result = exercises.run("amplified", lambda o, lam: o.sub_(o.mean(-1, keepdim=True)).mul_(lam)
                           .add_(o.mean(-1, keepdim=True)))
    assert not result.passed and "changed its input tensor in place" in result.message


# --------------------------------------------------------------------------------------------------------------
# One source, two editions
# --------------------------------------------------------------------------------------------------------------

def test_stub_keeps_signature_and_docstring_and_drops_the_body():
    source = (
        "@torch.no_grad()\n"
        "def f(x: torch.Tensor,\n"
        "      y: int = 2) -> torch.Tensor:\n"
        '    """Doc of f.\n\n    More."""\n'
        "    secret = x * y  # the answer\n"
        "    return secret\n\n\n"
        "def g(x):\n"
        "    'One line.'\n"
        "    return x\n")
    stub = assign.stub_source(source)
    assert stub == ("@torch.no_grad()\n"
                    "def f(x: torch.Tensor,\n"
                    "      y: int = 2) -> torch.Tensor:\n"
                    '    """Doc of f.\n\n    More."""\n'
                    '    raise NotImplementedError("write the body of f")\n\n\n'
                    "def g(x):\n"
                    "    'One line.'\n"
                    '    raise NotImplementedError("write the body of g")')
    namespace = {"torch": torch}
    exec(stub, namespace)
    with pytest.raises(NotImplementedError, match="write the body of g"):
        namespace["g"](1)


@pytest.mark.parametrize("source, error", [
    ("import torch\n\ndef f(x):\n    'Doc.'\n    return x", "only function definitions; line 1"),
    ("def f(x):\n    return x", "needs a docstring"),
    ("# nothing here", "at least one function"),
])
def test_stub_refuses_what_could_leak_or_confuse(source, error):
    with pytest.raises(ValueError, match=error):
        assign.stub_source(source)


@pytest.mark.parametrize("path", assign.sources(), ids=lambda p: p.stem)
def test_student_edition_has_stubs_and_no_solution_code(path):
    source = nbformat.read(path, as_version=4)
    student = assign.student_edition(source)
    assert student.metadata["sinkbook"] == {"assignment": path.stem, "edition": "student"}
    assert len(student.cells) == len(source.cells)
    for cell, stub in zip(source.cells, student.cells):
        assert not stub.get("outputs")
        if "solution" not in cell.metadata.get("tags", []):
            assert stub.source == cell.source  # everything but the solutions reaches the student as written
            continue
        assert stub.metadata["tags"] == ["exercise"]
        docstring_end = cell.source.index('"""', cell.source.index('"""') + 3) + 3
        body = [line.strip() for line in cell.source[docstring_end:].splitlines() if line.strip()]
        assert body
        for line in body:
            assert line not in stub.source, f"{path.stem}: solution line {line!r} is in the student edition"
    namespace = {"torch": torch, "math": math}
    for cell in student.cells:
        if "exercise" in cell.metadata.get("tags", []):
            exec(cell.source, namespace)
    for ex in exercises.of_chapter(path.stem):
        assert exercises.run(ex.name, namespace[ex.name]).message == exercises.NOT_IMPLEMENTED


def test_committed_student_editions_are_up_to_date(tmp_path):
    assert assign.stale_student_editions() == [], "run: python -m sinkutils.assign student"
    assert assign.stale_student_editions(tmp_path) == [p.stem for p in assign.sources()]
    assert assign.main(["student", "--out", str(tmp_path)]) == 0
    assert assign.stale_student_editions(tmp_path) == []
    assert assign.main(["student", "--check", "--out", str(tmp_path)]) == 0


def test_every_source_opens_with_the_shared_cells():
    """Cells 1-4 of every source are ``assign.opening_cells`` (how it works, set-up, parameters, load), and
    the set-up cell is the chapters' own."""
    assert assign.stale_openings() == [], "run: python -m sinkutils.assign student"
    opening = assign.opening_cells()
    for chapter in sorted((project.ROOT / "chapters").glob("[0-9][0-9]_*.ipynb")):
        setup = next(c for c in nbformat.read(chapter, as_version=4).cells if c.cell_type == "code")
        assert setup.source == opening[1].source, f"{chapter.stem}: the assignments' set-up cell is the chapters'"
    for path in assign.sources():
        cells = nbformat.read(path, as_version=4).cells
        assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# Assignment ")
        assert cells[1:5] == assign.opening_cells(path.stem), path.stem
        model = assign.MODELS.get(path.stem, assign.DEFAULT_MODEL)  # the model the assignment's checks run on
        assert f'model_name = "{model}"' in cells[3].source and cells[3].metadata.tags == ["parameters"]
        assert not any(c.get("id") in assign.OPENING_IDS for c in cells[5:])
    assert {assign.MODELS.get(p.stem, assign.DEFAULT_MODEL) for p in assign.sources()} == {"sinkbook-tiny",
                                                                                          "smollm2-135m"}


def test_with_opening_inserts_the_shared_cells_or_replaces_an_edited_copy():
    source = nbformat.read(assign.sources()[0], as_version=4)
    bare = copy.deepcopy(source)
    bare.cells = [c for c in bare.cells if c.id not in assign.OPENING_IDS]
    assert assign.with_opening(bare) == source  # a new assignment: written after its title
    edited = copy.deepcopy(source)
    edited.cells[2].source += "\n# an edit"
    edited.cells.append(edited.cells.pop(4))     # the load cell moved to the end
    assert assign.with_opening(edited) == source


def test_sources_are_laid_out_as_the_tools_expect():
    assert [p.stem for p in assign.sources()] == exercises.chapters() == book.assignments()
    for path in assign.sources():
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert nb.metadata["sinkbook"] == {"assignment": path.stem, "edition": "instructor"}
        assert "parameters" in code[1].metadata.get("tags", [])
        assert not any(c.get("outputs") for c in code), f"{path.stem} is committed with outputs"
        tagged = [(c.metadata.get("tags", [""])[0], c.source) for c in code if c.metadata.get("tags")][1:]
        expected = [t for ex in exercises.of_chapter(path.stem) for t in ("solution", "check")]
        assert [t for t, _ in tagged] == expected
        for ex, (solution, check) in zip(exercises.of_chapter(path.stem), zip(tagged[::2], tagged[1::2])):
            assert f"def {ex.name}(" in solution[1]
            assert check[1].startswith(f"if exercises.check_{ex.name}({ex.name}):")


def _papermill(path, out, **kw):
    import papermill

    os.environ["TQDM_DISABLE"] = "1"
    return papermill.execute_notebook(str(path), str(out), kernel_name="python3", cwd=str(project.ROOT),
                                      progress_bar=False, execution_timeout=300, request_save_on_cell_execute=False, **kw)


def _check_outputs(nb) -> list[str]:
    return ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells if "check" in c.metadata.get("tags", [])]


@needs_model
@pytest.mark.parametrize("name", [p.stem for p in assign.sources()])
def test_student_edition_executes_with_every_exercise_not_implemented_yet(name, tmp_path):
    nb = _papermill(assign.STUDENT / f"{name}.ipynb", tmp_path / "out.ipynb")
    outputs = _check_outputs(nb)
    assert len(outputs) == len(exercises.of_chapter(name))
    assert all("not implemented yet" in out for out in outputs), outputs


@needs_model
@pytest.mark.parametrize("name", book.assignments())
def test_instructor_edition_executes_with_every_check_passing(name, tmp_path):
    book.execute(name, "cpu", tmp_path, timeout=600, folder="assignments", stall_timeout=STALL)  # a hang guard
    outputs = _check_outputs(nbformat.read(tmp_path / f"{name}.ipynb", as_version=4))
    assert [out.splitlines()[0] for out in outputs] == [
        f"\u2714 {ex.name}: {exercises.run(ex.name, REFERENCES[ex.name]).message}" for ex in exercises.of_chapter(name)]


def test_the_sandbox_reads_the_model_cache_it_can(tmp_path, monkeypatch):
    """Assignments 2 and 3 run on SmolLM2: the grader binds the dequantised models' cache read-only into the sandbox
    (its 256 MB /tmp cannot hold the 540 MB rebuild) and names it there, unless a grader running as root would run
    the submission as nobody on files only root can read."""
    cache = tmp_path / "cache"
    (cache / "smollm2-135m-x").mkdir(parents=True)
    weights = cache / "smollm2-135m-x" / "model.safetensors"
    weights.write_bytes(b"w")
    monkeypatch.setenv("SINKBOOK_CACHE", str(cache))
    weights.chmod(0o644)
    assert assign._model_cache() == cache and cache in assign._readonly_paths()
    assert assign._runner_env("/tmp")["SINKBOOK_CACHE"] == str(cache)
    weights.chmod(0o600)
    assert assign._model_cache() == (None if assign._as_root() else cache)
    monkeypatch.setenv("SINKBOOK_CACHE", str(tmp_path / "none"))
    assert assign._model_cache() is None and "SINKBOOK_CACHE" not in assign._runner_env("/tmp")
