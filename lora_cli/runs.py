"""A finished run, read back: its resolved config (plus the command line's overrides), and its base model
with the adapter on top. `lora eval`, `lora generate` and `lora merge` all start here."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.adapters.lora import prepare_4bit_base
from lora_cli.artifacts import BASE_WEIGHTS
from lora_cli.config import RunConfig, to_run_config
from lora_cli.errors import UserError, first_line
from lora_cli.models import Checkpoint, default_device, load_model, load_tokenizer, resolve_checkpoint
from lora_cli.report import console
from lora_cli.rundir import check_finished

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# After training, "the split" is the one to measure: `lora eval run=... dataset.split=test`.
KEY_ALIASES = {"dataset.split": "dataset.eval_split"}
TRAINING_CAPS = ("dataset.max_train_examples", "dataset.max_eval_examples")  # eval reads the whole split
# The adapter is what the run trained: of its keys, only how the base is loaded under it may change afterwards
# (e.g. a LoRA adapter measured on a 4-bit base: adapter.quantize=nf4). A QLoRA run keeps its 4-bit base in eval
# and generate (adapter=qlora needs one); `lora merge` loads every base in full precision.
ADAPTER_KEYS_AFTER_TRAINING = ("adapter.quantize", "adapter.double_quant")


@dataclass
class AdaptedModel:
    model: object  # peft.PeftModel; `base_only(adapted)` gives the pristine base model
    tokenizer: object
    checkpoint: Checkpoint
    adapter_dir: Path
    pristine: dict = field(default_factory=dict)  # original values of the base weights BASE_WEIGHTS replaced


def base_weight(model, key: str):
    """The base weight a base-checkpoint key names, inside a peft model (adapted layers wrap it)."""
    module = model.get_base_model().get_submodule(key.removesuffix(".weight"))
    return getattr(module, "get_base_layer", lambda: module)().weight


@contextmanager
def base_only(adapted: AdaptedModel):
    """The base model as it was before training: the adapter disabled and, where the variant changed base
    weights (ScaLoRA), the original ones swapped back in for the duration."""
    import torch

    weights = {key: base_weight(adapted.model, key) for key in adapted.pristine}
    trained = {key: weights[key].detach().clone() for key in adapted.pristine}
    with torch.no_grad():
        for key, value in adapted.pristine.items():
            weights[key].copy_(value)
    try:
        with adapted.model.disable_adapter():
            yield adapted.model
    finally:
        with torch.no_grad():
            for key, value in trained.items():
                weights[key].copy_(value)


def load_run_config(run_dir: Path, overrides: list[str], command: str = "eval") -> RunConfig:
    """The run's config.yaml with overrides applied: `GROUP=OPTION` swaps a whole group for a shipped
    option (e.g. dataset=banking77), `KEY=VALUE` sets one key (checked against the schema; a typo's message
    points at `lora COMMAND --help`)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from lora_cli import overrides as ov
    from lora_cli.paths import shipped_dir

    path = run_dir / "config.yaml"
    check_finished(run_dir)
    try:
        saved = OmegaConf.load(path)
        if not saved:
            raise yaml.YAMLError("the file is empty")
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), saved)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise UserError(f"{path} is not a config this lora-cli can read ({ov.one_line(exc)}); was it edited, or "
                        "written by another version? Restore it, or re-run training") from None
    configs = shipped_dir("configs")
    groups = ov.group_options(configs, shipped_dir("recipes"))
    groups.pop("recipe")
    for override in ov.parse(overrides):
        if override.is_delete():
            raise UserError(f"{override.input_line}: a finished run's config keeps every key; set one instead "
                            "(KEY=VALUE, or GROUP=OPTION for a whole group)")
        key = KEY_ALIASES.get(override.key_or_group, override.key_or_group)
        if key == "trainer" or key.startswith("trainer."):
            raise UserError(f"{override.input_line}: training settings change nothing after training; eval, generate "
                            "and merge take eval.*, generate.* and merge.* (e.g. eval.batch_size)")
        if key in TRAINING_CAPS:  # `lora eval` reads the whole split: the cap was ignored without a word
            raise UserError(f"{override.input_line}: a cap on training's data, which `lora eval` does not apply; "
                            "set eval.max_samples=N to evaluate on N examples")
        try:
            if key in groups:
                value = override.get_value_element_as_str()
                ov.check_group(key, [value], groups[key])
                check_not_retraining(key, override.input_line, cfg, path)
                option = OmegaConf.load(configs / key / f"{value}.yaml")
                cfg[key] = OmegaConf.merge(OmegaConf.structured(type(getattr(RunConfig(), key))), option)
            else:
                ov.check_key(cfg, key, command)
                check_not_retraining(key, override.input_line, cfg, path)
                OmegaConf.update(cfg, key, override.value(), merge=False)
        except OmegaConfBaseException as exc:
            raise UserError(f"invalid override {override.input_line!r}: {ov.one_line(exc)}") from None
    return to_run_config(cfg)


