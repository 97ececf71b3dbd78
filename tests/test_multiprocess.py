"""Several processes through `trainer.num_processes=N` (accelerate launch, gloo on CPU): 2 processes x batch b
make the same updates as 1 process x batch 2b, only the main process writes, and resume works. The shipped
ddp launcher file, through `trainer.launcher=ddp` or `accelerate launch --config_file` by hand, runs the same."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY, lora, read_metrics
from safetensors.torch import load_file

from lora_cli.launched import free_port
from lora_cli.paths import shipped_dir

# On CUDA each process needs its own GPU (a 1-GPU machine refuses two: test_launchers.py).
pytestmark = pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two processes need two GPUs on CUDA")

# Dropout off: N processes draw their masks from N generators, one process from one; with it on, the runs
# would differ by more than summation order.
BASE = [*TINY, "trainer.max_steps=5", "trainer.eval_every=5", "adapter.dropout=0", "trainer.save_every=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    for name, args in {"one": ["trainer.batch_size=4"],
                       "two": ["trainer.batch_size=2", "trainer.num_processes=2"],
                       "ddp_file": ["trainer.batch_size=2", "trainer.num_processes=2", "trainer.launcher=ddp"]}.items():
        proc = lora("train", "recipe=banking_support", *BASE, *args, f"hydra.run.dir={root / name}")
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(by_hand_command(root / "by_hand"), capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return root


def by_hand_command(run_dir, *more: str) -> list[str]:
    """`accelerate launch --config_file launchers/ddp.yaml --num_processes 2 -m lora_cli train ...`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(shipped_dir("launchers") / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
            str(free_port()), "--quiet", "-m", "lora_cli", "train", "recipe=banking_support", *BASE,
            "trainer.batch_size=2", *more, f"hydra.run.dir={run_dir}"]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    assert losses(runs / "two") == pytest.approx(losses(runs / "one"), abs=1e-4)
    one = load_file(runs / "one/adapter/adapter_model.safetensors")
    two = load_file(runs / "two/adapter/adapter_model.safetensors")
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-4


