"""The structural links of the chain (chapters 4 and 5), measured on a model: one function per figure.

Chapter 4, super neurons: ``wo_alignment`` (Fig 7), ``ffn_norms`` (Fig 8), ``neuron_activity`` (Fig 9),
``down_column`` (Fig 10). Chapter 5, dimension disparity: ``residual_profile`` (Fig 11, 21: dominance ratio,
massive channels, effective rank), ``direction_lock`` (RMSNorm as a directional filter), ``qk_locking``
(Fig 12). ``REFERENCE`` holds the values published for Llama-2-7B and Llama-3-8B that the GPU profile checks.

Every formula comes from ``sinkutils.metrics``; every activation from ``sinkutils.trace`` (raw Hugging Face
numbers: the FFN input ``mlp.in``, the post-RoPE queries and keys ``attn.q`` / ``attn.k``, the normalised input of
attention ``attn.in``), over batches of text with ``measure.mean_over_sequences`` / ``measure.recorded``. Token 0 is
the first token of a row; the *later* tokens are positions 1..T-1.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from sinkutils import attention, measure, metrics, models, trace

#: Values published for the paper's models. Layers are 0-based module indices (``model.layers[1]``).
REFERENCE = {
    "llama-2-7b": {
        "shape": (4096, 11008),  # (hidden_size, intermediate_size): the values hold for this shape only
        "layer": 1, "massive_dims": (1415, 2533), "super_neuron": 7890, "super_weight": (2533, 7890),
        "source": "massive dimensions 1415 and 2533 from the output of layers[1] (Sun et al. 2024); super "
                  "weight layers[1].mlp.down_proj.weight[2533, 7890] (Yu et al. 2024, arXiv 2411.07265)"},
    "llama-3-8b": {
        "shape": (4096, 14336),
        "layer": 1, "massive_dims": (788, 1384, 4062),
        "source": "massive dimensions 788, 1384 and 4062 from the output of layers[1], as reported by public "
                  "massive-activation analyses of Meta-Llama-3-8B (not by the paper itself)"},
}


def reference_for(model_name: str) -> dict | None:
    """The ``REFERENCE`` entry of a short name or hub id (``meta-llama/Llama-2-7b-hf``), else None."""
    for short, hub_id in models.HUB.items():
        if model_name in (short, hub_id) and short in REFERENCE:
            return REFERENCE[short]
    return None


def _sorted_layers(model, layers) -> list[int]:
    """``models.check_layers``'s layers (all when None), each once, in order."""
    return sorted(set(models.check_layers(model, layers)))


# ----------------------------------------------------------------------------------------- chapter 4


@dataclasses.dataclass
class WOAlignment:
    """Fig 7 for one layer: W_O against token 0's input profile, and the variance before and after W_O."""

    layer: int
    tau: torch.Tensor            # (hidden,) Kendall tau of |W_O[i, :]| with token 0's profile, per output neuron i
    tau_later: torch.Tensor      # (hidden,) the same with the later tokens' profile (control)
    first_profile: torch.Tensor  # (H*D,) token 0's per-dimension contribution to its dimension-wise variance
    later_profile: torch.Tensor  # (H*D,) the same for the later tokens, those at positions >= min_query
    variance_in: torch.Tensor    # (T,) dimension-wise variance of the o_proj input per position
    variance_out: torch.Tensor   # (T,) dimension-wise variance of the o_proj output per position
    min_query: int

    def ratio(self, which: str = "in") -> float:
        """Token 0's dimension-wise variance over the mean of the later positions >= min_query, before/after
        W_O."""
        v = self.variance_in if which == "in" else self.variance_out
        return float(v[0] / v[self.min_query:].mean())


