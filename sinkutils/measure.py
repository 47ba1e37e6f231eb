"""What each chapter measures on a model: trace + metrics over batches of text, one function per figure.

Words: *token 0* is the first token of a row; the *later* tokens (or positions) are 1..T-1, every token after
token 0. An average over queries that leaves out the first few (they see few keys) says so: "queries at positions
>= min_query". Every measurement over a batch of text runs ``mean_over_sequences`` (or ``recorded``, when it
keeps per-sequence values): batches -> record -> forward -> sum -> divide, written once.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from sinkutils import attention, interventions, metrics, models, trace


def check_ids(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` if it is (sequences, tokens) with at least one sequence of at least 2 tokens, else a ValueError
    naming the shape (an empty batch would otherwise fail deep inside the model)."""
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        shape = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
        raise ValueError(f"ids must be (sequences, tokens) with at least 1 sequence of at least 2 tokens, got {shape}")
    return ids


def batches(ids: torch.Tensor, batch_size: int, desc: str, progress: bool = True):
    """``ids`` (sequences, tokens) in forward passes of ``batch_size`` sequences, with a progress bar named ``desc``
    (none with ``progress=False``, e.g. inside a sweep that has its own)."""
    chunks = check_ids(ids).split(batch_size)
    return _progress(chunks, desc, quiet=not progress or len(chunks) == 1)


def recorded(model, ids: torch.Tensor, *quantities: str, batch_size: int = 8, desc: str,
             layers: list[int] | None = None, sink_index: int = 0,
             progress: bool = True) -> Iterator[tuple[int, trace.Recorder]]:
    """``(sequences in the batch, its recorder)`` for each forward pass of ``model`` over ``ids`` in batches of
    ``batch_size``, recording ``quantities`` (``trace.record``'s arguments)."""
    for chunk in batches(ids, batch_size, desc, progress):
        with trace.record(model, *quantities, layers=layers, sink_index=sink_index) as rec:
            model(input_ids=chunk.to(model.device))
        yield chunk.shape[0], rec


def mean_over_sequences(model, ids: torch.Tensor, quantities: tuple[str, ...],
                        summed: Callable[[trace.Recorder], torch.Tensor | dict], *, batch_size: int = 8, desc: str,
                        layers: list[int] | None = None, sink_index: int = 0, progress: bool = True):
    """The batched measurement loop: ``summed(rec)`` gives a tensor, or a dict of tensors, summed over the sequences
    of one batch (``rec`` recorded ``quantities``); returns their totals over ``ids`` divided by the number of
    sequences, on the CPU (a dict stays a dict)."""
    total, n = None, 0
    for rows, rec in recorded(model, ids, *quantities, batch_size=batch_size, desc=desc, layers=layers,
                              sink_index=sink_index, progress=progress):
        part = summed(rec)
        parts = part if isinstance(part, dict) else {None: part}
        total = parts if total is None else {k: total[k] + v for k, v in parts.items()}
        n += rows
    mean = {k: (v / n).cpu() for k, v in total.items()}
    return mean if isinstance(part, dict) else mean[None]


def _progress(items, desc: str, quiet: bool = False):
    """tqdm over ``items``, off when ``quiet`` or when TQDM_DISABLE=1 (``book.execute`` sets it: on the static
    page a progress bar is a dead widget). tqdm's notebook bar ignores that variable, hence the check here."""
    return tqdm(items, desc=desc, leave=False, disable=quiet or os.environ.get("TQDM_DISABLE") == "1")


def sink_layers(attention_to_first: torch.Tensor) -> list[int]:
    """The layers whose mean attention to token 0 is at least half of the largest layer's (chapter 1's sink
    layer is the first of them; ``origin`` reads its probes over all of them)."""
    a = attention_to_first
    return [int(l) for l in (a >= 0.5 * a.max()).nonzero().flatten()]


@dataclasses.dataclass
class SinkProfile:
    """Per-layer sink numbers of chapter 1 (Fig 3, 18)."""

    attention_to_first: torch.Tensor  # (L,) mean attention to token 0, queries >= min_query
    per_head: torch.Tensor            # (L, H) the same per head
    sink_rate: torch.Tensor           # (L,) fraction of heads above epsilon
    first_norm: torch.Tensor          # (L,) L2 norm of token 0's input to each layer
    later_norm: torch.Tensor          # (L,) mean L2 norm of the later tokens' inputs (positions 1..T-1)
    epsilon: float
    min_query: int

    @property
    def sink_layer(self) -> int:
        """First layer whose mean attention to token 0 is at least half of the largest layer's."""
        return sink_layers(self.attention_to_first)[0]

    @property
    def norm_spike_layer(self) -> int:
        """The layer whose input shows the largest jump of token 0's norm over the previous layer's."""
        jumps = self.first_norm[1:] / self.first_norm[:-1]
        return int(jumps.argmax()) + 1

    @property
    def variance_layer(self) -> int:
        """The layer before the norm spike: its attention output feeds the FFN that makes token 0's massive
        activation, so the paper reads the variance discrepancy there (chapter 2's default layer)."""
        return self.norm_spike_layer - 1


