"""models.load: embedded defaults, local folders (incl. Qwen2 and Mistral saved with save_pretrained),
clear errors for unknown names, hub ids offline, unsupported architectures and bad inputs."""
import pytest
import torch

from sinkutils import compat, models, trace
from tests.test_trace import tiny


def save_with_tokenizer(model, path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tm, pre_tokenizers

    vocab = {f"w{i}": i for i in range(97)}
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2")
    model.save_pretrained(path)
    fast.save_pretrained(path)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_local_folder_round_trip(tmp_path, arch):
    ref = tiny(arch)
    save_with_tokenizer(ref, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model, tok = models.load(tmp_path, device="cpu")
    assert compat.attention_of(model.config) == trace.ATTN_NAME
    ids = torch.randint(0, 97, (1, 10))
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert model.dtype == torch.float32 and not model.training


def test_unknown_name_lists_choices():
    with pytest.raises(models.ModelNotAvailable, match="sinkbook-tiny"):
        models.load("not-a-model")


def test_hub_id_offline_names_embedded_defaults(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotAvailable, match="embedded defaults"):
        models.load("llama-2-7b", device="cpu")


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97)).save_pretrained(tmp_path)
    with pytest.raises(models.UnsupportedArchitecture, match="llama"):
        models.load(tmp_path, device="cpu")


def test_range_and_input_errors():
    model = tiny("llama")
    with pytest.raises(ValueError, match="0..2"):
        models.check_layer(model, 40)
    with pytest.raises(ValueError, match="0..3"):
        models.check_head(model, 4)
    with pytest.raises(ValueError, match="context of 256"):
        models.check_length(model, 300)


def test_encode_refuses_empty_text(tmp_path):
    ref = tiny("llama")
    save_with_tokenizer(ref, tmp_path)
    model, tok = models.load(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="empty text"):
        models.encode(tok, model, "   ")
    assert models.encode(tok, model, "w5 w6").shape == (1, 2)
