"""`lora train`: one training loop, read top to bottom.

setup (accelerator, base model, data, adapter variant, optimizer, resume) -> evaluate -> optimizer steps with
periodic eval and checkpoints -> save artifacts -> summary. `accelerate` runs it in-process on one device
or, unchanged, on N processes under `accelerate launch`; only the main process writes files or prints.

One optimizer step: micro-batches (forward, backward) -> non-finite check -> variant.before_clip ->
clip -> optimizer.step -> scheduler.step -> variant.after_step -> log -> eval / checkpoint when due.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

from lora_cli import adapters, artifacts, checkpoint, launched, rundir
from lora_cli.checkpoint import TrainState
from lora_cli.config import RunConfig, TrainerConfig
from lora_cli.data import IGNORE_INDEX, TokenizedSplit, collate, micro_batches, predicted_labels, prepare, take
from lora_cli.errors import Interrupted, UserError, first_line
from lora_cli.metrics import MetricsLog
from lora_cli.models import attention_in_fp32, check_positions, load_model, load_tokenizer, resolve_checkpoint
from lora_cli.report import console, print_data_plan, print_summary, progress_bar


def mixed_precision(cfg: RunConfig) -> str:
    """Accelerate's mixed-precision mode for trainer.precision: bf16 autocast on a CUDA GPU with bf16 or a CPU with
    bf16 matmul instructions, fp16 on CUDA only; elsewhere fp32, saying so. `auto` takes bf16 where
    `auto_takes_bf16` holds, fp32 otherwise, without a message (the summary and run.json say which)."""
    import torch

    precision = cfg.trainer.precision
    if precision == "auto":
        return "bf16" if auto_takes_bf16(cfg) else "no"
    if precision == "fp32":
        return "no"
    if precision == "bf16" and device_has_bf16():
        return "bf16"
    if precision == "fp16" and torch.cuda.is_available():
        return "fp16"
    needs = "a CUDA GPU" if precision == "fp16" else "a CUDA GPU or a CPU with bf16 instructions (AVX512-BF16, AMX)"
    console.print(f"[yellow]trainer.precision={precision} needs {needs}; training in fp32 instead[/]")
    return "no"


def precision_name(mode: str) -> str:
    """What trained, in trainer.precision's words, from accelerate's mixed-precision mode."""
    return {"no": "fp32"}.get(mode, mode)


def auto_takes_bf16(cfg: RunConfig) -> bool:
    """Whether trainer.precision=auto trains in bf16: only where bf16 has been measured to train like fp32, and
    faster. That is plain LoRA on an fp32 base through the fused layer, whose delta stays fp32 (adapters/fused.py),
    on a device that multiplies bf16 natively: on the speed benchmark, steps 1.45-1.57x faster than fp32's, eval
    losses within 0.04% of fp32's on three seeds. Every other layer goes through peft's forward, whose bf16
    output swallows the LoRA delta while it is small (the loss ran 5-11% behind fp32's): S-LoRA (its learnable
    scale), ScaLoRA, DoRA, 4-bit bases, trainer.fused_lora=false, and sharded parameters (FSDP, ZeRO-3); the
    DeepSpeed and custom launchers are not measured. Those train in fp32 unless trainer.precision=bf16 asks for
    bf16."""
    adapter, trainer = cfg.adapter, cfg.trainer
    fused = (adapter.name == "lora" and adapter.quantize is None and not adapter.use_dora and trainer.fused_lora
             and trainer.launcher in (None, "ddp"))
    return fused and cfg.model.dtype == "float32" and device_has_bf16()


def device_has_bf16() -> bool:
    """Whether the device training runs on (CUDA if there is one, else the CPU) computes bf16 natively."""
    import torch

    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_bf16()


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively. Elsewhere oneDNN emulates bf16 matmuls, slower than fp32 ones;
    with AVX512-BF16 they run at ~2.1x the fp32 GEMM rate (an AMD EPYC with 2 cores: 420 vs 200 GFLOP/s)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def keep_freed_memory() -> bool:
    """Have glibc keep the memory a step frees for the next step, instead of handing it back to the OS.

    A CPU step frees and reallocates the same activation buffers (megabytes each) every time. By default glibc
    trims them back to the OS and the next step page-faults fresh zeroed pages in: ~1.5M page faults in 25 steps
    of the 135M model. Raising the trim and mmap thresholds (mallopt, as MALLOC_TRIM_THRESHOLD_ etc. would at
    start-up) cut them by a third and made steps ~10% faster here. Peak memory is unchanged: what is kept is
    what the step needs anyway. False, doing nothing, where the C library has no mallopt (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    trim_threshold, top_pad, mmap_threshold = -1, -2, -3  # M_* parameter numbers of <malloc.h>
    settings = ((trim_threshold, 2**31 - 1), (top_pad, 2**30), (mmap_threshold, 32 * 2**20))  # 32 MiB: its max
    return all(mallopt(param, value) == 1 for param, value in settings)


def compile_failure(device) -> str | None:
    """Why torch.compile cannot run here (no C++ compiler, no triton), or None where it can: a tiny graph that
    fails fast, before training."""
    import torch

    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=device))
    except Exception as exc:  # noqa: BLE001 (any failure means: train eagerly)
        return first_line(exc, 160)
    return None


