"""What an executed chapter shows on its page (``book.tidy``): the Colab set-up cell collapsed, the parameters once."""
from __future__ import annotations

import nbformat
import pytest

from sinkutils import book

DECLARED = {"model_name": {"default": '"sinkbook-tiny"'}, "n_texts": {"default": "32"}}


def executed(path, injected: str):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("# Set-up: locally ...\nimport os"),
                nbformat.v4.new_code_cell('model_name = "sinkbook-tiny"\nn_texts = 32',
                                          metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("print(model_name)")]
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("params, removed", [({"model_name": "sinkbook-tiny", "n_texts": 32}, True),
                                             ({"model_name": "llama-2-7b", "n_texts": 32}, False)])
def test_injected_parameters_shown_only_when_they_change_something(tmp_path, params, removed):
    path = executed(tmp_path / "ch.ipynb", "\n".join(f"{k} = {v!r}" for k, v in params.items()))
    book.tidy(path, params, DECLARED)
    tags = [c.metadata.get("tags", []) for c in nbformat.read(path, as_version=4).cells]
    assert tags[0] == ["hide-input"]
    assert tags[1] == ["parameters"]  # the parameters cell always stays
    assert ("remove-cell" in tags[2]) is removed
    assert tags[3] == []
