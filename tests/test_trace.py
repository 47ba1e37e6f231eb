"""trace records exactly what eager attention computes, on Llama, Qwen2 (biases) and Mistral (GQA, window)."""
import pytest
import torch

from sinkutils import compat, trace


def tiny(arch: str, **extra):
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=256)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=4)),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_key_value_heads=2)),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=8))}
    cfg_cls, model_cls, kw = cls[arch]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**common, **kw, **extra)).eval()
    if arch == "qwen2":  # random biases, so a wrong bias path would show
        for block in model.model.layers:
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


def eager_reference(model, ids, mask=None):
    from sinkutils import compat

    prev = compat.set_attention(model, "eager")
    try:
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    finally:
        compat.set_attention(model, prev)
    return out


ARCHS = ["llama", "qwen2", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
def test_sink_entropy_pattern_match_eager(arch):
    model = tiny(arch)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    ref = eager_reference(model, ids)
    with trace.record(model, "attn.sink", "attn.entropy", "attn.pattern", layers=[0, 1, 2]) as rec:
        model(input_ids=ids)
    maps = torch.stack(ref.attentions)  # (L, B, H, T, S)
    torch.testing.assert_close(rec["attn.pattern"], maps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rec["attn.sink"], maps[..., 0], atol=1e-5, rtol=1e-4)
    ent = -(maps * maps.clamp_min(1e-45).log()).sum(-1)
    torch.testing.assert_close(rec["attn.entropy"], ent, atol=1e-4, rtol=1e-4)
    if arch == "mistral":  # the window really cut attention: late queries give token 0 nothing
        assert rec["attn.sink"][..., 10:].abs().max() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_bit_identical_to_sdpa(arch):
    from sinkutils import compat

    model = tiny(arch)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    compat.set_attention(model, "sdpa")
    plain = model(input_ids=ids, attention_mask=mask).logits
    with trace.record(model, "attn.sink", "attn.entropy", "resid") as rec:
        traced = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, traced)
    assert compat.attention_of(model.config) == "sdpa"  # restored after the block
    assert rec["attn.sink"].shape == (3, 2, 4, 24)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_respected(arch):
    model = tiny(arch)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ref = eager_reference(model, ids, mask)
    with trace.record(model, "attn.sink", "attn.entropy", sink_index=4) as rec:
        model(input_ids=ids, attention_mask=mask)
    maps = torch.stack(ref.attentions)
    # padded row 1 starts at 4: its real first token is the sink there; queries before are fully masked
    torch.testing.assert_close(rec["attn.sink"][:, 1, :, 4:], maps[:, 1, :, 4:, 4], atol=1e-5, rtol=1e-4)
    ent = -(maps * maps.clamp_min(1e-45).log()).sum(-1)
    torch.testing.assert_close(rec["attn.entropy"][:, 1, :, 4:], ent[:, 1, :, 4:], atol=1e-4, rtol=1e-4)


