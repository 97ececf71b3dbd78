"""`python -m lora_cli ...` (and `accelerate launch -m lora_cli train ...`) runs the same CLI as `lora`."""

import sys

from lora_cli.cli import main

sys.exit(main())
