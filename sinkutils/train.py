"""Small pre-training, readable top to bottom (the embedded default models and chapter 6 come from here).

Two steps, each a CLI sub-command:

    python -m sinkutils.train prepare --data-dir D          # build tokenizer + token streams once
    python -m sinkutils.train run --data-dir D --out-dir O  # train; rerun the same line to resume
    torchrun --nproc-per-node 4 -m sinkutils.train run ...   # the same run on 4 GPUs (DDP), same batches

Batches are a pure function of (seed, step), so an interrupted run resumed from its last checkpoint sees
exactly the batches it would have seen, and ends where the uninterrupted run ends. Under torchrun each of
the N processes takes every step's rows [rank * B/N, (rank + 1) * B/N) and DDP averages the gradients, so
the run follows the single-process trajectory (up to float summation order); rank 0 evaluates and saves.
When any rank dies, torchrun stops the others; rerunning the same command resumes every rank from rank 0's
last checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sinkutils import compat, data

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # Llama's order: unk=0, bos=1, eos=2
#: Where BOS stands in a training row. "always": every row is BOS + a window, so position 0 *is* the BOS token
#: (an identity sink can form on its embedding). "documents": windows of the packed stream in which BOS opens
#: each document, as Llama's pretraining packs them; position 0 is mostly an ordinary token. "never": plain
#: windows of the EOS-separated stream, as GPT-2/nanoGPT pack them; only the causal structure marks position 0.
BOS_MODES = ("always", "documents", "never")
ROW_TEXT = {  # the model card's line for each mode
    "always": "every training row is BOS + {m} tokens cut at a seeded offset of the token stream",
    "documents": "every training row is {n} tokens cut at a seeded offset of the packed stream, BOS opening each "
                 "document (position 0 is mostly an ordinary token)",
    "never": "every training row is {n} tokens cut at a seeded offset of the EOS-separated stream, no BOS anywhere "
             "(position 0 is an ordinary token)"}


@dataclasses.dataclass
class TrainConfig:
    data_dir: str
    out_dir: str
    variant: str = "baseline"
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 8
    n_kv_head: int = 8
    d_ff: int = 688
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 3000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    tie_embeddings: bool = True   # False: a separate lm_head, as in Llama-2/3 (SmolLM ties)
    bos: str = "always"           # "always": BOS + window; "documents": BOS only where a document starts; "never"
    synthetic_frac: float = 0.0   # share of each batch that is synthetic instead of text
    synthetic_task: str = "random"  # "random": uniform tokens; "bigram_backcopy": Guo et al. 2024 (data.py)
    synthetic_vocab: int = 64     # bigram_backcopy uses token ids 4 .. 4 + synthetic_vocab
    eval_every: int = 250
    eval_batches: int = 4
    ckpt_every: int = 250
    seed: int = 0
    threads: int = 0              # 0: torch's default
    compile: bool = False         # torch.compile the training steps (see ``compiled``; benchmarks/train_throughput.py)
    device: str = "auto"          # auto: this process's GPU (LOCAL_RANK under torchrun) if any, else cpu

    def validate(self) -> None:
        """Fail before any work with a message that names the bad field and what is valid."""
        from sinkutils.variants import VARIANTS

        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {sorted(VARIANTS)}")
        for name, value in dataclasses.asdict(self).items():  # lr=inf trained a model with a NaN loss
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        for name in ("lr", "steps", "batch_size", "seq_len", "n_layer", "d_model", "n_head", "n_kv_head",
                     "d_ff", "eval_every", "eval_batches", "ckpt_every", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"n_head={self.n_head} must divide d_model={self.d_model}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.bos not in BOS_MODES:
            raise ValueError(f"unknown bos {self.bos!r}; choose one of {BOS_MODES}")
        if self.synthetic_task not in ("random", "bigram_backcopy"):
            raise ValueError(f"unknown synthetic_task {self.synthetic_task!r}; choose 'random' or 'bigram_backcopy'")
        if not 0 <= self.synthetic_frac <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("synthetic_frac and min_lr_ratio must lie in [0, 1]")
        if self.weight_decay < 0 or self.warmup < 0 or self.threads < 0:
            raise ValueError("weight_decay, warmup and threads must be >= 0")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise ValueError(f"unknown device {self.device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err

    def run_fields(self) -> dict:
        """What decides the weights and the log: a resume must match all of it. Free to change between
        resumes: where and how it runs (``MACHINE_FIELDS``) and how often to evaluate or checkpoint; the data folder
        may move, its token streams are compared by content (``data_fingerprint``)."""
        free = (*MACHINE_FIELDS, "eval_every", "ckpt_every")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in free}


# Where a run reads and writes and how it uses the machine: no effect on the numbers (a regenerate command omits them).
MACHINE_FIELDS = ("out_dir", "data_dir", "threads", "device", "compile")


# ----------------------------------------------------------------------------- data preparation

def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``; prepends BOS like Llama's tokenizer (``add_special_tokens``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def _stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in tqdm(texts, desc="tokenize", leave=False):
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.int32)


def prepare(data_dir: str, vocab_size: int = 4096) -> None:
    """Tokenizer + train stream (installed docstrings) + validation stream (Python docs, never trained on)."""
    out = Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_texts = data.docstrings()
    tokenizer = build_tokenizer(train_texts, vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    save_file({"train": _stream(tokenizer, train_texts), "val": _stream(tokenizer, data.python_docs())},
              out / "tokens.safetensors")
    (out / "corpus.json").write_text(json.dumps({
        "train": f"docstrings of {data.CORPUS_PACKAGES}", "val": "pydoc_data.topics",
        "train_docs": len(train_texts), "environment": data.describe_environment()}, indent=1))


def with_document_bos(stream: torch.Tensor, bos_id: int, eos_id: int) -> torch.Tensor:
    """The packed stream with BOS opening every document (before the first, and after each EOS but the last)."""
    ends = (stream == eos_id).nonzero().flatten() + 1
    ends = ends[ends < len(stream)]
    out = torch.full((len(stream) + len(ends) + 1,), bos_id, dtype=stream.dtype)
    keep = torch.ones(len(out), dtype=torch.bool)
    keep[0] = False
    keep[ends + 1 + torch.arange(len(ends))] = False
    out[keep] = stream
    return out


def batch(stream: torch.Tensor, cfg: TrainConfig, step: int, bos_id: int, vocab_size: int,
          split_seed: int = 0) -> torch.Tensor:
    """``cfg.batch_size`` rows of ``cfg.seq_len`` tokens at offsets drawn from (seed, step): resumable by
    construction. With ``cfg.bos == "always"`` each row is BOS + (seq_len - 1) tokens; otherwise a plain window
    of ``stream`` (pass ``with_document_bos(stream)`` for "documents")."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7 + split_seed)
    width = cfg.seq_len - 1 if cfg.bos == "always" else cfg.seq_len
    starts = torch.randint(0, len(stream) - cfg.seq_len, (cfg.batch_size,), generator=g)
    rows = torch.stack([stream[s:s + width] for s in starts.tolist()]).long()
    n_syn = round(cfg.synthetic_frac * cfg.batch_size)
    if n_syn and cfg.synthetic_task == "random":
        rows[:n_syn] = data.random_token_batch(vocab_size, n_syn, width, bos_id=None,
                                               seed=cfg.seed * 1_000_003 + step)
    elif n_syn:
        rows[:n_syn] = data.bigram_backcopy(n_syn, width, min(vocab_size, 4 + cfg.synthetic_vocab),
                                            seed=cfg.seed * 1_000_003 + step)
    if cfg.bos != "always":
        return rows
    return torch.cat([torch.full((cfg.batch_size, 1), bos_id), rows], dim=1)