def test_hidden_quantities_match_references():
    model = tiny("llama")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    ref = eager_reference(model, ids)
    with trace.record(model, "resid", "attn.head_out", "mlp.act") as rec:
        model(input_ids=ids)
    resid = rec["resid"]
    assert resid.shape == (4, 2, 12, 64)
    for l in range(3):  # hidden_states[l] is the input of layer l; the last one is normed by HF
        torch.testing.assert_close(resid[l], ref.hidden_states[l], atol=1e-5, rtol=1e-5)
    block = model.model.layers[1]
    x = block.post_attention_layernorm(resid[1] + block.self_attn(
        block.input_layernorm(resid[1]), position_embeddings=model.model.rotary_emb(resid[1], torch.arange(12)[None]),
        attention_mask=None)[0])
    torch.testing.assert_close(rec["mlp.act"][1], torch.nn.functional.silu(block.mlp.gate_proj(x)) * block.mlp.up_proj(x),
                               atol=1e-5, rtol=1e-5)
    head_out = rec["attn.head_out"][1]  # (B, T, H, D); o_proj of it is the attention block's output
    assert head_out.shape == (2, 12, 4, 16)
    attn_out = block.self_attn.o_proj(head_out.flatten(-2))
    torch.testing.assert_close(resid[1] + attn_out + block.mlp(x), resid[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_queries_keys_values_and_block_inputs_match_a_plain_recomputation(arch):
    """attn.in is input_layernorm of the layer input; attn.q / attn.k are q_proj / k_proj of it rotated by a RoPE
    written here (not transformers'), attn.v is v_proj of it; the softmax of q.k reproduces eager attention's maps;
    mlp.in is post_attention_layernorm of the residual after attention."""
    from tests.test_variants import rope

    model = tiny(arch)
    cfg = model.config
    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))
    ref = eager_reference(model, ids)
    with torch.no_grad(), trace.record(model, "attn.in", "attn.q", "attn.k", "attn.v", "attn.head_out", "mlp.in",
                                       "resid") as rec:
        model(input_ids=ids)
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    assert rec["attn.q"].shape == (3, 2, 12, H, D) and rec["attn.k"].shape == rec["attn.v"].shape == (3, 2, 12, Hkv, D)
    with torch.no_grad():
        for l, block in enumerate(model.model.layers):
            a = block.self_attn
            x = block.input_layernorm(ref.hidden_states[l])
            torch.testing.assert_close(rec["attn.in"][l], x, atol=1e-5, rtol=1e-5)
            q = rope(a.q_proj(x).unflatten(-1, (-1, D)).transpose(1, 2), theta)  # (B, heads, T, D)
            k = rope(a.k_proj(x).unflatten(-1, (-1, D)).transpose(1, 2), theta)
            torch.testing.assert_close(rec["attn.q"][l], q.transpose(1, 2), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rec["attn.k"][l], k.transpose(1, 2), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rec["attn.v"][l], a.v_proj(x).unflatten(-1, (-1, D)), atol=1e-6, rtol=1e-6)
            k = k.repeat_interleave(H // Hkv, dim=1)
            scores = (q @ k.transpose(-1, -2)) / D ** 0.5
            allowed = torch.ones(12, 12, dtype=torch.bool).tril()
            if arch == "mistral":
                allowed &= ~torch.ones(12, 12, dtype=torch.bool).tril(-cfg.sliding_window)
            torch.testing.assert_close(scores.masked_fill(~allowed, float("-inf")).softmax(-1), ref.attentions[l],
                                       atol=1e-5, rtol=1e-4)
            after_attention = ref.hidden_states[l] + a.o_proj(rec["attn.head_out"][l].flatten(-2))
            torch.testing.assert_close(rec["mlp.in"][l], block.post_attention_layernorm(after_attention),
                                       atol=1e-5, rtol=1e-5)


def test_a_recorder_holds_only_its_own_models_forward_pass():
    """Two models of one architecture: a forward pass of B inside A's record block leaves A's recorder empty, and
    with both recorders open each holds exactly what its model records alone. Mask edits are bound the same way."""
    a, b = tiny("qwen2"), tiny("qwen2")
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(8))
    names = ("attn.sink", "attn.entropy", "attn.q", "attn.v", "attn.head_out", "resid")
    with torch.no_grad():
        with trace.record(a, *names) as only_a:
            b(input_ids=ids)
        for name in names:
            with pytest.raises(RuntimeError, match="is empty"):
                only_a[name]
        alone = {}
        for m in (a, b):
            with trace.record(m, *names) as rec:
                m(input_ids=ids)
            alone[m] = rec
        with trace.record(a, *names) as rec_a, trace.record(b, *names) as rec_b:
            a(input_ids=ids)
            b(input_ids=ids)
        for name in names:
            assert torch.equal(rec_a[name], alone[a][name]) and torch.equal(rec_b[name], alone[b][name]), name
        assert not torch.equal(rec_a["attn.q"], rec_b["attn.q"])
        compat.set_attention(b, trace.ATTN_NAME)
        plain_b = b(input_ids=ids).logits
        with trace.mask_edit(lambda mask, q_len, kv_len, device: torch.eye(q_len, kv_len, dtype=torch.bool,
                                                                              device=device)[None, None], a):
            assert torch.equal(b(input_ids=ids).logits, plain_b)
            with trace.record(a, "attn.sink") as rec:
                a(input_ids=ids)
    # under the edit every query of A attends only to itself: token 0 gets weight 1 from itself, 0 from the others
    expected = torch.zeros(10)
    expected[0] = 1
    torch.testing.assert_close(rec["attn.sink"], expected.expand_as(rec["attn.sink"]), atol=1e-6, rtol=0)