def compile_blocks(model, device) -> int:
    """torch.compile every transformer block (`nn.Module.compile`); returns how many blocks.

    Eager PyTorch runs each elementwise op of a block (RMSNorm, RoPE, SiLU * up, LoRA's scale-and-add, the
    residual adds) as a separate pass over memory; compiled, they fuse into a few kernels, while the GEMMs
    stay the same library calls, so the numbers change only by rounding (tests/test_exactness.py). Blocks,
    not the whole model: one block's graph serves every block, whatever the depth. Dynamic shapes, so that
    every batch length reuses one graph; the few variants that remain (the first block, whose input needs no
    gradient; batches without padding, which need no mask; eval, without gradients) are compiled before
    training by `compile_variants`. Each block is one graph: the loss reads the final hidden states without
    `output_hidden_states` (see `final_hidden_states`). Nothing is compiled, with a message, where
    torch.compile does not work (no C++ compiler, no triton)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    reason = compile_failure(device)
    if reason is not None:
        console.print(f"[yellow]trainer.compile=true: torch.compile does not work here ({reason}); training "
                      "without it[/]")
        return 0
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        console.print("[yellow]trainer.compile=true: this model has no transformer blocks that transformers marks "
                      "as layers (GradientCheckpointingLayer); training without compiling[/]")
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def compile_variants(model, head, examples: list[dict], pad_id: int, pack_width: int | None, device) -> None:
    """Run each variant of the compiled blocks that training and eval will meet once, on real examples, so
    that they compile now rather than in the middle of some later step: with and without padding, with and
    without gradients. Leaves no trace: gradients are dropped and the random generators restored."""
    import torch

    short, long = min(examples, key=lambda e: len(e["input_ids"])), max(examples, key=lambda e: len(e["input_ids"]))
    batches = [micro_batches(pair, 2, 0, 1, pad_id, pack_width)[0] for pair in ([short, long], [long, long])]
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.train()
        for batch in batches:
            token_loss_sum(model, head, {k: v.to(device) for k, v in batch.items()}).backward()
        model.zero_grad(set_to_none=True)
        evaluate_loss(model, batches, device, head)
    model.train(was_training)


def token_loss_sum(model, head, batch: dict):
    """Summed next-token cross-entropy over the labelled positions of a batch.

    Not averaged: the caller divides by the labelled-token count of the whole optimizer step, so every
    token weighs the same however the step is split into micro-batches and processes. The output head
    runs only on labelled positions (with a 49k vocabulary it is a fifth of the FLOPs, and most positions
    are prompt); the model is still called as a whole, which DDP needs to sync gradients.

    `head=None` when parameters are sharded (FSDP, ZeRO-3): the head's weights exist whole only inside the
    wrapped model's forward, so the model computes the logits there, at the positions labelled in any row."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"][:, 1:]
    labelled = labels != IGNORE_INDEX
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}  # see data.pack
    if head is None:
        keep = labelled.any(0).nonzero().squeeze(1)
        outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
        logits = outputs.logits[labelled[:, keep]]
    else:
        logits = head(final_hidden_states(model, inputs)[:, :-1][labelled])
    # At least fp32 for the softmax (bf16/fp16 logits are upcast; fp64 ones, as in the exactness tests, stay).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels[labelled], reduction="sum")


