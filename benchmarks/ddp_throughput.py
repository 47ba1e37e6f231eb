"""What torchrun's data parallelism gives ``sinkutils.train``: training tokens/s of N processes (DDP; gloo on CPUs,
NCCL on GPUs) against one process: the same run (same global batch, same steps), one thread (or GPU) per process.

Each run is the real CLI (``python -m sinkutils.train run``, or ``torchrun --nproc-per-node N -m sinkutils.train
run``) on a small corpus prepared here. Its speed is read from the training log: tokens trained between the
run's two evaluations over the seconds between them, so process start-up, the first step and saving are left out.
Every process runs ``--threads`` threads (on GPUs, one GPU each), so the ratio (N processes / 1) is what adding
processes buys: N would be perfect scaling. It needs N free cores (GPUs): on a machine busy with other work the
ratio says more about that work than about DDP, so the load average around the runs is printed too.

    python benchmarks/ddp_throughput.py                                   # 2 CPU processes vs 1, a thread each
    python benchmarks/ddp_throughput.py --processes 8 --device cuda --layers 8 --width 384 --batch 96 --seq-len 256
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from sinkutils import data, train


def prepare(folder: Path, vocab: int) -> None:
    """A tokenizer and token streams as ``train prepare`` writes them, from the Python documentation (seconds)."""
    texts = data.python_docs()
    tokenizer = train.build_tokenizer(texts, vocab)
    tokenizer.save_pretrained(folder / "tokenizer")
    streams = {"train": train._stream(tokenizer, texts), "val": train._stream(tokenizer, texts[:50])}
    save_file(streams, folder / "tokens.safetensors")


def tokens_per_second(cfg: train.TrainConfig, processes: int) -> float:
    """Run ``cfg`` on ``processes`` processes; tokens/s between its two evaluations (``cfg.eval_every`` apart)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = str(cfg.threads)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    done = subprocess.run([sys.executable, *launcher, "-m", "sinkutils.train", "run", *train.cli_flags(cfg)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the {processes}-process run failed:\n{done.stderr[-3000:]}")
    log = json.loads((Path(cfg.out_dir) / "checkpoint" / "state.json").read_text())["log"]
    first, last = log[-2], log[-1]
    return (last["tokens"] - first["tokens"]) / (last["seconds"] - first["seconds"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process (CPU runs)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: one GPU per process")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="the global batch: split among the processes")
    p.add_argument("--steps", type=int, default=40, help="timed steps (between the two evaluations)")
    p.add_argument("--vocab", type=int, default=512)
    args = p.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sinkbook-ddp-") as tmp:
        prepare(Path(tmp) / "data", args.vocab)
        speed = {}
        for n in (1, args.processes):
            threads = args.threads
            cfg = train.TrainConfig(data_dir=str(Path(tmp) / "data"), out_dir=str(Path(tmp) / f"run-{n}"),
                                    n_layer=args.layers, d_model=args.width, n_head=8, n_kv_head=8,
                                    d_ff=args.width * 3, seq_len=args.seq_len, batch_size=args.batch,
                                    steps=2 * args.steps, warmup=5, eval_every=args.steps, eval_batches=1,
                                    ckpt_every=10 * args.steps, threads=threads, device=args.device)
            cfg.validate()
            speed[n] = tokens_per_second(cfg, n)
            print(f"{n} process(es) x {threads} thread(s) on {args.device}: {speed[n]:,.0f} tokens/s", flush=True)
    print(f"ratio {args.processes} processes / 1: {speed[args.processes] / speed[1]:.2f} "
          f"(perfect scaling: {args.processes}; global batch {args.batch} x {args.seq_len} tokens)")
    print(f"load average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other work "
          f"on the machine slows both runs, unevenly when it is high")


if __name__ == "__main__":
    main()
