"""GPU check of the gpu profile where no hub is reachable: the chapters, exactly as the gpu profile runs them
(papermill, its lengths and sample counts), on a random-initialised model with Llama-2-7B's exact shape in
bf16, reporting seconds and peak GPU memory per chapter against the 16 GB a Colab T4 has.

    python benchmarks/gpu_check.py                                 # every chapter, Llama-2-7B shape
    python benchmarks/gpu_check.py --chapters 01_sink 02_variance  # some
    python benchmarks/gpu_check.py --shape tiny --device cpu --param n_texts=2   # rehearse it anywhere

Random weights carry none of the paper's structure (no sink, no massive activations), so the chapters' claim
checks print DEPARTS; what this measures is whether each chapter runs at the paper's lengths, how long it takes
and how much GPU memory its kernel holds at its peak (``nvidia-smi``, polled every 0.2 s, minus what the GPU held
before the chapter started). Chapter 6 trains its comparison models for ``--train-steps`` steps only.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from sinkutils import book, models

#: Llama-2-7B's config (meta-llama/Llama-2-7b-hf), the shape the text's memory promises are about
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
TINY = LLAMA2_7B | dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8)
BUDGET_GIB = 16.0
#: chapters whose text promises a 16 GB GPU at the paper's lengths (issue: chapters 1-3)
PROMISED = ("01_sink", "02_variance", "03_interventions")


def random_model(folder: Path, shape: dict, device: str) -> Path:
    """Save a random-initialised Llama of ``shape`` in bf16 (safetensors) with sinkbook-tiny's tokenizer, whose
    ids (BOS = 1) fit any Llama vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    config = LlamaConfig(**shape, torch_dtype="bfloat16")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer_dir = models.CHECKPOINTS / models.EMBEDDED[models.DEFAULT]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / name, folder / name)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder


class GPUPeak:
    """Largest ``memory.used`` of GPU 0 while the block runs, from nvidia-smi (the chapter's kernel is another
    process, so torch's own counters in this process would not see it)."""

    def __init__(self):
        self.available = shutil.which("nvidia-smi") is not None
        self.start = self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def used_mib() -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, check=True).stdout
        return float(out.strip().splitlines()[0])

    def _poll(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.used_mib())

    def __enter__(self):
        if self.available:
            self.start = self.peak = self.used_mib()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.available:
            self._stop.set()
            self._thread.join()
        return False

    @property
    def gib(self) -> float | None:
        return (self.peak - self.start) / 1024 if self.available else None


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chapters", nargs="*", default=None, help=f"default: all of {book.chapters()}")
    p.add_argument("--shape", choices=("llama-2-7b", "tiny"), default="llama-2-7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", default="/tmp/sinkbook-gpu-check", help="model folder and executed notebooks")
    p.add_argument("--train-steps", type=int, default=30, help="chapter 6: steps per comparison model")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per chapter")
    p.add_argument("--param", action="append", default=[], metavar="NAME=YAML", help="extra parameter overrides")
    p.add_argument("--out", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    names = args.chapters or book.chapters()
    work = Path(args.work)
    start = time.time()
    folder = random_model(work / f"random-{args.shape}", LLAMA2_7B if args.shape == "llama-2-7b" else TINY,
                          args.device)
    print(f"random {args.shape} in bf16 at {folder} ({time.time() - start:.0f} s)", flush=True)
    overrides = {"model_name": str(folder), "text_source": "python_docs", "compare_models": []}
    overrides |= book.parse_params(args.param)
    rows = []
    for name in names:
        extra = dict(overrides)
        if name == "06_headwise":  # the profile's larger comparison models, trained only briefly
            gpu = book.parameters("gpu", name)
            base = overrides.get("retrain_overrides", gpu.get("retrain_overrides") or {})  # --param may shrink it
            extra["retrain_overrides"] = dict(base) | {
                "stop_after": args.train_steps, "eval_every": args.train_steps}  # one evaluation: a loss curve point
            extra["retrain_dir"] = str(work / "retrain")
        error = None
        with GPUPeak() as peak:
            t0 = time.time()
            try:
                book.execute(name, "gpu", work / "executed", timeout=args.timeout, overrides=extra)
            except book.ChapterFailed as err:
                error = str(err)
            seconds = time.time() - t0
        gib = peak.gib
        rows.append({"chapter": name, "seconds": round(seconds, 1), "peak_gpu_gib": None if gib is None else round(gib, 2),
                     "promised_16gb": name in PROMISED, "error": error})
        print(f"{name}: {seconds:.0f} s, peak GPU memory {'n/a' if gib is None else f'{gib:.1f} GiB'}"
              + (f"  FAILED: {error}" if error else ""), flush=True)
    print(f"\n{'chapter':20s} {'seconds':>8s} {'peak GiB':>9s}  16 GB budget")
    for r in rows:
        gib = r["peak_gpu_gib"]
        verdict = ("failed" if r["error"] else "n/a" if gib is None else
                   ("fits" if gib <= BUDGET_GIB else "OVER") + ("" if r["promised_16gb"] else " (not promised)"))
        print(f"{r['chapter']:20s} {r['seconds']:8.0f} {'n/a' if gib is None else f'{gib:9.1f}'}  {verdict}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(r["error"] for r in main()) else 0)
