"""Chapters 4-5 analyses find what is planted in tiny random Llamas, recompute exactly what the model computes,
and (when the embedded model is installed) show the paper's direction on it; a GPU check tests the published
Llama-2-7B / Llama-3-8B values."""
from pathlib import Path

import pytest
import torch

from sinkutils import claims, compat, metrics, structure, trace
from tests.departures import departs, holds

EMBEDDED = Path(__file__).resolve().parent.parent / "sinkutils" / "checkpoints" / "sinkbook-tiny" / "config.json"
D_MODEL, HEAD_DIM = 64, 16


def tiny(n_layers: int = 3, kv_heads: int = 4, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=D_MODEL, intermediate_size=96, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).eval()


def unit(n: int, seed: int) -> torch.Tensor:
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def random_ids(n: int = 6, length: int = 24, first: int | None = 1, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(4, 97, (n, length), generator=torch.Generator().manual_seed(seed))
    if first is not None:
        ids[:, 0] = first
    return ids


@torch.no_grad()
def plant_super_neuron(model, layer: int = 1, neuron: int = 7, channel: int = 11, bos: int = 1):
    """Token 0 (BOS) carries a large direction v; neuron ``neuron`` of ``layer`` has W_gate and W_up rows along
    v (large norms) and a W_down column pointing at residual ``channel``. The other embeddings are scaled to
    norm about 6, so later tokens' states are not negligible next to what the neuron writes."""
    v = unit(D_MODEL, 1)
    model.model.embed_tokens.weight.mul_(40)
    model.model.embed_tokens.weight[bos] = 50 * v
    mlp = model.model.layers[layer].mlp
    mlp.gate_proj.weight[neuron] = v
    mlp.up_proj.weight[neuron] = v
    mlp.down_proj.weight[:, neuron] = 0.01 * unit(D_MODEL, 2)
    mlp.down_proj.weight[channel, neuron] = 3.0
    return v


# ------------------------------------------------------------------------------------ chapter 4, planted


def test_planted_super_neuron_is_found_and_fires_on_token_0_alone():
    model = tiny()
    plant_super_neuron(model)
    norms = structure.ffn_norms(model, layer=1)
    assert norms.super_neurons == [7]
    assert structure.ffn_norms(model, layer=2).super_neurons == []  # untouched layer: Gaussian norms, no outlier
    act = structure.neuron_activity(model, random_ids(), {1: [7, 0]})[1]
    s = act.summary(0)
    assert s["cos_first"] > 0.9 and abs(s["cos_later"]) < 0.3
    assert s["up_first"] > 5 * s["up_later_abs"]
    assert act.selectivity()[0] > 100 and act.top_neuron == 7
    assert act.cos_gate.shape == (6, 24, 2)


def test_planted_down_column_makes_a_massive_dimension_and_the_disparity_layer():
    model = tiny()
    plant_super_neuron(model, layer=1, neuron=7, channel=11)
    col = structure.down_column(model, layer=1, neuron=7, k=1)
    assert col.top_channels == [11] and col.top_share > 0.99 and col.kurtosis > 50
    ids = random_ids()
    assert structure.massive_dimensions(model, ids, layer=1, k=1) == [11]
    profile = structure.residual_profile(model, ids)
    assert profile.disparity_layer == 1
    assert profile.first_dominance[2] > 5 * profile.later_dominance[2]
    first_share, later_share = profile.share([11])
    assert first_share[2] > 0.5 and later_share[2] < 0.3


def test_neuron_activity_recomputes_what_the_mlp_reads():
    model = tiny()
    captured = {}
    block = model.model.layers[2]
    hook = block.mlp.register_forward_pre_hook(lambda _m, inp: captured.setdefault("x", inp[0].detach()))
    ids = random_ids(n=3, length=10)
    try:
        act = structure.neuron_activity(model, ids, {2: [4, 9]}, batch_size=8)[2]
    finally:
        hook.remove()
    x = captured["x"]
    w_gate, w_up = block.mlp.gate_proj.weight[[4, 9]], block.mlp.up_proj.weight[[4, 9]]
    torch.testing.assert_close(act.cos_gate, metrics.cosine(x[..., None, :], w_gate), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(act.up, x @ w_up.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(act.act, torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_wo_alignment_finds_a_planted_alignment_and_none_at_random():
    model = tiny()
    ids = random_ids()
    with trace.record(model, "attn.head_out", layers=[0]) as rec:
        model(input_ids=ids)
    first = rec["attn.head_out"][0, 0, 0].flatten()  # token 0's o_proj input (BOS: the same in every row)
    profile = (first - first.mean()).abs()
    o_proj = model.model.layers[0].self_attn.o_proj
    signs = torch.randint(0, 2, o_proj.weight.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    o_proj.weight.copy_(signs * profile)  # every row's magnitudes rank the dimensions like token 0's profile
    result = structure.wo_alignment(model, ids, layers=[0, 1])
    assert result[0].tau.shape == (D_MODEL,)
    assert result[0].tau.min() > 0.99
    assert abs(result[1].tau.mean()) < 0.1  # untouched layer
    v = result[0].variance_in  # token 0 only sees itself; later tokens average: the variance discrepancy
    assert result[0].ratio("in") > 2 and v.shape == (24,)


def test_compare_with_reference_reads_planted_values(monkeypatch):
    model = tiny()
    plant_super_neuron(model, layer=1, neuron=7, channel=11)
    monkeypatch.setitem(structure.REFERENCE, "llama-2-7b", {"layer": 1, "massive_dims": (11,), "super_neuron": 7,
                                                            "super_weight": (11, 7)})
    rows = structure.compare_with_reference("meta-llama/Llama-2-7b-hf", model, random_ids())
    assert [published == measured for _, published, measured in rows] == [True, True, True]
    assert structure.compare_with_reference("sinkbook-tiny", model, random_ids()) is None


# ------------------------------------------------------------------------------------ chapter 5, planted


def test_direction_lock_sees_a_shared_massive_coordinate():
    model = tiny()
    with torch.no_grad():
        model.model.embed_tokens.weight[5:21, 3] += 30.0  # the tokens used at position 0 share one huge channel
    ids = torch.randint(30, 97, (16, 12), generator=torch.Generator().manual_seed(4))
    ids[:, 0] = torch.arange(5, 21)
    lock = structure.direction_lock(model, ids, position=6)
    assert lock.first_cos[0] > 0.95 and lock.position_cos[0] < 0.3
    assert lock.first_key_cos[0] > 0.9
    assert lock.first_cos.shape == (3,) and lock.n_sequences == 16


def test_distinct_first_tokens_keeps_the_first_of_each():
    ids = torch.tensor([[5, 1], [6, 2], [5, 3], [7, 4]])
    assert structure.distinct_first_tokens(ids).tolist() == [[5, 1], [6, 2], [7, 4]]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sink_logits_equal_the_attention_functions_q_dot_k0(kv_heads):
    model = tiny(n_layers=2, kv_heads=kv_heads)
    seen = {}

    def capture(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        seen[module.layer_idx] = (query.detach(), key.detach())
        return compat.sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout,
                                     scaling=scaling, **kwargs)

    compat.register_attention("capture_qk", capture)
    compat.set_attention(model, "capture_qk")
    ids = random_ids(n=2, length=12)
    with torch.no_grad():
        model(input_ids=ids)
    compat.set_attention(model, "sdpa")
    logits = structure.sink_logits(model, ids, layers=[0, 1])
    for layer in (0, 1):
        q, k = seen[layer]
        k0 = k[:, :, 0].repeat_interleave(4 // kv_heads, dim=1)
        torch.testing.assert_close(logits[layer][0], (q * k0[:, :, None]).sum(-1), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_planted_qk_locking_head_is_aligned_and_always_positive():
    model = tiny(n_layers=2)
    c = unit(D_MODEL, 5)
    model.model.embed_tokens.weight += 0.1 * c  # a direction every token shares a little of
    u = torch.zeros(HEAD_DIM)
    u[[7, 15]] = 2 ** -0.5  # RoPE's slowest pair: hardly rotates over 16 positions
    attn = model.model.layers[0].self_attn
    attn.q_proj.weight[:HEAD_DIM] += 3 * torch.outer(u, c)  # head 0: W_Q stretches u most, fed by c
    attn.k_proj.weight[:HEAD_DIM] += 3 * torch.outer(u, c)  # and the sink key points along u
    ids = random_ids(n=6, length=16)
    qk = structure.qk_locking(model, ids, layers=[0, 1], min_query=2)
    assert qk.alignment.shape == qk.positivity.shape == qk.sink.shape == (2, 4)
    assert qk.alignment[0, 0] > 0.95 and qk.alignment[0, 0] == qk.alignment[0].max()
    assert qk.positivity[0, 0] == 1.0
    stats = pytest.importorskip("scipy.stats")  # the correlation over the heads of the chosen layers, by scipy
    assert qk.correlation() == pytest.approx(stats.kendalltau(qk.alignment.flatten(), qk.positivity.flatten())[0])
    assert qk.correlation(from_layer=1) == pytest.approx(stats.kendalltau(qk.alignment[1], qk.positivity[1])[0])


def test_reference_values_are_found_by_short_name_and_hub_id():
    assert structure.reference_for("llama-2-7b")["super_weight"] == (2533, 7890)
    assert structure.reference_for("meta-llama/Llama-2-7b-hf")["massive_dims"] == (1415, 2533)
    assert structure.reference_for("sinkbook-tiny") is None


# ------------------------------------------------------------------------------- the embedded default model


@pytest.fixture(scope="module")
def embedded():
    if not EMBEDDED.exists():
        pytest.skip(f"the embedded model is not installed ({EMBEDDED} missing); train it with sinkutils.train")
    from sinkutils import data, models

    model, tokenizer = models.load("sinkbook-tiny", device="cpu")
    ids = data.token_batch(tokenizer, data.python_docs(), n=16, length=128, seed=0)
    return model, ids, structure.residual_profile(model, ids, with_rank=False)


# Chapter 4 (layer: the disparity layer) and chapter 5, one claim per test; criteria in sinkutils.claims.
HOLD_4 = [claims.super_neurons_exist, claims.super_neuron_selective, claims.super_neuron_most_active,
          claims.down_column_heavy_tailed]
DEPART_4 = [claims.wo_aligned, claims.outlier_survives_wo]
HOLD_5 = [claims.dominance_rises_early, claims.token0_dominance_stands_out]
DEPART_5 = [claims.rmsnorm_locks_direction, claims.qk_locking]


@pytest.mark.parametrize("claim", HOLD_4, ids=lambda f: f.__name__)
def test_embedded_chapter_4_claim_holds(embedded, claim):
    model, ids, profile = embedded
    holds(claim(model, ids, layer=profile.disparity_layer))


def test_embedded_massive_dimensions_dominate(embedded):
    model, ids, profile = embedded
    holds(claims.massive_dimensions_dominate(model, ids, profile=profile))


@pytest.mark.parametrize("claim", DEPART_4, ids=lambda f: f.__name__)
def test_embedded_chapter_4_claim_departs(request, embedded, claim):
    """W_O is not aligned with token 0's profile in sinkbook-tiny's layer 0, and token 0 is no variance outlier
    there (its BOS value is shrunk: chapter 2)."""
    model, ids, profile = embedded
    departs(request, claim(model, ids, layer=profile.disparity_layer))


@pytest.mark.parametrize("claim", HOLD_5, ids=lambda f: f.__name__)
def test_embedded_chapter_5_claim_holds(embedded, claim):
    model, ids, profile = embedded
    holds(claim(model, ids, profile=profile))


@pytest.mark.parametrize("claim", DEPART_5, ids=lambda f: f.__name__)
def test_embedded_chapter_5_claim_departs(request, embedded, claim):
    """Without BOS token 0 carries no massive activation, so nothing locks its direction; and across heads the
    sink key's alignment with W_Q does not predict positive logits."""
    model, ids, profile = embedded
    departs(request, claim(model, ids, profile=profile))


def test_embedded_shallow_rank_collapse(request, embedded):
    model, ids, _ = embedded
    departs(request, claims.shallow_rank_collapse(model, ids))


# ------------------------------------------------------------------------------------------- GPU profile


def _load_or_skip(name: str):
    from sinkutils import data, models

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    try:
        model, tokenizer = models.load(name)
    except models.ModelNotAvailable as err:
        pytest.skip(f"{name} weights are not available here: {err}")
    ids = data.token_batch(tokenizer, data.texts("auto")[1], n=8, length=256, seed=0)
    return model, ids


@pytest.mark.gpu
def test_llama2_7b_massive_dimensions_and_super_weight():
    model, ids = _load_or_skip("llama-2-7b")
    ref = structure.REFERENCE["llama-2-7b"]
    assert set(structure.massive_dimensions(model, ids, layer=ref["layer"], k=2)) == set(ref["massive_dims"])
    act = structure.neuron_activity(model, ids, {ref["layer"]: [ref["super_neuron"]]})[ref["layer"]]
    assert act.top_neuron == ref["super_neuron"]
    assert structure.down_column(model, ref["layer"], ref["super_neuron"]).top_channels[0] == ref["super_weight"][0]


@pytest.mark.gpu
def test_llama3_8b_massive_dimensions():
    model, ids = _load_or_skip("llama-3-8b")
    ref = structure.REFERENCE["llama-3-8b"]
    assert set(structure.massive_dimensions(model, ids, layer=ref["layer"], k=2)) <= set(ref["massive_dims"])



def test_departure_diagnostics_on_a_tiny_llama():
    """wo_column_alignment is Kendall's tau of W_O's column norms with token 0's profile; gain=False divides the RMSNorm
    weight out of the states (a weight of 1 changes nothing); saturated counts heads whose positivity is exactly 1."""
    from test_trace import tiny

    model = tiny("llama")
    ids = torch.randint(3, model.config.vocab_size, (6, 12), generator=torch.Generator().manual_seed(0))
    wo = structure.wo_alignment(model, ids, [1], min_query=2, batch_size=3)[1]
    columns = model.model.layers[1].self_attn.o_proj.weight.detach().norm(dim=0)
    assert structure.wo_column_alignment(model, wo) == pytest.approx(float(metrics.kendall_tau(columns, wo.first_profile)))
    with_gain = structure.direction_lock(model, ids, batch_size=3)
    torch.testing.assert_close(structure.direction_lock(model, ids, batch_size=3, gain=False).first_cos, with_gain.first_cos)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(torch.linspace(0.5, 2.0, model.config.hidden_size))
    changed = structure.direction_lock(model, ids, batch_size=3)
    unscaled = structure.direction_lock(model, ids, batch_size=3, gain=False)
    assert not torch.allclose(changed.first_cos[0], unscaled.first_cos[0])
    qk = structure.QKLocking(layers=[0, 1], alignment=torch.zeros(2, 3), positivity=torch.tensor([[1.0, 0.5, 1.0],
                             [1.0, 1.0, 0.9]]), sink=torch.zeros(2, 3))
    assert qk.saturated() == (4, 6) and qk.saturated(from_layer=1) == (2, 3)
