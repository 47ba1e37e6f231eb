"""Assignments: one source per chapter, two editions, and a grader (``book/assignments.md`` says how to use them).

    python -m sinkutils.assign student                   # the sources' shared opening, then assignments/student/
    python -m sinkutils.assign student --check           # exit 1 when an opening or a student edition is stale
    python -m sinkutils.assign grade SUBMISSIONS --out grades.csv --timeout 120
    python -m sinkutils.assign nbgrader COURSE/          # an nbgrader course folder from the same sources
    python -m sinkutils.assign list                      # every assignment's exercises

The source ``assignments/NN_*.ipynb`` is the instructor edition: its title and introduction, the opening every
assignment shares (``opening_cells``: how the exercises work, the Colab set-up, the parameters, the imports and
the model; written into every source from here), then each exercise: a cell tagged ``solution`` (function
definitions with docstrings) and a cell tagged ``check`` that calls ``sinkutils.exercises``. The student edition
keeps every cell but turns each solution into a stub: the same signature and docstring, and a body that raises
NotImplementedError. The checks print "not implemented yet" for a stub, so the student edition runs top to
bottom.

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
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nbformat

from sinkutils.project import ROOT

if TYPE_CHECKING:
    from sinkutils.exercises import Result

SOURCES = ROOT / "assignments"
STUDENT = SOURCES / "student"
CSV_FIELDS = ("student", "exercise", "result", "message")
#: largest outputs file the grader loads (the prepared inputs are tiny; anything larger is not an answer)
MAX_OUTPUTS_BYTES = 32 * 2 ** 20


def sources(root: Path = SOURCES) -> list[Path]:
    """The instructor editions, ``NN_name.ipynb``, in order."""
    return sorted(root.glob("[0-9][0-9]_*.ipynb"))


# ------------------------------------------------------------------------------------------------------------
# The opening every assignment shares
# ------------------------------------------------------------------------------------------------------------

#: what every assignment says under its own title and introduction
HOW_IT_WORKS = """\
**How this works.** Each exercise asks for one function, defined in the code cell right under the
exercise's text; in the student edition its body is `raise NotImplementedError`, and you write it. The cell after
it checks your function on small prepared inputs against the book's reference in `sinkutils`. A wrong result
stops with a hint that names the mistake it sees (wrong axis, causal mask missing, ...); a stub says "not
implemented yet". Once the check passes, the same cell runs your function on the model named in the parameters
cell below."""
#: the model each assignment's checks run the student's functions on once they pass: what a laptop runs in a few
#: seconds and shows what the exercise is about (book/assignments.md says why). SmolLM2-135M where the exercise needs
#: the paper's structural chain (its variance outlier, a sink the mask moves); sinkbook-tiny elsewhere (loaded in a
#: fraction of a second; assignment 4's all-pairs Kendall tau over W_O is (576, 576, 576) on SmolLM2, 0.8 GB a tensor)
MODELS = {"02_variance": "smollm2-135m", "03_interventions": "smollm2-135m"}
DEFAULT_MODEL = "sinkbook-tiny"
#: sequences the checks run on, where 8 are too few: the variance amplification at lambda = 16 raises attention to k
#: 3.1x on SmolLM2's 16 rows of chapter 3, but on their first 8 alone it raises it less than the norm-only control
N_TEXTS = {"03_interventions": 16}
#: the parameters cell (papermill's ``parameters`` tag): what the functions run on once they pass
PARAMETERS = """\
model_name = {model:17}# the model your functions run on once they pass (a local folder or hub name works too)
n_texts = {n_texts:<20}# sequences of text
seq_len = 128                 # tokens per sequence, BOS included
seed = 0"""
#: the imports every check cell may use, and the model and token batch they run the student's functions on
LOAD = """\
import math

import torch
from sinkutils import data, exercises, interventions, measure, models, structure, trace

