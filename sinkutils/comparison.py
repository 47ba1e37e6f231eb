"""Chapter 6: head imbalance, and head-wise RMSNorm against the baseline, sigmoid and gated attention
(Fig 2, 13, 14, 15, 16, 23).

The four embedded comparison models were trained by ``sinkutils.train`` with one recipe (``sinkbook-tiny``'s:
same data, seed, batches, schedule and stopping step); only the attention variant differs. ``retrain`` repeats
that with any overrides (the GPU profile trains larger ones) after showing its budget, measured here.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from sinkutils import measure, metrics, models, structure, trace, variants

#: variant -> the embedded model trained with the shared recipe (each has a MODEL_CARD.md and training log)
SHIPPED = {"baseline": "sinkbook-tiny", "sigmoid": "sinkbook-tiny-sigmoid",
           "headwise_rmsnorm": "sinkbook-tiny-headwise", "gated": "sinkbook-tiny-gated"}
RECIPE_FROM = "sinkbook-tiny"


# --- Fig 13: head imbalance -------------------------------------------------------------------------------

@dataclasses.dataclass
class HeadImbalance:
    """Per (layer, head), over queries at positions >= ``min_query`` (Fig 13)."""

    entropy: torch.Tensor    # (L, H) mean attention entropy in nats
    variance: torch.Tensor   # (L, H) mean dimension-wise variance of the head's output (what enters W_O)
    sink: torch.Tensor       # (L, H) mean attention to token 0
    min_query: int

    def tau(self) -> torch.Tensor:
        """(L,) Kendall tau between entropy and output variance over each layer's heads (imbalance: < 0)."""
        return torch.stack([metrics.kendall_tau(e, v) for e, v in zip(self.entropy, self.variance)])

    def spread(self) -> torch.Tensor:
        """(L,) largest over smallest head output variance in each layer: how unequal the heads enter W_O."""
        return self.variance.max(-1).values / self.variance.min(-1).values.clamp_min(1e-30)


@torch.no_grad()
def head_imbalance(model, ids: torch.Tensor, min_query: int = 4, batch_size: int = 8) -> HeadImbalance:
    """Attention entropy against output variance for every head (Fig 13): a head that attends to few keys
    passes their values through almost unaveraged, so its output keeps their variance; a head that spreads
    its attention averages the variance away."""
    models.check_length(model, ids.shape[1])
    metrics.check_min_query(min_query, measure.check_ids(ids).shape[1])
    found = measure.survey(model, ids, batch_size=batch_size)
    return HeadImbalance(**{name: found.mean(key)[..., min_query:].mean(-1).float() for name, key in
                            (("entropy", "entropy"), ("variance", "head_var"), ("sink", "sink"))},
                         min_query=min_query)


# --- Fig 2, 14, 15, 16, 23: the four variants -------------------------------------------------------------

@dataclasses.dataclass
class VariantProfile:
    """One trained model's numbers for the comparison figures."""

    name: str
    variant: str
    attention_to_first: torch.Tensor  # (L,) Fig 2; for sigmoid the raw sigmoid weight token 0 receives
    first_share: torch.Tensor         # (L,) token 0's share of each query's total weight (= the above for softmax)
    first_dominance: torch.Tensor     # (L+1,) Fig 14, token 0's max|x| / mean|x| per depth
    later_dominance: torch.Tensor     # (L+1,) the same for tokens t >= 1
    effective_rank: torch.Tensor      # (L+1,) Fig 15
    output_variance: torch.Tensor     # (L, T) Fig 23, head-averaged variance of what enters W_O, by position
    log: list[dict]                   # training log: step, tokens, train_loss, val_loss, sink_per_layer
    trained: dict                     # what training ended with: step, tokens_seen, train_seconds ({} if unknown)

    def variance_first_over_later(self) -> torch.Tensor:
        """(L,) token 0's attention-output variance over the mean of the later positions' (the discrepancy,
        ``measure.first_over_later``)."""
        return measure.first_over_later(self.output_variance[:, None])

    def val_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens seen, validation loss) at every evaluation of training (Fig 16)."""
        return (torch.tensor([r["tokens"] for r in self.log], dtype=torch.float64),
                torch.tensor([r["val_loss"] for r in self.log]))


def training_record(name_or_dir: str) -> dict:
    """What ``sinkutils.train`` wrote next to a trained model (``training.json``: its config, its log and, for
    shipped models, the final ``metrics``); {} for a model that has none (a hub model)."""
    source, local = models.resolve(name_or_dir)
    path = Path(source) / "training.json"
    return json.loads(path.read_text()) if local and path.exists() else {}


@torch.no_grad()
def variant_profile(name: str, paragraphs: list[str], n: int, length: int, seed: int = 0,
                    batch_size: int = 8) -> VariantProfile:
    """Measure the comparison figures on model ``name``, on ``n`` sequences of ``length`` tokens cut from
    ``paragraphs`` with the model's own tokenizer (retrained models may have another vocabulary)."""
    from sinkutils import data

    model, tokenizer = models.load(name)
    ids = data.token_batch(tokenizer, paragraphs, n=n, length=length, seed=seed)
    sink = measure.sink_profile(model, ids, batch_size=batch_size)
    resid = structure.residual_profile(model, ids, batch_size=batch_size)
    out_var = measure.position_variance(model, ids, batch_size=batch_size).mean(1)  # (L, T)
    variant = variants.variant_of(models.decoder_layers(model)[0].self_attn)
    record = training_record(name)
    return VariantProfile(name=name, variant=variant, attention_to_first=sink.attention_to_first,
                          first_share=(first_share(model, ids, min_query=sink.min_query, batch_size=batch_size)
                                       if variant == "sigmoid" else sink.attention_to_first),  # softmax: sums to 1
                          first_dominance=resid.first_dominance, later_dominance=resid.later_dominance,
                          effective_rank=resid.effective_rank, output_variance=out_var,
                          log=record.get("log", []), trained=record.get("metrics", {}))


