"""Execute the chapters with papermill under a profile, then build the site with execution off.

    python -m sinkutils.book --profile cpu            # execute every chapter, build _build/html
    python -m sinkutils.book --profile cpu --only 01_sink --no-html
    python -m sinkutils.book --format                 # ruff format the chapters' code (tests/test_format.py)

The assignments' instructor editions (``assignments/NN_*.ipynb``) are executed too, into
``_build/stage/assignments``, unless ``--no-assignments``; ``--only`` alone executes them and no chapter.

Sources are staged into ``_build/stage`` so the committed notebooks stay output-free (Colab opens them
clean); executed copies keep their outputs and widget state and are what Jupyter Book renders.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from sinkutils.project import ROOT, chapters, declared, parameters

STAGED = ("_config.yml", "_toc.yml", "book")


class ChapterFailed(RuntimeError):
    """A chapter's cell raised, its kernel died or stalled: the message names the chapter and the cell."""


class CellTrouble(Exception):
    """Raised by the watched client (see ``_engine``) when a cell stalled, timed out or lost its kernel."""

    def __init__(self, what: str, index: int, source: str, stalled: bool = False):
        super().__init__(what)
        self.what, self.index, self.stalled = what, index, stalled
        self.first_line = source.strip().splitlines()[0] if source.strip() else ""


#: a cell whose kernel uses no CPU and sends nothing for this long is stalled (``--stall-timeout``)
STALL_TIMEOUT = 180.0
#: the largest resident memory (bytes) of the kernel and its children, sampled each second while a cell runs:
#: ``"last"`` for the notebook executing now, then each chapter's by name (``execute``)
PEAK_RSS: dict[str, int] = {}


#: seconds between fresh looks at the shell socket while a cell's reply is awaited (``bounded_shell_wait``)
SHELL_RECHECK = 1.0


def bounded_shell_wait(kc) -> None:
    """Make ``kc``'s shell ``get_msg`` wait in steps of ``SHELL_RECHECK`` seconds, each a fresh poll of the socket.

    nbclient awaits a cell's execute_reply on the shell socket while its mock of the ipywidgets Output widget sends
    comm messages on that same socket (``nbclient.output_widget``: every ``with out:`` of ``widgets.switcher``). A
    send can consume the socket's edge-triggered read signal, so a reply arriving meanwhile is never noticed: the
    kernel idles and the cell waits until its timeout (a chapter's switcher cell, twice in three full test runs).
    A fresh poll reads the socket's pending events, so such a reply is taken within a second."""
    from queue import Empty

    channel = kc.shell_channel
    if getattr(channel, "_sinkbook_bounded", False):
        return
    get_msg = channel.get_msg

    async def bounded(timeout: float | None = None, **kwargs):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = SHELL_RECHECK if left is None else min(SHELL_RECHECK, left)
            try:
                return await get_msg(timeout=step, **kwargs)
            except Empty:
                if left is not None and left <= SHELL_RECHECK:
                    raise

    channel.get_msg = bounded
    channel._sinkbook_bounded = True


