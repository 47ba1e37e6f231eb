"""Stand-ins for the gpu profile's hub models and text, written into a Hugging Face cache exactly as the hub leaves
it (``models--org--name/blobs``, ``snapshots/<commit>/<file>`` links, ``refs/main``), so the gpu profile runs its
own code path (``models.load("llama-2-7b")``, ``data.texts("wikitext2")``) with no hub and no GPU.

    from sinkutils import standins
    standins.build(hf_home)                      # tiny random models + WikiText-2-format text (CPU, seconds)
    standins.build(hf_home, shape="full", models=["llama-2-7b"])  # Llama-2-7B's exact shape (a GPU's check)

Then run with ``HF_HOME=hf_home HF_HUB_OFFLINE=1``. Used by ``tests/test_gpu_rehearsal.py`` and
``benchmarks/gpu_check.py``. The weights are random: no sink, no super neuron; the chapters' claim checks print
DEPARTS. Each stand-in keeps what matters to the instrumentation: the family (``model_type``), grouped-query
attention (Llama-3-8B), the sliding window (Mistral-7B), q/k/v biases and a tokenizer without BOS (Qwen2-7B).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from sinkutils import data, models

#: the stand-ins' tokenizer (512 ids, BOS ``<s>`` = 1, EOS ``</s>`` = 2); it fits any of the vocabularies below
TOKENIZER = models.CHECKPOINTS / models.EMBEDDED[models.DEFAULT]
#: the real configurations (from each hub repo's config.json) in the fields the instrumentation reads
FULL = {
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    "qwen2-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     max_position_embeddings=131072, use_sliding_window=False, sliding_window=131072,
                     max_window_layers=28, rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=None,
                     eos_token_id=2, tie_word_embeddings=False),
}
#: the same models shrunk in size only: 3 layers (chapter 1 draws layer 2), width 64, the real head grouping scaled down, 512 ids
TINY = {
    "llama-2-7b": dict(num_attention_heads=4, num_key_value_heads=4),
    "llama-3-8b": dict(num_attention_heads=4, num_key_value_heads=1),   # grouped-query attention, 4:1 as 32:8
    "mistral-7b": dict(num_attention_heads=4, num_key_value_heads=1),
    "qwen2-7b": dict(num_attention_heads=4, num_key_value_heads=2),
}
TINY_SIZE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3)
#: WikiText-2 as ``data.wikitext2`` reads it: one parquet file of a hub dataset repo, column ``text``
WIKITEXT_REPO, WIKITEXT_FILE = data.WIKITEXT_REPO, data.WIKITEXT_FILE


def config(name: str, shape: str = "tiny") -> dict:
    """The configuration of stand-in ``name`` (a key of ``FULL``) at ``shape`` "tiny" or "full"."""
    if name not in FULL:
        raise ValueError(f"no stand-in for {name!r}; choose from {sorted(FULL)}")
    if shape not in ("tiny", "full"):
        raise ValueError(f"shape must be 'tiny' or 'full', got {shape!r}")
    return FULL[name] | (TINY_SIZE | TINY[name] if shape == "tiny" else {})


def cache_folder(hf_home: str | os.PathLike, repo_id: str, repo_type: str = "model") -> Path:
    """Where the hub cache keeps ``repo_id``: ``<HF_HOME>/hub/models--org--name`` (``datasets--`` for data)."""
    return Path(hf_home) / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_snapshot(hf_home: str | os.PathLike, repo_id: str, files: dict[str, Path], repo_type: str = "model",
                   move: bool = False) -> Path:
    """Lay ``files`` (name in the repo -> local file) out as the hub's cache does and point ``refs/main`` at
    them: each file's content under ``blobs/<sha256>``, a relative link to it in ``snapshots/<commit>/<name>``.
    The commit is a hash of the contents (a fixed fake commit id). ``move`` moves the files instead of copying
    (a 7B model's 13 GB). Returns the snapshot folder."""
    repo = cache_folder(hf_home, repo_id, repo_type)
    digests = {name: _sha256(src) for name, src in files.items()}
    commit = hashlib.sha1(json.dumps(sorted(digests.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        blob = repo / "blobs" / digests[name]
        if not blob.exists():
            (shutil.move if move else shutil.copyfile)(src, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def save_model(folder: str | os.PathLike, name: str, shape: str = "tiny", device: str = "cpu", seed: int = 0) -> Path:
    """A random-initialised stand-in for ``name`` saved with ``save_pretrained`` (safetensors; bf16 at "full",
    float32 at "tiny") and its tokenizer files, as the hub repo holds them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    cfg = dict(config(name, shape))
    kind = cfg.pop("model_type")
    dtype = torch.bfloat16 if shape == "full" else torch.float32
    conf = AutoConfig.for_model(kind, **cfg)
    conf.dtype = dtype
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(conf)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    tokenizer = json.loads((TOKENIZER / "tokenizer.json").read_text())
    tokenizer_config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    tokenizer_config.pop("is_local", None)
    if cfg.get("bos_token_id") is None:  # Qwen2's tokenizer has no BOS and adds none
        tokenizer["post_processor"] = None
        tokenizer_config["bos_token"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    return folder


def add_model(hf_home: str | os.PathLike, name: str, shape: str = "tiny", device: str = "cpu") -> Path:
    """Stand-in ``name`` in the cache under its real repo id (``models.HUB[name]``); returns the snapshot."""
    Path(hf_home).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=hf_home) as tmp:  # same file system: the blobs are moved, not copied
        folder = save_model(Path(tmp) / "model", name, shape, device)
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        return write_snapshot(hf_home, models.HUB[name], files, move=True)


def add_wikitext(hf_home: str | os.PathLike, paragraphs: list[str] | None = None) -> Path:
    """WikiText-2-format text (a parquet file with one ``text`` column of raw lines, headings `` = Title = ``
    and empty lines included, as the real file has) under the real dataset repo and file name. The lines are
    the Python reference's paragraphs by default (the real text is not available offline)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paragraphs = data.python_docs() if paragraphs is None else paragraphs
    lines = []
    for i, p in enumerate(paragraphs):
        lines += ["", f" = Section {i} = ", ""] if i % 8 == 0 else []
        lines.append(" " + " ".join(p.split()) + " ")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        pq.write_table(pa.table({"text": lines}), path)
        return write_snapshot(hf_home, WIKITEXT_REPO, {WIKITEXT_FILE: path}, repo_type="dataset")


def build(hf_home: str | os.PathLike, models_: list[str] | None = None, shape: str = "tiny",
          device: str = "cpu", text: bool = True) -> Path:
    """The cache a gpu-profile run needs, at ``hf_home``: every stand-in in ``models_`` (default: all of ``FULL``)
    and, with ``text``, WikiText-2. Models already there are kept."""
    hf_home = Path(hf_home)
    for name in (sorted(FULL) if models_ is None else models_):
        if not (cache_folder(hf_home, models.HUB[name]) / "refs" / "main").exists():
            add_model(hf_home, name, shape, device)
    if text and not (cache_folder(hf_home, WIKITEXT_REPO, "dataset") / "refs" / "main").exists():
        add_wikitext(hf_home)
    return hf_home
