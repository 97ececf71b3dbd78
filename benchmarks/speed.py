"""Training speed: `lora train` vs TRL's SFTTrainer + peft LoRA, on the same data, model and settings (CPU, fp32).

    python benchmarks/speed.py [--steps 30] [--warmup 3]          (or: make bench-speed)
    python benchmarks/speed.py --steps 4 --warmup 1 --model tiny_llama --eval-examples 32   (plumbing check)

Workload: the embedded SmolLM2-135M-Instruct (`--model smollm2_135m`, the default), Banking77 train
(`../shared/data/banking77`) as chat conversations (system prompt, message -> intent label), LoRA r=16 alpha=32
dropout=0 (peft's default, both contenders) on every linear layer of every block, batch 16 (no accumulation), max
length 256, AdamW lr 2e-4 with a linear schedule and no warmup, seed 42, `--warmup` + `--steps` optimizer steps,
fp32 on the CPU (CUDA hidden).
Each contender runs in its own process, one after the other:

- lora-cli: the `lora train` CLI as users run it (lora_args below, its defaults otherwise, e.g. length-grouped
  steps), twice: with its defaults, and with `trainer.compile=true` (its opt-in for long runs: compiling takes
  a minute before the first step, reported apart, not in the step times). Where the CPU multiplies bf16 natively
  (AVX512-BF16, AMX) and unless --no-bf16, twice more with its opt-in `trainer.precision=bf16` (autocast: fp32
  weights, bf16 linear layers), whose MFU is also given against the bf16 GEMM peak; per-step seconds, non-pad tokens and
  label tokens come from RUN_DIR/metrics.jsonl, peak RSS from RUN_DIR/run.json; padded tokens from
  metrics.jsonl where the loop logs them, else from the same batches reproduced with
  lora_cli.data.take/micro_batches (checked against the logged token counts).
- TRL: SFTTrainer with a peft LoraConfig, configured as TRL's docs recommend for this data (TRL_DOC below); steps
  timed by a TrainerCallback (end of step to end of step: data, forward, backward, optimizer, its per-step log),
  batches recorded by a thin wrapper around its own data collator, peak RSS by getrusage in its process.

The first `--warmup` steps of each are not timed. Then one more process loads the base model once per adapter and
computes every eval loss with lora_cli.train.evaluate_loss on the same held-out batches (token-weighted
cross-entropy over reply tokens), so speed cannot be bought by learning less.

Printed per contender (and each lora-cli / TRL ratio): useful tokens/s (non-pad: prompt and reply), trained
tokens/s (tokens that carry a label), padded tokens/s (batch x padded length: what the model processed), seconds per
step, peak RSS, eval loss after the run, and MFU = the FLOPs the work needs per second / the fp32 matmul peak of this
machine, timed in this run right before and right after each contender (best of several 2048x2048 GEMMs; the
higher of the two: this host's speed drifts by 20% within half an hour). lora_cli/flops.py's FORMULA is
the count in full:

    FLOPs/step = 4*W_blocks*T + 6*W_lora*T + 12*n_layers*d_attn*P + 4*W_head*Y

T useful tokens, Y labelled positions, P causal query-key pairs (n(n+1)/2 per sequence of n tokens); frozen block
weights cost 2 forward + 2 input-gradient FLOPs per token (no weight gradient), LoRA weights 2 + 2 + 2 (they have a
weight gradient), attention QK^T and AV 4*d_attn forward per pair and twice that backward, the frozen output head
2 + 2 per weight on labelled positions only. Padding is work done, not work needed: it is never counted.

Writes benchmarks/results/<date>-<machine>[-<tag>].json and a bar chart (.png) beside it.
Needs TRL, a benchmark-only extra: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from functools import partial
from pathlib import Path

from lora_cli import flops as flop_count

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "banking77"
GEMM_SIZE, GEMM_REPEATS = 2048, 10
GIB = 2**30

TRL_DOC = (
    "TRL: a conversational prompt-completion dataset ({prompt: [system, user], completion: [assistant]}, the same "
    "conversations as lora-cli, built by lora_cli.data.load_train_eval + to_messages), so SFTTrainer's default "
    "completion_only_loss applies (loss on the reply and its end-of-turn token, as in lora-cli); its own tokenizer, "
    "collator, padding (pad to the longest in the batch, packing=False, padding_free=False), fused LM head, "
    "optimizer (adamw_torch_fused) and sampler (random; --trl-group-by-length: its length-grouped sampler). Set "
    "to match lora-cli: the embedded model's converted cache folder in fp32, peft LoraConfig(r, alpha, dropout, "
    "all-linear), max_length, lr, linear schedule, warmup, weight decay, max_grad_norm, "
    "per_device_train_batch_size=16, grad accum 1, max_steps, seed; bf16=False (TRL defaults to bf16; this is an "
    "fp32 benchmark) and activation_checkpointing=False (formerly gradient_checkpointing; TRL defaults to True; "
    "lora-cli does not recompute activations, so both do the same work). Overheads off: eval_strategy=no, "
    "save_strategy=no, report_to=none, no progress bar; logging_steps=1 (its per-step loss and token count, to "
    "check the timing)."
)


# lora-cli in fp32, the workload the issue specifies (trainer.precision=fp32: the default, auto, takes bf16 where the
# CPU has it), and with its opt-in compilation (a minute of compiling, then faster steps).
LORA_CONTENDERS = {"lora-cli": ["trainer.precision=fp32"],
                   "lora-cli +compile": ["trainer.precision=fp32", "trainer.compile=true"]}
# bf16 autocast (fp32 weights, bf16 linear layers), run where the CPU multiplies bf16 natively: what
# trainer.precision=auto, the default, trains this workload in there (said explicitly here, so that the row's
# name always holds).
BF16_CONTENDERS = {"lora-cli bf16": ["trainer.precision=bf16"],
                   "lora-cli bf16 +compile": ["trainer.precision=bf16", "trainer.compile=true"]}
# Trained again at each extra seed (untimed), for the spread of their eval losses.
SEEDED = {"lora-cli": LORA_CONTENDERS["lora-cli"], "lora-cli bf16": BF16_CONTENDERS["lora-cli bf16"]}


def lora_args(model: str, total_steps: int, eval_examples: int | None) -> list[str]:
    """The `lora train` overrides a user would type for this workload; also composed in-process by the workers."""
    args = ["recipe=banking_support", f"model={model}", "dataset=banking77", f"dataset.path={DATA}",
            "adapter.r=16", "adapter.alpha=32", "adapter.dropout=0", "trainer.batch_size=16",
            f"trainer.max_steps={total_steps}",
            "trainer.lr=2e-4", "trainer.schedule=linear", "trainer.warmup_ratio=0",
            f"trainer.eval_every={total_steps}", "dataset.max_seq_len=256"]
    return args + ([f"dataset.max_eval_examples={eval_examples}"] if eval_examples else [])


# ---------------------------------------------------------------- the TRL contender (its own process)


def trl_worker(spec: dict) -> None:
    import resource

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lora_cli.config import compose
    from lora_cli.data import load_train_eval, to_messages
    from lora_cli.models import resolve_checkpoint

    cfg = compose(spec["overrides"])
    out = Path(spec["out"])
    train_rows, _ = load_train_eval(cfg.dataset)
    conversations = [to_messages(row, cfg.dataset) for row in train_rows]
    assert all(m[-1]["role"] == "assistant" for m in conversations), "each conversation must end with the reply"
    dataset = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in conversations])

    schedule = {"constant": "constant_with_warmup"}.get(cfg.trainer.schedule, cfg.trainer.schedule)
    settings = {
        "output_dir": str(out / "trainer"), "max_steps": cfg.trainer.max_steps,
        "per_device_train_batch_size": cfg.trainer.batch_size, "gradient_accumulation_steps": cfg.trainer.grad_accum,
        "learning_rate": cfg.trainer.lr, "lr_scheduler_type": schedule,
        "warmup_steps": int(cfg.trainer.warmup_ratio * cfg.trainer.max_steps),
        "weight_decay": cfg.trainer.weight_decay, "max_grad_norm": cfg.trainer.max_grad_norm,
        "seed": cfg.trainer.seed, "max_length": cfg.dataset.max_seq_len,
        "model_init_kwargs": {"dtype": cfg.model.dtype}, "bf16": False, "fp16": False,
        "activation_checkpointing": False, "eval_strategy": "no", "save_strategy": "no", "report_to": "none",
        "logging_strategy": "steps", "logging_steps": 1, "disable_tqdm": True,
    }
    if spec.get("trl_group_by_length"):  # an ablation: TRL's own length-grouped sampler (its default is random)
        settings["train_sampling_strategy"] = "group_by_length"
    lora = {"task_type": "CAUSAL_LM", "r": cfg.adapter.r, "lora_alpha": cfg.adapter.alpha,
            "lora_dropout": cfg.adapter.dropout, "target_modules": cfg.adapter.target_modules}

    class StepTimer(TrainerCallback):
        """Seconds from the end of one optimizer step to the end of the next, and what each step logged."""

        def __init__(self):
            self.seconds, self.logs, self.last = [], {}, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs[state.global_step] = logs

    class RecordingCollator:
        """TRL's own collator, unchanged; each batch's token counts are noted on the way out."""

        def __init__(self, inner):
            self.inner, self.batches = inner, []

        def __call__(self, features):
            batch = self.inner(features)
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            labels = int((batch["labels"][:, 1:] != -100).sum())
            self.batches.append(flop_count.sequence_work(lengths, labels, batch["input_ids"].numel()))
            return batch

    timer = StepTimer()
    trainer = SFTTrainer(model=str(resolve_checkpoint(cfg.model).path), args=SFTConfig(**settings),
                         train_dataset=dataset, peft_config=LoraConfig(**lora), callbacks=[timer])
    collator = trainer.data_collator = RecordingCollator(trainer.data_collator)
    prepared = trainer.train_dataset
    data = {"examples": len(prepared), "tokens": sum(len(ids) for ids in prepared["input_ids"]),
            "label_tokens": sum(sum(t != -100 for t in labels) for labels in prepared["labels"])}
    trainer.train()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    trainer.model.save_pretrained(out / "adapter")

    steps = []
    for i, seconds in enumerate(timer.seconds):
        log = timer.logs.get(i + 1, {})
        steps.append({"step": i + 1, "seconds": seconds, **collator.batches[i], "loss": log.get("loss"),
                      "logged_num_tokens": log.get("num_tokens")})
    effective = {"optim": getattr(trainer.args.optim, "value", str(trainer.args.optim)),
                 "completion_only_loss": trainer.completion_only_loss,
                 "packing": trainer.args.packing, "padding_free": trainer.padding_free,
                 "activation_checkpointing": trainer.args.activation_checkpointing,
                 "train_sampling_strategy": str(trainer.args.train_sampling_strategy), "bf16": trainer.args.bf16,
                 "pad_token": trainer.processing_class.pad_token, "device": str(trainer.args.device),
                 "torch_threads": torch.get_num_threads()}
    result = {"steps": steps, "peak_rss": peak_rss, "data": data, "sft_config": settings, "lora_config": lora,
              "effective": effective}
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))


# ---------------------------------------------------------------- common evaluation (its own process)


def eval_worker(spec: dict) -> None:
    """Every adapter on the same eval batches, with lora-cli's loss; plus lora-cli's training batches reproduced
    (padded tokens, attention pairs) and the model's FLOP constants."""
    import torch
    from peft import PeftModel

    from lora_cli.config import compose
    from lora_cli.data import micro_batches, predicted_labels, prepare, take
    from lora_cli.models import load_model, load_tokenizer, resolve_checkpoint
    from lora_cli.train import eval_batches, evaluate_loss

    cfg = compose(spec["overrides"])
    checkpoint = resolve_checkpoint(cfg.model)
    tokenizer = load_tokenizer(checkpoint, cfg.model)
    train_split, eval_split, _ = prepare(cfg.dataset, tokenizer)

    steps, size = [], cfg.trainer.batch_size * cfg.trainer.grad_accum
    grouped = getattr(cfg.trainer, "group_by_length", None)  # the loop's length grouping, where it has one
    for step in range(1, cfg.trainer.max_steps + 1):  # exactly what the loop does (one process)
        start = (step - 1) * size
        examples = (take(train_split.examples, cfg.trainer.seed, start, size) if grouped is None
                    else take(train_split.examples, cfg.trainer.seed, start, size, grouped))
        pack_width = cfg.dataset.max_seq_len if getattr(cfg.trainer, "packing", False) else None
        batches = micro_batches(examples, cfg.trainer.batch_size, 0, 1, tokenizer.pad_token_id, pack_width)
        labels = sum(predicted_labels(e) for e in examples)
        stats = flop_count.sequence_work([len(e["input_ids"]) for e in examples], labels,
                                         sum(b["input_ids"].numel() for b in batches))
        steps.append({"step": step, **stats})

    evaluation = eval_batches(eval_split, cfg.trainer.eval_batch_size, tokenizer.pad_token_id)
    losses, flops, adapter_weights = {}, {}, {}
    for name, folder in spec["adapters"].items():
        model = PeftModel.from_pretrained(load_model(checkpoint, cfg.model, tokenizer), folder)
        flops = flops or flop_count.constants(model)
        adapter_weights[name] = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        losses[name] = evaluate_loss(model, evaluation, torch.device("cpu"), model.get_output_embeddings())
    result = {"lora_steps": steps, "eval_loss": losses, "flops": flops, "adapter_weights": adapter_weights,
              "data": {"examples": len(train_split.examples), "tokens": train_split.tokens,
                       "label_tokens": train_split.label_tokens},
              "eval": {"examples": len(eval_split.examples), "label_tokens": eval_split.label_tokens}}
    Path(spec["out"], "eval.json").write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------- the benchmark