def _engine() -> str:
    """Register (once) and name papermill's nbclient engine with a watched client. The client starts the kernel
    over IPC sockets in a private folder (TCP gave a warning per chapter, and its ports can be taken by another
    process between being chosen and bound), and watches each cell: when the kernel has neither used CPU nor sent
    a message for ``stall_timeout`` seconds the cell is interrupted and, if the kernel does not answer that
    either, abandoned. It raises ``CellTrouble`` naming the cell for a stall, a cell timeout or a dead kernel."""
    import asyncio
    import tempfile

    import psutil
    from jupyter_core.utils import ensure_async, run_sync
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, papermill_engines
    from traitlets import Float

    if "sinkbook" in papermill_engines._engines:
        return "sinkbook"

    class WatchedClient(PapermillNotebookClient):
        stall_timeout = Float(STALL_TIMEOUT)
        poll_interval = Float(1.0)

        def create_kernel_manager(self):
            self._ipc_dir = tempfile.TemporaryDirectory(prefix="sinkbook-kernel-")
            self.km = self.kernel_manager_class(kernel_name=self.kernel_name, config=self.config, transport="ipc",
                                                ip=os.path.join(self._ipc_dir.name, "kernel"))
            return self.km

        def process_message(self, msg, cell, cell_index):
            self._messages = getattr(self, "_messages", 0) + 1
            return super().process_message(msg, cell, cell_index)

        def _kernel_cpu(self) -> float:
            """CPU seconds of the kernel and its children so far (0 when the process is not visible); notes their
            resident memory in ``PEAK_RSS`` (the budget of issue 24: under 3 GB a chapter)."""
            try:
                proc = psutil.Process(self.km.provisioner.pid)
                family = [proc, *proc.children(recursive=True)]
                PEAK_RSS["last"] = max(PEAK_RSS.get("last", 0), sum(p.memory_info().rss for p in family))
                return sum(sum(p.cpu_times()[:2]) for p in family)
            except (AttributeError, TypeError, psutil.Error):
                return 0.0

        async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
            bounded_shell_wait(self.kc)
            run = asyncio.ensure_future(super().async_execute_cell(cell, cell_index, execution_count, store_history))
            seen, last, interrupted = (self._kernel_cpu(), getattr(self, "_messages", 0)), time.monotonic(), False
            while not run.done():
                await asyncio.wait({run}, timeout=self.poll_interval)
                now = (self._kernel_cpu(), getattr(self, "_messages", 0))
                # progress: a message, or CPU in this interval beyond an idle kernel's wake-ups (2% of a core)
                moved = now[1] != seen[1] or now[0] - seen[0] > 0.02 * self.poll_interval
                seen = now
                if moved:
                    last = time.monotonic()
                elif time.monotonic() - last > self.stall_timeout and not run.done():
                    if interrupted:  # the kernel did not answer the interrupt either: abandon the cell
                        self.task_poll_for_reply.cancel()
                        await asyncio.wait({run})
                        for task in asyncio.all_tasks():  # and nbclient's liveness poll, which only a reply stops
                            if "_async_poll_kernel_alive" in repr(task.get_coro()):
                                task.cancel()
                        break
                    self.log.warning("cell %s made no progress for %.0f s: interrupting", cell_index, self.stall_timeout)
                    interrupted, last = True, time.monotonic()
                    await ensure_async(self.km.interrupt_kernel())
            try:
                return run.result()
            except BaseException as err:
                if interrupted:
                    raise CellTrouble(f"made no progress for {self.stall_timeout:.0f} s (the kernel used no CPU and "
                                      f"sent nothing)", cell_index, cell.source, stalled=True) from err
                if isinstance(err, CellTimeoutError):
                    raise CellTrouble(f"timed out ({err})", cell_index, cell.source) from err
                if isinstance(err, DeadKernelError):
                    raise CellTrouble("lost its kernel (it died: out of memory, or a crash in native code?)",
                                      cell_index, cell.source) from err
                raise

        execute_cell = run_sync(async_execute_cell)  # what papermill calls; nbclient's binds its own method

        async def _async_cleanup_kernel(self):
            try:
                await super()._async_cleanup_kernel()
            finally:
                self._ipc_dir.cleanup()

    class WatchedEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,
                                     stderr_file=None, start_timeout=60, execution_timeout=None, **kwargs):
            kwargs.pop("input_path", None)
            return WatchedClient(nb_man, timeout=execution_timeout, startup_timeout=start_timeout,
                                 kernel_name=kernel_name, log_output=log_output, stdout_file=stdout_file,
                                 stderr_file=stderr_file, **kwargs).execute()

    papermill_engines.register("sinkbook", WatchedEngine)
    return "sinkbook"


