"""Every adapter variant end to end through the CLI on tiny_llama: it trains (eval loss goes down), `lora eval`
measures it against its base, and `lora merge` ships a checkpoint that passes the parity check."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, compose_run, lora, read_metrics
from test_cli import assert_one_line_error

VARIANTS = {
    "qlora": ["adapter=qlora"],
    "qlora_fp4": ["adapter=qlora", "adapter.quantize=fp4", "adapter.double_quant=false"],
    "dora": ["adapter=lora", "adapter.use_dora=true"],
    "rslora": ["adapter=lora", "adapter.use_rslora=true", "adapter.target_modules=[q_proj,v_proj]"],
}
EVAL = ["eval.max_samples=4", "eval.max_new_tokens=4", "eval.show_samples=1"]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_run(request, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    proc = lora("train", "recipe=banking_support", *TINY, *VARIANTS[request.param], f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    return request.param, run_dir


def test_variant_trains_evaluates_and_merges(variant_run, tmp_path):
    name, run_dir = variant_run
    evals = [r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r]
    assert evals[-1] < evals[0]

    evaluation = lora("eval", f"run={run_dir}", *EVAL)
    assert evaluation.returncode == 0, evaluation.stderr
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["adapter"]["eval_loss"] < report["base"]["eval_loss"]

    merged = lora("merge", f"run={run_dir}", f"output={tmp_path / 'merged'}")
    assert merged.returncode == 0, merged.stderr
    result = json.loads((tmp_path / "merged/lora_cli_merge.json").read_text())
    assert result["parity"] == "pass" and result["saved_max_abs_diff"] <= 1e-4
    if name.startswith("qlora"):  # trained on a 4-bit base, merged into full precision: the gap is reported
        assert result["quantized_max_abs_diff"] > 0
        assert "4-bit base error" in merged.stdout


def test_qlora_base_is_4bit_and_adapter_config_is_stock(variant_run):
    name, run_dir = variant_run
    config = json.loads((run_dir / "adapter/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["use_dora"] == (name == "dora") and config["use_rslora"] == (name == "rslora")


def test_gradient_checkpointing_changes_memory_not_the_math(tmp_path):
    from lora_cli.train import train

    runs = {}
    for flag in ("false", "true"):
        cfg = compose_run(["recipe=banking_support", *TINY, "trainer.max_steps=3",
                           f"trainer.gradient_checkpointing={flag}"])
        train(cfg, tmp_path / flag, "test")
        runs[flag] = [r["loss"] for r in read_metrics(tmp_path / flag) if "loss" in r]
    assert runs["true"] == pytest.approx(runs["false"], abs=1e-6)


@pytest.mark.parametrize(("args", "needles"), [
    (["adapter=scalora", "adapter.quantize=nf4"], ["adapter=scalora", "4-bit", "adapter.quantize"]),
    (["adapter=scalora", "adapter.use_dora=true"], ["adapter=scalora", "adapter.use_dora"]),
    (["adapter=qlora", "adapter.quantize=null"], ["adapter=qlora", "adapter.quantize"]),
    (["adapter=qlora", "adapter.quantize=int3"], ["adapter.quantize", "nf4"]),
    (["adapter=lora", "adapter.scale.init=0.3"], ["adapter.scale.init"]),
])
def test_combinations_that_cannot_work_fail_at_config_time(tmp_path, args, needles):
    proc = lora("train", "recipe=banking_support", "model=tiny_llama", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "run").exists()
