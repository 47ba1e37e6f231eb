"""A newcomer's set-up holds on a fresh machine: one Python floor, enforced by run.sh; torch's CPU build chosen
explicitly where there is no NVIDIA GPU; every import of sinkutils declared; README commands that work as typed."""
from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from sinkutils import project

ROOT = project.ROOT
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def floor() -> str:
    return re.fullmatch(r">=(\d+\.\d+)", PYPROJECT["project"]["requires-python"]).group(1)


def pins(name: str = "requirements-gpu.txt") -> dict[str, str]:
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            out |= pins(line[3:].strip())
        elif "==" in line:
            req = Requirement(line)
            out[req.name] = str(req.specifier).removeprefix("==")
    return out


def test_python_floor_admits_no_version_a_pinned_package_refuses():
    """Every pinned package's own Requires-Python must hold for every Python the floor admits."""
    lowest = floor() + ".0"
    refused = {}
    for name, version in pins().items():
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        spec = dist.metadata.get("Requires-Python")
        if spec and lowest not in SpecifierSet(spec):
            refused[name] = spec
    assert not refused, f"requires-python >={floor()} admits Python {floor()}, which these pins refuse: {refused}"


def test_floor_is_stated_the_same_in_readme_and_running_md():
    for doc in ("README.md", "book/running.md"):
        stated = set(re.findall(r"Python (\d+\.\d+)\+", (ROOT / doc).read_text()))
        assert stated == {floor()}, f"{doc} states Python {stated}, pyproject requires >={floor()}"


def fake_python(tmp_path: Path, version: str) -> Path:
    exe = tmp_path / "python-old"
    exe.write_text(f"#!/bin/sh\necho {version}\n")
    exe.chmod(0o755)
    return exe


def test_run_sh_refuses_an_older_python_and_says_which_it_needs(tmp_path):
    env = os.environ | {"PYTHON": str(fake_python(tmp_path, "3.10")), "VENV": str(tmp_path / "venv")}
    done = subprocess.run(["bash", "run.sh", "test"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert f"sinkbook needs Python {floor()} or newer" in done.stderr
    assert "is Python 3.10" in done.stderr and f"PYTHON=python{floor()}" in done.stderr
    assert not (tmp_path / "venv").exists()


def torch_plan(tmp_path: Path, resolved: str, cuda: bool) -> subprocess.CompletedProcess:
    """run.sh's torch_plan where pip would resolve torch==2.13.0 to ``resolved`` (a fake pip dry-run report)."""
    py = tmp_path / "python"
    report = '{"install": [{"metadata": {"name": "torch", "version": "%s"}}]}' % resolved
    py.write_text(f"#!/bin/sh\nif [ \"$1\" = -m ] && [ \"$2\" = pip ]; then echo '{report}'; "
                  f"else exec {sys.executable} \"$@\"; fi\n")
    py.chmod(0o755)
    script = f"source run.sh\nhas_cuda() {{ return {0 if cuda else 1}; }}\ntorch_plan {py}"
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)


def test_torch_cpu_wheel_index_without_cuda_when_pip_would_take_the_cuda_build(tmp_path):
    if os.uname().sysname != "Linux":
        return  # elsewhere PyPI's wheel is the CPU build and run.sh leaves the index alone
    public = torch_plan(tmp_path, "2.13.0", cuda=False)
    assert public.stdout.split() == ["--index-url", "https://download.pytorch.org/whl/cpu", "torch==2.13.0"]
    assert "the CPU build" in public.stderr and "about 200 MB" in public.stderr and "3 GB CUDA" in public.stderr
    local = torch_plan(tmp_path, "2.13.0+cpu", cuda=False)  # CI's extra index, this project's local wheel
    assert local.stdout.split() == ["torch==2.13.0"] and "2.13.0+cpu" in local.stderr
    gpu = torch_plan(tmp_path, "2.13.0", cuda=True)
    assert gpu.stdout.split() == ["torch==2.13.0"] and "with CUDA" in gpu.stderr


def third_party_imports() -> dict[str, set[str]]:
    """distribution -> sinkutils modules importing it (absolute imports only, at any depth)."""
    dists = md.packages_distributions()
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / "sinkutils").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "sinkutils":
                    continue
                for dist in dists.get(top, [top]):
                    out.setdefault(Requirement(dist).name.lower().replace("_", "-"), set()).add(path.stem)
    return out


def declared() -> set[str]:
    reqs = list(PYPROJECT["project"]["dependencies"])
    reqs += [r for extra in PYPROJECT["project"]["optional-dependencies"].values() for r in extra]
    return {Requirement(r).name.lower().replace("_", "-") for r in reqs}


def test_every_import_of_sinkutils_is_declared_in_pyproject():
    missing = {d: sorted(m) for d, m in third_party_imports().items() if d not in declared()}
    assert not missing, f"imported by sinkutils but not declared in pyproject.toml: {missing}"


