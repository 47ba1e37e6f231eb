"""Pages that fit (issue 18), from the sources: the chapters' code is formatted by ruff format to the width the site's
content column holds at 1280 px (``chapters/ruff.toml``; ``tests/test_site.py`` measures the column), per-layer
numbers are tables (``widgets.table``) rather than printed lines, and a claim's verdict is a callout
(``scoreboard.callout``) rather than a printed line."""
from __future__ import annotations

import ast
import re
import tomllib

import nbformat
import pytest

from sinkutils import book, project, widgets

LINE_LENGTH = tomllib.loads((project.ROOT / "chapters" / "ruff.toml").read_text())["line-length"]


def code_cells(chapter: str) -> list[str]:
    """The chapter's code cells after the Colab set-up cell (which is every assignment's set-up cell verbatim)."""
    nb = nbformat.read(project.ROOT / "chapters" / f"{chapter}.ipynb", as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code"][1:]


def python(source: str) -> ast.Module:
    """A cell's source as Python (IPython's ``%magic`` lines blanked)."""
    return ast.parse(re.sub(r"(?m)^(\s*)%.*$", r"\1pass", source))


def test_chapters_are_formatted_by_ruff():
    diff = book.format_chapters(check=True)
    assert not diff, f"chapter code is not formatted: run `.venv/bin/python -m sinkutils.book --format`\n{diff[:4000]}"


@pytest.mark.parametrize("chapter", project.chapters())
def test_code_lines_fit_the_content_column(chapter):
    """ruff cannot split a long string; the chapters split theirs, so no line wraps at 1280 px. Only a parameter's
    comment (the help papermill reads from the ``parameters`` cell) may run on and wrap."""
    nb = nbformat.read(project.ROOT / "chapters" / f"{chapter}.ipynb", as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code"][1:]
    lines = [line.split("  # ")[0] if "parameters" in c.metadata.get("tags", []) else line
             for c in cells for line in c.source.splitlines()]
    long = [line for line in lines if len(line) > LINE_LENGTH]
    assert not long, f"{chapter}: {len(long)} code lines over {LINE_LENGTH} characters, e.g. {long[:3]}"


@pytest.mark.parametrize("chapter", project.chapters())
def test_no_printed_rows_and_verdicts_are_callouts(chapter):
    """A loop that prints a line per layer (head, variant) is a table; a claim's verdict is a callout."""
    for src in code_cells(chapter):
        for loop in (n for n in ast.walk(python(src)) if isinstance(n, ast.For)):
            prints = [n for n in ast.walk(loop) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "print"]
            assert not prints, f"{chapter}: a loop prints a line per row, show a widgets.table instead:\n{src[:300]}"
        assert ".line()" not in src and "claims.table(" not in src, f"{chapter}: show claims with scoreboard.callout"
    assert any("scoreboard.callout(" in src for src in code_cells(chapter)), f"{chapter} gives no claim's verdict"


def test_table_is_markdown_with_escaped_cells():
    table = widgets.table(["layer", "a | b"], [[0, "0.125"], [1, "x|y"]])
    assert table.data.splitlines() == ["| layer | a \\| b |", "|---|---|", "| 0 | 0.125 |", "| 1 | x\\|y |"]
    with pytest.raises(ValueError, match=r"row 1 has 1 cells for 2 columns"):
        widgets.table(["layer", "value"], [[0, 1], [1]])


def test_columns_format_each_column_and_need_equal_lengths():
    import torch

    table = widgets.columns({"layer": range(2), "share": (torch.tensor([0.1234, 0.5]), ".3f"), "note": ["a", "b|c"]})
    assert table.data.splitlines()[2:] == ["| 0 | 0.123 | a |", "| 1 | 0.500 | b\\|c |"]
    with pytest.raises(ValueError, match="columns of different lengths"):
        widgets.columns({"layer": range(3), "share": [0.1, 0.2]})
