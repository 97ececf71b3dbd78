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
    "scalora": ["adapter=scalora", "adapter.scalora.interval=2", "adapter.scalora.warmup=2"],
    "slora": ["adapter=slora", "adapter.scale.init_schedule=linear", "adapter.layers=[1]"],
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


def test_scalora_run_carries_its_base_weights_and_exports_a_stock_lora(variant_run, tmp_path):
    name, run_dir = variant_run
    if name != "scalora":
        pytest.skip("ScaLoRA only")
    assert (run_dir / "adapter/base_weights.safetensors").is_file()
    assert "stock peft alone" in (run_dir / "README.md").read_text()
    rescales = [r for r in read_metrics(run_dir) if "scalora_column" in r]
    assert [r["step"] for r in rescales] == [2, 4, 6]
    merged = lora("merge", f"run={run_dir}", f"output={tmp_path / 'merged'}", "merge.export_rank=2")
    assert merged.returncode == 0, merged.stderr
    export = json.loads((tmp_path / "merged/lora_cli_merge.json").read_text())["lowrank_export"]
    assert export["max_rel_error"] > 0 and export["max_abs_logit_diff"] > 0  # lossy, and it says by how much
    assert (tmp_path / "merged/lora-r2/adapter_model.safetensors").is_file()


def test_slora_run_logs_and_plots_its_scales_and_saves_them_raw(variant_run):
    name, run_dir = variant_run
    if name != "slora":
        pytest.skip("S-LoRA only")
    scales = [r["scales"] for r in read_metrics(run_dir) if "scales" in r]
    assert len(scales) == 6 and scales[-1] != scales[0]  # learnable: they moved
    assert (run_dir / "scales.png").stat().st_size > 0
    assert (run_dir / "adapter/slora_scales.safetensors").is_file()
    config = json.loads((run_dir / "adapter/adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]  # adapter.layers with all-linear targets


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


def test_qlora_gradients_are_those_of_the_dequantized_model():
    """bitsandbytes warns its CPU 4-bit kernel has no registered autograd kernel ("may be silently incorrect"):
    the adapter's gradients must match the same model with the 4-bit weights dequantized into fp32."""
    import bitsandbytes.functional as bnb
    import torch

    from lora_cli.adapters import build
    from lora_cli.models import load_model, resolve_checkpoint

    cfg = compose_run(["recipe=banking_support", "model=tiny_llama", "adapter=qlora", "adapter.dropout=0"])
    checkpoint = resolve_checkpoint(cfg.model)
    quantized = load_model(checkpoint, cfg.model, None, "nf4", True)
    dequantized = {f"{name}.weight": bnb.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                   for name, m in quantized.named_modules() if type(m).__name__ == "Linear4bit"}  # before forward
    reference = load_model(checkpoint, cfg.model)
    reference.load_state_dict(dequantized, strict=False)
    models = []
    for base in (quantized, reference):
        torch.manual_seed(0)
        model = build(cfg.adapter).apply(base)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        models.append(model)
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in models:
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_A" in n]))
    assert (grads[0] - grads[1]).norm() <= 0.01 * grads[1].norm()


@pytest.mark.parametrize("variant", [["adapter=scalora", "adapter.scalora.interval=1", "adapter.scalora.warmup=1"],
                                     ["adapter=qlora"], ["adapter=qlora", "adapter.quantize=fp4"]],
                         ids=["scalora", "qlora", "qlora_fp4"])
def test_a_bf16_base_loads_for_eval_as_it_trained(tmp_path, variant):
    """`lora eval` and `lora generate` must measure the model that trained. In a bf16 model ScaLoRA trains its adapted
    base linears in fp32, and QLoRA's norms and embeddings are fp32 (peft's k-bit preparation): loading had
    rounded both to bf16 (logits 0.02 and 0.006 off). Saving must not move the trained model either (bitsandbytes'
    CPU repacking was undone, lossily, by state_dict())."""
    import torch

    from lora_cli.runs import load_adapted
    from lora_cli.train import train

    cfg = compose_run(["recipe=banking_support", *TINY, "trainer.max_steps=2", "trainer.eval_every=1",
                       "model.dtype=bfloat16", *variant])
    _, trained = train(cfg, tmp_path, "lora train (test)")
    adapted = load_adapted(tmp_path, cfg).model
    tokens = torch.randint(0, trained.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    assert adapted.device == trained.device  # on CUDA, the GPU for both (eval had loaded onto the CPU)
    with torch.no_grad():
        expected = trained.eval()(input_ids=tokens.to(trained.device)).logits
        got = adapted(input_ids=tokens.to(adapted.device)).logits
    assert (expected.float() - got.float()).abs().max() <= 1e-3 * expected.float().abs().max()