@torch.no_grad()
def first_share(model, ids: torch.Tensor, min_query: int = 4, batch_size: int = 8) -> torch.Tensor:
    """(L,) mean over heads and queries t >= ``min_query`` of w_t0 / sum_j w_tj. Sigmoid attention's weights do not
    sum to 1 (each is about 1/S when scores are near 0), so its raw weight on token 0 is small by construction;
    this share is what compares with softmax attention. It needs the attention maps: for the small comparison
    models only (heads x T x T per layer)."""
    metrics.check_min_query(min_query, measure.check_ids(ids).shape[1])

    def summed(rec: trace.Recorder) -> torch.Tensor:
        w = rec["attn.pattern"].float()[..., min_query:, :]  # (L, B, H, T - min_query, S)
        return (w[..., 0] / w.sum(-1).clamp_min(1e-30)).mean(dim=(2, 3)).sum(1)

    return measure.mean_over_sequences(model, ids, ("attn.pattern",), summed, batch_size=batch_size,
                                       desc="share of token 0")


def steps_to_reach(log: list[dict], loss: float) -> int | None:
    """The first evaluated step whose validation loss is at most ``loss`` (None if never): convergence speed."""
    return next((r["step"] for r in log if r["val_loss"] <= loss), None)


# --- retraining -------------------------------------------------------------------------------------------

def recipe(name: str = RECIPE_FROM) -> tuple[dict, int]:
    """(TrainConfig fields except folders and variant, the step training stopped at) of an embedded model."""
    source, _ = models.resolve(name)
    saved = json.loads((Path(source) / "training.json").read_text())
    config = {k: v for k, v in saved["config"].items() if k not in ("data_dir", "out_dir", "variant")}
    return config, saved["metrics"]["step"]


def retrain_configs(out_root: str | Path, data_dir: str | Path, variants: list[str] | None = None,
                    overrides: dict | None = None):
    """One ``TrainConfig`` per variant: the shipped recipe with ``overrides`` (e.g. ``{"steps": 400}``),
    output in ``out_root/<variant>``. Unknown fields or variants fail here, before anything runs."""
    from sinkutils.train import TrainConfig
    from sinkutils.variants import VARIANTS

    config, _ = recipe()
    overrides = dict(overrides or {})
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"data_dir", "out_dir", "variant"}
    unknown = sorted(set(overrides) - fields - {"stop_after"})
    if unknown:
        raise ValueError(f"unknown training settings {unknown}; choose from {sorted(fields | {'stop_after'})}")
    variants = list(SHIPPED) if variants is None else variants
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variants {bad}; choose from {sorted(VARIANTS)}")
    overrides.pop("stop_after", None)
    cfgs = {v: TrainConfig(data_dir=str(data_dir), out_dir=str(Path(out_root) / v), variant=v,
                           **(config | overrides)) for v in variants}
    for cfg in cfgs.values():
        cfg.validate()
    return cfgs


def stop_step(overrides: dict | None = None) -> int:
    """Where retraining stops: ``overrides["stop_after"]``, else the shipped stopping step, else the schedule's end
    if ``steps`` is overridden below it."""
    overrides = overrides or {}
    if "stop_after" in overrides:
        return int(overrides["stop_after"])
    _, stopped = recipe()
    return min(stopped, int(overrides.get("steps", stopped)))


def seconds_per_step(cfg, vocab_size: int, probe_steps: int = 3) -> float:
    """Time ``probe_steps`` optimisation steps of ``cfg``'s model on this machine (after one warm-up step), so
    the budget a reader sees before retraining is measured on their hardware, not quoted from ours."""
    from sinkutils import train

    device = train._device(cfg, 0)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = train.make_model(cfg, vocab_size).to(device)
    opt = train.make_optimizer(model, cfg)
    ids = torch.randint(4, vocab_size, (cfg.batch_size, cfg.seq_len), device=device)
    train.train_step(model, opt, cfg, ids, 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(probe_steps):
        train.train_step(model, opt, cfg, ids, step + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / probe_steps


def retrain(out_root: str | Path, cfgs: dict, stop_after: int, processes: int = 1) -> dict[str, Path]:
    """Train (or resume: rerunning continues where an interrupted run stopped) every config up to
    ``stop_after`` and export each as a model folder ``models.load`` accepts; returns variant -> folder.
    ``processes`` > 1 trains each with torchrun on that many GPUs of this machine (``train.run_distributed``)."""
    from sinkutils import train

    out: dict[str, Path] = {}
    for variant, cfg in cfgs.items():
        if processes > 1:
            train.run_distributed(cfg, processes, stop_after=stop_after)
        else:
            train.train(cfg, stop_after=stop_after)
        out[variant] = train.ship(cfg.out_dir, variant, dest_root=Path(out_root) / "models")
    return out


def prepare_data(out_root: str | Path, vocab_size: int) -> Path:
    """The offline corpus tokenised for retraining, once per folder (``sinkutils.train prepare``)."""
    from sinkutils import train

    data_dir = Path(out_root) / f"data-{vocab_size}"
    if not (data_dir / "tokens.safetensors").exists():
        train.prepare(str(data_dir), vocab_size)
    return data_dir
