"""Sweeps: one row per run, a leaderboard, a plot. `lora report DIR` builds them from any folder of runs;
a Hydra multirun (`lora train -m ...`) builds them for its sweep dir when the last job ends.

Every job leaves `run.json` in its run dir, complete or failed (with the one-line reason), so a summary never
depends on a job having finished well."""

from __future__ import annotations

import csv
import io
import math
import shlex
from pathlib import Path

from hydra.experimental.callback import Callback
from rich.markup import escape

from lora_cli import metrics
from lora_cli.errors import UserError, did_you_mean
from lora_cli.paths import write_atomic
from lora_cli.rundir import find_runs, read_json, record_of

REFUSED = "refused"  # what a sweep job returns when its folder holds another run or the user's files
METRICS = ["trainable_params", "train_loss", "eval_loss", "accuracy", "token_f1", "tokens_per_s", "wall_time_s",
           "peak_rss_mib", "peak_gpu_mib"]
COLUMNS = ["run", "status", "overrides", "swept", "variant", "r", "alpha", *METRICS, "eval_on", "reason"]
HIGHER_IS_BETTER = {"accuracy", "token_f1", "tokens_per_s"}


def row(run_dir: Path, root: Path) -> dict:
    record = record_of(run_dir)
    result = record.get("result", {})
    evaluation = read_json(run_dir / "eval.json") if (run_dir / "eval.json").is_file() else {}
    if evaluation.get("status") == "unreadable":  # cut short or edited: training's numbers, and the reason why
        record, evaluation = {**record, "reason": evaluation["reason"]}, {}
    if record.get("eval_error") and not evaluation:  # trained, but the end-of-run evaluation did not finish
        record = {**record, "status": "eval unfinished", "reason": record["eval_error"]}
    adapter_metrics = evaluation.get("adapter", {})
    peak = result.get("peak_memory", {})
    logged = last_logged(run_dir)  # runs without run.json (an older layout) still have their metrics
    return {
        "run": str(run_dir.relative_to(root)) if run_dir != root else ".",
        "status": record.get("status", "unknown"), "overrides": shlex.join(record.get("overrides", [])),
        "variant": record.get("variant", result.get("variant")), "r": record.get("r", result.get("r")),
        "alpha": record.get("alpha"), "trainable_params": result.get("trainable_params"),
        "train_loss": result.get("train_loss_last", logged.get("loss")),
        "eval_loss": adapter_metrics.get("eval_loss", result.get("eval_loss_after", logged.get("eval_loss"))),
        "accuracy": adapter_metrics.get("accuracy"), "token_f1": adapter_metrics.get("token_f1"),
        "tokens_per_s": result.get("tokens_per_s"), "wall_time_s": result.get("wall_time_s"),
        "peak_rss_mib": mib(peak.get("RSS")), "peak_gpu_mib": mib(peak.get("GPU")),
        "eval_on": eval_source(evaluation, result),
        "reason": record.get("reason", ""),
    }


def mib(size: float | None) -> float | None:
    return size / 2**20 if size else None


def eval_source(evaluation: dict, result: dict) -> str:
    """Which examples the row's eval numbers come from: `lora eval`'s (eval.json; training's caps do not apply
    there) or training's last eval. Rows from different sources are not comparable."""
    if "examples" in evaluation:
        return f"lora eval: {evaluation.get('split')}, {evaluation['examples']} examples"
    return f"training: {result['eval_examples']} examples" if "eval_examples" in result else ""


def last_logged(run_dir: Path) -> dict:
    """The last logged value of each metric in the run's metrics.jsonl ({} if it has none)."""
    path = run_dir / "metrics.jsonl"
    last: dict = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                last.update(metrics.from_line(line))
            except ValueError:  # a line cut short by a killed run
                continue
    return last


def with_swept(rows: list[dict]) -> list[dict]:
    """Each row with `swept`: its overrides that not every run shares. An lr or seed sweep's rows differ in
    nothing else that the summary shows."""
    overrides = [shlex.split(r["overrides"]) for r in rows]
    known = [set(own) for own in overrides if own]  # an unreadable record has none
    shared = set.intersection(*known) if known else set()
    return [{**r, "swept": shlex.join(o for o in own if o not in shared)} for r, own in zip(rows, overrides,
                                                                                            strict=True)]