def check_not_retraining(key: str, override: str, cfg, config_path: Path) -> None:
    """Refuse an override of the trained adapter (adapter=..., adapter.r=...): the saved weights would not change,
    only what the reports and the merged model's card say about them."""
    from omegaconf import OmegaConf

    if key != "adapter" and not key.startswith("adapter.") or key in ADAPTER_KEYS_AFTER_TRAINING:
        return
    trained = OmegaConf.select(cfg, "adapter.name" if key == "adapter" else key)
    raise UserError(f"{override}: the run's adapter is fixed by its training ({config_path} has "
                    f"{'adapter' if key == 'adapter' else key}={trained}); to try another, train a new run "
                    f"(`lora train ... {override}`)")


def check_adapter(run_dir: Path) -> Path:
    """The run's adapter folder, complete and readable, or a one-line reason why not."""
    from safetensors import safe_open

    adapter_dir = run_dir / "adapter"
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise UserError(f"{run_dir} has no complete adapter ({', '.join(missing)} missing in adapter/); "
                        "did its training finish? Re-run `lora train` or pass another run=")
    try:
        with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open handles have no __iter__)
                f.get_tensor(name)
    except Exception as exc:
        raise UserError(f"{adapter_dir / 'adapter_model.safetensors'} is corrupted or unreadable "
                        f"({first_line(exc, 120)}); restore it or re-run training") from None
    return adapter_dir


def recorded(adapter_dir: Path) -> dict[str, str]:
    """The adapter's provenance, as training recorded it in the safetensors header (artifacts.provenance)."""
    from safetensors import safe_open

    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        return f.metadata() or {}


def apply_base_weights(base, adapter_dir: Path, required: bool) -> dict:
    """Put the base weights a variant trained (BASE_WEIGHTS; `required` for ScaLoRA, which always writes them)
    into the base; returns the originals. Without them a ScaLoRA adapter would load onto the pristine base and
    give plausible, wrong numbers."""
    from safetensors.torch import load_file

    path = adapter_dir / BASE_WEIGHTS
    if not path.is_file():
        if required:
            raise UserError(f"{path} is missing: a ScaLoRA adapter is the base weights it trained plus its low-rank "
                            "factors, and neither works alone; restore the file or re-run training")
        return {}
    try:
        trained = load_file(path)
    except Exception as exc:
        raise UserError(f"{path} is corrupted or unreadable ({first_line(exc, 120)}); restore it or "
                        "re-run training") from None
    state = base.state_dict()
    unknown = sorted(k for k in trained if k not in state or state[k].shape != trained[k].shape)
    if unknown:
        raise UserError(f"{path} holds weights this base model lacks or shapes differently ({unknown[0]}); "
                        "load the base the run was trained on")
    pristine = {key: state[key].detach().clone() for key in trained}
    hold_as_trained(base, trained)
    base.load_state_dict(trained, strict=False)
    return pristine


def hold_as_trained(base, trained: dict) -> None:
    """ScaLoRA trains its adapted base linears in fp32 inside a bf16 / fp16 model (`scalora.hold_in_fp32`); they
    compute that way here too, or loading would round the trained fp32 weights into the model's dtype."""
    import torch

    from lora_cli.adapters.scalora import hold_in_fp32

    for key, tensor in trained.items():
        module = base.get_submodule(key.rsplit(".", 1)[0])
        if isinstance(module, torch.nn.Linear) and key.endswith(".weight") and tensor.dtype == torch.float32:
            hold_in_fp32(module)


def load_adapted(run_dir: Path, cfg: RunConfig, full_precision: bool = False,
                 device: str | None = None) -> AdaptedModel:
    """Base model + the run's adapter, in eval mode, on `device` (the GPU if there is one, as training used it),
    the base loaded as it was trained (4-bit for QLoRA unless `full_precision`). Warns if the base changed since
    training."""
    from peft import PeftModel

    device = device or default_device()

    adapter_dir = check_adapter(run_dir)
    checkpoint = resolve_checkpoint(cfg.model)
    recorded_hash = recorded(adapter_dir).get("base_model_sha256")
    other_base = bool(recorded_hash) and recorded_hash != checkpoint.sha256
    tokenizer = load_tokenizer(checkpoint, cfg.model)
    quantize = None if full_precision else cfg.adapter.quantize
    base = prepare_4bit_base(load_model(checkpoint, cfg.model, tokenizer, quantize, cfg.adapter.double_quant, device))
    pristine = apply_base_weights(base, adapter_dir, required=cfg.adapter.name == "scalora")
    try:
        model = PeftModel.from_pretrained(base, adapter_dir)
    except Exception as exc:
        # torch's load errors head their causes (`size mismatch for ...`, one a line) with a line ending in ':'.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
        fix = (f"load the base it was trained on (sha256 {recorded_hash[:12]}, not {checkpoint.sha256[:12]}; its "
               "config.yaml names it, so drop any model override)" if other_base
               else "re-run training, or pass another run=")
        raise UserError(f"cannot load the adapter in {adapter_dir}: {detail[:240].rstrip('.')}; {fix}") from None
    if other_base:
        console.print(f"[yellow]warning: the base model's weights differ from those the adapter was trained on "
                      f"(sha256 {checkpoint.sha256[:12]} vs {recorded_hash[:12]})[/]")
    if not quantize:  # a 4-bit base is there already: bitsandbytes quantizes it on the device it loads onto
        model.to(device)
    model.eval()
    return AdaptedModel(model, tokenizer, checkpoint, adapter_dir, pristine)
