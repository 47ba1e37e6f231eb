"""One figure style for the whole book; one function per kind of figure, each returning its figure."""
from __future__ import annotations

import base64
import io

import matplotlib.pyplot as plt
import torch

COLORS = {"sink": "#c0392b", "norm": "#2c3e50", "other": "#7f8c8d", "baseline": "#c0392b",
          "sigmoid": "#2980b9", "headwise_rmsnorm": "#27ae60", "gated": "#8e44ad"}
STYLE = {"figure.figsize": (6.4, 3.6), "figure.dpi": 110, "axes.spines.top": False,
         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "font.size": 10,
         "axes.titlesize": 11, "legend.frameon": False}


def png(fig: plt.Figure) -> str | None:
    """``fig`` as a base64 PNG of at most 256 colours, as IPython's inline backend would draw it (tight box, the
    figure's dpi): about a third of the size of matplotlib's RGBA PNG, the same figure to the eye. The chapters
    and their widgets embed dozens of figures per page; this keeps the pages' weight budget (tests/test_site.py)."""
    from PIL import Image

    if not fig.axes and not fig.texts:
        return None
    raw = io.BytesIO()
    fig.savefig(raw, format="png", bbox_inches="tight", dpi=fig.dpi, facecolor="white")
    small = io.BytesIO()
    Image.open(raw).convert("RGB").quantize(256).save(small, format="png", optimize=True)
    return base64.b64encode(small.getvalue()).decode("ascii")


