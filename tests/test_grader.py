"""The grader (``python -m sinkutils.assign grade``): a bubblewrap sandbox per submission, nothing lost.

The sandbox tests run only where bubblewrap can start a sandbox (``bash run.sh test`` installs it where it can)
and skip, saying why, elsewhere. The attacks come from students who know the absolute paths of the submissions,
the CSV, the project and the grader's PID: each attacker's other rows, every classmate's rows, the files on disk
and the processes left afterwards are checked, never just that grading ran.
"""
import copy
import csv
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import nbformat
import psutil
import pytest
import torch

from sinkutils import assign, exercises

PASSED = "correct on the prepared input"
WRONG_HINT = "take absolute values before the max: a massive activation can be negative (token 0 here has -40)"
MARK = "sinkbook-attack-marker"


@pytest.fixture(scope="session")
def sandbox():
    problem = assign.sandbox_problem()
    if problem is not None:
        pytest.skip(f"needs bubblewrap: no sandbox here: {problem}")  # counted apart by tests/conftest.py


def _trimmed(nb):
    """The notebook's functions and bare checks only (no model): what grading needs, in a few seconds."""
    out = copy.deepcopy(nb)
    head = nbformat.v4.new_code_cell("import math\n\nimport torch\nfrom sinkutils import exercises")
    out.cells = [head]
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if {"solution", "exercise"} & set(tags):
            out.cells.append(copy.deepcopy(cell))
        elif "check" in tags:
            call = cell.source.splitlines()[0].removeprefix("if ").removesuffix(":")
            out.cells.append(nbformat.v4.new_code_cell(call, metadata={"tags": ["check"]}))
    return out


GOOD = _trimmed(nbformat.read(assign.SOURCES / "05_disparity.ipynb", as_version=4))
STUBS = _trimmed(nbformat.read(assign.STUDENT / "05_disparity.ipynb", as_version=4))


def _with(nb, source, at=1, held=False):
    """``nb`` with a cell inserted at ``at``. With ``held``, the cell must set HELD (whether the sandbox held)
    and a last cell swaps dominance_ratio for a wrong one unless it did: the row says what the attacker saw."""
    nb = copy.deepcopy(nb)
    nb.cells.insert(at, nbformat.v4.new_code_cell(source))
    if held:
        nb.cells.append(nbformat.v4.new_code_cell(
            "if not HELD:\n    dominance_ratio = lambda x: x.amax(-1) / x.abs().mean(-1)"))
    return nb


def _edited(nb, old, new):
    nb = copy.deepcopy(nb)
    cell = next(c for c in nb.cells if old in c.source)
    cell.source = cell.source.replace(old, new)
    return nb


def _tree_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _survivors(before):
    """Processes started since ``before`` (a set of PIDs) that belong to a submission: run as nobody (the
    grader is root), carrying the attack marker, or below this process."""
    found = []
    for proc in psutil.process_iter(["pid", "uids", "cmdline"]):
        if proc.info["pid"] in before:
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if MARK in cmdline or (proc.info["uids"] and proc.info["uids"].real == assign.UNPRIVILEGED_UID):
            found.append((proc.info["pid"], cmdline[:100]))
    found += [(p.pid, "child of the test") for p in psutil.Process().children(recursive=True) if p.is_running()
              and p.pid not in before]
    return found


# --------------------------------------------------------------------------------------------------------------
# The sandbox itself: what a command inside sees and can do
# --------------------------------------------------------------------------------------------------------------