model, tokenizer = models.load(model_name)
ids = data.token_batch(tokenizer, data.python_docs(), n=n_texts, length=seq_len, seed=seed)
print(f"{model_name}: {models.n_layers(model)} layers x {model.config.num_attention_heads} heads; "
      f"{ids.shape[0]} sequences of {ids.shape[1]} tokens")"""
#: the opening cells' ids (fixed, so that a source's opening is found wherever an edit moved it)
OPENING_IDS = ("how-it-works", "set-up", "parameters", "load")


def setup_source() -> str:
    """The Colab set-up cell: the chapters' own (their first code cell, the same in every chapter and run in a
    simulated Colab by ``tests/test_colab.py``; ``sinkutils.release`` keeps its install spec)."""
    first = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))[0]
    return next(c.source for c in nbformat.read(first, as_version=4).cells if c.cell_type == "code")


def opening_cells(assignment: str | None = None) -> list[nbformat.NotebookNode]:
    """The cells every assignment has right after its title and introduction: how the exercises work, the Colab
    set-up, the parameters (with the assignment's model, ``MODELS``), and the imports with the model the checks run
    on."""
    new_md, new_code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    parameters = PARAMETERS.format(model=json.dumps(MODELS.get(assignment, DEFAULT_MODEL)),
                                   n_texts=N_TEXTS.get(assignment, 8))
    cells = [new_md(HOW_IT_WORKS), new_code(setup_source()),
             new_code(parameters, metadata={"tags": ["parameters"]}), new_code(LOAD)]
    for cell, cell_id in zip(cells, OPENING_IDS):
        cell.id = cell_id
    return cells


def with_opening(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of the source ``nb`` whose opening is ``opening_cells``: right after its first cell (the title and
    introduction), in place of any earlier copy of those cells (found by their ids)."""
    out = copy.deepcopy(nb)
    rest = [c for c in out.cells if c.get("id") not in OPENING_IDS]
    out.cells = rest[:1] + opening_cells(out.metadata.get("sinkbook", {}).get("assignment")) + rest[1:]
    return out


def stale_openings(root: Path = SOURCES) -> list[str]:
    """Names of the sources whose opening cells differ from ``opening_cells``."""
    return [src.stem for src in sources(root)
            if (nb := nbformat.read(src, as_version=4)) != with_opening(nb)]


def write_openings(root: Path = SOURCES) -> list[Path]:
    """Rewrite the opening cells of every source from ``opening_cells``; returns the sources changed."""
    changed = []
    for src in sources(root):
        nb = nbformat.read(src, as_version=4)
        want = with_opening(nb)
        if want != nb:
            nbformat.write(want, src)
            changed.append(src)
    return changed


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
# The nbgrader course
# ------------------------------------------------------------------------------------------------------------

#: points each exercise is worth in the nbgrader course
NBGRADER_POINTS = 1
NBGRADER_CONFIG = """# The nbgrader course written by `python -m sinkutils.assign nbgrader`; run nbgrader in this folder:
#   nbgrader generate_assignment 01_sink     # release/01_sink/: the student edition
#   nbgrader autograde 01_sink               # submitted/STUDENT/01_sink/01_sink.ipynb -> autograded/, gradebook.db
c = get_config()
c.CourseDirectory.course_id = "sinkbook"
c.ClearSolutions.code_stub = {"python": "raise NotImplementedError(\\"write the body\\")"}
c.Execute.timeout = 600  # seconds per cell: the set-up cell loads the model
"""


def solution_regions(source: str) -> str:
    """A solution cell with each function's body (what follows its docstring) between nbgrader's
    ``### BEGIN SOLUTION`` and ``### END SOLUTION``, so that ``nbgrader generate_assignment`` keeps the signature
    and docstring, as the student edition does. Refuses what ``stub_source`` refuses."""
    stub_source(source)
    lines = source.splitlines()
    for node in reversed(ast.parse(source).body):
        indent = " " * node.body[0].col_offset
        lines.insert(node.end_lineno, f"{indent}### END SOLUTION")
        lines.insert(node.body[0].end_lineno, f"{indent}### BEGIN SOLUTION")
    return "\n".join(lines)


def _nbgrader(cell: nbformat.NotebookNode, grade_id: str, *, solution=False, grade=False, points=None):
    cell.metadata["nbgrader"] = {"grade": grade, "grade_id": grade_id, "locked": not solution,
                                 "schema_version": 3, "solution": solution, **({"points": points} if grade else {})}
    return cell


def nbgrader_source(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The nbgrader source of an instructor edition: solution cells with solution regions, check cells locked,
    and after each check an autograded test cell (``NBGRADER_POINTS`` points) that asserts the same
    ``sinkutils.exercises`` check."""
    out = copy.deepcopy(nb)
    out.cells = []
    for cell in nb.cells:
        cell = copy.deepcopy(cell)
        tags = cell.metadata.get("tags", [])
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        if "solution" in tags:
            names = [n.name for n in ast.parse(cell.source).body if isinstance(n, ast.FunctionDef)]
            cell.source = solution_regions(cell.source)
            out.cells.append(_nbgrader(cell, f"solution_{names[0]}", solution=True))
        elif "check" in tags:
            name = re.match(r"if exercises\.check_(\w+)\(", cell.source).group(1)
            out.cells.append(_nbgrader(cell, f"check_{name}"))
            test = nbformat.v4.new_code_cell(f"# autograded ({NBGRADER_POINTS} point): the check above\n"
                                             f"assert exercises.check_{name}({name}), \"{name}: not implemented yet\"")
            out.cells.append(_nbgrader(test, f"test_{name}", grade=True, points=NBGRADER_POINTS))
        else:
            out.cells.append(cell)
    out.metadata.setdefault("sinkbook", {})["edition"] = "nbgrader"
    return out


def write_nbgrader_course(out_dir: Path, names: list[str] | None = None, root: Path = SOURCES) -> list[Path]:
    """An nbgrader course folder: ``nbgrader_config.py`` and ``source/NN_name/NN_name.ipynb`` for each source
    (or each of ``names``). Returns the notebooks written."""
    paths = sources(root)
    if names is not None:
        unknown = sorted(set(names) - {p.stem for p in paths})
        if unknown:
            raise ValueError(f"unknown assignment {unknown[0]!r}; choose from {[p.stem for p in paths]}")
        paths = [p for p in paths if p.stem in names]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "nbgrader_config.py").write_text(NBGRADER_CONFIG)
    written = []
    for src in paths:
        path = out_dir / "source" / src.stem / src.name
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nbgrader_source(nbformat.read(src, as_version=4)), path)
        written.append(path)
    return written


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
# The sandbox: bubblewrap around each submission
# ------------------------------------------------------------------------------------------------------------

#: the sandbox's only writable place: a private tmpfs of this size at /tmp, gone when the sandbox ends
SANDBOX_TMP_BYTES = 256 * 2 ** 20
#: the user a grader running as root runs the submissions as (nobody)
UNPRIVILEGED_UID = 65534
#: seconds the grader waits past --timeout for the runner to report before it kills the sandbox
GRACE_SECONDS = 30
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap), "
                "or pass --unsafe-no-sandbox to grade without a sandbox (the CSV's first line then says so)")


class GradingError(RuntimeError):
    """The grader cannot run (no sandbox, a CSV from other settings) or left submissions ungraded."""


@dataclass(frozen=True)
class Limits:
    """What one submission may use. ``timeout``: wall-clock seconds for the whole notebook (also the CPU seconds
    of each of its processes); ``memory_mb``: address space of each process; ``processes``: processes and
    threads together (counted for the sandbox's user: nobody when the grader runs as root)."""
    timeout: float = 120
    memory_mb: int = 4096
    processes: int = 256

    def __post_init__(self):
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) \
                or not math.isfinite(self.timeout) or self.timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        for name in ("memory_mb", "processes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")

    def describe(self) -> str:
        return (f"timeout {self.timeout:g} s, memory {self.memory_mb} MB per process, "
                f"{self.processes} processes and threads")


def _as_root() -> bool:
    return os.geteuid() == 0


def _model_cache() -> Path | None:
    """The cache of dequantised models (``packaged.cache_root``) where it exists: bound read-only into the sandbox
    and named by ``SINKBOOK_CACHE`` there, so that a submission of an assignment on SmolLM2 (``MODELS``) loads the
    checked folder instead of rebuilding its 540 MB in the sandbox's 256 MB /tmp."""
    from sinkutils.packaged import cache_root

    root = cache_root().absolute()
    readable = root.is_dir() and all(p.stat().st_mode & 0o004 for p in root.rglob("*") if p.is_file())
    return root if readable or (root.is_dir() and not _as_root()) else None  # as root submissions run as nobody


def _readonly_paths() -> list[Path]:
    """What the kernel needs besides the system: this Python, its environment and the sinkutils package."""
    import site

    wanted = [Path(sys.prefix), Path(sys.base_prefix), Path(__file__).resolve().parent]
    cache = _model_cache()
    if cache is not None:
        wanted.append(cache)
    user_site = Path(site.getusersitepackages())
    if str(user_site) in sys.path and user_site.is_dir():
        wanted.append(user_site)
    paths: list[Path] = []
    for path in sorted({p.absolute() for p in wanted}, key=lambda p: len(p.parts)):
        if path.parts[1:2] not in (("usr",), ("etc",)) and not any(path.is_relative_to(p) for p in paths):
            paths.append(path)
    return paths


def _bwrap_argv(hidden: list[Path], env: dict[str, str], command: list[str]) -> list[str]:
    """The bubblewrap command line that runs ``command`` in a new sandbox: new PID, network, IPC and UTS namespaces;
    the system, this Python and sinkutils read-only; a size-limited tmpfs at /tmp as the only writable place;
    ``hidden`` (the submissions and the grader's output folders) covered by an empty read-only tmpfs wherever
    they fall inside what is bound. Run as root, it keeps no user namespace and setpriv drops the runner to
    nobody with no capabilities; otherwise a user namespace maps the runner to the grader's user. ``env`` is the
    command's whole environment."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise GradingError(f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}")
    argv = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv"]
    if _as_root():
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        argv += ["--unshare-user"]
    for top in ("usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / top
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            argv += ["--ro-bind", str(path), str(path)]
    # the private /tmp before what is bound: the project or its Python may live in /tmp, and is bound on top of it
    argv += ["--size", str(SANDBOX_TMP_BYTES), "--perms", "01777", "--tmpfs", "/tmp"]
    bound = [Path("/usr"), Path("/etc")]
    made: set[Path] = {Path("/tmp")}
    for path in _readonly_paths():
        for parent in reversed(path.parents[:-1]):
            if parent not in made and not any(parent.is_relative_to(b) for b in bound):
                argv += ["--perms", "0755", "--dir", str(parent)]  # bwrap would make them 0700
                made.add(parent)
        argv += ["--ro-bind", str(path), str(path)]
        bound.append(path)
    for path in map(Path.resolve, hidden):  # where it shows inside, also through a bound path or its own symlink
        for inside in {b / path.relative_to(b.resolve()) for b in bound if path.is_relative_to(b.resolve())}:
            argv += ["--tmpfs", str(inside), "--remount-ro", str(inside)]
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp"]
    for name, value in env.items():
        argv += ["--setenv", name, value]
    if _as_root():
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise GradingError("setpriv (Debian: util-linux) is not installed; the grader needs it, as root, to run "
                               "submissions as nobody")
        argv += [setpriv, f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_UID}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    return argv + command


def sandbox_problem(hidden: list[Path] = ()) -> str | None:
    """None when bubblewrap can run a submission here (with ``hidden`` covered), else what is wrong and how to fix
    it."""
    try:
        argv = _bwrap_argv(list(hidden), _runner_env("/tmp"), [sys.executable, "-c", "import sinkutils.assign, papermill"])
    except GradingError as err:
        return str(err)
    probe = subprocess.run(argv, capture_output=True, text=True, env={}, stdin=subprocess.DEVNULL)
    if probe.returncode == 0:
        return None
    why = (probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1][:200]
    if not why.startswith("bwrap:"):  # the sandbox started; the Python in it failed
        return (f"in the bubblewrap sandbox this Python cannot import sinkutils.assign and papermill ({why}); "
                f"what the sandbox binds: {', '.join(map(str, _readonly_paths()))}")
    return (f"bubblewrap cannot start a sandbox here ({why}): allow unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 also "
            "kernel.apparmor_restrict_unprivileged_userns=0), or in Docker run the container with "
            "--security-opt seccomp=unconfined --security-opt apparmor=unconfined (or --privileged); "
            "or pass --unsafe-no-sandbox")


def _runner_env(root: str) -> dict[str, str]:
    """The runner's whole environment: nothing inherited (no path to the submissions or the project)."""
    cache = _model_cache()
    return {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": f"{root}/home",
            "TMPDIR": f"{root}/tmp", "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1",
            "MPLBACKEND": "agg", "TQDM_DISABLE": "1", "HF_HOME": f"{root}/home/hf", "HF_HUB_OFFLINE": "1",
            "JUPYTER_PLATFORM_DIRS": "1"} | ({"SINKBOOK_CACHE": str(cache)} if cache else {})


class _Drain(threading.Thread):
    """Read a pipe to its end in the background, keeping at most ``keep`` bytes (the first, or the last with
    ``tail``): a submission that floods it costs the grader nothing."""

    def __init__(self, fd: int, keep: int, tail: bool = False):
        super().__init__(daemon=True)
        self.fd, self.keep, self.tail, self.data, self.total = fd, keep, tail, b"", 0
        self.start()

    def run(self):
        try:
            while chunk := os.read(self.fd, 1 << 16):
                self.total += len(chunk)
                if self.tail:
                    self.data = (self.data + chunk)[-self.keep:]
                elif len(self.data) < self.keep:
                    self.data += chunk[:self.keep - len(self.data)]
        finally:
            os.close(self.fd)


def _kill_tree(pid: int) -> None:
    """Kill a process and every process below it, and wait until they are gone. In the sandbox every process of
    the submission is below the bwrap process (orphans go to the sandbox's init), and the PID namespace ends with
    it."""
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
    psutil.wait_procs(family, timeout=60)  # in the sandbox they are gone at once; unsafe, a zombie may linger


def _run_submission(notebook: str, assignment: str, limits: Limits, hidden: list[Path], unsafe: bool) -> dict | str:
    """Run the runner (``_execute``) on a notebook, in the sandbox or, with ``unsafe``, in a temporary folder.
    Returns its report, or why there is none."""
    base = tempfile.mkdtemp(prefix="sinkbook-grade-") if unsafe else None
    root = base or "/tmp"
    result_r, result_w = os.pipe()
    log_r, log_w = os.pipe()
    runner = [sys.executable, "-m", "sinkutils.assign", "_execute", "--root", root, "--assignment", assignment,
              "--result-fd", str(result_w), "--timeout", str(limits.timeout), "--memory-mb", str(limits.memory_mb),
              "--processes", str(0 if unsafe else limits.processes)]
    if unsafe:
        argv, cwd, env = runner, base, _runner_env(base)
    else:
        argv, cwd, env = _bwrap_argv(hidden, _runner_env(root), runner), "/", {}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log_w, stderr=log_w, pass_fds=(result_w,),
                                cwd=cwd, env=env, start_new_session=True)
    finally:
        os.close(result_w)
        os.close(log_w)
    result, log = _Drain(result_r, 2 * MAX_OUTPUTS_BYTES), _Drain(log_r, 2000, tail=True)
    feeder = threading.Thread(target=_feed, args=(proc.stdin, notebook.encode()), daemon=True)
    feeder.start()
    timed_out = False
    try:
        proc.wait(timeout=limits.timeout + GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_tree(proc.pid)
        proc.wait()
        for drain in (result, log):
            drain.join(None if not unsafe else 10)  # unsafe: a daemon the tree missed may hold the pipe
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
    if result.is_alive():
        return "crashed: a process of the submission kept the runner's report open after the run"
    if result.total > MAX_OUTPUTS_BYTES * 2:
        return f"the runner's report is over {MAX_OUTPUTS_BYTES >> 19} MB; return results of the expected shape"
    if timed_out and not result.data:
        return f"timed out after {limits.timeout:g} s"
    try:
        report = json.loads(result.data)
    except ValueError:
        report = None
    if isinstance(report, dict):
        return report
    if result.data:
        return "crashed: the runner's report is unreadable"
    if proc.returncode > 128:  # bwrap passes on a signal's death as 128 + the signal
        return f"crashed: the notebook runner exited with code {proc.returncode} (killed by signal {proc.returncode - 128})"
    tail = log.data.decode(errors="replace").strip().splitlines()[-1:] or [""]
    return f"crashed: the notebook runner exited with code {proc.returncode} ({tail[0][:160]})"


def _feed(stream, data: bytes) -> None:
    try:
        with stream:
            stream.write(data)
    except OSError:  # the runner died or closed its stdin
        pass


def _execute(root: Path, assignment: str, result_fd: int, timeout: float, memory_mb: int, processes: int) -> None:
    """The runner, inside the sandbox: set the limits, append the grading cell to the notebook given on stdin,
    execute it with papermill in ``root/work`` (errors allowed), stop it ``timeout`` seconds after the start, and
    write the report to ``result_fd``: JSON with ``stopped`` (why the notebook did not finish, or None),
    ``first_error`` (the first error of the submission's own cells) and ``outputs`` (the outputs file, base64, or
    None)."""
    import base64
    import resource

    import papermill

    started = time.monotonic()
    os.set_inheritable(result_fd, False)  # the kernel never gets the report's pipe
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(timeout) + 1,) * 2)
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20,) * 2)
    if processes:
        resource.setrlimit(resource.RLIMIT_NPROC, (processes,) * 2)
    nb = nbformat.reads(sys.stdin.read(), as_version=4)
    for name in ("work", "home", "tmp", "out"):
        (root / name).mkdir(exist_ok=True)
    nbformat.write(nb, root / "work" / "submission.ipynb")
    outputs = root / "out" / f"outputs-{secrets.token_hex(16)}.pt"
    nb.cells.append(_grading_cell(assignment, outputs))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    done: dict = {}

    def run():
        try:
            done["nb"] = papermill.execute_notebook(
                nb, str(root / "out" / "executed.ipynb"), kernel_name="python3", cwd=str(root / "work"),
                progress_bar=False, execution_timeout=int(timeout) + 1, allow_errors=True,
                request_save_on_cell_execute=False)
        except papermill.PapermillExecutionError:
            pass  # cells raised (allowed): the outputs file says what ran
        except BaseException as err:  # the kernel died (os._exit, a segfault, out of memory) or would not start
            done["dead"] = f"crashed: the kernel died or failed ({type(err).__name__}: {str(err)[:160]})"

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(max(0.0, timeout - (time.monotonic() - started)))
    stopped = None
    if thread.is_alive():
        stopped = f"timed out after {timeout:g} s"
        import psutil

        for child in psutil.Process().children(recursive=True):  # the kernel and what it started
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    else:
        stopped = done.get("dead")
    executed = done.get("nb")
    if executed is None and not thread.is_alive():
        try:  # papermill writes the executed notebook before it raises for the errors allowed
            executed = nbformat.read(root / "out" / "executed.ipynb", as_version=4)
        except Exception:
            pass
    report = {"stopped": stopped, "first_error": _first_error(executed), "outputs": None}
    try:
        if outputs.stat().st_size <= MAX_OUTPUTS_BYTES:
            report["outputs"] = base64.b64encode(outputs.read_bytes()).decode()
        else:
            report["outputs_error"] = (f"the outputs file is over {MAX_OUTPUTS_BYTES >> 20} MB; return results of "
                                       "the expected shape")
    except OSError:
        pass
    with open(result_fd, "wb") as f:
        f.write(json.dumps(report).encode())
    os._exit(0)  # papermill's thread may still wait on a dead kernel