def training_streams(data_dir: str | Path, cfg: TrainConfig, bos_id: int, eos_id: int) -> dict[str, torch.Tensor]:
    """The prepared train and validation streams, with BOS at document starts when ``cfg.bos == "documents"``;
    each must be longer than ``cfg.seq_len`` for a window to fit."""
    streams = load_file(Path(data_dir) / "tokens.safetensors")
    if cfg.bos == "documents":
        streams = {k: with_document_bos(v, bos_id, eos_id) for k, v in streams.items()}
    for name, stream in streams.items():
        if len(stream) <= cfg.seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} does not fit the {name} stream of {len(stream)} tokens in "
                             f"{data_dir}; choose seq_len < {len(stream)}")
    return streams


def check_data_dir(data_dir: str | Path) -> None:
    """A FileNotFoundError naming what is missing unless ``data_dir`` holds what ``prepare`` writes."""
    missing = [name for name in ("tokenizer", "tokens.safetensors") if not (Path(data_dir) / name).exists()]
    if missing:
        raise FileNotFoundError(f"{data_dir} has no {' or '.join(missing)}: prepare it first with "
                                f"`python -m sinkutils.train prepare --data-dir {data_dir}`")


def _read_state(ckpt: Path) -> dict:
    """``ckpt/state.json``, or a ValueError naming the file when it is not the JSON ``_save`` writes."""
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{ckpt / 'state.json'} is corrupt ({err}); move {ckpt} away to resume from an older "
                         f"checkpoint, or use another --out-dir") from None