PROBE = r"""
import json, os, socket, sys
seen = {"uid": os.getuid(), "status": {l.split(":")[0]: l.split()[1] for l in open("/proc/self/status")
                                        if l.startswith(("CapEff", "CapBnd", "NoNewPrivs"))}}
seen["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
seen["project"] = sorted(os.listdir(PROJECT))
seen["hidden"] = {h: os.listdir(h) if os.path.isdir(h) else None for h in HIDDEN}
seen["writable"] = []
for place in ("/", "/usr", "/etc", "/dev", "/dev/shm", PROJECT, PROJECT + "/sinkutils", sys.prefix, "/tmp"):
    try:
        open(os.path.join(place, "probe.txt"), "w").close()
        seen["writable"].append(place)
    except OSError:
        pass
try:
    open("/etc/shadow").read(64)
    seen["shadow"] = True
except OSError:
    seen["shadow"] = False
written = 0
try:
    with open("/tmp/fill", "wb") as f:
        for _ in range(400):
            f.write(b"x" * 2 ** 20)
            f.flush()
            written += 1
except OSError as err:
    seen["fill_error"] = err.errno
seen["filled_mb"] = written
for name, address in (("loopback", ("127.0.0.1", PORT)), ("internet", ("1.1.1.1", 80))):
    try:
        socket.create_connection(address, timeout=5).close()
        seen[name] = "connected"
    except OSError as err:
        seen[name] = type(err).__name__
print(json.dumps(seen))
"""


