"""lora-cli: fine-tune language models with low-rank adapters from the command line."""

__version__ = "0.1.0"
