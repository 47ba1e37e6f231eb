"""The exported browser model computes what ``sinkutils`` computes: ``BrowserModel`` (the plain formulation that
``torch.onnx`` exports) against ``trace.record`` on the loaded model, and the ONNX file run by onnxruntime against
``BrowserModel``, for every embedded model, with and without the mask intervention at k, within 1e-4."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from sinkutils import browser, interventions, models, trace

TOL = 1e-4
TEXT = "The sink forms on the first token, and every head of the middle layers learns to look at it."


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return browser.export_all(tmp_path_factory.mktemp("browser"))


def reference(model, ids, k):
    """Logits, attention maps (layers, heads, T, T) and residual norms (layers + 1, T) as the chapters get them."""
    block = interventions.block_aggregation(model, k) if k is not None else contextlib.nullcontext()
    with torch.no_grad(), block, trace.record(model, "attn.pattern", "resid") as rec:
        logits = model(input_ids=ids).logits
    return logits, rec["attn.pattern"][:, 0], rec["resid"][:, 0].norm(dim=-1)


@pytest.mark.parametrize("name", list(models.EMBEDDED))
def test_browser_model_equals_sinkutils(name):
    model, tok = models.load(name, device="cpu")
    ids = models.encode(tok, model, TEXT)
    T = ids.shape[1]
    plain = browser.BrowserModel(model).eval()
    results = {}
    for k in (None, 7):
        with torch.no_grad():
            got = plain(ids, browser.additive_mask(T, k))
        want = reference(model, ids, k)
        for what, g, w in zip(browser.OUTPUTS, got, want):
            assert g.shape == w.shape, f"{name} k={k} {what}: shape {g.shape} != {w.shape}"
            assert (g - w).abs().max() <= TOL, f"{name} k={k} {what}: off by {(g - w).abs().max():.2e}"
        results[k] = got
    # the mask is in effect: query k attends only to itself, and what comes after it changes
    assert torch.allclose(results[7][1][:, :, 7, 7], torch.ones(1)) or name.endswith("sigmoid")
    assert (results[7][1][:, :, 7, :7] == 0).all()
    assert (results[7][2][2:, 8:] - results[None][2][2:, 8:]).abs().max() > 1e-3


def test_onnx_equals_browser_model(exported):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (requirements.txt) checks the exported files")
    manifest = json.loads((exported / "models.json").read_text())
    assert [m["name"] for m in manifest["models"]] == list(models.EMBEDDED)
    assert (exported / "tokenizer.json").exists()
    gen = torch.Generator().manual_seed(0)
    for entry in manifest["models"]:
        model, _tok = models.load(entry["name"], device="cpu")
        plain = browser.BrowserModel(model).eval()
        session = ort.InferenceSession(str(exported / entry["file"]), providers=["CPUExecutionProvider"])
        for T, k in ((5, None), (37, 3), (browser.MAX_TOKENS, 60)):  # the length is a dynamic axis
            ids = torch.randint(4, entry["vocab"], (1, T), generator=gen)
            ids[0, 0] = entry["bos"]
            mask = browser.additive_mask(T, k)
            with torch.no_grad():
                want = plain(ids, mask)
            got = session.run(list(browser.OUTPUTS), {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            for what, g, w in zip(browser.OUTPUTS, got, want):
                err = float(abs(torch.from_numpy(g) - w).max())
                assert err <= TOL, f"{entry['name']} T={T} k={k} {what}: onnxruntime off by {err:.2e}"


def test_additive_mask_matches_block_row():
    """The page's mask is the intervention's: ``block_row`` of the causal mask, as an additive float mask."""
    T, k = 9, 4
    want = interventions.block_row(None, k, T, T, "cpu")[0, 0]
    assert torch.equal(browser.additive_mask(T, k)[0, 0] == 0, want)
    assert torch.equal(browser.additive_mask(T)[0, 0] == 0, torch.ones(T, T, dtype=torch.bool).tril())
