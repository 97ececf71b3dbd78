"""The fused LoRA layer (adapters/fused.py) computes exactly what peft's LoRA layer computes.

The function against the formula in fp64; the layer inside a model against peft's own forward (loss and every
gradient); through the CLI, a run with `trainer.fused_lora=true` against one with false; and the cases it must
leave to peft (DoRA, S-LoRA's scale in the graph, a merged adapter) still give peft's numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY
from test_exactness import LENGTHS, assert_same_training, examples, loss_and_grads, tiny_model, train_both_ways

from lora_cli.adapters.fused import FusedLoraLinear, LoraLinearFunction
from lora_cli.config import AdapterConfig, TrainerConfig, compose
from lora_cli.data import micro_batches
from lora_cli.models import load_model, resolve_checkpoint
from lora_cli.train import token_loss_sum


def reference(x, x_dropped, weight, bias, lora_A, lora_B, scaling):
    """LoRA as its paper writes it, by plain autograd."""
    out = x @ weight.t() + scaling * (x_dropped @ lora_A.t()) @ lora_B.t()
    return out if bias is None else out + bias


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_function_equals_the_formula_and_its_gradients(bias, dropout):
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)

    x, weight, lora_A, lora_B = rand(3, 7, 12, grad=True), rand(10, 12), rand(4, 12, grad=True), rand(10, 4, grad=True)
    b = rand(10) if bias else None
    mask = (torch.rand(3, 7, 12, generator=generator, dtype=torch.float64) > 0.3) / 0.7
    grad_out = rand(3, 7, 10)
    outputs = (LoraLinearFunction.apply(x, x * mask if dropout else None, weight, b, lora_A, lora_B, 0.37,
                                        torch.float64),
               reference(x, x * mask if dropout else x, weight, b, lora_A, lora_B, 0.37))
    results = [(out.detach(), *torch.autograd.grad(out, (x, lora_A, lora_B), grad_out)) for out in outputs]
    for fused, expected in zip(*results, strict=True):
        assert torch.allclose(fused, expected, rtol=1e-12, atol=1e-12)


def adapted(fused: bool, dtype=torch.float64, **adapter):
    from lora_cli.adapters.lora import Lora

    config = AdapterConfig(name="lora", r=4, alpha=8, **adapter)
    model = Lora(config, TrainerConfig(fused_lora=fused)).apply(tiny_model(dtype))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero: give it values, or its path would carry no signal
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.normal_(0, 0.5)
    return model


def batches():
    return micro_batches(examples(LENGTHS), 4, 0, 1, 0, None)


@pytest.mark.parametrize("adapter", [{}, {"use_dora": True}, {"use_rslora": True}])
def test_layer_in_a_model_equals_peft(adapter):
    """The whole model's loss and every adapter gradient, fused vs peft's forward; DoRA falls back to peft."""
    results = {}
    for fused in (False, True):
        model = adapted(fused, **adapter)
        layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
        assert bool(layers) == fused and all(type(m.base_layer) is torch.nn.Linear for m in layers)
        results[fused] = loss_and_grads(model, model.get_output_embeddings(), batches())
    assert torch.allclose(results[True][0], results[False][0], rtol=1e-12)
    assert torch.allclose(results[True][1], results[False][1], rtol=1e-10, atol=1e-12)


def test_the_fused_path_is_taken_only_where_it_is_exact(monkeypatch):
    calls = []
    original = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or original(*a))
    model = adapted(True)
    layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    batch = batches()[0]
    model(input_ids=batch["input_ids"])
    assert len(calls) == len(layers) == 14  # 2 blocks x 7 linear layers, each through the fused path once
    calls.clear()
    with model.disable_adapter():
        model(input_ids=batch["input_ids"])
    assert not calls
    layer = layers[0]
    layer.scaling["default"] = torch.tensor(2.0, dtype=torch.float64)  # as S-LoRA sets it: a tensor in the graph
    model(input_ids=batch["input_ids"])
    assert len(calls) == len(layers) - 1


def test_merged_adapter_equals_the_fused_forward():
    """`lora merge` folds B A into W; the merged model's logits equal the fused adapter's."""
    model = adapted(True)
    input_ids = batches()[0]["input_ids"]
    with torch.no_grad():
        adapter_logits = model(input_ids=input_ids).logits
        merged_logits = model.merge_and_unload()(input_ids=input_ids).logits
    assert torch.allclose(merged_logits, adapter_logits, rtol=1e-10, atol=1e-10)


def test_a_fused_run_trains_like_peft_through_the_cli(tmp_path):
    """Same per-step losses, eval losses and saved adapter with `trainer.fused_lora` on and off (dropout on:
    it draws the same masks either way); the saved adapter is stock peft's, whichever forward trained it."""
    from peft import PeftModel  # stock peft, with no custom layer registered, loads what the fused run saved

    common = ["train", "recipe=banking_support", *TINY, "adapter.dropout=0.1", "trainer.max_steps=4",
              "trainer.eval_every=2"]
    runs = train_both_ways(tmp_path, common, "trainer.fused_lora")
    assert_same_training(runs["true"], runs["false"], rel=1e-5, adapter_rtol=1e-4, adapter_atol=1e-6)
    cfg = compose(["recipe=banking_support", *TINY])
    base = load_model(resolve_checkpoint(cfg.model), cfg.model)
    loaded = PeftModel.from_pretrained(base, tmp_path / "true" / "adapter")
    assert not any(isinstance(m, FusedLoraLinear) for m in loaded.modules())


