"""A run dir: the folder one `lora train` run owns, and what state it is in.

    README.md, metrics.jsonl   written as the run goes
    checkpoints/step-NNNNNN/   what an unfinished run resumes from (checkpoint.py writes and reads them; a folder
                               with its state.json is complete)
    adapter/, config.yaml      written last, together: the run finished
    run.json                   the run's record: status, overrides, result or the reason it ended (sweeps read it)
    .lock                      held while a run writes into the folder

Who may write into a folder, and what a folder holds, is decided here alone, for `lora train`, `lora report` and the
commands that read a finished run.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_cli.errors import UserError, first_line
from lora_cli.overrides import hydra_quoted
from lora_cli.paths import write_atomic

FOLDER = "checkpoints"
STATE = "state.json"
RUN_RECORD = "run.json"
# Hydra's record of a job: Hydra writes it into a sweep's job folder before the job can check that folder, so it
# proves nothing, and a folder holding only it is as good as empty.
HYDRA_RECORD = ".hydra"
LOCK_FILE = ".lock"  # held by the run writing into the folder (claim_run_dir)


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / FOLDER / f"step-{step:06d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints with their state written, oldest first: by step number, since past step 999,999 the
    names outgrow their zero padding and sort wrongly as text."""
    folder = run_dir / FOLDER
    found = [p for p in folder.glob("step-*") if (p / STATE).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1)


def written_by_a_run(run_dir: Path) -> bool:
    """Whether a lora run has been in this folder: a checkpoint with its state, a run record with lora's fields, or
    metrics in lora's shape (empty until the first record). Names alone prove nothing: a user's folder may hold a
    `checkpoints/` or a `metrics.jsonl` of its own, and its README.md would be overwritten."""
    if complete_checkpoints(run_dir):
        return True
    if {"status", "overrides"} <= _json_object(run_dir / RUN_RECORD, whole=True).keys():
        return True
    logged = run_dir / "metrics.jsonl"
    return logged.is_file() and (logged.stat().st_size == 0 or "step" in _json_object(logged, whole=False))


def _json_object(path: Path, whole: bool) -> dict:
    """The JSON object in a file (or on its first line), {} where there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.loads(f.read() if whole else f.readline())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_run_dir(run_dir: Path, resume: str | None, dir_key: str = "hydra.run.dir") -> None:
    """A run dir is written by one run: a finished one is never touched, an unfinished one only resumed, and a
    folder of the user's own is never written into (a run writes README.md, config.yaml and more there).
    resume=auto on a finished run is the caller's to judge (the same config: nothing to do). dir_key: what picks
    the folder (a sweep's job folders are under hydra.sweep.dir)."""
    named = f"hydra.run.dir={run_dir}" if dir_key == "hydra.run.dir" else f"{run_dir} (a job folder in {dir_key})"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{named} is a file, not a folder; pick a new or empty folder")
    found = sorted(p.name for p in run_dir.iterdir() if p.name not in (HYDRA_RECORD, LOCK_FILE)) \
        if run_dir.is_dir() else []
    if found and not written_by_a_run(run_dir):
        raise UserError(f"{named} holds files that no lora run wrote ({', '.join(found[:3])}"
                        f"{', ...' if len(found) > 3 else ''}) and a run would write README.md, config.yaml and more "
                        "there; pick a new or empty folder")
    if (run_dir / "adapter").exists() and resume != "auto":
        raise UserError(f"{run_dir} already holds a trained adapter; pick another {dir_key} or move that run away")
    existing = complete_checkpoints(run_dir)
    if existing and resume is None:
        raise UserError(f"{run_dir} holds an unfinished run (checkpoint {existing[-1].name}); add resume=auto to "
                        f"continue it, or pick another {dir_key}")


def claim_run_dir(run_dir: Path):
    """Hold the run dir for this run: the open lock file, released when it is closed or the process ends. Two runs
    started in the same second get the same default (timestamped) run dir; they interleaved their metrics and
    one adapter overwrote the other, both exiting 0."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "w")  # noqa: SIM115 (held open: the lock lives as long as the handle)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"another lora run is writing into {run_dir} (one still training there, or one started in "
                        "the same second, which shares the default run dir); wait for it to end, or pick another "
                        "hydra.run.dir") from None
    return handle


def held_by_a_run(run_dir: Path) -> bool:
    """Whether a lora run holds run_dir now (claim_run_dir's lock is taken): it is still training."""
    import fcntl

    try:
        handle = open(run_dir / LOCK_FILE)  # noqa: SIM115 (closed below; read-only, so nothing is truncated)
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def check_finished(run_dir: Path) -> None:
    """A run that eval, generate and merge can read has its config.yaml, written last with the adapter. Without
    it, one line says what the folder holds instead and what to do."""
    if (run_dir / "config.yaml").is_file():
        return
    if held_by_a_run(run_dir):
        raise UserError(f"{run_dir} is still training (a lora process holds it) and has no adapter yet; run "
                        "this again when that run has finished")
    unfinished = complete_checkpoints(run_dir)
    if unfinished:
        raise UserError(f"{run_dir} holds an unfinished run (checkpoint {unfinished[-1].name}, no adapter yet); "
                        f"finish it first: lora train ... resume=auto hydra.run.dir={hydra_quoted(str(run_dir))}")
    record = read_json(run_dir / RUN_RECORD)
    if record.get("status") in ("failed", "interrupted"):  # what ended it, from its run.json
        ended = "failed" if record["status"] == "failed" else "was interrupted"
        raise UserError(f"{run_dir} holds a run that {ended} before it saved an adapter "
                        f"({record.get('reason') or 'no reason recorded'}); train it again")
    raise UserError(f"{run_dir} is not a lora-cli run dir (no config.yaml); pass run=<a dir `lora train` wrote>")


def write_run_record(run_dir: Path, record: dict) -> None:
    """run.json, replaced whole (written aside, then renamed), so that a reader never sees half of it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / RUN_RECORD, json.dumps(record, indent=2))


def find_runs(root: Path) -> list[Path]:
    """Run dirs under `root` (itself included): folders a `lora train` job wrote its record or config into, and
    runs with checkpoints but neither yet (killed, or still training)."""
    found = {p.parent for p in root.rglob(RUN_RECORD)} | {p.parent for p in root.rglob("config.yaml")
                                                           if (p.parent / "adapter").is_dir()}
    found |= {p.parents[2] for p in root.rglob(f"{FOLDER}/step-*/{STATE}")}
    return sorted(found)


def record_of(run_dir: Path) -> dict:
    """What state the run is in: still training (it holds its lock, whatever an earlier attempt's run.json says),
    its run.json, or for a run without one what its folder says: finished (an older layout) or stopped part-way
    (checkpoints, no adapter)."""
    if held_by_a_run(run_dir):
        return {"status": "running", "reason": "still training"}
    if (run_dir / RUN_RECORD).is_file():
        return read_json(run_dir / RUN_RECORD)
    if (run_dir / "adapter").is_dir() and (run_dir / "config.yaml").is_file():
        return {"status": "complete"}
    return {"status": "unfinished", "reason": "stopped before it saved an adapter; finish it: lora train <its "
            f"overrides> resume=auto hydra.run.dir={hydra_quoted(str(run_dir))}"}


def read_json(path: Path) -> dict:
    """A run's JSON record; an unreadable one (cut short, edited) is a row that says so, not a crashed summary."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"status": "unreadable", "reason": f"{path.name}: {first_line(exc)}"}
    return found if isinstance(found, dict) else {"status": "unreadable", "reason": f"{path.name}: not an object"}
