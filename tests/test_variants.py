"""variants: each attention variant equals a plain-PyTorch Llama written here (MHA and GQA, left padding),
trains (gradients reach its parameters), survives save_pretrained + models.load, and refuses to run as
anything else; the baseline stays bit-identical to transformers' sdpa."""
import math

import pytest
import torch
import torch.nn.functional as F

from sinkutils import compat, models, trace, variants
from tests.test_models import save_with_tokenizer

VARIANTS = sorted(variants.VARIANTS)


def tiny(variant: str, kv_heads: int = 4):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256)
    torch.manual_seed(0)
    model = variants.build(cfg, variant).eval()
    for block in model.model.layers:  # gains away from 1, so a missing or misplaced norm would show
        if variant == "headwise_rmsnorm":
            torch.nn.init.normal_(block.self_attn.head_norm.weight, mean=1.0, std=0.5)
    return model


def padded_batch(seed: int = 1):
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask


def rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, theta: float):
    """Rotary embedding of (B, H, T, D) at positions 0..T-1 (Llama's rotate-half convention)."""
    T, D = x.shape[-2:]
    angles = torch.arange(T).float()[:, None] / theta ** (torch.arange(0, D, 2).float() / D)[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin


def reference(model, ids, mask):
    """The whole forward in plain PyTorch: (logits, per-layer attention weights)."""
    cfg, variant = model.config, model.config.sink_variant
    H, Hkv, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    D = cfg.hidden_size // H
    theta = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    B, T = ids.shape
    pos = torch.arange(T)
    # causal and real keys; a padded query sees itself so its row stays finite (never compared)
    allowed = (pos[None, :] <= pos[:, None])[None, None] & (mask.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool))
    x = model.model.embed_tokens.weight[ids]
    maps = []
    for block in model.model.layers:
        a = block.self_attn
        h = rms(x, block.input_layernorm.weight, eps)
        q = rope((h @ a.q_proj.weight.T).view(B, T, H, D).transpose(1, 2), theta)
        k = rope((h @ a.k_proj.weight.T).view(B, T, Hkv, D).transpose(1, 2), theta).repeat_interleave(H // Hkv, 1)
        v = (h @ a.v_proj.weight.T).view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        if variant == "sigmoid":
            w = torch.sigmoid(scores - math.log(T)) * allowed
        else:
            w = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        maps.append(w)
        o = (w @ v).transpose(1, 2)  # (B, T, H, D)
        if variant == "headwise_rmsnorm":
            o = rms(o, a.head_norm.weight, eps)
        if variant == "gated":
            o = o * torch.sigmoid(h @ a.attn_gate.weight.T).view(B, T, H, D)
        x = x + o.reshape(B, T, H * D) @ a.o_proj.weight.T
        h = rms(x, block.post_attention_layernorm.weight, eps)
        m = block.mlp
        x = x + (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rms(x, model.model.norm.weight, eps) @ model.lm_head.weight.T, torch.stack(maps)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_plain_pytorch(variant, kv_heads):
    model = tiny(variant, kv_heads)
    ids, mask = padded_batch()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(14)[None]).logits
        want, _ = reference(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_sigmoid_statistics_are_the_sigmoid_weights():
    model = tiny("sigmoid", kv_heads=2)
    ids, mask = padded_batch(2)
    with torch.no_grad(), trace.record(model, "attn.sink", "attn.entropy", "attn.pattern", layers=[0, 1]) as rec:
        model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(14)[None])
    _, maps = reference(model, ids, mask)
    real = slice(4, None)  # padded row 1: compare its real queries, with its first real token as the sink
    torch.testing.assert_close(rec["attn.pattern"][:, 0], maps[:, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rec["attn.sink"][:, 0], maps[:, 0, ..., 0], atol=1e-6, rtol=1e-5)
    p = maps / maps.sum(-1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-45).log()).sum(-1)
    torch.testing.assert_close(rec["attn.entropy"][:, 1, :, real], entropy[:, 1, :, real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(maps[:, 0].sum(-1), torch.ones(1))  # really unnormalised


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_reaches_every_parameter(variant):
    model = tiny(variant, kv_heads=2).train()
    ids, mask = padded_batch(3)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert sum(variants.SUBMODULES.get(variant, "-") in n for n, _ in model.named_parameters()) == (
        2 if variant in variants.SUBMODULES else 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_models_load_round_trip(tmp_path, variant):
    model = tiny(variant, kv_heads=2)
    save_with_tokenizer(model, tmp_path)
    loaded, _ = models.load(tmp_path, device="cpu")
    assert variants.variant_of(loaded) == variant and compat.attention_of(loaded.config) == trace.ATTN_NAME
    ids, mask = padded_batch(4)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    if variant != "baseline":  # a silent fallback to sdpa would have produced different logits
        compat.set_attention(loaded, "sdpa")
        with pytest.raises(RuntimeError, match=trace.ATTN_NAME):
            loaded(input_ids=ids)


def test_sharded_checkpoint_round_trip(tmp_path):
    model = tiny("gated")
    save_with_tokenizer(model, tmp_path)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    (tmp_path / "model.safetensors").unlink()
    loaded, _ = models.load(tmp_path, device="cpu")
    ids, _ = padded_batch(5)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_checkpoint_without_variant_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_with_tokenizer(tiny("headwise_rmsnorm"), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if "head_norm" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="head_norm"):
        models.load(tmp_path, device="cpu")


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_holds_variant_parameters(variant):
    model = tiny(variant, kv_heads=2)
    state = model.state_dict()
    shapes = {"headwise_rmsnorm": ("head_norm.weight", (4, 16)), "gated": ("attn_gate.weight", (64, 64))}
    for l in range(2):
        if variant in shapes:
            name, shape = shapes[variant]
            assert state[f"model.layers.{l}.self_attn.{name}"].shape == shape
    extra = {k for k in state if any(f".{s}." in k for s in variants.SUBMODULES.values())}
    assert len(extra) == (2 if variant in shapes else 0)


def test_unknown_variant_names_the_choices():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="headwise_rmsnorm"):
        variants.build(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=32,
                                   num_attention_heads=2, vocab_size=50), "softmax1")
    model = tiny("baseline")
    model.config.sink_variant = "softmax1"
    with pytest.raises(ValueError, match="gated"):
        variants.attach(model)


def test_baseline_is_bit_identical_to_sdpa():
    model = tiny("baseline", kv_heads=2)
    ids, mask = padded_batch(6)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        compat.set_attention(model, "sdpa")
        plain = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_survey_reads_sink_to_k_and_entropy_from_the_variants_maps(variant):
    """The survey takes attention to tokens 0 and k and each row's entropy from the map it builds anyway; for every
    variant they equal the reference maps (sigmoid: raw weights, entropy of the normalised row)."""
    from sinkutils import measure

    model = tiny(variant, kv_heads=2)
    ids = torch.randint(0, 97, (3, 14), generator=torch.Generator().manual_seed(4))
    found = measure.survey(model, ids, k=5, batch_size=2, progress=False)
    _, maps = reference(model, ids, torch.ones_like(ids))
    p = maps / maps.sum(-1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-45).log()).sum(-1)
    for name, want in (("sink", maps[..., 0]), ("to_k", maps[..., 5]), ("entropy", entropy)):
        torch.testing.assert_close(found.mean(name), want.mean(1), atol=1e-5, rtol=1e-5, msg=name)