@torch.no_grad()
def wo_alignment(model, ids: torch.Tensor, layers: list[int] | None = None, min_query: int = 4,
                 batch_size: int = 8) -> dict[int, WOAlignment]:
    """Fig 7: for each output neuron i of ``o_proj``, Kendall's tau between its weight magnitudes |W_O[i, j]|
    over the H*D input dimensions j and token 0's profile c_j = mean over sequences of (x_0j - mean_j x_0)^2
    at the o_proj input (the per-head attention outputs): the contribution of dimension j to token 0's
    dimension-wise variance. Kendall's tau is rank-based, so |W| and W^2 give the same tau. The control uses
    the same profile of the later tokens. Also the dimension-wise variance per position before and after W_O."""
    layers = _sorted_layers(model, layers)
    metrics.check_min_query(min_query, measure.check_ids(ids).shape[1])
    blocks = models.decoder_layers(model)
    found = measure.survey(model, ids, min_query=min_query, batch_size=batch_size)
    result = {}
    for l in layers:
        with models.materialized(blocks[l].self_attn.o_proj):  # Kendall on the layer's device (GPU: fast)
            w = blocks[l].self_attn.o_proj.weight.detach().float().abs()
        first, later = (found.mean(name)[l].float() for name in ("wo_first", "wo_later"))
        result[l] = WOAlignment(layer=l, tau=metrics.kendall_tau(w, first.to(w.device)).cpu(),
                                tau_later=metrics.kendall_tau(w, later.to(w.device)).cpu(), first_profile=first,
                                later_profile=later, variance_in=found.mean("wo_in")[l].float(),
                                variance_out=found.mean("wo_out")[l].float(), min_query=min_query)
    return result


def wo_column_alignment(model, wo: WOAlignment) -> float:
    """Fig 7 read by W_O's columns instead of its rows: Kendall's tau between each input dimension's column norm
    ||W_O[:, j]|| (how much of dimension j reaches the residual stream at all) and token 0's profile c_j. Where the
    row reading finds no alignment (SmolLM2-135M), this says whether W_O favours token 0's high-variance
    dimensions as a whole."""
    o_proj = models.decoder_layers(model)[wo.layer].self_attn.o_proj
    with models.materialized(o_proj):
        columns = o_proj.weight.detach().float().norm(dim=0).cpu()
    return float(metrics.kendall_tau(columns, wo.first_profile.float().cpu()))


@dataclasses.dataclass
class FFNNorms:
    """Fig 8 for one layer: L2 norms of each hidden neuron's W_gate and W_up rows, and the super neurons."""

    layer: int
    gate: torch.Tensor   # (F,) ||W_gate[n, :]||
    up: torch.Tensor     # (F,) ||W_up[n, :]||
    score: torch.Tensor  # (F,) ||W_gate[n, :]|| * ||W_up[n, :]||
    z: torch.Tensor      # (F,) robust z-score of ``score``
    z_threshold: float

    @property
    def super_neurons(self) -> list[int]:
        """Neurons whose robust z-score exceeds the threshold, largest score first (the rule of Fig 8)."""
        idx = (self.z > self.z_threshold).nonzero().flatten()
        return [int(i) for i in idx[self.score[idx].argsort(descending=True)]]

    def candidates(self, k: int) -> list[int]:
        """The ``k`` largest scores, super or not (what the widgets let a reader inspect)."""
        return [int(i) for i in self.score.topk(min(k, len(self.score))).indices]


def ffn_norms(model, layer: int, z_threshold: float = 8.0) -> FFNNorms:
    """Fig 8: per FFN hidden neuron n, ||W_gate[n, :]|| and ||W_up[n, :]||. Rule: n is a *super neuron* when
    s_n = ||W_gate[n]|| * ||W_up[n]|| (the gain of SwiGLU for an input aligned with both rows) has a robust
    z-score (median / MAD) above ``z_threshold``: a handful of outliers, never a fixed count."""
    mlp = models.decoder_layers(model)[models.check_layer(model, layer)].mlp
    with models.materialized(mlp):
        return ffn_norms_of(mlp.gate_proj.weight, mlp.up_proj.weight, layer, z_threshold)


def ffn_norms_of(gate_weight: torch.Tensor, up_weight: torch.Tensor, layer: int = -1,
                 z_threshold: float = 8.0) -> FFNNorms:
    """``ffn_norms`` from the weight matrices themselves, (F, d) in nn.Linear layout (row n = neuron n): the
    rule of Fig 8 without a model (the chapter-4 assignment checks against it)."""
    if gate_weight.dim() != 2 or gate_weight.shape != up_weight.shape:
        raise ValueError(f"need W_gate and W_up of one shape (F, d), got {tuple(gate_weight.shape)} and "
                         f"{tuple(up_weight.shape)}")
    gate = gate_weight.detach().float().norm(dim=1).cpu()
    up = up_weight.detach().float().norm(dim=1).cpu()
    score = gate * up
    return FFNNorms(layer=layer, gate=gate, up=up, score=score, z=metrics.robust_z(score), z_threshold=z_threshold)