def assignments(root: Path = ROOT) -> list[str]:
    """The assignments' instructor editions (``assignments/NN_*.ipynb``, see ``sinkutils.assign``)."""
    return sorted(p.stem for p in (root / "assignments").glob("[0-9][0-9]_*.ipynb"))


def execute(chapter: str, profile: str, out_dir: Path, root: Path = ROOT, timeout: int = 1800,
            overrides: dict | None = None, folder: str = "chapters", stall_timeout: float = STALL_TIMEOUT) -> float:
    """Run one chapter with papermill into ``out_dir``; returns seconds. A failing cell raises ChapterFailed.
    ``overrides`` replace the profile's parameters that the chapter declares (``--param`` on the command line).
    ``folder="assignments"`` runs an assignment's instructor edition instead: no profile parameters (it runs the
    embedded model under every profile, in seconds), and a failing check fails it like any cell.
    A cell that makes no progress for ``stall_timeout`` seconds is interrupted and the chapter run once more in a
    fresh kernel; a second stall, a dead kernel or a cell past ``timeout`` raise ChapterFailed naming the cell."""
    import papermill

    if folder not in ("chapters", "assignments"):
        raise ValueError(f"folder must be 'chapters' or 'assignments', got {folder!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    source = root / folder / f"{chapter}.ipynb"
    declared = papermill.inspect_notebook(str(source))  # an override the chapter lacks is simply not passed
    overrides = {k: v for k, v in (overrides or {}).items() if k in declared}
    start = time.time()
    PEAK_RSS["last"] = 0
    # progress bars help someone waiting at a live kernel; on the static page they would be dead widgets
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the kernel inherits this process's environment
    params = (parameters(profile, chapter, root) if folder == "chapters" else {}) | overrides
    try:
        for attempt in (1, 2):
            try:
                papermill.execute_notebook(str(source), str(out_dir / f"{chapter}.ipynb"), parameters=params,
                                           kernel_name="python3", cwd=str(root), progress_bar=False,
                                           execution_timeout=timeout, request_save_on_cell_execute=False,
                                           engine_name=_engine(), stall_timeout=stall_timeout)
                tidy(out_dir / f"{chapter}.ipynb", params, declared)
                break
            except CellTrouble as err:
                where = f"{folder[:-1]} {chapter}: cell {err.index} (starting {err.first_line!r}) {err.what}"
                if not (err.stalled and attempt == 1):
                    raise ChapterFailed(where + ("; interrupted, retried once in a fresh kernel, stalled again"
                                                 if err.stalled else "")) from err
                tqdm.write(f"{where}; interrupted, retrying the {folder[:-1]} once in a fresh kernel")
    except papermill.PapermillExecutionError as err:
        first_line = err.source.strip().splitlines()[0] if err.source.strip() else ""
        raise ChapterFailed(f"{folder[:-1]} {chapter} failed in the cell starting {first_line!r}: "
                            f"{err.ename}: {err.evalue}") from err
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
        PEAK_RSS[chapter if folder == "chapters" else f"{folder}/{chapter}"] = PEAK_RSS["last"]
    return time.time() - start


def tidy(notebook: Path, params: dict, declared: dict) -> None:
    """Presentation tags on an executed copy (the committed sources stay as they are): the Colab set-up cell is
    collapsed (``hide-input``), and papermill's injected-parameters cell is removed from the page when it sets
    every parameter to the default the ``parameters`` cell already shows (the parameters appear once); when the
    profile changes one, both stay, so the page shows what ran."""
    import ast

    import nbformat

    nb = nbformat.read(notebook, as_version=4)

    def default(name):
        try:
            return ast.literal_eval(declared[name]["default"])
        except (KeyError, ValueError, SyntaxError):
            return object()  # not a literal: counts as changed

    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if cell.cell_type == "code" and cell.source.startswith("# Set-up:") and "hide-input" not in tags:
            tags.append("hide-input")
        if "injected-parameters" in tags and all(default(k) == v for k, v in params.items()):
            tags.append("remove-cell")
    nbformat.write(nb, notebook)


def format_chapters(check: bool = False, root: Path = ROOT) -> str:
    """``ruff format`` (pinned in requirements.txt) over the chapters' code cells, with ``chapters/ruff.toml``: 100
    characters, what the site's content column holds at 1280 px. The Colab set-up cell is left as it is: every
    assignment carries it verbatim (``tests/test_assignments.py``). ``check``: nothing changes; returns ruff's diff
    of what it would change (empty when every cell is formatted). Otherwise rewrites the cells that change and
    returns ruff's summary. ``python -m sinkutils.book --format`` runs it."""
    import json
    import tempfile

    ruff = Path(sys.executable).with_name("ruff")
    ruff = str(ruff) if ruff.exists() else shutil.which("ruff")
    if ruff is None:
        raise RuntimeError("ruff is not installed; requirements.txt pins it: .venv/bin/pip install -r requirements.txt")
    with tempfile.TemporaryDirectory(prefix="sinkbook-format-") as tmp:
        copies = {}
        for name in chapters(root):
            nb = json.loads((root / "chapters" / f"{name}.ipynb").read_text())
            setup = next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code")
            nb["cells"][setup] = {"cell_type": "raw", "metadata": {}, "source": nb["cells"][setup]["source"]}
            copies[name] = Path(tmp) / f"{name}.ipynb"
            copies[name].write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        done = subprocess.run([ruff, "format", "--config", str(root / "chapters" / "ruff.toml"),
                               *(["--check", "--diff"] if check else []), *map(str, copies.values())],
                              capture_output=True, text=True, cwd=tmp)
        if done.returncode and not (check and done.returncode == 1):
            raise RuntimeError(f"ruff format failed: {done.stderr.strip()}")
        if check:
            return done.stdout.replace(tmp + "/", "chapters/") if done.returncode else ""
        for name, copy in copies.items():
            formatted = json.loads(copy.read_text())["cells"]
            path = root / "chapters" / f"{name}.ipynb"
            nb = json.loads(path.read_text())  # read again now: another edit may have landed meanwhile
            changed = False
            for cell, new in zip(nb["cells"], formatted):
                if cell["cell_type"] == "code" == new["cell_type"] and "".join(cell["source"]) != "".join(new["source"]):
                    cell["source"], changed = new["source"], True
            if changed:
                path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        return done.stderr.strip() or done.stdout.strip()


def stage(root: Path = ROOT) -> Path:
    """Copy the non-executable sources into ``_build/stage``; chapters are written there by ``execute``."""
    stage_dir = root / "_build" / "stage"
    stage_dir.mkdir(parents=True, exist_ok=True)
    for name in STAGED:
        src, dst = root / name, stage_dir / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    return stage_dir


def build_html(stage_dir: Path, root: Path = ROOT, board: dict | None = None) -> Path:
    """Jupyter Book v1 over the staged sources; warnings are errors so a broken page fails the build. The
    embedded models are exported for the "try it" page first (``sinkutils.browser``, into ``_static/browser``),
    and the scoreboard pages are written from ``board`` (``scoreboard.measure``; default: the embedded models)."""
    from sinkutils import browser, scoreboard
    browser.export_all(stage_dir / "book" / "static" / "browser")
    board = board if board is not None else scoreboard.measure(scoreboard.columns())
    scoreboard.write(board, stage_dir / "book", stage_dir / "chapters")
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(stage_dir), "--path-output", str(root), "-W",
           "--keep-going", "--all"]
    subprocess.run(cmd, check=True)
    return root / "_build" / "html"


