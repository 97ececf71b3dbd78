"""Adapter variants, one module each. Every variant is a small class over plain LoRA (`lora.Lora`) that
overrides only the hooks where its method differs; `build` picks one by `adapter.name`."""

from __future__ import annotations

from lora_cli.config import AdapterConfig


def build(cfg: AdapterConfig):
    """The variant object for `adapter=NAME`; heavy imports stay inside the variant's methods."""
    from lora_cli.adapters import lora

    variants = {"lora": lora.Lora}
    return variants[cfg.name](cfg)


def apply_adapter(model, cfg: AdapterConfig):
    """Wrap a frozen base model with the configured adapter; only adapter weights stay trainable."""
    return build(cfg).apply(model)
