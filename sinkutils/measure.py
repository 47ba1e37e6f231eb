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
import torch.nn.functional as F
from tqdm.auto import tqdm

from sinkutils import attention, compat, interventions, metrics, models, store, trace


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
            decoder(model)(input_ids=chunk.to(model.device))
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


def sink_profile(model, ids: torch.Tensor, epsilon: float = 0.3, min_query: int = 4,
                 batch_size: int = 8) -> SinkProfile:
    """Attention to token 0 and the input norms of token 0 and of the later tokens, per layer, averaged over the
    rows of ``ids`` (read from the ``survey``)."""
    metrics.check_min_query(min_query, check_ids(ids).shape[1])
    return survey(model, ids, batch_size=batch_size).sink_profile(epsilon, min_query)


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


def variance_profile(model, ids: torch.Tensor, layers: list[int] | None = None,
                     batch_size: int = 8) -> VarianceProfile:
    """Measured and predicted dimension-wise variance of per-head attention outputs by position (Fig 1, 23), read
    from the ``survey`` (the prediction reads each layer's attention maps a chunk of queries at a time)."""
    return survey(model, ids, batch_size=batch_size).variance_profile(models.check_layers(model, layers))


def position_variance(model, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(layers, heads, T) dimension-wise variance of per-head attention outputs, mean over sequences (chapter 3
    compares it with and without an intervention; inside one the ``survey`` is measured afresh)."""
    return survey(model, ids, batch_size=batch_size).mean("head_var").float()


# --- chapter 3: moving the sink (Fig 5, 6, 19, 20) --------------------------------------------------------

@torch.no_grad()
def attention_to(model, ids: torch.Tensor, key: int | tuple[int, ...], batch_size: int = 8,
                 progress: bool = True) -> torch.Tensor:
    """(layers, heads) mean attention that queries after position ``key`` give to it, over sequences; for a tuple
    of keys (len(keys), layers, heads), from the same pass (chapter 3's BOS-moved probe reads two).

    Linear in length (``attention.key_weights``: no (T x T) map); works inside an intervention."""
    keys = (key,) if isinstance(key, int) else tuple(key)
    T = check_ids(ids).shape[-1]
    for j in keys:
        if not 0 <= j < T - 1:
            raise ValueError(f"key {j} needs later queries: choose 0..{T - 2} for sequences of {T} tokens")
    index = {block.self_attn: l for l, block in enumerate(models.decoder_layers(model))}
    total = torch.zeros(len(keys), len(index), model.config.num_attention_heads, dtype=torch.float64)

    def received(module, query, key_states, value, mask, scaling):
        weights, _ = attention.key_weights(module, query, key_states, mask, scaling, keys)
        for i, j in enumerate(keys):
            total[i, index[module]] += weights[i][..., j + 1:].float().mean(-1).sum(0).double().cpu()

    n = tapped_passes(model, ids, index, received, batch_size, f"attention to {key}", progress)
    mean = (total / n).float()
    return mean[0] if isinstance(key, int) else mean


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
    """Attention to ``k`` and to token 0 per layer (the ``survey``'s), then attention to ``k`` under
    ``interventions.block_aggregation(model, k, layers)`` (default: all layers): one pass of its own, kept by
    ``store``."""
    k = interventions.check_position(k, ids.shape[-1], attended=True)
    n = models.n_layers(model)
    layers = sorted(set(models.check_layers(model, layers)))
    if min(layers) == n - 1:
        raise ValueError(f"a mask only at the last layer ({n - 1}) cannot change attention to k in any later "
                         f"layer; choose layers from 0..{n - 2}")

    def measured() -> MaskEffect:
        base = survey(model, ids, k=k, batch_size=batch_size, progress=progress)
        with interventions.block_aggregation(model, k, layers):
            after = attention_to(model, ids, k, batch_size, progress).mean(-1)
        return MaskEffect(k=k, masked_layers=layers, before=base.attention_to(k).mean(-1).float(), after=after,
                          first=base.attention_to(0).mean(-1).float())

    return store.cached("mask_effect", model, ids, dict(k=k, layers=layers, batch_size=batch_size), measured)


@torch.no_grad()
def attention_received(model, ids: torch.Tensor, layer: int, batch_size: int = 1) -> torch.Tensor:
    """(T-1,) attention each key position 0..T-2 receives at ``layer``: mean over heads, sequences and the
    queries after it (Fig 5, 19). Holds one layer's maps for ``batch_size`` sequences at a time."""
    models.check_layer(model, layer)
    T = ids.shape[1]
    later = torch.tril(torch.ones(T, T, device=model.device), diagonal=-1)  # query t > key j
    received = mean_over_sequences(  # a spread model's maps are gathered on the CPU: ``later`` goes where they are
        model, ids, ("attn.pattern",),
        lambda rec: (rec["attn.pattern"][0].float() * later.to(rec.home or later.device)).sum(-2).mean(1).sum(0),
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
    (``interventions.amplify_variance`` / ``scale_norm``), against the ``survey``'s attention to ``k``; kept by
    ``store``. The control is defined for lambda >= 1 only."""
    k = interventions.check_position(k, ids.shape[1], attended=True)
    lambdas = [interventions.check_lambda(lam) for lam in lambdas]
    n = models.n_layers(model)
    applied = [interventions.check_edit_layer(model, l) for l in applied]

    def measured() -> LambdaSweep:
        base = survey(model, ids, k=k, batch_size=batch_size, progress=False).attention_to(k).mean(-1).float()
        curves = {mode: torch.full((len(applied), len(lambdas), n), float("nan"))
                  for mode in interventions.INTERVENTIONS}
        for mode in curves:  # lambda = 1 leaves the output unchanged in both modes (tested): no run needed
            curves[mode][:, [j for j, lam in enumerate(lambdas) if lam == 1.0]] = base
        runs = [(i, layer, j, lam, mode) for i, layer in enumerate(applied) for j, lam in enumerate(lambdas)
                for mode in interventions.INTERVENTIONS if lam != 1.0 and not (mode == "norm" and lam < 1)]
        for i, layer, j, lam, mode in _progress(runs, "lambda sweep", quiet=not progress):
            curves[mode][i, j] = _edited_attention(model, ids, k, lam, layer, mode, batch_size)
        return LambdaSweep(k=k, lambdas=lambdas, applied=list(applied), curves=curves, baseline=base)

    return store.cached("lambda_sweep", model, ids, dict(k=k, lambdas=lambdas, applied=applied,
                                                          batch_size=batch_size), measured)

@dataclasses.dataclass
class EditedAttention:
    """One run of a lambda sweep: (layers,) attention to ``k``, mean over heads, under one edit."""

    attention: torch.Tensor


def _edited_attention(model, ids, k, lam, layer, mode, batch_size) -> torch.Tensor:
    """Attention to ``k`` per layer with token k's attention output at ``layer`` edited by ``mode`` at ``lam``, kept
    by ``store`` run by run: sweeps that share a run (chapter 3's figure and the claim's lambda = 16 at the chain's
    layer) measure it once."""
    def run() -> EditedAttention:
        with interventions.INTERVENTIONS[mode](model, k, lam, layer):
            return EditedAttention(attention_to(model, ids, k, batch_size, progress=False).mean(-1))

    return store.cached("lambda_run", model, ids, dict(k=k, lam=lam, layer=layer, mode=mode, batch_size=batch_size),
                        run).attention


# --- one recorded pass: everything chapters 1-5 read -----------------------------------------------------

@dataclasses.dataclass
class Survey:
    """What chapters 1-5 read about a model on ``ids``, from one forward pass per batch (``survey``), each quantity
    reduced while its layer runs: ``sums`` over the sequences (``mean`` divides), and a few vectors kept per sequence
    (``rows``). Memory is O(layers x heads x T) per batch: no (T x T) map is kept.

    ``sums`` (L layers, H query heads, T positions, d width, F FFN width; depth = L + 1 with the embeddings at 0):
    ``sink`` / ``to_k`` (L, H, T) attention each query gives token 0 / token ``k``; ``entropy`` (L, H, T);
    ``head_var`` (L, H, T) dimension-wise variance of per-head attention outputs; ``value_var``, ``predicted``,
    ``sum_p2`` (L, H, T) the aggregation prediction (``aggregation_prediction``); ``wo_first`` / ``wo_later``
    (L, H*D) per-dimension squared deviations at W_O's input, token 0 / positions >= ``min_query``; ``wo_in`` /
    ``wo_out`` (L, T) dimension-wise variance before / after W_O; ``positivity`` (L, H) share of queries t >= 1
    with a positive logit toward token 0; ``act_first`` / ``act_later`` (L, F) mean |FFN activation|; ``first_sq``,
    ``later_sq`` (depth, d), ``first_dominance``, ``later_dominance``, ``first_norm``, ``later_norm``,
    ``effective_rank``, ``effective_rank_later`` (depth,) the residual stream.
    ``rows``: ``sink_key`` (L, N, Hkv, D) token 0's key; ``state_first`` / ``state_position`` (L, N, d) attention's
    normalised input at token 0 / at ``position``; ``neuron_cos``, ``neuron_up``, ``neuron_act`` (L, N, T) for each
    layer's ``followed`` FFN neuron (the largest W_gate / W_up norm product)."""

    n: int
    length: int
    k: int
    min_query: int
    position: int
    followed: list[int]
    sums: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor]

    def mean(self, name: str) -> torch.Tensor:
        """The mean over sequences of a summed quantity, in float32 (the sums are kept in float64)."""
        return (self.sums[name] / self.n).float()

    def attention_to(self, key: int) -> torch.Tensor:
        """(layers, heads) ``attention_to``: mean attention the queries after ``key`` (0 or ``k``) give it."""
        if key not in (0, self.k):
            raise ValueError(f"this survey recorded attention to tokens 0 and {self.k}, not {key}")
        return self.mean("sink" if key == 0 else "to_k")[..., key + 1:].mean(-1)

    def sink_profile(self, epsilon: float = 0.3, min_query: int = 4) -> SinkProfile:
        metrics.check_min_query(min_query, self.length)
        sink = self.mean("sink")[:, None]  # (L, 1, H, T): the sequence mean as a batch of one
        return SinkProfile(attention_to_first=metrics.mean_sink(sink, min_query),
                           per_head=sink[:, 0, :, min_query:].mean(-1),
                           sink_rate=metrics.sink_rate(sink, epsilon, min_query),
                           first_norm=self.mean("first_norm")[:-1], later_norm=self.mean("later_norm")[:-1],
                           epsilon=epsilon, min_query=min_query)

    def variance_profile(self, layers: list[int] | None = None) -> VarianceProfile:
        layers = list(range(len(self.sums["sink"]))) if layers is None else list(layers)
        return VarianceProfile(measured=self.mean("head_var")[layers], predicted=self.mean("predicted")[layers],
                               value_var=self.mean("value_var")[layers], sum_p2=self.mean("sum_p2")[layers],
                               layers=layers)


#: the second key a ``survey`` records attention to, unless told (chapter 3's mask position)
SURVEY_K = 10


@torch.no_grad()
def survey(model, ids: torch.Tensor, k: int | None = None, min_query: int = 4, position: int | None = None,
           batch_size: int = 8, progress: bool = True) -> Survey:
    """The one recorded pass (``Survey``) of ``model`` over ``ids``, kept by ``store``: the same weights, ids and
    arguments are measured once per process, and once per build where ``SINKBOOK_STORE`` is set. ``k``: the second
    key whose attention is recorded (chapter 3's mask position); ``position``: where ``rows`` keeps the normalised
    state besides token 0 (default: the middle, ``direction_lock``'s comparison token). ``k`` defaults to
    ``SURVEY_K`` (chapter 3's default), or T - 2 for shorter rows (token 0 itself for rows of 2)."""
    T = check_ids(ids).shape[1]
    k = (min(SURVEY_K, T - 2) if T > 2 else 0) if k is None else interventions.check_position(k, T, attended=True)
    metrics.check_min_query(min_query, T)
    position = T // 2 if position is None else position
    if not 0 < position < T:
        raise ValueError(f"position must lie in 1..{T - 1}, got {position}")
    params = dict(k=k, min_query=min_query, position=position, batch_size=batch_size)
    return store.cached("survey", model, ids, params,
                        lambda: _survey(model, ids, k, min_query, position, batch_size, progress))


def followed_neurons(model) -> list[int]:
    """Per layer, the FFN neuron with the largest ||W_gate[n]|| * ||W_up[n]|| (``structure.ffn_norms``' score): the
    neuron chapter 4 follows (a super neuron when the layer has one)."""
    out = []
    for block in models.decoder_layers(model):
        with models.materialized(block.mlp):
            gate, up = (w.weight.detach().float().norm(dim=1).cpu() for w in (block.mlp.gate_proj, block.mlp.up_proj))
        out.append(int((gate * up).argmax()))
    return out


def _survey(model, ids, k, min_query, position, batch_size, progress) -> Survey:
    blocks = models.decoder_layers(model)
    followed = followed_neurons(model)
    index = {block.self_attn: l for l, block in enumerate(blocks)}
    sums: dict[str, dict[int, torch.Tensor]] = {}
    rows: dict[str, dict[int, list[torch.Tensor]]] = {}
    inputs: dict[int, torch.Tensor] = {}  # each layer's FFN input, until its activations arrive

    def add(name: str, l: int, value: torch.Tensor) -> None:  # summed over the batch already
        got = sums.setdefault(name, {})
        value = value.double().cpu()
        got[l] = got[l] + value if l in got else value

    def keep(name: str, l: int, value: torch.Tensor) -> None:  # one entry per sequence
        rows.setdefault(name, {}).setdefault(l, []).append(value.float().cpu())

    def from_attention(module, query, key, value, mask, scaling):
        l = index[module]
        H = query.shape[1]
        vvar = attention.expand_kv(metrics.dimension_variance(value), H)  # (B, H, S)
        got: dict[str, list[torch.Tensor]] = {}  # per query chunk, joined along the queries below
        for _, p in attention.pattern_chunks(module, query, key, mask, scaling):  # one map serves every statistic
            pred, s2 = aggregation_prediction(p, vvar)
            for name, stat in (("sink", p[..., 0]), ("to_k", p[..., k]), ("predicted", pred), ("sum_p2", s2),
                               ("entropy", attention.pattern_entropy(module, p))):
                got.setdefault(name, []).append(stat)
        for name, chunks in got.items():
            add(name, l, torch.cat(chunks, -1).sum(0))
        add("value_var", l, vvar.float().sum(0))
        k0 = attention.expand_kv(key[:, :, 0].float(), H)  # (B, H, D): token 0's key, the same before and after RoPE
        logits = (query.float() @ k0[..., None])[..., 0]  # (B, H, T): q_t . k_0
        add("positivity", l, metrics.positivity_ratio(logits[..., 1:]).sum(0))
        keep("sink_key", l, key[:, :, 0])

    def w_o(l: int):
        def hook(_m, args, out):
            x = args[0].float()  # (B, T, H*D): the per-head attention outputs W_O reads
            heads = x.unflatten(-1, (-1, blocks[l].self_attn.head_dim))
            add("head_var", l, metrics.dimension_variance(heads).transpose(1, 2).sum(0))
            dev = (x - x.mean(-1, keepdim=True)).pow(2)  # each dimension's part of the variance over H*D
            add("wo_first", l, dev[:, 0].sum(0))
            add("wo_later", l, dev[:, min_query:].mean(1).sum(0))
            add("wo_in", l, dev.mean(-1).sum(0))  # = metrics.dimension_variance(x)
            add("wo_out", l, metrics.dimension_variance(out.float()).sum(0))
        return hook

    def attention_input(l: int):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            keep("state_first", l, x[:, 0])
            keep("state_position", l, x[:, position])
        return hook

    def ffn_input(l: int):
        def hook(_m, args, kwargs):
            inputs[l] = args[0] if args else kwargs["hidden_states"]
        return hook

    def ffn_activation(l: int):
        def hook(_m, args):
            act = args[0].float()  # (B, T, F): act(gate) * up, what down_proj reads
            size = act.abs()
            add("act_first", l, size[:, 0].sum(0))
            add("act_later", l, size[:, 1:].mean(1).sum(0))
            for name, value in zip(("cos", "up", "act"), neuron_responses(blocks[l].mlp, inputs.pop(l), act,
                                                                         [followed[l]])):
                keep(f"neuron_{name}", l, value[..., 0])
        return hook

    def residual(depth: int):
        def hook(_m, _args, out):
            h = compat.layer_output(out).float()  # (B, T, d)
            dom, norm = metrics.dominance_ratio(h), h.norm(dim=-1)
            for name, value in (("first_sq", h[:, 0].pow(2).sum(0)), ("later_sq", h[:, 1:].pow(2).mean(1).sum(0)),
                                ("first_dominance", dom[:, 0].sum(0)), ("later_dominance", dom[:, 1:].mean(1).sum(0)),
                                ("first_norm", norm[:, 0].sum(0)), ("later_norm", norm[:, 1:].mean(1).sum(0)),
                                *zip(("effective_rank", "effective_rank_later"),
                                     (r.sum(0) for r in metrics.effective_ranks_with_and_without_first(h)))):
                add(name, depth, value)
        return hook

    hooks = [model.get_input_embeddings().register_forward_hook(residual(0))]
    for l, block in enumerate(blocks):
        hooks += [block.register_forward_hook(residual(l + 1)),
                  block.self_attn.o_proj.register_forward_hook(w_o(l)),
                  block.self_attn.register_forward_pre_hook(attention_input(l), with_kwargs=True),
                  block.mlp.register_forward_pre_hook(ffn_input(l), with_kwargs=True),
                  block.mlp.down_proj.register_forward_pre_hook(ffn_activation(l))]
    try:
        n = tapped_passes(model, ids, index, from_attention, batch_size, "survey", progress)
    finally:
        for h in hooks:
            h.remove()
    return Survey(n=n, length=ids.shape[1], k=k, min_query=min_query, position=position, followed=followed,
                  sums={name: torch.stack([v[i] for i in sorted(v)]) for name, v in sums.items()},
                  rows={name: torch.stack([torch.cat(v[i]) for i in sorted(v)]) for name, v in rows.items()})


def neuron_responses(mlp, x: torch.Tensor, act: torch.Tensor,
                     neurons: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fig 9 for ``neurons`` of one FFN, from its input ``x`` (B, T, d) and activations ``act`` (B, T, F): the cosine of
    each token's input with the neuron's W_gate row, the raw up activation W_up[n] . x_t, and act(gate) * up, each
    (B, T, len(neurons))."""
    x = x.float()
    with models.materialized(mlp):  # the rows, on the device the input is on (an offloaded layer's are meta)
        gate, up = (w.weight[neurons].float().to(x.device) for w in (mlp.gate_proj, mlp.up_proj))
        bias = None if mlp.up_proj.bias is None else mlp.up_proj.bias[neurons].float().to(x.device)
    return metrics.cosine(x[..., None, :], gate), F.linear(x, up, bias), act[..., neurons].float()


def tapped_passes(model, ids: torch.Tensor, modules, tap, batch_size: int, desc: str, progress: bool) -> int:
    """Run ``model``'s decoder over ``ids`` in batches with the sinkbook attention selected and ``tap`` (an
    ``attention.tap`` callable) on ``modules``; returns the number of sequences (what the sums are divided by)."""
    previous = compat.set_attention(model, attention.ATTN_NAME)
    n = 0
    try:
        with attention.tap(modules, tap):
            for chunk in batches(ids, batch_size, desc, progress):
                decoder(model)(input_ids=chunk.to(model.device))
                n += chunk.shape[0]
    finally:
        compat.set_attention(model, previous)
    return n


def decoder(model):
    """The decoder stack without the LM head (``model.model``): measurements need hidden states, not logits, and
    the head is a fifth of a small model's forward pass (SmolLM2: 49152 x 576)."""
    return model.model