@torch.no_grad()
def sink_profile(model, ids: torch.Tensor, epsilon: float = 0.3, min_query: int = 4,
                 batch_size: int = 8) -> SinkProfile:
    """Attention to token 0 and the input norms of token 0 and of the later tokens, per layer, averaged over the
    rows of ``ids``."""
    sinks, first, later = [], [], []
    metrics.check_min_query(min_query, check_ids(ids).shape[1])
    for _, rec in recorded(model, ids, "attn.sink", "resid", batch_size=batch_size, desc="sink profile"):
        sinks.append(rec["attn.sink"].float().cpu())
        norms = rec["resid"][:-1].float().norm(dim=-1).cpu()  # inputs of layers 0..L-1: (L, B, T)
        first.append(norms[:, :, 0])
        later.append(norms[:, :, 1:].mean(-1))
    sink = torch.cat(sinks, dim=1)
    return SinkProfile(
        attention_to_first=metrics.mean_sink(sink, min_query),
        per_head=sink[..., min_query:].mean(dim=(1, 3)),
        sink_rate=metrics.sink_rate(sink, epsilon, min_query),
        first_norm=torch.cat(first, 1).mean(1), later_norm=torch.cat(later, 1).mean(1),
        epsilon=epsilon, min_query=min_query)


@torch.no_grad()
def attention_patterns(model, ids: torch.Tensor, layers: list[int] | None = None, length: int = 48) -> torch.Tensor:
    """(layers, heads, length, length) attention maps of the first ``length`` tokens of ``ids``' first row, for
    the chapter-1 heatmap widget: short enough that every layer and head can be pre-rendered."""
    layers = models.check_layers(model, layers)
    with trace.record(model, "attn.pattern", layers=layers) as rec:
        model(input_ids=check_ids(ids)[:1, :length].to(model.device))
    return rec["attn.pattern"][:, 0].float().cpu()


# --- chapter 2: value aggregation and the variance discrepancy (Fig 1, 23) -------------------------------

@dataclasses.dataclass
class VarianceProfile:
    """Dimension-wise variance of per-head attention outputs by position (chapter 2, Fig 1 and 23).

    All tensors are (layers, heads, T), means over the sequences measured."""

    measured: torch.Tensor   # var over head_dim of o_t = sum_j p_tj v_j
    predicted: torch.Tensor  # sum_j p_tj^2 var(v_j): what independent value vectors would give
    value_var: torch.Tensor  # var over head_dim of v_t
    sum_p2: torch.Tensor     # sum_j p_tj^2: 1 for token 0, 1/(t+1) under uniform attention
    layers: list[int]

    def first_over_later(self) -> torch.Tensor:
        """(layers,) see ``first_over_later``."""
        return first_over_later(self.measured)

    def decay_slope(self, which: str = "measured") -> torch.Tensor:
        """(layers,) least-squares slope of log variance against log(t+1) over positions t >= 1, heads
        averaged: -1 is the uniform-attention rate 1/(t+1), 0 no decay."""
        v = getattr(self, which).mean(1)[:, 1:].clamp_min(1e-30).log()
        x = torch.arange(2, v.shape[-1] + 2, dtype=v.dtype).log()
        x = x - x.mean()
        return ((v - v.mean(-1, keepdim=True)) * x).sum(-1) / x.pow(2).sum()


def first_over_later(variance: torch.Tensor) -> torch.Tensor:
    """(layers,) the variance discrepancy: head-averaged variance of token 0 over the mean variance of the later
    positions 1..T-1, from a (layers, heads, T) variance by position."""
    v = variance.mean(1)
    return v[:, 0] / v[:, 1:].mean(-1)