def test_every_declared_package_is_pinned_for_run_sh():
    pinned = {n.lower().replace("_", "-") for n in pins()} | {"torch"}  # torch: run.sh's torch_plan
    unpinned = declared() - pinned
    assert not unpinned, f"declared in pyproject.toml but not pinned in requirements*.txt: {sorted(unpinned)}"


ALLOWED = ("bash run.sh ", ".venv/bin/python ", ".venv/bin/hf ", ".venv/bin/torchrun ", "git ", "cd ")


def commands(doc: str) -> list[str]:
    """The shell commands of ``doc``'s ```bash blocks, comments and continuations folded."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", (ROOT / doc).read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out += [part.strip() for part in line.split("&&")]
    return out


def test_readme_commands_work_as_typed():
    """Every command is a run.sh verb or goes through .venv's own executables (nothing assumes an activated
    venv), and each module or executable it names exists there."""
    for doc in ("README.md", "book/running.md"):
        for typed in commands(doc):
            settings = re.match(r"(?:[A-Z_]+=\S+ )*", typed).group(0)  # VAR=value ... before the command
            cmd = typed[len(settings):]
            assert cmd.startswith(ALLOWED), f"{doc}: {typed!r} does not work as typed on a fresh machine"
            profile = re.search(r"\bPROFILE=(\S+)", settings)
            if profile:
                assert (ROOT / "profiles" / f"{profile.group(1)}.yml").exists(), f"{doc}: no profile {profile.group(1)}"
            module = re.match(r"\.venv/bin/python -m ([\w.]+)", cmd)
            if module:
                assert importlib.util.find_spec(module.group(1)), f"{doc}: no module {module.group(1)}"
            exe = re.match(r"\.venv/bin/(\w+)", cmd)
            if exe:
                assert (Path(sys.prefix) / "bin" / exe.group(1)).exists(), f"{doc}: no .venv/bin/{exe.group(1)}"
            script = re.match(r"\.venv/bin/python ([\w/]+\.py)", cmd)
            if script:
                assert (ROOT / script.group(1)).exists(), f"{doc}: no {script.group(1)}"


def run_test_packages(tmp_path: Path, uid: int) -> tuple[subprocess.CompletedProcess, Path]:
    """run.sh's test_packages on a machine with apt-get but neither Chromium nor bubblewrap, as ``uid``, without
    sudo. The fake apt-get logs its arguments and 'installs' a package by putting its command on PATH."""
    bin_dir, log = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir()
    for tool in ("dirname", "tail", "env"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    install = (f'for p in "$@"; do case $p in chromium) c=chromium;; bubblewrap) c=bwrap;; *) continue;; esac; '
               f'printf "#!/bin/sh\\n" > {bin_dir}/$c; chmod +x {bin_dir}/$c; done')
    scripts = {"id": f"echo {uid}", "apt-get": f'echo "$@" >> {log}\n{install}'}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script = "source run.sh\nsandbox_problem() { :; }\ntest_packages"  # the probe itself: tests/test_grader.py
    done = subprocess.run(["/bin/bash", "-c", script], cwd=ROOT, env={"PATH": str(bin_dir)}, capture_output=True,
                          text=True, check=True, stdin=subprocess.DEVNULL)
    return done, log


def test_run_sh_test_installs_chromium_and_bubblewrap_as_root(tmp_path):
    done, log = run_test_packages(tmp_path, uid=0)
    assert log.read_text().splitlines() == ["update -q", "install -y -q chromium bubblewrap"]
    assert "installing chromium bubblewrap with apt-get" in done.stderr and "skipped" not in done.stderr


def test_run_sh_test_says_before_the_run_what_it_cannot_install_will_skip_and_how_to_enable_it(tmp_path):
    done, log = run_test_packages(tmp_path, uid=1000)  # no root, no sudo
    assert not log.exists()
    lines = done.stderr.splitlines()
    assert len(lines) == 3, lines
    assert "tests/test_site.py, tests/test_browser_page.py) will be skipped" in lines[0]
    assert "(tests/test_grader.py) will be skipped" in lines[1]
    assert lines[2] == "run.sh: to run them too: sudo apt-get install chromium bubblewrap"


def test_the_summary_counts_skips_for_want_of_chromium_or_bubblewrap_apart_from_cuda(tmp_path):
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.skipif(True, reason='needs chromium: not installed')\ndef test_page(): pass\n\n"
        "@pytest.mark.parametrize('attack', range(3))\n"
        "def test_sandbox(attack): pytest.skip('needs bubblewrap: no sandbox here')\n\n"
        "def test_llama(): pytest.skip('needs CUDA')\n\n"
        "def test_other(): pytest.skip('the embedded model is not built')\n\n"
        "def test_fine(): pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    line = next(s for s in done.stdout.splitlines() if s.startswith("skipped for want of"))
    assert line.startswith("skipped for want of chromium/bubblewrap: 4 (chromium 1, bubblewrap 3); need CUDA: 1; "
                           "other skips: 1")
    assert "1 passed, 6 skipped" in done.stdout
