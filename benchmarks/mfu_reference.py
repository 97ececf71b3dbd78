"""Issue 9's reference point, measured: a plain peft loop at 4x256 random tokens, and lora-cli's step on the same
batches, with MFU counted exactly as benchmarks/speed.py counts it.

    python benchmarks/mfu_reference.py [--steps 12] [--warmup 2]          (or: make bench-reference)

Issue 9 asks for MFU >= 80% on the speed benchmark and cites, as where the time goes, a plain peft loop on this
model at 4x256 random tokens reaching ~78% of the fp32 matmul peak. That workload is not the benchmark's: every
sequence is 256 tokens long (the benchmark's Banking77 steps hold ~860 tokens in 16 sequences of ~54), and every
position is labelled, so the 49k-word output head, one large GEMM that runs near the peak, is a fifth of the
work; on Banking77 it runs on ~140 reply positions per step. This script runs both loops on that reference
workload, in one process, alternating step by step on the same batches so that this host's drifting speed
weighs on both alike:

    plain peft    get_peft_model(LoRA r=16 alpha=32, every linear layer), loss = model(input_ids,
                  labels=input_ids).loss (the head on every position, as a plain loop computes it), backward,
                  torch's AdamW, zero_grad
    lora-cli      a `lora train` step through the loop's own functions: its adapter (the fused LoRA layer),
                  train.accumulate_gradients (train.token_loss_sum on the labelled positions), the finiteness
                  check, train.apply_gradients (clipping, its fused AdamW); not the loop's data order, schedule
                  and logging

Both count the same FLOPs (lora_cli/flops.py's FORMULA: here every position but each row's first is labelled), over
the fp32 GEMM peak timed before and after in the same process (the higher of the two).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import (  # noqa: E402
    add_result_options,
    lora_args,
    machine_name,
    matmul_peak,
    result_file,
)

from lora_cli import flops as flop_count  # noqa: E402

BATCH, LENGTH = 4, 256  # the workload


def plain_peft_step(model, optimizer):
    """One step of the loop the issue measured: peft's forward, the loss on full logits."""

    def step(input_ids):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def lora_cli_step(model, variant, optimizer, max_grad_norm: float):
    """One step through the loop's own functions (lora_cli.train, one process, model and optimizer prepared by
    accelerate as there): gradients, the finiteness check, apply_gradients (variant hook, clipping, the
    optimizer). Not timed here: the loop's data order, schedule and logging."""
    import torch
    from accelerate import Accelerator

    from lora_cli.train import accumulate_gradients, apply_gradients, count_label_tokens, step_is_finite

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    head = accelerator.unwrap_model(model).get_output_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    steps = itertools.count(1)

    def step(input_ids):
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
        labels = count_label_tokens(batch)
        loss_total, _ = accumulate_gradients(accelerator, model, head, [batch], labels)
        if step_is_finite(accelerator, loss_total / labels, params, sharded=False):
            apply_gradients(accelerator, model, optimizer, variant, next(steps), max_grad_norm)
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per loop (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first")
    parser.add_argument("--compile", action="store_true",
                        help="lora-cli's blocks compiled, as trainer.compile=true does (its first step compiles)")
    add_result_options(parser)
    options = parser.parse_args()
    if options.steps < 1 or options.warmup < (1 if options.compile else 0):
        parser.error("--steps must be >= 1, --warmup >= 0 (>= 1 with --compile: the first step compiles)")

    import torch
    from peft import LoraConfig, get_peft_model

    from lora_cli import adapters
    from lora_cli.config import compose
    from lora_cli.models import load_model, load_tokenizer, resolve_checkpoint
    from lora_cli.train import build_optimizer, compile_blocks, keep_freed_memory

    keep_freed_memory()  # as `lora train` runs (trainer.keep_freed_memory); both loops share the process
    total = options.warmup + options.steps
    cfg = compose(lora_args("smollm2_135m", total, None))
    checkpoint = resolve_checkpoint(cfg.model)
    tokenizer = load_tokenizer(checkpoint, cfg.model)

    plain = get_peft_model(load_model(checkpoint, cfg.model, tokenizer), LoraConfig(
        r=cfg.adapter.r, lora_alpha=cfg.adapter.alpha, lora_dropout=0.0, target_modules="all-linear"))
    plain.train()
    variant = adapters.build(cfg.adapter, cfg.trainer, total)
    ours = variant.apply(load_model(checkpoint, cfg.model, tokenizer))
    ours.train()
    if options.compile and not compile_blocks(ours, torch.device("cpu")):
        sys.exit("--compile: torch.compile does not work here (see the message above)")
    optimizer, _ = build_optimizer(variant.param_groups(ours, cfg.trainer), cfg.trainer, total)
    ours_name = "lora-cli +compile" if options.compile else "lora-cli"
    loops = {"plain peft": plain_peft_step(plain, torch.optim.AdamW(
                 [p for p in plain.parameters() if p.requires_grad], lr=cfg.trainer.lr)),
             ours_name: lora_cli_step(ours, variant, optimizer, cfg.trainer.max_grad_norm)}
    weights = {name: sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
               for name, model in (("plain peft", plain), ("lora-cli", ours))}
    if len(set(weights.values())) != 1:
        sys.exit(f"the two loops adapt different weights ({weights}); the comparison would not be like for like")
    constants = flop_count.constants(ours)
    work = flop_count.sequence_work([LENGTH] * BATCH, BATCH * (LENGTH - 1), BATCH * LENGTH)
    flops = flop_count.total(work, constants)

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(tokenizer), (BATCH, LENGTH), generator=generator) for _ in range(total)]
    print(f"{BATCH}x{LENGTH} random tokens, {flops / 1e9:.1f} GFLOP per step (lora_cli.flops.FORMULA), "
          f"{options.warmup} warm-up + {options.steps} timed steps per loop, alternating; "
          f"{torch.get_num_threads()} threads", flush=True)
    peaks = [matmul_peak()]
    seconds = dict.fromkeys(loops, 0.0)
    for i, input_ids in enumerate(batches):
        for name in (list(loops) if i % 2 else list(loops)[::-1]):
            start = time.perf_counter()
            loops[name](input_ids)
            if i >= options.warmup:
                seconds[name] += time.perf_counter() - start
    peaks.append(matmul_peak())
    peak = max(peaks)

    print(f"fp32 GEMM peak before and after: {peaks[0] / 1e9:.1f}, {peaks[1] / 1e9:.1f} GFLOP/s\n")
    rows = {name: {"s_per_step": s / options.steps, "tokens_per_s": BATCH * LENGTH * options.steps / s,
                   "flops_per_s": flops * options.steps / s, "mfu": flops * options.steps / s / peak}
            for name, s in seconds.items()}
    print(f"{'loop':18s}{'s/step':>9s}{'tok/s':>9s}{'GFLOP/s':>9s}{'MFU':>8s}")
    for name, row in rows.items():
        print(f"{name:18s}{row['s_per_step']:9.3f}{row['tokens_per_s']:9.1f}{row['flops_per_s'] / 1e9:9.1f}"
              f"{row['mfu']:8.1%}")
    speedup = seconds["plain peft"] / seconds[ours_name]
    print(f"\nlora-cli / plain peft: {speedup:.2f}x the steps per second")

    machine = machine_name(options)
    path = result_file(options, "json", "mfu-reference", *(["compile"] if options.compile else []))
    path.write_text(json.dumps({
        "benchmark": "mfu-reference", "date": date.today().isoformat(), "machine": machine,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "batch": BATCH, "length": LENGTH,
        "compile": options.compile, "warmup": options.warmup, "steps": options.steps, "peaks_before_after": peaks,
        "flops_formula": flop_count.FORMULA,
        "flops_constants": constants, "flops_per_step": flops, "loops": rows, "speedup": speedup}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
