"""measure.survey: one recorded pass gives what twenty passes gave, and store keeps it honestly."""
import json
from pathlib import Path

import pytest
import torch

from sinkutils import claims, data, measure, models, store
from real_model import smollm2, smollm2_claims

BEFORE = json.loads((Path(__file__).parent / "data" / "claims_before_survey.json").read_text())["models"]


def _flat(prefix, value, out):
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flat(f"{prefix}[{i}]", v, out)
    else:
        out[prefix] = value
    return out


def _assert_same_figures(found: dict, saved: dict):
    for key, old in saved.items():
        new = found[key]
        assert new.holds == old["holds"], new.line()
        got, want = _flat(key, new.measured, {}), _flat(key, old["measured"], {})
        assert got.keys() == want.keys()
        for name, w in want.items():
            if isinstance(w, float):
                assert got[name] == pytest.approx(w, rel=1e-6, abs=1e-12), name
            else:
                assert got[name] == w, name


def _with_the_old_sweep_layer(model, ids, found: dict, saved: dict) -> dict:
    """The code before the survey swept lambda at layer 0; the survey's claim edits the chain's layer. Compare the
    figure the old code measured, at the layer it measured."""
    layer = saved["variance_draws_attention"]["measured"]["layer"]
    return found | {"variance_draws_attention": claims.variance_draws_attention(model, ids, layer=layer)}


def test_every_claim_figure_equals_the_code_before_the_survey_on_sinkbook_tiny():
    saved = BEFORE["sinkbook-tiny"]
    model, tokenizer = models.load("sinkbook-tiny")
    ids = data.token_batch(tokenizer, data.python_docs(), n=saved["n"], length=saved["length"], seed=0)
    assert int(ids.sum()) == saved["ids_sum"]
    found = {c.key: c for c in claims.of_model(model, ids)}
    _assert_same_figures(_with_the_old_sweep_layer(model, ids, found, saved["claims"]), saved["claims"])


def test_every_claim_figure_equals_the_code_before_the_survey_on_smollm2():
    saved = BEFORE["smollm2-135m"]
    model, _, ids = smollm2()
    assert (ids.shape[0], int(ids.sum())) == (saved["n"], saved["ids_sum"])
    found = _with_the_old_sweep_layer(model, ids, smollm2_claims(), saved["claims"])
    old = saved["claims"]["variance_draws_attention"]
    assert not old["holds"] and found["variance_draws_attention"].holds is False  # layer 0: the old departure
    _assert_same_figures(found, saved["claims"])


def test_the_sweep_claim_edits_the_chains_layer_and_agrees_there_on_smollm2():
    model, _, ids = smollm2()
    claim = smollm2_claims()["variance_draws_attention"]
    assert claim.measured["layer"] == measure.sink_profile(model, ids).variance_layer == 11
    assert claim.holds, claim.line()


def test_the_survey_keeps_no_map_and_is_measured_once(tiny_llama):
    model, ids = tiny_llama
    first = measure.survey(model, ids, batch_size=2)
    assert measure.survey(model, ids, batch_size=2) is first  # the store's in-process level
    L, H, T = len(model.model.layers), model.config.num_attention_heads, ids.shape[1]
    for name in ("sink", "to_k", "entropy", "head_var", "predicted", "sum_p2", "value_var"):
        assert first.sums[name].shape == (L, H, T), name
    assert all(t.numel() <= max(L * H * T, (L + 1) * model.config.hidden_size, L * ids.shape[0] * T,
                                L * model.config.intermediate_size, L * ids.shape[0] * model.config.hidden_size)
               for t in [*first.sums.values(), *first.rows.values()])


def test_an_edited_weight_is_measured_again(tiny_llama):
    model, ids = tiny_llama
    before = measure.survey(model, ids, batch_size=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2.0)
    after = measure.survey(model, ids, batch_size=2)
    assert after is not before and not torch.equal(after.sums["sink"], before.sums["sink"])


def test_nothing_is_reused_inside_an_intervention(tiny_llama):
    from sinkutils import interventions

    model, ids = tiny_llama
    plain = measure.survey(model, ids, k=3, batch_size=2)
    with interventions.block_aggregation(model, 3):
        masked = measure.survey(model, ids, k=3, batch_size=2)
    assert masked is not plain and not torch.equal(masked.sums["to_k"], plain.sums["to_k"])
    assert measure.survey(model, ids, k=3, batch_size=2) is plain  # and the edited pass was not kept


def test_the_disk_store_round_trips_and_a_changed_key_misses(tiny_llama, tmp_path, monkeypatch):
    model, ids = tiny_llama
    monkeypatch.setenv("SINKBOOK_STORE", str(tmp_path))
    measured = measure.mask_effect(model, ids, 3, batch_size=2)
    (entry,) = [p for p in tmp_path.iterdir() if p.name.startswith("mask_effect-")]
    read = store.load(entry)
    for name in ("before", "after", "first"):
        assert torch.equal(getattr(read, name), getattr(measured, name))
    assert (read.k, read.masked_layers) == (measured.k, measured.masked_layers)
    model.__dict__.pop("_sinkbook_memo")  # a new process: only the disk level is left
    again = measure.mask_effect(model, ids, 3, batch_size=2)
    assert torch.equal(again.after, measured.after) and len(list(tmp_path.glob("mask_effect-*"))) == 1
    measure.mask_effect(model, ids[:, :-1], 3, batch_size=2)  # other ids: another entry
    assert len(list(tmp_path.glob("mask_effect-*"))) == 2


def test_the_same_weights_under_another_config_are_measured_again(tmp_path, monkeypatch):
    """A sigmoid model built from a softmax model's parameters has the same weights digest; its configuration keeps
    the stored softmax survey from being read for it."""
    from test_variants import tiny

    monkeypatch.setenv("SINKBOOK_STORE", str(tmp_path))
    softmax, sigmoid = tiny("baseline", kv_heads=2), tiny("sigmoid", kv_heads=2)
    assert store.weights_digest(softmax) == store.weights_digest(sigmoid)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    a, b = (measure.survey(m, ids, batch_size=2, progress=False) for m in (softmax, sigmoid))
    assert len(list(tmp_path.glob("survey-*"))) == 2
    assert not torch.allclose(a.mean("sink"), b.mean("sink"))


@pytest.fixture
def tiny_llama():
    from test_trace import tiny

    model = tiny("llama")
    return model, torch.randint(3, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))


def test_a_loaded_model_is_keyed_by_its_checksums_until_a_weight_is_edited():
    model, _ = models.load("sinkbook-tiny")
    again, _ = models.load("sinkbook-tiny")
    key = store.weights_digest(model)
    assert key == store.weights_digest(again)  # the same files: the same key, without reading 2 MB of weights twice
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    edited = store.weights_digest(model)
    assert edited != key
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] -= 1.0  # the loaded bytes again, yet edited since: hashed
    assert store.weights_digest(model) not in (key, edited)
