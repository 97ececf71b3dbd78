"""`lora train`: one training loop, read top to bottom.

setup (accelerator, base model, data, adapter, optimizer) -> evaluate -> train steps with periodic eval ->
save artifacts -> summary. `accelerate` runs it in-process on one device or, unchanged, on N processes
under `accelerate launch`; only the main process writes files or prints progress.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

from lora_cli import artifacts
from lora_cli.adapters import apply_adapter
from lora_cli.config import RunConfig, TrainerConfig
from lora_cli.data import IGNORE_INDEX, TokenizedSplit, collate, prepare
from lora_cli.models import load_model, load_tokenizer, resolve_checkpoint
from lora_cli.report import console, print_data_plan, print_summary, progress_bar


def mixed_precision(precision: str) -> str:
    """Accelerate's mixed-precision mode; bf16/fp16 need CUDA, so a CPU run falls back to fp32, saying so."""
    import torch

    if precision == "fp32":
        return "no"
    if precision == "bf16" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    if precision == "fp16" and torch.cuda.is_available():
        return "fp16"
    console.print(f"[yellow]trainer.precision={precision} needs a CUDA GPU that supports it; "
                  "training in fp32 instead[/]")
    return "no"


def token_loss_sum(model, head, batch: dict):
    """Summed next-token cross-entropy over the labelled positions of a batch.

    Not averaged: the caller divides by the labelled-token count of the whole optimizer step, so every
    token weighs the same however the step is split into micro-batches and processes. The output head
    runs only on labelled positions (with a 49k vocabulary it is a fifth of the FLOPs, and most positions
    are prompt); the model is still called as a whole, which DDP needs to sync gradients."""
    import torch
    import torch.nn.functional as F

    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True, logits_to_keep=torch.empty(0, dtype=torch.long))
    labels = batch["labels"][:, 1:]
    labelled = labels != IGNORE_INDEX
    logits = head(outputs.hidden_states[-1][:, :-1][labelled])
    return F.cross_entropy(logits.float(), labels[labelled], reduction="sum")


def count_label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def evaluate_loss(model, loader, device) -> float:
    """Token-weighted mean loss over a whole split. Each process evaluates all of it (eval sets are small),
    so the number is the same everywhere without any communication."""
    import torch

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            total += float(token_loss_sum(model, model.get_output_embeddings(), batch))
            tokens += count_label_tokens(batch)
    model.train(was_training)
    return total / tokens


def endless(loader):
    """Micro-batches across epoch boundaries; the loader's seeded generator reshuffles each epoch."""
    while True:
        yield from loader


def total_steps(trainer: TrainerConfig, batches_per_epoch: int) -> int:
    if trainer.max_steps:
        return trainer.max_steps
    return max(1, math.ceil(trainer.epochs * batches_per_epoch / trainer.grad_accum))


def build_optimizer(model, trainer: TrainerConfig, steps: int):
    import torch
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=trainer.lr, weight_decay=trainer.weight_decay)
    name = {"constant": "constant_with_warmup"}.get(trainer.schedule, trainer.schedule)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=int(trainer.warmup_ratio * steps),
                              num_training_steps=steps)
    return optimizer, scheduler


def data_loaders(train_split: TokenizedSplit, eval_split: TokenizedSplit, trainer: TrainerConfig, pad_id: int):
    import torch
    from torch.utils.data import DataLoader

    collate_fn = partial(collate, pad_id=pad_id)
    generator = torch.Generator().manual_seed(trainer.seed)
    train_loader = DataLoader(train_split.examples, batch_size=trainer.batch_size, shuffle=True,
                              generator=generator, collate_fn=collate_fn, drop_last=False)
    # Eval order does not change the mean, so batch similar lengths together: less padding to compute.
    by_length = sorted(eval_split.examples, key=lambda e: len(e["input_ids"]))
    eval_loader = DataLoader(by_length, batch_size=trainer.eval_batch_size, collate_fn=collate_fn)
    return train_loader, eval_loader


