"""Measure once, judge many: a measurement is kept under a key of everything that determines it, and read back
instead of measured again.

The key holds the weights (a digest of every parameter and buffer), the configuration, the token ids, the
parameters of the measurement and the version of the measuring code (a digest of ``sinkutils``' sources), so a
stale entry is never read: change any of them and the key changes. Two levels:

- in the process, on the model itself: a chapter's later cells, the claims and a test module reuse one pass;
- on disk, when ``SINKBOOK_STORE`` names a folder (``book.execute`` sets it for a build): every chapter's kernel
  and the scoreboard read what an earlier one stored. Entries are safetensors (tensors) beside JSON (the rest),
  never pickles.

Nothing is reused while an intervention is open (``attention.editing``): its passes must run. Weights are followed
by PyTorch's version counters, which every in-place edit bumps (``mul_``, ``copy_``, ``load_state_dict``) except one
made through ``.data``, which bypasses them: after such an edit call ``forget(model)``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from sinkutils import attention, models

PACKAGE = Path(__file__).parent


@functools.cache
def code_version() -> str:
    """A digest of every source file of ``sinkutils``: a changed formula anywhere makes every stored entry stale."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def weights_digest(model) -> str:
    """SHA-256 of every parameter and buffer of ``model`` (names, shapes, dtypes and bytes), computed once per state
    of the weights (``models.weight_versions``); for weights as ``models.load`` left them, of what identifies them
    (their folder's checksums or the hub commit) instead of their bytes."""
    versions = models.weight_versions(model)
    source = model.__dict__.get("_sinkbook_source")
    if source is not None and source[1] == versions:
        return hashlib.sha256(source[0].encode()).hexdigest()
    cached = model.__dict__.get("_sinkbook_digest")
    if cached is not None and cached[0] == versions:
        return cached[1]
    digest = hashlib.sha256()
    for prefix, module in model.named_modules():
        own = lambda: [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]  # noqa: E731
        if not own():
            continue
        with models.materialized(module):  # a spread model's offloaded weights are meta placeholders until read
            for name, t in own():
                digest.update(f"{prefix}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
                digest.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    model.__dict__["_sinkbook_digest"] = (versions, digest.hexdigest())
    return digest.hexdigest()


def config_digest(model) -> str:
    """SHA-256 of the model's configuration (its private fields aside, such as the attention implementation a
    measurement selects for itself): the same weights under another config (a sigmoid variant of a softmax model's
    parameters, another RoPE base) are another model."""
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def forget(model) -> None:
    """Drop what the process keeps for ``model`` (its measurements and its weights' digest): for an edit of its
    weights that PyTorch's version counters cannot see (through ``.data``)."""
    for name in ("_sinkbook_memo", "_sinkbook_digest", "_sinkbook_source"):
        model.__dict__.pop(name, None)


def ids_digest(ids: torch.Tensor) -> str:
    ids = ids.detach().cpu().to(torch.int64).contiguous()
    return hashlib.sha256(str(tuple(ids.shape)).encode() + ids.numpy().tobytes()).hexdigest()


def folder() -> Path | None:
    """The on-disk store (``SINKBOOK_STORE``), or None: only the in-process level."""
    where = os.environ.get("SINKBOOK_STORE")
    return Path(where) if where else None


def cached(kind: str, model, ids: torch.Tensor, params: dict, compute: Callable[[], object]):
    """``compute()``, or what an earlier call with the same weights, ids, ``params`` and code stored under ``kind``.
    ``compute`` must return a dataclass of tensors, dicts of tensors and JSON values (``save``)."""
    if attention.editing():
        return compute()
    memo = model.__dict__.setdefault("_sinkbook_memo", {})
    local = (kind, ids_digest(ids), json.dumps(params, sort_keys=True), models.weight_versions(model),
             config_digest(model))
    if local in memo:
        return memo[local]
    where = folder()
    path = None
    if where is not None:
        key = hashlib.sha256(json.dumps([kind, weights_digest(model), local[4], local[1], local[2], code_version()])
                             .encode()).hexdigest()[:32]
        path = where / f"{kind}-{key}"
        if (path / "done").exists():
            memo[local] = load(path)
            return memo[local]
    value = compute()
    if path is not None:
        save(value, path)
    memo[local] = value
    return value


def save(value, path: Path) -> None:
    """Write a dataclass: its tensors (also inside dicts) to ``tensors.safetensors``, everything else to
    ``fields.json``, then ``done``, in a private folder renamed to ``path`` at the end: a half-written entry is never
    read, and of two processes storing the same entry at once (test workers, chapter kernels) one wins whole."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    tensors, fields = {}, {"type": f"{type(value).__module__}.{type(value).__qualname__}"}
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if torch.is_tensor(v):
            tensors[f.name] = v
        elif isinstance(v, dict) and v and all(torch.is_tensor(x) for x in v.values()):
            fields[f.name] = {"tensors": list(v)}
            tensors |= {f"{f.name}/{i}": x for i, x in enumerate(v.values())}
        else:
            fields[f.name] = {"value": v}
    path.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, private / "tensors.safetensors")
    (private / "fields.json").write_text(json.dumps(fields))
    (private / "done").write_text("")
    try:
        private.rename(path)
    except OSError:  # stored meanwhile by another process (the same measurement): keep that one
        shutil.rmtree(private, ignore_errors=True)


def load(path: Path):
    """The dataclass ``save`` wrote to ``path``."""
    import importlib

    from safetensors.torch import load_file

    fields = json.loads((path / "fields.json").read_text())
    module, _, name = fields.pop("type").rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    tensors = load_file(path / "tensors.safetensors")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in tensors:
            kwargs[f.name] = tensors[f.name]
        elif "tensors" in fields.get(f.name, {}):
            kwargs[f.name] = {k: tensors[f"{f.name}/{i}"] for i, k in enumerate(fields[f.name]["tensors"])}
        else:
            kwargs[f.name] = fields[f.name]["value"]
    return cls(**kwargs)

