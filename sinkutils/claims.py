"""The paper's claims, one function each (chapters 1-6): what is measured, the paper's reference where it has one,
and the verdict under one stated criterion.

Every chapter prints a claim's ``line()`` where it used to judge the claim in a cell, the tests assert
``holds`` (``tests/departures.py`` for the claims the default model does not reproduce), and the site's scoreboard
lists them. The thresholds below are the only place a criterion is written; ``first_half`` is the only
definition of "early"/"shallow" layers. Every measurement comes from ``measure``, ``structure``, ``comparison`` or
``origin``: a claim judges numbers, it does not compute them. Functions of chapters 1-5 take a model and its
``ids`` (rows of BOS + text, ``data.token_batch``); a chapter that has already measured passes its measurement
(``profile=``, ``effect=``, ...) and nothing is measured twice. Chapter 6's take the comparison models' profiles
(``comparison.variant_profile``), keyed by variant.
"""
from __future__ import annotations

import dataclasses

import torch

from sinkutils import comparison, measure, metrics, models, origin, structure

# --- the criteria -----------------------------------------------------------------------------------------

#: Mean attention to token 0 at or above this is a sink (chapter 1's ``epsilon``).
SINK = 0.3
#: Queries before this position are left out of attention averages (early queries see few keys).
MIN_QUERY = 4
#: A ratio to an unmodified value must exceed this to count as a rise: a change under 5% counts as none.
RISE = 1.05
#: Chapter 3's control: the norm-only edit must raise attention by less than this share of what amplifying the
#: variance raises it (the variance, not the norm, draws attention).
CONTROL_SHARE = 0.5
#: A variance outlier: more than this many times the mean of later positions.
OUTLIER = 2.0
#: W_O alignment: the mean Kendall tau must lie this many standard errors above 0 (chance).
ALIGNMENT_SE = 3.0
#: A Kendall tau between two per-head quantities counts beyond this many of its chance standard deviations.
CHANCE_SD = 2.0
#: A selective neuron: this many times as active on token 0 as on later tokens.
SELECTIVE = 10.0
#: "Most of" a squared norm: more than this share.
MOST = 0.5
#: The disparity layer raises token 0's dominance ratio at least this-fold ...
DOMINANCE_JUMP = 3.0
#: ... and after it token 0's ratio is at least this many times the later tokens'.
DOMINANCE_GAP = 3.0
#: RMSNorm locks a direction: mean pairwise cosine across inputs above LOCKED for token 0 (state and key), below
#: UNLOCKED for the comparison token.
LOCKED, UNLOCKED = 0.9, 0.5
#: A rank collapse: the shallow minimum of the effective rank below this share of the embeddings'.
COLLAPSE = 0.5
#: A variant suppresses the sink when its largest share of token 0 is below this share of the baseline's peak.
SUPPRESSED = 0.5
#: Head-wise RMSNorm keeps token 0's dominance ratio low: its largest below this share of the baseline's.
DOMINANCE_KEPT = 1 / 3
#: The gate removes the variance discrepancy: its ratio below this share of the baseline's.
REMOVED = 0.5