# ----------------------------------------------------------------------------- model and loop

def make_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    """The Llama of ``cfg`` (with ``cfg.variant``'s attention), initialised from ``cfg.seed``; special token
    ids follow ``SPECIAL_TOKENS``, the order ``build_tokenizer`` gives them."""
    from transformers import LlamaConfig

    from sinkutils import variants

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=max(2048, cfg.seq_len), rms_norm_eps=1e-5, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=SPECIAL_TOKENS.index("<s>"), eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"))
    torch.manual_seed(cfg.seed)
    return variants.build(config, cfg.variant)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on the weights of linear maps and embeddings only, never on norm gains (the
    head-wise RMSNorm gain is 2-D but is a gain)."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    params = list(model.parameters())
    return torch.optim.AdamW([{"params": [p for p in params if id(p) in decayed], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), foreach=True)  # one kernel per op: 1.06x on CPU


def compiled(model, cfg: TrainConfig) -> torch.nn.Module:
    """What the training steps run: ``model``, or with ``cfg.compile`` its ``torch.compile`` with attention on
    SDPA's math path, which inductor fuses for the embedded models' 16-wide heads (the flash kernel is opaque
    to it and gains nothing; benchmarks/train_throughput.py measures both against the plain loop)."""
    return _MathAttentionCompiled(model) if cfg.compile else model


class _MathAttentionCompiled(torch.nn.Module):
    """``torch.compile(model)`` traced with SDPA restricted to its math path (the choice is fixed at tracing,
    so evaluation outside this module keeps the default kernels)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.compiled = torch.compile(model)

    def forward(self, *args, **kwargs):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return self.compiled(*args, **kwargs)


def train_step(model, opt: torch.optim.Optimizer, cfg: TrainConfig, ids: torch.Tensor, step: int) -> torch.Tensor:
    """One optimisation step, the unit ``benchmarks/train_throughput.py`` times: learning rate of ``step``,
    forward, backward (DDP averages gradients here), clipping, AdamW. Returns the detached loss."""
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, step)
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model, val: torch.Tensor, cfg: TrainConfig, bos_id: int, vocab_size: int) -> dict:
    """Validation loss and mean attention to token 0 per layer (queries at positions >= 4), on validation rows
    built as the training rows are (so with ``cfg.bos != "always"`` token 0 is mostly an ordinary token)."""
    from sinkutils import trace

    model.eval()
    losses, sink = [], []
    for i in range(cfg.eval_batches):
        ids = batch(val, dataclasses.replace(cfg, synthetic_frac=0.0), i, bos_id, vocab_size, split_seed=1)
        ids = ids.to(model.device)
        with trace.record(model, "attn.sink") as rec:
            out = model(input_ids=ids, labels=ids)
        losses.append(out.loss.item())
        sink.append(rec.sink_per_layer(min_query=4))
    model.train()
    return {"val_loss": sum(losses) / len(losses),
            "sink_per_layer": torch.stack(sink).mean(0).tolist()}


def data_fingerprint(data_dir: str) -> str:
    """sha256 of a prepared data folder's token streams: a resume must train on the very same tokens."""
    import hashlib

    return hashlib.sha256((Path(data_dir) / "tokens.safetensors").read_bytes()).hexdigest()


def _save(model, opt, cfg: TrainConfig, step: int, log: list, seconds: float, out: Path) -> None:
    """Write to a temporary folder, then swap, so a crash mid-save never leaves a broken checkpoint."""
    tmp = out / "checkpoint.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors")
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": dataclasses.asdict(cfg),
                                                "optimizer": opt_meta, "log": log, "seconds": seconds,
                                                "data_sha256": data_fingerprint(cfg.data_dir)}, indent=1))
    final, old = out / "checkpoint", out / "checkpoint.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # left by a crash after the last swap
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                meta["scalars"][f"{pid}.{k}"] = float(v)
    return tensors, meta


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = torch.tensor(v)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) in a plain process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    """``cfg.device``; "auto" and a bare "cuda" mean this process's GPU (``LOCAL_RANK`` under torchrun)."""
    if cfg.device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(cfg.device)
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def cli_flags(cfg: TrainConfig) -> list[str]:
    """``cfg`` as the flags of ``python -m sinkutils.train run`` (every field, so nothing depends on defaults)."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in dataclasses.asdict(cfg).items()]


def run_distributed(cfg: TrainConfig, processes: int, stop_after: int | None = None) -> None:
    """Train (or resume) ``cfg`` with torchrun on ``processes`` processes of this machine, one GPU each (gloo on
    CPUs): the run ``train`` would make in one process, in less time. Returns when every rank has finished."""
    import subprocess
    import sys

    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "sinkutils.train", "run", *cli_flags(cfg)] + ([f"--stop-after={stop_after}"] if stop_after else [])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    done = subprocess.run(command, env=env)
    if done.returncode:
        raise RuntimeError(f"torchrun on {processes} processes failed (exit {done.returncode}) training {cfg.out_dir}; "
                           f"its output says why; rerunning resumes from the last checkpoint")


def _latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint to resume from; ``checkpoint.old`` only if a crash fell between ``_save``'s two renames."""
    for name in ("checkpoint", "checkpoint.old"):
        if (out / name / "state.json").exists():
            return out / name
    return None


