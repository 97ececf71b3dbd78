"""Shared fixtures. Tests never touch a hub: a tiny random Llama (model=tiny_llama) and the embedded
model's tokenizer, both built locally; models are cached under the repo's .cache/ unless
$LORA_CLI_CACHE says otherwise, so the user's own cache is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BANKING77 = REPO.parent / "shared" / "data" / "banking77"
LORA = Path(sys.executable).with_name("lora")

os.environ.setdefault("LORA_CLI_CACHE", str(REPO / ".cache"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

# A few optimizer steps on a slice of the shipped data: enough to see the loss move, seconds to run.
TINY_ANY_PRECISION = ["model=tiny_llama", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.lr=3e-3",
                      "trainer.batch_size=4", "trainer.warmup_ratio=0", "dataset.max_train_examples=48",
                      "dataset.max_eval_examples=16"]
# In fp32: the default, trainer.precision=auto, takes bf16 on a CPU with bf16 instructions, and the suite's
# exactness claims (packed = padded, fused = peft, 2 processes = 1, S-LoRA at a fixed scale = LoRA) are fp32's.
# So the suite means the same on every machine; auto and bf16 have their own tests, with tolerances
# (test_precision.py).
TINY = [*TINY_ANY_PRECISION, "trainer.precision=fp32"]


def lora(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
         process: bool = False) -> subprocess.CompletedProcess:
    """Run `lora ARGS` and return its exit code and output (text). By default it calls the console script's
    entry point, `lora_cli.cli.main`, inside this test process, as a fresh process would: the only thing
    saved is the ~6 s of importing torch, transformers and peft per call, which would otherwise dominate the
    suite. `process=True` runs the installed console script as a real subprocess (signals, start-up,
    packaging, anything about the process itself)."""
    if process:
        return subprocess.run([str(LORA), *args], capture_output=True, text=True, timeout=timeout,
                              cwd=cwd or REPO, env={**os.environ, **(env or {})})
    return lora_in_process(list(args), cwd or REPO, env or {})


def lora_in_process(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """`main(args)` with a process's observable behaviour: exit code (SystemExit or return value, 1 and a
    traceback on stderr for an uncaught exception), stdout and stderr, cwd and environment restored."""
    import logging
    import traceback
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from lora_cli.cli import main

    out, err = StringIO(), StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), list(sys.argv)
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    err.write(exc.code + "\n")
            except BaseException:  # noqa: BLE001 - what the interpreter would print before exiting 1
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        for handler in logging.getLogger().handlers[:]:  # a run's log handlers die with it, as in a process
            handler.close()
            logging.getLogger().removeHandler(handler)
    return subprocess.CompletedProcess(["lora", *args], code, out.getvalue(), err.getvalue())


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records, read as strict JSON (a bare NaN or Infinity fails)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=strict_json) for line in lines]


def strict_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def compose_run(overrides: list[str]):
    """The typed RunConfig that `lora train OVERRIDES` would run, composed in-process."""
    from lora_cli.config import compose

    return compose(overrides)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One real `lora train` on tiny_llama through the CLI, shared by the tests that inspect its outputs."""
    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    proc = lora("train", "recipe=banking_support", *TINY, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc


@pytest.fixture(scope="session", autouse=True)
def tiny_checkpoint():
    """Built (with the embedded tokenizer's one-time GGUF conversion) before any test runs, so no test's
    stderr carries the conversion messages of a fresh cache, whatever order the tests run in."""
    from lora_cli.models import resolve_checkpoint
    from lora_cli.report import quiet_libraries

    quiet_libraries()
    return resolve_checkpoint(compose_run(["model=tiny_llama"]).model)


@pytest.fixture(scope="session")
def tokenizer(tiny_checkpoint):
    from lora_cli.models import load_tokenizer

    return load_tokenizer(tiny_checkpoint, compose_run(["model=tiny_llama"]).model)
