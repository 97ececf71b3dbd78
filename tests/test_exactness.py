"""The speed-ups of the loop change no number: packing and the label-only output head are exact.

Each test computes the same loss two ways on the same examples and compares the loss and every gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, lora, read_metrics

from lora_cli.data import IGNORE_INDEX, collate, micro_batches, pack
from lora_cli.train import compile_failure, token_loss_sum


def tiny_model(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(dtype)


def examples(lengths: list[int], seed: int = 1) -> list[dict]:
    """Prompt then reply, as data.tokenize_conversation makes them: the last third of each is labelled."""
    generator = torch.Generator().manual_seed(seed)
    made = []
    for n in lengths:
        ids = torch.randint(3, 96, (n,), generator=generator).tolist()
        cut = n - max(1, n // 3)
        made.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return made


def loss_and_grads(model, head, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    loss = sum(token_loss_sum(model, head, batch) for batch in batches)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


LENGTHS = [5, 17, 9, 30, 12, 3, 22, 8]


def test_pack_lays_every_example_out_whole_in_its_own_positions():
    batch = pack(examples(LENGTHS), pad_id=0, width=40)
    rows, width = batch["input_ids"].shape
    assert width <= 40 and rows < len(LENGTHS) and "attention_mask" not in batch
    starts = (batch["position_ids"] == 0).nonzero().tolist()
    found = []
    for row, at in starts:
        end = at + 1
        while end < width and batch["position_ids"][row, end] == end - at:
            end += 1
        found.append(batch["input_ids"][row, at:end].tolist())
    for example in examples(LENGTHS):
        assert example["input_ids"] in found  # every example once, contiguous, positions from 0
    labelled = int((batch["labels"] != IGNORE_INDEX).sum())
    assert labelled == sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in examples(LENGTHS))


@pytest.mark.parametrize("width", [40, 64, 256])
def test_packed_loss_and_gradients_equal_the_padded_ones(width):
    """Same examples, one padded batch vs rows packed end to end: block-diagonal attention and restarted
    positions make the packed loss the padded loss (fp32, within 1e-5)."""
    model = tiny_model()
    padded = loss_and_grads(model, model.get_output_embeddings(), [collate(examples(LENGTHS), pad_id=0)])
    packed = loss_and_grads(model, model.get_output_embeddings(), [pack(examples(LENGTHS), pad_id=0, width=width)])
    assert torch.allclose(packed[0], padded[0], rtol=0, atol=1e-5 * float(padded[0]))
    assert torch.allclose(packed[1], padded[1], rtol=1e-5, atol=1e-6)


def test_packing_a_step_keeps_its_examples_and_micro_batches():
    step = examples(LENGTHS)
    plain = micro_batches(step, 4, rank=0, world=1, pad_id=0)
    packed = micro_batches(step, 4, rank=0, world=1, pad_id=0, pack_width=64)
    assert len(plain) == len(packed) == 2
    for a, b in zip(plain, packed, strict=True):  # token ids are >= 3, so 0 is padding in both
        assert sorted(b["input_ids"][b["input_ids"] != 0].tolist()) == sorted(
            a["input_ids"][a["attention_mask"] == 1].tolist())
        assert sorted(b["input_ids"][b["labels"] != IGNORE_INDEX].tolist()) == sorted(
            a["input_ids"][a["labels"] != IGNORE_INDEX].tolist())


def test_label_only_head_equals_full_logits():
    """The loop runs the 49k-vocabulary head only on labelled positions; against the full logits of every
    position (the usual way), loss and gradients agree within 1e-6 (float64, so only the math is compared)."""
    import torch.nn.functional as F

    model = tiny_model(torch.float64)
    batch = collate(examples(LENGTHS), pad_id=0)
    label_only = loss_and_grads(model, model.get_output_embeddings(), [batch])

    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    full.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert abs(float(label_only[0] - full.detach())) <= 1e-6 * float(full.detach())
    assert torch.allclose(label_only[1], grads, rtol=1e-6, atol=1e-9)


def test_a_packed_run_trains_like_a_padded_one(tmp_path):
    """Through the CLI: `trainer.packing=true` gives the same per-step losses as the padded run (no dropout,
    so both draw nothing random), and they go down."""
    common = ["train", "recipe=banking_support", *TINY, "adapter.dropout=0", "trainer.max_steps=4"]
    losses, padded = {}, {}
    for packing in ("false", "true"):
        run_dir = tmp_path / packing
        proc = lora(*common, f"trainer.packing={packing}", "trainer.group_by_length=false",
                    f"hydra.run.dir={run_dir}")
        assert proc.returncode == 0, proc.stderr
        records = read_metrics(run_dir)
        losses[packing] = [r["loss"] for r in records if "loss" in r]
        padded[packing] = sum(r["padded_tokens"] for r in records if "padded_tokens" in r)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    assert padded["true"] < padded["false"]  # plain shuffled batches pad; packed rows barely do
    assert losses["true"][-1] < losses["true"][0]


def train_both_ways(tmp_path, common: list[str], key: str) -> dict[str, dict]:
    """`lora train COMMON KEY=false` and `KEY=true`: each run's per-step losses, eval losses and saved adapter."""
    from safetensors.torch import load_file

    runs = {}
    for value in ("false", "true"):
        run_dir = tmp_path / value
        proc = lora(*common, f"{key}={value}", f"hydra.run.dir={run_dir}")
        assert proc.returncode == 0, proc.stderr
        records = read_metrics(run_dir)
        runs[value] = {"loss": [r["loss"] for r in records if "loss" in r],
                       "eval": [r["eval_loss"] for r in records if "eval_loss" in r],
                       "adapter": load_file(run_dir / "adapter" / "adapter_model.safetensors"),
                       "stderr": proc.stderr}
    return runs


