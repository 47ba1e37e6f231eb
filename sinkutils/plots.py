"""One figure style for the whole book; one function per kind of figure, each returning its figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch

COLORS = {"sink": "#c0392b", "norm": "#2c3e50", "other": "#7f8c8d", "baseline": "#c0392b",
          "sigmoid": "#2980b9", "headwise_rmsnorm": "#27ae60", "gated": "#8e44ad"}
STYLE = {"figure.figsize": (6.4, 3.6), "figure.dpi": 110, "axes.spines.top": False,
         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "font.size": 10,
         "axes.titlesize": 11, "legend.frameon": False}


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
    ax2.plot(layers, profile.other_norm, ":", color=COLORS["other"], label="other tokens' input norm")
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
    fig, ax = _fig()
    for name, values in series.items():
        ax.plot(range(len(values)), torch.as_tensor(values).float(), "o-", label=name,
                color=COLORS.get(name))
    ax.set(xlabel="layer", ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


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