def matmul_peak(dtype: str = "float32") -> float:
    """FLOP/s of one large square GEMM in `dtype` on the CPU, best of several, in this process (torch's default
    threads)."""
    return flop_count.matmul_speed(dtype, "cpu", GEMM_SIZE, GEMM_REPEATS)


def run_logged(name: str, command: list[str], log: Path) -> None:
    """One contender's process, CUDA hidden (a CPU benchmark), output into its log; its tail on failure."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"{name} failed (exit {code}); the end of its output:\n{tail}")


def worker(kind: str, spec: dict, work: Path, label: str | None = None) -> dict:
    label = label or kind
    path = work / f"{label}-spec.json"
    path.write_text(json.dumps(spec))
    run_logged(label, [sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(path)],
               work / f"{label}.log")
    return json.loads(Path(spec["out"], "result.json" if kind == "trl" else "eval.json").read_text())


def lora_contender(args: list[str], work: Path, name: str) -> dict:
    run_dir = work / name
    run_logged(f"lora train ({name})", [str(Path(sys.executable).with_name("lora")), "train", *args,
                                        f"hydra.run.dir={run_dir}"], work / f"{name}.log")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    run = json.loads((run_dir / "run.json").read_text())["result"]
    steps = [{"step": r["step"], "seconds": r["tokens"] / r["tokens_per_s"], "tokens": r["tokens"],
              "trained_tokens": r["trained_tokens"], "logged_padded_tokens": r.get("padded_tokens"),
              "loss": r["loss"]} for r in records if "loss" in r]
    return {"steps": steps, "peak_rss": run["peak_memory"]["RSS"], "own_eval_loss": run["eval_loss_after"],
            "own_eval_loss_before": run["eval_loss_before"], "adapter": str(run_dir / "adapter"),
            "compile_s": run.get("compile_s")}


def summarise(steps: list[dict], warmup: int, constants: dict, peak: float, bf16_peak: float | None) -> dict:
    timed = steps[warmup:]
    seconds = sum(s["seconds"] for s in timed)
    total = {k: sum(s[k] for s in timed) for k in ("tokens", "trained_tokens", "padded_tokens")}
    flops = sum(flop_count.total(s, constants) for s in timed)
    per_step = sorted(s["seconds"] for s in timed)
    return {"timed_steps": len(timed), "seconds": seconds, "s_per_step": seconds / len(timed),
            "s_per_step_median": per_step[len(per_step) // 2],
            "useful_tokens_per_s": total["tokens"] / seconds, "trained_tokens_per_s": total["trained_tokens"] / seconds,
            "padded_tokens_per_s": total["padded_tokens"] / seconds,
            "useful_tokens_per_step": total["tokens"] / len(timed),
            "padded_tokens_per_step": total["padded_tokens"] / len(timed),
            "flops_per_step": flops / len(timed), "flops_per_s": flops / seconds, "mfu": flops / seconds / peak,
            "mfu_bf16": flops / seconds / bf16_peak if bf16_peak else None}


COLUMNS = [("useful tok/s", "useful_tokens_per_s", "{:.1f}"), ("trained tok/s", "trained_tokens_per_s", "{:.1f}"),
           ("padded tok/s", "padded_tokens_per_s", "{:.1f}"), ("s/step", "s_per_step", "{:.3f}"),
           ("peak RSS GiB", "peak_rss_gib", "{:.2f}"), ("eval loss", "eval_loss", "{:.4f}"),
           ("GFLOP/s", "gflops_per_s", "{:.1f}"), ("MFU", "mfu", "{:.1%}"), ("MFU of bf16", "mfu_bf16", "{:.1%}")]


def cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def print_table(rows: dict[str, dict], ratios: dict[str, dict]) -> None:
    width = max(len(f"{name} / TRL") for name in [*rows, *ratios]) + 2
    print(f"{'':{width}}" + "".join(f"{title:>15}" for title, _, _ in COLUMNS))
    for name, row in rows.items():
        print(f"{name:{width}}" + "".join(f"{cell(row[key], fmt):>15}" for _, key, fmt in COLUMNS))
    for name, ratio in ratios.items():
        print(f"{name + ' / TRL':{width}}" + "".join(f"{cell(ratio[key], '{:.2f}x'):>15}" for _, key, _ in COLUMNS))


def plot(rows: dict[str, dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    colors = ["tab:orange" if name == "TRL" else "tab:cyan" if "compile" in name else "tab:blue" for name in names]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key, label in ((axes[0], "useful_tokens_per_s", "useful (non-pad) tokens / s"),
                           (axes[1], "peak_rss_gib", "peak RSS (GiB)")):
        values = [rows[n][key] for n in names]
        bars = ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)), [name.replace(" ", "\n") for name in names], fontsize=8)
        ax.bar_label(bars, fmt="%.2f" if key == "peak_rss_gib" else "%.0f")
        ax.set_title(label)
        ax.set_ylim(0, max(values) * 1.15)
    fig.suptitle(title.replace("; ", "\n"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def consistency(name: str, lora: dict, trl: dict, evaluation: dict) -> list[str]:
    """What must hold for the comparison to mean anything; each line says whether it does."""
    lines = []
    keys = ["tokens", "trained_tokens"]
    if all(s["logged_padded_tokens"] is not None for s in lora["steps"]):  # the loop logs padded tokens itself
        keys.append("padded_tokens")
    mismatched = [s["step"] for s, r in zip(lora["steps"], evaluation["lora_steps"], strict=True)
                  if any(s.get(f"logged_{k}", s.get(k)) != r[k] for k in keys)]
    lines.append(f"{name} batches reproduced with take/micro_batches: "
                 + (f"MISMATCH with metrics.jsonl at steps {mismatched}; padded tokens and attention pairs are "
                    "then wrong for lora-cli" if mismatched
                    else f"{', '.join(keys)} match metrics.jsonl at every step"))
    logged = [s.get("logged_num_tokens") for s in trl["steps"]]
    if all(v is not None for v in logged):
        ok = all(b - a == s["tokens"] for a, b, s in zip([0, *logged], logged, trl["steps"], strict=False))
        lines.append("TRL batches recorded from its collator: "
                     + ("non-pad tokens match its own num_tokens log at every step" if ok
                        else "MISMATCH with its own num_tokens log"))
    a, b = evaluation["data"], trl["data"]
    same = a == b
    lines.append(f"train data: lora-cli {a['examples']} examples / {a['tokens']} tokens / {a['label_tokens']} label "
                 f"tokens; TRL {b['examples']} / {b['tokens']} / {b['label_tokens']}"
                 + ("" if same else "  (DIFFERENT tokenisation)"))
    weights = evaluation["adapter_weights"]
    lines.append("adapters: " + ", ".join(f"{name} {n:,} LoRA weights" for name, n in weights.items())
                 + ("" if len(set(weights.values())) == 1 else "  (DIFFERENT adapters)"))
    own = lora["own_eval_loss"]
    lines.append(f"eval: {evaluation['eval']['examples']} held-out examples, {evaluation['eval']['label_tokens']} "
                 f"reply tokens; base model {lora['own_eval_loss_before']:.4f}; {name}'s own end-of-run eval loss "
                 f"{own:.4f} vs the common evaluation {evaluation['eval_loss'][name]:.4f}")
    return lines


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "accelerate", "trl", "lora-cli")}


def other_seeds(options, args: list[str], seeded_loras: dict[str, list[str]], work: Path) -> dict[str, str]:
    """Eval loss only: lora-cli (defaults, and bf16 where run) and TRL trained again at each seed after the first,
    untimed. At 33 steps the sample of examples a run sees moves its eval loss by a few percent, so one seed says
    little."""
    adapters = {}
    for seed in options.seeds[1:]:
        seeded = [*args, f"trainer.seed={seed}"]
        print(f"seed {seed}: {', '.join(seeded_loras)} and TRL, untimed", flush=True)
        for name, extra in seeded_loras.items():
            folder = f"lora-seed{seed}" + "".join(f"-{e.split('=')[1]}" for e in extra)
            adapters[f"{name}@{seed}"] = lora_contender(seeded + extra, work, folder)["adapter"]
        worker("trl", {"overrides": seeded, "out": str(work / f"trl-seed{seed}"),
                       "trl_group_by_length": options.trl_group_by_length}, work, f"trl-seed{seed}")
        adapters[f"TRL@{seed}"] = str(work / f"trl-seed{seed}" / "adapter")
    return adapters


def seed_spread(seeds: list[int], names: list[str], eval_loss: dict[str, float]) -> dict | None:
    """Per-seed eval losses of the seeded contenders, their means and each mean over TRL's."""
    if len(seeds) < 2:
        return None
    losses = {name: [eval_loss[name]] + [eval_loss[f"{name}@{seed}"] for seed in seeds[1:]] for name in names}
    mean = {name: sum(values) / len(values) for name, values in losses.items()}
    return {"seeds": seeds, "eval_loss": losses, "mean": mean,
            "ratio": {name: mean[name] / mean["TRL"] for name in names if name != "TRL"}}


