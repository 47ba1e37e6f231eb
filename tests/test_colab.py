"""The chapters' set-up cell (their first code cell) works in Colab: in an environment that has torch but not
sinkutils it installs the package, never touches torch, and ``import sinkutils`` works afterwards.

Colab is simulated by a fresh virtual environment (no system site-packages) with torch and IPython preinstalled,
as Colab ships them; everything else sinkutils needs is installed by the cell itself, which is harder than in
Colab (it preinstalls numpy, transformers, matplotlib, ipywidgets). The cell installs the release tag by
default; the test points ``SINKBOOK_INSTALL_SPEC`` at a copy of this working tree instead. Each chapter's cell
runs in turn (sinkbook uninstalled before each, so every cell really installs).

The end-to-end test is marked ``slow`` (deselected by default; ``pytest -m slow tests/test_colab.py``): it
creates a ~1 GB environment and installs torch (from the local wheel where pip finds one, as on this project's
machines; CI points pip at the CPU wheel index) and sinkbook's dependencies from the package index, ~3 min on
two cores. The checks on the cells themselves always run.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

from sinkutils import project

DEFAULT_SPEC = "sinkbook @ git+https://github.com/sinkbook/sinkbook@v"


def setup_cells() -> dict[str, str]:
    cells = {}
    for chapter in project.chapters():
        nb = nbformat.read(project.ROOT / "chapters" / f"{chapter}.ipynb", as_version=4)
        cells[chapter] = next(c for c in nb.cells if c.cell_type == "code").source
    return cells


def test_setup_cell_is_identical_in_every_chapter_and_installs_a_tag_by_default():
    cells = setup_cells()
    assert len(set(cells.values())) == 1, f"set-up cells differ: {sorted(cells)}"
    cell = next(iter(cells.values()))
    assert 'find_spec("sinkutils") is None' in cell
    assert "SINKBOOK_INSTALL_SPEC" in cell and "%pip install" in cell
    default = re.search(r'"SINKBOOK_INSTALL_SPEC", "([^"]+)"', cell).group(1)
    version = re.search(r'^version = "([^"]+)"', (project.ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert default == DEFAULT_SPEC + version, f"Colab installs {default!r}; the package is version {version}"
    assert "torch" not in cell.split("%pip install", 1)[1], "the set-up cell must not install torch"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd[:4]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def torch_fingerprint(python: Path, cwd: Path) -> str:
    """torch's version, location and the identity of its installed-files record (a reinstall rewrites it)."""
    code = ("import importlib.metadata as md, os, torch; d = md.distribution('torch'); "
            "record = next(d.locate_file(f) for f in d.files if f.name == 'RECORD'); s = os.stat(record); "
            "print(torch.__version__, torch.__file__, record, s.st_ino, s.st_mtime_ns)")
    return run([str(python), "-c", code], cwd=cwd).stdout.strip().splitlines()[-1]


@pytest.fixture
def scratch():
    """A temp folder removed afterwards (the environment is ~1 GB; pytest would keep tmp_path's)."""
    with tempfile.TemporaryDirectory(prefix="sinkbook-colab-") as tmp:
        yield Path(tmp)


@pytest.mark.slow
def test_setup_cell_installs_sinkutils_in_simulated_colab_without_touching_torch(scratch):
    import torch

    tmp_path = scratch
    env_dir = tmp_path / "colab"
    run([sys.executable, "-m", "venv", str(env_dir)], cwd=tmp_path)  # fresh: no system site-packages, no parent venv
    python = env_dir / "bin" / "python"
    # Colab's preinstalled torch (the same version as here; pip takes the CPU wheel from the configured index)
    run([str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__}", "ipython"], cwd=tmp_path, timeout=900)
    before = torch_fingerprint(python, tmp_path)
    assert run([str(python), "-c", "import importlib.util as u; print(u.find_spec('sinkutils'))"],
               cwd=tmp_path).stdout.strip() == "None"

    checkout = tmp_path / "checkout"  # the working tree as it is, without environments and build outputs
    shutil.copytree(project.ROOT, checkout, ignore=shutil.ignore_patterns(
        ".venv", ".git", "_build", "artifacts", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    env = {**os.environ, "SINKBOOK_INSTALL_SPEC": str(checkout)}
    env.pop("PYTHONPATH", None)
    site_packages = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp_path).stdout.strip()
    for i, (chapter, cell) in enumerate(setup_cells().items()):
        if i:  # so that every chapter's cell installs
            run([str(python), "-m", "pip", "uninstall", "-q", "-y", "sinkbook"], env=env, cwd=tmp_path)
        # the cell as Colab runs it: IPython, %pip magic included, in the environment's interpreter
        run([str(env_dir / "bin" / "ipython"), "--no-banner", "--colors=NoColor", "-c", cell], env=env,
            cwd=tmp_path, timeout=900)
        where = run([str(python), "-c", "import sinkutils, sinkutils.models, sinkutils.widgets; print(sinkutils.__file__)"],
                    env=env, cwd=tmp_path).stdout.strip()
        assert where.startswith(site_packages), f"{chapter}: sinkutils imported from {where}, not the environment"
        assert torch_fingerprint(python, tmp_path) == before, f"{chapter}: the set-up cell reinstalled or changed torch"
    # once installed, the cell does nothing (no pip run, so it is instant offline too)
    done = run([str(env_dir / "bin" / "ipython"), "--no-banner", "-c", next(iter(setup_cells().values()))],
               env={**env, "SINKBOOK_INSTALL_SPEC": "/nonexistent"}, cwd=tmp_path)
    assert "ERROR" not in done.stdout + done.stderr
