"""Adapter variants, one module each. Every variant is a small class over plain LoRA (`lora.Lora`) that
overrides only the hooks where its method differs; `build` picks one by `adapter.name`."""

from __future__ import annotations

from lora_cli.config import AdapterConfig, TrainerConfig


def build(cfg: AdapterConfig, trainer: TrainerConfig | None = None, steps: int = 0):
    """The variant object for `adapter=NAME`. QLoRA is LoRA on a 4-bit base (`adapter.quantize`), which
    `models.load_model` handles, so it needs no class of its own."""
    from lora_cli.adapters import lora, scalora, slora

    variants = {"lora": lora.Lora, "qlora": lora.Lora, "slora": slora.SLora, "scalora": scalora.ScaLora}
    return variants[cfg.name](cfg, trainer, steps)