def first_half(n_layers: int) -> list[int]:
    """The early (shallow) layers: the first half of the model, rounded up (6 layers: 0, 1, 2; Llama-2-7B: 0..15).
    Their outputs are the residual depths ``l + 1`` (``shallow_depths``)."""
    return list(range((n_layers + 1) // 2))


def shallow_depths(n_layers: int) -> list[int]:
    """Residual depths (0 = embeddings, l + 1 = output of layer l) after the early layers: where the paper's
    effective-rank collapse is read (Fig 15, 21)."""
    return [l + 1 for l in first_half(n_layers)]


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of the paper held against one model."""

    key: str              # stable name, e.g. "mask_moves_sink"
    chapter: int
    figure: str           # the paper's figure(s)
    statement: str        # the claim, in one sentence
    criterion: str        # what counts as agreement here, thresholds filled in
    measured: dict        # name -> number (or list of numbers): what the verdict is computed from
    summary: str          # the measurement in words
    holds: bool | None    # None: the claim cannot be tested on this model (e.g. no layer after the disparity)
    reference: str | None = None  # the paper's (or a cited) value, where there is one

    @property
    def verdict(self) -> str:
        """"agrees", "DEPARTS" or "n/a"."""
        return "n/a" if self.holds is None else "agrees" if self.holds else "DEPARTS"

    def line(self) -> str:
        """One line for a chapter: verdict, claim, measurement (and reference)."""
        ref = f" (paper: {self.reference})" if self.reference else ""
        return f"{self.verdict:7} | {self.statement}: {self.summary}{ref}"

    def __str__(self) -> str:
        return self.line()


def table(claims: list[Claim]) -> str:
    """A markdown table of ``claims`` for a chapter: verdict, claim, this model's measurement, the paper's reference,
    the criterion."""

    def cell(text: str | None) -> str:
        return (text or "").replace("|", "\\|")

    rows = [f"| **{c.verdict}** | {cell(c.statement)} | {cell(c.summary)} | {cell(c.reference)} | {cell(c.criterion)} |"
            for c in claims]
    return "\n".join(["| verdict | claim | this model | paper | counts as agreement |", "|---|---|---|---|---|", *rows])


def _values(t: torch.Tensor, digits: int = 2) -> list[float]:
    return [round(float(x), digits) for x in t]


# --- chapter 1: the sink (Fig 3, 18) ----------------------------------------------------------------------

def _sink_profile(model, ids, epsilon, min_query, batch_size, profile):
    return profile if profile is not None else measure.sink_profile(model, ids, epsilon=epsilon, min_query=min_query,
                                                                     batch_size=batch_size)


def sink_from_some_layer_on(model, ids: torch.Tensor, *, epsilon: float = SINK, min_query: int = MIN_QUERY,
                            batch_size: int = 8, profile: measure.SinkProfile | None = None) -> Claim:
    """Fig 3, 18: from some layer after the first on, every layer gives token 0 a mean attention of at least
    ``epsilon`` (the sink starts at ``SinkProfile.sink_layer``, the first layer at least half as sunk as the peak)."""
    p = _sink_profile(model, ids, epsilon, min_query, batch_size, profile)
    a, start = p.attention_to_first, p.sink_layer
    holds = start > 0 and bool((a[start:] >= epsilon).all()) and bool(a[0] < epsilon)
    return Claim("sink_from_some_layer_on", 1, "Fig 3, 18", "from an early layer on, every layer sinks on token 0",
                 f"layer 0 below {epsilon} and every layer from the sink layer on at or above it",
                 {"attention_to_first": _values(a, 3), "sink_layer": start},
                 f"the sink starts at layer {start}; mean attention to token 0 per layer {_values(a)}", holds,
                 "most heads from an early layer on, Llama-2-7B (Fig 3)")


def norm_spike_with_sink(model, ids: torch.Tensor, *, epsilon: float = SINK, min_query: int = MIN_QUERY,
                         batch_size: int = 8, profile: measure.SinkProfile | None = None) -> Claim:
    """Fig 3, 18: token 0's input norm jumps most entering the layer where the sink appears."""
    p = _sink_profile(model, ids, epsilon, min_query, batch_size, profile)
    spike, start = p.norm_spike_layer, p.sink_layer
    ratio = float(p.first_norm[spike] / p.later_norm[spike])
    return Claim("norm_spike_with_sink", 1, "Fig 3, 18", "token 0's norm spikes in the layer where the sink appears",
                 "the layer of the largest jump of token 0's input norm is the sink layer",
                 {"norm_spike_layer": spike, "sink_layer": start, "norm_ratio": ratio},
                 f"the norm jumps entering layer {spike} ({ratio:.1f}x the later tokens'), the sink starts at layer "
                 f"{start}", spike == start, "the same layer, Llama-2-7B (Fig 3) and Llama-3-8B (Fig 18)")


# --- chapter 2: the variance discrepancy (Fig 1, 23) -------------------------------------------------------

def _variance_layer(model, ids, layer, batch_size) -> int:
    if layer is not None:
        return models.check_layer(model, layer)
    return measure.sink_profile(model, ids, batch_size=batch_size).variance_layer


def variance_discrepancy(model, ids: torch.Tensor, *, layer: int | None = None, batch_size: int = 8,
                         variance: torch.Tensor | None = None) -> Claim:
    """Fig 1, 23: token 0's attention output (before W_O) is a variance outlier: its dimension-wise variance is
    more than ``OUTLIER`` times the mean of positions 1..T-1 (``measure.first_over_later``) in ``layer`` (default:
    the layer before token 0's norm spike, ``SinkProfile.variance_layer``). ``variance``: a (layers, heads, T)
    ``measure.position_variance`` already measured on ``ids``."""
    layer = _variance_layer(model, ids, layer, batch_size)
    if variance is None:
        variance = measure.position_variance(model, ids, batch_size=batch_size)
    ratio = measure.first_over_later(variance)
    r = float(ratio[layer])
    return Claim("variance_discrepancy", 2, "Fig 1, 23", "token 0's attention output is a variance outlier",
                 f"in layer {layer} token 0's dimension-wise variance over the mean of later positions is above "
                 f"{OUTLIER:g}", {"layer": layer, "ratio": r, "ratio_per_layer": _values(ratio)},
                 f"{r:.2f}x the later positions' in layer {layer} (per layer {_values(ratio)})", r > OUTLIER)


def variance_decays(model, ids: torch.Tensor, *, layer: int | None = None, batch_size: int = 8,
                    profile: measure.VarianceProfile | None = None) -> Claim:
    """Fig 1: later positions average over more keys, so their attention-output variance falls with position:
    the log-log slope over positions 1..T-1 (``VarianceProfile.decay_slope``) is negative in ``layer``."""
    layer = _variance_layer(model, ids, layer, batch_size)
    if profile is None:
        profile = measure.variance_profile(model, ids, layers=[layer], batch_size=batch_size)
    row = profile.layers.index(layer)
    slope, predicted = float(profile.decay_slope()[row]), float(profile.decay_slope("predicted")[row])
    return Claim("variance_decays", 2, "Fig 1", "the attention-output variance decays with position",
                 f"log-log slope of the variance against position below 0 in layer {layer}",
                 {"layer": layer, "slope": slope, "predicted_slope": predicted},
                 f"slope {slope:+.2f} in layer {layer} (averaging alone predicts {predicted:+.2f}; uniform "
                 f"attention -1)", slope < 0)


# --- chapter 3: moving the sink (Fig 5, 6, 19, 20) ---------------------------------------------------------

def mask_moves_sink(model, ids: torch.Tensor, *, k: int = 10, epsilon: float = SINK, batch_size: int = 8,
                    effect: measure.MaskEffect | None = None) -> Claim:
    """Fig 5, 19: blocking aggregation at ``k`` (token k attends only to itself) raises the attention later queries
    give k, averaged over the layers the mask can change (``MaskEffect.affected``), by more than 5% (``RISE``)."""
    e = effect if effect is not None else measure.mask_effect(model, ids, k, batch_size=batch_size, progress=False)
    before, after, first = e.mean("before"), e.mean("after"), e.mean("first")
    level = (f"a sink (at least {epsilon})" if after >= epsilon else f"below the sink threshold {epsilon}")
    return Claim("mask_moves_sink", 3, "Fig 5, 19", f"blocking aggregation at k = {e.k} draws attention to k",
                 f"attention to k over layers {e.affected[0]}..{len(e.before) - 1} rises above {RISE:g}x",
                 {"k": e.k, "before": before, "after": after, "to_first": first},
                 f"attention to token {e.k} {before:.3f} -> {after:.3f} ({after / before:.2f}x, {level}); token 0 "
                 f"receives {first:.3f}", after > RISE * before, "token k becomes a sink")


def variance_draws_attention(model, ids: torch.Tensor, *, k: int = 10, lambdas: list[float] | None = None,
                             layer: int | None = None, batch_size: int = 8,
                             sweep: measure.LambdaSweep | None = None) -> Claim:
    """Fig 6, 20: amplifying the variance of token k's attention output at ``layer`` by the largest lambda raises
    the attention k receives (``LambdaSweep.gains``) by more than 5%, and the norm-only control raises it by less
    than ``CONTROL_SHARE`` of that rise. ``layer`` defaults to where the chain runs: the layer whose attention output
    feeds token 0's massive activation (``SinkProfile.variance_layer``, as in ``variance_discrepancy``); with a
    ``sweep``, the first layer it edited."""
    if sweep is None:
        lambdas = [1.0, 16.0] if lambdas is None else lambdas
        layer = _variance_layer(model, ids, layer, batch_size)
        sweep = measure.lambda_sweep(model, ids, k, lambdas, [layer], batch_size=batch_size, progress=False)
    elif layer is None:
        layer = sweep.applied[0]
    amp, ctrl = sweep.gains(layer)
    holds = amp > RISE and max(ctrl - 1, 0) < CONTROL_SHARE * (amp - 1)
    return Claim("variance_draws_attention", 3, "Fig 6, 20", "the variance, not the norm, draws attention to k",
                 f"at the largest lambda attention to k rises above {RISE:g}x under amplification, and the norm-only "
                 f"control's rise is below {CONTROL_SHARE:g} of it",
                 {"k": sweep.k, "layer": layer, "lambda": max(sweep.lambdas), "gain": amp, "control_gain": ctrl},
                 f"edit at layer {layer}, lambda = {max(sweep.lambdas):g}: attention to token {sweep.k} x{amp:.2f} "
                 f"amplified, x{ctrl:.2f} under the control", holds,
                 "attention to k grows with lambda, the control stays flat")


def sink_is_structural(model, ids: torch.Tensor, *, k: int = 10, batch_size: int = 8,
                       found: origin.SinkOrigin | None = None) -> Claim:
    """Chapter 3, "Whose sink is it?": the sink belongs to position 0, not to the BOS token
    (``origin.sink_origin``'s verdict is "structural", by ``origin.STRUCTURAL_SHARE``); n/a without a sink."""
    f = found if found is not None else origin.sink_origin(model, ids, k, batch_size=batch_size, progress=False)
    return Claim("sink_is_structural", 3, "the causal chain", "the sink is structural: it stays on token 0 whatever "
                 "token stands there", f"without BOS token 0 keeps at least {origin.STRUCTURAL_SHARE:.0%} of its sink",
                 {"verdict": f.verdict, "structural_share": f.structural_share, "identity_share": f.identity_share},
                 f"{f.verdict} sink: without BOS token 0 keeps {f.structural_share:.0%}, BOS moved to {f.k} takes "
                 f"{f.identity_share:.0%} along", None if f.verdict == "none" else f.verdict == "structural",
                 "pretrained LLMs keep the sink on any first token (Xiao et al. 2023; Gu et al. 2024)")


# --- chapter 4: super neurons (Fig 7-10) -------------------------------------------------------------------

def disparity_layer(model, ids: torch.Tensor, batch_size: int = 8,
                    profile: structure.ResidualProfile | None = None) -> int:
    """The layer chapters 4 and 5 analyse: the one whose output raises token 0's dominance ratio most."""
    if profile is None:
        profile = structure.residual_profile(model, ids, with_rank=False, batch_size=batch_size)
    return profile.disparity_layer


def _layer(model, ids, layer, batch_size) -> int:
    return models.check_layer(model, layer) if layer is not None else disparity_layer(model, ids, batch_size)


def wo_aligned(model, ids: torch.Tensor, *, layer: int | None = None, min_query: int = MIN_QUERY,
               batch_size: int = 8, alignment: structure.WOAlignment | None = None) -> Claim:
    """Fig 7: W_O's output neurons weigh token 0's high-variance dimensions most: the mean over neurons of Kendall's
    tau (``structure.wo_alignment``) lies ``ALIGNMENT_SE`` standard errors of the chance distribution above 0."""
    layer = alignment.layer if alignment is not None else _layer(model, ids, layer, batch_size)
    wo = alignment if alignment is not None else structure.wo_alignment(model, ids, [layer], min_query,
                                                                        batch_size)[layer]
    tau, se = float(wo.tau.mean()), metrics.kendall_null_sd(len(wo.first_profile)) / len(wo.tau) ** 0.5
    return Claim("wo_aligned", 4, "Fig 7", "W_O is aligned with token 0's high-variance dimensions",
                 f"mean tau above {ALIGNMENT_SE:g} standard errors of chance ({ALIGNMENT_SE * se:.4f})",
                 {"layer": layer, "mean_tau": tau, "control_tau": float(wo.tau_later.mean()), "standard_error": se},
                 f"layer {layer}: mean tau {tau:+.3f} (later tokens' profile {wo.tau_later.mean():+.3f})",
                 tau > ALIGNMENT_SE * se, "mean tau about +0.32 in layer 1 of Llama-2-7B")


def outlier_survives_wo(model, ids: torch.Tensor, *, layer: int | None = None, min_query: int = MIN_QUERY,
                        batch_size: int = 8, alignment: structure.WOAlignment | None = None) -> Claim:
    """Fig 7: after W_O token 0's dimension-wise variance is still more than ``OUTLIER`` times the mean of positions
    >= ``min_query`` (``WOAlignment.ratio("out")``)."""
    layer = alignment.layer if alignment is not None else _layer(model, ids, layer, batch_size)
    wo = alignment if alignment is not None else structure.wo_alignment(model, ids, [layer], min_query,
                                                                        batch_size)[layer]
    before, after = wo.ratio("in"), wo.ratio("out")
    return Claim("outlier_survives_wo", 4, "Fig 7", "token 0 stays a variance outlier after W_O",
                 f"token 0's variance after W_O above {OUTLIER:g}x the later tokens'",
                 {"layer": layer, "before": before, "after": after},
                 f"layer {layer}: {before:.1f}x before W_O, {after:.1f}x after", after > OUTLIER)


def super_neurons_exist(model, ids: torch.Tensor | None = None, *, layer: int | None = None,
                        z_threshold: float = 8.0, batch_size: int = 8) -> Claim:
    """Fig 8: the FFN of ``layer`` has super neurons: W_gate / W_up row-norm products with a robust z-score above
    ``z_threshold`` (``structure.ffn_norms``). Weights only; ``ids`` picks the default layer."""
    layer = _layer(model, ids, layer, batch_size)
    norms = structure.ffn_norms(model, layer, z_threshold)
    return Claim("super_neurons_exist", 4, "Fig 8", "a few FFN neurons have outlying W_gate / W_up norms",
                 f"at least one robust z-score above {z_threshold:g}",
                 {"layer": layer, "super_neurons": norms.super_neurons, "largest_z": float(norms.z.max())},
                 f"layer {layer}: {len(norms.super_neurons)} super neuron(s) {norms.super_neurons[:5]}, largest z "
                 f"{norms.z.max():.1f}", bool(norms.super_neurons), "neuron 7890 of layers[1] in Llama-2-7B")


def _followed_neuron(model, layer: int, z_threshold: float) -> int:
    """The neuron chapter 4 follows: the largest W_gate / W_up norm product (a super neuron when there is one)."""
    return structure.ffn_norms(model, layer, z_threshold).candidates(1)[0]


def _activity(model, ids, layer, z_threshold, batch_size, activity):
    if activity is not None:
        return activity
    neuron = _followed_neuron(model, layer, z_threshold)
    return structure.neuron_activity(model, ids, {layer: [neuron]}, batch_size)[layer]


def super_neuron_selective(model, ids: torch.Tensor, *, layer: int | None = None, z_threshold: float = 8.0,
                           batch_size: int = 8, activity: structure.NeuronActivity | None = None) -> Claim:
    """Fig 9: the followed neuron (the largest norm product; ``activity.neurons[0]``) is more than ``SELECTIVE``
    times as active on token 0 as on later tokens (``NeuronActivity.selectivity``)."""
    layer = activity.layer if activity is not None else _layer(model, ids, layer, batch_size)
    act = _activity(model, ids, layer, z_threshold, batch_size, activity)
    s = float(act.selectivity()[0])
    return Claim("super_neuron_selective", 4, "Fig 9", "the super neuron fires on token 0 alone",
                 f"mean |activation| on token 0 above {SELECTIVE:g}x that on later tokens",
                 {"layer": layer, "neuron": act.neurons[0], "selectivity": s},
                 f"neuron {act.neurons[0]} of layer {layer}: {s:.0f}x more active on token 0", s > SELECTIVE)


def super_neuron_most_active(model, ids: torch.Tensor, *, layer: int | None = None, z_threshold: float = 8.0,
                             batch_size: int = 8, activity: structure.NeuronActivity | None = None) -> Claim:
    """Fig 9: the neuron with the largest activation on token 0 (how the super weight was found) is the one the
    norm rule picks."""
    layer = activity.layer if activity is not None else _layer(model, ids, layer, batch_size)
    act = _activity(model, ids, layer, z_threshold, batch_size, activity)
    return Claim("super_neuron_most_active", 4, "Fig 9", "the super neuron is the neuron most active on token 0",
                 "the most active neuron on token 0 is the largest norm product",
                 {"layer": layer, "most_active": act.top_neuron, "followed": act.neurons[0]},
                 f"layer {layer}: most active {act.top_neuron}, largest norm product {act.neurons[0]}",
                 act.top_neuron == act.neurons[0], "neuron 7890 of layers[1] in Llama-2-7B, both ways")


def _down_column(model, layer, z_threshold, k, column):
    return column if column is not None else structure.down_column(model, layer, _followed_neuron(model, layer,
                                                                                                  z_threshold), k)


def down_column_heavy_tailed(model, ids: torch.Tensor | None = None, *, layer: int | None = None,
                             z_threshold: float = 8.0, k: int = 2, batch_size: int = 8,
                             column: structure.DownColumn | None = None) -> Claim:
    """Fig 10: the followed neuron's W_down column puts most (> ``MOST``) of its squared norm in ``k`` channels."""
    layer = column.layer if column is not None else _layer(model, ids, layer, batch_size)
    col = _down_column(model, layer, z_threshold, k, column)
    return Claim("down_column_heavy_tailed", 4, "Fig 10", "the super neuron's W_down column is heavy-tailed",
                 f"its top {len(col.top_channels)} channels hold more than {MOST:.0%} of its squared norm",
                 {"layer": layer, "neuron": col.neuron, "top_channels": col.top_channels, "top_share": col.top_share,
                  "kurtosis": col.kurtosis},
                 f"W_down[:, {col.neuron}] of layer {layer}: channels {col.top_channels} hold {col.top_share:.0%}, "
                 f"excess kurtosis {col.kurtosis:.0f}", col.top_share > MOST,
                 "the super weight W_down[2533, 7890] of layers[1] in Llama-2-7B")


def massive_dimensions_dominate(model, ids: torch.Tensor, *, layer: int | None = None, z_threshold: float = 8.0,
                                k: int = 2, batch_size: int = 8, column: structure.DownColumn | None = None,
                                profile: structure.ResidualProfile | None = None) -> Claim:
    """Fig 10, 11: the channels the W_down column writes hold most (> ``MOST``) of token 0's squared norm right
    after the layer (``ResidualProfile.share``)."""
    if profile is None:
        profile = structure.residual_profile(model, ids, with_rank=False, batch_size=batch_size)
    layer = column.layer if column is not None else layer if layer is not None else profile.disparity_layer
    col = _down_column(model, layer, z_threshold, k, column)
    first, later = profile.share(col.top_channels)
    share = float(first[layer + 1])
    return Claim("massive_dimensions_dominate", 4, "Fig 10, 11", "those channels dominate token 0 afterwards",
                 f"channels {col.top_channels} hold more than {MOST:.0%} of token 0's squared norm after layer {layer}",
                 {"layer": layer, "channels": col.top_channels, "share": share, "later_share": float(later[layer + 1])},
                 f"{share:.0%} of token 0's squared norm after layer {layer} (later tokens {later[layer + 1]:.1%})",
                 share > MOST, "channels 1415 and 2533 after layers[1] in Llama-2-7B")


# --- chapter 5: dimension disparity and QK locking (Fig 11, 12, 21) ----------------------------------------

def _residual(model, ids, batch_size, profile, with_rank=False):
    return profile if profile is not None else structure.residual_profile(model, ids, with_rank=with_rank,
                                                                         batch_size=batch_size)


def dominance_rises_early(model, ids: torch.Tensor, *, batch_size: int = 8,
                          profile: structure.ResidualProfile | None = None) -> Claim:
    """Fig 11: token 0's dominance ratio max|x| / mean|x| jumps at least ``DOMINANCE_JUMP``-fold through one layer,
    the disparity layer, and that layer is early (``first_half``)."""
    p = _residual(model, ids, batch_size, profile)
    l, n = p.disparity_layer, len(p.first_dominance) - 1
    jump = float(p.first_dominance[l + 1] / p.first_dominance[l])
    return Claim("dominance_rises_early", 5, "Fig 11", "token 0's dominance ratio rises sharply in an early layer",
                 f"x{DOMINANCE_JUMP:g} or more through one of layers {first_half(n)[0]}..{first_half(n)[-1]}",
                 {"disparity_layer": l, "jump": jump},
                 f"x{jump:.1f} through layer {l} of {n}", jump >= DOMINANCE_JUMP and l in first_half(n),
                 "layers[1] of Llama-2-7B")


def token0_dominance_stands_out(model, ids: torch.Tensor, *, batch_size: int = 8,
                                profile: structure.ResidualProfile | None = None) -> Claim:
    """Fig 11: after the disparity layer token 0's dominance ratio is at least ``DOMINANCE_GAP`` times the mean of
    the later tokens' (t >= 1)."""
    p = _residual(model, ids, batch_size, profile)
    d = p.disparity_layer + 1
    first, later = float(p.first_dominance[d]), float(p.later_dominance[d])
    return Claim("token0_dominance_stands_out", 5, "Fig 11",
                 "after it token 0's dominance ratio dwarfs the later tokens'",
                 f"at least {DOMINANCE_GAP:g}x the later tokens' after layer {d - 1}",
                 {"layer": d - 1, "token0": first, "later": later},
                 f"{first:.1f} against {later:.1f} after layer {d - 1}", first >= DOMINANCE_GAP * later)


def rmsnorm_locks_direction(model, ids: torch.Tensor, *, position: int | None = None, batch_size: int = 8,
                            profile: structure.ResidualProfile | None = None,
                            lock: structure.DirectionLock | None = None) -> Claim:
    """Chapter 5: RMSNorm maps a vector dominated by a few channels to a fixed direction: in the layer after the
    disparity, token 0's normalised input and its key have a mean pairwise cosine across inputs above ``LOCKED``
    while the comparison token's stays below ``UNLOCKED`` (``structure.direction_lock`` on rows without BOS and with
    distinct first tokens)."""
    p = _residual(model, ids, batch_size, profile)
    after, n = p.disparity_layer + 1, len(p.first_dominance) - 1
    if lock is None:
        lock = structure.direction_lock(model, ids[:, 1:], position=position, batch_size=batch_size, distinct=True)
    statement = "RMSNorm locks token 0's direction (any first token)"
    criterion = (f"in the layer after the disparity: token 0's cosine across inputs above {LOCKED:g} (state and key), "
                 f"the comparison token's below {UNLOCKED:g}")
    if after >= n:
        return Claim("rmsnorm_locks_direction", 5, "Sec 5", statement, criterion, {}, f"no layer after the disparity "
                     f"layer {after - 1}", None)
    state, key, other = float(lock.first_cos[after]), float(lock.first_key_cos[after]), float(lock.position_cos[after])
    return Claim("rmsnorm_locks_direction", 5, "Sec 5", statement, criterion,
                 {"layer": after, "token0": state, "token0_key": key, "other": other, "position": lock.position},
                 f"input of layer {after}: cosine {state:+.2f} (key {key:+.2f}) against {other:+.2f} for token "
                 f"{lock.position}", state > LOCKED and key > LOCKED and other < UNLOCKED)


def qk_locking(model, ids: torch.Tensor, *, min_query: int = MIN_QUERY, batch_size: int = 8,
               profile: structure.ResidualProfile | None = None, qk: structure.QKLocking | None = None) -> Claim:
    """Fig 12: over the heads of the layers after the disparity, the sink key's alignment with W_Q's principal
    direction and the share of positive logits toward token 0 correlate: Kendall's tau above ``CHANCE_SD`` chance
    standard deviations (``QKLocking.correlation``)."""
    p = _residual(model, ids, batch_size, profile)
    after, n = p.disparity_layer + 1, len(p.first_dominance) - 1
    statement = "sink-key alignment with W_Q correlates with positive logits across heads"
    if after >= n:
        return Claim("qk_locking", 5, "Fig 12", statement, "", {}, f"no layer after the disparity layer {after - 1}",
                     None)
    if qk is None:
        qk = structure.qk_locking(model, ids, layers=list(range(after, n)), min_query=min_query, batch_size=batch_size)
    heads = int(qk.alignment[[i for i, l in enumerate(qk.layers) if l >= after]].numel())
    chance, tau = metrics.kendall_null_sd(heads), qk.correlation(from_layer=after)
    return Claim("qk_locking", 5, "Fig 12", statement,
                 f"Kendall tau over the {heads} heads of layers {after}..{n - 1} above {CHANCE_SD:g} x its chance "
                 f"standard deviation {chance:.2f}", {"tau": tau, "chance_sd": chance, "heads": heads},
                 f"Kendall tau {tau:+.2f} over layers {after}..{n - 1} (chance 0 +- {chance:.2f})",
                 tau > CHANCE_SD * chance, "aligned heads have almost only positive logits")


def shallow_rank_collapse(model, ids: torch.Tensor, *, batch_size: int = 8,
                          profile: structure.ResidualProfile | None = None) -> Claim:
    """Fig 21: the effective rank of the hidden states collapses in shallow layers: its minimum over
    ``shallow_depths`` is below ``COLLAPSE`` of the embeddings'."""
    p = profile if profile is not None and profile.effective_rank is not None else _residual(
        model, ids, batch_size, None, with_rank=True)
    rank = p.effective_rank
    depths = shallow_depths(len(rank) - 1)
    low = depths[int(rank[depths].argmin())]
    return Claim("shallow_rank_collapse", 5, "Fig 21", "the effective rank collapses in shallow layers",
                 f"the minimum over depths {depths[0]}..{depths[-1]} below {COLLAPSE:g} of the embeddings'",
                 {"depth": low, "rank": float(rank[low]), "embeddings": float(rank[0])},
                 f"{rank[low]:.1f} at depth {low} against {rank[0]:.1f} for the embeddings", bool(
                     rank[low] < COLLAPSE * rank[0]), "a shallow collapse in Llama-2-7B and Llama-3-8B (Fig 21)")


# --- chapter 6: head-wise RMSNorm and the other variants (Fig 2, 13-16, 23) --------------------------------

def head_imbalance(model, ids: torch.Tensor, *, min_query: int = MIN_QUERY, batch_size: int = 8,
                   imbalance: comparison.HeadImbalance | None = None) -> Claim:
    """Fig 13: over every head, attention entropy and output variance are opposed: Kendall's tau below minus
    ``CHANCE_SD`` chance standard deviations (``comparison.head_imbalance``)."""
    hi = imbalance if imbalance is not None else comparison.head_imbalance(model, ids, min_query, batch_size)
    tau = float(metrics.kendall_tau(hi.entropy.flatten(), hi.variance.flatten()))
    chance = metrics.kendall_null_sd(hi.entropy.numel())
    return Claim("head_imbalance", 6, "Fig 13", "low-entropy heads have high-variance outputs",
                 f"Kendall tau(entropy, output variance) over all heads below -{CHANCE_SD:g} x {chance:.2f}",
                 {"tau": tau, "chance_sd": chance, "heads": hi.entropy.numel(),
                  "negative_layers": int((hi.tau() < 0).sum())},
                 f"Kendall tau {tau:+.2f} over {hi.entropy.numel()} heads (chance 0 +- {chance:.2f}); negative in "
                 f"{int((hi.tau() < 0).sum())} of {len(hi.entropy)} layers", tau < -CHANCE_SD * chance)


def baseline_sinks(profiles: dict[str, comparison.VariantProfile], *, epsilon: float = SINK) -> Claim:
    """Fig 2: the softmax baseline sinks: some layer gives token 0 a mean attention of at least ``epsilon``."""
    a = profiles["baseline"].attention_to_first
    return Claim("baseline_sinks", 6, "Fig 2", "the baseline sinks", f"some layer at or above {epsilon}",
                 {"peak": float(a.max()), "layer": int(a.argmax())},
                 f"largest layer mean {a.max():.3f} (layer {int(a.argmax())})", bool(a.max() >= epsilon))


def suppresses_sink(profiles: dict[str, comparison.VariantProfile], variant: str) -> Claim:
    """Fig 2: ``variant`` (head-wise RMSNorm, sigmoid or gated attention) suppresses the sink: its largest layer mean
    share of token 0 (``VariantProfile.first_share``: for sigmoid the share of the weights, not the raw weight) is
    below ``SUPPRESSED`` of the baseline's largest attention to token 0."""
    peak, other = float(profiles["baseline"].attention_to_first.max()), float(profiles[variant].first_share.max())
    return Claim(f"{variant}_suppresses_sink", 6, "Fig 2", f"{variant} suppresses the sink",
                 f"its largest share of token 0 below {SUPPRESSED:g} x the baseline's {peak:.3f}",
                 {"share": other, "baseline": peak},
                 f"largest layer mean share of token 0 {other:.3f} against the baseline's {peak:.3f}",
                 other < SUPPRESSED * peak)


def headwise_keeps_dominance_low(profiles: dict[str, comparison.VariantProfile]) -> Claim:
    """Fig 14: with head-wise RMSNorm token 0's largest dominance ratio is below ``DOMINANCE_KEPT`` of the
    baseline's: no massive activation."""
    hw = float(profiles["headwise_rmsnorm"].first_dominance.max())
    base = float(profiles["baseline"].first_dominance.max())
    return Claim("headwise_keeps_dominance_low", 6, "Fig 14", "head-wise RMSNorm keeps token 0's dominance ratio low",
                 f"its largest below {DOMINANCE_KEPT:.2g} of the baseline's", {"headwise": hw, "baseline": base},
                 f"largest {hw:.1f} against the baseline's {base:.1f}", hw < DOMINANCE_KEPT * base)


def headwise_no_rank_collapse(profiles: dict[str, comparison.VariantProfile]) -> Claim:
    """Fig 15: head-wise RMSNorm's minimum effective rank over ``shallow_depths`` is at least the baseline's."""
    hw, base = profiles["headwise_rmsnorm"].effective_rank, profiles["baseline"].effective_rank
    depths = shallow_depths(len(base) - 1)
    h, b = float(hw[depths].min()), float(base[depths].min())
    return Claim("headwise_no_rank_collapse", 6, "Fig 15", "head-wise RMSNorm: no shallow rank collapse beyond the "
                 "baseline's", f"its minimum over depths {depths[0]}..{depths[-1]} at least the baseline's",
                 {"headwise": h, "baseline": b}, f"shallow minimum {h:.1f} against the baseline's {b:.1f}", h >= b)


def headwise_converges_faster(profiles: dict[str, comparison.VariantProfile]) -> Claim:
    """Fig 16: head-wise RMSNorm reaches the baseline's final validation loss before the baseline's last evaluation
    (``comparison.steps_to_reach``). Not testable without both training logs."""
    base, hw = profiles["baseline"].log, profiles["headwise_rmsnorm"].log
    statement = "head-wise RMSNorm converges faster"
    criterion = "it reaches the baseline's final validation loss before the baseline's last evaluation"
    if not base or not hw:
        return Claim("headwise_converges_faster", 6, "Fig 16", statement, criterion, {}, "no training log", None)
    target, last = base[-1]["val_loss"], base[-1]["step"]
    reach = comparison.steps_to_reach(hw, target)
    first = next((b, h) for b, h in zip(base, hw))
    return Claim("headwise_converges_faster", 6, "Fig 16", statement, criterion,
                 {"reach": reach, "baseline_final": target, "headwise_final": hw[-1]["val_loss"], "step": last},
                 f"validation loss {hw[-1]['val_loss']:.3f} against the baseline's {target:.3f} at step {last} "
                 + (f"(reaches it at step {reach})" if reach is not None else
                    f"(never reaches it; at step {first[0]['step']}: {first[1]['val_loss']:.2f} against "
                    f"{first[0]['val_loss']:.2f})"), reach is not None and reach < last)


def gate_removes_variance_discrepancy(profiles: dict[str, comparison.VariantProfile], *, layer: int = 1) -> Claim:
    """Fig 23: the baseline's token 0 is a variance outlier in ``layer`` (over ``OUTLIER`` x the later positions'
    attention-output variance) and gated attention brings the ratio below ``REMOVED`` of the baseline's."""
    b = float(profiles["baseline"].variance_first_over_later()[layer])
    g = float(profiles["gated"].variance_first_over_later()[layer])
    return Claim("gate_removes_variance_discrepancy", 6, "Fig 23", "gated attention removes the variance discrepancy",
                 f"in layer {layer} the baseline's ratio above {OUTLIER:g}, the gated model's below {REMOVED:g} of it",
                 {"layer": layer, "baseline": b, "gated": g},
                 f"layer {layer}: token 0 / later positions {g:.2f} against the baseline's {b:.2f}",
                 b > OUTLIER and g < REMOVED * b)


# --- every claim ------------------------------------------------------------------------------------------

def of_model(model, ids: torch.Tensor, *, k: int = 10, batch_size: int = 8) -> list[Claim]:
    """Every claim of chapters 1-6 that one model decides on ``ids`` (rows of BOS + text), in chapter order, each
    measurement taken once with the chapters' defaults: a model's column of the scoreboard. The comparison claims
    of chapter 6 (``of_variants``) need the trained variants instead."""
    sink = measure.sink_profile(model, ids, batch_size=batch_size)
    variance = measure.variance_profile(model, ids, layers=[sink.variance_layer], batch_size=batch_size)
    resid = structure.residual_profile(model, ids, batch_size=batch_size)
    layer = resid.disparity_layer
    wo = structure.wo_alignment(model, ids, [layer], batch_size=batch_size)[layer]
    neuron = _followed_neuron(model, layer, 8.0)
    act = structure.neuron_activity(model, ids, {layer: [neuron]}, batch_size)[layer]
    col = structure.down_column(model, layer, neuron)
    return [sink_from_some_layer_on(model, ids, profile=sink), norm_spike_with_sink(model, ids, profile=sink),
            variance_discrepancy(model, ids, layer=sink.variance_layer, batch_size=batch_size),
            variance_decays(model, ids, layer=sink.variance_layer, profile=variance),
            mask_moves_sink(model, ids, k=k, batch_size=batch_size),
            variance_draws_attention(model, ids, k=k, batch_size=batch_size),
            sink_is_structural(model, ids, k=k, batch_size=batch_size),
            wo_aligned(model, ids, alignment=wo), outlier_survives_wo(model, ids, alignment=wo),
            super_neurons_exist(model, layer=layer), super_neuron_selective(model, ids, activity=act),
            super_neuron_most_active(model, ids, activity=act), down_column_heavy_tailed(model, column=col),
            massive_dimensions_dominate(model, ids, column=col, profile=resid),
            dominance_rises_early(model, ids, profile=resid), token0_dominance_stands_out(model, ids, profile=resid),
            rmsnorm_locks_direction(model, ids, batch_size=batch_size, profile=resid),
            qk_locking(model, ids, batch_size=batch_size, profile=resid),
            shallow_rank_collapse(model, ids, profile=resid),
            head_imbalance(model, ids, batch_size=batch_size)]


def of_variants(profiles: dict[str, comparison.VariantProfile], *, layer: int = 1) -> list[Claim]:
    """Chapter 6's comparison claims for the variants present in ``profiles`` (keyed as ``comparison.SHIPPED``);
    ``layer``: the layer of Fig 23."""
    if "baseline" not in profiles:
        return []
    out = [baseline_sinks(profiles)]
    out += [suppresses_sink(profiles, v) for v in ("headwise_rmsnorm", "sigmoid", "gated") if v in profiles]
    if "headwise_rmsnorm" in profiles:
        out += [headwise_keeps_dominance_low(profiles), headwise_no_rank_collapse(profiles),
                headwise_converges_faster(profiles)]
    if "gated" in profiles:
        out.append(gate_removes_variance_discrepancy(profiles, layer=layer))
    return out