def _first_error(nb: nbformat.NotebookNode | None) -> str | None:
    """The first error a cell of the submission raised (its own cells, not the checks), as 'Type: message'."""
    for cell in (nb.cells if nb is not None else []):
        if cell.cell_type != "code" or {"check", "grader"} & set(cell.metadata.get("tags", [])):
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"{out.get('ename')}: {out.get('evalue')}"[:200]
    return None


# ------------------------------------------------------------------------------------------------------------
# The grader
# ------------------------------------------------------------------------------------------------------------

def grade_notebook(nb: nbformat.NotebookNode, assignment: str, limits: Limits = Limits(),
                   hidden: list[Path] = (), unsafe: bool = False) -> list[Result]:
    """Execute one submission in its own sandbox (``book/assignments.md`` says what it guarantees) and judge its
    outputs in this process: one Result per exercise of ``assignment``. A crash, a hang or a dead kernel fails
    the exercises not graded by then."""
    from sinkutils import exercises

    report = _run_submission(nbformat.writes(nb), assignment, limits, list(hidden), unsafe)
    stopped, found, first_error = report, {}, None
    if isinstance(report, dict):
        stopped, first_error = report.get("stopped"), report.get("first_error")
        stopped, first_error = (str(v)[:300] if v is not None else None for v in (stopped, first_error))
        found, unreadable = _load_outputs(report.get("outputs"), report.get("outputs_error"))
        stopped = unreadable or stopped
    results = []
    for name in (ex.name for ex in exercises.of_chapter(assignment)):
        if name in found and found[name] is None:
            results.append(exercises.Result(name, False, f"no function named {name} was defined" +
                                            (f" (a cell raised {first_error})" if first_error else "")))
        elif name in found:
            results.append(_judge(name, found[name]))
        else:
            results.append(exercises.Result(name, False, stopped or "not graded: the grading cell did not run"))
    return results