def final_hidden_states(model, inputs: dict):
    """What the output head reads (the decoder's last hidden states), from one call of the whole model.

    Caught by a forward hook on the decoder, not asked for with `output_hidden_states=True`: that flag makes
    transformers install its output-capturing hooks in every block, and their ContextVar lookups, which dynamo
    cannot trace, split each compiled block into several graphs (`trainer.compile` steps ~4% slower). The
    head itself runs on no position here (`logits_to_keep` is empty)."""
    import torch
    from accelerate.utils import extract_model_from_parallel

    decoder = extract_model_from_parallel(model).get_decoder()
    captured = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(**inputs, use_cache=False, logits_to_keep=torch.empty(0, dtype=torch.long))
    finally:
        handle.remove()
    return captured[0]


def count_label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def evaluate_loss(model, loader, device, head) -> float:
    """Token-weighted mean loss over a whole split. Each process evaluates all of it (eval sets are small),
    so the number is the same everywhere without any communication. `model` and `head` as for
    `token_loss_sum` (under FSDP the prepared model, whose forward gathers the shards)."""
    import torch

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            total += float(token_loss_sum(model, head, batch))
            tokens += count_label_tokens(batch)
    model.train(was_training)
    return total / tokens


def is_eval_step(step: int, steps: int, eval_every: int) -> bool:
    """Whether the loop evaluates after this step (it also evaluates once before the first)."""
    return step % eval_every == 0 or step == steps


def examples_per_step(trainer: TrainerConfig, processes: int) -> int:
    """One optimizer step's examples: micro-batches of batch_size, grad_accum of them, on every process."""
    return trainer.batch_size * trainer.grad_accum * processes


def total_steps(trainer: TrainerConfig, examples: int, step_size: int) -> int:
    if trainer.max_steps:
        return trainer.max_steps
    return max(1, math.ceil(trainer.epochs * examples / step_size))


def epochs_of(steps: int, step_size: int, examples: int) -> float:
    """Passes over the train split that `steps` make: worth showing, since max_steps (or a step larger than the
    split) can repeat every example many times over."""
    return round(steps * step_size / examples, 2)


