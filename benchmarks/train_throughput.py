"""What a training step costs per variant: ``sinkutils.train.train_step`` (forward + backward + clipping + AdamW)
for each attention variant against a plain loop over transformers' LlamaForCausalLM with sdpa attention.

Same config, same batch, same inputs, same process; modes are timed in turns (round-robin over repeats) so
background load hits them alike, and each mode's best repeat counts. Prints tokens/s and the ratio of each
mode's step time to the plain loop's (1.00 = no overhead), by the wall clock and by this process's CPU time
(the fairer clock when other work shares the machine).

    python benchmarks/train_throughput.py                                  # 4 layers, width 256, B 4, T 128
    python benchmarks/train_throughput.py --layers 6 --width 128 --seq-len 256 --batch 16 --vocab 512 \
        --threads 1 --variants baseline                                    # the embedded models' recipe
    python benchmarks/train_throughput.py --layers 8 --width 512 --seq-len 512 --batch 16 --device cuda
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Callable

import torch

from sinkutils import train, variants


def variant_step(cfg: train.TrainConfig, vocab: int, ids: torch.Tensor) -> tuple[Callable, object]:
    """``step -> loss`` running ``train.train_step`` on a fresh model of ``cfg.variant`` (compiled as ``train``
    compiles it with ``cfg.compile``); and its config."""
    model = train.make_model(cfg, vocab).to(ids.device).train()
    opt = train.make_optimizer(model, cfg)
    net = train.compiled(model, cfg)
    return (lambda step: train.train_step(net, opt, cfg, ids, step)), model.config


def plain_step(config, cfg: train.TrainConfig, ids: torch.Tensor) -> Callable:
    """``step -> loss`` of the textbook loop on transformers' own Llama with sdpa, no sinkbook code on the path."""
    from transformers import LlamaForCausalLM

    config = config.__class__.from_dict(config.to_dict())
    config.sink_variant = "baseline"
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config).to(ids.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

    def step(_: int) -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        return loss.detach()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--variants", nargs="+", default=sorted(variants.VARIANTS), choices=sorted(variants.VARIANTS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--compiled", nargs="*", default=["baseline"], choices=sorted(variants.VARIANTS),
                   help="variants also timed with --compile true (train.compiled; the first steps compile)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = train.TrainConfig(data_dir="-", out_dir="-", n_layer=args.layers, d_model=args.width, n_head=args.heads,
                            n_kv_head=args.kv_heads, d_ff=args.width * 8 // 3, seq_len=args.seq_len,
                            batch_size=args.batch, steps=10_000, warmup=10)
    cfg.validate()
    ids = torch.randint(4, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    runners: dict[str, Callable] = {}
    for variant in args.variants:
        runners[variant], config = variant_step(dataclasses.replace(cfg, variant=variant), args.vocab, ids)
    for variant in args.compiled:
        runners[f"{variant} compiled"], _ = variant_step(dataclasses.replace(cfg, variant=variant, compile=True),
                                                         args.vocab, ids)
    runners = {"plain sdpa": plain_step(config, cfg, ids)} | runners

    def now() -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    for run in runners.values():  # warm-up: allocator, thread pools, AdamW state, compilation
        run(0), run(1)
    wall = {name: float("inf") for name in runners}
    cpu = dict(wall)  # process CPU seconds: on a shared machine the fairer clock for a CPU run
    for r in range(args.repeats):  # modes in turns, so background load hits them alike
        for name, run in runners.items():
            start, start_cpu = now(), time.process_time()
            for s in range(args.steps):
                run(2 + r * args.steps + s)
            wall[name] = min(wall[name], (now() - start) / args.steps)
            cpu[name] = min(cpu[name], (time.process_time() - start_cpu) / args.steps)
    tokens = args.batch * args.seq_len
    print(f"model: {args.layers} layers, width {args.width}, heads {args.heads}/{args.kv_heads} (q/kv), "
          f"vocab {args.vocab}; batch {args.batch} x {args.seq_len} tokens; {args.device}, "
          f"{torch.get_num_threads()} threads; best of {args.repeats} x {args.steps} steps")
    print(f"{'mode':>26} {'step (s)':>9} {'tokens/s':>10} {'time ratio':>11} {'CPU s/step':>11} {'CPU ratio':>10}")
    for name in runners:
        print(f"{name:>26} {wall[name]:>9.3f} {tokens / wall[name]:>10.0f} {wall[name] / wall['plain sdpa']:>11.2f} "
              f"{cpu[name]:>11.3f} {cpu[name] / cpu['plain sdpa']:>10.2f}")


if __name__ == "__main__":
    main()
