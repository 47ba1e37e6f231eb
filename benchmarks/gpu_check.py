"""GPU check of the gpu profile where no hub is reachable: what `PROFILE=gpu bash run.sh book` runs (papermill,
the profile's model names, lengths, sample counts and WikiText-2; nothing overridden), from a Hugging Face cache
filled with stand-ins of the profile's models at their exact shapes in bf16 (random weights, saved under the real
repo ids, ``sinkutils.standins``) and WikiText-2-format text, reporting seconds and peak GPU memory per chapter
against the 16 GB a Colab T4 has.

    python benchmarks/gpu_check.py                                 # every chapter, the paper's shapes
    python benchmarks/gpu_check.py --chapters 01_sink 02_variance  # some
    python benchmarks/gpu_check.py --shape tiny --device cpu --param n_texts=2 --param seq_len=64  # anywhere

Random weights carry none of the paper's structure (no sink, no massive activations), so the chapters' claim
checks print DEPARTS and chapter 4 reports the reference values as not comparable; what this measures is whether
each chapter runs at the paper's lengths on the users' code path (hub names resolved from the cache, WikiText-2
read from its parquet file, the preflight), how long it takes and how much GPU memory its kernel holds at its
peak (``nvidia-smi``, polled every 0.2 s, minus what the GPU held before the chapter started). Chapter 6 trains
its comparison models for ``--train-steps`` steps only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from sinkutils import book, models, preflight, project, standins

BUDGET_GIB = 16.0
#: chapters whose text promises a 16 GB GPU at the paper's lengths (issue: chapters 1-3)
PROMISED = ("01_sink", "02_variance", "03_interventions")


def profile_models(names: list[str], overrides: dict) -> list[str]:
    """The short names of the hub models the chapters load under the gpu profile (with ``overrides``)."""
    repos, _ = preflight.needs("gpu", names, overrides)
    by_repo = {repo: short for short, repo in models.HUB.items()}
    unknown = [r for r in repos if by_repo.get(r) not in standins.FULL]
    if unknown:
        raise SystemExit(f"no stand-in for {unknown}; sinkutils.standins has {sorted(standins.FULL)}")
    return [by_repo[r] for r in repos]


@contextlib.contextmanager
def environment(**values):
    """``os.environ`` with ``values`` while the block runs (the chapters' kernels inherit it)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    p.add_argument("--chapters", nargs="*", default=None, help=f"default: all of {project.chapters()}")
    p.add_argument("--shape", choices=("full", "tiny"), default="full",
                   help="the stand-ins' shape: the real models' (default) or 3 layers of width 64")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", default="/tmp/sinkbook-gpu-check", help="HF cache, executed notebooks, retraining")
    p.add_argument("--train-steps", type=int, default=30, help="chapter 6: steps per comparison model")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per chapter")
    p.add_argument("--param", action="append", default=[], metavar="NAME=YAML", help="extra parameter overrides")
    p.add_argument("--out", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    names = args.chapters or project.chapters()
    work = Path(args.work)
    hf_home = work / f"hf_home-{args.shape}"
    overrides = book.parse_params(args.param)
    start = time.time()
    needed = profile_models(names, overrides)
    standins.build(hf_home, needed, shape=args.shape, device=args.device)
    print(f"stand-ins {needed} ({args.shape}) and WikiText-2-format text in {hf_home} ({time.time() - start:.0f} s)",
          flush=True)
    with environment(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1"):
        print(f"models and text: {preflight.check('gpu', names, overrides)}", flush=True)
        return run_chapters(names, overrides, work, args)


def run_chapters(names: list[str], overrides: dict, work: Path, args) -> list[dict]:
    rows = []
    for name in names:
        extra = dict(overrides)
        if name == "06_headwise":  # the profile's larger comparison models, trained only briefly
            gpu = project.parameters("gpu", name)
            base = overrides.get("retrain_overrides", gpu.get("retrain_overrides") or {})  # --param may shrink it
            extra["retrain_overrides"] = dict(base) | {
                "stop_after": args.train_steps, "eval_every": args.train_steps}  # one evaluation: a loss curve point
            if not str(args.device).startswith("cuda"):
                extra["retrain_overrides"]["device"] = args.device
            extra["retrain_dir"] = str(work / f"retrain-{args.shape}")
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
