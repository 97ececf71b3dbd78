"""LoRA through peft: y = W x + (alpha / r) * B A x, A and B trained, W frozen.

peft does the math; this module turns our config into a `LoraConfig`, checks it against the model first
(a target that matches nothing is an error that lists what does exist), and defines the hooks through which
the other variants change training. Each hook is a no-op here, and the loop calls them at fixed points:

    apply -> param_groups -> [backward -> before_clip -> clip -> optimizer.step -> after_step]* -> save
"""

from __future__ import annotations

import re
from pathlib import Path

from lora_cli.config import AdapterConfig, TrainerConfig
from lora_cli.errors import UserError

# How transformers names the list of blocks (peft's COMMON_LAYERS_PATTERN): `model.layers.3.mlp.up_proj`.
BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The block a module belongs to, parsed from its name; None outside the blocks (e.g. an output head)."""
    match = BLOCK.search(name)
    return int(match.group(1)) if match else None


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers inside the transformer blocks (the output head excluded)."""
    import torch

    output = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not output
             or type(module).__name__.startswith("Linear4bit")}
    return sorted(names)


def check_targets(model, cfg: AdapterConfig) -> None:
    available = linear_module_names(model)
    if cfg.target_modules != "all-linear":
        unknown = [t for t in cfg.target_modules if t not in available]
        if unknown:
            raise UserError(f"adapter.target_modules: {', '.join(unknown)} match no module of this model; "
                            f"its linear modules are: {', '.join(available)} (or use all-linear)")
    n_layers = model.config.num_hidden_layers
    if cfg.layers is not None and max(cfg.layers) >= n_layers:
        raise UserError(f"adapter.layers={list(cfg.layers)} is out of range: this model has {n_layers} "
                        f"blocks (0..{n_layers - 1})")


def lora_config(cfg: AdapterConfig, model=None):
    """peft's LoraConfig. With `layers` set, peft needs the target names spelled out, so all-linear becomes the
    model's linear module names."""
    from peft import LoraConfig

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    if targets == "all-linear" and cfg.layers is not None and model is not None:
        targets = linear_module_names(model)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        layers_to_transform=list(cfg.layers) if cfg.layers is not None else None,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
    )


def packed_in_float(model) -> bool:
    """Whether a 4-bit base stores its packed weights in a float dtype (bnb_4bit_quant_storage), not uint8."""
    storage = getattr(getattr(model.config, "quantization_config", None), "bnb_4bit_quant_storage", None)
    return storage is not None and getattr(storage, "is_floating_point", False)


def prepare_4bit_base(model):
    """A 4-bit base as training uses it: peft casts its norms and embeddings to fp32 for stable training. Not when
    its 4-bit weights are packed in a float dtype to be sharded (FSDP / ZeRO-3), where every base weight must keep
    that one dtype. Eval and generate load the base the same way, or they would measure another model."""
    from peft import prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) and not packed_in_float(model):
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def lora_layers(model) -> dict[str, object]:
    """Every peft LoRA layer of the model by its module name (they hold lora_A, lora_B and `scaling`)."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


class Lora:
    """Plain LoRA. Subclasses override only the hooks where their method differs."""

    def __init__(self, cfg: AdapterConfig, trainer: TrainerConfig | None = None, steps: int = 0):
        """`trainer` and `steps` describe the training run (None/0 when only loading for inference)."""
        self.cfg = cfg
        self.trainer = trainer
        self.steps = steps

    def apply(self, model):
        """Wrap the frozen base model; only the adapter's parameters stay trainable. A 4-bit base (QLoRA) is
        prepared first (`prepare_4bit_base`). For training (trainer.fused_lora), the LoRA layers over plain
        linear weights compute in one autograd function (adapters/fused.py)."""
        from peft import get_peft_model

        check_targets(model, self.cfg)
        quantized = getattr(model, "is_loaded_in_4bit", False)
        model = prepare_4bit_base(model)
        config = lora_config(self.cfg, model)
        if self.trainer is not None and self.trainer.fused_lora and not quantized:
            import torch

            from lora_cli.adapters.fused import FusedLoraLinear

            # peft's documented hook for custom LoRA layers (not saved in adapter_config.json)
            config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
        return get_peft_model(model, config)

    def param_groups(self, model, trainer: TrainerConfig) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def before_clip(self, model, optimizer, step: int) -> dict:
        """Called once per optimizer step, after backward (gradients complete and synced), before clipping.
        Returns values to log for this step."""
        return {}

    def after_step(self, model) -> dict:
        """Called after optimizer.step(); returns values to log for this step."""
        return {}

    def state_tensors(self, model) -> dict:
        """Variant state beyond the trainable parameters and the optimizer that a resumed run needs."""
        return {}

    def load_state_tensors(self, model, tensors: dict) -> None:
        """Inverse of `state_tensors`, on a freshly built model."""

    def save(self, model, out_dir: Path) -> None:
        """Write a stock-peft adapter (adapter_config.json, adapter_model.safetensors) into out_dir."""
        model.save_pretrained(out_dir, safe_serialization=True)

    def finish(self, model, run_dir: Path, history: list[dict]) -> None:
        """Variant-specific artifacts at the end of a run (plots); `history` holds every logged record."""
