"""book/smollm2.md, SmolLM2-135M's model card, states the chain as ``claims.of_model`` measures it (the claims are
measured once per session by ``tests/real_model.py``): each number of its table, as the page rounds it."""
from pathlib import Path

from real_model import smollm2_claims

CARD = (Path(__file__).resolve().parent.parent / "book" / "smollm2.md").read_text()


def row(link: str) -> str:
    """The table row of the card whose first cell starts with ``link``."""
    found = [line for line in CARD.splitlines() if line.startswith(f"| {link}")]
    assert len(found) == 1, link
    return found[0]


def test_the_cards_table_is_what_the_claims_measure():
    m = {key: claim.measured for key, claim in smollm2_claims().items()}
    verdicts = {key: claim.verdict for key, claim in smollm2_claims().items()}
    sink = m["sink_from_some_layer_on"]
    after = sink["attention_to_first"][sink["sink_layer"]:]
    assert f"{min(after):.2f}-{max(after):.2f} in every layer from {sink['sink_layer']} on" in row("the sink starts")
    assert f"entering layer {m['norm_spike_with_sink']['norm_spike_layer']}, " \
           f"{m['norm_spike_with_sink']['norm_ratio']:.0f}x" in row("token 0's norm spikes")
    v = m["variance_discrepancy"]
    before = v["ratio_per_layer"][v["layer"] - 1]
    assert f"{v['ratio']:.1f}x the later positions' in layer {v['layer']} ({before:.1f}x in layer {v['layer'] - 1})" \
        in row("token 0's attention output")
    assert f"slope {m['variance_decays']['slope']:+.2f} in layer" in row("the variance decays")
    assert f"{m['mask_moves_sink']['before']:.3f} -> {m['mask_moves_sink']['after']:.3f}" in row("blocking aggregation")
    s = m["variance_draws_attention"]
    assert f"edited in layer {s['layer']}, lambda = {s['lambda']:g}: attention to token {s['k']} x{s['gain']:.2f}, " \
           f"x{s['control_gain']:.2f}" in row("the variance, not the norm")
    assert f"{m['sink_is_structural']['structural_share']:.0%}" in row("the sink is structural")
    assert f"mean tau {m['wo_aligned']['mean_tau']:+.3f} in layer {m['wo_aligned']['layer']}" in row("W_O is aligned")
    o = m["outlier_survives_wo"]
    assert f"{o['before']:.1f}x before, {o['after']:.1f}x after" in row("token 0 stays a variance outlier")
    n = m["super_neurons_exist"]
    assert f"{len(n['super_neurons'])} in layer {n['layer']}; neuron {n['super_neurons'][0]}" in row("super neurons")
    assert f"robust z {n['largest_z']:.1f}" in row("super neurons")
    d = m["down_column_heavy_tailed"]
    assert f"channels {d['top_channels'][0]} and {d['top_channels'][1]} hold {d['top_share']:.0%}" in row(
        "its W_down column")
    assert f"{m['massive_dimensions_dominate']['share']:.0%} of token 0's squared norm" in row("those channels")
    t = m["token0_dominance_stands_out"]
    assert f"x{m['dominance_rises_early']['jump']:.1f} through layer" in row("token 0's dominance ratio")
    assert f"{t['token0']:.0f} against {t['later']:.0f}" in row("token 0's dominance ratio")
    r = m["rmsnorm_locks_direction"]
    assert f"{r['token0']:.2f} for token 0 (and its key) in layer {r['layer']}, but {r['other']:.2f} for token " \
           f"{r['position']}" in row("RMSNorm locks")
    q = m["qk_locking"]
    assert f"Kendall tau {q['tau']:+.2f} across {q['heads']} heads" in row("QK locking")
    k = m["shallow_rank_collapse"]
    assert f"{k['rank']:.1f} at depth {k['depth']} against {k['embeddings']:.1f}" in row("the effective rank")
    assert f"Kendall tau {m['head_imbalance']['tau']:+.2f} over {m['head_imbalance']['heads']} heads" in row(
        "low-entropy heads")
    departing = {line.split(" | ")[0][2:] for line in CARD.splitlines() if line.endswith("| departs (below) |")}
    assert len(departing) == sum(v == "DEPARTS" for v in verdicts.values()) == 3
