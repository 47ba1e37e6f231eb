"""What recording costs: plain sdpa forward vs ``trace`` recording sink+entropy vs eager output_attentions.

Same model, same inputs, same process; prints time and peak-memory ratios against the plain forward.

    python benchmarks/trace_overhead.py                  # T = 512, 1024, 2048 on a 4-layer, 256-wide Llama
    python benchmarks/trace_overhead.py --lengths 4096 --batch 1

Peak memory is the forward's working set: the process's RSS high-water mark minus its RSS once the model and
inputs exist, each (mode, T) in a fresh subprocess so one mode's peak cannot hide another's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MODES = ("sdpa", "trace", "eager")


def run_one(mode: str, length: int, batch: int, repeats: int, layers: int, width: int) -> dict:
    """Runs in a child process: build the model, warm up, time ``repeats`` forwards, report peak RSS growth."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sinkutils import compat, trace

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=width, intermediate_size=width * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=width // 32, num_key_value_heads=width // 32,
                      max_position_embeddings=max(4096, length))
    model = LlamaForCausalLM(cfg).eval()
    compat.set_attention(model, "eager" if mode == "eager" else "sdpa")
    ids = torch.randint(0, 4096, (batch, length), generator=torch.Generator().manual_seed(1))

    def forward():
        with torch.no_grad():
            if mode == "trace":
                with trace.record(model, "attn.sink", "attn.entropy") as rec:
                    model(input_ids=ids, logits_to_keep=1)
                return rec["attn.sink"]
            return model(input_ids=ids, output_attentions=(mode == "eager"), logits_to_keep=1)

    before = _rss_kb()
    forward()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": min(times), "peak_kb": peak - before}


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, length = args.child[0], int(args.child[1])
        print(json.dumps(run_one(mode, length, args.batch, args.repeats, args.layers, args.width)))
        return
    print(f"model: {args.layers} layers, width {args.width}; batch {args.batch}; best of {args.repeats}")
    print(f"{'T':>6} {'mode':>6} {'time (s)':>9} {'working set (MB)':>17} {'time ratio':>11} {'memory ratio':>13}")
    for length in args.lengths:
        results = {}
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, str(length), "--batch", str(args.batch),
                   "--repeats", str(args.repeats), "--layers", str(args.layers), "--width", str(args.width)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[mode] = json.loads(out)
        base = results["sdpa"]
        for mode in MODES:
            r = results[mode]
            print(f"{length:>6} {mode:>6} {r['seconds']:>9.3f} {r['peak_kb'] / 1024:>17.0f} "
                  f"{r['seconds'] / base['seconds']:>11.2f} {r['peak_kb'] / base['peak_kb']:>13.2f}")


if __name__ == "__main__":
    main()
