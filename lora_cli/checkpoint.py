"""Resumable training state: written atomically, read back exactly, never pickled.

A checkpoint is a folder `RUN_DIR/checkpoints/step-NNNNNN/`:

    model.safetensors      every trainable parameter by name, plus the variant's own state ("variant." keys)
    optimizer.safetensors  the optimizer's per-parameter tensors ("<param index>.<name>")
    rng.safetensors        torch's CPU (and CUDA) generator states, one set per process
    state.json             step, data position, counters, optimizer param groups, scheduler, Python/NumPy RNG
    metrics.jsonl          the run's metrics up to this step (a resumed run's metrics continue from these)
    config.yaml            the run config, to refuse resuming a different run

It is written into a temp folder, fsync'ed and renamed into place, so a folder named step-N is complete;
`state.json` is written last and is what marks one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_cli import metrics
from lora_cli.errors import UserError, first_line
from lora_cli.paths import full_disk_as_error, publish, staging_dir
from lora_cli.sweep import RUN_RECORD

FOLDER = "checkpoints"
STATE = "state.json"
# Keys that may differ between a checkpoint's run and the run resuming it: they change no update. The launch
# keys say how the processes start and where they meet (machine_rank differs between the machines of one run).
# The memory keys are what one changes to resume a run that ran out of memory: recomputed activations are the
# same numbers (torch's checkpointing replays the dropout masks), and eval batches only measure.
RESUMABLE_CHANGES = ("resume", "debug", "trainer.save_every", "trainer.keep_checkpoints", "trainer.eval_every",
                     "trainer.eval_at_end", "trainer.on_nonfinite", "trainer.launcher", "trainer.num_machines",
                     "trainer.machine_rank", "trainer.main_process_", "trainer.gradient_checkpointing",
                     "trainer.eval_batch_size", "trainer.keep_freed_memory", "eval.", "generate.", "merge.")


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, examples consumed from the data stream, and counters."""

    step: int = 0
    consumed: int = 0
    tokens: int = 0
    train_time: float = 0.0
    data_fingerprint: str = ""  # data.prepare's hash of the examples: a resumed run must train on the same ones


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / FOLDER / f"step-{step:06d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints with their state written, oldest first: by step number, since past step 999,999 the
    names outgrow their zero padding and sort wrongly as text."""
    folder = run_dir / FOLDER
    found = [p for p in folder.glob("step-*") if (p / STATE).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1)


# Hydra's record of a job: Hydra writes it into a sweep's job folder before the job can check that folder, so it
# proves nothing, and a folder holding only it is as good as empty.
HYDRA_RECORD = ".hydra"
LOCK_FILE = ".lock"  # held by the run writing into the folder (claim_run_dir)


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
        raise UserError(f"another lora run is writing into {run_dir} (runs started in the same second share the "
                        "default run dir); pick another hydra.run.dir") from None
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


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: `auto` is the newest in run_dir (None if it has none yet)."""
    if resume is None:
        return None
    if resume == "auto":
        existing = complete_checkpoints(run_dir)
        path = existing[-1] if existing else None
    else:
        path = Path(resume).expanduser()
        if not (path / STATE).is_file():
            raise UserError(f"resume={resume} is not a lora-cli checkpoint (no {STATE} in it); pass a "
                            f"RUN_DIR/{FOLDER}/step-NNNNNN folder, or resume=auto with hydra.run.dir=RUN_DIR")
    if path is not None:
        check_intact(path)
    return path


CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "metrics.jsonl",
                    "config.yaml", STATE)


def check_intact(path: Path) -> None:
    """Every file a resume reads, readable, before anything is loaded: a checkpoint damaged after it was written
    (a disk error, a file removed by hand) is named with the checkpoint to use instead, not met as a traceback."""
    from omegaconf import OmegaConf
    from safetensors import safe_open

    for name in CHECKPOINT_FILES:
        file = path / name
        try:
            if file.suffix == ".safetensors":
                with safe_open(file, "pt"):
                    pass
            elif file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".jsonl":
                for line in file.read_text().splitlines():
                    json.loads(line)
            else:
                OmegaConf.create(file.read_text())
        except Exception as exc:
            siblings = [p.resolve() for p in complete_checkpoints(path.parent.parent)]
            earlier = siblings[:siblings.index(path.resolve())] if path.resolve() in siblings else []
            instead = f"resume from the one before with resume={earlier[-1]}" if earlier else \
                "it is the run's only one: start a new run"
            reason = first_line(exc, 120)
            raise UserError(f"checkpoint {path} is damaged ({name}: {reason}); {instead}") from None


