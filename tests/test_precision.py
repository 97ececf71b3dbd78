"""`trainer.precision=bf16`, and `auto` (the default) where it picks bf16, on a CPU: bf16 autocast (the linear
layers in bf16; the weights, the optimizer, attention, LoRA's delta and the loss in fp32), used where the CPU
multiplies bf16 natively, fp32 elsewhere (with a message when bf16 was asked for).

bf16 is not exact: these tests hold it to fp32 within a stated tolerance (losses within 1%, each trained adapter
tensor within 10% in norm), and check each piece that keeps it close: attention in fp32 here, the fused LoRA
layer's fp32 delta in test_fused_lora.py. Where this CPU has no bf16 instructions, the tests make lora-cli use
autocast anyway: oneDNN emulates bf16 there, slower, with the same numbers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_ANY_PRECISION, lora, read_metrics
from test_exactness import LENGTHS, examples, tiny_model

from lora_cli import train
from lora_cli.data import micro_batches
from lora_cli.models import FP32_ATTENTION, _sdpa_in_fp32, attention_in_fp32

# These stand in for a CPU without bf16 instructions; a CUDA GPU with bf16 would train in bf16 anyway.
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="about the CPU's bf16 instructions")

# Each adapter tensor within 10% in norm: Adam's first steps are close to sign(gradient), so an element whose
# gradient is near zero moves either way with bf16's rounding (lora_B, from zero, differs by 2-6% after 6 steps).
LOSS_TOLERANCE, ADAPTER_TOLERANCE = 1e-2, 1e-1


def run_result(run_dir) -> dict:
    return json.loads((run_dir / "run.json").read_text())["result"]


def test_bf16_trains_like_fp32_within_tolerance(tmp_path, monkeypatch):
    """Through the CLI, fp32 then bf16 in one process (as a sweep over trainer.precision runs them): the same
    per-step losses and eval losses within 1%, the same adapter tensors within 10%, a loss that goes down; run.json and
    the summary say which precision trained."""
    from safetensors.torch import load_file

    monkeypatch.setattr(train, "cpu_has_bf16", lambda: True)
    runs = {}
    for precision in ("fp32", "bf16"):
        run_dir = tmp_path / precision
        proc = lora("train", "recipe=banking_support", *TINY_ANY_PRECISION, f"trainer.precision={precision}",
                    f"hydra.run.dir={run_dir}")
        assert proc.returncode == 0, proc.stderr
        assert run_result(run_dir)["precision"] == precision
        assert f"({precision})" in proc.stdout
        records = read_metrics(run_dir)
        runs[precision] = {"loss": [r["loss"] for r in records if "loss" in r],
                           "eval": [r["eval_loss"] for r in records if "eval_loss" in r],
                           "adapter": load_file(run_dir / "adapter" / "adapter_model.safetensors")}
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=LOSS_TOLERANCE)
    assert bf16["eval"] == pytest.approx(fp32["eval"], rel=LOSS_TOLERANCE)
    assert bf16["loss"] != fp32["loss"]  # else autocast never ran and this test proves nothing
    assert bf16["loss"][-1] < bf16["loss"][0]
    for name, weight in fp32["adapter"].items():
        error = (bf16["adapter"][name] - weight).norm() / weight.norm()
        assert error < ADAPTER_TOLERANCE, (name, float(error))


@pytest.mark.parametrize("adapter", ["lora", "scalora"])
def test_a_bf16_model_trains_in_bf16(tmp_path, monkeypatch, adapter):
    """`model.dtype=bfloat16 trainer.precision=bf16` stopped at the first eval with a dtype error from the output
    head (the fused layer handed a bf16 model fp32 hidden states); it trains, the loss goes down, and the trained
    adapter evaluates."""
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: True)
    proc = lora("train", "recipe=banking_support", *TINY_ANY_PRECISION, f"adapter={adapter}", "model.dtype=bfloat16",
                "trainer.precision=bf16", "trainer.lr=1e-2", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert run_result(tmp_path)["precision"] == "bf16"
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert losses[-1] < losses[0]
    assert lora("eval", f"run={tmp_path}", "eval.max_samples=4", "eval.max_new_tokens=2").returncode == 0


@CPU_ONLY
def test_without_bf16_instructions_it_says_so_and_trains_in_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: False)
    proc = lora("train", "recipe=banking_support", *TINY_ANY_PRECISION, "trainer.max_steps=2", "trainer.precision=bf16",
                f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "trainer.precision=bf16 needs a CUDA GPU or a CPU with bf16 instructions" in proc.stdout + proc.stderr
    assert run_result(tmp_path)["precision"] == "fp32"


def test_auto_takes_bf16_for_fused_lora_on_bf16_hardware_and_fp32_elsewhere(tmp_path, monkeypatch):
    """trainer.precision=auto, the default, through the CLI: bf16 for plain LoRA (fused layer, fp32 base) where the
    CPU has bf16 instructions, without the fallback message; fp32 where peft's forward, which rounds LoRA's delta to
    bf16, would compute the adapter (S-LoRA), and fp32 on a CPU without bf16. The dry-run's plan says which."""
    cases = [([], True, "bf16"), (["adapter=slora"], True, "fp32"), (["trainer.fused_lora=false"], True, "fp32"),
             ([], False, "fp32")]
    if torch.cuda.is_available():  # the last case stands in for a CPU without bf16; a CUDA GPU decides instead
        cases = cases[:-1]
    for i, (extra, has_bf16, trained) in enumerate(cases):
        monkeypatch.setattr(train, "cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        args = ["train", "recipe=banking_support", *TINY_ANY_PRECISION, "trainer.max_steps=2", *extra]
        proc = lora(*args, f"hydra.run.dir={tmp_path / str(i)}")
        assert proc.returncode == 0, proc.stderr
        assert run_result(tmp_path / str(i))["precision"] == trained, (extra, has_bf16)
        assert "needs a CUDA GPU" not in proc.stdout + proc.stderr
        plan = lora(*args, "--dry-run")
        assert f"{trained} (trainer.precision=auto)" in plan.stdout, (extra, has_bf16)


def test_auto_keeps_fp32_for_every_layer_the_fused_path_does_not_compute(monkeypatch):
    """The rest of auto's rule, on composed configs: 4-bit bases, DoRA, ScaLoRA, a bf16 base and sharding launchers
    train in fp32 even on bf16 hardware."""
    from lora_cli.config import compose

    monkeypatch.setattr(train, "cpu_has_bf16", lambda: True)
    base = ["recipe=banking_support", "model=tiny_llama"]
    assert train.auto_takes_bf16(compose(base))
    for extra in (["adapter=qlora"], ["adapter.use_dora=true"], ["adapter=scalora"], ["model.dtype=bfloat16"],
                  ["trainer.launcher=fsdp", "trainer.num_processes=2"]):
        assert not train.auto_takes_bf16(compose(base + extra)), extra


def test_attention_in_fp32_is_sdpa_on_fp32_inputs():
    """Under bf16 autocast, the registered attention upcasts q, k, v and computes exactly what SDPA computes on
    them in fp32; its output stays fp32."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = tiny_model()
    module = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 7, 8, generator=generator).bfloat16()
    key, value = (torch.randn(2, 2, 7, 8, generator=generator).bfloat16() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = _sdpa_in_fp32(module, query, key, value, None, is_causal=True)
    expected, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), None, is_causal=True)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_the_registered_attention_masks_as_sdpa_does(layout):
    """Without autocast it is SDPA itself, so the loss and gradients equal the SDPA model's exactly, on padded
    rows and on packed ones (where the mask keeps examples apart: with no mask, attention would cross them)."""
    from test_exactness import loss_and_grads

    from lora_cli.data import pack

    batch = [pack(examples(LENGTHS), pad_id=0, width=40)] if layout == "packed" else \
        micro_batches(examples(LENGTHS), 8, 0, 1, 0, None)
    results = []
    for fp32_attention in (False, True):
        model = tiny_model()
        if fp32_attention:
            attention_in_fp32(model)
        results.append(loss_and_grads(model, model.get_output_embeddings(), batch))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_only_a_model_on_sdpa_gets_the_fp32_attention():
    """A model on another attention (eager here: what a model without SDPA support runs) keeps its own, which
    may do what SDPA does not (soft-capping, sliding windows); the default bf16 must not swap it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sdpa = tiny_model()
    attention_in_fp32(sdpa)
    assert sdpa.config._attn_implementation == FP32_ATTENTION
    eager = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager"))
    attention_in_fp32(eager)
    assert eager.config._attn_implementation == "eager"


def test_a_model_with_fp32_attention_stays_close_to_fp32():
    """The whole model under bf16 autocast with attention in fp32: its loss within 1% of the fp32 model's."""
    batch = micro_batches(examples(LENGTHS), 8, 0, 1, 0, None)[0]
    reference = tiny_model()
    fp32 = train.token_loss_sum(reference, reference.get_output_embeddings(), batch)
    model = tiny_model()
    attention_in_fp32(model)
    assert model.config._attn_implementation == FP32_ATTENTION
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = train.token_loss_sum(model, model.get_output_embeddings(), batch)
    assert float(bf16) == pytest.approx(float(fp32), rel=LOSS_TOLERANCE)
