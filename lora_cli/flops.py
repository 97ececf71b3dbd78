"""The FLOPs a LoRA training step needs: one count, for the dry-run's time estimate (plan.py) and for the MFU that
the benchmarks report (benchmarks/). It counts the work needed, not the work done: padding is never counted."""

from __future__ import annotations

import time

from lora_cli.adapters.lora import block_index

FORMULA = (
    "FLOPs per step = 4*W_blocks*T + 6*W_lora*T + 12*n_layers*d_attn*P + 4*W_head*Y, where T = useful (non-pad) "
    "tokens, Y = labelled positions, P = sum over sequences of n(n+1)/2 causal query-key pairs (n = its non-pad "
    "length); W_blocks = the blocks' frozen linear weights: 2 FLOPs forward + 2 input-gradient backward per weight "
    "and token, no weight gradient; W_lora = LoRA's A and B weights: 2 forward + 2 input-gradient + 2 "
    "weight-gradient; attention QK^T and AV: 2*d_attn FLOPs each per pair forward (d_attn = heads x head_dim), twice "
    "that backward; W_head = the output head, on labelled positions only: 2 forward + 2 input-gradient (frozen). "
    "Blocks below the lowest adapted one (adapter.layers) have no backward: their weights and attention pairs "
    "count forward only. Padding, norms, activations, softmax and RoPE are not counted. MFU = FLOPs / s / fp32 GEMM "
    "peak."
)


def frozen_linear_weights(model) -> dict:
    """The blocks' linear weights by module name: every nn.Linear but the output head and, in a peft model, LoRA's
    own A and B (they are nn.Linear too, and have a weight gradient)."""
    import torch

    head = model.get_output_embeddings()
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head and "lora_" not in name}


def constants(model) -> dict[str, int]:
    """FORMULA's constants for a model, with its LoRA adapter if it has one (W_lora is 0 without). W_below and
    n_below: the frozen weights and the blocks under the lowest adapted block, which no gradient reaches."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    lora = {name: p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    lowest = min((b for b in map(block_index, lora) if b is not None), default=0)
    frozen = frozen_linear_weights(model)
    blocks = {name: block_index(name) for name in frozen}
    below = [w for name, w in frozen.items() if blocks[name] is not None and blocks[name] < lowest]
    return {"W_blocks": sum(w.numel() for w in frozen.values()), "W_lora": sum(p.numel() for p in lora.values()),
            "W_head": model.get_output_embeddings().weight.numel(),
            "n_layers": config.num_hidden_layers, "d_attn": config.num_attention_heads * head_dim,
            "W_below": sum(w.numel() for w in below), "n_below": lowest}


def sequence_work(lengths: list[int], labels: int, padded: int) -> dict:
    """What FORMULA counts in a step (or any set) of sequences of these non-pad lengths, with `labels` labelled
    positions; `padded` (the tokens processed, padding included) rides along for the benchmarks' reports."""
    return {"tokens": sum(lengths), "trained_tokens": labels, "padded_tokens": padded,
            "pairs": sum(n * (n + 1) // 2 for n in lengths), "examples": len(lengths)}


def by_kernel(work: dict, c: dict, backward: bool = True) -> dict[str, float]:
    """FORMULA's terms, by the kernels that do them (benchmarks/mfu_ceiling.py times each); forward only (an eval)
    with backward=False."""
    frozen, lora, attention = (4, 6, 12) if backward else (2, 2, 4)
    below, blocks_below = c.get("W_below", 0), c.get("n_below", 0)  # forward only (2, and 4 per pair)
    return {"frozen GEMMs": (frozen * (c["W_blocks"] - below) + 2 * below) * work["tokens"],
            "LoRA products": lora * c["W_lora"] * work["tokens"],
            "output head": frozen * c["W_head"] * work["trained_tokens"],
            "attention": (attention * (c["n_layers"] - blocks_below) + 4 * blocks_below) * c["d_attn"] * work["pairs"]}


def total(work: dict, c: dict, backward: bool = True) -> float:
    return sum(by_kernel(work, c, backward).values())


def matmul_speed(dtype: str = "float32", device: str = "cpu", size: int = 1024, repeats: int = 8,
                 min_seconds: float = 0.3) -> float:
    """FLOP/s of a square GEMM in `dtype` (torch's name) on `device`, timed in this process: the best of at least
    `repeats`, over at least `min_seconds`, after a warm-up. This host's speed drifts, and the best is what the
    hardware can do; 8 GEMMs of 1024 take ~0.1 s, a window a slow phase could fill (a dry-run once read half the
    speed)."""
    import torch

    a, b = (torch.randn(size, size, device=device).to(getattr(torch, dtype)) for _ in range(2))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm-up: first-touch allocations, the thread pool
    best, count, began = float("inf"), 0, time.perf_counter()
    while count < repeats or time.perf_counter() - began < min_seconds:
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best, count = min(best, time.perf_counter() - start), count + 1
    return 2 * size**3 / best