def build_optimizer(param_groups: list[dict], trainer: TrainerConfig, steps: int):
    """AdamW and its learning-rate schedule. AdamW is fused (one kernel per tensor instead of a dozen passes)
    wherever every parameter allows it: for the 420 LoRA tensors of the 135M model on this CPU, optimizer step
    and clipping took 11 ms instead of 24. Same update, up to rounding."""
    import torch
    from transformers import get_scheduler

    params = [p for group in param_groups for p in group["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(param_groups, lr=trainer.lr, weight_decay=trainer.weight_decay, fused=fused)
    name = {"constant": "constant_with_warmup"}.get(trainer.schedule, trainer.schedule)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=int(trainer.warmup_ratio * steps),
                              num_training_steps=steps)
    return optimizer, scheduler


def eval_batches(split: TokenizedSplit, batch_size: int, pad_id: int) -> list[dict]:
    """Eval order does not change the mean, so similar lengths are batched together: less padding."""
    by_length = sorted(split.examples, key=lambda e: len(e["input_ids"]))
    return [collate(by_length[i:i + batch_size], pad_id) for i in range(0, len(by_length), batch_size)]


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in backward. Non-reentrant checkpointing needs no input grads, so
    it works with a frozen embedding layer."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def grads_finite(params) -> bool:
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True


def step_is_finite(accelerator, loss: float, params, sharded: bool) -> bool:
    """Whether this step's loss and gradients are finite. With sharded parameters each process sees only its
    shard of the gradients, so the processes agree on the answer: one skipping or stopping alone would leave
    the others waiting in the next collective."""
    import torch

    finite = math.isfinite(loss) and grads_finite(params)
    if not sharded:
        return finite
    votes = accelerator.reduce(torch.tensor(int(finite), device=accelerator.device), reduction="sum")
    return int(votes.item()) == accelerator.num_processes


def fit_plugins(accelerator, model, trainer: TrainerConfig) -> None:
    """Settings of FSDP / DeepSpeed that only the loop knows, set before `prepare`.

    FSDP: peft's wrap policy gives each LoRA matrix its own unit (besides the transformer blocks), so the
    frozen shards need no gradient. DeepSpeed: its engine steps inside `accelerator.backward`, so it gets one
    micro-batch of trainer.batch_size per process per step (grad_accum=1 is checked before launch) and the
    loop's clipping threshold."""
    kind = accelerator.distributed_type.value
    if kind == "FSDP":
        from peft.utils.other import fsdp_auto_wrap_policy

        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    elif kind == "DEEPSPEED":
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=trainer.batch_size, gradient_accumulation_steps=1,
            gradient_clipping=trainer.max_grad_norm)


def gathered_adapter_state(accelerator, model) -> dict | None:
    """The adapter's tensors gathered whole from every process, when parameters are sharded over them (FSDP,
    DeepSpeed ZeRO-3): a collective, so every process calls it; the main process gets the tensors, the others
    an empty dict. None when every process holds the whole adapter (peft then reads the model itself)."""
    if not launched.shards_parameters(accelerator):
        return None
    state = accelerator.get_state_dict(model) or {}
    return {name: tensor for name, tensor in state.items() if "lora_" in name}


def accumulate_gradients(accelerator, model, head, batches: list[dict], step_tokens: int) -> tuple[float, int]:
    """Forward and backward over this process's micro-batches of one step; returns the step's summed loss
    and the tokens the model processed (padding included), both summed over processes.

    Each micro-batch's summed loss is divided by the labelled tokens of the whole step over all processes,
    so every token weighs the same however the step is split; DDP averages gradients over processes, hence
    the factor num_processes. Only the last micro-batch needs the gradient all-reduce."""
    import torch

    world = accelerator.num_processes
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model):
            loss = token_loss_sum(model, head, batch)
            accelerator.backward(loss * world / step_tokens)
        loss_sum += loss.detach()
    padded = torch.tensor(float(sum(b["input_ids"].numel() for b in batches)), device=accelerator.device)
    loss_total, padded_total = accelerator.reduce(torch.stack([loss_sum, padded]), reduction="sum").tolist()
    return loss_total, int(padded_total)


def apply_gradients(accelerator, model, optimizer, variant, step: int, max_grad_norm: float) -> dict:
    """A step's finite gradients into the weights: variant.before_clip -> clip -> optimizer.step (the prepared
    model and optimizer). Returns what to log for the step."""
    record = variant.before_clip(accelerator.unwrap_model(model), optimizer.optimizer, step)
    # All the prepared model's parameters: that is how accelerate recognises an FSDP model and clips by the norm
    # over every shard (frozen ones have no gradient; DeepSpeed clips in its engine).
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return record | ({"grad_norm": float(grad_norm)} if grad_norm is not None else {})


