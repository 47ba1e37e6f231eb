"""What spreading a model over devices costs the chapters' measurements: each chapter's measurements on the model
loaded whole against the same model spread by ``models.load(device_map=...)``, as a ratio of times (1.00: no cost).

Default: the CPU rehearsal of ``tests/test_multidevice.py``: sinkbook-tiny saved with ``save_pretrained``, its
layers alternating between the CPU and disk offload (every forward pass reads the offloaded layers' weights from
disk), against the whole model on the CPU. On a GPU node, ``--device-map auto`` (with ``--max-memory``) spreads it
over the GPUs instead, against the whole model on ``--device``. Modes are timed in turns (round-robin over
repeats) so background load hits both alike; each mode's best repeat counts, by the wall clock.

    python benchmarks/multidevice_measure.py                       # CPU and disk offload against the whole CPU model
    python benchmarks/multidevice_measure.py --model llama-2-7b --device cuda --device-map auto \\
        --max-memory '{"0": "8GiB", "1": "20GiB"}' --length 512    # two GPUs against one
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from sinkutils import data, measure, models, origin, structure

K = 10


def chapters(model, ids: torch.Tensor) -> dict:
    """What the chapters measure on their model, in the order a build runs it: first the one recorded pass
    (``measure.survey``) that chapters 1, 2, 4 and 5 read, then each chapter's calls (their own passes, and what
    they read from the survey)."""
    few = ids[: max(2, len(ids) // 4)]
    return {
        "survey (one pass)": lambda: measure.survey(model, ids),
        "1 sink": lambda: measure.sink_profile(model, ids),
        "2 variance": lambda: measure.variance_profile(model, ids),
        "3 interventions": lambda: (measure.mask_effect(model, ids, K, progress=False),
                                    measure.lambda_sweep(model, few, K, [0.5, 4.0], [0], progress=False),
                                    origin.sink_origin(model, ids, K, progress=False)),
        "4 super neurons": lambda: (structure.wo_alignment(model, ids, [1]),
                                    structure.neuron_activity(model, ids, {1: [0, 1]})),
        "5 disparity": lambda: (structure.residual_profile(model, ids), structure.direction_lock(model, ids[:, 1:]),
                                structure.qk_locking(model, ids)),
    }


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sinkbook-tiny")
    p.add_argument("--device", default="cpu", help="where the whole model runs")
    p.add_argument("--device-map", default=None, help="'auto' or a JSON dict; default: layers alternate CPU / disk")
    p.add_argument("--max-memory", default=None, help="JSON, e.g. '{\"0\": \"8GiB\", \"cpu\": \"30GiB\"}'")
    p.add_argument("--n", type=int, default=16, help="sequences")
    p.add_argument("--length", type=int, default=128, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sinkbook-spread-") as tmp:
        model, tokenizer = models.load(args.model, device="cpu", dtype=torch.float32 if args.device == "cpu" else None)
        model.save_pretrained(Path(tmp) / "model", safe_serialization=True)  # a plain folder, as a hub model is
        tokenizer.save_pretrained(Path(tmp) / "model")
        n_layers = models.n_layers(model)
        del model
        if args.device_map is None:
            where = {f"model.layers.{l}": ("cpu", "disk")[l % 2] for l in range(n_layers)}
            device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", **where, "model.norm": "cpu",
                          "lm_head": "cpu"}
        else:
            device_map = args.device_map if args.device_map == "auto" else json.loads(args.device_map)
        max_memory = None if args.max_memory is None else {
            int(k) if k.isdigit() else k: v for k, v in json.loads(args.max_memory).items()}
        whole, _ = models.load(Path(tmp) / "model", device=args.device)
        spread, _ = models.load(Path(tmp) / "model", device_map=device_map, max_memory=max_memory,
                                offload_folder=Path(tmp) / "offload")
        placed = sorted({str(d) for d in models.placement(spread).values()})
        best = {mode: {} for mode in ("whole", "spread")}
        for repeat in range(args.repeats):  # new text each repeat: a measurement is kept per model and text
            ids = data.token_batch(tokenizer, data.python_docs(), n=args.n, length=args.length, seed=repeat)
            runs = {"whole": chapters(whole, ids), "spread": chapters(spread, ids)}
            for ch in runs["whole"]:
                for mode in runs:  # in turns
                    best[mode][ch] = min(best[mode].get(ch, float("inf")), timed(runs[mode][ch]))
    print(f"{args.model}: {n_layers} layers, {args.n} x {args.length} tokens; whole on {args.device}, spread over "
          f"{placed}; best of {args.repeats}")
    print(f"{'chapter':18s} {'whole s':>9s} {'spread s':>9s} {'ratio':>7s}")
    for ch in best["whole"]:
        w, s = best["whole"][ch], best["spread"][ch]
        print(f"{ch:18s} {w:9.3f} {s:9.3f} {s / w:7.2f}")
    w, s = sum(best["whole"].values()), sum(best["spread"].values())
    print(f"{'all':18s} {w:9.3f} {s:9.3f} {s / w:7.2f}")
    print(f"load average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other work "
          f"on the machine skews the times")


if __name__ == "__main__":
    main()