def between_peaks(run, dtypes: list[str]) -> tuple[dict, dict[str, list[float]]]:
    """run()'s result, and the GEMM peak in each dtype right before and right after it: the host's speed drifts."""
    before = {dtype: matmul_peak(dtype) for dtype in dtypes}
    result = run()
    return result, {dtype: [before[dtype], matmul_peak(dtype)] for dtype in dtypes}


def before_after(peaks: dict[str, list[float] | None]) -> str:
    """Each contender's two peak readings, in GFLOP/s (contenders without a reading left out)."""
    return "; ".join(f"{name} {pair[0] / 1e9:.1f}, {pair[1] / 1e9:.1f}" for name, pair in peaks.items() if pair)


def lora_contenders(options) -> dict[str, list[str]]:
    """lora-cli's timed configurations: the bf16 ones only where this CPU multiplies bf16 natively."""
    from lora_cli.train import cpu_has_bf16

    if options.no_bf16 or not cpu_has_bf16():
        print("no bf16 contenders: " + ("--no-bf16" if options.no_bf16 else "this CPU has no bf16 instructions"))
        return LORA_CONTENDERS
    return LORA_CONTENDERS | BF16_CONTENDERS


def benchmark(options) -> None:
    import torch

    total = options.warmup + options.steps
    unseeded = lora_args(options.model, total, options.eval_examples) + options.lora_arg
    args = [*unseeded, f"trainer.seed={options.seeds[0]}"]
    configurations = lora_contenders(options)
    peaks = {}  # contender -> dtype (fp32 for all, bf16 for bf16 contenders) -> GEMM peak right before and after it
    with tempfile.TemporaryDirectory(prefix="lora-speed-") as tmp:
        work = Path(options.keep) if options.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        loras = {}
        for name, extra in configurations.items():
            print(f"lora train {' '.join(args + extra)}", flush=True)
            folder = name.replace(" ", "_").replace("+", "")
            dtypes = ["float32", "bfloat16"] if name in BF16_CONTENDERS else ["float32"]
            loras[name], peaks[name] = between_peaks(partial(lora_contender, args + extra, work, folder), dtypes)
        print(f"TRL SFTTrainer, {total} steps", flush=True)
        trl_spec = {"overrides": args, "out": str(work / "trl"), "trl_group_by_length": options.trl_group_by_length}
        trl, peaks["TRL"] = between_peaks(partial(worker, "trl", trl_spec, work), ["float32"])
        adapters = {name: result["adapter"] for name, result in loras.items()} | {"TRL": str(work / "trl" / "adapter")}
        seeded = {name: extra for name, extra in SEEDED.items() if name in configurations}
        adapters |= other_seeds(options, unseeded, seeded, work)
        print("common evaluation of every adapter", flush=True)
        evaluation = worker("eval", {"overrides": args, "out": str(work), "adapters": adapters}, work)
    contenders = loras | {"TRL": trl}
    if any(len(result["steps"]) != total for result in contenders.values()):
        sys.exit(f"expected {total} steps, got " + ", ".join(f"{name} {len(r['steps'])}"
                                                              for name, r in contenders.items()))
    for lora in loras.values():
        for step, reproduced in zip(lora["steps"], evaluation["lora_steps"], strict=True):
            step["padded_tokens"] = step["logged_padded_tokens"] or reproduced["padded_tokens"]
            step["pairs"] = reproduced["pairs"]

    constants = evaluation["flops"]
    fp32_peaks = {name: measured["float32"] for name, measured in peaks.items()}
    bf16_peaks = {name: measured.get("bfloat16") for name, measured in peaks.items()}
    rows = {}
    for name, result in contenders.items():
        bf16_peak = max(bf16_peaks[name]) if bf16_peaks[name] else None
        rows[name] = summarise(result["steps"], options.warmup, constants, max(fp32_peaks[name]), bf16_peak) | {
            "peak_rss": result["peak_rss"], "peak_rss_gib": result["peak_rss"] / GIB,
            "eval_loss": evaluation["eval_loss"][name]}
        rows[name]["gflops_per_s"] = rows[name]["flops_per_s"] / 1e9
    ratios = {name: {key: rows[name][key] / rows["TRL"][key] if rows["TRL"][key] else None for _, key, _ in COLUMNS}
              for name in loras}

    machine = machine_name(options)
    threads = torch.get_num_threads()
    title = (f"{options.model}, Banking77 train, LoRA r=16 all-linear, batch 16, max len 256; CPU fp32 (bf16 rows: "
             "autocast) "
             f"({threads} threads), {options.steps} timed steps after {options.warmup} warm-up; "
             f"{date.today()} {machine}")
    print(f"\n{title}")
    print(f"fp32 matmul peak ({GEMM_SIZE}x{GEMM_SIZE} GEMM, best of {GEMM_REPEATS}) right before and after each "
          "contender, GFLOP/s: " + before_after(fp32_peaks)
          + " (each contender's MFU is against the higher of its two)")
    print("bf16 matmul peak, the same way, GFLOP/s: " + before_after(bf16_peaks)
          + " (the bf16 rows' 'MFU of bf16': their FLOP/s over the higher of the two)")
    print(f"{flop_count.FORMULA}\nconstants: " + ", ".join(f"{k}={v:,}" for k, v in constants.items()) + "\n")
    print_table(rows, ratios)
    print()
    for name, row in rows.items():
        print(f"{name}: {row['useful_tokens_per_step']:.0f} useful / {row['padded_tokens_per_step']:.0f} padded "
              f"tokens per step, {row['flops_per_step'] / 1e12:.3f} TFLOP per step, "
              f"median {row['s_per_step_median']:.3f} s/step")
    compiled = {name: r["compile_s"] for name, r in loras.items() if r["compile_s"] is not None}
    for name, seconds in compiled.items():
        print(f"{name}: compiling took {seconds:.0f} s before the first step (once per run; not in the step times)")
    seeds = seed_spread(options.seeds, [*seeded, "TRL"], evaluation["eval_loss"])
    if seeds:
        print(f"\neval loss over seeds {', '.join(map(str, options.seeds))} (the first is the timed run; the others "
              "train the same steps untimed, each contender with trainer.seed=S):")
        for name, losses in seeds["eval_loss"].items():
            print(f"  {name}: " + ", ".join(f"{loss:.4f}" for loss in losses)
                  + f"; mean {seeds['mean'][name]:.4f}")
        for name, ratio in seeds["ratio"].items():
            print(f"  {name} / TRL, means: {ratio:.3f}x")
    checks = [line for name, lora in loras.items() for line in consistency(name, lora, trl, evaluation)]
    print("\n".join(f"check: {line}" for line in dict.fromkeys(checks)))

    tag = [options.tag] if options.tag else []
    result = {
        "benchmark": "speed", "date": date.today().isoformat(), "machine": machine, "node": platform.node(),
        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": threads, "versions": versions(), "model": options.model,
        "steps": options.steps, "warmup": options.warmup, "eval_examples": evaluation["eval"]["examples"],
        "trl_group_by_length": options.trl_group_by_length, "extra_overrides": options.lora_arg,
        "lora_commands": {name: "lora train " + " ".join(args + extra) for name, extra in configurations.items()},
        "compile_s": compiled,
        "trl": {k: trl[k] for k in ("sft_config", "lora_config", "effective")},
        "trl_doc": TRL_DOC, "flops_formula": flop_count.FORMULA, "flops_constants": constants,
        "matmul_peaks_before_after": fp32_peaks, "bf16_matmul_peaks_before_after": bf16_peaks,
        "gemm": f"{GEMM_SIZE}x{GEMM_SIZE}, best of {GEMM_REPEATS}",
        "contenders": rows, "ratios_over_trl": ratios, "checks": checks, "seeds": seeds,
        "steps_detail": {name: result["steps"] for name, result in contenders.items()},
    }
    json_path, png_path = result_file(options, "json", *tag), result_file(options, "png", *tag)
    json_path.write_text(json.dumps(result, indent=2))
    plot(rows, title, png_path)
    print(f"wrote {json_path} and {png_path}")


