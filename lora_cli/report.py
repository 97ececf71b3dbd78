"""What the user sees in the terminal: the progress bar while training and the closing summary table."""

from __future__ import annotations

import os
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lora_cli.launched import rank

# Under accelerate launch every process runs the same code; the main process (rank 0) alone prints.
_QUIET = rank() > 0
console = Console(stderr=True, highlight=False, quiet=_QUIET)
stdout = Console(highlight=False, quiet=_QUIET)


@contextmanager
def progress_bar(total: int, completed: int = 0, disable: bool = False, eval_loss: float = float("nan")):
    """A rich bar showing step, loss, lr, tokens/s, latest eval loss (from the start: the step-0 eval's, or a
    resumed run's last) and ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"
                   "  eval {task.fields[eval_loss]:.4f}"),
        TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=disable)
    task = progress.add_task("train", total=total, completed=completed, loss=float("nan"), lr=0.0, tps=0.0,
                             eval_loss=eval_loss)
    with progress:
        yield progress, task


def print_data_plan(train, evaluation, steps: int, step_size: int, epochs: float, trainable: int,
                    total: int) -> None:
    skipped = f"{train.truncated + evaluation.truncated} truncated, {train.dropped + evaluation.dropped} dropped"
    console.print(f"data: {len(train.examples)} train / {len(evaluation.examples)} eval examples "
                  f"({train.tokens:,} train tokens, {train.label_tokens:,} with labels; {skipped}) | "
                  f"{steps} steps of {step_size} examples ({epochs:g} epochs) | "
                  f"trainable params {trainable:,} of {total:,}")
    warn_eval_in_train(evaluation.also_in_train, len(evaluation.examples), evaluation.columns_read)


def warn_eval_in_train(duplicates: int, eval_examples: int, columns: tuple[str, ...]) -> None:
    """Eval numbers on examples the adapter trained on flatter it: worth a warning in the plan and in the run. The
    conversations are made of the columns read alone: rows that differ only in another column (an Alpaca `input`)
    are the same conversation to the model, so the warning names what was read."""
    if duplicates:
        read = f"the column{'s' if len(columns) > 1 else ''} read: {', '.join(columns)}; other columns are not read"
        console.print(f"[yellow]warning: {duplicates} of {eval_examples} eval examples are also in the train split "
                      f"(identical conversations, from {escape(read)}), so eval loss and metrics will flatter the "
                      "adapter; remove the duplicates from the data, or make the columns read tell the rows apart[/]")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_seconds(seconds: int) -> str:
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def print_plan(plan: dict) -> None:
    table = Table(title="lora train --dry-run: the plan (nothing was trained or written)", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("model", plan["model"]), ("adapter", plan["adapter"]), ("precision", plan["precision"]),
        ("examples", f"{plan['train_examples']:,} train, {plan['eval_examples']:,} eval "
                     f"({plan['truncated']} truncated, {plan['dropped']} dropped; longest {plan['longest']} tokens)"),
        ("tokens", f"{plan['train_tokens']:,} train tokens, {plan['label_tokens']:,} with labels"),
        ("steps", f"{plan['steps']:,} x {plan['examples_per_step']} examples ({plan['epochs']} epochs)"
                  + (f"; resuming after step {plan['steps_done']:,}" if plan["steps_done"] else "")),
        ("trainable params", f"{plan['trainable_params']:,} of {plan['total_params']:,} "
                             f"({100 * plan['trainable_params'] / plan['total_params']:.2f}%)"),
        ("peak memory", f"~{format_bytes(plan['peak_memory_bytes'])} {plan['peak_memory_of']} (estimate)"),
        ("time", f"~{format_seconds(plan['train_seconds'])} training, ~{format_seconds(plan['eval_seconds'])} for "
                 f"{plan['evals']} evals (estimate from this machine's matmul speed, measured in the run's precision)"),
    ]
    if plan["eval_at_end"]:
        rows.append(("end-of-run eval", plan["eval_at_end"]))
    for name, value in rows:
        table.add_row(name, value)
    stdout.print(table)
    warn_eval_in_train(plan["eval_also_in_train"], plan["eval_examples"], plan["eval_columns_read"])


def print_summary(result: dict) -> None:
    table = Table(title="lora train: summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    memory = ", ".join(f"{k} {format_bytes(v)}" for k, v in result["peak_memory"].items())
    rows = [
        ("steps", f"{result['steps']}"),
        ("adapter", f"{result['variant']} r={result['r']}"),
        ("train loss", f"{result['train_loss_first']:.4f} -> {result['train_loss_last']:.4f}"),
        ("eval loss", f"{result['eval_loss_before']:.4f} -> {result['eval_loss_after']:.4f}"),
        ("tokens/s", f"{result['tokens_per_s']:.0f} ({result['precision']})"),
        ("wall time", f"{result['wall_time_s']:.1f} s"),
        ("peak memory", memory),
        ("trainable params", f"{result['trainable_params']:,} of {result['total_params']:,} "
                             f"({100 * result['trainable_params'] / result['total_params']:.2f}%)"),
        ("examples", f"{result['train_examples']} train, {result['eval_examples']} eval "
                     f"({result['truncated']} truncated, {result['dropped']} dropped)"),
        ("adapter path", f"{result['run_dir']}/adapter"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    stdout.print(table)


def quiet_libraries() -> None:
    """Keep the terminal for our own progress bar: libraries' bars and info logs go, warnings stay."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. the GGUF conversion's bar, which ignores the settings below
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    for name in ("matplotlib", "bitsandbytes", "accelerate", "peft", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    # bitsandbytes' CPU 4-bit matmul: its gradients are checked against a dequantized model in the tests.
    warnings.filterwarnings("ignore", message=".*gemv_4bit: an autograd kernel was not registered.*")


@contextmanager
def progress_steps(label: str, total: int):
    """A plain bar for a loop of `total` steps; yields the function that advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=console, transient=True)
    task = progress.add_task(label, total=total)
    with progress:
        yield lambda: progress.advance(task)


def eval_table(report: dict) -> None:
    """Base model and adapter side by side, the adapter's most confused labels, then a few sample outputs.
    Every task-metric row names the label mode that produced it; the loss rows are teacher-forced."""
    mode = report["label_mode"]
    table = Table(title=f"lora eval: {report['dataset']} ({report['split']}, {report['examples']} examples, "
                        f"label_mode={mode}: {report['decoding']})", title_justify="left")
    for column in ("", "base model", "with adapter"):
        table.add_column(column, justify="right" if column else "left")
    rows = [("eval loss", "eval_loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}")]
    if report["metric"] == "exact_match":
        rows += [(f"accuracy, exact label ({mode})", "accuracy", "{:.1%}"),
                 (f"macro-F1 ({mode})", "macro_f1", "{:.3f}"),
                 (f"not a valid label ({mode})", "invalid_labels", "{}")]
    else:
        rows += [("token F1", "token_f1", "{:.3f}")]
    for name, key, fmt in rows:
        table.add_row(name, fmt.format(report["base"][key]), fmt.format(report["adapter"][key]))
    stdout.print(table)
    if report.get("trained_on"):
        own_split = not any(o.lstrip("+~").startswith("dataset") for o in report.get("overrides", []))
        fix = "the data has these conversations in both splits: remove the duplicates and train again" if own_split \
            else "evaluate on data it did not train on (the run's own eval split: leave the dataset as trained)"
        console.print(f"[yellow]warning: {report['trained_on']} of these {report['examples']} eval examples are in "
                      f"the run's training data, so the numbers flatter the adapter; {fix}[/]")
    if report.get("trained_on_unknown"):
        console.print(f"[yellow]warning: which of these eval examples the run trained on is unknown: "
                      f"{escape(report['trained_on_unknown'])}; if some are, the numbers flatter the adapter (train "
                      "again on today's files, or restore the files it trained on)[/]")
    confused = report["adapter"].get("confused")
    if confused:
        pairs = Table(title=f"most confused labels, with adapter ({mode})", title_justify="left")
        for column in ("gold", "predicted", "count"):
            pairs.add_column(column, justify="right" if column == "count" else "left")
        for pair in confused:
            pairs.add_row(escape(pair["gold"]), escape(pair["predicted"]), str(pair["count"]))
        stdout.print(pairs)
    if report.get("confusion_png"):
        stdout.print(f"confusion matrix (with adapter): {report['confusion_png']}", markup=False)
    for sample in report["samples"]:
        # Data and model outputs are text, never markup: `[settings]` must print, `[/x]` must not crash.
        prompt, gold, base, adapter = (escape(sample["prompt"]),
                                       *(escape(repr(sample[k])) for k in ("gold", "base", "adapter")))
        stdout.print(f"[bold]prompt[/]  {prompt}\n[bold]gold[/]    {gold}\n[bold]base[/]    {base}\n"
                     f"[bold]adapter[/] {adapter}\n", markup=True, highlight=False)


def merge_table(result: dict) -> None:
    """The merge's summary. Parity is checked on the fp32 checkpoint as reloaded from disk; a lower merge.dtype is
    checked on the fp32 merge in memory, and its storage rounding has a row of its own."""
    fp32 = result["dtype"] == "float32"
    checked = result["saved_max_abs_diff"] if fp32 else result["merge_max_abs_diff"]
    where = ", reloaded from disk" if fp32 else f", fp32 merge before storing {result['dtype']}"
    table = Table(title="lora merge: summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in [
        ("output", escape(result["output"])), ("stored dtype", result["dtype"]),
        ("parameters", f"{result['parameters']:,}"),
        ("parity", f"{result['parity']}: max |merged - (base + adapter)| = {checked:.2e} "
                   f"on {result['probes']} eval examples{where} (allowed {result['allowed_max_abs_diff']:.2e}: "
                   f"merge.tolerance={result['tolerance']:g} of the largest logit, {result['max_abs_logit']:.3g})"),
    ]:
        table.add_row(name, value)
    if not fp32:
        table.add_row(f"{result['dtype']} storage", f"max |saved - (base + adapter)| = "
                                                    f"{result['saved_max_abs_diff']:.2e} (the rounding of storing "
                                                    f"{result['dtype']}; reported, not checked)")
    if result.get("quantized_max_abs_diff") is not None:
        table.add_row("4-bit base error", f"max |(4-bit base + adapter) - merged| = "
                                          f"{result['quantized_max_abs_diff']:.3g} (the quantisation error the "
                                          "full-precision merge removes; reported, not checked)")
    export = result.get("lowrank_export")
    if export:
        table.add_row(f"rank-{export['rank']} export", f"{result['output']}/{export['folder']}: stock peft LoRA; "
                      f"relative error per module median {export['median_rel_error']:.3g}, max "
                      f"{export['max_rel_error']:.3g}; max logit difference {export['max_abs_logit_diff']:.3g}")
    stdout.print(table)


def leaderboard(rows: list[dict], metric: str, root) -> None:
    """The runs, best first by `metric` (always shown), with what was swept (sweep.with_swept)."""
    from lora_cli.sweep import METRICS

    table = Table(title=f"lora report: {escape(str(root))} (sorted by {metric})", title_justify="left")
    columns = ["run", "status", "swept", "variant", "r", *METRICS]
    columns = [c for c in columns if c == metric or any(r.get(c) not in (None, "") for r in rows)]
    for column in columns:  # folded, not cut to "sta…", where a terminal is narrow
        table.add_column(column, justify="left" if column in ("run", "status", "swept", "variant") else "right",
                         style="bold" if column == metric else None, overflow="fold")
    for r in rows:
        table.add_row(*[_cell(r.get(c)) for c in columns])
    # Piped or logged, the table is as wide as it needs rather than the 80 columns assumed without a terminal.
    (stdout if stdout.is_terminal else Console(highlight=False, quiet=stdout.quiet, width=240)).print(table)
    for r in rows:
        if r["status"] != "complete":
            stdout.print(f"[red]{escape(r['run'])}: {r['status']}[/]: {escape(str(r['reason']))}")
    sources = {r["eval_on"] for r in rows if r.get("eval_on")}
    if len(sources) > 1:
        stdout.print(f"[yellow]the eval numbers come from {len(sources)} different sets of examples (summary.csv's "
                     "eval_on: `lora eval` or training's last eval); run `lora eval` on every run to compare them[/]")
    stdout.print(f"wrote {root}/summary.csv and {root}/summary.png")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return escape(str(value))  # run names are folder names: `r[old]` is text, not markup