def check_same_run(path: Path, config_yaml: str) -> None:
    """Refuse to resume a checkpoint of a different config, naming the keys that differ."""
    from omegaconf import OmegaConf

    def flat(text: str) -> dict:
        return _flatten(OmegaConf.to_container(OmegaConf.create(text)))

    saved, current = flat((path / "config.yaml").read_text()), flat(config_yaml)
    differ = sorted(k for k in saved.keys() | current.keys()
                    if saved.get(k) != current.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if differ:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise UserError(f"resume={path} belongs to a run with a different config: {shown}{more}; resume with "
                        "the same settings or start a new run")


def saved_state(path: Path) -> dict:
    """A checkpoint's state.json: the train state, the optimizer's and scheduler's, the Python / NumPy generators."""
    return json.loads((path / STATE).read_text())


def check_same_data(path: Path, fingerprint: str) -> None:
    """Refuse to resume on examples other than the checkpoint's: the config can be the same while the files it
    names were edited, and the data order and the steps left would then belong to neither."""
    saved = saved_state(path)["state"].get("data_fingerprint")
    if saved and saved != fingerprint:
        raise UserError(f"resume={path} was trained on other examples (data fingerprint {saved[:12]}, now "
                        f"{fingerprint[:12]}): the dataset's files changed since; restore them, or start a new run")


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _flatten(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def save(path: Path, model, variant, optimizer, scheduler, state: TrainState, records: list[dict],
         config_yaml: str, keep: int, rng: list[dict]) -> None:
    """Write one checkpoint atomically, then keep only the newest `keep`. `rng` holds every process's
    generator states (`rng_state()`, gathered). Out of disk space leaves the previous checkpoints intact."""
    from safetensors.torch import save_file

    tmp = staging_dir(path)
    try:
        with full_disk_as_error(f"checkpoint {path}", "free space and resume from the previous checkpoint with "
                                "resume=auto"):
            save_file(_model_tensors(model, variant), tmp / "model.safetensors")
            optimizer_tensors, optimizer_json = _split_optimizer(optimizer.state_dict())
            save_file(optimizer_tensors, tmp / "optimizer.safetensors")
            save_file({f"{rank}.{k}": v for rank, r in enumerate(rng) for k, v in r["torch"].items()},
                      tmp / "rng.safetensors")
            (tmp / "metrics.jsonl").write_text("".join(map(metrics.to_line, records)))
            (tmp / "config.yaml").write_text(config_yaml)
            state_json = {"state": asdict(state), "optimizer": optimizer_json, "scheduler": scheduler.state_dict(),
                          "rng": [r["python"] for r in rng]}
            (tmp / STATE).write_text(json.dumps(state_json))
            _fsync_tree(tmp)
            publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in complete_checkpoints(path.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def restore(path: Path, model, variant, optimizer, scheduler) -> tuple[TrainState, list[dict]]:
    """Load a checkpoint into a freshly built model/optimizer/scheduler; returns the state and the metrics so
    far. Call `restore_rng` separately, last, right before the first resumed step."""
    from safetensors.torch import load_file

    tensors = load_file(path / "model.safetensors")
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if not name.startswith("variant."):
            params[name].data.copy_(value)
    variant.load_state_tensors(model, {k.removeprefix("variant."): v for k, v in tensors.items()
                                       if k.startswith("variant.")})
    saved = saved_state(path)
    optimizer.load_state_dict(_join_optimizer(load_file(path / "optimizer.safetensors"), saved["optimizer"]))
    scheduler.load_state_dict(saved["scheduler"])
    records = [metrics.from_line(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return TrainState(**saved["state"]), records


def rng_state() -> dict:
    """This process's generators: torch CPU (and CUDA) as tensors, Python and NumPy as JSON-able lists."""
    import numpy as np
    import torch

    generators = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        generators.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": generators,
            "python": {"python": list(random.getstate()), "numpy": [name, keys.tolist(), pos, has_gauss, cached]}}


def restore_rng(path: Path, rank: int) -> None:
    """Put back process `rank`'s generators (dropout masks continue exactly where they stopped)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    generators = load_file(path / "rng.safetensors")
    torch.set_rng_state(generators[f"{rank}.cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([generators[f"{rank}.cuda{i}"] for i in range(torch.cuda.device_count())
                                      if f"{rank}.cuda{i}" in generators])
    saved = saved_state(path)["rng"][rank]
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _model_tensors(model, variant) -> dict:
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    tensors.update({f"variant.{k}": v.detach().contiguous() for k, v in variant.state_tensors(model).items()})
    return tensors


def _split_optimizer(state_dict: dict) -> tuple[dict, dict]:
    """Tensors to safetensors, everything else (hyperparameters, non-tensor state) to JSON."""
    import torch

    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict, saved: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *saved["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": saved["param_groups"]}


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