def add_result_options(parser: argparse.ArgumentParser) -> None:
    """--machine and --out: how every benchmark here names and places its result files."""
    parser.add_argument("--machine", default=f"{platform.node()}-{os.cpu_count()}cpu", help="name in the file names")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")


def machine_name(options: argparse.Namespace) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", options.machine)


def result_file(options: argparse.Namespace, extension: str, *suffixes: str) -> Path:
    """OUT/<date>-<machine>[-<suffix>...].<extension>, its folder made. The extension is appended, not put in
    place with Path.with_suffix, which would cut a machine name at its first dot."""
    options.out.mkdir(parents=True, exist_ok=True)
    return options.out / ("-".join([date.today().isoformat(), machine_name(options), *suffixes]) + f".{extension}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps run first and not timed")
    parser.add_argument("--model", default="smollm2_135m", choices=["smollm2_135m", "tiny_llama"],
                        help="lora-cli's model option; tiny_llama only checks the plumbing")
    parser.add_argument("--eval-examples", type=int, default=None,
                        help="evaluate on this many held-out examples (default: all, as `lora train` does)")
    parser.add_argument("--trl-group-by-length", action="store_true",
                        help="ablation: TRL with train_sampling_strategy=group_by_length (its default: random)")
    parser.add_argument("--lora-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="ablation: one more `lora train` override (repeatable); TRL reads the same config, "
                             "so shared keys (adapter.*, trainer.lr) change both, loop-only ones "
                             "(trainer.group_by_length) only lora-cli")
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")], default=[42],
                        help="comma-separated training seeds; the first is the timed run, the others only retrain "
                             "lora-cli and TRL (untimed) for the eval-loss mean (each ~9 min on 2 CPUs)")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16 autocast contenders")
    parser.add_argument("--tag", default=None, help="appended to the result file names (ablations)")
    add_result_options(parser)
    parser.add_argument("--keep", type=Path, default=None, help="keep run dirs, adapters and logs in this folder")
    parser.add_argument("--worker", choices=["trl", "eval"], help=argparse.SUPPRESS)
    parser.add_argument("spec", nargs="?", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        spec = json.loads(options.spec.read_text())
        (trl_worker if options.worker == "trl" else eval_worker)(spec)
        return
    if options.steps < 1 or options.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if not DATA.is_dir():
        sys.exit(f"Banking77 is not at {DATA}; the benchmark trains on its train split")
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("the speed benchmark compares with TRL, a benchmark-only extra: pip install -e '.[bench]'")
    benchmark(options)


if __name__ == "__main__":
    main()
