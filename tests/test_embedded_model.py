"""The shipped default model shows the start of the paper's chain on held-out text (issue: embedded defaults).

Criteria: mean attention to token 0 >= 0.3 in every layer from some layer on (queries at positions >= 4),
token 0's input norm spiking at that layer, and a few FFN neurons whose activation on token 0 dwarfs
their activation anywhere else.
"""
import pytest
import torch

from sinkutils import data, measure, models, trace

pytestmark = pytest.mark.skipif(not (models.CHECKPOINTS / "sinkbook-tiny" / "config.json").exists(),
                                reason="embedded model sinkbook-tiny not trained yet")


@pytest.fixture(scope="module")
def tiny_model():
    model, tok = models.load("sinkbook-tiny", device="cpu")
    ids = data.token_batch(tok, data.python_docs(), n=32, length=128, seed=0)
    return model, tok, ids


@pytest.fixture(scope="module")
def profile(tiny_model):
    model, _, ids = tiny_model
    return measure.sink_profile(model, ids)


def test_loads_offline_from_safetensors(tiny_model):
    model, tok, ids = tiny_model
    folder = models.CHECKPOINTS / "sinkbook-tiny"
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert model.config.model_type == "llama"


def test_sink_from_some_layer_on(profile):
    a = profile.attention_to_first
    start = profile.sink_layer
    assert start > 0, f"the first layer already sinks: {a.tolist()}"
    assert (a[start:] >= 0.3).all(), f"attention to token 0 per layer: {a.tolist()}"
    assert a[0] < 0.3


def test_token0_norm_spikes_where_the_sink_appears(profile):
    first, other = profile.first_norm, profile.other_norm
    l = profile.sink_layer
    assert profile.norm_spike_layer <= l, (first.tolist(), profile.attention_to_first.tolist())
    assert (first[l:] > 3 * other[l:]).all(), (first.tolist(), other.tolist())


def test_super_neurons_fire_on_token0(tiny_model):
    model, _, ids = tiny_model
    with trace.record(model, "mlp.act") as rec:
        model(input_ids=ids[:8])
    act = rec["mlp.act"].abs()  # (L, B, T, F)
    on_first = act[:, :, 0].amax(1)            # (L, F) largest on token 0
    elsewhere = act[:, :, 1:].amax(dim=(1, 2))  # (L, F) largest on any later token
    ratio = on_first / elsewhere.clamp_min(1e-6)
    layer, neuron = divmod(int(ratio.argmax()), ratio.shape[1])
    assert on_first[layer, neuron] > 5 * elsewhere[layer, neuron], (layer, neuron, ratio.max().item())
    # "a few": the neurons that do this are a tiny share of the FFN
    assert (ratio[layer] > 5).sum() <= 0.02 * ratio.shape[1] + 1