def test_only_the_main_process_writes(runs):
    records = read_metrics(runs / "two")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]  # once each, not once per process
    assert len(list((runs / "two").rglob("adapter_model.safetensors"))) == 1
    assert json.loads((runs / "two/run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("name", ["ddp_file", "by_hand"])
def test_the_ddp_launcher_file_runs_the_same_two_processes(runs, name):
    """`trainer.launcher=ddp` and `accelerate launch --config_file launchers/ddp.yaml -m lora_cli train` by hand:
    on CPU the file starts the same 2 gloo processes as `trainer.num_processes=2` alone, to the bit."""
    expected = load_file(runs / "two/adapter/adapter_model.safetensors")
    got = load_file(runs / name / "adapter/adapter_model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert losses(runs / name) == losses(runs / "two")
    assert len(list((runs / name).rglob("adapter_model.safetensors"))) == 1


def test_the_two_process_adapter_loads_in_stock_peft(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = runs / "two/adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_a_two_process_run_resumes_exactly(runs, tmp_path):
    """Resume the two-process run from its step-2 checkpoint: the result is the uninterrupted run's."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs / "two/checkpoints/step-000002", run_dir / "checkpoints/step-000002")
    proc = lora("train", "recipe=banking_support", *BASE, "trainer.batch_size=2", "trainer.num_processes=2",
                "resume=auto", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    expected = load_file(runs / "two/adapter/adapter_model.safetensors")
    got = load_file(run_dir / "adapter/adapter_model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert losses(run_dir) == losses(runs / "two")


def test_a_run_launched_by_hand_records_the_processes_it_ran_on(runs, tmp_path):
    """`accelerate launch --num_processes 2 -m lora_cli train ...` without trainer.num_processes: the run's config
    and Reproduce command say 2, so that a plain `lora train ... resume=auto` (one process, half the global batch)
    is refused instead of silently training another run."""
    import yaml

    saved = yaml.safe_load((runs / "by_hand/config.yaml").read_text())
    assert saved["trainer"]["num_processes"] == 2
    assert "trainer.num_processes=2" in (runs / "by_hand/README.md").read_text()
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs / "by_hand/checkpoints/step-000002", run_dir / "checkpoints/step-000002")
    proc = lora("train", "recipe=banking_support", *BASE, "trainer.batch_size=2", "resume=auto",
                f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and "trainer.num_processes (2 -> 1)" in proc.stderr
    # The same `accelerate launch` command with resume=auto resumes it (it was refused as "2 -> 1"), exactly.
    proc = subprocess.run(by_hand_command(run_dir, "resume=auto"), capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    expected = load_file(runs / "by_hand/adapter/adapter_model.safetensors")
    got = load_file(run_dir / "adapter/adapter_model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def error_lines(stderr: str) -> list[str]:
    """What a run printed besides its progress bar and data plan (which wraps at the terminal's width)."""
    stderr = re.sub(r"^data: .*?trainable params\s+[\d,]+\s+of\s+[\d,]+", "", stderr, flags=re.M | re.S)
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("train ")]


def test_a_failing_two_process_run_ends_with_its_one_line_error(tmp_path):
    """The workers' error, once, exit code 2: not torchrun's ChildFailedError traceback and exit 1."""
    proc = lora("train", "recipe=banking_support", *BASE, "trainer.batch_size=2", "trainer.num_processes=2",
                "trainer.lr=1e38", f"hydra.run.dir={tmp_path / 'run'}", process=True)
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc.stderr) == [next(line for line in proc.stderr.splitlines() if "non-finite" in line)]
    assert json.loads((tmp_path / "run/run.json").read_text())["status"] == "failed"


def test_two_processes_print_once_and_evaluate_once(tmp_path):
    """Every process runs the same code: the fallback message prints once, and the end-of-run evaluation runs in
    the main process alone, on the adapter it saved (the other process read adapter/ before it existed)."""
    run_dir = tmp_path / "run"
    proc = lora("train", "recipe=banking_support", *BASE, "trainer.batch_size=2", "trainer.num_processes=2",
                "trainer.precision=fp16", "trainer.eval_at_end=true", "eval.max_samples=4", "eval.max_new_tokens=4",
                f"hydra.run.dir={run_dir}", process=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("trainer.precision=fp16 needs a CUDA GPU") == 1
    assert proc.stdout.count("lora eval:") == 1 and (run_dir / "eval.json").is_file()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def start_two_processes(run_dir) -> subprocess.Popen:
    """`lora train` on 2 processes, a long run, returned once a step is logged."""
    import time

    from conftest import LORA

    args = ["train", "recipe=banking_support", *TINY, "trainer.max_steps=10000", "trainer.eval_every=10000",
            "trainer.batch_size=2", "trainer.num_processes=2", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen([str(LORA), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO)
    deadline = time.monotonic() + 300
    # A training step's "loss", not the step-0 "eval_loss": a stop before the loop's handler is in place is not
    # what these tests are about (a worker killed there fails its peer in gloo; see the session note).
    while not (run_dir / "metrics.jsonl").is_file() or '"loss"' not in (run_dir / "metrics.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.5)
    return process


def processes_left(run_dir, wait: float = 10) -> list[str]:
    """The processes still running with run_dir on their command line, after up to `wait` seconds."""
    import os
    import time
    from pathlib import Path

    deadline = time.monotonic() + wait
    while True:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(run_dir).encode() in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                    found.append(cmdline.parent.name)
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_sigterm_to_lora_stops_every_process_at_a_checkpoint(tmp_path):
    """`kill PID` (or Ctrl-C) reaches the workers through their launcher: they checkpoint at the end of their step,
    and `lora` waits for that, exits 130 and leaves no process behind (it had returned at once, leaving the
    workers to train on)."""
    import signal

    run_dir = tmp_path / "run"
    process = start_two_processes(run_dir)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and list((run_dir / "checkpoints").glob("step-*"))
    assert "continue with:" in stderr and "Traceback" not in stderr
    assert not processes_left(run_dir, wait=0)


@pytest.mark.parametrize("stop", ["SIGKILL", "second Ctrl-C"])
def test_killing_lora_ends_its_workers_too(tmp_path, stop):
    """`kill -9` on `lora`, or a second Ctrl-C while the workers finish their step: torchrun starts each worker in
    a session of its own, and they trained on unwatched, holding the run dir (its retry was refused as "another
    lora run is writing into" it); the second Ctrl-C also exited 247. Every process ends with `lora`, which
    exits 130 for the Ctrl-C, and the run dir is free to resume in."""
    import signal
    import time

    from lora_cli.rundir import held_by_a_run

    run_dir = tmp_path / "run"
    process = start_two_processes(run_dir)
    if stop == "SIGKILL":
        process.kill()
    else:
        process.send_signal(signal.SIGINT)
        time.sleep(1)  # two signals at once reach Python's handler as one
        process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode == (-signal.SIGKILL if stop == "SIGKILL" else 130)
    assert not processes_left(run_dir)
    assert not held_by_a_run(run_dir)  # free for `resume=auto`
