"""LoRA vs ScaLoRA convergence on Banking77: eval loss vs step, each at its best lr from a small grid, the
ScaLoRA smoothness constant L swept on a log grid, full fine-tuning as a reference where the time budget
allows, and the per-step cost of ScaLoRA's rescale. Every adapter run goes through the real CLI.

    python benchmarks/convergence.py                         (or: make bench-convergence; ~20-25 min, 2 CPU cores)
    python benchmarks/convergence.py --model tiny_llama --steps 4 --eval-every 2 --eval-examples 16 \\
        --lrs 1e-3 --Ls 1,10 --interval 2 --full-ft-lr 1e-3 --out /tmp/smoke   (the plumbing only, ~2 min)

What it runs (defaults; all are options):
  1. `lora train recipe=banking_support dataset=banking77 dataset.path=../shared/data/banking77` with
     adapter=lora and adapter=scalora, r=8, alpha=16, dropout 0 for both (the same s = alpha/r, so the same lr
     means the same thing), 60 steps of batch 8, eval every 10 steps on 100 examples held out of *train*
     (the banking77 config holds out 500; `dataset.max_eval_examples` takes a fixed subset; the test split is
     never touched). Each run tokenises only the steps x batch training examples it will see.
     lr grid {1e-3, 2e-3} for both methods (ScaLoRA at the shipped default L, 0.1 since the 2026-11-23 run);
     LoRA and ScaLoRA runs are interleaved so that machine load drifts affect both alike.
  2. ScaLoRA's L swept at ScaLoRA's best lr over {0.1, 1, 10} (decades, spec: "sweep it on a log grid";
     with eta_mode=adam_effective the multipliers alpha, beta ~ 1/sqrt(L eta) and the clamp [0.5, 2] spans a
     factor 16 in L, so one decade either side of 1 covers "mostly clamped low" to "mostly clamped high").
     ScaLoRA rescales every 5 steps here (spec default 10): warmup is min(100, 10% of steps) = 6, so with
     interval 10 only 5 rescales (steps 10-50) could shape a 60-step run; 5 gives 10, still within the
     paper's range (it reports interval 1 and 10 as nearly equivalent).
  3. Full fine-tuning (every weight trainable, same data stream, loss, AdamW, schedule, clipping and eval as
     `lora train`, via lora_cli's own functions) at one untuned lr, 1e-4, last, under the time budget
     (--budget-minutes 25, counted from the benchmark's start): it stops (and evaluates) at the step where the
     budget runs out and is then reported as a truncated reference, or is skipped when < 1 min is left.

Output: benchmarks/results/<date>-<machine>-convergence.csv (method, lr, L, step, eval_loss for every run),
<date>-<machine>-convergence.png (eval loss vs step: the best run of each method; every run of the grids), and
<date>-<machine>-convergence.json (choices, per-run timing and ScaLoRA diagnostics); a printed table: best lr (and L),
final eval loss, steps to reach LoRA's final eval loss, seconds per step, and the ScaLoRA/LoRA step-time ratio
(paired runs: same lr, hence the same examples at every step).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "banking77"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import add_result_options, machine_name, result_file  # noqa: E402

WORKER = "_full_ft_worker"  # hidden first argument: run full fine-tuning in this (child) process
BATCH = 8  # the recipe's batch size, restated so the training subset matches the steps


# ---------------------------------------------------------------------------------------------------------
# One run and what its metrics say
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    method: str  # lora | scalora | full_ft
    lr: float
    L: float | None = None
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval_loss), step 0 included
    first_loss: float = math.nan  # train loss of step 1 (before any update: the same for every run)
    step_s: dict[int, float] = field(default_factory=dict)  # seconds of each optimizer step (no eval)
    rescale_steps: list[int] = field(default_factory=list)
    diagnostics: dict = field(default_factory=dict)
    wall_s: float = 0.0
    planned_steps: int = 0

    @property
    def name(self) -> str:
        return f"{self.method} lr={self.lr:g}" + (f" L={self.L:g}" if self.L is not None else "")

    @property
    def final(self) -> float:
        return self.evals[-1][1]

    @property
    def last_step(self) -> int:
        return self.evals[-1][0]

    def mean_step_s(self, steps=None) -> float:
        """Mean seconds per optimizer step, step 1 left out (first-touch allocations and caches)."""
        values = [s for k, s in self.step_s.items() if k > 1 and (steps is None or k in steps)]
        return sum(values) / len(values) if values else math.nan


def read_metrics(run: Run, run_dir: Path) -> Run:
    """eval losses, step times (tokens / tokens_per_s: the loop's own clock, eval excluded) and ScaLoRA's
    per-rescale logs from RUN_DIR/metrics.jsonl; the wall time from run.json."""
    abs_medians, branches = [], {"column": 0, "scalar": 0, "skip": 0}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval_loss" in record:
            run.evals.append((record["step"], record["eval_loss"]))
        if "tokens_per_s" in record:
            run.step_s[record["step"]] = record["tokens"] / record["tokens_per_s"]
            if record["step"] == 1:
                run.first_loss = record["loss"]
        if "scalora_column" in record:
            run.rescale_steps.append(record["step"])
            for branch in branches:
                branches[branch] += record.get(f"scalora_{branch}", 0)
            if "scalora_ab_median" in record:
                abs_medians.append(record["scalora_ab_median"])
    if run.rescale_steps:
        total = sum(branches.values())
        run.diagnostics = {"rescales": len(run.rescale_steps),
                           **{f"share_{b}": n / total for b, n in branches.items()},
                           "ab_median_per_rescale": abs_medians}
    record = run_dir / "run.json"
    if record.is_file():
        run.wall_s = json.loads(record.read_text()).get("result", {}).get("wall_time_s", 0.0)
    return run


def steps_to_reach(evals: list[tuple[int, float]], target: float) -> tuple[int | None, float | None]:
    """The first eval step at or below `target`, and the step where the curve (linear between evals)
    first crosses it; (None, None) when it never does."""
    for (s0, l0), (s1, l1) in zip(evals, evals[1:], strict=False):
        if l1 <= target:
            crossing = s1 if l1 == l0 else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
            return s1, min(max(crossing, s0), s1)
    return None, None


# ---------------------------------------------------------------------------------------------------------
# Running: adapters through the CLI, full fine-tuning in a child process of this script
# ---------------------------------------------------------------------------------------------------------

def base_overrides(options) -> list[str]:
    return ["recipe=banking_support", f"model={options.model}", "dataset=banking77", f"dataset.path={DATA}",
            f"dataset.max_eval_examples={options.eval_examples}",
            f"dataset.max_train_examples={options.steps * BATCH}",
            f"trainer.batch_size={BATCH}", f"trainer.max_steps={options.steps}",
            f"trainer.eval_every={options.eval_every}",
            "trainer.precision=fp32"]  # every method alike: auto would take bf16 for LoRA alone where the CPU has it


def adapter_overrides(options, method: str, lr: float, L: float | None) -> list[str]:
    args = [*base_overrides(options), f"adapter={method}", f"adapter.r={options.rank}",
            f"adapter.alpha={2 * options.rank}", "adapter.dropout=0.0", f"trainer.lr={lr}"]
    if method == "scalora":
        args += [f"adapter.scalora.L={L}", f"adapter.scalora.interval={options.interval}"]
    return args


def launch(command: list[str], run_dir: Path, label: str) -> None:
    """Run one job with its output in RUN_DIR.log; on failure show the end of that log and stop."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        sys.exit(f"{label} failed (exit {code}); the end of {log}:\n{tail}")


def run_adapter(options, method: str, lr: float, L: float | None, runs_dir: Path) -> Run:
    run = Run(method, lr, L, planned_steps=options.steps)
    run_dir = runs_dir / run.name.replace(" ", "_").replace("=", "")
    lora = str(Path(sys.executable).with_name("lora"))
    launch([lora, "train", *adapter_overrides(options, method, lr, L), f"hydra.run.dir={run_dir}"],
           run_dir, run.name)
    read_metrics(run, run_dir)
    if not options.keep_runs:  # a ScaLoRA run dir holds the fp32 base weights of every adapted module
        shutil.rmtree(run_dir, ignore_errors=True)
    return run


def run_full_ft(options, lr: float, deadline: float, runs_dir: Path) -> Run:
    run = Run("full_ft", lr, planned_steps=options.steps)
    run_dir = runs_dir / f"full_ft_lr{lr:g}"
    launch([sys.executable, str(Path(__file__).resolve()), WORKER, str(run_dir), str(deadline), "--",
            *base_overrides(options), f"trainer.lr={lr}"], run_dir, run.name)
    return read_metrics(run, run_dir)


def full_ft_worker(run_dir: Path, deadline: float, overrides: list[str]) -> None:
    """Full fine-tuning with `lora train`'s pieces: the same config, data stream (`take`, `micro_batches`),
    token-normalised loss (`token_loss_sum`), AdamW + schedule (`build_optimizer`), clipping and eval
    (`evaluate_loss` on `eval_batches`); every parameter trainable. Writes metrics.jsonl and run.json like a
    `lora train` run. Stops after the step during which `deadline` (epoch seconds) passes, evaluating there."""
    import torch
    from accelerate.utils import set_seed

    from lora_cli.config import compose
    from lora_cli.data import micro_batches, predicted_labels, prepare, take
    from lora_cli.models import load_model, load_tokenizer, resolve_checkpoint
    from lora_cli.train import build_optimizer, eval_batches, evaluate_loss, token_loss_sum

    started = time.perf_counter()
    cfg = compose(overrides)
    trainer = cfg.trainer
    set_seed(trainer.seed)
    base = resolve_checkpoint(cfg.model)
    tokenizer = load_tokenizer(base, cfg.model)
    train_split, eval_split, _ = prepare(cfg.dataset, tokenizer)
    model = load_model(base, cfg.model, tokenizer)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    steps = trainer.max_steps
    optimizer, scheduler = build_optimizer([{"params": params}], trainer, steps)
    evaluation = eval_batches(eval_split, trainer.eval_batch_size, tokenizer.pad_token_id)
    head, device = model.get_output_embeddings(), torch.device("cpu")
    # The loop's length grouping of steps (trainer.group_by_length), where this lora_cli has it.
    grouping = {"group_by_length": trainer.group_by_length} if hasattr(trainer, "group_by_length") else {}
    run_dir.mkdir(parents=True, exist_ok=True)
    stopped = None
    with open(run_dir / "metrics.jsonl", "w") as metrics:
        def log(record: dict) -> None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

        log({"step": 0, "eval_loss": evaluate_loss(model, evaluation, device, head)})
        model.train()
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            step_size = trainer.batch_size * trainer.grad_accum
            step_examples = take(train_split.examples, trainer.seed, (step - 1) * step_size, step_size, **grouping)
            step_tokens = sum(predicted_labels(e) for e in step_examples)
            loss_sum = 0.0
            for batch in micro_batches(step_examples, trainer.batch_size, 0, 1, tokenizer.pad_token_id):
                loss = token_loss_sum(model, head, batch)
                (loss / step_tokens).backward()
                loss_sum += float(loss.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, trainer.max_grad_norm)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            seen = sum(len(e["input_ids"]) for e in step_examples)
            log({"step": step, "loss": loss_sum / step_tokens, "lr": lr,
                 "grad_norm": float(grad_norm), "tokens": seen, "tokens_per_s": seen / elapsed})
            out_of_time = time.time() > deadline and step < steps
            if step % trainer.eval_every == 0 or step == steps or out_of_time:
                log({"step": step, "eval_loss": evaluate_loss(model, evaluation, device, head)})
            if out_of_time:
                stopped = step
                break
    result = {"wall_time_s": time.perf_counter() - started, "stopped_at": stopped, "steps": steps}
    (run_dir / "run.json").write_text(json.dumps({"status": "complete", "result": result}))


# ---------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------

def best(runs: list[Run]) -> Run:
    return min(runs, key=lambda r: r.final)


def step_time_ratio(lora_runs: list[Run], scalora_runs: list[Run]) -> dict:
    """ScaLoRA / LoRA seconds per step, pairing each ScaLoRA run with the LoRA run at the same lr (the same
    examples at every step, so the same compute but for the rescale); mean (the real cost, rescale steps
    included) and the median of the per-step ratios (robust to load spikes), also over rescale steps alone
    and over the other steps."""
    by_lr = {r.lr: r for r in lora_runs}
    sc, lo, ratios, sc_rescale, sc_plain = [], [], [], [], []
    for run in scalora_runs:
        if run.lr not in by_lr:
            continue
        partner = by_lr[run.lr]
        for step, seconds in run.step_s.items():
            if step > 1 and step in partner.step_s:
                sc.append(seconds)
                lo.append(partner.step_s[step])
                ratios.append(seconds / partner.step_s[step])
                (sc_rescale if step in run.rescale_steps else sc_plain).append(ratios[-1])
    if not sc:
        return {}

    def median(values):
        values = sorted(values)
        return values[len(values) // 2] if values else math.nan

    return {"pairs": len(sc), "mean_ratio": sum(sc) / sum(lo), "median_ratio": median(ratios),
            "rescale_step_ratio": median(sc_rescale), "plain_step_ratio": median(sc_plain)}


def write_csv(path: Path, runs: list[Run]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "lr", "L", "step", "eval_loss"])
        for run in runs:
            for step, loss in run.evals:
                writer.writerow([run.method, f"{run.lr:g}", "" if run.L is None else f"{run.L:g}", step,
                                 f"{loss:.6f}"])


def plot(path: Path, chosen: dict[str, Run], runs: list[Run], target: float, base_L: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"lora": "tab:blue", "scalora": "tab:orange", "full_ft": "tab:green"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for label, run in chosen.items():
        steps, losses = zip(*run.evals, strict=True)
        left.plot(steps, losses, marker="o", color=colors[run.method],
                  linestyle="--" if label == "ScaLoRA (best lr, L)" else "-", label=f"{label}: {run.name}")
    left.axhline(target, color="gray", linewidth=0.8, linestyle=":", label="LoRA's final eval loss")
    left.set_title("best run of each method")
    for run in runs:
        steps, losses = zip(*run.evals, strict=True)
        right.plot(steps, losses, marker=".", color=colors[run.method], alpha=0.7, linewidth=1,
                   linestyle=":" if run.method == "scalora" and base_L != run.L else "-")
        right.annotate(run.name.split(" ", 1)[1], (steps[-1], losses[-1]), fontsize=7, color=colors[run.method])
    right.set_title("every run (dotted: ScaLoRA L sweep)")
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    left.set_ylabel("eval loss (held-out part of train)")
    left.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt_reach(evals, target: float) -> str:
    first, crossing = steps_to_reach(evals, target)
    return "not reached" if first is None else f"{first} (~{crossing:.0f})"


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="smollm2_135m", help="model option: smollm2_135m | tiny_llama")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8, help="r of both adapters (alpha = 2r)")
    parser.add_argument("--lrs", type=parse_floats, default=[1e-3, 2e-3], help="lr grid of LoRA and ScaLoRA")
    parser.add_argument("--Ls", type=parse_floats, default=[0.1, 1.0, 10.0],
                        help="ScaLoRA L grid, swept at ScaLoRA's best lr; its first value in the list that "
                             "equals 1 (else the middle one) is the one the lr grid uses")
    parser.add_argument("--interval", type=int, default=5, help="adapter.scalora.interval")
    parser.add_argument("--full-ft-lr", type=float, default=1e-4, help="0: no full fine-tuning")
    parser.add_argument("--budget-minutes", type=float, default=25.0,
                        help="full fine-tuning stops where the whole benchmark reaches this")
    parser.add_argument("--keep-runs", type=Path, default=None, help="keep the run dirs here")
    add_result_options(parser)
    options = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"Banking77 is not at {DATA} (train.csv/test.csv expected)")
    started = time.time()
    deadline = started + 60 * options.budget_minutes
    load_before = os.getloadavg()
    from lora_cli.config import ScaLoraConfig

    default_L = ScaLoraConfig().L  # the lr grid runs at the shipped default; the L sweep then covers the rest
    base_L = default_L if default_L in options.Ls else options.Ls[len(options.Ls) // 2]
    planned = 2 * len(options.lrs) + len(options.Ls) - 1 + (options.full_ft_lr > 0)
    print(f"convergence: {options.model}, r={options.rank}, {options.steps} steps x batch {BATCH}, eval every "
          f"{options.eval_every} on {options.eval_examples} held-out train examples; lrs {options.lrs}, "
          f"ScaLoRA L={base_L:g} then L in {options.Ls}, interval {options.interval}; {planned} runs", flush=True)

    runs: list[Run] = []

    def record(run: Run) -> Run:
        runs.append(run)
        minutes = (time.time() - started) / 60
        print(f"  [{len(runs)}/{planned}] {run.name:28} final eval loss {run.final:.4f} at step {run.last_step}"
              f"  {run.mean_step_s():.2f} s/step  (run {run.wall_s:.0f} s; {minutes:.1f} min so far)", flush=True)
        return run

    with tempfile.TemporaryDirectory(prefix="convergence-") as tmp:
        runs_dir = options.keep_runs.resolve() if options.keep_runs else Path(tmp)
        for lr in options.lrs:  # interleaved: load drifts hit both methods alike
            record(run_adapter(options, "lora", lr, None, runs_dir))
            record(run_adapter(options, "scalora", lr, base_L, runs_dir))
        lora_runs = [r for r in runs if r.method == "lora"]
        sc_lr_runs = [r for r in runs if r.method == "scalora"]
        sc_lr = best(sc_lr_runs).lr
        for L in options.Ls:
            if base_L != L:
                record(run_adapter(options, "scalora", sc_lr, L, runs_dir))
        ft_note = "not run (--full-ft-lr 0)"
        if options.full_ft_lr > 0:
            left = deadline - time.time()
            if left < 60:
                ft_note = f"skipped: {left / 60:.1f} min of the {options.budget_minutes:g} min budget left"
                print(f"  full fine-tuning {ft_note}")
            else:
                ft = record(run_full_ft(options, options.full_ft_lr, deadline, runs_dir))
                ft_note = ("complete" if ft.last_step >= options.steps else
                           f"stopped at step {ft.last_step} of {options.steps} (time budget)")

    sc_runs = [r for r in runs if r.method == "scalora"]
    ft_runs = [r for r in runs if r.method == "full_ft"]
    best_lora, best_sc_lr, best_sc = best(lora_runs), best(sc_lr_runs), best(sc_runs)
    L_runs = sorted((r for r in sc_runs if r.lr == sc_lr), key=lambda r: r.L)
    best_L = best(L_runs)
    target = best_lora.final
    chosen = {"LoRA": best_lora, f"ScaLoRA (L={base_L:g})": best_sc_lr}
    if best_sc is not best_sc_lr:
        chosen["ScaLoRA (best lr, L)"] = best_sc
    if ft_runs:
        chosen["full FT"] = ft_runs[0]
    ratio = step_time_ratio(lora_runs, sc_runs)

    # ---- table
    print()
    print(f"{'':22} {'best run':26} {'final eval':>10} {'steps to reach':>16} {'s/step':>7}")
    print(f"{'':22} {'':26} {'loss':>10} {f'LoRA {target:.4f}':>16} {'(all runs)':>7}")
    per_method_s = {m: sum(r.mean_step_s() for r in rs) / len(rs)
                    for m, rs in (("lora", lora_runs), ("scalora", sc_runs), ("full_ft", ft_runs)) if rs}
    for label, run in chosen.items():
        print(f"{label:22} {run.name:26} {run.final:10.4f} {fmt_reach(run.evals, target):>16} "
              f"{per_method_s[run.method]:7.2f}")
    print(f"(steps to reach: first eval step at or below LoRA's final eval loss, eval every {options.eval_every}; "
          "~ linear interpolation between evals)")
    print(f"\nL sweep (ScaLoRA lr={sc_lr:g}, interval {options.interval}):")
    for run in L_runs:
        d = run.diagnostics
        med = d.get("ab_median_per_rescale") or [math.nan]
        print(f"  L={run.L:<6g} final eval loss {run.final:.4f}  reach {fmt_reach(run.evals, target):>12}"
              f"  rescales {d.get('rescales', 0)}, branches column/scalar/skip "
              f"{d.get('share_column', 0):.0%}/{d.get('share_scalar', 0):.0%}/{d.get('share_skip', 0):.0%}, "
              f"median alpha*beta first/last {med[0]:.2f}/{med[-1]:.2f}")
    print(f"  best L: {best_L.L:g}")
    for edge, name in ((best_lora.lr, "LoRA"), (best_sc_lr.lr, "ScaLoRA")):
        if len(options.lrs) > 1 and edge in (min(options.lrs), max(options.lrs)):
            print(f"  note: {name}'s best lr {edge:g} is at an edge of the lr grid {options.lrs}")
    if len(options.Ls) > 1 and best_L.L in (min(options.Ls), max(options.Ls)):
        print(f"  note: the best L {best_L.L:g} is at an edge of the L grid {options.Ls}")
    if ratio:
        print(f"\nScaLoRA / LoRA seconds per step: {ratio['mean_ratio']:.3f} (mean, rescale steps included; "
              f"median per-step ratio {ratio['median_ratio']:.3f}: rescale steps {ratio['rescale_step_ratio']:.2f}, "
              f"other steps {ratio['plain_step_ratio']:.2f}; {ratio['pairs']} paired steps)")
    if ft_runs:
        print(f"full FT / LoRA seconds per step: {per_method_s['full_ft'] / per_method_s['lora']:.2f}; "
              f"full FT at lr {options.full_ft_lr:g} (untuned reference): {ft_note}")
    else:
        print(f"full fine-tuning: {ft_note}")
    mismatched = [r for r in runs if abs(r.evals[0][1] - runs[0].evals[0][1]) > 1e-4 * abs(runs[0].evals[0][1])
                  or abs(r.first_loss - runs[0].first_loss) > 1e-4 * abs(runs[0].first_loss)]
    if mismatched:
        print(f"WARNING: step-0 eval loss or step-1 train loss differ from {runs[0].name}'s in "
              f"{', '.join(r.name for r in mismatched)}: not the same base model, eval set or data stream")
    load_after = os.getloadavg()
    minutes = (time.time() - started) / 60
    print(f"total {minutes:.1f} min; load average (1 min) {load_before[0]:.1f} at start, {load_after[0]:.1f} at end "
          f"on {os.cpu_count()} CPUs (timings are only comparable under similar load)")

    # ---- files
    paths = {extension: result_file(options, extension, "convergence") for extension in ("csv", "png", "json")}
    write_csv(paths["csv"], runs)
    title = (f"Banking77, {options.model}, r={options.rank}, batch {BATCH}, {options.eval_examples} eval examples, "
             f"ScaLoRA interval {options.interval}")
    plot(paths["png"], chosen, runs, target, base_L, title)
    summary = {
        "date": date.today().isoformat(), "machine": machine_name(options), "node": platform.node(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(), "load_average_start_end": [load_before[0], load_after[0]],
        "total_minutes": minutes,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
        "dataset": str(DATA), "target_lora_final_eval_loss": target,
        "best": {label: {"run": run.name, "final_eval_loss": run.final,
                         "steps_to_reach": steps_to_reach(run.evals, target)} for label, run in chosen.items()},
        "best_L": best_L.L, "step_time_ratio_scalora_over_lora": ratio, "full_ft": ft_note,
        "runs": [{"method": r.method, "lr": r.lr, "L": r.L, "final_eval_loss": r.final, "last_step": r.last_step,
                  "mean_step_s": r.mean_step_s(), "wall_s": r.wall_s, "scalora": r.diagnostics} for r in runs],
    }
    paths["json"].write_text(json.dumps(summary, indent=2))
    print(f"wrote {', '.join(map(str, paths.values()))}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER:
        full_ft_worker(Path(sys.argv[2]), float(sys.argv[3]), sys.argv[5:])
    else:
        main()