def train(cfg: RunConfig, run_dir: Path, command: str):
    """Run one training job; returns the summary numbers and the trained (unwrapped) peft model."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    started = time.perf_counter()
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.trainer.precision))
    is_main = accelerator.is_main_process
    set_seed(cfg.trainer.seed)

    # ---- setup: base model, data, adapter, optimizer
    with accelerator.main_process_first():  # one process converts/builds a cached base, the others wait
        checkpoint = resolve_checkpoint(cfg.model)
    tokenizer = load_tokenizer(checkpoint, cfg.model)
    train_split, eval_split, data_fingerprint = prepare(cfg.dataset, tokenizer)
    model = apply_adapter(load_model(checkpoint, cfg.model, tokenizer), cfg.adapter)
    trainable, total_params = model.get_nb_trainable_parameters()
    train_loader, eval_loader = data_loaders(train_split, eval_split, cfg.trainer, tokenizer.pad_token_id)
    steps = total_steps(cfg.trainer, math.ceil(len(train_loader) / accelerator.num_processes))
    optimizer, scheduler = build_optimizer(model, cfg.trainer, steps)
    # The scheduler is not prepared: accelerate would step it once per process per step.
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    head = accelerator.unwrap_model(model).get_output_embeddings()
    if is_main:
        print_data_plan(train_split, eval_split, steps, trainable, total_params)

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    metrics_file = open(metrics_path, "w") if is_main else None  # noqa: SIM115 (closed below)

    def log(record: dict) -> None:
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    # ---- train
    eval_before = evaluate_loss(accelerator.unwrap_model(model), eval_loader, accelerator.device)
    log({"step": 0, "eval_loss": eval_before})
    history = {"train_loss": [], "eval_loss": [(0, eval_before)], "tokens": 0, "train_time": 0.0}
    batches = endless(train_loader)
    model.train()
    with progress_bar(steps, disable=not is_main) as (progress, task):
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            micro_batches = [next(batches) for _ in range(cfg.trainer.grad_accum)]
            # Normalise by the labelled tokens of the whole step, summed over processes; DDP averages
            # gradients over processes, hence the factor num_processes.
            step_tokens = accelerator.reduce(
                torch.tensor(sum(count_label_tokens(b) for b in micro_batches), device=accelerator.device),
                reduction="sum").item()
            loss_sum = 0.0
            for i, batch in enumerate(micro_batches):
                # Only the last micro-batch needs the gradient all-reduce; skipping it before saves traffic.
                sync = i == len(micro_batches) - 1
                with nullcontext() if sync else accelerator.no_sync(model):
                    loss = token_loss_sum(model, head, batch)
                    accelerator.backward(loss * accelerator.num_processes / step_tokens)
                loss_sum += loss.detach()
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.trainer.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            train_loss = accelerator.reduce(loss_sum, reduction="sum").item() / step_tokens
            seen = accelerator.reduce(
                torch.tensor(sum(int(b["attention_mask"].sum()) for b in micro_batches),
                             device=accelerator.device), reduction="sum").item()
            elapsed = time.perf_counter() - t0
            history["tokens"] += seen
            history["train_time"] += elapsed
            history["train_loss"].append((step, train_loss))
            lr = scheduler.get_last_lr()[0]
            log({"step": step, "loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                 "tokens": seen, "trained_tokens": step_tokens, "tokens_per_s": seen / elapsed})
            progress.update(task, advance=1, loss=train_loss, lr=lr,
                            tps=history["tokens"] / history["train_time"])

            if step % cfg.trainer.eval_every == 0 or step == steps:
                eval_loss = evaluate_loss(accelerator.unwrap_model(model), eval_loader, accelerator.device)
                history["eval_loss"].append((step, eval_loss))
                log({"step": step, "eval_loss": eval_loss})
                progress.update(task, eval_loss=eval_loss)

    # ---- save
    result = {
        "run_dir": str(run_dir), "steps": steps, "variant": cfg.adapter.name, "r": cfg.adapter.r,
        "trainable_params": trainable, "total_params": total_params,
        "train_loss_first": history["train_loss"][0][1], "train_loss_last": history["train_loss"][-1][1],
        "eval_loss_before": eval_before, "eval_loss_after": history["eval_loss"][-1][1],
        "tokens_per_s": history["tokens"] / history["train_time"],
        "wall_time_s": time.perf_counter() - started, "peak_memory": artifacts.peak_memory(),
        "train_examples": len(train_split.examples), "eval_examples": len(eval_split.examples),
        "truncated": train_split.truncated + eval_split.truncated,
        "dropped": train_split.dropped + eval_split.dropped,
    }
    if is_main:
        metrics_file.close()
        provenance = artifacts.provenance(checkpoint, data_fingerprint, cfg)
        artifacts.write_config(run_dir, cfg)
        artifacts.save_adapter(accelerator.unwrap_model(model), tokenizer, run_dir / "adapter", provenance)
        artifacts.plot_loss(history["train_loss"], history["eval_loss"], run_dir / "loss.png")
        artifacts.write_model_card(run_dir, cfg, result, provenance, command)
        print_summary(result)
    accelerator.end_training()
    return result, accelerator.unwrap_model(model)