def _load_weights(model, cfg: TrainConfig, ckpt: Path) -> None:
    """``ckpt``'s weights into ``model``, refusing any that do not fit (a tied model's lm_head is not saved)."""
    missing, unexpected = model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_embeddings else set()):
        raise ValueError(f"{ckpt} does not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()


def _resume(model, opt, cfg: TrainConfig, ckpt: Path) -> tuple[int, list, float]:
    """Load weights and optimizer state after checking that the checkpoint is a run of this very configuration."""
    saved = _read_state(ckpt)
    defaults = dataclasses.asdict(TrainConfig(data_dir="", out_dir=""))
    mine = cfg.run_fields()
    theirs = {k: saved["config"].get(k, defaults[k]) for k in mine}
    if mine != theirs:
        diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
        raise ValueError(f"{ckpt.parent} holds a different run; (saved, asked) for each field that differs: {diff}. "
                         f"Use another --out-dir, or the saved values to resume.")
    if saved.get("data_sha256", ours := data_fingerprint(cfg.data_dir)) != ours:
        raise ValueError(f"{ckpt.parent} was trained on other token streams than {cfg.data_dir}/tokens.safetensors; "
                         f"rebuild the data with the same `prepare` (same packages and vocab size) or use another --out-dir")
    _load_weights(model, cfg, ckpt)
    _load_optimizer(opt, load_file(ckpt / "optimizer.safetensors"), saved["optimizer"])
    return saved["step"], saved["log"], saved.get("seconds", 0.0)


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict:
    """Train (or resume) and return the log. ``stop_after`` ends early at that step (tests simulate a kill).

    Under torchrun (WORLD_SIZE > 1) each process runs this same function: it joins the process group,
    trains on its slice of every batch through DistributedDataParallel, and only rank 0 evaluates, saves,
    prints and exports; the returned log is complete on rank 0 only."""
    cfg.validate()
    if stop_after is not None and stop_after <= 0:
        raise ValueError(f"stop_after must be a positive step, got {stop_after}")
    check_data_dir(cfg.data_dir)
    rank, local_rank, world = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {world} processes")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg, local_rank)
    joined = world > 1 and not dist.is_initialized()
    if joined:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, stop_after, rank, world, device)
    finally:
        if joined:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, stop_after: int | None, rank: int, world: int, device: torch.device) -> dict:
    from transformers import AutoTokenizer

    out = Path(cfg.out_dir)
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.data_dir) / "tokenizer")
    bos, vocab = tokenizer.bos_token_id, len(tokenizer)
    streams = training_streams(cfg.data_dir, cfg, bos, tokenizer.eos_token_id)
    model = make_model(cfg, vocab).to(device)
    opt = make_optimizer(model, cfg)
    step, log, seconds = 0, [], 0.0
    ckpt = _latest_checkpoint(out)
    if ckpt is not None:
        step, log, seconds = _resume(model, opt, cfg, ckpt)
    net = compiled(model, cfg)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    rows = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(step, end), initial=step, total=cfg.steps, desc=f"train {cfg.variant}", disable=rank > 0)
    t0 = time.time() - seconds
    for step in bar:
        ids = batch(streams["train"], cfg, step, bos, vocab)[rows].to(device)
        loss = train_step(net, opt, cfg, ids, step)
        if world > 1:  # report the loss of the whole batch, not of this rank's rows
            dist.all_reduce(loss)
            loss /= world
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if rank == 0 and (done % cfg.eval_every == 0 or done == cfg.steps):
            ev = evaluate(model, streams["val"], cfg, bos, vocab)
            log.append({"step": done, "train_loss": loss.item(), "tokens": done * cfg.batch_size * cfg.seq_len,
                        "seconds": round(time.time() - t0, 1)} | ev)
            bar.write(f"step {done}: val {ev['val_loss']:.3f} sink {[round(s, 3) for s in ev['sink_per_layer']]}")
        if rank == 0 and (done % cfg.ckpt_every == 0 or done == end):
            _save(model, opt, cfg, done, log, time.time() - t0, out)
    if rank == 0 and end == cfg.steps:
        export(model, tokenizer, cfg, log, out)
    if world > 1:
        dist.barrier()  # every rank returns once rank 0's checkpoint and export are on disk
    return {"log": log}