def parse_params(items: list[str]) -> dict:
    """``--param NAME=YAML`` values as a dict of parameter overrides (the value is read as YAML)."""
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"--param expects NAME=VALUE, got {item!r}")
        overrides[name] = yaml.safe_load(value)
    return overrides


def shared_store(root: Path = ROOT) -> Path:
    """Measure once per build: every chapter's kernel (they inherit this process's environment) and the scoreboard
    read and write one ``store`` (``SINKBOOK_STORE``, default ``_build/store``; its keys make a stale entry
    unreadable), and OpenMP threads wait passively (``OMP_WAIT_POLICY``: spinning threads of one process take the
    cores from the next; ``benchmarks/measure_once.py --contention``)."""
    os.environ.setdefault("SINKBOOK_STORE", str(root / "_build" / "store"))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return Path(os.environ["SINKBOOK_STORE"])


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Execute (and build); prints and returns seconds per chapter, for the HTML build, and in total."""
    p = argparse.ArgumentParser(prog="python -m sinkutils.book", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="cpu")
    p.add_argument("--only", nargs="*", help="chapter names, e.g. 01_sink (default: all; `--only` alone: none)")
    p.add_argument("--no-assignments", action="store_true",
                   help="do not execute the assignments (assignments/NN_*.ipynb, seconds each; run by default)")
    p.add_argument("--no-html", action="store_true", help="execute only")
    p.add_argument("--param", action="append", default=[], metavar="NAME=YAML",
                   help="override a parameter in every chapter, e.g. --param model_name=smollm-135m "
                        "--param 'compare_models=[]' (the value is read as YAML)")
    p.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT, metavar="SECONDS",
                   help="a cell whose kernel uses no CPU and sends nothing this long is interrupted and its chapter "
                        f"retried once (default {STALL_TIMEOUT:.0f})")
    p.add_argument("--format", action="store_true",
                   help="format the chapters' code cells with ruff format (chapters/ruff.toml) and stop")
    args = p.parse_args(argv)
    if args.format:
        print(format_chapters())
        return {}
    overrides = parse_params(args.param)
    names = chapters() if args.only is None else args.only
    unknown = sorted(set(names) - set(chapters()))
    if unknown:
        raise SystemExit(f"unknown chapters {unknown}; choose from {chapters()}")
    try:
        for name in names:
            parameters(args.profile, name)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    every = set().union(*(declared(name) for name in chapters()))  # a typo would be dropped: chapters run on defaults
    if set(overrides) - every:
        raise SystemExit(f"--param {sorted(set(overrides) - every)}: no chapter has such a parameter; theirs are "
                         f"{sorted(every)}")
    from sinkutils import preflight
    preflight.ensure(args.profile, names, overrides)  # hub models and text reachable (or cached), before any chapter
    stage_dir = stage()
    shared_store()
    timings = {}
    jobs = [("chapters", n) for n in names] + [("assignments", n) for n in ([] if args.no_assignments else assignments())]
    for folder, name in tqdm(jobs, desc=f"chapters and assignments ({args.profile})"):
        key = name if folder == "chapters" else f"assignments/{name}"
        try:
            timings[key] = execute(name, args.profile, stage_dir / folder, overrides=overrides, folder=folder,
                                   stall_timeout=args.stall_timeout)
        except ChapterFailed as err:
            raise SystemExit(str(err)) from None
        tqdm.write(f"{key}: {timings[key]:.1f} s, peak memory {PEAK_RSS.get(key, 0) / 2 ** 30:.2f} GiB")
    if not args.no_html:
        start = time.time()
        from sinkutils import scoreboard
        board = scoreboard.measure(scoreboard.columns(args.profile, overrides))
        timings["scoreboard"] = time.time() - start
        start = time.time()
        print(f"site: {build_html(stage_dir, board=board)}")
        timings["html build"] = time.time() - start
    timings["total"] = sum(timings.values())
    print("\n".join(f"{k:24s} {v:7.1f} s" for k, v in timings.items()))
    return timings


if __name__ == "__main__":
    main()
