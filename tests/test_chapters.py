"""Every chapter executes under the cpu profile, as the book build runs it (papermill, parameters from
profiles/cpu.yml), keeps its figures, and a failing cell fails with the chapter and cell named."""
import ast
import json

import nbformat
import papermill
import pytest

from sinkutils import book, models, project
from limits import STALL

needs_model = pytest.mark.skipif(not (models.CHECKPOINTS / "sinkbook-tiny" / "config.json").exists(),
                                 reason="embedded model sinkbook-tiny not trained yet")


@needs_model
@pytest.mark.parametrize("chapter", project.chapters())
def test_chapter_executes_under_cpu_profile(chapter, tmp_path):
    book.execute(chapter, "cpu", tmp_path, timeout=600, stall_timeout=STALL)  # a hang guard; time: benchmarks/
    nb = nbformat.read(tmp_path / f"{chapter}.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    captions = [c for c in nb.cells if c.get("metadata", {}).get("mystnb", {}).get("figure", {}).get("caption")]
    assert images, f"{chapter} produced no figure"
    assert len(captions) >= 1
    for cell in captions:  # the caption must wrap the figure, not a progress bar or a repr
        assert cell.outputs and "image/png" in cell.outputs[0].get("data", {}), (chapter, cell.source[:80])


def test_every_chapter_has_parameters_and_setup_cells():
    for chapter in project.chapters():
        cells = json.loads((project.ROOT / "chapters" / f"{chapter}.ipynb").read_text())["cells"]
        assert all("id" in c for c in cells), f"{chapter}: a cell without an id (nbformat warns on every read)"
        nb = nbformat.read(project.ROOT / "chapters" / f"{chapter}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "find_spec(\"sinkutils\")" in code[0].source, f"{chapter}: first code cell must be the Colab set-up"
        assert "parameters" in code[1].metadata.get("tags", []), f"{chapter}: second code cell must be parameters"
        assert not any(c.get("outputs") for c in code), f"{chapter} is committed with outputs"
        # the cpu profile: chapters 1-5 on SmolLM2-135M (a pretrained LLM with a structural sink), chapter 6 (training)
        # on the embedded family; a chapter's own default is its cpu model, so Jupyter shows what the book shows
        expected = "sinkbook-tiny" if chapter == "06_headwise" else "smollm2-135m"
        assert project.parameters("cpu", chapter)["model_name"] == expected, chapter
        assert papermill.inspect_notebook(str(project.ROOT / "chapters" / f"{chapter}.ipynb"))["model_name"][
            "default"] == f'"{expected}"', chapter
        assigned = {t.id for node in ast.parse(code[1].source).body for t in getattr(node, "targets", [])}
        documented = papermill.inspect_notebook(str(project.ROOT / "chapters" / f"{chapter}.ipynb"))
        assert set(documented) == assigned, f"{chapter}: papermill cannot read {assigned - set(documented)}"


def one_chapter_root(tmp_path, name: str, sources: list[str], defaults: dict):
    """A book root holding one chapter ``name`` (first source = its parameters cell) and a cpu profile."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    nb.cells = [nbformat.v4.new_code_cell(sources[0], metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(src) for src in sources[1:]]
    root = tmp_path / "root"
    (root / "chapters").mkdir(parents=True)
    (root / "profiles").mkdir()
    nbformat.write(nb, root / "chapters" / f"{name}.ipynb")
    (root / "profiles" / "cpu.yml").write_text(json.dumps({"defaults": defaults}))
    return root


def test_failing_cell_names_chapter_and_cell(tmp_path):
    root = one_chapter_root(tmp_path, "99_bad", ["x = 1", "raise ValueError('broken on purpose')"], {"x": 2})
    with pytest.raises(book.ChapterFailed, match=r"99_bad failed in the cell starting \"raise ValueError\('broken on purpose'\)\": ValueError"):
        book.execute("99_bad", "cpu", tmp_path / "out", root=root)


def test_unknown_profile_lists_choices():
    with pytest.raises(ValueError, match="cpu"):
        project.parameters("tpu", "01_sink")


def test_overrides_replace_profile_parameters(tmp_path):
    root = one_chapter_root(tmp_path, "99_params", ["x = 1\ny = 'a'", "print(x, y)"], {"x": 2, "y": "profile"})
    book.execute("99_params", "cpu", tmp_path / "out", root=root, overrides={"x": [3], "z": 5})
    out = nbformat.read(tmp_path / "out" / "99_params.ipynb", as_version=4)
    assert out.cells[-1].outputs[0]["text"] == "[3] profile\n"
    assert "z = 5" not in out.cells[1].source  # not a parameter of this chapter: not injected