def _largest_allocation(model, ids, *quantities) -> int:
    """Bytes of the largest single CPU allocation during a forward pass recording ``quantities``."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with trace.record(model, *quantities):
            model(input_ids=ids)
    return max(e.cpu_memory_usage for e in prof.events())


def test_sink_and_entropy_never_allocate_a_t_by_t_map():
    """At T = 1024 one head's T x T float map is 4 MiB; recording sink and entropy allocates no block that large,
    while recording the maps (the positive control: what a T x T computation looks like here) allocates
    heads x T x T at once. Before 4.53, transformers itself builds one float causal mask of T x (T + 1) for any
    registered attention function (once per forward, not per head): that one block is allowed there."""
    from packaging.version import Version

    model = tiny("llama")
    T = 1024
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(5))
    one_map = T * T * 4
    assert _largest_allocation(model, ids, "attn.pattern") >= model.config.num_attention_heads * one_map
    limit = T * (T + 1) * 4 if compat.TRANSFORMERS < Version("4.53") else one_map - 1
    assert _largest_allocation(model, ids, "attn.sink", "attn.entropy") <= limit


def test_bad_requests_name_the_valid_choices():
    model = tiny("llama")
    with pytest.raises(ValueError, match="0..2"):
        with trace.record(model, "attn.sink", layers=[3]):
            pass
    with pytest.raises(ValueError, match="choose from"):
        with trace.record(model, "attn.sinks"):
            pass
    with trace.record(model, "resid") as rec:
        pass
    with pytest.raises(KeyError, match="was not recorded"):
        rec["attn.sink"]


@pytest.mark.parametrize("causal", [True, False])
def test_fused_log_partition_matches_chunked_reference(causal):
    from sinkutils import compat

    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 3, 70, 16, generator=g), torch.randn(2, 3, 70, 16, generator=g)
    mask = None if causal else torch.rand(2, 1, 70, 70, generator=g) > 0.3
    if mask is not None:
        mask[..., 0] = True  # every query sees at least one key
    fused = compat.attention_with_lse(q, k, k, 0.25, attn_mask=mask, is_causal=causal)
    exact = compat.attention_with_lse(q, k, k, 0.25, attn_mask=mask, is_causal=causal, chunk=16, fused=False)
    scores = (q @ k.transpose(-1, -2)) * 0.25
    scores = scores.masked_fill(~(torch.ones(70, 70, dtype=torch.bool).tril() if causal else mask), float("-inf"))
    torch.testing.assert_close(exact[1], scores.logsumexp(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1], exact[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[0], exact[0], atol=1e-5, rtol=1e-5)


def sinkutils_imports(names: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the modules among ``names`` it imports (``from sinkutils import x`` or ``from sinkutils.x import
    ...``, at module level or inside a function), read from the sources with ast."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "sinkutils"
    edges = {}
    for name in names:
        found = set()
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "sinkutils":
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sinkutils."):
                found.add(node.module.split(".")[1])
        edges[name] = found & set(names)
    return edges


def test_instrumentation_modules_import_each_other_without_a_cycle():
    """Every import between attention, variants, models and trace (module level or inside a function) points one
    way: the registered attention function's module imports neither trace nor variants, and nothing imports back."""
    names = ("attention", "variants", "models", "trace", "interventions", "measure", "structure")
    edges = sinkutils_imports(names)
    assert edges["attention"] == set()
    order = {name: i for i, name in enumerate(names)}  # each module imports only modules listed before it
    assert all(order[dep] < order[name] for name, deps in edges.items() for dep in deps), edges


def test_the_build_reads_top_down():
    """The runner (book) calls the preflight and the scoreboard, never the other way, and neither calls the other;
    what all three need (the root, the chapters, a profile's parameters) is in project, which imports none."""
    edges = sinkutils_imports(("project", "preflight", "scoreboard", "book"))
    assert edges == {"project": set(), "preflight": {"project"}, "scoreboard": {"project"},
                     "book": {"project", "preflight", "scoreboard"}}
