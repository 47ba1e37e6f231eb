"""Assignments: one source per chapter, two editions, and a grader (``book/assignments.md`` says how to use them).

    python -m sinkutils.assign student                   # assignments/student/NN_*.ipynb from assignments/NN_*.ipynb
    python -m sinkutils.assign student --check           # exit 1 when the committed student editions are stale
    python -m sinkutils.assign grade SUBMISSIONS --out grades.csv --timeout 120
    python -m sinkutils.assign list                      # every assignment's exercises

The source ``assignments/NN_*.ipynb`` is the instructor edition: each exercise is a cell tagged ``solution``
(function definitions with docstrings) and a cell tagged ``check`` that calls ``sinkutils.exercises``. The
student edition keeps every cell but turns each solution into a stub: the same signature and docstring, and
a body that raises NotImplementedError. The checks print "not implemented yet" for a stub, so the student
edition runs top to bottom.

Grading trusts outputs only. Each submission runs in a fresh kernel (papermill, errors allowed so that one
broken cell does not hide the other exercises), then a cell the grader appends calls the submission's
functions on the exercises' prepared inputs and saves what they return. The grader loads that file
(``torch.load(weights_only=True)``: data, never code) and judges it in its own process with
``exercises.judge``; nothing the notebook prints counts.

``sinkutils.exercises`` (torch, transformers: seconds to import) is imported where it is used, so that the
per-submission runner process starts in a fraction of a second.
"""
from __future__ import annotations

import argparse
import ast
import copy
import csv
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import nbformat

if TYPE_CHECKING:
    from sinkutils.exercises import Result

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "assignments"
STUDENT = SOURCES / "student"
CSV_FIELDS = ("student", "exercise", "result", "message")
#: largest outputs file the grader loads (the prepared inputs are tiny; anything larger is not an answer)
MAX_OUTPUTS_BYTES = 32 * 2 ** 20


def sources(root: Path = SOURCES) -> list[Path]:
    """The instructor editions, ``NN_name.ipynb``, in order."""
    return sorted(root.glob("[0-9][0-9]_*.ipynb"))


# ------------------------------------------------------------------------------------------------------------
# The student edition
# ------------------------------------------------------------------------------------------------------------

def stub_source(source: str) -> str:
    """A solution cell's functions with their bodies replaced by ``raise NotImplementedError``: the signature
    and docstring stay (they are the exercise). A solution cell holds only documented function definitions;
    anything else is a ValueError, so no solution code can slip into the student edition."""
    tree = ast.parse(source)
    lines = source.splitlines()
    stubs = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            raise ValueError(f"a solution cell may hold only function definitions; line {node.lineno} is "
                             f"{ast.get_source_segment(source, node)!r:.60}: move it to another cell")
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            raise ValueError(f"solution function {node.name!r} needs a docstring: it is what the student reads")
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        indent = " " * doc.col_offset
        stubs.append("\n".join(lines[start - 1:doc.end_lineno]) +
                     f'\n{indent}raise NotImplementedError("write the body of {node.name}")')
    if not stubs:
        raise ValueError("a solution cell must define at least one function")
    return "\n\n\n".join(stubs)


