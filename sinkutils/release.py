"""Release coordinates in one place: ``pyproject.toml``'s ``version`` and ``[project.urls] Repository``.

The Colab set-up cell of every chapter and assignment installs ``sinkbook @ git+<Repository>@v<version>``, and
``_config.yml`` (the site's repository button and launch buttons) and the docs link to the same repository. Colab
cannot read pyproject.toml before sinkbook is installed, so those places hold copies; this module checks them and
rewrites them from pyproject.toml:

    .venv/bin/python -m sinkutils.release check            # every copy agrees with pyproject.toml (tests run it)
    .venv/bin/python -m sinkutils.release sync             # rewrite the copies after changing pyproject.toml
    .venv/bin/python -m sinkutils.release check --remote   # also: the tag exists in the repository (git ls-remote)

README.md ("Cutting a release") gives the order that keeps the cells pointing at a tag that exists.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from sinkutils.project import ROOT

#: the install spec's default in a set-up cell, as it appears in the notebook's JSON
SPEC = re.compile(r'(SINKBOOK_INSTALL_SPEC\\", \\")(sinkbook @ git\+[^"\\]+)(\\")')
CONFIG_URL = re.compile(r"(^repository:\n  url: )(\S+)$", re.M)
#: a link to the project's repository in the docs (a repository named sinkbook, under any owner): GitHub's own or
#: Colab's (colab.research.google.com/github/<owner>/sinkbook/blob/...); links to other projects are left alone
GITHUB = re.compile(r"((?<![\w.])github\.com/|colab\.research\.google\.com/github/)([\w.-]+/sinkbook)"
                    r"(?=[/)\s`>\]]|\.git\b|$)", re.M)
DOCS = ("README.md", "book/running.md", "book/assignments.md", "book/intro.md")


def coordinates(root: Path = ROOT) -> dict:
    """version, repository URL, tag and the install spec, from ``root/pyproject.toml``."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    try:
        repo = project["urls"]["Repository"].rstrip("/")
    except KeyError:
        raise ValueError(f"{root / 'pyproject.toml'} has no [project.urls] Repository; add the GitHub URL "
                         f"(e.g. https://github.com/sinkbook/sinkbook)") from None
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo):
        raise ValueError(f"[project.urls] Repository must be https://github.com/<owner>/<name>, got {repo!r}")
    tag = f"v{project['version']}"
    return {"version": project["version"], "repository": repo, "slug": repo.removeprefix("https://github.com/"),
            "tag": tag, "spec": f"sinkbook @ git+{repo}@{tag}"}


def notebooks(root: Path = ROOT) -> list[Path]:
    """Every notebook with a Colab set-up cell: the chapters and the assignments (both editions)."""
    found = [*sorted((root / "chapters").glob("*.ipynb")), *sorted((root / "assignments").rglob("*.ipynb"))]
    return [p for p in found if "SINKBOOK_INSTALL_SPEC" in p.read_text()]


def check(root: Path = ROOT) -> list[str]:
    """Each place that disagrees with pyproject.toml, as 'file: has X, pyproject says Y'; empty when all agree."""
    c = coordinates(root)
    problems = []
    for nb in notebooks(root):
        specs = [m.group(2) for m in SPEC.finditer(nb.read_text())]
        if not specs:
            problems.append(f"{nb.relative_to(root)}: its set-up cell has no default install spec")
        problems += [f"{nb.relative_to(root)}: installs {s!r}, pyproject says {c['spec']!r}" for s in specs
                     if s != c["spec"]]
    config = CONFIG_URL.search((root / "_config.yml").read_text())
    if config is None or config.group(2).rstrip("/") != c["repository"]:
        problems.append(f"_config.yml: repository url {config and config.group(2)!r}, pyproject says "
                        f"{c['repository']!r}")
    for doc in DOCS:
        path = root / doc
        if path.exists():
            problems += [f"{doc}: links {prefix}{slug}, pyproject says {c['slug']}"
                         for prefix, slug in sorted(set(GITHUB.findall(path.read_text()))) if slug != c["slug"]]
    return problems


def sync(root: Path = ROOT) -> list[Path]:
    """Rewrite every copy from pyproject.toml; returns the files changed (only the coordinates change)."""
    c = coordinates(root)
    changed = []

    def write(path: Path, text: str):
        if text != path.read_text():
            path.write_text(text)
            changed.append(path)

    for nb in notebooks(root):
        write(nb, SPEC.sub(lambda m: m.group(1) + c["spec"] + m.group(3), nb.read_text()))
    config = root / "_config.yml"
    write(config, CONFIG_URL.sub(lambda m: m.group(1) + c["repository"], config.read_text()))
    for doc in DOCS:
        path = root / doc
        if path.exists():
            write(path, GITHUB.sub(lambda m: m.group(1) + c["slug"], path.read_text()))
    return changed


def tag_exists(root: Path = ROOT) -> bool:
    """Whether the repository has the release tag (``git ls-remote``; needs the network)."""
    c = coordinates(root)
    out = subprocess.run(["git", "ls-remote", "--tags", c["repository"], f"refs/tags/{c['tag']}"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return bool(out.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sinkutils.release", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("check", "sync"))
    p.add_argument("--remote", action="store_true", help="check: also that the tag exists in the repository")
    args = p.parse_args(argv)
    c = coordinates()
    if args.command == "sync":
        for path in sync():
            print(f"rewrote {path.relative_to(ROOT)}")
    problems = check()
    if args.remote and not tag_exists():
        problems.append(f"the tag {c['tag']} does not exist in {c['repository']}: the Colab cells would install "
                        f"nothing; push it (README.md, Cutting a release)")
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"release coordinates agree: {c['spec']}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
