"""`lora train --dry-run`: everything a run checks before it trains (config, data, model, adapter targets), then
the plan: examples, tokens, steps, trainable parameters, and estimates of peak memory and time. No weights
are loaded: the model is built on the meta device, which is enough to count parameters and match targets.
"""

from __future__ import annotations

import math
from pathlib import Path

from lora_cli import adapters, flops
from lora_cli.artifacts import resident_memory
from lora_cli.config import RunConfig
from lora_cli.data import predicted_labels, prepare
from lora_cli.models import check_positions, default_device, load_tokenizer, reading, resolve_checkpoint
from lora_cli.train import epochs_of, examples_per_step, is_eval_step, mixed_precision, precision_name, total_steps

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def meta_model(checkpoint, cfg: RunConfig):
    """The base model's architecture without its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with reading("config", checkpoint.path, cfg.model):
        config = AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.model.dtype),
                                                trust_remote_code=cfg.model.trust_remote_code)


# The share of the matmul speed that a LoRA step reaches, by the precision its linear layers compute in. Measured
# on the speed benchmark (benchmarks/speed.py, CPU): 72-76% of the fp32 GEMM peak in fp32; 48-52% of the bf16 peak
# under bf16 autocast, where LoRA's delta, the norms and the loss stay in fp32.
# fp16 (CUDA only) is not measured: taken as bf16's.
EFFICIENCY = {"fp32": 0.7, "bf16": 0.45, "fp16": 0.45}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def split_work(split) -> dict:
    """What flops.FORMULA counts in one pass over a tokenized split."""
    return flops.sequence_work([len(e["input_ids"]) for e in split.examples], split.label_tokens, split.tokens)


def estimate_memory(model, cfg: RunConfig, trainable: int, longest: int, most_labels: int, held: int) -> int:
    """`held` (on a CPU, what the process holds before any weight: Python, torch, the tokenizer and the data; 0 on
    a GPU, whose memory the estimate is of) + weights + adapter
    training state (param, grad, two AdamW moments) + activations of the longest micro-batch (a rough
    per-token, per-block count for a Llama-style block, fp32) + the output head's outputs on labelled
    positions, which are all it computes (in training or in eval, whichever holds more)."""
    from peft.tuners.lora import LoraLayer

    config = model.config
    sizes = [(p.numel(), ".layers." in name) for name, p in model.named_parameters()]
    in_blocks = sum(n for n, block in sizes if block)
    rest = sum(n for n, block in sizes if not block)
    weights = (0.5 if cfg.adapter.quantize else BYTES[cfg.model.dtype]) * in_blocks + BYTES[cfg.model.dtype] * rest
    tokens = cfg.trainer.batch_size * longest
    per_token_block = 16 * config.hidden_size + 3 * getattr(config, "intermediate_size", 4 * config.hidden_size)
    if cfg.adapter.dropout > 0:  # each adapted layer also keeps its input's dropped copy for the backward
        adapted_inputs = sum(m.in_features for m in model.modules() if isinstance(m, LoraLayer))
        per_token_block += adapted_inputs / config.num_hidden_layers
    blocks = 2 if cfg.trainer.gradient_checkpointing else config.num_hidden_layers
    activations = tokens * per_token_block * blocks * 4
    # The head's output on labelled positions: a training micro-batch holds the logits, the log-probabilities and
    # their gradient; an eval batch (often larger, no gradient) the logits and the log-probabilities.
    head = most_labels * config.vocab_size * 4 * max(3 * cfg.trainer.batch_size, 2 * cfg.trainer.eval_batch_size)
    return int(held + weights + 16 * trainable + activations + head)


def steps_done(cfg: RunConfig, run_dir: Path | None) -> int:
    """The steps a resumed run has behind it (its checkpoint's), 0 for a new run."""
    from lora_cli.checkpoint import resolve_resume, saved_state

    if cfg.resume is None or (cfg.resume == "auto" and run_dir is None):
        return 0
    found = resolve_resume(cfg.resume, run_dir or Path("."))
    return saved_state(found)["state"]["step"] if found else 0


def plan(cfg: RunConfig, run_dir: Path | None = None) -> dict:
    import torch

    # What resolving takes is left out of the estimate: on a first run it converts the embedded GGUF (or builds the
    # random model) into the cache, once, and a training process then loads the cache instead.
    before = resident_memory()
    checkpoint = resolve_checkpoint(cfg.model)
    resolving = max(0, resident_memory() - before)
    tokenizer = load_tokenizer(checkpoint, cfg.model)
    train_split, eval_split, _ = prepare(cfg.dataset, tokenizer)
    check_positions(checkpoint, cfg.model, max(train_split.longest, eval_split.longest))
    held = 0 if torch.cuda.is_available() else resident_memory() - resolving
    step_size = examples_per_step(cfg.trainer, cfg.trainer.num_processes)
    steps = total_steps(cfg.trainer, len(train_split.examples), step_size)
    model = adapters.build(cfg.adapter, cfg.trainer, steps).apply(meta_model(checkpoint, cfg))
    trainable, total = model.get_nb_trainable_parameters()
    # The count the speed benchmark measures MFU by (flops.FORMULA), over the epochs the steps take, at EFFICIENCY
    # of the matmul speed in the run's precision.
    sizes = flops.constants(model)
    done = steps_done(cfg, run_dir)  # a resumed run trains the rest, without the eval before the first step
    train_work = flops.total(split_work(train_split), sizes) * (steps - done) * step_size / len(train_split.examples)
    # Evals (one before the first step, then the loop's): forward only, and every process evaluates the whole
    # split, so they do not divide among processes.
    evals = (done == 0) + sum(is_eval_step(step, steps, cfg.trainer.eval_every) for step in range(done + 1, steps + 1))
    eval_work = evals * flops.total(split_work(eval_split), sizes, backward=False)
    precision = precision_name(mixed_precision(cfg))
    # The training device's matmul speed (the GPU if there is one) in the dtype its linear layers compute in.
    speed = EFFICIENCY[precision] * flops.matmul_speed(DTYPES[precision], default_device())
    longest = train_split.longest
    return {
        "model": checkpoint.model_id, "adapter": f"{cfg.adapter.name} r={cfg.adapter.r}",
        "precision": f"{precision} (trainer.precision={cfg.trainer.precision})",
        "train_examples": len(train_split.examples), "eval_examples": len(eval_split.examples),
        "eval_also_in_train": eval_split.also_in_train,
        "eval_columns_read": eval_split.columns_read,
        "train_tokens": train_split.tokens, "label_tokens": train_split.label_tokens,
        "truncated": train_split.truncated + eval_split.truncated,
        "dropped": train_split.dropped + eval_split.dropped, "longest": longest,
        "steps": steps, "steps_done": done, "examples_per_step": step_size,
        "epochs": epochs_of(steps, step_size, len(train_split.examples)),
        "trainable_params": trainable, "total_params": total,
        "peak_memory_of": "GPU" if torch.cuda.is_available() else "RSS",  # the run's peak_memory key it estimates
        "peak_memory_bytes": estimate_memory(model, cfg, trainable, longest, max(
            predicted_labels(e) for e in train_split.examples + eval_split.examples), held),
        "train_seconds": math.ceil(train_work / speed / cfg.trainer.num_processes),
        "evals": evals, "eval_seconds": math.ceil(eval_work / speed),
        "eval_at_end": end_of_run_eval(cfg),
    }


def end_of_run_eval(cfg: RunConfig) -> str | None:
    """trainer.eval_at_end runs `lora eval` after training: generation, twice (base model and adapter), on the
    whole eval split unless eval.max_samples caps it. Its time is not modelled; the plan says what it will do."""
    if not cfg.trainer.eval_at_end:
        return None
    examples = f"up to {cfg.eval.max_samples}" if cfg.eval.max_samples else "all (dataset caps do not apply)"
    return (f"then `lora eval` on {examples} eval examples, base model and adapter, generating up to "
            f"{cfg.eval.max_new_tokens} tokens each: not in the time estimate, often longer than training")