class StopRequest:
    """Ctrl-C / SIGTERM during training ask for a checkpoint at the end of the current step; a second Ctrl-C
    stops at once. Processes agree on the request, so all of them stop after the same step."""

    def __init__(self):
        self.requested = False

    @contextmanager
    def installed(self):
        import signal

        def handle(signum, frame):
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def agreed(self, accelerator) -> bool:
        import torch

        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(int(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())


def make_accelerator(cfg: RunConfig):
    """This run's accelerator: its precision, its processes, and the checks that hold however it was launched
    (`lora train` or `accelerate launch` by hand)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    launched.check_gpus(launched.processes_on_this_machine(), "this launch")
    # accelerate keeps one state per process and refuses a second precision in it, but a sweep
    # (`lora train -m trainer.precision=fp32,bf16`) runs its jobs in one process: each run starts from a fresh
    # state (the process group, if any, is kept).
    AcceleratorState._reset_state()
    # cpu=True on a CPU-only machine: under a launcher, that is what makes accelerate use gloo for N processes.
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg), cpu=not torch.cuda.is_available())
    launched.check_supported(cfg, accelerator.distributed_type.value)
    return accelerator


def compile_now(model, head, examples: list[dict], pad_id: int, pack_width: int | None, device,
                show_status: bool) -> float:
    """Compile every shape the steps will meet before the first one, so that step times (and the progress bar's
    tokens/s) measure training; returns the seconds it took."""
    message = "trainer.compile: compiling the transformer blocks (a minute or so on a CPU)"
    with console.status(message) if show_status else nullcontext():
        began = time.perf_counter()
        compile_variants(model, head, examples, pad_id, pack_width, device)
        return time.perf_counter() - began


def check_trained_eval_finite(records: list[dict], steps: int, run_dir: Path) -> None:
    """trainer.on_nonfinite=skip can train on into an adapter that is all NaN: it is not saved as if it were one."""
    last_eval = [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    if not math.isfinite(last_eval):
        skipped = sum(1 for r in records if "skipped" in r)
        raise UserError(f"the adapter trained gives a non-finite eval loss ({skipped} of {steps} steps were skipped "
                        f"as non-finite); no adapter was saved; lower trainer.lr (checkpoints, if any, are in "
                        f"{run_dir / rundir.FOLDER})")


def train(cfg: RunConfig, run_dir: Path, command: str):
    """Run one training job; returns the summary numbers and the trained (unwrapped) peft model."""
    from accelerate.utils import gather_object, set_seed

    from lora_cli.artifacts import config_yaml

    started = time.perf_counter()
    accelerator = make_accelerator(cfg)
    artifacts.reset_peak_memory()
    if cfg.trainer.keep_freed_memory:
        keep_freed_memory()
    is_main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    sharded = launched.shards_parameters(accelerator)
    set_seed(cfg.trainer.seed)
    resume_from = checkpoint.resolve_resume(cfg.resume, run_dir)
    if resume_from:
        checkpoint.check_same_run(resume_from, config_yaml(cfg))

    # ---- setup: base model, data, adapter, optimizer
    base = resolve_checkpoint(cfg.model)  # under a lock: one process builds a missing cache entry
    tokenizer = load_tokenizer(base, cfg.model)
    train_split, eval_split, data_fingerprint = prepare(cfg.dataset, tokenizer)
    if resume_from:
        checkpoint.check_same_data(resume_from, data_fingerprint)
    check_positions(base, cfg.model, max(train_split.longest, eval_split.longest))
    step_size = examples_per_step(cfg.trainer, world)
    steps = total_steps(cfg.trainer, len(train_split.examples), step_size)
    # Sharded parameters are gathered by hooks on the modules whose forward runs; the fused LoRA layer reads
    # its sub-layers' weights directly, so it stays with peft's forward there.
    variant = adapters.build(cfg.adapter, replace(cfg.trainer, fused_lora=cfg.trainer.fused_lora and not sharded),
                             steps)
    # Sharded 4-bit weights are stored in the model's dtype: FSDP / ZeRO-3 shard float tensors of one dtype.
    model = variant.apply(load_model(base, cfg.model, tokenizer, cfg.adapter.quantize, cfg.adapter.double_quant,
                                     accelerator.device, quant_storage=cfg.model.dtype if sharded else None))
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu":
        attention_in_fp32(model.get_base_model())
    if cfg.trainer.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    compiled = cfg.trainer.compile and compile_blocks(model, accelerator.device)
    trainable, total_params = model.get_nb_trainable_parameters()
    optimizer, scheduler = build_optimizer(variant.param_groups(model, cfg.trainer), cfg.trainer, steps)
    state, records = TrainState(data_fingerprint=data_fingerprint), []
    if resume_from:
        state, records = checkpoint.restore(resume_from, model, variant, optimizer, scheduler)
    fit_plugins(accelerator, model, cfg.trainer)
    # The scheduler is not prepared: accelerate would step it once per process per step.
    model, optimizer = accelerator.prepare(model, optimizer)
    peft_model, torch_optimizer = accelerator.unwrap_model(model), optimizer.optimizer
    head = None if sharded else peft_model.get_output_embeddings()
    evaluation = eval_batches(eval_split, cfg.trainer.eval_batch_size, tokenizer.pad_token_id)
    compile_seconds = None
    if compiled:
        compile_seconds = compile_now(model, head, train_split.examples, tokenizer.pad_token_id,
                                      cfg.dataset.max_seq_len if cfg.trainer.packing else None, accelerator.device,
                                      is_main)
        if is_main:
            console.print(f"trainer.compile: {compiled} transformer blocks compiled in {compile_seconds:.0f} s")
    if is_main:
        print_data_plan(train_split, eval_split, steps, step_size,
                        epochs_of(steps, step_size, len(train_split.examples)), trainable, total_params)
        if resume_from:
            console.print(f"resuming from {resume_from} (step {state.step} of {steps})")

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(run_dir / "metrics.jsonl", records, enabled=is_main)

    def save_checkpoint() -> Path:
        if accelerator.distributed_type.value in launched.SHARDING_TYPES:  # save_every was refused; a signal
            raise UserError(f"stopped after step {state.step} without a checkpoint: checkpoints are not supported "
                            f"under {accelerator.distributed_type.value}")
        path = rundir.step_dir(run_dir, state.step)
        rng = gather_object([checkpoint.rng_state()]) if world > 1 else [checkpoint.rng_state()]
        if is_main:
            checkpoint.save(path, peft_model, variant, torch_optimizer, scheduler, state, metrics.records,
                            config_yaml(cfg), cfg.trainer.keep_checkpoints, rng)
        accelerator.wait_for_everyone()
        return path

    # ---- train
    if state.step == 0:
        metrics.log({"step": 0, "eval_loss": evaluate_loss(model, evaluation, accelerator.device, head)})
    if resume_from:
        checkpoint.restore_rng(resume_from, rank)  # last, so nothing above consumes the restored generators
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    stop = StopRequest()
    evals = metrics.series("eval_loss")  # the step-0 eval's, or a resumed run's last, shown from the start
    bar = progress_bar(steps, completed=state.step, disable=not is_main, eval_loss=evals[-1][1] if evals else math.nan)
    with bar as (progress, task), stop.installed():
        for step in range(state.step + 1, steps + 1):
            t0 = time.perf_counter()
            step_examples = take(train_split.examples, cfg.trainer.seed, state.consumed, step_size,
                                 cfg.trainer.group_by_length)
            batches = micro_batches(step_examples, cfg.trainer.batch_size, rank, world, tokenizer.pad_token_id,
                                    cfg.dataset.max_seq_len if cfg.trainer.packing else None)
            step_tokens = sum(predicted_labels(e) for e in step_examples)
            loss_total, padded = accumulate_gradients(accelerator, model, head, batches, step_tokens)
            train_loss = loss_total / step_tokens
            state.step, state.consumed = step, state.consumed + step_size
            record = {"step": step}
            if step_is_finite(accelerator, train_loss, params, sharded):
                record |= apply_gradients(accelerator, model, optimizer, variant, step, cfg.trainer.max_grad_norm)
            elif cfg.trainer.on_nonfinite == "stop":
                raise UserError(f"non-finite loss or gradients at step {step} (loss {train_loss}); the last good "
                                f"checkpoint, if any, is in {run_dir / rundir.FOLDER}; lower trainer.lr, "
                                "or set trainer.on_nonfinite=skip to drop such steps")
            else:
                record |= {"skipped": "non-finite"}
            lr = scheduler.get_last_lr()[0]  # the rate this step's update used, before the schedule moves on
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record |= variant.after_step(peft_model)

            seen = sum(len(e["input_ids"]) for e in step_examples)
            elapsed = time.perf_counter() - t0
            state.tokens, state.train_time = state.tokens + seen, state.train_time + elapsed
            metrics.log({"step": step, "loss": train_loss, "lr": lr, **record, "tokens": seen,
                         "trained_tokens": step_tokens, "padded_tokens": padded, "tokens_per_s": seen / elapsed})
            progress.update(task, advance=1, loss=train_loss, lr=lr, tps=state.tokens / state.train_time)

            if is_eval_step(step, steps, cfg.trainer.eval_every):
                eval_loss = evaluate_loss(model, evaluation, accelerator.device, head)
                metrics.log({"step": step, "eval_loss": eval_loss})
                progress.update(task, eval_loss=eval_loss)
            if stop.agreed(accelerator):
                raise Interrupted(step, save_checkpoint())
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step < steps:
                save_checkpoint()

    # ---- save
    check_trained_eval_finite(metrics.records, steps, run_dir)
    train_loss, eval_loss = metrics.series("loss"), metrics.series("eval_loss")
    result = {
        "run_dir": str(run_dir), "steps": steps, "variant": cfg.adapter.name, "r": cfg.adapter.r,
        "trainable_params": trainable, "total_params": total_params,
        "train_loss_first": train_loss[0][1], "train_loss_last": train_loss[-1][1],
        "eval_loss_before": eval_loss[0][1], "eval_loss_after": eval_loss[-1][1],
        "tokens_per_s": state.tokens / state.train_time, "compile_s": compile_seconds,
        "precision": precision_name(accelerator.mixed_precision),
        "wall_time_s": time.perf_counter() - started, "peak_memory": artifacts.peak_memory(),
        "train_examples": len(train_split.examples), "eval_examples": len(eval_split.examples),
        "truncated": train_split.truncated + eval_split.truncated,
        "dropped": train_split.dropped + eval_split.dropped,
    }
    # A stop while these files are written would leave an adapter without its card: neither a finished run nor one
    # that resumes. The first Ctrl-C / SIGTERM waits for them (a second one stops at once).
    finishing = StopRequest()
    with finishing.installed():
        adapter_state = gathered_adapter_state(accelerator, model)  # every process takes part in the gather
        if is_main:
            metrics.close()
            provenance = artifacts.provenance(base, data_fingerprint, cfg, train_split.system_prompt)
            artifacts.write_config(run_dir, cfg)
            artifacts.save_adapter(variant, peft_model, tokenizer, run_dir / "adapter", provenance, adapter_state)
            artifacts.plot_loss(train_loss, eval_loss, run_dir / "loss.png")
            variant.finish(peft_model, run_dir, metrics.records)
            artifacts.write_model_card(run_dir, cfg, result, provenance, command)
            print_summary(result)
    result["stopped_while_saving"] = finishing.requested
    accelerator.end_training()
    return result, peft_model
