"""Execute the chapters with papermill under a profile, then build the site with execution off.

    python -m sinkutils.book --profile cpu            # execute every chapter, build _build/html
    python -m sinkutils.book --profile cpu --only 01_sink --no-html

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

ROOT = Path(__file__).resolve().parent.parent
STAGED = ("_config.yml", "_toc.yml", "book")


class ChapterFailed(RuntimeError):
    """A chapter's cell raised: the message names the chapter and the cell."""


def chapters(root: Path = ROOT) -> list[str]:
    return sorted(p.stem for p in (root / "chapters").glob("[0-9][0-9]_*.ipynb"))


def assignments(root: Path = ROOT) -> list[str]:
    """The assignments' instructor editions (``assignments/NN_*.ipynb``, see ``sinkutils.assign``)."""
    return sorted(p.stem for p in (root / "assignments").glob("[0-9][0-9]_*.ipynb"))


def parameters(profile: str, chapter: str, root: Path = ROOT) -> dict:
    """The papermill parameters of ``chapter`` under ``profile`` (defaults, then the chapter's overrides)."""
    path = root / "profiles" / f"{profile}.yml"
    if not path.exists():
        known = sorted(p.stem for p in (root / "profiles").glob("*.yml"))
        raise ValueError(f"unknown profile {profile!r}; choose one of {known}")
    spec = yaml.safe_load(path.read_text())
    return dict(spec.get("defaults", {})) | dict((spec.get("chapters") or {}).get(chapter) or {})


def execute(chapter: str, profile: str, out_dir: Path, root: Path = ROOT, timeout: int = 1800,
            overrides: dict | None = None, folder: str = "chapters") -> float:
    """Run one chapter with papermill into ``out_dir``; returns seconds. A failing cell raises ChapterFailed.
    ``overrides`` replace the profile's parameters that the chapter declares (``--param`` on the command line).
    ``folder="assignments"`` runs an assignment's instructor edition instead: no profile parameters (it runs the
    embedded model under every profile, in seconds), and a failing check fails it like any cell."""
    import papermill

    if folder not in ("chapters", "assignments"):
        raise ValueError(f"folder must be 'chapters' or 'assignments', got {folder!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    source = root / folder / f"{chapter}.ipynb"
    declared = papermill.inspect_notebook(str(source))  # an override the chapter lacks is simply not passed
    overrides = {k: v for k, v in (overrides or {}).items() if k in declared}
    start = time.time()
    # progress bars help someone waiting at a live kernel; on the static page they would be dead widgets
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the kernel inherits this process's environment
    try:
        papermill.execute_notebook(str(source), str(out_dir / f"{chapter}.ipynb"),
                                   parameters=(parameters(profile, chapter, root) if folder == "chapters" else {})
                                   | overrides, kernel_name="python3",
                                   cwd=str(root), progress_bar=False, execution_timeout=timeout,
                                   request_save_on_cell_execute=False)
    except papermill.PapermillExecutionError as err:
        first_line = err.source.strip().splitlines()[0] if err.source.strip() else ""
        raise ChapterFailed(f"{folder[:-1]} {chapter} failed in the cell starting {first_line!r}: "
                            f"{err.ename}: {err.evalue}") from err
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
    return time.time() - start


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


def build_html(stage_dir: Path, root: Path = ROOT) -> Path:
    """Jupyter Book v1 over the staged sources; warnings are errors so a broken page fails the build."""
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
    args = p.parse_args(argv)
    overrides = parse_params(args.param)
    names = chapters() if args.only is None else args.only
    unknown = sorted(set(names) - set(chapters()))
    if unknown:
        raise SystemExit(f"unknown chapters {unknown}; choose from {chapters()}")
    from sinkutils import preflight
    preflight.ensure(args.profile, names, overrides)  # hub models and text reachable (or cached), before any chapter
    stage_dir = stage()
    timings = {}
    jobs = [("chapters", n) for n in names] + [("assignments", n) for n in ([] if args.no_assignments else assignments())]
    for folder, name in tqdm(jobs, desc=f"chapters and assignments ({args.profile})"):
        key = name if folder == "chapters" else f"assignments/{name}"
        try:
            timings[key] = execute(name, args.profile, stage_dir / folder, overrides=overrides, folder=folder)
        except ChapterFailed as err:
            raise SystemExit(str(err)) from None
        tqdm.write(f"{key}: {timings[key]:.1f} s")
    if not args.no_html:
        start = time.time()
        print(f"site: {build_html(stage_dir)}")
        timings["html build"] = time.time() - start
    timings["total"] = sum(timings.values())
    print("\n".join(f"{k:24s} {v:7.1f} s" for k, v in timings.items()))
    return timings


if __name__ == "__main__":
    main()