def _load_outputs(encoded, error=None) -> tuple[dict, str | None]:
    """The outputs the grading cell saved (base64 in the runner's report), or ({}, why not) when they are
    unreadable (absent is not an error: the grading cell did not run)."""
    import base64
    import io

    import torch

    if error is not None:
        return {}, str(error)[:300]
    if encoded is None:
        return {}, None
    try:
        found = torch.load(io.BytesIO(base64.b64decode(encoded, validate=True)), weights_only=True)
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


def header(limits: Limits, unsafe: bool = False) -> str:
    """The CSV's first line: how its rows were graded. A rerun resumes only a CSV with the same line."""
    if unsafe:
        return (f"# UNSAFE: graded without a sandbox (--unsafe-no-sandbox): the submissions ran as this user, with "
                f"the network and this machine's files; timeout {limits.timeout:g} s")
    return f"# graded in bubblewrap sandboxes (no network, read-only system, private /tmp): {limits.describe()}"


def read_grades(path: Path) -> tuple[str, list[dict]]:
    """A grades CSV: its header comment and its rows (student, exercise, result, message)."""
    with open(path, newline="") as f:
        first = f.readline().rstrip("\r\n")
        rows = list(csv.DictReader(f))
    if not first.startswith("#") or (rows and tuple(rows[0]) != CSV_FIELDS):
        raise GradingError(f"{path} is not a grades CSV written by this grader (its first line is {first[:80]!r}); "
                           "pass another --out")
    return first, rows