def student_edition(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The student edition of an instructor edition: solution cells become stubs (tagged ``exercise``), and
    every output is cleared."""
    out = copy.deepcopy(nb)
    for cell in out.cells:
        tags = cell.metadata.get("tags", [])
        if "solution" in tags:
            cell.source = stub_source(cell.source)
            cell.metadata["tags"] = ["exercise" if t == "solution" else t for t in tags]
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    out.metadata.setdefault("sinkbook", {})["edition"] = "student"
    return out


def write_student_editions(out_dir: Path = STUDENT, root: Path = SOURCES) -> list[Path]:
    """Write the student edition of every source into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources(root):
        path = out_dir / src.name
        nbformat.write(student_edition(nbformat.read(src, as_version=4)), path)
        written.append(path)
    return written


def stale_student_editions(out_dir: Path = STUDENT, root: Path = SOURCES) -> list[str]:
    """Names of the student editions in ``out_dir`` that are missing or differ from what the sources give."""
    stale = []
    for src in sources(root):
        want = json.loads(nbformat.writes(student_edition(nbformat.read(src, as_version=4))))
        path = out_dir / src.name
        if not path.exists() or json.loads(path.read_text()) != want:
            stale.append(src.stem)
    return stale


# ------------------------------------------------------------------------------------------------------------
# Inside the submission's kernel: the cell the grader appends
# ------------------------------------------------------------------------------------------------------------

def collect_outputs(assignment: str, namespace: dict, path: str) -> None:
    """Run the namespace's function of every exercise of ``assignment`` on the prepared inputs and save the
    outputs to ``path`` (None for an exercise whose function is missing). Saved after each exercise, so a
    function that hangs leaves the earlier ones graded."""
    import torch

    from sinkutils import exercises

    found: dict[str, dict | None] = {}
    for ex in exercises.of_chapter(assignment):
        fn = namespace.get(ex.name)
        if callable(fn):
            found[ex.name] = {case: {k: v for k, v in out.items() if k != "exception"}
                              for case, out in exercises.collect(ex.name, fn).items()}
        else:
            found[ex.name] = None
        torch.save(found, path + ".part")
        os.replace(path + ".part", path)


def _grading_cell(assignment: str, path: Path) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(
        f"import sinkutils.assign\nsinkutils.assign.collect_outputs({assignment!r}, globals(), {str(path)!r})",
        metadata={"tags": ["grader"]})


# ------------------------------------------------------------------------------------------------------------
# The grader
# ------------------------------------------------------------------------------------------------------------

def _kill_tree(pid: int) -> None:
    """Kill a process and every process below it (the kernel is a grandchild in its own session)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def _first_error(nb: nbformat.NotebookNode | None) -> str | None:
    """The first error a cell of the submission raised (its own cells, not the checks), as 'Type: message'."""
    for cell in (nb.cells if nb is not None else []):
        if cell.cell_type != "code" or {"check", "grader"} & set(cell.metadata.get("tags", [])):
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"{out.get('ename')}: {out.get('evalue')}"[:200]
    return None


def _environment(submissions: Path, base: Path) -> dict[str, str]:
    """The kernel's environment: this one without anything naming the submissions folder, HOME and TMPDIR in
    the submission's own temporary folder, the Hugging Face cache where it was."""
    env = {k: v for k, v in os.environ.items() if str(submissions) not in v and k not in ("PWD", "OLDPWD")}
    env.setdefault("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    for name in ("home", "tmp"):
        (base / name).mkdir()
    env.update(HOME=str(base / "home"), TMPDIR=str(base / "tmp"), TQDM_DISABLE="1", MPLBACKEND="agg")
    return env


def grade_notebook(nb: nbformat.NotebookNode, assignment: str, timeout: float,
                   submissions: Path | None = None) -> list[Result]:
    """Execute one submission in isolation (see ``book/assignments.md``) and judge its outputs: one Result per
    exercise of ``assignment``. A crash, a hang or a dead kernel fails the exercises not graded by then."""
    from sinkutils import exercises

    names = [ex.name for ex in exercises.of_chapter(assignment)]
    base = Path(tempfile.mkdtemp(prefix="sinkbook-grade-"))
    try:
        work, private = base / "work", base / "out"
        work.mkdir()
        private.mkdir(mode=0o700)
        nbformat.write(nb, work / "submission.ipynb")
        outputs_path = private / f"outputs-{secrets.token_hex(16)}.pt"
        run = copy.deepcopy(nb)
        run.cells.append(_grading_cell(assignment, outputs_path))
        run.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        env = _environment(submissions or work, base)
        cmd = [sys.executable, "-m", "sinkutils.assign", "_execute", "--cwd", str(work), "--out", str(private),
               "--timeout", str(timeout)]
        with open(private / "log.txt", "w") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                    env=env, start_new_session=True)
            try:
                proc.communicate(nbformat.writes(run).encode(), timeout=timeout)
                stopped = None
            except subprocess.TimeoutExpired:
                stopped = f"timed out after {timeout:g} s"
            finally:
                _kill_tree(proc.pid)
                proc.wait()
        status = _read_json(private / "status.json")
        if stopped is None and status is None:
            tail = (private / "log.txt").read_text(errors="replace").strip().splitlines()[-1:] or [""]
            stopped = f"crashed: the notebook runner exited with code {proc.returncode} ({tail[0][:160]})"
        elif stopped is None and status["status"] != "ok":
            stopped = f"crashed: {status['detail']}"
        executed = nbformat.read(private / "executed.ipynb", as_version=4) if (private / "executed.ipynb").exists() else None
        found, unreadable = _load_outputs(outputs_path)
        results = []
        for name in names:
            if name in found and found[name] is None:
                err = _first_error(executed)
                results.append(exercises.Result(name, False, f"no function named {name} was defined" +
                                                (f" (a cell raised {err})" if err else "")))
            elif name in found:
                results.append(_judge(name, found[name]))
            else:
                results.append(exercises.Result(name, False, unreadable or stopped or "not graded: the grading cell "
                                                "did not run"))
        return results
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_outputs(path: Path) -> tuple[dict, str | None]:
    """The outputs the grading cell saved, or ({}, why not) when they are unreadable (absent is not an error)."""
    import torch

    if not path.exists():
        return {}, None
    if path.stat().st_size > MAX_OUTPUTS_BYTES:
        return {}, f"the outputs file is over {MAX_OUTPUTS_BYTES >> 20} MB; return results of the expected shape"
    try:
        found = torch.load(path, weights_only=True)
    except Exception as err:  # a file the submission tampered with
        return {}, f"unreadable outputs ({type(err).__name__})"
    return (found, None) if isinstance(found, dict) else ({}, "unreadable outputs (not a dict)")


def _judge(name: str, outputs) -> Result:
    from sinkutils import exercises

    if not isinstance(outputs, dict) or not all(isinstance(v, dict) for v in outputs.values()):
        return exercises.Result(name, False, "unreadable outputs")
    return exercises.judge(name, outputs)


def assignment_of(nb: nbformat.NotebookNode) -> str | None:
    """The assignment a notebook is: what its metadata says (``sinkbook.assignment``, which both editions carry),
    else the one assignment all of whose functions it defines (a notebook saved elsewhere may lose its
    metadata); None when neither tells."""
    from sinkutils import exercises

    name = nb.metadata.get("sinkbook", {}).get("assignment")
    if isinstance(name, str) and name in exercises.chapters():
        return name
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    defines = [ch for ch in exercises.chapters()
               if all(re.search(rf"^def {ex.name}\(", code, re.M) for ex in exercises.of_chapter(ch))]
    return defines[0] if len(defines) == 1 else None


def grade(submissions: Path, out_csv: Path, timeout: float = 120, assignment: str | None = None) -> list[dict]:
    """Grade every ``*.ipynb`` in ``submissions`` (the file name, without .ipynb, is the student) one after the
    other, each in isolation; write the CSV (student, exercise, result, message) when all are done."""
    from tqdm.auto import tqdm

    from sinkutils import exercises

    submissions = Path(submissions).resolve()
    if not submissions.is_dir():
        raise ValueError(f"{submissions} is not a folder of submitted notebooks")
    if assignment is not None and assignment not in exercises.chapters():
        raise ValueError(f"unknown assignment {assignment!r}; choose one of {exercises.chapters()}")
    paths = sorted(submissions.glob("*.ipynb"))
    if not paths:
        raise ValueError(f"no .ipynb files in {submissions}")
    # read every submission before any runs: a kernel never needs the folder, and is not told where it is
    copies = {p.stem: p.read_bytes() for p in paths}
    rows: list[dict] = []
    for student, raw in tqdm(copies.items(), desc="grading", unit="submission"):
        try:
            nb = nbformat.reads(raw.decode("utf-8"), as_version=4)
        except Exception as err:
            rows.append(dict(student=student, exercise="*", result="fail",
                             message=f"not a readable notebook ({type(err).__name__}: {str(err)[:120]})"))
            continue
        name = assignment or assignment_of(nb)
        if name is None:
            rows.append(dict(student=student, exercise="*", result="fail",
                             message="cannot tell which assignment this is: its metadata names none, and it does "
                                     f"not define the functions of exactly one; pass --assignment, one of "
                                     f"{exercises.chapters()}"))
            continue
        for r in grade_notebook(nb, name, timeout, submissions):
            rows.append(dict(student=student, exercise=r.exercise, result="pass" if r.passed else "fail",
                             message=r.message))
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    partial = out_csv.with_name(out_csv.name + ".part")
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, out_csv)
    return rows


