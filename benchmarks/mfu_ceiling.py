"""The MFU ceiling of the speed benchmark's step on this machine: its kernels alone, timed at their real shapes.

    python benchmarks/mfu_ceiling.py [--steps 30] [--repeats 3]          (or: make bench-ceiling)

`benchmarks/speed.py` reports MFU = FLOPs needed / s / fp32 GEMM peak for whole training steps. This asks how high
that number can go with the kernels torch has here: it replays the same steps (the same 16 examples per step,
length-grouped and right-padded as `lora train` batches them) as bare kernel calls, with nothing else in between
(no norms, RoPE, SiLU, residual adds, cross-entropy, optimizer, clipping, Python or autograd), and times each class:

    frozen GEMMs    x W^T forward and g W input gradient, for every linear weight of every block (the model's own
                    weights, 30 distinct layers, so they stream from memory as in training, not from cache)
    LoRA products   per adapted linear, the rank-r products of lora_cli/adapters/fused.py: x A^T, the scaled
                    (x A^T) B^T accumulated into the output, g B, (g B)^T x, g^T (x A^T), and (g B) A accumulated
                    into the input gradient
    output head     h E^T and g E on the labelled positions only
    attention       torch's scaled_dot_product_attention forward and backward, causal, grouped-query, on the
                    step's (batch, padded length) shape, once per layer

Each class is timed per step as the best of --repeats runs, and the FLOPs are counted exactly as speed.py counts
them (lora_cli/flops.py's FORMULA). The ceiling = those FLOPs / the summed kernel time / the fp32 GEMM peak (best of 10
2048x2048 GEMMs, before and after, the higher of the two, as speed.py takes it): the MFU a step would reach if
everything that is not one of these kernels took no time at all. A real step adds that work on top, so its MFU
is below the ceiling by the share of its time spent there.
Writes benchmarks/results/<date>-<machine>-mfu-ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import (  # noqa: E402
    DATA,
    GEMM_REPEATS,
    GEMM_SIZE,
    add_result_options,
    lora_args,
    machine_name,
    matmul_peak,
    result_file,
)

from lora_cli import flops as flop_count  # noqa: E402

CLASSES = ("frozen GEMMs", "LoRA products", "output head", "attention")  # lora_cli.flops.by_kernel's keys


def best_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-touch allocations, thread pool
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def frozen_gemms(weights: list, tokens: int):
    """Forward through every weight in order, then the input gradients in reverse, as a step meets them."""
    import torch

    inputs = {w.shape[1]: torch.randn(tokens, w.shape[1]) for w in weights}
    grads = {w.shape[0]: torch.randn(tokens, w.shape[0]) for w in weights}

    def run():
        for w in weights:
            inputs[w.shape[1]] @ w.t()
        for w in reversed(weights):
            grads[w.shape[0]] @ w
    return run


def lora_products(weights: list, rank: int, scaling: float, tokens: int):
    """fused.py's rank-r products for one adapter per weight (random A and B of that weight's shape)."""
    import torch

    factors = [(torch.randn(rank, w.shape[1]), torch.randn(w.shape[0], rank)) for w in weights]
    inputs = {w.shape[1]: torch.randn(tokens, w.shape[1]) for w in weights}
    outputs = {w.shape[0]: torch.randn(tokens, w.shape[0]) for w in weights}  # stand in for x W^T and g W
    input_grads = {w.shape[1]: torch.randn(tokens, w.shape[1]) for w in weights}

    def run():
        downs = []
        for a, b in factors:
            x = inputs[a.shape[1]]
            downs.append(x @ a.t())
            outputs[b.shape[0]].addmm_(downs[-1], b.t(), alpha=scaling)
        for (a, b), down in zip(reversed(factors), reversed(downs), strict=True):
            g, x = outputs[b.shape[0]], inputs[a.shape[1]]
            g_down = (g @ b).mul_(scaling)
            g_down.t() @ x
            (g.t() @ down).mul_(scaling)
            input_grads[a.shape[1]].addmm_(g_down, a)
    return run


def output_head(head_weight, labelled: int):
    import torch

    hidden = torch.randn(labelled, head_weight.shape[1])
    grad = torch.randn(labelled, head_weight.shape[0])

    def run():
        hidden @ head_weight.t()
        grad @ head_weight
    return run


def attention(config, batch: int, length: int):
    """One layer's SDPA forward and backward per block; the model's heads, key-value heads and head size."""
    import torch
    import torch.nn.functional as F

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    q = torch.randn(batch, config.num_attention_heads, length, head_dim, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, length, head_dim, requires_grad=True) for _ in range(2))
    grad = torch.randn(batch, config.num_attention_heads, length, head_dim)
    gqa = kv_heads != config.num_attention_heads

    def run():
        for _ in range(config.num_hidden_layers):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            q.grad = k.grad = v.grad = None
            out.backward(grad)
    return run


def replayed_steps(cfg, tokenizer, steps: range) -> list[dict]:
    """The benchmark's steps as `lora train` batches them: sizes, labelled positions, causal pairs."""
    from lora_cli.data import micro_batches, predicted_labels, prepare, take

    train_split, _, _ = prepare(cfg.dataset, tokenizer)
    size = cfg.trainer.batch_size
    out = []
    for step in steps:
        examples = take(train_split.examples, cfg.trainer.seed, (step - 1) * size, size, cfg.trainer.group_by_length)
        (batch,) = micro_batches(examples, size, 0, 1, tokenizer.pad_token_id)
        labels = sum(predicted_labels(e) for e in examples)
        stats = flop_count.sequence_work([len(e["input_ids"]) for e in examples], labels, batch["input_ids"].numel())
        out.append({"step": step, **stats, "shape": list(batch["input_ids"].shape)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="replay this many of speed.py's timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="speed.py's untimed steps, skipped here too")
    parser.add_argument("--repeats", type=int, default=3, help="time each kernel class this many times per step")
    add_result_options(parser)
    options = parser.parse_args()
    if options.steps < 1 or options.repeats < 1 or options.warmup < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    if not DATA.is_dir():
        sys.exit(f"Banking77 is not at {DATA}; the benchmark replays steps of its train split")

    import torch

    from lora_cli.config import compose
    from lora_cli.models import load_model, load_tokenizer, resolve_checkpoint
    from lora_cli.train import keep_freed_memory

    keep_freed_memory()  # as `lora train` runs (trainer.keep_freed_memory)
    total = options.warmup + options.steps
    cfg = compose(lora_args("smollm2_135m", total, None))
    checkpoint = resolve_checkpoint(cfg.model)
    tokenizer = load_tokenizer(checkpoint, cfg.model)
    model = load_model(checkpoint, cfg.model, tokenizer)
    head = model.get_output_embeddings()
    weights = [w.detach() for w in flop_count.frozen_linear_weights(model).values()]
    rank, scaling = cfg.adapter.r, cfg.adapter.alpha / cfg.adapter.r
    config = model.config
    constants = flop_count.constants(model) | {"W_lora": sum(rank * (w.shape[0] + w.shape[1]) for w in weights)}
    steps = replayed_steps(cfg, tokenizer, range(options.warmup + 1, total + 1))

    print(f"replaying {len(steps)} steps of the speed benchmark as bare kernels ({torch.get_num_threads()} threads, "
          f"best of {options.repeats} per class and step)", flush=True)
    peaks = [matmul_peak()]
    seconds = dict.fromkeys(CLASSES, 0.0)
    flops = dict.fromkeys(CLASSES, 0)
    with torch.no_grad():
        for step in steps:
            runs = {"frozen GEMMs": frozen_gemms(weights, step["tokens"]),
                    "LoRA products": lora_products(weights, rank, scaling, step["tokens"]),
                    "output head": output_head(head.weight.detach(), step["trained_tokens"])}
            for name, run in runs.items():
                seconds[name] += best_seconds(run, options.repeats)
            for name, count in flop_count.by_kernel(step, constants).items():
                flops[name] += count
    with torch.enable_grad():
        for step in steps:
            seconds["attention"] += best_seconds(attention(config, *step["shape"]), options.repeats)
    peaks.append(matmul_peak())
    peak = max(peaks)

    total_seconds, total_flops = sum(seconds.values()), sum(flops.values())
    ceiling = total_flops / total_seconds / peak
    rows = {name: {"gflop_per_step": flops[name] / len(steps) / 1e9, "s_per_step": seconds[name] / len(steps),
                   "gflops_per_s": flops[name] / seconds[name] / 1e9, "of_peak": flops[name] / seconds[name] / peak,
                   "share_of_time": seconds[name] / total_seconds} for name in CLASSES}
    print(f"fp32 GEMM peak ({GEMM_SIZE}x{GEMM_SIZE}, best of {GEMM_REPEATS}) before and after: "
          f"{peaks[0] / 1e9:.1f}, {peaks[1] / 1e9:.1f} GFLOP/s (the higher is the peak)\n")
    print(f"{'kernel class':16s}{'GFLOP/step':>12s}{'s/step':>9s}{'GFLOP/s':>9s}{'of peak':>9s}{'of time':>9s}")
    for name, row in rows.items():
        print(f"{name:16s}{row['gflop_per_step']:12.1f}{row['s_per_step']:9.3f}{row['gflops_per_s']:9.1f}"
              f"{row['of_peak']:9.1%}{row['share_of_time']:9.1%}")
    print(f"{'all kernels':16s}{total_flops / len(steps) / 1e9:12.1f}{total_seconds / len(steps):9.3f}"
          f"{total_flops / total_seconds / 1e9:9.1f}{ceiling:9.1%}")
    print(f"\nMFU ceiling: {ceiling:.1%} (the MFU of a step that ran only these kernels). Everything else a step does "
          f"adds time: at {total_seconds / len(steps):.3f} s/step of kernels, 80% MFU needs whole steps within "
          f"{total_flops / len(steps) / (0.8 * peak):.3f} s.")

    machine = machine_name(options)
    path = result_file(options, "json", "mfu-ceiling")
    path.write_text(json.dumps({
        "benchmark": "mfu-ceiling", "date": date.today().isoformat(), "machine": machine,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "repeats": options.repeats,
        "steps": [s["step"] for s in steps], "peaks_before_after": peaks, "flops_formula": flop_count.FORMULA,
        "flops_constants": constants, "classes": rows, "kernel_s_per_step": total_seconds / len(steps),
        "flops_per_step": total_flops / len(steps), "mfu_ceiling": ceiling}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