def export(model, tokenizer, cfg: TrainConfig, log: list, out: Path) -> None:
    """The shippable model: ``save_pretrained`` (safetensors) + tokenizer + config + training log."""
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    compat.make_portable(out / "model")
    (out / "model" / "training.json").write_text(json.dumps(
        {"config": dataclasses.asdict(cfg), "log": log}, indent=1))


def ship(out_dir: str, name: str, dest_root: Path | None = None, notes: str = "") -> Path:
    """Turn ``out_dir``'s latest checkpoint into the embedded model ``name`` (``sinkutils/checkpoints/name``):
    safetensors weights, tokenizer, the training log, and a MODEL_CARD.md with the recipe, the command that
    regenerates it, and the sink numbers measured now on held-out text (BOS + 127 tokens of Python docs)."""
    from transformers import AutoTokenizer

    from sinkutils import measure, models

    ckpt = _latest_checkpoint(Path(out_dir))
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {out_dir}; train first with `python -m sinkutils.train run`")
    saved = _read_state(ckpt)
    cfg = TrainConfig(**saved["config"])
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.data_dir) / "tokenizer")
    model = make_model(cfg, len(tokenizer))
    _load_weights(model, cfg, ckpt)
    dest = (dest_root or models.CHECKPOINTS) / name
    if dest.exists():
        shutil.rmtree(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    compat.make_portable(dest)  # the files every supported transformers version reads
    models.write_checksums(dest)  # load verifies them: a corrupt tensor file is refused, not run to NaN logits
    model.eval()
    ids = data.token_batch(tokenizer, data.python_docs(), n=32, length=128, seed=0)
    prof = measure.sink_profile(model, ids)
    last = saved["log"][-1] if saved["log"] else {}
    metrics = {"step": saved["step"], "tokens_seen": saved["step"] * cfg.batch_size * cfg.seq_len,
               "train_seconds": round(saved.get("seconds", 0.0)), "val_loss": last.get("val_loss"),
               "attention_to_first": [round(x, 4) for x in prof.attention_to_first.tolist()],
               "sink_rate": [round(x, 3) for x in prof.sink_rate.tolist()],
               "first_norm": [round(x, 2) for x in prof.first_norm.tolist()],
               "other_norm": [round(x, 2) for x in prof.later_norm.tolist()]}
    (dest / "training.json").write_text(json.dumps({"config": saved["config"], "metrics": metrics,
                                                    "log": saved["log"]}, indent=1))
    corpus = json.loads((Path(cfg.data_dir) / "corpus.json").read_text())
    defaults = dataclasses.asdict(TrainConfig(data_dir="", out_dir=""))
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in saved["config"].items()
                     if k not in MACHINE_FIELDS and v != defaults[k])
    vocab = len(tokenizer)
    stop = f" --stop-after {saved['step']}" if saved["step"] < cfg.steps else ""
    (dest / "MODEL_CARD.md").write_text(f"""# {name}

A {cfg.n_layer}-layer Llama ({cfg.d_model} wide, {cfg.n_head} heads, SwiGLU FFN of {cfg.d_ff}, RoPE, RMSNorm,
{'tied' if cfg.tie_embeddings else 'untied'} embeddings, vocabulary {vocab}) trained from scratch by `sinkutils.train`, shipped so the book builds
offline. Variant: `{cfg.variant}`.

## Recipe

- corpus: {corpus['train']} ({corpus['train_docs']} docstrings); validation: {corpus['val']} (never trained on)
- environment when the corpus was built: {corpus['environment']}
- {ROW_TEXT[cfg.bos].format(n=cfg.seq_len, m=cfg.seq_len - 1)}
- seed {cfg.seed}; {saved['step']} steps of {cfg.batch_size} x {cfg.seq_len} tokens = {metrics['tokens_seen']:,} tokens seen,
  {metrics['train_seconds']} s of training; AdamW (0.9, 0.95), peak lr {cfg.lr}, weight decay {cfg.weight_decay},
  warmup {cfg.warmup}, cosine to {cfg.min_lr_ratio} x lr over {cfg.steps} steps

Regenerate:

```bash
python -m sinkutils.train prepare --data-dir DATA --vocab-size {vocab}
python -m sinkutils.train run --data-dir DATA --out-dir RUN {flags}{stop}
python -m sinkutils.train ship --out-dir RUN --name {name}
```

## Measured at shipping (32 held-out sequences of BOS + 127 tokens, queries at positions >= 4)

| layer | attention to token 0 | sink rate (heads > 0.3) | token-0 input norm | later tokens' norm |
|---|---|---|---|---|
""" + "".join(f"| {l} | {a:.3f} | {r:.2f} | {f:.1f} | {o:.1f} |\n" for l, (a, r, f, o) in enumerate(zip(
        metrics["attention_to_first"], metrics["sink_rate"], metrics["first_norm"], metrics["other_norm"])))
        + f"\nvalidation loss {metrics['val_loss']}\n" + (f"\n## Notes\n\n{notes}\n" if notes else ""))
    return dest


