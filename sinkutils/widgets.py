"""Pickers for layer / head / strength that work live in Jupyter or Colab *and* on the static site.

A static page has no kernel, so callbacks cannot run there. ``switcher`` therefore renders every choice once
(a bounded grid), puts the outputs in nested ``ipywidgets.Stack`` s and links each slider's index to the
stacks' ``selected_index`` with ``jslink``: the browser switches between pre-rendered results with no kernel,
and in Jupyter the same widget behaves identically.

``table`` (rows) and ``columns`` (a column per quantity) show a chapter's per-layer (per-head, per-variant) numbers
as a table that fits the page, where a cell would otherwise print one long line per row.
"""
from __future__ import annotations

import math
from typing import Callable

import ipywidgets as W
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

#: at most this many pre-rendered outputs per widget (keeps a page well under 5 MB)
MAX_RENDERS = 64


def bounded(values: list, limit: int) -> list:
    """At most ``limit`` values spread evenly over ``values`` (first and last kept; ``limit=1``: the first)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    values = list(values)
    if len(values) <= limit:
        return values
    if limit == 1:
        return values[:1]
    step = (len(values) - 1) / (limit - 1)
    return [values[round(i * step)] for i in range(limit)]


def layer_head_grid(n_layers: int, n_heads: int, max_layers: int, max_heads: int, keep: tuple[int, ...] = (),
                    keep_heads: tuple[int, ...] = ()) -> tuple[list[int], list[int]]:
    """(layers, heads) for a layer x head ``switcher``: at most ``max_heads`` heads and ``max_layers`` layers, each
    spread evenly over the model (first and last kept, ``bounded``), plus the layers in ``keep`` and the heads in
    ``keep_heads`` (the map a chapter shows first), with fewer spread layers where the grid would exceed
    ``MAX_RENDERS`` (SmolLM2-135M: all 9 heads, 6 of its 30 layers with the sink layer)."""
    heads = sorted(set(bounded(range(n_heads), min(max_heads, MAX_RENDERS))) | set(keep_heads))
    kept = set(keep)
    for n in range(max(1, max_layers), 0, -1):
        layers = sorted(set(bounded(range(n_layers), n)) | kept)
        if len(layers) * len(heads) <= MAX_RENDERS:
            return layers, heads
    raise ValueError(f"{len(kept)} kept layers x {len(heads)} heads exceed MAX_RENDERS={MAX_RENDERS}")


def _render_into(out: W.Output, render: Callable, choice: dict) -> None:
    with out:
        result = render(**choice)
        if isinstance(result, plt.Figure):
            display(result)
            plt.close(result)
        elif result is not None:
            display(result)


def switcher(render: Callable, initial: dict | None = None, **axes: list) -> W.VBox:
    """One slider per axis (``layer=[0, 1, 2]``, ``lam=[1, 2, 4]``); ``render(**choice)`` returns a figure or
    anything displayable. All combinations are rendered up front (at most ``MAX_RENDERS``); ``initial`` picks
    the choice shown first."""
    if not axes:
        raise ValueError("give at least one axis, e.g. layer=[0, 1, 2]")
    for name, values in axes.items():
        if not values:
            raise ValueError(f"axis {name!r} has no values")
    total = math.prod(len(v) for v in axes.values())
    if total > MAX_RENDERS:
        raise ValueError(f"{total} combinations exceed MAX_RENDERS={MAX_RENDERS}; thin an axis with bounded()")
    initial = initial or {}
    for name, value in initial.items():
        if name not in axes or value not in axes[name]:
            raise ValueError(f"initial {name}={value!r} is not among the choices {axes.get(name)}")
    names = list(axes)
    sliders = {n: W.SelectionSlider(options=[(str(v), v) for v in axes[n]], description=n,
                                    value=initial.get(n, axes[n][0]), continuous_update=False) for n in names}
    was_interactive = plt.isinteractive()
    plt.ioff()
    try:
        root = _nest(render, names, axes, sliders, {})
    finally:
        if was_interactive:
            plt.ion()
    return W.VBox([W.HBox(list(sliders.values())), root])


def _nest(render, names, axes, sliders, fixed: dict) -> W.Widget:
    name, rest = names[0], names[1:]
    children = []
    for value in axes[name]:
        choice = fixed | {name: value}
        if rest:
            children.append(_nest(render, rest, axes, sliders, choice))
        else:
            out = W.Output()
            _render_into(out, render, choice)
            children.append(out)
    stack = W.Stack(children, selected_index=sliders[name].index)
    W.jslink((sliders[name], "index"), (stack, "selected_index"))
    return stack


def table(header: list[str], rows: list[list]) -> Markdown:
    """A chapter's tabular result (a row per layer, head or variant) as a Markdown table: rendered as a table by
    Jupyter, Colab and the site, and wrapped to the column on a phone, where printed lines would scroll sideways.
    Cells are shown as given (format numbers in the chapter: ``f"{x:.3f}"``); a ``|`` in a cell is escaped. Every
    row needs one cell per header."""

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells for {len(header)} columns {list(header)}: {list(row)}")
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return Markdown("\n".join(lines))


def columns(cols: dict) -> Markdown:
    """``table`` from columns: ``{"layer": range(n), "attention to token 0": (values, ".3f"), ...}``, each column
    its values or (values, format spec); every column the same length. Chapters 1-6's per-layer tables."""
    cols = {name: c if isinstance(c, tuple) else (c, "") for name, c in cols.items()}
    lengths = {name: len(values) for name, (values, _) in cols.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns of different lengths: {lengths}")
    rows = zip(*([format(v, spec) for v in values] for values, spec in cols.values()))
    return table(list(cols), [list(row) for row in rows])
