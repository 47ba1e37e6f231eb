"""Chapter 6: head imbalance equals eager attention's numbers; retraining configs copy the shipped recipe and
refuse bad settings; retraining produces loadable models; the four shipped models share one recipe and show
the measured direction of each effect (departures from the paper are strict expected failures)."""
import dataclasses
import json
import time

import pytest
import torch

from sinkutils import claims, comparison, data, models
from tests.departures import departs, holds
from tests.test_trace import eager_reference, tiny
from tests.test_train import data_dir  # noqa: F401  (fixture: a tiny prepared corpus)


def test_head_imbalance_matches_eager_attention():
    model = tiny("llama")
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(4))
    got = comparison.head_imbalance(model, ids, min_query=4, batch_size=2)
    ref = eager_reference(model, ids)
    maps = torch.stack(ref.attentions)[..., 4:, :]  # (L, B, H, T-4, S)
    entropy = -(maps * maps.clamp_min(1e-45).log()).sum(-1).mean(-1).mean(1)
    torch.testing.assert_close(got.entropy, entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.sink, maps[..., 0].mean(-1).mean(1), atol=1e-5, rtol=1e-4)
    outputs = []  # what enters W_O, captured by hand
    hooks = [b.self_attn.o_proj.register_forward_pre_hook(lambda m, a: outputs.append(a[0])) for b in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    o = torch.stack(outputs).unflatten(-1, (4, 16))[:, :, 4:]  # (L, B, T-4, H, D)
    variance = o.var(-1, unbiased=False).mean(2).mean(1)
    torch.testing.assert_close(got.variance, variance, atol=1e-6, rtol=1e-4)
    stats = pytest.importorskip("scipy.stats")  # per layer, over its heads, from the hand-captured numbers
    entropy, variance = entropy.detach(), variance.detach()
    tau = torch.tensor([stats.kendalltau(e, v)[0] for e, v in zip(entropy, variance)], dtype=torch.float32)
    torch.testing.assert_close(got.tau(), tau, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.spread(), variance.max(-1).values / variance.min(-1).values, atol=0, rtol=1e-4)


def test_head_imbalance_refuses_sequences_without_queries():
    with pytest.raises(ValueError, match="min_query=4"):
        comparison.head_imbalance(tiny("llama"), torch.zeros(1, 4, dtype=torch.long))


def test_steps_to_reach_is_the_first_evaluation_at_or_below():
    log = [{"step": 10, "val_loss": 3.0}, {"step": 20, "val_loss": 2.5}, {"step": 30, "val_loss": 2.6}]
    assert comparison.steps_to_reach(log, 2.5) == 20
    assert comparison.steps_to_reach(log, 2.0) is None


def test_retrain_configs_copy_the_shipped_recipe(tmp_path):
    shipped, stopped = comparison.recipe()
    cfgs = comparison.retrain_configs(tmp_path, "DATA", overrides={"steps": 40})
    assert list(cfgs) == list(comparison.SHIPPED)
    for variant, cfg in cfgs.items():
        fields = dataclasses.asdict(cfg)
        assert fields["variant"] == variant and fields["out_dir"] == str(tmp_path / variant)
        assert {k: fields[k] for k in shipped if k != "steps"} == {k: v for k, v in shipped.items() if k != "steps"}
        assert cfg.steps == 40
    assert comparison.stop_step({"steps": 40}) == 40
    assert comparison.stop_step({}) == stopped
    assert comparison.stop_step({"stop_after": 7}) == 7


@pytest.mark.parametrize("overrides, variants, message", [
    ({"lr": -1.0}, None, "lr must be positive"),
    ({"n_head": 7}, None, "n_head=7 must divide d_model=128"),
    ({"learning_rate": 1e-3}, None, "unknown training settings \\['learning_rate'\\]"),
    ({}, ["softmax1"], "unknown variants \\['softmax1'\\]; choose from"),
])
def test_retrain_configs_refuse_bad_settings(tmp_path, overrides, variants, message):
    with pytest.raises(ValueError, match=message):
        comparison.retrain_configs(tmp_path, "DATA", variants=variants, overrides=overrides)
    assert not list(tmp_path.iterdir())  # nothing started


def test_seconds_per_step_times_the_probe_steps_after_one_warm_up(tmp_path, monkeypatch):
    """Each step sleeps 0.1 s: counting the warm-up would give 0.133, not dividing by the steps 0.3."""
    from sinkutils import train

    steps = []
    monkeypatch.setattr(train, "train_step", lambda *args: (steps.append(args[-1]), time.sleep(0.1)))
    small = dict(n_layer=1, d_model=32, n_head=4, n_kv_head=4, d_ff=64, seq_len=32, batch_size=4, threads=1,
                 device="cpu")
    cfg = comparison.retrain_configs(tmp_path, "DATA", variants=["baseline"], overrides=small)["baseline"]
    assert 0.1 <= comparison.seconds_per_step(cfg, 160, probe_steps=3) < 0.12
    assert steps == [0, 1, 2, 3]


def profile_ids(folder, n: int = 2, length: int = 16) -> torch.Tensor:
    """The sequences ``variant_profile`` measures in the retraining test, cut with the folder's tokenizer."""
    _, tokenizer = models.load(str(folder))
    return data.token_batch(tokenizer, TEXTS, n=n, length=length)


TEXTS = ["the first small cat sees the last dog and the quiet model attends the sparse head."] * 4


def test_retrain_trains_and_exports_loadable_variants(data_dir, tmp_path):  # noqa: F811
    small = dict(n_layer=1, d_model=32, n_head=4, n_kv_head=4, d_ff=64, seq_len=32, batch_size=4, steps=6,
                 warmup=2, eval_every=3, eval_batches=1, ckpt_every=100, threads=1, device="cpu")
    cfgs = comparison.retrain_configs(tmp_path, data_dir, variants=["baseline", "headwise_rmsnorm"], overrides=small)
    out = comparison.retrain(tmp_path, cfgs, stop_after=6)
    for variant, folder in out.items():
        profile = comparison.variant_profile(str(folder), TEXTS, n=2, length=16)
        assert profile.variant == variant
        assert [r["step"] for r in profile.log] == [3, 6]
        assert profile.attention_to_first.shape == (1,) and profile.first_dominance.shape == (2,)
        assert profile.output_variance.shape == (1, 16)
        # softmax weights sum to 1, so the share is the attention itself
        torch.testing.assert_close(comparison.first_share(models.load(str(folder))[0], profile_ids(folder)),
                                   profile.attention_to_first, atol=1e-5, rtol=1e-4)


def test_first_share_normalises_sigmoid_weights():
    from sinkutils import variants

    model = variants.build(tiny("llama").config, "sigmoid")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    ref = torch.stack(model(input_ids=ids, output_attentions=True).attentions)[..., 4:, :]  # raw sigmoid weights
    expected = (ref[..., 0] / ref.sum(-1)).mean(dim=(2, 3)).mean(1)
    torch.testing.assert_close(comparison.first_share(model, ids, min_query=4), expected, atol=1e-5, rtol=1e-4)


# --- the four shipped comparison models -------------------------------------------------------------------

shipped = pytest.mark.skipif(not all((models.CHECKPOINTS / models.EMBEDDED[n] / "config.json").exists()
                                     for n in comparison.SHIPPED.values()),
                             reason="the chapter-6 comparison models are not all shipped")


@pytest.fixture(scope="module")
def profiles():
    return {v: comparison.variant_profile(name, data.python_docs(), n=32, length=128)
            for v, name in comparison.SHIPPED.items()}


@shipped
def test_the_four_models_share_one_recipe():
    saved = {v: json.loads((models.CHECKPOINTS / models.EMBEDDED[n] / "training.json").read_text())
             for v, n in comparison.SHIPPED.items()}
    free = ("data_dir", "out_dir", "threads", "device", "variant")
    recipes = {v: {k: x for k, x in s["config"].items() if k not in free} for v, s in saved.items()}
    assert all(r == recipes["baseline"] for r in recipes.values())
    assert len({s["metrics"]["step"] for s in saved.values()}) == 1
    assert {v: s["config"]["variant"] for v, s in saved.items()} == {v: v for v in saved}
    assert all([r["step"] for r in s["log"]] == [r["step"] for r in saved["baseline"]["log"]] for s in saved.values())


def test_head_imbalance_on_the_default_model():
    model, tok = models.load("sinkbook-tiny", device="cpu")
    ids = data.token_batch(tok, data.python_docs(), n=32, length=128, seed=0)
    holds(claims.head_imbalance(model, ids))


@shipped
def test_baseline_sinks(profiles):
    holds(claims.baseline_sinks(profiles))


@shipped
@pytest.mark.parametrize("variant", ["headwise_rmsnorm", "sigmoid", "gated"])
def test_variant_suppresses_the_sink(profiles, variant):
    """Fig 2 (for sigmoid attention token 0's share of the weights, its raw weight would flatter it)."""
    holds(claims.suppresses_sink(profiles, variant))


@shipped
def test_headwise_keeps_a_sink_in_layer_0_only(profiles):
    """What sinkbook-tiny-headwise shows beyond the claim: its largest share of token 0 is layer 0's, none after."""
    share = profiles["headwise_rmsnorm"].first_share
    assert int(share.argmax()) == 0 and (share[1:] < 0.1).all(), share


@shipped
def test_headwise_keeps_token0_dominance_low(profiles):
    holds(claims.headwise_keeps_dominance_low(profiles))


@shipped
def test_gated_attention_removes_the_variance_discrepancy_in_layer_1(profiles):
    holds(claims.gate_removes_variance_discrepancy(profiles, layer=1))


@shipped
def test_headwise_has_no_shallow_rank_collapse_beyond_the_baseline(request, profiles):
    """The baseline itself shows no collapse (chapter 5)."""
    departs(request, claims.headwise_no_rank_collapse(profiles))


@shipped
def test_headwise_converges_faster(request, profiles):
    departs(request, claims.headwise_converges_faster(profiles))