def _write_grades(path: Path, first: str, rows: list[dict]) -> None:
    """Write the whole CSV atomically: a reader (or a crash) sees the previous file or this one, never a part."""
    partial = path.with_name(path.name + ".part")
    with open(partial, "w", newline="") as f:
        f.write(first + "\n")
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["student"]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _grade_one(student: str, raw: bytes, assignment: str | None, limits: Limits, hidden: list[Path],
               unsafe: bool) -> list[dict]:
    from sinkutils import exercises

    try:
        nb = nbformat.reads(raw.decode("utf-8"), as_version=4)
    except Exception as err:
        return [dict(student=student, exercise="*", result="fail",
                     message=f"not a readable notebook ({type(err).__name__}: {str(err)[:120]})")]
    name = assignment or assignment_of(nb)
    if name is None:
        return [dict(student=student, exercise="*", result="fail",
                     message="cannot tell which assignment this is: its metadata names none, and it does not "
                             f"define the functions of exactly one; pass --assignment, one of {exercises.chapters()}")]
    return [dict(student=student, exercise=r.exercise, result="pass" if r.passed else "fail", message=r.message)
            for r in grade_notebook(nb, name, limits, hidden, unsafe)]


def grade(submissions: Path, out_csv: Path, timeout: float = 120, assignment: str | None = None, *,
          memory_mb: int = 4096, processes: int = 256, unsafe: bool = False) -> list[dict]:
    """Grade every ``*.ipynb`` in ``submissions`` (the file name, without .ipynb, is the student) one after the
    other, each in its own sandbox, and return every row of ``out_csv``. Each submission's rows are written to
    ``out_csv`` as soon as they are judged; students it already holds are not graded again (a rerun resumes).
    Without bubblewrap it refuses (GradingError) unless ``unsafe``."""
    from tqdm.auto import tqdm

    from sinkutils import exercises

    limits = Limits(timeout, memory_mb, processes)
    submissions = Path(submissions).resolve()
    if not submissions.exists():
        raise ValueError(f"submissions folder {submissions} does not exist")
    if not submissions.is_dir():
        raise ValueError(f"{submissions} is not a folder: pass the folder that holds the submitted notebooks")
    if assignment is not None and assignment not in exercises.chapters():
        raise ValueError(f"unknown assignment {assignment!r}; choose one of {exercises.chapters()}")
    paths = sorted(submissions.glob("*.ipynb"))
    if not paths:
        raise ValueError(f"no .ipynb files in {submissions}")
    out_csv = Path(out_csv).resolve()
    first = header(limits, unsafe)
    rows: list[dict] = []
    if out_csv.exists():
        earlier, rows = read_grades(out_csv)
        if earlier != first:
            raise GradingError(f"{out_csv} was graded with other settings ({earlier[2:]}), not ({first[2:]}); rerun "
                               "with those, pass another --out, or delete it to grade everything again")
    graded = {r["student"] for r in rows}
    todo = [p for p in paths if p.stem not in graded]
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    hidden = [submissions, out_csv.parent]
    if todo and not unsafe and (problem := sandbox_problem(hidden)):
        raise GradingError(problem)
    # read every submission before any runs: a sandbox never sees the folder
    copies = {p.stem: p.read_bytes() for p in todo}
    failed = []
    for student, raw in tqdm(copies.items(), desc="grading", unit="submission"):
        try:
            rows += _grade_one(student, raw, assignment, limits, hidden, unsafe)
        except Exception as err:  # the grader's own failure: no row, so that a rerun grades it
            failed.append(f"{student} ({type(err).__name__}: {str(err)[:100]})")
            continue
        _write_grades(out_csv, first, rows)
    if not out_csv.exists():
        _write_grades(out_csv, first, rows)
    if failed:
        raise GradingError(f"{len(failed)} of {len(copies)} submissions could not be graded and have no rows in "
                           f"{out_csv}; rerun the same command to grade them: {'; '.join(failed)}")
    return sorted(rows, key=lambda r: r["student"])


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m sinkutils.assign", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("student", help="write the sources' shared opening cells, then the student editions")
    s.add_argument("--out", type=Path, default=STUDENT, help=f"folder (default {STUDENT.relative_to(ROOT)})")
    s.add_argument("--check", action="store_true", help="write nothing; exit 1 if a source's opening or an edition "
                   "in --out is stale")
    g = sub.add_parser("grade", help="grade a folder of submitted notebooks into a CSV, each in a sandbox")
    g.add_argument("submissions", type=Path)
    g.add_argument("--out", type=Path, default=Path("grades.csv"))
    g.add_argument("--timeout", type=float, default=120, help="seconds per submission, all cells together")
    g.add_argument("--memory", type=int, default=4096, help="MB of address space per process (default 4096)")
    g.add_argument("--processes", type=int, default=256, help="processes and threads per submission (default 256)")
    g.add_argument("--assignment", help="grade every submission as this assignment, e.g. 01_sink (default: what "
                   "each notebook's metadata says)")
    g.add_argument("--unsafe-no-sandbox", action="store_true", help="grade without bubblewrap: submissions can "
                   "read and change what this user can; the CSV's first line says so")
    n = sub.add_parser("nbgrader", help="write an nbgrader course folder (source/, nbgrader_config.py)")
    n.add_argument("out", type=Path)
    n.add_argument("--assignment", action="append", help="only this assignment (repeatable; default: all)")
    sub.add_parser("list", help="the exercises of every assignment")
    e = sub.add_parser("_execute")  # internal: the runner inside a submission's sandbox
    e.add_argument("--root", type=Path, required=True)
    e.add_argument("--assignment", required=True)
    e.add_argument("--result-fd", type=int, required=True)
    e.add_argument("--timeout", type=float, required=True)
    e.add_argument("--memory-mb", type=int, required=True)
    e.add_argument("--processes", type=int, required=True)
    args = p.parse_args(argv)
    if args.command == "student":
        if args.check:
            openings, stale = stale_openings(), stale_student_editions(args.out)
            if openings:
                print(f"sources whose opening cells differ from assign.opening_cells: {openings}")
            if stale:
                print(f"stale student editions in {args.out}: {stale}")
            if openings or stale:
                print("run: python -m sinkutils.assign student")
                return 1
            print(f"the sources' openings and the student editions in {args.out} are up to date")
            return 0
        for path in write_openings() + write_student_editions(args.out):
            print(path)
    elif args.command == "grade":
        try:
            rows = grade(args.submissions, args.out, args.timeout, args.assignment, memory_mb=args.memory,
                         processes=args.processes, unsafe=args.unsafe_no_sandbox)
        except (ValueError, GradingError) as err:
            raise SystemExit(f"grade: {err}") from None
        passed = sum(r["result"] == "pass" for r in rows)
        print(f"{args.out}: {passed} of {len(rows)} exercises passed, {len({r['student'] for r in rows})} students")
    elif args.command == "nbgrader":
        try:
            for path in write_nbgrader_course(args.out, args.assignment):
                print(path)
        except ValueError as err:
            raise SystemExit(f"nbgrader: {err}") from None
    elif args.command == "list":
        from sinkutils import exercises

        for chapter in exercises.chapters():
            print(chapter)
            for ex in exercises.of_chapter(chapter):
                print(textwrap.fill(ex.summary, 110, initial_indent="  ", subsequent_indent="      "))
    else:
        _execute(args.root, args.assignment, args.result_fd, args.timeout, args.memory_mb, args.processes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