def _listener():
    """A TCP server on the host's 127.0.0.1 that records every connection it accepts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(server.accept())
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return server, accepted


def test_sandbox_shows_only_what_grading_needs_and_lets_write_only_a_small_private_tmp(sandbox, tmp_path):
    hidden_inside = tempfile.mkdtemp(dir=sys.prefix, prefix="sinkbook-hidden-")  # a folder inside what is bound
    try:
        open(os.path.join(hidden_inside, "alice.ipynb"), "w").close()
        server, accepted = _listener()
        code = (f"PROJECT, HIDDEN, PORT = {str(assign.ROOT)!r}, {[hidden_inside, str(tmp_path)]!r}, "
                f"{server.getsockname()[1]}\n" + PROBE)
        argv = assign._bwrap_argv([tmp_path, Path(hidden_inside)], assign._runner_env("/tmp"),
                                  [sys.executable, "-c", code])
        out = subprocess.run(argv, capture_output=True, text=True, env={}, stdin=subprocess.DEVNULL, timeout=300)
        server.close()
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout)
    finally:
        os.remove(os.path.join(hidden_inside, "alice.ipynb"))
        os.rmdir(hidden_inside)
    if os.geteuid() == 0:
        assert seen["uid"] == assign.UNPRIVILEGED_UID and not seen["shadow"]
    assert int(seen["status"]["CapEff"], 16) == 0 and seen["status"]["NoNewPrivs"] == "1"
    assert len(seen["pids"]) <= 3, seen["pids"]  # bwrap's init and this command: no process of the host
    assert set(seen["project"]) <= {"sinkutils", ".venv"}, seen["project"]  # not the project, not its submissions
    assert seen["hidden"] == {hidden_inside: [], str(tmp_path): None}
    # the private /tmp only (where the project lives in /tmp, its folder there is the private one, as root unwritable)
    assert seen["writable"][-1] == "/tmp" and all(p.startswith("/tmp/") for p in seen["writable"][:-1])
    assert {str(assign.ROOT / "sinkutils"), sys.prefix}.isdisjoint(seen["writable"])
    assert os.geteuid() != 0 or seen["writable"] == ["/tmp"]
    assert seen["filled_mb"] <= assign.SANDBOX_TMP_BYTES >> 20 and seen["fill_error"] == 28  # ENOSPC
    assert seen["loopback"] == "ConnectionRefusedError" and seen["internet"] == "OSError"  # unreachable network
    assert accepted == []


def test_a_hidden_folder_is_covered_also_where_it_shows_through_a_symlinked_bound_path(tmp_path, monkeypatch):
    real, link = tmp_path / "real-venv", tmp_path / "venv"
    (real / "subs").mkdir(parents=True)
    link.symlink_to(real)
    monkeypatch.setattr(assign, "_readonly_paths", lambda: [link])
    monkeypatch.setattr(assign.shutil, "which", lambda name: f"/usr/bin/{name}")
    argv = assign._bwrap_argv([real / "subs", tmp_path / "out"], {}, ["true"])
    covered = [argv[i + 1] for i, a in enumerate(argv) if a == "--tmpfs" and argv[i + 1] != "/tmp"]
    assert covered == [str(link / "subs")]  # the output folder is not bound anywhere: nothing to cover


# --------------------------------------------------------------------------------------------------------------
# The attacks: one grading run over good, wrong and hostile submissions
# --------------------------------------------------------------------------------------------------------------

DAEMON = """import os, subprocess, sys
# double fork, new session, exec: a daemon waiting for the grader to finish, then rewriting the CSV
code = '''import glob, os, sys, time
for _ in range(100000):
    for path in [CSV] + glob.glob("/proc/*/cwd/*.csv") + glob.glob("/tmp/*/*.csv"):
        try:
            rows = open(path).read()
            open(path, "w").write(rows.replace("not implemented yet", "correct on the prepared input").replace("fail", "pass"))
        except OSError:
            pass
    time.sleep(0.2)
'''
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        subprocess.Popen([sys.executable, "-c", f"CSV = {CSV!r}\\n" + code, MARK], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.execvp("sleep", ["sleep", "100000", MARK])
    os._exit(0)
"""

VANDAL = """import os, shutil
for target in ("..", SUBMISSIONS, OUT_DIR, INSTRUCTOR_DIR, "/"):
    shutil.rmtree(target, ignore_errors=True)
for path in (SUBMISSIONS + "/good.ipynb", INSTRUCTOR_DIR + "/answers.txt", PROJECT + "/sinkutils/__init__.py",
             PROJECT + "/pwned.txt", PROJECT + "/sinkutils/pwned.py"):
    try:
        with open(path, "w") as f:
            f.write("pwned")
    except OSError:
        pass
"""

THIEF = """import glob, json, os
from pathlib import Path
places = [Path.cwd(), Path.cwd().parent, Path.home(), Path(SUBMISSIONS), Path(INSTRUCTOR_DIR)]
places += [Path(v) for v in os.environ.values() if os.path.isdir(v)]
for pid in os.listdir("/proc"):  # the grader's cwd, root and command line lead to the submissions
    if pid.isdigit():
        places += [Path(f"/proc/{pid}/cwd"), Path(f"/proc/{pid}/root") / SUBMISSIONS.lstrip("/")]
        try:
            places += [Path(a) for a in open(f"/proc/{pid}/cmdline").read().split("\\0") if os.path.isdir(a)]
        except OSError:
            pass
for place in places:
    for path in glob.glob(str(place / "*.ipynb")) + glob.glob(str(place / "*" / "*.ipynb")):
        try:
            cells = json.load(open(path))["cells"]
        except (OSError, ValueError):
            continue
        for cell in cells:
            source = "".join(cell["source"])
            if "def dominance_ratio" in source and "NotImplementedError" not in source:
                exec(source)  # a classmate's solution
"""

FORK_BOMB = """import os, time
forked = []
for _ in range(20000):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(10 ** 6)
        os._exit(0)
    forked.append(pid)
HELD = len(forked) < 20000
for pid in forked:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
"""

MEMORY_HOG = """try:
    hog = bytearray(64 * 2 ** 30)
    HELD = False
except MemoryError:
    HELD = True
"""

DISK_FILL = """import os
written, fill = 0, os.path.join(os.environ["TMPDIR"], "fill")
try:
    with open(fill, "wb") as f:
        while written < 4096:
            f.write(b"x" * 2 ** 20)
            f.flush()
            written += 1
except OSError:
    pass
HELD = written < 4096
os.remove(fill)  # leave room for the grader's outputs (a submission that does not fails its own rows)
"""

NETWORK = """import socket
try:
    s = socket.create_connection(("127.0.0.1", PORT), timeout=5)
    s.sendall(b"pwned")
    HELD = False
except OSError:
    HELD = True
"""

KILLER = """import os, signal
for pid in (SENTINEL, GRADER, os.getppid()):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""

FLOOD = """import os, sys
for _ in range(200):
    os.write(1, b"x" * 2 ** 20)  # straight to the runner's stdout
    os.write(2, b"y" * 2 ** 20)
for _ in range(20):
    print("z" * 2 ** 20)  # through the kernel into the notebook
"""


@pytest.mark.xdist_group("grader-hostile")  # minutes: beside the rest of this file (conftest.py)
def test_hostile_submissions_cost_only_their_own_rows(sandbox, tmp_path):
    subs, out_dir, instructor = tmp_path / "subs", tmp_path / "grades", tmp_path / "instructor"
    for folder in (subs, out_dir, instructor):
        folder.mkdir()
    (instructor / "answers.txt").write_text("the instructor's answers")
    out = out_dir / "grades.csv"
    server, accepted = _listener()
    sentinel = subprocess.Popen(["sleep", "100000"])
    known = (f"SUBMISSIONS, OUT_DIR, INSTRUCTOR_DIR, PROJECT = {str(subs)!r}, {str(out_dir)!r}, {str(instructor)!r}, "
             f"{str(assign.ROOT)!r}\nCSV, MARK, PORT = {str(out)!r}, {MARK!r}, {server.getsockname()[1]}\n"
             f"SENTINEL, GRADER = {sentinel.pid}, {os.getpid()}\n")
    submissions = {
        "good": GOOD,
        "wrong": _edited(GOOD, "a.amax(dim=-1)", "x.amax(dim=-1)"),
        "broken": _edited(GOOD, "def dominance_ratio", "1 / 0\n\n\ndef dominance_ratio"),
        "dies": _with(GOOD, "import os\nos._exit(1)"),
        "loops": _with(GOOD, "while True:\n    pass", at=3),
        "daemon": _with(STUBS, known + DAEMON),
        "vandal": _with(GOOD, known + VANDAL, at=len(GOOD.cells)),
        "thief": _with(STUBS, known + THIEF, at=len(STUBS.cells)),  # last: what it steals replaces its stubs
        "forkbomb": _with(GOOD, FORK_BOMB, held=True),
        "memoryhog": _with(GOOD, MEMORY_HOG, held=True),
        "diskfill": _with(GOOD, DISK_FILL, held=True),
        "network": _with(GOOD, known + NETWORK, held=True),
        "killer": _with(GOOD, known + KILLER),
        "flood": _with(GOOD, FLOOD),
    }
    for name, nb in submissions.items():
        nbformat.write(nb, subs / f"{name}.ipynb")
    before_subs, init = _tree_digest(subs), (assign.ROOT / "sinkutils" / "__init__.py").read_bytes()
    before = {p.pid for p in psutil.process_iter()}
    try:
        assert assign.main(["grade", str(subs), "--out", str(out), "--timeout", "60"]) == 0
        survivors = _survivors(before | {sentinel.pid})
        sentinel_alive = sentinel.poll() is None
    finally:
        sentinel.kill()
        server.close()
    assert survivors == [], "a process of a submission outlived the grader"
    assert sentinel_alive, "a submission killed a process outside its sandbox"
    assert accepted == [], "a submission reached a server on the host's 127.0.0.1"
    assert _tree_digest(subs) == before_subs
    assert (instructor / "answers.txt").read_text() == "the instructor's answers"
    assert (assign.ROOT / "sinkutils" / "__init__.py").read_bytes() == init  # the vandal's targets in the project
    assert not (assign.ROOT / "pwned.txt").exists() and not (assign.ROOT / "sinkutils" / "pwned.py").exists()
    first, rows = assign.read_grades(out)
    assert first == assign.header(assign.Limits(60))
    got = {(r["student"], r["exercise"]): (r["result"], r["message"]) for r in rows}
    both = ("dominance_ratio", "mean_pairwise_cosine")
    died = "crashed: the kernel died or failed (DeadKernelError: Kernel died)"
    expected = {
        "good": (("pass", PASSED), ("pass", PASSED)),
        "wrong": (("fail", WRONG_HINT), ("pass", PASSED)),
        "broken": (("fail", "no function named dominance_ratio was defined (a cell raised ZeroDivisionError: "
                            "division by zero)"), ("pass", PASSED)),
        "dies": (("fail", died), ("fail", died)),
        "loops": (("fail", "timed out after 60 s"),) * 2,
        "daemon": (("fail", exercises.NOT_IMPLEMENTED),) * 2,
        "thief": (("fail", exercises.NOT_IMPLEMENTED),) * 2,  # it found no classmate's notebook
    }
    killed = "crashed: the notebook runner exited with code 137 (killed by signal 9)"  # it killed its own runner
    expected["killer"] = ((("fail", killed),) * 2)
    for name in ("forkbomb", "memoryhog", "diskfill", "network", "flood"):
        expected[name] = (("pass", PASSED), ("pass", PASSED))  # the limit held, and the grading still ran
    for name, results in expected.items():
        assert tuple(got.pop((name, ex)) for ex in both) == results, name
    assert [r for r in got.values() if r[0] == "pass"] == []  # the vandal destroyed only its own sandbox
    assert set(got) == {("vandal", ex) for ex in both}
    assert [r["student"] for r in rows] == sorted(r["student"] for r in rows)


# --------------------------------------------------------------------------------------------------------------
# Nothing lost: rows written per submission, reruns resume, the grader's own failures leave no row
# --------------------------------------------------------------------------------------------------------------

def _fake_grading(monkeypatch, fail_on=(), fail_exercises=()):
    """grade_notebook without kernels: every exercise passes, except for students in ``fail_exercises``; students
    in ``fail_on`` make the grader itself fail. Returns the list of students graded, in order."""
    graded = []

    def fake(nb, name, limits, hidden, unsafe):
        student = nb.metadata["student"]
        graded.append(student)
        if student in fail_on:
            raise OSError(28, "No space left on device")
        return [exercises.Result(ex.name, student not in fail_exercises, "fail" if student in fail_exercises
                                 else PASSED) for ex in exercises.of_chapter(name)]

    monkeypatch.setattr(assign, "grade_notebook", fake)
    monkeypatch.setattr(assign, "sandbox_problem", lambda hidden=(): None)
    return graded


def _named(folder, names):
    folder.mkdir(exist_ok=True)
    for name in names:
        nb = copy.deepcopy(GOOD)
        nb.metadata["student"] = name
        nb.metadata["sinkbook"] = {"assignment": "05_disparity"}
        nbformat.write(nb, folder / f"{name}.ipynb")
    return folder


def test_each_submission_is_written_when_judged_and_a_rerun_grades_only_what_is_missing(tmp_path, monkeypatch):
    subs, out = _named(tmp_path / "subs", ["ann", "bob", "cy", "dee"]), tmp_path / "grades.csv"
    graded = _fake_grading(monkeypatch, fail_on={"cy"})
    seen_on_disk = []
    write = assign._write_grades
    monkeypatch.setattr(assign, "_write_grades", lambda path, first, rows: (
        write(path, first, rows), seen_on_disk.append(sorted({r["student"] for r in assign.read_grades(path)[1]}))))
    with pytest.raises(assign.GradingError, match=r"1 of 4 submissions could not be graded .* rerun the same "
                                                  r"command to grade them: cy \(OSError"):
        assign.grade(subs, out)
    assert seen_on_disk == [["ann"], ["ann", "bob"], ["ann", "bob", "dee"]]  # on disk as soon as judged
    assert not out.with_name("grades.csv.part").exists()
    graded = _fake_grading(monkeypatch, fail_exercises={"cy", "eve"})
    _named(subs, ["eve"])
    rows = assign.grade(subs, out)
    assert graded == ["cy", "eve"]  # only the missing ones
    assert [(r["student"], r["result"]) for r in rows] == [
        ("ann", "pass"), ("ann", "pass"), ("bob", "pass"), ("bob", "pass"), ("cy", "fail"), ("cy", "fail"),
        ("dee", "pass"), ("dee", "pass"), ("eve", "fail"), ("eve", "fail")]
    assert assign.read_grades(out)[1] == rows
    graded.clear()
    assert assign.grade(subs, out) == rows and graded == []


def test_an_interrupted_run_keeps_every_finished_row(tmp_path, monkeypatch):
    subs, out = _named(tmp_path / "subs", ["ann", "bob", "cy"]), tmp_path / "grades.csv"
    graded = _fake_grading(monkeypatch)
    fake = assign.grade_notebook

    def interrupted(nb, *args):
        if nb.metadata["student"] == "bob":
            raise KeyboardInterrupt
        return fake(nb, *args)

    monkeypatch.setattr(assign, "grade_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assign.grade(subs, out)
    assert {r["student"] for r in assign.read_grades(out)[1]} == {"ann"}
    monkeypatch.setattr(assign, "grade_notebook", fake)
    graded.clear()
    assign.grade(subs, out)
    assert graded == ["bob", "cy"]


def test_a_rerun_with_other_settings_is_refused(tmp_path, monkeypatch):
    subs, out = _named(tmp_path / "subs", ["ann"]), tmp_path / "grades.csv"
    _fake_grading(monkeypatch)
    assign.grade(subs, out, timeout=120)
    with pytest.raises(assign.GradingError, match=r"was graded with other settings .*timeout 120 s.*timeout 30 s"):
        assign.grade(subs, out, timeout=30)
    with pytest.raises(assign.GradingError, match="graded with other settings"):
        assign.grade(subs, out, timeout=120, unsafe=True)
    (tmp_path / "other.csv").write_text("student,exercise\n")
    with pytest.raises(assign.GradingError, match="is not a grades CSV written by this grader"):
        assign.grade(subs, tmp_path / "other.csv")


@pytest.mark.parametrize("args, message", [
    (["--timeout", "-5"], "grade: timeout must be a positive number of seconds, got -5.0"),
    (["--timeout", "0"], "grade: timeout must be a positive number of seconds, got 0.0"),
    (["--timeout", "nan"], "grade: timeout must be a positive number of seconds, got nan"),
    (["--memory", "0"], "grade: memory_mb must be a positive whole number, got 0"),
    (["--processes", "-1"], "grade: processes must be a positive whole number, got -1"),
    (["--assignment", "07_x"], "grade: unknown assignment '07_x'; choose one of ['01_sink'"),
])
def test_bad_arguments_fail_fast_naming_what_is_valid(tmp_path, monkeypatch, args, message):
    subs = _named(tmp_path / "subs", ["ann"])
    graded = _fake_grading(monkeypatch)
    with pytest.raises(SystemExit) as info:
        assign.main(["grade", str(subs), "--out", str(tmp_path / "g.csv")] + args)
    assert str(info.value.code).startswith(message)
    assert graded == [] and not (tmp_path / "g.csv").exists()


def test_missing_folder_and_malformed_options_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match=f"grade: submissions folder {tmp_path / 'nowhere'} does not exist"):
        assign.main(["grade", str(tmp_path / "nowhere")])
    (tmp_path / "file.ipynb").write_text("{}")
    with pytest.raises(SystemExit, match="is not a folder: pass the folder that holds the submitted notebooks"):
        assign.main(["grade", str(tmp_path / "file.ipynb")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .ipynb files in"):
        assign.main(["grade", str(tmp_path / "empty")])
    with pytest.raises(SystemExit) as info:
        assign.main(["grade", str(tmp_path), "--timeout", "soon"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --timeout: invalid float value: 'soon'" in err


def test_without_bubblewrap_the_grader_refuses_unless_told_unsafe(tmp_path, monkeypatch):
    subs = _named(tmp_path / "subs", ["ann"])
    real_which = assign.shutil.which
    monkeypatch.setattr(assign.shutil, "which", lambda name: None if name == "bwrap" else real_which(name))
    problem = assign.sandbox_problem()
    assert problem.startswith("bubblewrap (bwrap) is not installed: install bubblewrap (Debian/Ubuntu: apt-get "
                              "install bubblewrap") and "--unsafe-no-sandbox" in problem
    with pytest.raises(SystemExit, match="grade: bubblewrap .* is not installed"):
        assign.main(["grade", str(subs), "--out", str(tmp_path / "g.csv")])
    assert not (tmp_path / "g.csv").exists()
    assert assign.main(["grade", str(subs), "--out", str(tmp_path / "g.csv"), "--unsafe-no-sandbox",
                        "--timeout", "120"]) == 0
    first, rows = assign.read_grades(tmp_path / "g.csv")
    assert first.startswith("# UNSAFE: graded without a sandbox (--unsafe-no-sandbox)")
    assert [(r["exercise"], r["result"], r["message"]) for r in rows] == [
        ("dominance_ratio", "pass", PASSED), ("mean_pairwise_cosine", "pass", PASSED)]


# --------------------------------------------------------------------------------------------------------------
# Which assignment, unreadable files, and the control for the thief
# --------------------------------------------------------------------------------------------------------------

def test_the_thief_would_find_a_classmate_without_a_sandbox(tmp_path, monkeypatch):
    """The control for the attack test: run beside the submissions, the thief's cell steals good.ipynb."""
    subs = tmp_path / "subs"
    subs.mkdir()
    nbformat.write(GOOD, subs / "good.ipynb")
    monkeypatch.chdir(subs)
    namespace = {"torch": torch, "SUBMISSIONS": str(subs), "INSTRUCTOR_DIR": str(tmp_path)}
    exec(THIEF, namespace)
    assert exercises.run("dominance_ratio", namespace["dominance_ratio"]).passed


def test_assignment_comes_from_metadata_else_from_the_functions_defined():
    source = nbformat.read(assign.SOURCES / "04_super_neurons.ipynb", as_version=4)
    assert assign.assignment_of(source) == "04_super_neurons"
    source.metadata.pop("sinkbook")  # as a notebook that went through an editor that drops unknown metadata
    assert assign.assignment_of(source) == "04_super_neurons"
    source.cells = [c for c in source.cells if "def kendall_tau(" not in c.source]
    assert assign.assignment_of(source) is None


def test_grader_rows_for_unreadable_and_unknown_notebooks(tmp_path, monkeypatch):
    monkeypatch.setattr(assign, "sandbox_problem", lambda hidden=(): None)  # nothing here reaches a sandbox
    folder = tmp_path / "subs"
    folder.mkdir()
    (folder / "garbage.ipynb").write_text("{not json")
    nbformat.write(nbformat.v4.new_notebook(), folder / "anonymous.ipynb")
    rows = assign.grade(folder, tmp_path / "g.csv")
    assert [(r["student"], r["exercise"], r["result"]) for r in rows] == [("anonymous", "*", "fail"), ("garbage", "*", "fail")]
    assert "cannot tell which assignment this is" in rows[0]["message"] and "05_disparity" in rows[0]["message"]
    assert rows[1]["message"].startswith("not a readable notebook")
    with open(tmp_path / "g.csv", newline="") as f:
        assert f.readline().startswith("# graded in bubblewrap sandboxes")
        assert [r["student"] for r in csv.DictReader(f)] == ["anonymous", "garbage"]


def test_limits_describe_themselves():
    assert assign.Limits(30, 2048, 64).describe() == "timeout 30 s, memory 2048 MB per process, 64 processes and threads"
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds, got inf"):
        assign.Limits(math.inf)


# --------------------------------------------------------------------------------------------------------------
# The nbgrader course: nbgrader grades as the built-in grader does
# --------------------------------------------------------------------------------------------------------------

def test_nbgrader_source_keeps_signature_and_docstring_and_marks_the_body():
    source = 'def f(x):\n    """Doc."""\n    y = x + 1\n    return y\n\n\ndef g(x):\n    "One."\n    return x'
    assert assign.solution_regions(source) == (
        'def f(x):\n    """Doc."""\n    ### BEGIN SOLUTION\n    y = x + 1\n    return y\n    ### END SOLUTION\n\n\n'
        'def g(x):\n    "One."\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION')
    with pytest.raises(ValueError, match="only function definitions"):
        assign.solution_regions("import os\n\ndef f(x):\n    'Doc.'\n    return x")
    for path in assign.sources():
        nb = assign.nbgrader_source(nbformat.read(path, as_version=4))
        graded = [c.metadata["nbgrader"] for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
        assert [(g["grade_id"], g["points"], g["locked"]) for g in graded] == [
            (f"test_{ex.name}", assign.NBGRADER_POINTS, True) for ex in exercises.of_chapter(path.stem)]
        solutions = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
        assert len(solutions) == len(graded) and all("### BEGIN SOLUTION" in c.source for c in solutions)


def _filled(release, source):
    """The released notebook with the instructor's bodies written in, as a student who solved it hands it in."""
    nb = copy.deepcopy(release)
    bodies = {c.metadata["nbgrader"]["grade_id"]: c.source for c in source.cells if "nbgrader" in c.metadata}
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("solution"):
            cell.source = "\n".join(line for line in bodies[cell.metadata["nbgrader"]["grade_id"]].splitlines()
                                    if line.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION"))
    return nb


@pytest.mark.skipif(not (assign.ROOT / "sinkutils" / "checkpoints" / "sinkbook-tiny" / "config.json").exists(),
                    reason="embedded model sinkbook-tiny not trained yet")
def test_nbgrader_autograde_agrees_with_the_builtin_grader(tmp_path):
    pytest.importorskip("nbgrader", reason="nbgrader is not installed (requirements.txt pins it)")
    name = "05_disparity"
    course = tmp_path / "course"
    assert assign.main(["nbgrader", str(course), "--assignment", name]) == 0
    env = os.environ | {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}  # nbgrader runs alembic

    def nbgrader(*args):
        done = subprocess.run(["nbgrader", *args, "--force"], cwd=course, env=env, capture_output=True, text=True,
                              timeout=1200)  # a hang guard, not a speed test
        assert done.returncode == 0, done.stderr[-2000:]

    nbgrader("generate_assignment", name)
    release = nbformat.read(course / "release" / name / f"{name}.ipynb", as_version=4)
    source = nbformat.read(course / "source" / name / f"{name}.ipynb", as_version=4)
    assert "a.amax(dim=-1)" not in nbformat.writes(release)  # no solution reaches the students
    good = _filled(release, source)
    submissions = {"good": good, "wrong": _edited(good, "a.amax(dim=-1)", "x.amax(dim=-1)"), "stub": release}
    builtin = tmp_path / "builtin"
    builtin.mkdir()
    for student, nb in submissions.items():
        path = course / "submitted" / student / name / f"{name}.ipynb"
        path.parent.mkdir(parents=True)
        nbformat.write(nb, path)
        nbformat.write(nb, builtin / f"{student}.ipynb")
    nbgrader("autograde", name)
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        theirs = {(s, ex.name): gb.find_grade(f"test_{ex.name}", name, name, s).score == assign.NBGRADER_POINTS
                  for s in submissions for ex in exercises.of_chapter(name)}
    rows = assign.grade(builtin, tmp_path / "grades.csv", timeout=600, unsafe=assign.sandbox_problem() is not None)
    ours = {(r["student"], r["exercise"]): r["result"] == "pass" for r in rows}
    assert theirs == ours
    assert ours == {("good", "dominance_ratio"): True, ("good", "mean_pairwise_cosine"): True,
                    ("wrong", "dominance_ratio"): False, ("wrong", "mean_pairwise_cosine"): True,
                    ("stub", "dominance_ratio"): False, ("stub", "mean_pairwise_cosine"): False}
