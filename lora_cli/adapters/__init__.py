"""Adapter variants. Each module exposes `apply(model, cfg) -> PeftModel`; this is where variants plug in.

The shared LoRA plumbing (target resolution, layer selection, the peft config) lives once, in `lora.py`;
a variant reuses it and adds only what makes it different.
"""

from __future__ import annotations

from lora_cli.config import AdapterConfig


def apply_adapter(model, cfg: AdapterConfig):
    """Wrap a frozen base model with the configured adapter; only adapter weights stay trainable."""
    from lora_cli.adapters import lora

    variants = {"lora": lora.apply}
    return variants[cfg.name](model, cfg)
