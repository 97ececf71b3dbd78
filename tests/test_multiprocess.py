"""Several processes through `trainer.num_processes=N` (accelerate launch, gloo on CPU): 2 processes x batch b
make the same updates as 1 process x batch 2b, only the main process writes, and resume works. The shipped
ddp launcher file, through `trainer.launcher=ddp` or `accelerate launch --config_file` by hand, runs the same."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY, lora, read_metrics
from safetensors.torch import load_file

from lora_cli.launched import free_port
from lora_cli.paths import shipped_dir

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
    by_hand = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(shipped_dir("launchers") / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), "--quiet", "-m", "lora_cli", "train", "recipe=banking_support", *BASE,
               "trainer.batch_size=2", f"hydra.run.dir={root / 'by_hand'}"]
    proc = subprocess.run(by_hand, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return root


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
