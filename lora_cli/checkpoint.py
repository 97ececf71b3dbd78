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
from lora_cli.rundir import FOLDER, STATE, complete_checkpoints

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