def _flag_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def main(argv: list[str] | None = None) -> None:
    """The CLI: ``prepare``, ``run`` (every ``TrainConfig`` field is a flag) and ``ship``."""
    from sinkutils.variants import VARIANTS

    p = argparse.ArgumentParser(prog="python -m sinkutils.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="build the tokenizer and token streams")
    pp.add_argument("--data-dir", required=True)
    pp.add_argument("--vocab-size", type=int, default=4096)
    pr = sub.add_parser("run", help="train, or resume from --out-dir/checkpoint")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.default is dataclasses.MISSING:
            pr.add_argument(flag, required=True)
        elif f.name == "variant":
            pr.add_argument(flag, default=f.default, choices=sorted(VARIANTS))
        elif isinstance(f.default, bool):
            pr.add_argument(flag, default=f.default, type=_flag_bool, metavar="{true,false}")
        else:
            pr.add_argument(flag, type=type(f.default), default=f.default)
    pr.add_argument("--stop-after", type=int, default=None,
                    help="end at this step (the schedule still spans --steps); rerun with a larger value to go on")
    ps = sub.add_parser("ship", help="make the latest checkpoint of --out-dir an embedded model")
    ps.add_argument("--out-dir", required=True)
    ps.add_argument("--name", required=True)
    ps.add_argument("--notes", default="", help="markdown appended to the model card (what was tried)")
    args = vars(p.parse_args(argv))
    cmd = args.pop("cmd")
    try:
        if cmd == "prepare":
            prepare(args["data_dir"], args["vocab_size"])
        elif cmd == "ship":
            print(ship(args["out_dir"], args["name"], notes=args["notes"]))
        else:
            stop_after = args.pop("stop_after")
            train(TrainConfig(**args), stop_after=stop_after)
    except (ValueError, OSError) as err:  # a mistake in the arguments or the folders: one line, no traceback
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None


if __name__ == "__main__":
    main()
