"""Sweeps: `lora train -m` over ranks writes one run per job plus summary.csv/.png; failures are rows too."""

from __future__ import annotations

import csv
import json
import re
import shutil

from conftest import TINY, lora
from test_cli import assert_one_line_error

SWEEP = ["-m", "recipe=banking_support", *TINY, "trainer.max_steps=3", "trainer.eval_every=3"]


def read_summary(folder) -> list[dict]:
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_rank_sweep_summarises_every_job(tmp_path):
    proc = lora("train", *SWEEP, "adapter.r=2,4", "trainer.eval_at_end=true", "eval.max_samples=4",
                "eval.max_new_tokens=4", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    rows = read_summary(tmp_path)
    assert [r["status"] for r in rows] == ["complete", "complete"]
    assert {r["r"] for r in rows} == {"2", "4"}
    assert len({r["trainable_params"] for r in rows}) == 2
    assert all(float(r["eval_loss"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)  # trainer.eval_at_end ran `lora eval`
    assert all((tmp_path / r["run"] / "eval.json").is_file() for r in rows)
    assert {r["eval_on"] for r in rows} == {"lora eval: eval, 4 examples"}
    assert (tmp_path / "summary.png").stat().st_size > 0
    assert len(list(tmp_path.glob("*/adapter/adapter_model.safetensors"))) == 2
    assert "sorted by eval_loss" in " ".join(proc.stdout.split())  # the title may wrap
    # The sweep again with resume=auto, as after an interruption to finish the jobs it never reached: the finished
    # jobs have nothing to do (no refusal, exit 0), and resume= is no swept setting.
    again = lora("train", *SWEEP, "adapter.r=2,4", "trainer.eval_at_end=true", "eval.max_samples=4",
                 "eval.max_new_tokens=4", "resume=auto", f"hydra.sweep.dir={tmp_path}")
    assert again.returncode == 0, again.stderr
    assert " ".join(again.stderr.split()).count("complete already") == 2
    assert sorted(r["swept"] for r in read_summary(tmp_path)) == ["adapter.r=2", "adapter.r=4"]
    # An eval.json cut short (edited by hand) leaves training's numbers in its row, and the row says why.
    (tmp_path / rows[0]["run"] / "eval.json").write_text('{"adapter": {"accur')
    assert lora("report", str(tmp_path)).returncode == 0
    cut, whole = (next(r for r in read_summary(tmp_path) if r["run"] == row["run"]) for row in rows)
    assert cut["status"] == "complete" and cut["accuracy"] == "" and cut["eval_on"] == "training: 16 examples"
    assert cut["reason"].startswith("eval.json: ") and whole["accuracy"] == rows[1]["accuracy"]


def test_parallel_jobs_through_a_launcher_plugin(tmp_path):
    """The README's parallel sweep: the joblib launcher runs the jobs in worker processes of their own; its
    keys (hydra.launcher.n_jobs) are checked as every other key is, against the launcher picked."""
    proc = lora("train", *SWEEP, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "adapter.r=2,4",
                f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    rows = read_summary(tmp_path)
    assert sorted((r["r"], r["status"]) for r in rows) == [("2", "complete"), ("4", "complete")]
    assert len(list(tmp_path.glob("*/adapter/adapter_model.safetensors"))) == 2
    assert_one_line_error(lora("train", *SWEEP, "hydra/launcher=joblib", "hydra.launcher.n_jobz=2", "adapter.r=2,4",
                               f"hydra.sweep.dir={tmp_path / 'typo'}"), "did you mean hydra.launcher.n_jobs?")


def test_a_failed_job_is_a_row_and_the_others_complete(tmp_path):
    proc = lora("train", *SWEEP, "adapter.r=2,0", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode != 0  # the sweep ran to the end, then reports the failure
    rows = {r["r"]: r for r in read_summary(tmp_path)}
    assert rows["2"]["status"] == "complete" and float(rows["2"]["eval_loss"]) > 0
    assert rows["2"]["eval_on"] == "training: 16 examples"
    assert rows["0"]["status"] == "failed" and "adapter.r=0" in rows["0"]["reason"]
    assert (tmp_path / "summary.png").is_file()


def test_the_same_sweep_again_leaves_the_finished_jobs_as_they_were(tmp_path):
    """Job dirs are named by job number and rank: a second identical sweep lands in the first one's folders.
    Each job is refused there before it writes anything, its run.json included."""
    assert lora("train", *SWEEP, "adapter.r=2", f"hydra.sweep.dir={tmp_path}").returncode == 0
    record = next(tmp_path.glob("*/run.json"))
    before = record.read_text()
    again = lora("train", *SWEEP, "adapter.r=2", f"hydra.sweep.dir={tmp_path}")
    assert "already holds a trained adapter" in again.stderr
    assert record.read_text() == before and [r["status"] for r in read_summary(tmp_path)] == ["complete"]
    # The job did not run: the sweep says so and fails, since its summary shows the earlier run, not this job.
    assert again.returncode == 1 and "not run" in again.stderr and str(record.parent) in again.stderr


def test_a_sweep_job_never_writes_into_a_folder_of_the_users_files(tmp_path):
    """Hydra writes its .hydra record into the job folder before the job starts: that is no sign of a lora run,
    and the user's README stays theirs."""
    notes = tmp_path / "0_lora_r2" / "README.md"
    notes.parent.mkdir()
    notes.write_text("my notes")
    proc = lora("train", *SWEEP, "adapter.r=2", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 1 and "holds files that no lora run wrote (README.md)" in proc.stderr
    assert "(a job folder in hydra.sweep.dir)" in " ".join(proc.stderr.split())
    assert notes.read_text() == "my notes" and not (notes.parent / "adapter").exists()


def test_a_sweep_dir_that_is_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    assert_one_line_error(lora("train", *SWEEP, "adapter.r=2", f"hydra.sweep.dir={tmp_path / 'afile'}"),
                          "is a file, not a folder")


def test_the_leaderboard_shows_what_was_swept_and_survives_an_unreadable_record(tmp_path):
    """An lr sweep's rows differ in their overrides alone: the leaderboard shows them. A run.json cut short is a
    row saying so, not a crashed summary."""
    proc = lora("train", *SWEEP, "trainer.lr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["swept"] for r in read_summary(tmp_path)) == ["trainer.lr=0.001", "trainer.lr=0.003"]
    # Piped (as here) the leaderboard is as wide as it needs: every heading and value whole, none cut to "sta…".
    board = proc.stdout.split("sorted by")[1]
    assert "…" not in board and all(word in board for word in ("status", "swept", "trainer.lr=0.001", "eval_loss"))
    next(tmp_path.glob("*/run.json")).write_text('{"status": "comp')
    with open(next(tmp_path.glob("*/metrics.jsonl")), "a") as metrics:
        metrics.write('{"step": 4, "lo')
    report = lora("report", str(tmp_path), "metric=token_f1")
    assert report.returncode == 0, report.stderr
    assert "unreadable: run.json" in " ".join(report.stdout.split())
    assert "unreadable" in [r["status"] for r in read_summary(tmp_path)]


def test_each_job_of_a_sweep_reports_its_own_peak_memory(tmp_path):
    """The jobs share one process: without a reset, its high-water mark (set by a big first job) was every later
    job's peak too. On CUDA the batch lives on the GPU, so the GPU's peak is the one that tells (RSS barely moves)."""
    import torch

    proc = lora("train", *SWEEP, "trainer.max_steps=1", "dataset.max_train_examples=120", "trainer.batch_size=120,1",
                f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    rows = read_summary(tmp_path)
    column = "peak_gpu_mib" if torch.cuda.is_available() else "peak_rss_mib"
    peaks = {re.search(r"trainer.batch_size=(\d+)", r["overrides"])[1]: float(r[column]) for r in rows}
    assert peaks["1"] < 0.6 * peaks["120"], peaks
    if not torch.cuda.is_available():
        assert all(r["peak_gpu_mib"] == "" for r in rows), rows


def test_type_errors_in_a_sweep_stop_it_before_it_starts(tmp_path):
    assert_one_line_error(lora("train", *SWEEP, "adapter.r=2,x", f"hydra.sweep.dir={tmp_path}"), "adapter.r")
    assert not list(tmp_path.iterdir())


def test_report_on_a_folder_of_single_runs(tiny_run, tmp_path):
    shutil.copytree(tiny_run[0], tmp_path / "first")
    shutil.copytree(tiny_run[0], tmp_path / "second", ignore=shutil.ignore_patterns("run.json", "eval.json"))
    proc = lora("report", str(tmp_path), "metric=eval_loss")
    assert proc.returncode == 0, proc.stderr
    rows = read_summary(tmp_path)
    assert {r["run"] for r in rows if r["status"] == "complete"} == {"first", "second"}
    assert all(float(r["eval_loss"]) > 0 for r in rows)
    assert_one_line_error(lora("report", str(tmp_path / "nothing")), "no such directory")
    assert_one_line_error(lora("report", str(tmp_path), "metric=speed"), "metric=speed")
    assert_one_line_error(lora("report", str(tmp_path), "metric=acuracy"), "did you mean metric=accuracy?")
    assert_one_line_error(lora("report", str(tmp_path), "metrc=accuracy"), "takes no metrc=", "did you mean metric=?")
    assert lora("report", str(tmp_path)).returncode == 0  # its own summary, replaced
    # A user's own summary.csv (or summary.png) in the folder: refused, left as it was (it was overwritten).
    (tmp_path / "summary.csv").write_text("quarter,revenue\nQ1,10\n")
    assert_one_line_error(lora("report", str(tmp_path)), "summary.csv is not a summary lora wrote")
    assert (tmp_path / "summary.csv").read_text() == "quarter,revenue\nQ1,10\n"
    (tmp_path / "summary.csv").unlink()
    assert_one_line_error(lora("report", str(tmp_path)), "summary.png exists without")
    assert not list(tmp_path.glob(".summary*"))


def test_report_shows_runs_that_have_not_finished(tmp_path):
    """A run killed part-way (checkpoints, no run.json) and one still training were left out of the table and
    summary.csv without a word; they are rows, with what to do."""
    from lora_cli.rundir import claim_run_dir

    done = tmp_path / "done"
    proc = lora("train", "recipe=banking_support", *TINY, "trainer.max_steps=2", "trainer.save_every=1",
                f"hydra.run.dir={done}")
    assert proc.returncode == 0, proc.stderr
    for name in ("killed", "running", "resumed"):
        shutil.copytree(done / "checkpoints", tmp_path / name / "checkpoints")
        shutil.copy(done / "metrics.jsonl", tmp_path / name)
    # A run that failed once and is training again (resume=auto): its lock, not its old run.json, says what it is.
    (tmp_path / "resumed" / "run.json").write_text(json.dumps({"status": "failed", "reason": "out of memory"}))
    with claim_run_dir(tmp_path / "running"), claim_run_dir(tmp_path / "resumed"):
        report = lora("report", str(tmp_path))
    assert report.returncode == 0, report.stderr
    rows = {r["run"]: r for r in read_summary(tmp_path)}
    assert {name: r["status"] for name, r in rows.items()} == {"done": "complete", "killed": "unfinished",
                                                               "running": "running", "resumed": "running"}
    assert f"resume=auto hydra.run.dir={tmp_path / 'killed'}" in rows["killed"]["reason"]
    assert rows["killed"]["train_loss"] == rows["done"]["train_loss"]  # from its metrics, as far as it got
    assert "killed: unfinished" in " ".join(report.stdout.split())