def sort_key(metric: str):
    def key(r: dict):
        value = r.get(metric)
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return (r["status"] != "complete", missing, 0 if missing else (-value if metric in HIGHER_IS_BETTER else value))

    return key


def summarize(root: Path, metric: str = "eval_loss") -> list[dict]:
    """Write summary.csv and summary.png for every run under root, print the leaderboard; return the rows."""
    if not root.is_dir():
        raise UserError(f"{root}: no such directory; pass a sweep dir (multirun/...) or a folder of runs")
    if metric not in METRICS:
        raise UserError(f"metric={metric}: not a summary column; {did_you_mean(metric, METRICS, 'metric={}')}choose "
                        f"one of: {', '.join(METRICS)}")
    runs = find_runs(root)
    if not runs:
        raise UserError(f"{root} holds no lora-cli runs (no run.json or config.yaml + adapter/ below it)")
    check_summaries_are_ours(root)
    rows = sorted(with_swept([row(run, root) for run in runs]), key=sort_key(metric))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(root / "summary.csv", table.getvalue())
    plot(rows, metric, root / ".summary.partial.png")
    (root / ".summary.partial.png").replace(root / "summary.png")
    from lora_cli.report import leaderboard

    leaderboard(rows, metric, root)
    return rows


def check_summaries_are_ours(root: Path) -> None:
    """summary.csv and summary.png are replaced only where lora wrote them: a folder of runs may hold a user's own
    files by those names (they were overwritten without a word)."""
    csv_file, png_file = root / "summary.csv", root / "summary.png"
    if csv_file.exists():
        with open(csv_file, newline="") as f:
            header = next(csv.reader(f), [])
        if not {"run", "status", "variant", "eval_loss"} <= set(header):
            raise UserError(f"{csv_file} is not a summary lora wrote, and `lora report` would replace it; move it "
                            "away, or report on another folder")
    elif png_file.exists():
        raise UserError(f"{png_file} exists without lora's summary.csv beside it, and `lora report` would replace "
                        "it; move it away, or report on another folder")


def plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    done = [r for r in rows if r["status"] == "complete" and r.get(metric) is not None and r.get("r")]
    fig, (by_rank, by_params) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in sorted({r["variant"] for r in done}):
        points = sorted((r["r"], r["trainable_params"] or 0, r[metric]) for r in done if r["variant"] == variant)
        by_rank.plot([p[0] for p in points], [p[2] for p in points], "o-", label=variant)
        by_params.plot([p[1] for p in points], [p[2] for p in points], "o", label=variant)
    by_rank.set_xscale("log", base=2)
    by_rank.set_xlabel("rank r")
    counts = [r["trainable_params"] for r in done if r["trainable_params"]]
    if counts and max(counts) >= 10 * min(counts):
        by_params.set_xscale("log")
    else:  # within a decade (lora vs slora at one rank: 32,768 vs 32,770) log's tick labels pile up unreadably
        by_params.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        by_params.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    by_params.set_xlabel("trainable parameters")
    for ax in (by_rank, by_params):
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if done:
            ax.legend()
    failed = len(rows) - len(done)
    fig.suptitle(f"{len(done)} runs" + (f" ({failed} failed or without {metric})" if failed else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SummarizeSweep(Callback):
    """Hydra callback (configs/train.yaml, hydra.callbacks): summarise the sweep when its last job ends;
    exit non-zero if any job failed, after every other job has run."""

    def __init__(self) -> None:
        self.refused: list[str] = []  # job folders that held another run or the user's files: those jobs never ran

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status == JobStatus.COMPLETED and job_return.return_value == REFUSED:
            self.refused.append(config.hydra.runtime.output_dir)

    def on_multirun_end(self, config, **kwargs) -> None:
        import sys

        from lora_cli.report import console, quiet_libraries

        quiet_libraries()
        try:
            rows = summarize(Path(config.hydra.sweep.dir))
        except UserError as exc:  # no job ran: the refusals below say why
            rows = []
            if not self.refused:
                console.print(f"lora: error: {escape(str(exc))}")
        for folder in self.refused:
            console.print(f"[red]not run[/]: {escape(folder)} held another run or files of yours (see above); what "
                          "the summary shows for it is that, not this sweep's job")
        if self.refused or not rows or any(r["status"] != "complete" for r in rows):
            sys.exit(1)
