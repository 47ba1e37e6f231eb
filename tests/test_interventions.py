"""interventions: the mask makes query k see only key k (its output is then v_k), in the layers asked for,
with padding and every mask form; variance amplification and the norm control change exactly the quantity
they name, where trace records it; invalid positions, layers and lambdas are refused with clear messages."""
import pytest
import torch

from sinkutils import attention, compat, interventions, metrics, trace
from tests.test_trace import tiny

K = 5


def ids_for(T=12, B=2, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def record_with_values(model, ids, mask=None, layers=(0, 1, 2)):
    """Patterns, head outputs and value vectors (expanded to query heads) of ``layers``."""
    values, hooks = {}, []
    for l in layers:
        attn = model.model.layers[l].self_attn
        hooks.append(attn.v_proj.register_forward_hook(
            lambda _m, _i, out, l=l, a=attn: values.__setitem__(l, out.unflatten(-1, (-1, a.head_dim)))))
    try:
        with trace.record(model, "attn.pattern", "attn.head_out", layers=list(layers)) as rec:
            logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in hooks:
            h.remove()
    H = model.config.num_attention_heads
    v = torch.stack([values[l].repeat_interleave(H // values[l].shape[2], dim=2) for l in layers])
    return rec["attn.pattern"], rec["attn.head_out"], v, logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_masked_token_attends_only_to_itself_and_outputs_its_value(arch):
    model = tiny(arch)
    ids = ids_for()
    base_p, _, _, base_logits = record_with_values(model, ids)
    with interventions.block_aggregation(model, K):
        p, out, v, logits = record_with_values(model, ids)
    onehot = torch.zeros(12)
    onehot[K] = 1
    assert torch.equal(p[:, :, :, K], onehot.expand_as(p[:, :, :, K]))  # every layer, row, head
    torch.testing.assert_close(out[:, :, K], v[:, :, K], atol=1e-6, rtol=1e-5)  # o_k = v_k, as token 0's
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0], atol=1e-6, rtol=1e-5)
    # earlier tokens cannot see k: untouched; layer 0 sees unchanged inputs, so its other rows are untouched
    torch.testing.assert_close(p[:, :, :, :K], base_p[:, :, :, :K])
    torch.testing.assert_close(p[0, :, :, K + 1:], base_p[0, :, :, K + 1:])
    torch.testing.assert_close(logits[:, :K], base_logits[:, :K])
    assert not torch.allclose(logits[:, K], base_logits[:, K])


def test_mask_only_in_chosen_layers_and_restores_attention():
    model = tiny("llama")
    compat.set_attention(model, "sdpa")
    ids = ids_for()
    base_p, *_ = record_with_values(model, ids)
    with interventions.block_aggregation(model, K, layers=[1]):
        p, *_ = record_with_values(model, ids)
    assert compat.attention_of(model.config) == "sdpa"
    torch.testing.assert_close(p[0], base_p[0])
    assert torch.equal(p[1, :, :, K, K], torch.ones_like(p[1, :, :, K, K]))
    assert p[2, :, :, K, K].max() < 1
    with trace.record(model, "attn.pattern", layers=[1]) as rec:  # the edit is gone after the block
        model(input_ids=ids)
    torch.testing.assert_close(rec["attn.pattern"][0], base_p[1])


def test_mask_composes_with_padding_like_an_explicit_4d_mask():
    model = tiny("llama")
    ids = ids_for(T=14)
    pad = torch.ones_like(ids)
    pad[1, :3] = 0  # left padding
    with interventions.block_aggregation(model, 8):
        p, _, _, logits = record_with_values(model, ids, mask=pad)
    assert torch.equal(p[:, :, :, 8, 8], torch.ones_like(p[:, :, :, 8, 8]))
    assert p[:, 1, :, 3:, :3].abs().max() == 0  # padding still unseen by real queries
    # reference: eager attention with the whole intervention written as one float 4D mask
    allowed = torch.tril(torch.ones(14, 14, dtype=torch.bool))[None].repeat(2, 1, 1) & pad.bool()[:, None, :]
    allowed[:, 8] = False
    allowed[:, 8, 8] = True
    allowed[1, :3] = False
    allowed[1, torch.arange(3), torch.arange(3)] = True  # fully padded rows: any finite row, ignored below
    add = torch.zeros(2, 1, 14, 14).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    compat.set_attention(model, "eager")
    ref = model(input_ids=ids, attention_mask=add).logits
    torch.testing.assert_close(logits[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1, 3:], ref[1, 3:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("form", ["none", "bool", "float"])
def test_block_row_treats_the_three_mask_forms_alike(form):
    T = S = 7
    causal = attention.causal_mask(T, S, "cpu")[None, None]
    mask = {"none": None, "bool": causal,
            "float": torch.zeros(1, 1, T, S).masked_fill(~causal, torch.finfo(torch.float32).min)}[form]
    edited = attention.as_additive(interventions.block_row(mask, 3, T, S, "cpu"), T, S, torch.float32, "cpu")
    visible = edited[0, 0] > -1e30
    expected = causal[0, 0].clone()
    expected[3] = False
    expected[3, 3] = True
    assert torch.equal(visible, expected)


def test_block_row_with_cached_keys_edits_the_right_row():
    causal = attention.causal_mask(2, 6, "cpu")[None, None]  # queries are positions 4 and 5
    edited = interventions.block_row(causal, 4, 2, 6, "cpu")
    assert edited[0, 0, 0].tolist() == [False, False, False, False, True, False]
    assert torch.equal(edited[0, 0, 1], causal[0, 0, 1])
    assert torch.equal(interventions.block_row(causal, 2, 2, 6, "cpu"), causal)  # position 2 is not a query


def head_out_without_and_with(model, intervention, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn.head_out`` (L, B, T, H, D) of the same inputs, plain and under ``intervention(model, *args)``."""
    ids = ids_for()
    with trace.record(model, "attn.head_out") as base:
        model(input_ids=ids)
    with intervention(model, *args, **kwargs):
        with trace.record(model, "attn.head_out") as rec:
            model(input_ids=ids)
    return base["attn.head_out"], rec["attn.head_out"]


@pytest.mark.parametrize("lam", [0.0, 0.5, 3.0])
def test_amplify_variance_scales_only_the_variance_where_trace_sees_it(lam):
    before, after = head_out_without_and_with(tiny("llama"), interventions.amplify_variance, K, lam, layer=1)
    var0, var1 = metrics.dimension_variance(before[1, :, K]), metrics.dimension_variance(after[1, :, K])
    torch.testing.assert_close(var1, lam ** 2 * var0, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(after[1, :, K].mean(-1), before[1, :, K].mean(-1), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(after[:2, :, :K], before[:2, :, :K])  # earlier tokens and layer 0 untouched
    torch.testing.assert_close(after[0], before[0])


@pytest.mark.parametrize("lam", [1.0, 2.0, 5.0])
def test_norm_control_scales_the_norm_and_keeps_the_variance(lam):
    # GQA: the edit is per query head, in W_O's input
    before, after = head_out_without_and_with(tiny("mistral"), interventions.scale_norm, K, lam, layer=0)
    before, after = before[0, :, K], after[0, :, K]
    torch.testing.assert_close(after.norm(dim=-1), lam * before.norm(dim=-1), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(metrics.dimension_variance(after), metrics.dimension_variance(before),
                               atol=1e-6, rtol=1e-4)


def test_lambda_one_changes_nothing():
    model = tiny("llama")
    ids = ids_for()
    ref = model(input_ids=ids).logits
    for intervene in interventions.INTERVENTIONS.values():
        with intervene(model, K, 1.0, 1):
            torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-6, rtol=1e-5)


def test_edits_as_pure_functions():
    x = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(0)) + 0.3
    for lam in (0.0, 2.0):
        y = interventions.amplified(x, lam)
        torch.testing.assert_close(y.var(-1), lam ** 2 * x.var(-1), atol=1e-6, rtol=1e-5)
    y = interventions.norm_scaled(-x, 3.0)
    torch.testing.assert_close(y.norm(dim=-1), 3 * x.norm(dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.var(-1), x.var(-1), rtol=1e-4, atol=1e-6)
    m = (-x).mean(-1)
    assert (torch.sign(y.mean(-1)) == torch.sign(m)).all() and (y.mean(-1).abs() > m.abs()).all()  # pushed out


def test_invalid_choices_say_what_is_valid():
    model = tiny("llama")
    ids = ids_for(T=12)
    with pytest.raises(ValueError, match="token 0 already attends only to itself"):
        interventions.block_aggregation(model, 0).__enter__()
    with pytest.raises(ValueError, match="must be an integer"):
        interventions.amplify_variance(model, 2.5, 2.0, 0).__enter__()
    with pytest.raises(ValueError, match=r"beyond the sequence of 12 tokens; choose k in 1..11"):
        with interventions.block_aggregation(model, 12):
            model(input_ids=ids)
    with pytest.raises(ValueError, match=r"beyond the sequence of 12 tokens"):
        with interventions.amplify_variance(model, 20, 2.0, 0):
            model(input_ids=ids)
    with pytest.raises(ValueError, match=r"layer 3 is out of range: this model has layers 0..2"):
        interventions.block_aggregation(model, 3, layers=[3]).__enter__()
    with pytest.raises(ValueError, match="0..2"):
        interventions.scale_norm(model, 3, 2.0, layer=-1).__enter__()
    with pytest.raises(ValueError, match="lambda=-1.0 is not allowed: it must be >= 0"):
        interventions.amplify_variance(model, 3, -1.0, 0)
    with pytest.raises(ValueError, match="must be >= 1"):
        interventions.scale_norm(model, 3, 0.5, 0)
    with pytest.raises(ValueError, match="the last of 12 tokens: no later query can attend to it; choose k in 1..10"):
        interventions.check_position(11, 12, attended=True)
    with pytest.raises(ValueError, match="layer 2 cannot be edited usefully.*choose 0..1"):
        interventions.check_edit_layer(model, 2)
    # nothing stays attached after a failure
    assert not attention._mask_edits and not attention._taps
    assert all(not b.self_attn.o_proj._forward_pre_hooks for b in model.model.layers)
