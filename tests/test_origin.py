"""origin: the four probes that tell an identity sink from a structural one, on the shipped sinkbook-tiny
(whose sink, the model card says, is BOS's identity: every training row started with BOS)."""
import pytest
import torch

from sinkutils import claims, data, measure, models, origin
from tests.departures import departs


@pytest.fixture(scope="module")
def tiny_origin():
    model, tok = models.load("sinkbook-tiny", device="cpu")
    ids = data.token_batch(tok, data.python_docs(), n=16, length=96, seed=0)
    return model, ids, origin.sink_origin(model, ids, k=10, progress=False)


def test_bos_moved_puts_bos_at_k_and_keeps_the_text_order():
    ids = torch.tensor([[1, 10, 11, 12, 13, 14]])
    assert origin.bos_moved(ids, 3).tolist() == [[10, 11, 12, 1, 13, 14]]


def test_probes_read_what_measure_reads(tiny_origin):
    """The usual-input probe is ``measure.attention_to`` on the same rows; the ordinary-first one drops BOS."""
    model, ids, found = tiny_origin
    assert torch.allclose(found.per_layer["BOS at 0 (usual input)"], measure.attention_to(model, ids, 0).mean(-1))
    assert torch.allclose(found.per_layer["ordinary token at 0"],
                          measure.attention_to(model, ids[:, 1:], 0).mean(-1))
    usual = found.per_layer["BOS at 0 (usual input)"]
    assert found.sink_layers == [l for l in range(len(usual)) if usual[l] >= 0.5 * usual.max()]


def test_sinkbook_tiny_has_an_identity_sink(tiny_origin):
    """The sink follows BOS to position 10 and vanishes under an ordinary first token; zeroing token 0's
    layer-0 attention output (the start of the paper's chain) leaves it as it was; the mask does not move it."""
    _, _, found = tiny_origin
    assert found.mean("BOS at 0 (usual input)") > 0.5
    assert found.structural_share < 0.1
    assert found.identity_share > 0.8
    assert found.verdict == "identity"
    assert abs(found.mean("token 0, its layer-0 attention output zeroed") - found.mean("BOS at 0 (usual input)")) < 0.01
    assert found.mean("k, aggregation blocked at k") < 0.05


def test_the_sink_is_structural(request, tiny_origin):
    """The paper's chain needs a structural sink; sinkbook-tiny's is BOS's identity."""
    model, ids, found = tiny_origin
    departs(request, claims.sink_is_structural(model, ids, k=found.k, found=found))


def test_verdicts_follow_the_stated_shares():
    def made(usual, ordinary, moved):
        return origin.SinkOrigin(k=10, sink_layers=[0], per_layer={
            "BOS at 0 (usual input)": torch.tensor([usual]), "ordinary token at 0": torch.tensor([ordinary]),
            "BOS moved to k": torch.tensor([moved])})
    assert made(0.05, 0.05, 0.05).verdict == "none"
    assert made(0.8, 0.5, 0.1).verdict == "structural"      # Llama-like: the sink stays without BOS
    assert made(0.8, 0.1, 0.6).verdict == "identity"
    assert made(0.8, 0.2, 0.1).verdict == "mixed"


def test_rows_without_bos_are_refused():
    model, tok = models.load("sinkbook-tiny", device="cpu")
    ids = data.token_batch(tok, data.python_docs(), n=2, length=32, seed=0)
    with pytest.raises(ValueError, match="start with the BOS token"):
        origin.sink_origin(model, ids[:, 1:], k=5)
    with pytest.raises(ValueError, match="choose k in 1..30"):
        origin.sink_origin(model, ids, k=31)