@dataclasses.dataclass
class NeuronActivity:
    """Fig 9 for one layer: how the chosen FFN neurons respond to each token."""

    layer: int
    neurons: list[int]
    cos_gate: torch.Tensor   # (N, T, k) cosine of each token's FFN input with the neuron's W_gate row
    up: torch.Tensor         # (N, T, k) raw up activation W_up[n] . x_t
    act: torch.Tensor        # (N, T, k) act(gate) * up: what down_proj receives
    first_abs: torch.Tensor  # (F,) mean |act| of token 0, every neuron
    later_abs: torch.Tensor  # (F,) mean |act| over tokens t >= 1, every neuron

    @property
    def top_neuron(self) -> int:
        """The neuron with the largest mean |activation| on token 0 (the functional definition)."""
        return int(self.first_abs.argmax())

    def selectivity(self) -> torch.Tensor:
        """(k,) mean |act| on token 0 over mean |act| on later tokens, per chosen neuron."""
        idx = torch.tensor(self.neurons)
        return self.first_abs[idx] / self.later_abs[idx].clamp_min(1e-12)

    def summary(self, i: int = 0) -> dict[str, float]:
        """Token 0 against the later tokens for the i-th chosen neuron: cosine, up activation, |act|."""
        c, u, a = self.cos_gate[..., i], self.up[..., i], self.act[..., i].abs()
        return {"cos_first": float(c[:, 0].mean()), "cos_later": float(c[:, 1:].mean()),
                "up_first": float(u[:, 0].mean()), "up_later_abs": float(u[:, 1:].abs().mean()),
                "act_first": float(a[:, 0].mean()), "act_later": float(a[:, 1:].mean())}


@torch.no_grad()
def neuron_activity(model, ids: torch.Tensor, neurons: dict[int, list[int]],
                    batch_size: int = 8) -> dict[int, NeuronActivity]:
    """Fig 9: for each ``{layer: [neurons]}``, per token t the cosine between the FFN input x_t and the
    neuron's W_gate row, its raw up activation W_up[n] . x_t, and act(gate) * up from the trace; plus every
    neuron's mean |activation| on token 0 and on later tokens (one forward pass for all layers)."""
    layers = _sorted_layers(model, list(neurons))
    blocks = models.decoder_layers(model)
    width = blocks[layers[0]].mlp.gate_proj.weight.shape[0]
    for l in layers:
        bad = [n for n in neurons[l] if not 0 <= n < width]
        if bad or not neurons[l]:
            raise ValueError(f"layer {l}: neurons {bad or neurons[l]} invalid; this FFN has neurons 0..{width - 1}")
    found = measure.survey(model, ids, batch_size=batch_size)
    if all(neurons[l] == [found.followed[l]] for l in layers):  # the neuron each layer follows: the survey has it
        return {l: NeuronActivity(layer=l, neurons=list(neurons[l]),
                                  **{name: found.rows[f"neuron_{part}"][l][..., None] for name, part in
                                     (("cos_gate", "cos"), ("up", "up"), ("act", "act"))},
                                  first_abs=found.mean("act_first")[l].float(),
                                  later_abs=found.mean("act_later")[l].float()) for l in layers}
    parts = {l: dict(cos=[], up=[], act=[]) for l in layers}
    for _, rec in measure.recorded(model, ids, "mlp.in", "mlp.act", batch_size=batch_size, desc="neuron activity",
                                   layers=layers):
        for i, l in enumerate(layers):
            got = measure.neuron_responses(blocks[l].mlp, rec["mlp.in"][i], rec["mlp.act"][i], neurons[l])
            for name, value in zip(("cos", "up", "act"), got):
                parts[l][name].append(value.cpu())
    return {l: NeuronActivity(layer=l, neurons=list(neurons[l]), cos_gate=torch.cat(p["cos"]),
                              up=torch.cat(p["up"]), act=torch.cat(p["act"]),
                              first_abs=found.mean("act_first")[l].float(),
                              later_abs=found.mean("act_later")[l].float()) for l, p in parts.items()}


@dataclasses.dataclass
class DownColumn:
    """Fig 10: the W_down column of one FFN neuron, i.e. what it writes into each residual channel."""

    layer: int
    neuron: int
    weights: torch.Tensor  # (hidden,) W_down[:, neuron]
    kurtosis: float        # excess kurtosis: 0 for Gaussian weights
    top_channels: list[int]
    top_share: float       # share of the column's squared norm in ``top_channels``


