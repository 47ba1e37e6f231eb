"""What each chapter measures on a model: trace + metrics over batches of text, one function per figure."""
from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from sinkutils import metrics, trace


def _batches(ids: torch.Tensor, batch_size: int, desc: str):
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must be (sequences, tokens) with at least 2 tokens, got {tuple(ids.shape)}")
    chunks = ids.split(batch_size)
    return tqdm(chunks, desc=desc, leave=False, disable=len(chunks) == 1)


@dataclasses.dataclass
class SinkProfile:
    """Per-layer sink numbers of chapter 1 (Fig 3, 18)."""

    attention_to_first: torch.Tensor  # (L,) mean attention to token 0, queries >= min_query
    per_head: torch.Tensor            # (L, H) the same per head
    sink_rate: torch.Tensor           # (L,) fraction of heads above epsilon
    first_norm: torch.Tensor          # (L,) L2 norm of token 0's input to each layer
    other_norm: torch.Tensor          # (L,) mean L2 norm of the other tokens' inputs
    epsilon: float
    min_query: int

    @property
    def sink_layer(self) -> int:
        """First layer whose mean attention to token 0 is at least half of the largest layer's."""
        a = self.attention_to_first
        return int((a >= 0.5 * a.max()).nonzero()[0])

    @property
    def norm_spike_layer(self) -> int:
        """The layer whose input shows the largest jump of token 0's norm over the previous layer's."""
        jumps = self.first_norm[1:] / self.first_norm[:-1]
        return int(jumps.argmax()) + 1


@torch.no_grad()
def sink_profile(model, ids: torch.Tensor, epsilon: float = 0.3, min_query: int = 4,
                 batch_size: int = 8) -> SinkProfile:
    """Attention to token 0 and token 0's input norm, per layer, averaged over the rows of ``ids``."""
    sinks, first, other = [], [], []
    for chunk in _batches(ids, batch_size, "sink profile"):
        with trace.record(model, "attn.sink", "resid") as rec:
            model(input_ids=chunk.to(model.device))
        sinks.append(rec["attn.sink"].float().cpu())
        norms = rec["resid"][:-1].float().norm(dim=-1).cpu()  # inputs of layers 0..L-1: (L, B, T)
        first.append(norms[:, :, 0])
        other.append(norms[:, :, 1:].mean(-1))
    sink = torch.cat(sinks, dim=1)
    return SinkProfile(
        attention_to_first=metrics.mean_sink(sink, min_query),
        per_head=sink[..., min_query:].mean(dim=(1, 3)),
        sink_rate=metrics.sink_rate(sink, epsilon, min_query),
        first_norm=torch.cat(first, 1).mean(1), other_norm=torch.cat(other, 1).mean(1),
        epsilon=epsilon, min_query=min_query)


@torch.no_grad()
def attention_pattern(model, ids: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """One head's (T x T) attention map for the first row of ``ids`` (chapter-1 heatmap)."""
    from sinkutils.models import check_head, check_layer

    check_layer(model, layer)
    check_head(model, head)
    with trace.record(model, "attn.pattern", layers=[layer]) as rec:
        model(input_ids=ids[:1].to(model.device))
    return rec["attn.pattern"][0, 0, head].float().cpu()