def aggregation_prediction(pattern: torch.Tensor, value_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_j p_tj^2 var(v_j), sum_j p_tj^2) from attention maps (..., T, S) and value variances (..., S).

    If value vectors had independent coordinates, var(sum_j p_tj v_j) = sum_j p_tj^2 var(v_j): averaging
    over many keys shrinks the variance (by 1/(t+1) for uniform attention); token 0 keeps var(v_0)."""
    p2 = pattern.float().pow(2)
    return (p2 @ value_var.float().unsqueeze(-1)).squeeze(-1), p2.sum(-1)


@torch.no_grad()
def variance_profile(model, ids: torch.Tensor, layers: list[int] | None = None, batch_size: int = 8,
                     layers_per_pass: int = 4) -> VarianceProfile:
    """Measured and predicted dimension-wise variance of per-head attention outputs by position (Fig 1, 23).

    The prediction needs the attention maps (``attn.pattern``): at most ``layers_per_pass`` layers are held
    per forward pass, one batch of ``batch_size`` sequences at a time."""
    layers = models.check_layers(model, layers)
    heads = model.config.num_attention_heads

    def summed(rec: trace.Recorder) -> dict[str, torch.Tensor]:
        head_out, pattern, values = rec["attn.head_out"], rec["attn.pattern"], rec["attn.v"]
        got = {name: [] for name in ("measured", "predicted", "value_var", "sum_p2")}
        for i in range(len(rec.layers)):  # head_out (G,B,T,H,D), pattern (G,B,H,T,S), values (G,B,S,Hkv,D)
            vvar = attention.expand_kv(metrics.dimension_variance(values[i]), heads, dim=-1).transpose(1, 2).float()
            pred, p2 = aggregation_prediction(pattern[i], vvar)  # vvar: (B, H, S)
            for name, value in (("measured", metrics.dimension_variance(head_out[i]).transpose(1, 2)),
                                ("predicted", pred), ("value_var", vvar), ("sum_p2", p2)):
                got[name].append(value.sum(0))
        return {name: torch.stack(v) for name, v in got.items()}

    groups = [layers[i:i + layers_per_pass] for i in range(0, len(layers), layers_per_pass)]
    means = [mean_over_sequences(model, ids, ("attn.v", "attn.head_out", "attn.pattern"), summed,
                                 batch_size=batch_size, desc=f"variance profile, layers {group[0]}..{group[-1]}",
                                 layers=group) for group in groups]
    return VarianceProfile(**{name: torch.cat([m[name] for m in means]) for name in means[0]}, layers=layers)


@torch.no_grad()
def position_variance(model, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(layers, heads, T) dimension-wise variance of per-head attention outputs, mean over sequences; no
    attention maps, so cheap at any length (chapter 3 compares it with and without an intervention)."""
    return mean_over_sequences(
        model, ids, ("attn.head_out",),
        lambda rec: metrics.dimension_variance(rec["attn.head_out"]).sum(1).transpose(1, 2),
        batch_size=batch_size, desc="position variance")


# --- chapter 3: moving the sink (Fig 5, 6, 19, 20) --------------------------------------------------------

