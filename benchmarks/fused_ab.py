"""Paired A/B of the fused LoRA layer (`trainer.fused_lora`) against peft's own forward, in one process.

    python benchmarks/fused_ab.py [--compile] [--steps 12]

The speed benchmark's workload (embedded SmolLM2-135M, Banking77 train in the banking_support format, LoRA r=16
on every linear layer, batch 16, fp32 CPU). One model; every step's batch is trained twice in a row, once with
the fused path and once with peft's forward (which goes first alternates), so this host's drift hits both
alike. Before timing, it checks that both paths give the same loss and gradients on one batch. Prints the
summed seconds of each and their ratio (> 1: the fused layer is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="compile the blocks first (trainer.compile)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps (each trained both ways)")
    options = parser.parse_args()

    import torch
    from speed import lora_args

    from lora_cli import adapters
    from lora_cli.adapters.fused import FusedLoraLinear
    from lora_cli.config import compose
    from lora_cli.data import micro_batches, predicted_labels, prepare, take
    from lora_cli.models import load_model, load_tokenizer, resolve_checkpoint
    from lora_cli.train import compile_blocks, compile_variants, keep_freed_memory, token_loss_sum

    keep_freed_memory()
    cfg = compose(lora_args("smollm2_135m", options.steps + 2, None))
    checkpoint = resolve_checkpoint(cfg.model)
    tokenizer = load_tokenizer(checkpoint, cfg.model)
    train_split, _, _ = prepare(cfg.dataset, tokenizer)
    model = adapters.build(cfg.adapter, cfg.trainer, options.steps).apply(
        load_model(checkpoint, cfg.model, tokenizer))
    head = model.get_output_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    steps = []
    for i in range(options.steps + 2):
        examples = take(train_split.examples, cfg.trainer.seed, i * 16, 16, True)
        steps.append((micro_batches(examples, 16, 0, 1, tokenizer.pad_token_id, None)[0],
                      sum(predicted_labels(e) for e in examples)))

    fused_forward = FusedLoraLinear._fusable_adapter
    use_fused = {"on": True}

    def switchable(layer, x, args, kwargs):
        return fused_forward(layer, x, args, kwargs) if use_fused["on"] else None

    FusedLoraLinear._fusable_adapter = switchable  # this process only: peft's forward when "off"

    with torch.no_grad():  # B starts at zero; give the check a real adapter path
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    check = {}
    for on in (False, True):
        use_fused["on"] = on
        loss = token_loss_sum(model, head, steps[0][0])
        loss.backward()
        check[on] = (loss.item(), torch.cat([p.grad.flatten() for p in params]))
        model.zero_grad(set_to_none=True)
    gap = ((check[True][1] - check[False][1]).abs().max() / check[False][1].abs().max()).item()
    print(f"check: loss {check[False][0]:.6f} (peft) vs {check[True][0]:.6f} (fused); largest gradient difference "
          f"{gap:.1e} of the largest gradient")

    if options.compile:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = 64  # both paths' graphs stay compiled side by side
        compile_blocks(model, torch.device("cpu"))
        for on in (False, True):
            use_fused["on"] = on
            compile_variants(model, head, train_split.examples, tokenizer.pad_token_id, None, torch.device("cpu"))

    optimizer = torch.optim.AdamW(params, lr=cfg.trainer.lr)
    model.train()
    seconds = {False: [], True: []}
    for i, (batch, labelled) in enumerate(steps):
        for on in ((True, False) if i % 2 else (False, True)):
            use_fused["on"] = on
            began = time.perf_counter()
            (token_loss_sum(model, head, batch) / labelled).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.trainer.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 2:  # the first two steps warm up both paths
                seconds[on].append(time.perf_counter() - began)
    ratios = [a / b for a, b in zip(seconds[False], seconds[True], strict=True)]
    mode = "compiled blocks" if options.compile else "eager"
    print(f"{mode}, {len(ratios)} steps each: peft {sum(seconds[False]):.2f} s, fused {sum(seconds[True]):.2f} s; "
          f"fused is {sum(seconds[False]) / sum(seconds[True]):.3f}x as fast (median paired ratio "
          f"{statistics.median(ratios):.3f})")


if __name__ == "__main__":
    main()