def _execute(cwd: Path, out: Path, timeout: float) -> None:
    """The child process of ``grade_notebook``: execute the notebook given on stdin with papermill in ``cwd``,
    errors allowed; write ``executed.ipynb`` and ``status.json`` ({status: ok | dead, detail}) into ``out``."""
    import papermill

    nb = nbformat.reads(sys.stdin.read(), as_version=4)
    status = {"status": "ok", "detail": ""}
    try:
        papermill.execute_notebook(nb, str(out / "executed.ipynb"), kernel_name="python3", cwd=str(cwd),
                                   progress_bar=False, execution_timeout=int(timeout) + 1, allow_errors=True,
                                   request_save_on_cell_execute=False)
    except papermill.PapermillExecutionError:
        pass  # cells raised (allowed): the outputs file says what ran
    except Exception as err:  # the kernel died (os._exit, a segfault, out of memory) or would not start
        status = {"status": "dead", "detail": f"the kernel died or failed ({type(err).__name__}: {str(err)[:160]})"}
    (out / "status.json").write_text(json.dumps(status))


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sinkutils.assign", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("student", help="write the student editions")
    s.add_argument("--out", type=Path, default=STUDENT, help=f"folder (default {STUDENT.relative_to(ROOT)})")
    s.add_argument("--check", action="store_true", help="write nothing; exit 1 if the editions in --out are stale")
    g = sub.add_parser("grade", help="grade a folder of submitted notebooks into a CSV")
    g.add_argument("submissions", type=Path)
    g.add_argument("--out", type=Path, default=Path("grades.csv"))
    g.add_argument("--timeout", type=float, default=120, help="seconds per submission, all cells together")
    g.add_argument("--assignment", help="grade every submission as this assignment, e.g. 01_sink (default: what "
                   "each notebook's metadata says)")
    sub.add_parser("list", help="the exercises of every assignment")
    e = sub.add_parser("_execute")  # internal: the isolated child process of the grader
    e.add_argument("--cwd", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--timeout", type=float, required=True)
    args = p.parse_args(argv)
    if args.command == "student":
        if args.check:
            stale = stale_student_editions(args.out)
            if stale:
                print(f"stale student editions in {args.out}: {stale}; run python -m sinkutils.assign student")
                return 1
            print(f"student editions in {args.out} are up to date")
            return 0
        for path in write_student_editions(args.out):
            print(path)
    elif args.command == "grade":
        try:
            rows = grade(args.submissions, args.out, args.timeout, args.assignment)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        passed = sum(r["result"] == "pass" for r in rows)
        print(f"{args.out}: {passed} of {len(rows)} exercises passed, {len({r['student'] for r in rows})} students")
    elif args.command == "list":
        from sinkutils import exercises

        for chapter in exercises.chapters():
            print(chapter)
            for ex in exercises.of_chapter(chapter):
                print(textwrap.fill(ex.summary, 110, initial_indent="  ", subsequent_indent="      "))
    else:
        _execute(args.cwd, args.out, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
