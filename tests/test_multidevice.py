"""A model spread over several devices measures exactly as the same model loaded whole (issue 26's rehearsal).

``models.load(..., device_map=...)`` hands placement to accelerate's big-model inference: on a GPU node a 70B model's
layers sit on different GPUs, the CPU or disk. Here, without GPUs, the same machinery is rehearsed on the CPU: a
Llama saved with ``save_pretrained`` is loaded with its layers alternating between the CPU and disk offload (each
offloaded layer's weights are meta placeholders, read from ``offload_folder`` only while the layer runs), and every
chapter's public measurement must equal the whole-model load's (rtol 1e-5). The tests call public functions only.
"""
import dataclasses

import pytest
import torch

from sinkutils import claims, comparison, data, interventions, measure, models, origin, standins, structure, trace

pytest.importorskip("accelerate")
RTOL, ATOL = 1e-5, 1e-6
K = 10  # the intervention position


def split_map(n_layers: int) -> dict[str, str]:
    """Embedding, final norm and head on the CPU; the layers alternately on the CPU and offloaded to disk, so
    consecutive layers never share a placement."""
    layers = {f"model.layers.{l}": ("cpu", "disk")[l % 2] for l in range(n_layers)}
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", **layers, "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(whole, spread, ids): sinkbook-tiny's weights (a real sink: every measurement has something to show) saved
    with save_pretrained into a plain folder, loaded once whole on the CPU and once split between CPU and disk."""
    root = tmp_path_factory.mktemp("multidevice")
    model, tokenizer = models.load("sinkbook-tiny", device="cpu")
    model.save_pretrained(root / "standin", safe_serialization=True)
    tokenizer.save_pretrained(root / "standin")
    whole, _ = models.load(root / "standin", device="cpu")
    spread, _ = models.load(root / "standin", device_map=split_map(models.n_layers(whole)),
                            offload_folder=root / "offload")
    ids = data.token_batch(tokenizer, data.python_docs()[:40], n=4, length=32, seed=0)
    return whole, spread, ids


def assert_same(a, b, where: str = "result") -> None:
    """Recursive equality of measurement results: tensors within RTOL (NaN equals NaN), the rest exactly."""
    if torch.is_tensor(a):
        assert a.device.type == "cpu", f"{where} is on {a.device}, not gathered on the CPU"
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL, equal_nan=True, msg=lambda m: f"{where}: {m}")
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=RTOL, abs=ATOL, nan_ok=True), where
    else:
        assert a == b, where


def test_the_stand_in_is_really_split(pair):
    whole, spread, _ = pair
    where = models.placement(spread)
    assert {where[f"model.layers.{l}"] for l in range(2)} == {"cpu", "disk"}
    assert models.spread(spread) and not models.spread(whole) and models.placement(whole) == {}
    offloaded = models.decoder_layers(spread)[1].mlp.down_proj
    assert offloaded.weight.device.type == "meta"  # read from disk only while layer 1 runs
    with models.materialized(offloaded):
        assert torch.equal(offloaded.weight, models.decoder_layers(whole)[1].mlp.down_proj.weight)
    assert offloaded.weight.device.type == "meta"


def _record_everything(model, ids):
    with trace.record(model, *trace.QUANTITIES) as rec:
        model(input_ids=ids)
    return {q: rec[q] for q in trace.QUANTITIES} | {"sink_per_layer": rec.sink_per_layer()}


def _interventions(model, ids):
    out = {}
    with interventions.block_aggregation(model, K, layers=[0, 2, 3]):
        with trace.record(model, "attn.sink", "attn.entropy", sink_index=K) as rec:
            model(input_ids=ids)
    out["mask"] = (rec["attn.sink"], rec["attn.entropy"])
    for mode, layer in (("amplify", 1), ("norm", 2)):  # layer 1 is offloaded, layer 2 is not
        with interventions.INTERVENTIONS[mode](model, K, 4.0, layer):
            with trace.record(model, "resid", "attn.head_out") as rec:
                model(input_ids=ids)
        out[mode] = (rec["resid"], rec["attn.head_out"])
    with interventions.edit_head_output(model, 0, 1, torch.zeros_like):
        out["zeroed"] = model(input_ids=ids).logits
    return out


MEASUREMENTS = {
    "trace.record": _record_everything,
    "interventions": _interventions,
    "measure.sink_profile": lambda m, ids: measure.sink_profile(m, ids, batch_size=2),
    "measure.attention_patterns": lambda m, ids: measure.attention_patterns(m, ids, length=16),
    "measure.variance_profile": lambda m, ids: measure.variance_profile(m, ids, batch_size=2),
    "measure.position_variance": lambda m, ids: measure.position_variance(m, ids, batch_size=2),
    "measure.mask_effect": lambda m, ids: measure.mask_effect(m, ids, K, batch_size=2, progress=False),
    "measure.attention_received": lambda m, ids: measure.attention_received(m, ids, layer=3, batch_size=2),
    "measure.lambda_sweep": lambda m, ids: measure.lambda_sweep(m, ids, K, [0.5, 1.0, 4.0], [0, 1], progress=False),
    "structure.residual_profile": lambda m, ids: structure.residual_profile(m, ids, batch_size=2),
    "structure.wo_alignment": lambda m, ids: structure.wo_alignment(m, ids, [0, 1, 3], batch_size=2),
    "structure.ffn_norms": lambda m, ids: [structure.ffn_norms(m, l) for l in range(models.n_layers(m))],
    "structure.down_column": lambda m, ids: [structure.down_column(m, l, 7) for l in (0, 1)],
    "structure.neuron_activity": lambda m, ids: structure.neuron_activity(m, ids, {0: [3, 7], 1: [5]}, batch_size=2),
    "structure.direction_lock": lambda m, ids: structure.direction_lock(m, ids[:, 1:], batch_size=2),
    "structure.qk_locking": lambda m, ids: structure.qk_locking(m, ids, batch_size=2),
    "structure.sink_logits": lambda m, ids: structure.sink_logits(m, ids, [1, 2]),
    "origin.sink_origin": lambda m, ids: origin.sink_origin(m, ids, K, batch_size=2, progress=False),
    "comparison.head_imbalance": lambda m, ids: comparison.head_imbalance(m, ids, batch_size=2),
    "claims.of_model": lambda m, ids: claims.of_model(m, ids, k=K, batch_size=2),
}


@pytest.mark.parametrize("name", list(MEASUREMENTS))
def test_spread_model_measures_as_the_whole_model(pair, name):
    whole, spread, ids = pair
    with torch.no_grad():
        expected, got = MEASUREMENTS[name](whole, ids), MEASUREMENTS[name](spread, ids)
    assert_same(expected, got, name)
    assert models.decoder_layers(spread)[3].self_attn.q_proj.weight.device.type == "meta"  # still offloaded


def test_grouped_query_stand_in_spread_by_max_memory(tmp_path):
    """A Llama-3-shaped stand-in (one key head per four query heads) placed by ``device_map="auto"`` with a CPU
    budget smaller than the model: accelerate sends the rest to disk; the measurements still match."""
    folder = standins.save_model(tmp_path / "llama-3", "llama-3-8b")
    whole, tokenizer = models.load(folder, device="cpu")
    size = sum(p.numel() * p.element_size() for p in whole.parameters())
    spread, _ = models.load(folder, device_map="auto", max_memory={"cpu": size // 2},
                            offload_folder=tmp_path / "offload")
    assert "disk" in models.placement(spread).values() and models.spread(spread)
    ids = data.random_token_batch(whole.config.vocab_size, n=3, length=24, bos_id=1, seed=1)
    for name in ("trace.record", "measure.sink_profile", "measure.variance_profile", "structure.qk_locking",
                 "structure.direction_lock", "structure.wo_alignment", "measure.mask_effect"):
        if name == "structure.wo_alignment":
            expected, got = (structure.wo_alignment(m, ids, [0, 2]) for m in (whole, spread))
        else:
            with torch.no_grad():
                expected, got = (MEASUREMENTS[name](m, ids) for m in (whole, spread))
        assert_same(expected, got, name)


def test_placement_arguments_that_mean_nothing_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        models.load("sinkbook-tiny", device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="device_map='auto'"):
        models.load("sinkbook-tiny", max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="baseline models only.*'gated'"):
        models.load("sinkbook-tiny-gated", device_map="auto")


def test_recorder_gathers_a_spread_model_on_the_cpu(pair):
    whole, spread, ids = pair
    for model, home in ((whole, None), (spread, torch.device("cpu"))):
        with trace.record(model, "attn.sink") as rec:
            model(input_ids=ids)
        assert rec.home == home


def test_gpu_70b_profile_spreads_every_chapters_model():
    """``PROFILE=gpu-70b``: every chapter loads Llama-2-70B with ``device_map="auto"`` (the chapters pass their
    ``device_map`` and ``max_memory`` to ``models.load``), the preflight asks for its hub repo, and the scoreboard
    loads it the same way."""
    import json

    from sinkutils import book, preflight, scoreboard

    for chapter in book.chapters():
        params = book.parameters("gpu-70b", chapter)
        assert params["device_map"] == "auto" and models.resolve(params["model_name"]) == (
            "meta-llama/Llama-2-70b-hf", False), chapter
        assert {"device_map", "max_memory"} <= book.declared(chapter)
        code = "".join("".join(c["source"]) for c in json.loads((book.ROOT / "chapters" / f"{chapter}.ipynb")
                                                                  .read_text())["cells"])
        assert "model_name, device_map=device_map, max_memory=max_memory" in code, chapter
    assert preflight.needs("gpu-70b", book.chapters()) == (["meta-llama/Llama-2-70b-hf"], True)
    settings = scoreboard.profile_columns("gpu-70b")["llama-2-70b"]
    assert settings.device_map == "auto" and settings.max_memory is None


def test_the_store_knows_a_spread_model_by_its_weights(pair, tmp_path, monkeypatch):
    """The build's store (``SINKBOOK_STORE``) keys a measurement by a digest of the weights: a spread model's
    offloaded weights are read from disk for it, so it is the whole model's digest, and the whole model's stored
    survey serves the spread one."""
    from sinkutils import store

    whole, spread, ids = pair
    assert store.weights_digest(spread) == store.weights_digest(whole)
    monkeypatch.setenv("SINKBOOK_STORE", str(tmp_path))
    few = ids[:2]
    assert_same(measure.survey(whole, few), measure.survey(spread, few), "survey")
    assert len(list(tmp_path.iterdir())) == 1  # measured once, on the whole model
    monkeypatch.delenv("SINKBOOK_STORE")
    assert measure.survey(spread, ids[1:3]) is measure.survey(spread, ids[1:3])  # kept in the process, though every
    # pass swaps the offloaded layers' meta placeholders
