"""`lora merge`: fold the adapter into a full-precision copy of the base and ship a plain transformers
checkpoint, verified before it is kept.

The checkpoint is written into a temporary folder beside OUT_DIR, reloaded from disk, and its logits are
compared with base + adapter on probe inputs from the eval split. Only if they agree is it renamed into
place, so an OUT_DIR that exists is always complete and verified."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

from lora_cli import __version__
from lora_cli.config import RunConfig
from lora_cli.data import collate, load_train_eval, sample, to_messages, tokenize_nonempty
from lora_cli.errors import UserError
from lora_cli.paths import full_disk_as_error, publish, staging_dir
from lora_cli.report import merge_table
from lora_cli.runs import load_adapted

MERGE_RECORD = "lora_cli_merge.json"  # written into every merged checkpoint; marks what merge.overwrite may replace


def check_output(out_dir: Path, run_dir: Path, overwrite: bool) -> None:
    """OUT_DIR is replaced as a whole, so it must not hold the run being merged, and only an earlier merge's
    output is replaced (merge.overwrite=true): never a folder of the user's own."""
    if out_dir.resolve() in (run_dir.resolve(), *run_dir.resolve().parents):
        raise UserError(f"output={out_dir} holds the run being merged ({run_dir}) and would be replaced; choose a "
                        "folder outside it")
    here = Path.cwd().resolve()
    if out_dir.resolve() in (here, *here.parents):  # `output=.` in an earlier merge's folder: it was emptied
        raise UserError(f"output={out_dir} is the folder this command runs in (or holds it), and a merge replaces its "
                        "output as a whole; run from another folder or choose another output")
    if out_dir.is_symlink():
        raise UserError(f"output={out_dir} is a symbolic link, and a merge replaces its output as a whole; pass the "
                        f"folder it points to ({out_dir.resolve()}) or a new one")
    blocking = next((parent for parent in out_dir.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None or out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output={out_dir}: {blocking or out_dir} is a file, not a folder; choose another output")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise UserError(f"output={out_dir} exists and is not empty; choose another output or add merge.overwrite=true")
    if not (out_dir / MERGE_RECORD).is_file():
        raise UserError(f"output={out_dir} is not an earlier lora merge output (it has no {MERGE_RECORD}), and "
                        "merge.overwrite=true replaces only those; choose another output")


def probe_batch(cfg: RunConfig, tokenizer) -> dict:
    """A few real eval examples (prompt and reply), padded into one batch."""
    _, eval_rows = load_train_eval(cfg.dataset)
    rows = sample(eval_rows, cfg.merge.probes)
    split = tokenize_nonempty([to_messages(r, cfg.dataset) for r in rows], tokenizer, cfg.dataset,
                              f"merge probes from dataset {cfg.dataset.name!r} (eval split)")
    return collate(split.examples, pad_id=tokenizer.pad_token_id)


def logits(model, batch: dict):
    import torch

    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return out * batch["attention_mask"][..., None]  # padded positions are not part of the contract


def quantized_distance(run_dir: Path, cfg: RunConfig, probes: dict, reference) -> float:
    """How far the model as trained (4-bit base + adapter) is from the full-precision merge: the
    quantisation error the merged checkpoint removes. Expected non-zero; reported, never failed on."""
    trained = load_adapted(run_dir, cfg, device="cpu")
    return (logits(trained.model, probes) - reference).abs().max().item()


def export_lowrank(adapted, cfg: RunConfig, probes: dict, reference, out_dir: Path) -> dict:
    """A ScaLoRA run as a stock peft LoRA of rank k: truncated SVD of each module's total update (merged base
    weights + adapter - pristine base). Lossy: reports each module's relative error and how far the
    exported adapter's logits (on the pristine base) are from the trained model's."""
    import statistics

    from peft import PeftModel

    from lora_cli.adapters.scalora import export_lowrank_adapter
    from lora_cli.models import load_model

    if not adapted.pristine:
        raise UserError("merge.export_rank re-ranks the high-rank update of a ScaLoRA run; this run's adapter is "
                        "already a stock rank-r LoRA (drop merge.export_rank)")
    errors = export_lowrank_adapter(adapted.model, adapted.pristine, cfg.merge.export_rank, out_dir)
    pristine_base = load_model(adapted.checkpoint, cfg.model, adapted.tokenizer)
    exported = PeftModel.from_pretrained(pristine_base, out_dir)
    return {"rank": cfg.merge.export_rank, "folder": out_dir.name,
            "max_rel_error": max(errors.values()), "median_rel_error": statistics.median(errors.values()),
            "max_abs_logit_diff": (logits(exported, probes) - reference).abs().max().item(), "errors": errors}


def merge_run(run_dir: Path, out_dir: Path, cfg: RunConfig, command: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    check_output(out_dir, run_dir, cfg.merge.overwrite)
    # Always merge in fp32, whatever the run trained in; merge.dtype only sets how the result is stored.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))
    # Never merge into a quantized base: a QLoRA run's base is re-loaded in full precision here. On the CPU, even
    # where there is a GPU: the parity check holds the model in fp32 twice over, which a GPU that trained it in
    # bf16 or 4-bit may not fit, and the CPU's memory is the larger.
    adapted = load_adapted(run_dir, cfg, full_precision=True, device="cpu")
    probes = probe_batch(cfg, adapted.tokenizer)
    reference = logits(adapted.model, probes)
    quantization_diff = quantized_distance(run_dir, cfg, probes, reference) if cfg.adapter.quantize else None
    with full_disk_as_error(f"the merged checkpoint {out_dir}", "free space and merge again"):
        tmp = staging_dir(out_dir)
        try:
            export = export_lowrank(adapted, cfg, probes, reference, tmp / f"lora-r{cfg.merge.export_rank}") \
                if cfg.merge.export_rank else None
            merged = adapted.model.merge_and_unload(safe_merge=True)  # safe_merge: refuse non-finite weights
            merge_diff = (logits(merged, probes) - reference).abs().max().item()
            provenance, adapter_sha = adapter_provenance(adapted)  # in config.json: it travels with the checkpoint
            merged.config.lora_cli_provenance = {**provenance, "adapter_sha256": adapter_sha, "run_dir": str(run_dir)}
            merged.to(getattr(torch, cfg.merge.dtype)).save_pretrained(tmp, max_shard_size=cfg.merge.max_shard_size)
            adapted.tokenizer.save_pretrained(tmp)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True)
            saved_diff = (logits(reloaded, probes) - reference).abs().max().item()
            # The merge itself must be exact in fp32; a lower storage dtype adds rounding, reported, not failed.
            checked = saved_diff if cfg.merge.dtype == "float32" else merge_diff
            scale = reference.abs().max().item()
            allowed = cfg.merge.tolerance * scale
            if not checked <= allowed:
                raise UserError(f"parity check failed: merged logits differ from base + adapter by {checked:.3g}, "
                                f"{checked / scale:.2g} of the largest logit ({scale:.3g}; merge.tolerance="
                                f"{cfg.merge.tolerance:g}); nothing was written to {out_dir}")
            result = {"run_dir": str(run_dir), "output": str(out_dir), "dtype": cfg.merge.dtype,
                      "probes": int(probes["input_ids"].shape[0]), "merge_max_abs_diff": merge_diff,
                      "saved_max_abs_diff": saved_diff, "max_abs_logit": scale, "tolerance": cfg.merge.tolerance,
                      "allowed_max_abs_diff": allowed,
                      "parity": "pass", "parameters": sum(p.numel() for p in reloaded.parameters()),
                      "quantized_max_abs_diff": quantization_diff, "lowrank_export": export}
            write_card(tmp, run_dir, adapted, cfg, result, command, provenance, adapter_sha)
            publish(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    merge_table(result)
    return result


def adapter_provenance(adapted) -> tuple[dict, str]:
    """The adapter's provenance (its safetensors header) and the adapter file's sha256."""
    from safetensors import safe_open

    weights = adapted.adapter_dir / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        provenance = f.metadata() or {}
    return provenance, hashlib.sha256(weights.read_bytes()).hexdigest()


def write_card(folder: Path, run_dir: Path, adapted, cfg: RunConfig, result: dict, command: str,
               provenance: dict, adapter_sha: str) -> None:
    """The merged checkpoint's README.md and lora_cli_merge.json; `provenance` and `adapter_sha` are
    `adapter_provenance`'s, read once per merge (hashing the adapter twice was wasted I/O)."""
    weights = adapted.adapter_dir / "adapter_model.safetensors"
    config_text = (run_dir / "config.yaml").read_text()
    dataset = f"`{provenance.get('dataset', cfg.dataset.name)}` (fingerprint `{provenance.get('dataset_fingerprint')}`)"
    checked = "the saved checkpoint, reloaded" if result["dtype"] == "float32" else "the fp32 merge"
    parity = (f"max abs logit difference vs base + adapter on {result['probes']} eval examples: "
              f"{result['saved_max_abs_diff']:.2e} as saved ({result['dtype']}), {result['merge_max_abs_diff']:.2e} "
              f"in the fp32 merge; checked: {checked}, allowed {result['allowed_max_abs_diff']:.2e} "
              f"({result['tolerance']:g} of the largest logit, {result['max_abs_logit']:.3g})")
    card = f"""# {provenance.get('base_model', cfg.model.name_or_path)} + {cfg.adapter.name} adapter, merged

A standard transformers checkpoint: the {cfg.adapter.name} adapter (r={cfg.adapter.r}) of run `{run_dir}`
folded into its base model by lora-cli {__version__}. Loads with no lora-cli or peft installed:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{result['output']}")
tokenizer = AutoTokenizer.from_pretrained("{result['output']}")
```

| provenance | |
| --- | --- |
| base model | `{provenance.get('base_model', cfg.model.name_or_path)}` (sha256 `{adapted.checkpoint.sha256}`) |
| adapter | `{weights}` (sha256 `{adapter_sha}`) |
| dataset | {dataset} |
| run config | sha256 `{hashlib.sha256(config_text.encode()).hexdigest()}` (below) |
| stored dtype | {result['dtype']} |
| parity | {parity} |

Made with: `{command}`

## Run config

```yaml
{config_text}```
"""
    (folder / "README.md").write_text(card)
    (folder / MERGE_RECORD).write_text(json.dumps(
        {**result, "base_model_sha256": adapted.checkpoint.sha256, "adapter_sha256": adapter_sha,
         "provenance": provenance}, indent=2))
