"""One source for the release coordinates: pyproject.toml's version and Repository. The Colab set-up cells (chapters
and assignments), _config.yml and the docs' links agree with it, and `sinkutils.release sync` rewrites them all."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from sinkutils import release

ROOT = release.ROOT


def test_every_copy_agrees_with_pyproject():
    c = release.coordinates()
    assert c["spec"] == f"sinkbook @ git+{c['repository']}@v{c['version']}"
    assert len(release.notebooks()) >= 6  # the chapters at least
    assert release.check() == []


def test_readme_says_how_a_release_is_cut():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Cutting a release"):]
    for step in (".venv/bin/python -m sinkutils.release sync", "git tag v", "git push origin main v",
                 ".venv/bin/python -m sinkutils.release check --remote"):
        assert step in section


@pytest.fixture
def tree(tmp_path):
    for name in ("pyproject.toml", "_config.yml", "chapters", "assignments", "README.md", "book"):
        src = ROOT / name
        (shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("vendor", "static"))
         if src.is_dir() else shutil.copy2(src, tmp_path / name))
    return tmp_path


def test_sync_rewrites_every_copy_after_a_version_bump(tree):
    pyproject = tree / "pyproject.toml"
    text = pyproject.read_text()
    text = re.sub(r'^version = "[^"]+"', 'version = "0.2.0"', text, flags=re.M)
    pyproject.write_text(text.replace("https://github.com/sinkbook/sinkbook", "https://github.com/example/sinkbook"))
    with open(tree / "README.md", "a") as f:
        f.write("\nAnother project: https://github.com/containers/bubblewrap\n")
    before = {p: p.read_text() for p in release.notebooks(tree)}
    problems = release.check(tree)
    assert any("chapters/01_sink.ipynb: installs 'sinkbook @ git+https://github.com/sinkbook/sinkbook@v0.1.0', "
               "pyproject says 'sinkbook @ git+https://github.com/example/sinkbook@v0.2.0'" in p for p in problems)
    assert any(p.startswith("_config.yml: repository url") for p in problems)
    assert any(p.startswith("book/running.md: links github.com/sinkbook/sinkbook") for p in problems)
    changed = release.sync(tree)
    assert release.check(tree) == []
    assert tree / "chapters" / "06_headwise.ipynb" in changed and tree / "_config.yml" in changed
    for nb, old in before.items():
        new = nb.read_text()
        json.loads(new)
        assert new.count("sinkbook @ git+https://github.com/example/sinkbook@v0.2.0") == old.count("SINKBOOK_INSTALL_SPEC\\\", ")
        assert new.replace("example/sinkbook@v0.2.0", "sinkbook/sinkbook@v0.1.0") == old  # nothing else changed
    assert "url: https://github.com/example/sinkbook\n" in (tree / "_config.yml").read_text()
    assert "colab.research.google.com/github/example/sinkbook/blob/main/" in (tree / "book" / "assignments.md").read_text()
    assert "https://github.com/containers/bubblewrap\n" in (tree / "README.md").read_text()  # others' links untouched


def test_missing_repository_is_named(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "sinkbook"\nversion = "0.1.0"\n')
    with pytest.raises(ValueError, match=r"has no \[project.urls\] Repository"):
        release.coordinates(tmp_path)
