"""Issue 17's hang: execute a chapter with CPU-bound processes beside it, with papermill's stock engine (kernel over
TCP, no watchdog: what `run.sh book` did) or with `sinkutils.book`'s watched engine (IPC, stall watchdog).

    python benchmarks/book_hang.py --chapter 03_interventions --hogs 1 --runs 3 --engine stock
    python benchmarks/book_hang.py --stalled-cell --engine stock      # a cell whose kernel sits idle: hangs to --timeout
    python benchmarks/book_hang.py --stalled-cell --engine sinkbook   # the same: interrupted, retried once, named
    python benchmarks/book_hang.py --widget-race --engine stock --hogs 2 --hog-nice 0 --timeout 15
        # cells of Output widgets (widgets.switcher's): nbclient sends their comm messages on the shell socket it
        # awaits the reply on, and a reply arriving during a send goes unnoticed until the cell's timeout; with
        # --engine sinkbook the wait re-polls each second (book.bounded_shell_wait)

Prints one line per run: seconds, the outcome, and the longest silence between two kernel messages. A hog runs at
``--hog-nice`` (default 19, so it takes only idle CPU from everything else on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from sinkutils import book, project

HOG = "while True: pass"
STALL = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)  # like a kernel that lost the request\n" \
        "time.sleep(3600)"


def synthetic_root(tmp: Path, chapter: str, sources: list[str]) -> Path:
    """A book root with one chapter of the given cells after a parameters cell (its cpu profile sets ``n``)."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("n = 3", metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in sources]
    (tmp / "chapters").mkdir(parents=True)
    (tmp / "profiles").mkdir()
    nbformat.write(nb, tmp / "chapters" / f"{chapter}.ipynb")
    (tmp / "profiles" / "cpu.yml").write_text(json.dumps({"defaults": {"n": 3}}))
    return tmp


def stalled_root(tmp: Path) -> Path:
    """A book root with one chapter 99_stalled: a few quick cells, then one that sits idle ignoring interrupts."""
    return synthetic_root(tmp, "99_stalled", [f"print(sum(range(10 ** 6)) + {i})" for i in range(20)] + [STALL])


WIDGETS = ("import ipywidgets as W\nfrom IPython.display import display\nouts = []\nfor i in range(12):\n"
           "    o = W.Output()\n    with o:\n        display({'image/png': 'iVBOR' + 'A' * 80000}, raw=True)\n"
           "    outs.append(o)\nW.VBox(outs)")


def widgets_root(tmp: Path, cells: int = 60) -> Path:
    """A book root with one chapter 99_widgets: ``cells`` cells of 12 Output widgets, each holding a figure-sized
    output, as ``widgets.switcher`` builds them."""
    return synthetic_root(tmp, "99_widgets", [WIDGETS] * cells)


def cells_at_timeout(path: Path, timeout: float) -> int:
    """Cells that ran for (nearly) the whole per-cell timeout: their reply was taken only when the wait ended."""
    if not path.exists():
        return -1
    return sum((c.metadata.get("papermill", {}).get("duration") or 0) >= 0.9 * timeout
               for c in nbformat.read(path, as_version=4).cells)


def run_once(chapter: str, root: Path, out: Path, engine: str, timeout: int, stall: float) -> tuple[float, str]:
    import papermill

    start = time.time()
    try:
        if engine == "sinkbook":
            book.execute(chapter, "cpu", out, root=root, timeout=timeout, stall_timeout=stall)
        else:
            papermill.execute_notebook(str(root / "chapters" / f"{chapter}.ipynb"), str(out / f"{chapter}.ipynb"),
                                       parameters=project.parameters("cpu", chapter, root), kernel_name="python3",
                                       cwd=str(root), progress_bar=False, execution_timeout=timeout)
        outcome = "completed"
    except Exception as err:  # the outcome is what this script reports
        outcome = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    return time.time() - start, outcome


def longest_silence(path: Path) -> float:
    """The longest gap between one cell's end and the next one's (papermill's per-cell timestamps)."""
    if not path.exists():
        return float("nan")
    from datetime import datetime

    cells = [c.metadata.get("papermill", {}) for c in nbformat.read(path, as_version=4).cells]
    times = [(datetime.fromisoformat(c["start_time"].rstrip("Z")), datetime.fromisoformat(c["end_time"].rstrip("Z")))
             for c in cells if c.get("start_time") and c.get("end_time")]
    return max([(b[0] - a[1]).total_seconds() for a, b in zip(times, times[1:])] + [0.0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chapter", default="03_interventions")
    p.add_argument("--stalled-cell", action="store_true", help="run a synthetic chapter whose last cell stalls")
    p.add_argument("--widget-race", action="store_true", help="run a synthetic chapter of Output-widget cells")
    p.add_argument("--engine", choices=["stock", "sinkbook"], default="sinkbook")
    p.add_argument("--hogs", type=int, default=1)
    p.add_argument("--hog-nice", type=int, default=19)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--timeout", type=int, default=600, help="per-cell timeout (papermill's execution_timeout)")
    p.add_argument("--stall-timeout", type=float, default=book.STALL_TIMEOUT)
    args = p.parse_args()
    hogs = [subprocess.Popen(["nice", "-n", str(args.hog_nice), sys.executable, "-c", HOG]) for _ in range(args.hogs)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = (stalled_root(Path(tmp) / "root") if args.stalled_cell else
                    widgets_root(Path(tmp) / "root") if args.widget_race else project.ROOT)
            chapter = "99_stalled" if args.stalled_cell else "99_widgets" if args.widget_race else args.chapter
            for i in range(args.runs):
                out = Path(tmp) / f"out{i}"
                out.mkdir()
                seconds, outcome = run_once(chapter, root, out, args.engine, args.timeout, args.stall_timeout)
                done = out / f"{chapter}.ipynb"
                print(f"run {i + 1}: {chapter} engine={args.engine} hogs={args.hogs} {seconds:7.1f} s  {outcome}  "
                      f"longest gap between cells {longest_silence(done):.1f} s; cells that waited for their "
                      f"{args.timeout} s timeout: {cells_at_timeout(done, args.timeout)}", flush=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


if __name__ == "__main__":
    main()