@torch.no_grad()
def attention_to(model, ids: torch.Tensor, key: int, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """(layers, heads) mean attention that queries after position ``key`` give to it, over sequences.

    Linear in length (``trace`` 's ``attn.sink`` with ``sink_index=key``); works inside an intervention."""
    if not 0 <= key < ids.shape[-1] - 1:
        raise ValueError(f"key {key} needs later queries: choose 0..{ids.shape[-1] - 2} for sequences of "
                         f"{ids.shape[-1]} tokens")
    return mean_over_sequences(model, ids, ("attn.sink",),
                               lambda rec: rec["attn.sink"][..., key + 1:].float().mean(-1).sum(1),  # (L, H)
                               batch_size=batch_size, desc=f"attention to {key}", sink_index=key, progress=progress)


@dataclasses.dataclass
class MaskEffect:
    """Attention to token ``k`` per layer without and with the mask intervention at ``k`` (Fig 5, 19)."""

    k: int
    masked_layers: list[int]
    before: torch.Tensor  # (layers,) mean over heads, sequences and queries after k
    after: torch.Tensor   # (layers,) the same with token k attending only to itself
    first: torch.Tensor   # (layers,) attention to token 0 measured the same way, no intervention

    @property
    def affected(self) -> list[int]:
        """Layers whose attention to k the mask can change: those after the first masked layer (the masked
        layer itself still sees unchanged keys and queries, only row k differs, and row k is not counted)."""
        return list(range(min(self.masked_layers) + 1, len(self.before)))

    def mean(self, which: str) -> float:
        """``before``, ``after`` or ``first`` averaged over the affected layers."""
        return float(getattr(self, which)[self.affected].mean())


@torch.no_grad()
def mask_effect(model, ids: torch.Tensor, k: int, layers: list[int] | None = None, batch_size: int = 8,
                progress: bool = True) -> MaskEffect:
    """Attention to ``k`` and to token 0 per layer, then attention to ``k`` under
    ``interventions.block_aggregation(model, k, layers)`` (default: all layers)."""
    k = interventions.check_position(k, ids.shape[-1], attended=True)
    n = models.n_layers(model)
    layers = sorted(set(models.check_layers(model, layers)))
    if min(layers) == n - 1:
        raise ValueError(f"a mask only at the last layer ({n - 1}) cannot change attention to k in any later "
                         f"layer; choose layers from 0..{n - 2}")
    before = attention_to(model, ids, k, batch_size, progress).mean(-1)
    first = attention_to(model, ids, 0, batch_size, progress).mean(-1)
    with interventions.block_aggregation(model, k, layers):
        after = attention_to(model, ids, k, batch_size, progress).mean(-1)
    return MaskEffect(k=k, masked_layers=layers, before=before, after=after, first=first)


@torch.no_grad()
def attention_received(model, ids: torch.Tensor, layer: int, batch_size: int = 1) -> torch.Tensor:
    """(T-1,) attention each key position 0..T-2 receives at ``layer``: mean over heads, sequences and the
    queries after it (Fig 5, 19). Holds one layer's maps for ``batch_size`` sequences at a time."""
    models.check_layer(model, layer)
    T = ids.shape[1]
    later = torch.tril(torch.ones(T, T, device=model.device), diagonal=-1)  # query t > key j
    received = mean_over_sequences(model, ids, ("attn.pattern",),
                                   lambda rec: (rec["attn.pattern"][0].float() * later).sum(-2).mean(1).sum(0),
                                   batch_size=batch_size, desc=f"attention received, layer {layer}", layers=[layer])
    return received[:-1] / later.sum(0)[:-1].cpu()


@dataclasses.dataclass
class LambdaSweep:
    """Attention to token ``k`` when its attention output at one layer is edited with strength lambda
    (Fig 6, 20): ``curves[mode]`` is (applied layers, lambdas, readout layers), NaN where not defined."""

    k: int
    lambdas: list[float]
    applied: list[int]
    curves: dict[str, torch.Tensor]
    baseline: torch.Tensor  # (readout layers,) no intervention

    def summary(self, mode: str, layer: int) -> torch.Tensor:
        """(lambdas,) attention to k averaged over the layers after ``layer`` (the only ones it can change)."""
        i = self.applied.index(layer)
        return self.curves[mode][i, :, layer + 1:].mean(-1)

    def baseline_after(self, layer: int) -> float:
        """Attention to k without intervention, averaged over the layers after ``layer``."""
        return float(self.baseline[layer + 1:].mean())

    def gains(self, layer: int) -> tuple[float, float]:
        """(amplified, control) attention to k at the largest lambda, each divided by the no-intervention
        value, over the layers after ``layer``: 1 means no change."""
        top = max(range(len(self.lambdas)), key=lambda j: self.lambdas[j])
        base = self.baseline_after(layer)
        return float(self.summary("amplify", layer)[top]) / base, float(self.summary("norm", layer)[top]) / base


@torch.no_grad()
def lambda_sweep(model, ids: torch.Tensor, k: int, lambdas: list[float], applied: list[int],
                 batch_size: int = 8, progress: bool = True) -> LambdaSweep:
    """Variance amplification and its norm-only control at position ``k``, one run per (layer, lambda, mode)
    (``interventions.amplify_variance`` / ``scale_norm``). The control is defined for lambda >= 1 only."""
    k = interventions.check_position(k, ids.shape[1], attended=True)
    lambdas = [interventions.check_lambda(lam) for lam in lambdas]
    n = models.n_layers(model)
    applied = [interventions.check_edit_layer(model, l) for l in applied]
    base = attention_to(model, ids, k, batch_size, progress=False).mean(-1)
    curves = {mode: torch.full((len(applied), len(lambdas), n), float("nan")) for mode in interventions.INTERVENTIONS}
    for mode in curves:  # lambda = 1 leaves the output unchanged in both modes (tested): no run needed
        curves[mode][:, [j for j, lam in enumerate(lambdas) if lam == 1.0]] = base
    runs = [(i, layer, j, lam, mode) for i, layer in enumerate(applied) for j, lam in enumerate(lambdas)
            for mode in interventions.INTERVENTIONS if lam != 1.0 and not (mode == "norm" and lam < 1)]
    for i, layer, j, lam, mode in _progress(runs, "lambda sweep", quiet=not progress):
        with interventions.INTERVENTIONS[mode](model, k, lam, layer):
            curves[mode][i, j] = attention_to(model, ids, k, batch_size, progress=False).mean(-1)
    return LambdaSweep(k=k, lambdas=lambdas, applied=list(applied), curves=curves, baseline=base)