def down_column(model, layer: int, neuron: int, k: int = 2) -> DownColumn:
    """Fig 10: W_down[:, neuron], its excess kurtosis, its ``k`` largest-magnitude residual channels and their
    share of the squared norm (k / hidden for a flat column). For Llama-2-7B, layer 1, neuron 7890 the top
    channel is 2533: the super weight W_down[2533, 7890]."""
    down_proj = models.decoder_layers(model)[models.check_layer(model, layer)].mlp.down_proj
    if not 0 <= neuron < down_proj.weight.shape[1]:
        raise ValueError(f"neuron {neuron} is out of range: this FFN has neurons 0..{down_proj.weight.shape[1] - 1}")
    with models.materialized(down_proj):
        w = down_proj.weight[:, neuron].detach().float().cpu()
    top = [int(c) for c in w.abs().topk(k).indices]
    return DownColumn(layer=layer, neuron=neuron, weights=w, kurtosis=float(metrics.excess_kurtosis(w)),
                      top_channels=top, top_share=float(metrics.top_share(w, k)))


def compare_with_reference(model_name: str, model, ids: torch.Tensor,
                           batch_size: int = 8) -> list[tuple[str, object, object]] | None:
    """(quantity, published, measured) rows for a model listed in ``REFERENCE``, else None (the GPU profile's
    check of chapter 4): token 0's massive channels after the reference layer and, where published, the
    FFN neuron most active on token 0 and the channel of its largest W_down weight (the super weight)."""
    ref = reference_for(model_name)
    if ref is None:
        return None
    shape = (model.config.hidden_size, model.config.intermediate_size)
    if ref.get("shape", shape) != shape:  # a stand-in under the hub id (tests, benchmarks/gpu_check.py): indices do not apply
        return [("model shape (hidden size, FFN width) the published indices refer to", ref["shape"], shape)]
    l, k = ref["layer"], len(ref["massive_dims"])
    rows = [(f"token 0's top {k} residual channels after layers[{l}]", sorted(ref["massive_dims"]),
             sorted(massive_dimensions(model, ids, l, k, batch_size)))]
    if "super_neuron" in ref:
        act = neuron_activity(model, ids, {l: [ref["super_neuron"]]}, batch_size)[l]
        rows.append((f"FFN neuron of layers[{l}] most active on token 0", ref["super_neuron"], act.top_neuron))
        rows.append((f"channel of the largest weight in layers[{l}].mlp.down_proj[:, {ref['super_neuron']}]",
                     ref["super_weight"][0], down_column(model, l, ref["super_neuron"]).top_channels[0]))
    return rows


# ----------------------------------------------------------------------------------------- chapter 5


