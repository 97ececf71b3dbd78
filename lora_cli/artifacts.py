"""What a run leaves behind: the adapter (safetensors + provenance), the resolved config, the loss plot and
the model card. Writers here only write; they decide nothing about training."""

from __future__ import annotations

import contextlib
import hashlib
import json
import resource
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from lora_cli import __version__
from lora_cli.config import RunConfig
from lora_cli.models import Checkpoint
from lora_cli.paths import full_disk_as_error, publish, staging_dir, write_atomic

# Base weights a variant changed during training (ScaLoRA merges into them), keyed as in the base checkpoint;
# written beside the adapter so pristine base + these + the adapter reproduce the trained model exactly.
BASE_WEIGHTS = "base_weights.safetensors"


def config_yaml(cfg: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def provenance(checkpoint: Checkpoint, data_fingerprint: str, cfg: RunConfig,
               system_prompt: str | None = "") -> dict[str, str]:
    """Where an adapter came from; stored in the safetensors header, where it travels with the weights.
    system_prompt: the system turn every training conversation opened with (data.shared_system_prompt), as JSON
    (a string, "" for none, null where they differed), which `lora generate` opens with."""
    return {
        "lora_cli_version": __version__,
        "base_model": checkpoint.model_id,
        "base_model_sha256": checkpoint.sha256,
        "base_model_path": str(checkpoint.path),
        "dataset": cfg.dataset.name,
        "dataset_fingerprint": data_fingerprint,
        "system_prompt": json.dumps(system_prompt),
        "config_sha256": hashlib.sha256(config_yaml(cfg).encode()).hexdigest(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    write_atomic(run_dir / "config.yaml", config_yaml(cfg))


def check_adapter_tensors(tensors: dict) -> None:
    """Refuse to write an adapter with nothing in it. Under FSDP / ZeRO-3 a process holds only a shard of each
    tensor (ZeRO-3: a tensor of size 0), so an adapter saved without gathering them first is empty, and
    loads without complaint."""
    empty = sorted(name for name, tensor in tensors.items() if tensor.numel() == 0)
    if empty or not any("lora_" in name for name in tensors):
        found = f"{len(empty)} of {len(tensors)} tensors have no elements (e.g. {empty[0]})" if empty else \
            f"no lora_ tensor among {len(tensors)}"
        raise RuntimeError(f"refusing to save an empty adapter: {found}; were sharded parameters saved "
                           "without gathering them from every process?")


def save_adapter(variant, model, tokenizer, out_dir: Path, metadata: dict[str, str],
                 state_dict: dict | None = None) -> None:
    """Save a stock-peft-loadable adapter (and any files the variant adds) atomically: written beside, then
    renamed into place, so an `adapter/` folder is always complete, and never empty (`check_adapter_tensors`).

    `state_dict`: the adapter's tensors gathered from every process when they were sharded (FSDP, ZeRO-3;
    plain LoRA only, `launched.check_supported`); None: peft reads them from the model."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    partial = staging_dir(out_dir)
    try:
        with full_disk_as_error(f"the adapter to {out_dir}", "free space, then resume=auto continues from the "
                                "newest checkpoint (trainer.save_every keeps them), or run again"):
            if state_dict is None:
                variant.save(model, partial)
            else:
                check_adapter_tensors(state_dict)
                model.save_pretrained(partial, safe_serialization=True, state_dict=state_dict)
            (partial / "README.md").unlink(missing_ok=True)  # peft's empty template; the run's README is the card
            tokenizer.save_pretrained(partial)
            weights = partial / "adapter_model.safetensors"
            with safe_open(weights, "pt") as f:
                header = f.metadata() or {}
            tensors = load_file(weights)
            check_adapter_tensors(tensors)
            save_file(tensors, weights, metadata={**header, **metadata})
            publish(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this program (and peak CUDA memory when on a GPU), in bytes.

    VmHWM where /proc has it: it belongs to this program's address space, which exec starts afresh. getrusage's
    ru_maxrss survives exec, so a `lora train` started from a large process (a notebook, a test worker holding
    models) would report that process's size as its own peak: 1.79 GiB for a 1.0 GiB run under pytest."""
    import torch

    peak = {"RSS": _proc_status_bytes("VmHWM")}
    if peak["RSS"] is None:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
        peak["RSS"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    if torch.cuda.is_available():
        peak["GPU"] = torch.cuda.max_memory_allocated()
    return peak


def reset_peak_memory() -> None:
    """Start this run's peak afresh. A sweep runs its jobs in one process, whose high-water mark would carry the
    largest earlier job into every later one (a batch-1 job reported a batch-200 job's 5.9 GiB); freed heap goes
    back to the OS first (malloc_trim), so what an earlier job kept for reuse does not count either. Linux
    (/proc/self/clear_refs) and CUDA; elsewhere the peak stays the process's."""
    import ctypes
    import ctypes.util

    import torch

    with contextlib.suppress(OSError, AttributeError, TypeError):  # no glibc (macOS, musl)
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    with contextlib.suppress(OSError):  # no /proc
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def resident_memory() -> int:
    """This process's resident memory now, in bytes; its peak where /proc is missing (macOS). A peak would count
    what a step before took once and gave back, such as converting the embedded GGUF on a first run."""
    current = _proc_status_bytes("VmRSS")
    return int(peak_memory()["RSS"]) if current is None else current


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (kB there), in bytes; None without /proc."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith(f"{field}:")), None)


def plot_loss(train_loss: list[tuple[int, float]], eval_loss: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train_loss, strict=True), label="train", linewidth=1)
    ax.plot(*zip(*eval_loss, strict=True), "o-", label="eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per label token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


MODEL_CARD = """# {title}

A {variant} adapter (r={r}, alpha={alpha}) for **{base_model}**, trained with lora-cli {version} on
`{dataset}`.

| | |
| --- | --- |
| base model | `{base_model}` (sha256 `{base_sha}`) |
| base weights loaded from | `{base_path}` |
| dataset | `{dataset}` (fingerprint `{data_fp}`) — {train_examples} train / {eval_examples} eval examples |
| adapter | {variant}, r={r}, alpha={alpha}, dropout={dropout}, targets `{targets}`, layers `{layers}` |
| trainable parameters | {trainable:,} of {total:,} |
| steps | {steps} (lr {lr}, {schedule} schedule, batch {batch} x {accum} accumulation) |
| train loss | {train_first:.4f} -> {train_last:.4f} |
| eval loss | {eval_before:.4f} -> {eval_after:.4f} |
| throughput | {tps:.0f} tokens/s, wall time {wall:.0f} s |

![loss](loss.png)

## Reproduce

```bash
{command}
```

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base_path}")
model = PeftModel.from_pretrained(base, "{adapter_dir}")
tokenizer = AutoTokenizer.from_pretrained("{adapter_dir}")
```

{variant_note}The full resolved config is in `config.yaml`; per-step metrics in `metrics.jsonl`. Provenance (base model
hash, dataset fingerprint, config hash, lora-cli version) is also stored in the metadata of
`adapter/adapter_model.safetensors`.
"""


def variant_note(run_dir: Path, variant: str) -> str:
    if not (run_dir / "adapter" / BASE_WEIGHTS).is_file():
        return ""
    return (f"**This adapter changed its base weights during training ({variant}): stock peft alone "
            f"cannot load it.** Put `adapter/{BASE_WEIGHTS}` into the base first (`base.load_state_dict(...,"
            " strict=False)`), or use `lora eval/generate/merge`; `lora merge ... merge.export_rank=k` also writes a "
            "stock peft LoRA of rank k (lossy, its error reported).\n\n")


def write_model_card(run_dir: Path, cfg: RunConfig, result: dict, prov: dict[str, str], command: str) -> None:
    adapter = cfg.adapter
    text = MODEL_CARD.format(
        title=f"{cfg.dataset.name} {adapter.name} adapter for {prov['base_model']}",
        variant=adapter.name, r=adapter.r, alpha=adapter.alpha, dropout=adapter.dropout,
        targets=adapter.target_modules, layers=adapter.layers if adapter.layers is not None else "all",
        base_model=prov["base_model"], base_sha=prov["base_model_sha256"], base_path=prov["base_model_path"],
        version=__version__, dataset=cfg.dataset.name, data_fp=prov["dataset_fingerprint"][:16],
        train_examples=result["train_examples"], eval_examples=result["eval_examples"],
        trainable=result["trainable_params"], total=result["total_params"], steps=result["steps"],
        lr=cfg.trainer.lr, schedule=cfg.trainer.schedule, batch=cfg.trainer.batch_size,
        accum=cfg.trainer.grad_accum, train_first=result["train_loss_first"],
        train_last=result["train_loss_last"], eval_before=result["eval_loss_before"],
        eval_after=result["eval_loss_after"], tps=result["tokens_per_s"], wall=result["wall_time_s"],
        command=command, adapter_dir=run_dir.resolve() / "adapter", variant_note=variant_note(run_dir, adapter.name))
    write_atomic(run_dir / "README.md", text)