def assert_same_training(run: dict, reference: dict, rel: float, adapter_rtol: float, adapter_atol: float) -> None:
    """Same losses and eval losses (relative tolerance), the same adapter tensors, and a loss that went down."""
    assert run["loss"] == pytest.approx(reference["loss"], rel=rel)
    assert run["eval"] == pytest.approx(reference["eval"], rel=rel)
    assert run["adapter"].keys() == reference["adapter"].keys()
    for name, weight in reference["adapter"].items():
        assert torch.allclose(run["adapter"][name], weight, rtol=adapter_rtol, atol=adapter_atol), name
    assert run["loss"][-1] < run["loss"][0]


@pytest.mark.skipif(compile_failure(torch.device("cpu")) is not None,
                    reason="torch.compile cannot build kernels here (no C++ compiler)")
def test_a_compiled_run_trains_like_an_eager_one(tmp_path):
    """Through the CLI: `trainer.compile=true` fuses kernels but computes the same model, so per-step losses,
    eval losses and the saved adapter match the eager run up to rounding (fp32, tolerance 1e-4). Batches
    with and without padding, so both compiled attention variants (with and without a mask) are used."""
    common = ["train", "recipe=banking_support", *TINY, "adapter.dropout=0", "trainer.max_steps=4",
              "trainer.group_by_length=false", "trainer.eval_every=2"]
    runs = train_both_ways(tmp_path, common, "trainer.compile")
    for compiled, run in runs.items():
        assert ("transformer blocks compiled in" in run["stderr"]) == (compiled == "true")
    assert_same_training(runs["true"], runs["false"], rel=1e-4, adapter_rtol=1e-3, adapter_atol=1e-5)


@pytest.mark.skipif(compile_failure(torch.device("cpu")) is not None,
                    reason="torch.compile cannot build kernels here (no C++ compiler)")
def test_each_compiled_block_is_one_graph_and_the_loss_reads_the_final_hidden_states(tiny_checkpoint):
    """The loss reads the decoder's output through its own hook, so transformers never installs its
    output-capturing hooks, whose ContextVar lookups would break every compiled block into several graphs.
    The hidden states it reads are those `output_hidden_states=True` returns last, exactly."""
    from conftest import compose_run
    from torch._dynamo.utils import counters

    from lora_cli.adapters import build
    from lora_cli.models import load_model
    from lora_cli.train import compile_blocks, final_hidden_states

    run = compose_run(["model=tiny_llama", "adapter.dropout=0"])
    batch = collate(examples(LENGTHS[:3]), pad_id=0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model = build(run.adapter, run.trainer).apply(load_model(tiny_checkpoint, run.model, None))
    with torch.no_grad():
        assert torch.equal(final_hidden_states(model, inputs),
                           model(**inputs, output_hidden_states=True).hidden_states[-1])

    model = build(run.adapter, run.trainer).apply(load_model(tiny_checkpoint, run.model, None))  # no hooks yet
    torch._dynamo.reset()
    counters.clear()
    try:
        assert compile_blocks(model, torch.device("cpu")) == model.config.num_hidden_layers > 1
        token_loss_sum(model, model.get_output_embeddings(), batch).backward()
        assert dict(counters["graph_break"]) == {}
    finally:
        torch._dynamo.reset()


def test_compile_falls_back_to_eager_where_it_cannot_run(monkeypatch):
    """No C++ compiler (or triton): torch.compile fails on its first graph; the run says so and stays eager."""
    from lora_cli.report import console
    from lora_cli.train import compile_blocks

    def broken(*args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    model = tiny_model()
    with console.capture() as captured:
        assert compile_blocks(model, torch.device("cpu")) == 0
    assert "torch.compile does not work here (InvalidCxxCompiler" in captured.get()
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)  # nn.Module.compile's slot


def test_compile_refuses_the_variants_it_is_not_tested_with():
    proc = lora("train", *TINY, "adapter=slora", "trainer.compile=true", "trainer.max_steps=1")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainer.compile=true is supported for plain LoRA" in lines[0], proc.stderr


def test_no_backward_below_the_lowest_adapted_block(tiny_checkpoint):
    """With `adapter.layers` above block 0, block 0's output carries no autograd graph: backward stops at the
    lowest adapted block instead of running through every block below it."""
    from conftest import compose_run

    from lora_cli.adapters import build
    from lora_cli.models import load_model

    run = compose_run(["model=tiny_llama", "adapter.layers=[1]"])
    model = build(run.adapter).apply(load_model(tiny_checkpoint, run.model, None))
    blocks = model.get_base_model().model.layers
    needs_grad = {}

    def note(index):
        def hook(module, args, output):
            needs_grad[index] = (output[0] if isinstance(output, tuple) else output).requires_grad
        return hook

    for index in (0, 1):
        blocks[index].register_forward_hook(note(index))
    batch = collate(examples(LENGTHS[:3]), pad_id=0)
    token_loss_sum(model, model.get_output_embeddings(), batch).backward()
    assert needs_grad == {0: False, 1: True}