@dataclasses.dataclass
class ResidualProfile:
    """The residual stream per depth: index 0 is the embedding output, index l+1 the output of layer l."""

    first_sq: torch.Tensor         # (L+1, d) token 0's mean squared value per channel
    later_sq: torch.Tensor         # (L+1, d) the same over the later tokens, t >= 1
    first_dominance: torch.Tensor  # (L+1,) token 0's dominance ratio max|x| / mean|x|
    later_dominance: torch.Tensor  # (L+1,) mean dominance ratio of tokens t >= 1
    first_norm: torch.Tensor       # (L+1,) token 0's L2 norm
    later_norm: torch.Tensor       # (L+1,) mean L2 norm of tokens t >= 1
    effective_rank: torch.Tensor | None       # (L+1,) mean over sequences, all tokens (Fig 21)
    effective_rank_later: torch.Tensor | None  # (L+1,) the same without token 0

    @property
    def disparity_layer(self) -> int:
        """The layer whose output raises token 0's dominance ratio the most (Llama-2-7B: layers[1])."""
        d = self.first_dominance
        return int((d[1:] / d[:-1].clamp_min(1e-12)).argmax())

    def top_channels(self, index: int, k: int = 2) -> list[int]:
        """Token 0's ``k`` largest channels (root mean square) at residual ``index`` (l+1 = output of layer l)."""
        return [int(c) for c in self.first_sq[index].topk(k).indices]

    def share(self, channels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(L+1,) share of token 0's and of later tokens' squared norm that lies in ``channels``."""
        idx = torch.tensor(channels)
        return (self.first_sq[:, idx].sum(-1) / self.first_sq.sum(-1),
                self.later_sq[:, idx].sum(-1) / self.later_sq.sum(-1))


def residual_profile(model, ids: torch.Tensor, with_rank: bool = True, batch_size: int = 8) -> ResidualProfile:
    """Fig 11 and 21: per depth, token 0's dominance ratio against later tokens', per-channel energy (which
    channels carry token 0's massive activations), norms and, with ``with_rank``, the effective rank
    (Roy & Vetterli) of each sequence's (T x d) hidden-state matrix, with and without token 0 (``measure.survey``)."""
    found = measure.survey(model, ids, batch_size=batch_size)
    return ResidualProfile(**{f.name: found.mean(f.name).float() if with_rank or "rank" not in f.name else None
                              for f in dataclasses.fields(ResidualProfile)})


def massive_dimensions(model, ids: torch.Tensor, layer: int, k: int = 2, batch_size: int = 8) -> list[int]:
    """Token 0's ``k`` largest residual channels at the output of ``layer``, largest first (the GPU check:
    Llama-2-7B, layer 1 -> {1415, 2533})."""
    models.check_layer(model, layer)
    return residual_profile(model, ids, with_rank=False, batch_size=batch_size).top_channels(layer + 1, k)


def distinct_first_tokens(ids: torch.Tensor) -> torch.Tensor:
    """The rows of ``ids`` whose first token has not appeared as a first token in an earlier row."""
    return ids[_distinct_rows(ids)]


def _distinct_rows(ids: torch.Tensor) -> list[int]:
    seen, keep = set(), []
    for i, t in enumerate(ids[:, 0].tolist()):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    return keep


@dataclasses.dataclass
class DirectionLock:
    """RMSNorm as a directional filter: how input-independent each layer's normalised input is."""

    position: int
    first_cos: torch.Tensor      # (L,) mean pairwise cosine across sequences of token 0's normalised input
    position_cos: torch.Tensor   # (L,) the same for the token at ``position``
    first_key_cos: torch.Tensor  # (L,) mean over key heads of the pairwise cosine of token 0's key
    position_key_cos: torch.Tensor  # (L,) the same for the token at ``position``
    n_sequences: int


@torch.no_grad()
def direction_lock(model, ids: torch.Tensor, position: int | None = None, batch_size: int = 8,
                   distinct: bool = False, gain: bool = True) -> DirectionLock:
    """Per layer, the normalised input of attention (the trace's ``attn.in``, ``input_layernorm`` of the layer
    input) of token 0 and of the token at ``position`` (default: the middle), collected over sequences whose first
    tokens differ, and the mean pairwise cosine between them (1: the same direction whatever the input), for the
    normalised state and for its key ``k_proj(attn.in)`` (pre-RoPE: RoPE turns every sequence's key at one position
    by the same rotation, which leaves their cosines as they are). Give sequences *without* BOS: with BOS token 0
    is the same token in the same (empty) context everywhere and the cosine is 1 trivially. With ``distinct`` only
    the rows whose first token is new count (``distinct_first_tokens``), read from the ``survey`` of all of ``ids``
    (which chapter 3's ordinary-first-token probe shares). ``gain=False`` divides each layer's RMSNorm weight out of
    the states first (x / rms(x) alone): a large weight on a channel every token shares makes any two tokens' states
    alike, which is not the lock the paper means (SmolLM2-135M's comparison token, chapter 5)."""
    T = ids.shape[1]
    position = T // 2 if position is None else position
    if not 0 < position < T:
        raise ValueError(f"position must lie in 1..{T - 1}, got {position}")
    keep = _distinct_rows(ids) if distinct else list(range(ids.shape[0]))
    if len(keep) < 2:
        raise ValueError("need at least two sequences to compare directions")
    blocks = models.decoder_layers(model)
    found = measure.survey(model, ids, position=position, batch_size=batch_size)
    out = {}
    for p, name in ((0, "state_first"), (position, "state_position")):
        x = found.rows[name][:, keep]  # (L, N, d) normalised inputs
        if not gain:
            with models.materialized(*(b.input_layernorm for b in blocks)):
                weight = torch.stack([b.input_layernorm.weight.detach().float().cpu() for b in blocks])
            x = x / weight[:, None]
        # k_proj runs where its layer lives (a spread model's hooks move x there); the keys come back beside x
        keys = torch.stack([blocks[l].self_attn.k_proj(x[l].to(blocks[l].self_attn.k_proj.weight.dtype)).to(x.device)
                            for l in range(len(blocks))])  # (L, N, Hkv*D)
        keys = keys.unflatten(-1, (-1, blocks[0].self_attn.head_dim)).transpose(1, 2)  # (L, Hkv, N, D)
        out[p] = (metrics.mean_pairwise_cosine(x).cpu(), metrics.mean_pairwise_cosine(keys).mean(-1).cpu())
    return DirectionLock(position=position, first_cos=out[0][0], position_cos=out[position][0],
                         first_key_cos=out[0][1], position_key_cos=out[position][1], n_sequences=len(keep))


def query_principal_directions(model, layer: int) -> torch.Tensor:
    """(H, D) per head the top left-singular vector of W_Q's head block (D x d): the query-space direction
    that W_Q stretches most, i.e. the principal axis of the queries of isotropic normalised inputs (Fig 12)."""
    attn = models.decoder_layers(model)[models.check_layer(model, layer)].self_attn
    with models.materialized(attn.q_proj):
        w = attn.q_proj.weight.detach().double().cpu().unflatten(0, (-1, attn.head_dim))  # (H, D, d)
    return torch.linalg.svd(w, full_matrices=False).U[..., 0].float()


@torch.no_grad()
def sink_logits(model, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(logits (B, H, T), sink_keys (B, H, D))``: q_t . k_0 with post-RoPE queries and the sink key
    (unscaled: the sign is what Fig 12 counts), from the trace's ``attn.q`` and ``attn.k`` in one forward pass."""
    layers = _sorted_layers(model, layers)
    with trace.record(model, "attn.q", "attn.k", layers=layers) as rec:
        model(input_ids=measure.check_ids(ids).to(model.device))
    return _sink_logits(rec)


def _sink_logits(rec: trace.Recorder) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``sink_logits`` of the layers ``rec`` holds ``attn.q`` and ``attn.k`` for."""
    queries, keys = rec["attn.q"], rec["attn.k"]  # (layers, B, T, H, D), (layers, B, T, Hkv, D)
    out = {}
    for i, l in enumerate(rec.layers):
        q = queries[i].transpose(1, 2)  # (B, H, T, D)
        k0 = attention.expand_kv(keys[i][:, 0].float(), q.shape[1])  # (B, H, D)
        out[l] = ((q.float() * k0[:, :, None]).sum(-1).cpu(), k0.cpu())
    return out


@dataclasses.dataclass
class QKLocking:
    """Fig 12: per layer and head, the sink key's alignment with W_Q and the sign of the logits toward it."""

    layers: list[int]
    alignment: torch.Tensor   # (layers, H) |cos(sink key, top left-singular vector of W_Q's head block)|
    positivity: torch.Tensor  # (layers, H) fraction of queries t >= 1 with q_t . k_0 > 0
    sink: torch.Tensor        # (layers, H) mean attention to token 0 over queries t >= min_query

    def saturated(self, from_layer: int = 0) -> tuple[int, int]:
        """(heads whose every query t >= 1 gives token 0 a positive logit, heads) over layers >= ``from_layer``: a
        rank correlation with positivity can only order the heads below 1."""
        rows = [i for i, l in enumerate(self.layers) if l >= from_layer]
        return int((self.positivity[rows] == 1).sum()), int(self.positivity[rows].numel())

    def correlation(self, from_layer: int = 0) -> float:
        """Kendall's tau between alignment and positivity over the heads of layers >= ``from_layer``."""
        rows = [i for i, l in enumerate(self.layers) if l >= from_layer]
        if not rows:
            raise ValueError(f"no recorded layer >= {from_layer}; recorded {self.layers}")
        return float(metrics.kendall_tau(self.alignment[rows].flatten(), self.positivity[rows].flatten()))


@torch.no_grad()
def qk_locking(model, ids: torch.Tensor, layers: list[int] | None = None, min_query: int = 4,
               batch_size: int = 8) -> QKLocking:
    """Fig 12: for every head of ``layers``, alignment = |cos(k_0, u_1)| between the sink key k_0 (token 0's
    key, pre-RoPE = post-RoPE at position 0) and u_1, the principal query direction of W_Q's head block
    (``query_principal_directions``; the sign of a singular vector is arbitrary, hence |cos|); positivity =
    fraction of queries t >= 1 whose logit q_t . k_0 toward token 0 is positive (post-RoPE); and the head's
    mean attention to token 0 from the trace. Alignment is averaged over sequences."""
    layers = _sorted_layers(model, layers)
    metrics.check_min_query(min_query, measure.check_ids(ids).shape[1])
    found = measure.survey(model, ids, batch_size=batch_size)
    heads = model.config.num_attention_heads
    align = [metrics.cosine(attention.expand_kv(found.rows["sink_key"][l], heads), query_principal_directions(model, l))
             .abs().mean(0) for l in layers]
    return QKLocking(layers=layers, alignment=torch.stack(align),
                     positivity=found.mean("positivity")[layers].float(),
                     sink=found.mean("sink")[layers][..., min_query:].mean(-1).float())