def use_small_png() -> None:
    """Display figures in IPython (a chapter's kernel) as ``png``; nothing outside IPython. Called on import, so
    after a chapter's ``%matplotlib inline`` every figure and widget output it shows is the small PNG."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["image/png"].for_type(plt.Figure, png)


def _fig(**kw):
    with plt.rc_context(STYLE):
        return plt.subplots(**kw)


def sink_and_norm(profile, title: str = "") -> plt.Figure:
    """Fig 3/18: mean attention to token 0 per layer (left axis) with token 0's input L2 norm (right)."""
    fig, ax = _fig()
    layers = range(len(profile.attention_to_first))
    ax.plot(layers, profile.attention_to_first, "o-", color=COLORS["sink"], label="attention to token 0")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention to token 0", color=COLORS["sink"])
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(layers, profile.first_norm, "s--", color=COLORS["norm"], label="token 0 input norm")
    ax2.plot(layers, profile.later_norm, ":", color=COLORS["other"], label="other tokens' input norm")
    ax2.set_ylabel("L2 norm of layer input", color=COLORS["norm"])
    ax2.spines["right"].set_visible(True)
    ax2.grid(False)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def heatmap(matrix: torch.Tensor, title: str = "", xlabel: str = "key position",
            ylabel: str = "query position", vmax: float | None = 1.0) -> plt.Figure:
    """An attention map (or any matrix) with the first token's column on the left."""
    fig, ax = _fig(figsize=(4.4, 3.8))
    im = ax.imshow(matrix.float().cpu().numpy(), cmap="magma", vmin=0, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.grid(False)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.tight_layout()
    return fig


def per_layer(series: dict[str, torch.Tensor], ylabel: str, title: str = "", logy: bool = False,
              ylim: tuple | None = None) -> plt.Figure:
    """Several per-layer curves on one axis (Fig 2, 11, 14, 15: one line per model or token group)."""
    n = max(len(v) for v in series.values())
    return lines(range(n), series, xlabel="layer", ylabel=ylabel, title=title, logy=logy, ylim=ylim)


def bars(values: torch.Tensor, ylabel: str, xlabel: str, title: str = "", highlight: list[int] = (),
         logy: bool = False) -> plt.Figure:
    """One bar per item (head, neuron, position) with the highlighted ones in the sink colour."""
    fig, ax = _fig()
    v = torch.as_tensor(values).float()
    colors = [COLORS["sink"] if i in set(highlight) else COLORS["other"] for i in range(len(v))]
    ax.bar(range(len(v)), v, color=colors, width=1.0 if len(v) > 64 else 0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    fig.tight_layout()
    return fig


def lines(x, series: dict[str, torch.Tensor], xlabel: str, ylabel: str, title: str = "", logx: bool = False,
          logy: bool = False, dashed: tuple[str, ...] = (), ylim: tuple | None = None,
          colors: dict[str, str] | None = None) -> plt.Figure:
    """Several curves against a shared x (Fig 1: variance by position; Fig 6: attention vs lambda); the
    names in ``dashed`` are drawn dashed (predictions, references). NaN points are left out."""
    fig, ax = _fig()
    x = torch.as_tensor(x).float()
    for name, values in series.items():
        color = (colors or {}).get(name, COLORS.get(name))
        ax.plot(x, torch.as_tensor(values).float(), "--" if name in dashed else "o-", label=name, color=color,
                markersize=3)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def stacked_bars(series: dict[str, torch.Tensor], ylabel: str, xlabel: str, title: str = "",
                 highlight: list[int] = ()) -> plt.Figure:
    """One bar panel per series on a shared axis (Fig 5, 19: attention received per position without and
    with an intervention), the highlighted items in the sink colour."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(series), 1, sharex=True, sharey=True,
                                 figsize=(6.4, 1.2 + 1.3 * len(series)), squeeze=False)
    for ax, (name, values) in zip(axes[:, 0], series.items()):
        v = torch.as_tensor(values).float()
        colors = [COLORS["sink"] if i in set(highlight) else COLORS["other"] for i in range(len(v))]
        ax.bar(range(len(v)), v, color=colors, width=0.8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(name, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def histogram(series: dict[str, torch.Tensor], xlabel: str, title: str = "", bins: int = 40,
              logy: bool = False, marks: dict[str, float] | None = None) -> plt.Figure:
    """Overlaid distributions on shared bins (Fig 7: Kendall tau per W_O neuron, token 0 against later
    tokens; Fig 10: W_down weights); ``marks`` draws labelled vertical lines (means, published values)."""
    fig, ax = _fig()
    values = {name: torch.as_tensor(v).float().flatten() for name, v in series.items()}
    everything = torch.cat(list(values.values()))
    edges = torch.linspace(float(everything.min()), float(everything.max()) + 1e-12, bins + 1)
    for i, (name, v) in enumerate(values.items()):
        ax.hist(v.numpy(), bins=edges.numpy(), alpha=0.55, label=name,
                color=COLORS.get(name, [COLORS["sink"], COLORS["other"], COLORS["norm"]][i % 3]))
    for j, (name, x) in enumerate((marks or {}).items()):
        ax.axvline(x, color=["#2c3e50", "#8e44ad", "#27ae60"][j % 3], ls="--", lw=1, label=name)
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def scatter(x: torch.Tensor, y: torch.Tensor, xlabel: str, ylabel: str, title: str = "",
            color: torch.Tensor | None = None, color_label: str = "", labels: list[str] | None = None) -> plt.Figure:
    """One point per item (Fig 12: one per head, alignment against positivity), optionally coloured by a
    third quantity (e.g. the head's attention to token 0) and annotated with ``labels``."""
    fig, ax = _fig(figsize=(5.2, 3.8))
    x, y = torch.as_tensor(x).float().flatten(), torch.as_tensor(y).float().flatten()
    if color is None:
        ax.scatter(x, y, color=COLORS["sink"], s=28)
    else:
        points = ax.scatter(x, y, c=torch.as_tensor(color).float().flatten(), cmap="magma_r", s=28,
                            vmin=0, vmax=max(1e-6, float(torch.as_tensor(color).max())), edgecolors="k",
                            linewidths=0.3)
        fig.colorbar(points, ax=ax, fraction=0.046, label=color_label)
    for xi, yi, text in zip(x, y, labels or []):
        ax.annotate(text, (float(xi), float(yi)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.tight_layout()
    return fig


def bar_panels(panels: dict[str, torch.Tensor], xlabels: list[str], title: str = "",
               highlights: list[list[int]] | None = None, logy: tuple[bool, ...] = ()) -> plt.Figure:
    """Side-by-side bar panels, each with its own axes (Fig 8: W_gate and W_up row norms; Fig 9 and 10: one
    neuron's cosine and up activation per token and its W_down column); highlighted items in the sink colour.
    Panels longer than 256 items are drawn as points, the highlighted ones enlarged."""
    n = len(panels)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.2), squeeze=False)
    for i, (ax, (name, values)) in enumerate(zip(axes[0], panels.items())):
        v = torch.as_tensor(values).float()
        marked = set((highlights or [[]] * n)[i])
        if len(v) > 256:  # thousands of bars render slowly and hide single outliers: draw points instead
            ax.plot(range(len(v)), v, ".", ms=2, color=COLORS["other"])
            idx = sorted(marked)
            ax.plot(idx, v[idx], "o", ms=5, color=COLORS["sink"])
        else:
            colors = [COLORS["sink"] if j in marked else COLORS["other"] for j in range(len(v))]
            ax.bar(range(len(v)), v, color=colors, width=0.8)
        if i < len(logy) and logy[i]:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_xlabel(xlabels[i])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


VERDICT_COLORS = {"agrees": "#27ae60", "DEPARTS": "#c0392b", "partly": "#e67e22", "n/a": "#95a5a6"}


def causal_chain(links: list[tuple[str, str, str, list]], title: str = "", per_row: int = 4) -> plt.Figure:
    """The paper's causal chain as boxes joined by arrows, ``per_row`` boxes a row (a snake: the second row runs
    right to left), each arrow coloured by its verdict (``VERDICT_COLORS``) and labelled with the claims that test
    it, a tick for each that holds (``scoreboard.chain_verdicts``)."""
    nodes = [links[0][0]] + [b for _, b, _, _ in links]
    rows = (len(nodes) + per_row - 1) // per_row
    at = [((i % per_row) if (i // per_row) % 2 == 0 else per_row - 1 - i % per_row, -1.6 * (i // per_row))
          for i in range(len(nodes))]
    fig, ax = _fig(figsize=(7.4, 0.9 + 1.5 * rows))
    ax.set(xlim=(-0.55, per_row - 0.45), ylim=(-1.6 * (rows - 1) - 0.6, 0.45), title=title)
    ax.axis("off")
    boxes = [ax.text(x, y, text, ha="center", va="center", fontsize=9, zorder=3,
                     bbox={"boxstyle": "round,pad=0.35", "fc": "white", "ec": COLORS["norm"], "lw": 1})
             for (x, y), text in zip(at, nodes)]
    for i, (_, _, verdict, cs) in enumerate(links):
        (x0, y0), (x1, y1) = at[i], at[i + 1]
        color = VERDICT_COLORS[verdict]
        # from the edge of one box to the edge of the next (fractions of each text's extent)
        start, end = ((0.5, 0), (0.5, 1)) if x0 == x1 else ((1, 0.5), (0, 0.5)) if x1 > x0 else ((0, 0.5), (1, 0.5))
        ax.annotate("", end, start, xycoords=boxes[i + 1], textcoords=boxes[i],
                    arrowprops={"arrowstyle": "-|>", "color": color, "lw": 3, "shrinkA": 8, "shrinkB": 8}, zorder=2)
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        names = "\n".join(c.key.replace("_", " ") + (" \u2713" if c.holds else " \u2717" if c.holds is False
                                                      else " \u2013") for c in cs)
        ax.text(mx + (0.08 if x0 == x1 else 0), my + 0.12 if y0 == y1 else my, verdict, ha="left" if x0 == x1
                else "center", va="bottom" if y0 == y1 else "center", fontsize=8, color=color, weight="bold")
        ax.text(mx - (0.08 if x0 == x1 else 0), my - 0.2 if y0 == y1 else my, names, ha="right" if x0 == x1
                else "center", va="top" if y0 == y1 else "center", fontsize=6.5, color=COLORS["norm"])
    fig.tight_layout()
    return fig

use_small_png()