def test_layer_under_bf16_autocast_is_as_close_to_fp32_as_peft(monkeypatch):
    """Under autocast (`trainer.precision=bf16`) the fused layer casts its inputs to bf16 as autocast casts peft's
    linears, and is taken for every layer. It rounds differently (the scale and the add inside the GEMM), so it
    cannot equal peft bit for bit; it must be as close to the fp32 loss and gradients as peft's bf16 forward is
    (on this tiny model bf16 gradients are ~8-10% off fp32 in norm, either way)."""
    calls = []
    original = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or original(*a))

    def loss_and_grads_in(precision: str, fused: bool) -> tuple[float, torch.Tensor]:
        model = adapted(fused, torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = sum(token_loss_sum(model, model.get_output_embeddings(), batch) for batch in batches())
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    fp32_loss, fp32_grads = loss_and_grads_in("fp32", False)
    calls.clear()
    errors = {}
    for fused in (False, True):
        loss, grads = loss_and_grads_in("bf16", fused)
        errors[fused] = abs(loss / fp32_loss - 1), float((grads - fp32_grads).norm() / fp32_grads.norm())
    assert len(calls) == 14 * len(batches())  # every layer of the fused model, every micro-batch
    assert errors[False][0] < 1e-2 and errors[True][0] < 1e-2
    assert errors[True][1] < 1.5 * errors[False][1], errors


def test_a_bf16_model_under_autocast_gets_peft_s_dtypes_and_numbers():
    """`model.dtype=bfloat16 trainer.precision=bf16`: the fused layer returned fp32 (lora_B's dtype) into a bf16
    model, so the hidden states reached the bf16 output head as fp32 and the first eval stopped with a dtype
    error. Its output is the frozen weight's dtype, as peft's is; loss and gradients match peft's to bf16's
    rounding."""
    results = {}
    for fused in (False, True):
        model = adapted(fused, torch.bfloat16)
        layer = next(m for name, m in model.named_modules() if name.endswith("mlp.down_proj"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16))
            loss = sum(token_loss_sum(model, model.get_output_embeddings(), batch) for batch in batches())
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        results[fused] = out.dtype, float(loss.detach()), grads
    assert results[True][0] == results[False][0] == torch.bfloat16
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-2)
    assert float((results[True][2] - results[False][2]).norm() / results[False][2].norm()) < 5e-2


def test_under_autocast_a_small_lora_delta_is_not_rounded_away():
    """A LoRA delta under 1% of W x, as at the start of training: a bf16 output (peft's under autocast) keeps
    8 bits of mantissa, which loses ~20% of the delta; the fused layer adds it in fp32 to the bf16 GEMM's result,
    so output minus base output is the delta to within 1%."""
    errors = {}
    for fused in (False, True):
        model = adapted(fused, torch.float32)
        layer = next(m for name, m in model.named_modules() if name.endswith("mlp.down_proj"))
        with torch.no_grad():
            layer.lora_B["default"].weight.mul_(1e-3)
            x = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(0))
            delta = layer(x) - layer.base_layer(x)
            assert delta.norm() < 1e-2 * layer.base_layer(x).norm()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                seen = layer(x).float() - layer.base_layer(x).float()
        errors[fused] = float((seen - delta).norm() / delta.norm())
    assert errors[True] < 1e-2 < 0.1 < errors[False], errors
