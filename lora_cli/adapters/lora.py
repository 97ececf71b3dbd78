"""LoRA through peft: y = W x + (alpha / r) * B A x, A and B trained, W frozen.

peft does the math; this module turns our config into a `LoraConfig` and checks the config against the
model first, so a target that matches nothing is an error that lists what does exist."""

from __future__ import annotations

from lora_cli.config import AdapterConfig
from lora_cli.errors import UserError


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers inside the transformer blocks (the output head excluded)."""
    import torch

    output = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not output}
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


def lora_config(cfg: AdapterConfig):
    from peft import LoraConfig

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else list(cfg.target_modules)
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


def apply(model, cfg: AdapterConfig):
    from peft import get_peft_model

    check_targets(model, cfg)
    return get_peft_model(model, lora_config(cfg))
