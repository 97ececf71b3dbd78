"""`lora train` end to end through the real CLI on tiny_llama: artifacts, learning, provenance, stock peft."""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
import shutil

import pytest
import torch
from conftest import BANKING77, TINY, compose_run, lora, read_metrics
from safetensors import safe_open
from safetensors.torch import load_file
from test_cli import assert_one_line_error


def test_run_dir_has_every_artifact(tiny_run):
    run_dir, proc = tiny_run
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "README.md", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".adapter.partial-*"))
    assert "lora train: summary" in proc.stdout
    assert "eval loss" in proc.stdout and "trainable params" in proc.stdout
    # The plan line: TINY's 6 steps of 4 examples are half of its 48 (a line that may wrap, as in a terminal)
    assert "| 6 steps of 4 examples (0.5 epochs) |" in " ".join(proc.stderr.split())


def test_loss_goes_down(tiny_run):
    run_dir, _ = tiny_run
    records = read_metrics(run_dir)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    train = [r["loss"] for r in records if "loss" in r]
    assert len(train) == 6 and len(evals) == 3  # before training, at step 3, at the end
    assert evals[-1] < evals[0]
    assert train[-1] < train[0]


def test_each_step_logs_the_learning_rate_its_update_used(tmp_path):
    """Two warmup steps of a constant schedule: the updates use 0, lr/2, then lr; the log said one step ahead."""
    run_dir = tmp_path / "run"
    proc = lora("train", "recipe=banking_support", *TINY, "trainer.max_steps=4", "trainer.schedule=constant",
                "trainer.warmup_ratio=0.5", "trainer.lr=1e-3", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    steps = [r for r in read_metrics(run_dir) if "lr" in r]
    assert [r["lr"] for r in steps] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


def test_eval_examples_that_are_also_train_examples_are_flagged(tiny_run, tmp_path):
    """Duplicated rows land on both sides of a held-out split: the run says how many, since its eval numbers
    would flatter the adapter. The shipped data has none."""
    assert "also in the train split" not in tiny_run[1].stderr
    rows = [{"messages": [{"role": "user", "content": f"Question {i % 5}"},
                          {"role": "assistant", "content": f"label_{i % 5}"}]} for i in range(20)]
    data = tmp_path / "duplicated.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    proc = lora("train", "recipe=banking_support", *TINY, "dataset=jsonl", f"dataset.path={data}",
                "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    assert "warning: 2 of 2 eval examples are also in the train split" in " ".join(proc.stderr.split())
    plan = lora("train", "--dry-run", "recipe=banking_support", *TINY, "dataset=jsonl", f"dataset.path={data}")
    assert plan.returncode == 0, plan.stderr
    assert "warning: 2 of 2 eval examples are also in the train split" in " ".join(plan.stderr.split())
    # `lora eval` on the run's own eval split: the advice is to fix the data, not to "leave the dataset as trained"
    evaluated = lora("eval", f"run={tmp_path / 'run'}", "eval.max_new_tokens=2")
    assert evaluated.returncode == 0, evaluated.stderr
    warning = " ".join(evaluated.stderr.split())
    assert "in the run's training data" in warning and "remove the duplicates" in warning
    assert "leave the dataset as trained" not in warning


def test_provenance_in_safetensors_metadata(tiny_run):
    from lora_cli.models import sha256_weights

    run_dir, _ = tiny_run
    with safe_open(run_dir / "adapter/adapter_model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["base_model"] == "tiny-llama"
    base_dir = json.loads((run_dir / "adapter/adapter_config.json").read_text())["base_model_name_or_path"]
    assert meta["base_model_path"] == base_dir
    assert meta["base_model_sha256"] == sha256_weights(__import__("pathlib").Path(base_dir))
    assert meta["config_sha256"] == hashlib.sha256((run_dir / "config.yaml").read_bytes()).hexdigest()
    assert len(meta["dataset_fingerprint"]) == 64
    assert meta["lora_cli_version"]


def test_config_yaml_is_the_resolved_run_config(tiny_run):
    from omegaconf import OmegaConf

    from lora_cli.config import RunConfig

    run_dir, _ = tiny_run
    saved = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(run_dir / "config.yaml"))
    assert saved.trainer.max_steps == 6 and saved.model.source == "random"
    assert saved.dataset.name == "banking_support" and saved.adapter.r == 16


def test_model_card_says_how_to_reproduce_and_load(tiny_run):
    run_dir, _ = tiny_run
    card = (run_dir / "README.md").read_text()
    assert "lora train recipe=banking_support model=tiny_llama" in card
    assert "PeftModel.from_pretrained" in card and "tiny-llama" in card


def write_sums(path) -> None:
    """A small chat dataset of the user's, in a project folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                          {"role": "assistant", "content": f"{i + 1}"}]} for i in range(24)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_cards_reproduce_command_runs_from_any_folder(tmp_path):
    """A relative dataset.path is printed absolute, as config.yaml keeps it: pasted in another folder, the command
    as typed named no data (and the "continue with" command was refused there as a config change)."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "data").mkdir(parents=True)
    elsewhere.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                          {"role": "assistant", "content": f"{i + 1}"}]} for i in range(24)]
    (project / "data" / "sums.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["model=tiny_llama", "dataset=jsonl", "dataset.path=data/sums.jsonl", "trainer.max_steps=2"]
    first = lora("train", *args, f"hydra.run.dir={tmp_path / 'first'}", cwd=project)
    assert first.returncode == 0, first.stderr
    card = (tmp_path / "first" / "README.md").read_text()
    command = next(line for line in card.splitlines() if line.startswith("lora train "))
    assert f"dataset.path={project / 'data' / 'sums.jsonl'}" in command
    program, subcommand, *again = shlex.split(command)
    second = lora(subcommand, *again, f"hydra.run.dir={tmp_path / 'second'}", cwd=elsewhere)
    assert second.returncode == 0, second.stderr
    weights = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("first", "second")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_run_on_a_relative_data_path_resumes_as_typed(tmp_path):
    """The checkpoint keeps dataset.path absolute; the same relative path, from the same folder, is the same run
    (it was refused as a config change)."""
    project = tmp_path / "project"
    write_sums(project / "data" / "sums.jsonl")
    args = ["model=tiny_llama", "dataset=jsonl", "dataset.path=data/sums.jsonl", "trainer.max_steps=4",
            "trainer.save_every=2", f"hydra.run.dir={tmp_path / 'run'}"]
    assert lora("train", *args, cwd=project).returncode == 0
    shutil.rmtree(tmp_path / "run" / "adapter")  # as if stopped after the step-2 checkpoint
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004", ignore_errors=True)
    resumed = lora("train", *args, "resume=auto", cwd=project)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr


def test_stock_peft_reloads_the_trained_model_exactly(tmp_path):
    """The adapter on disk, loaded by stock peft onto the base it names, is the model that was trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_cli.train import train

    cfg = compose_run(["recipe=banking_support", *TINY, "trainer.max_steps=3"])
    _, trained = train(cfg, tmp_path, "test")
    adapter_dir = tmp_path / "adapter"
    base_path = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter_dir)
    reloaded.to(trained.device)  # the GPU's, on CUDA
    inputs = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0)).to(trained.device)
    trained.eval()
    reloaded.eval()
    with torch.no_grad():
        diff = (trained(input_ids=inputs).logits - reloaded(input_ids=inputs).logits).abs().max().item()
    assert diff <= 1e-5
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # training moved B away from its zero init


@pytest.mark.skipif(not BANKING77.is_dir(), reason="needs ../shared/data/banking77")
def test_trains_on_real_banking77(tmp_path):
    proc = lora("train", "recipe=banking_support", "dataset=banking77", f"dataset.path={BANKING77}",
                *TINY, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "48 train / 16 eval" in " ".join(proc.stderr.split())
    assert (tmp_path / "adapter/adapter_model.safetensors").is_file()


def test_hf_source_loads_a_local_folder(tmp_path, tiny_checkpoint):
    """model=hf takes a hub id or a local folder; the hub path is the same code after download."""
    proc = lora("train", "recipe=banking_support", *TINY, "trainer.max_steps=2", "model=hf",
                f"model.name_or_path={tiny_checkpoint.path}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_checkpoint.path)


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_a_hub_id_trains_on_what_the_hub_download_gives(tmp_path, tiny_checkpoint, monkeypatch, trust_remote_code):
    """No hub here: the download is stood in for by the tiny model's folder. What is asked for is checked: weights
    as safetensors (never pickles), and the repo's Python code only when the user trusts it (transformers needs it
    beside the weights for such a model)."""
    import huggingface_hub

    asked = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **_):
        asked.update(repo_id=repo_id, revision=revision, patterns=allow_patterns)
        return str(tiny_checkpoint.path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    proc = lora("train", "recipe=banking_support", *TINY, "trainer.max_steps=2", "model=hf",
                "model.name_or_path=someorg/tiny-llama", "model.revision=v1",
                f"model.trust_remote_code={str(trust_remote_code).lower()}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert asked["repo_id"] == "someorg/tiny-llama" and asked["revision"] == "v1"
    assert "*.safetensors" in asked["patterns"] and not any("bin" in p or "pt" in p for p in asked["patterns"])
    assert ("*.py" in asked["patterns"]) == trust_remote_code
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_checkpoint.path)


def hub_banking77(split: str):
    """Banking77 as the hub serves it (PolyAI/banking77): the intent in a `label` column of class ids."""
    import csv

    from datasets import ClassLabel, Dataset, Features, Value

    names = json.loads((BANKING77 / "categories.json").read_text())
    with open(BANKING77 / f"{split}.csv", newline="") as f:
        rows = list(csv.DictReader(f))[::15]  # every intent, ~700 rows: more than banking77's 500 held out for eval
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"text": [r["text"] for r in rows], "label": [names.index(r["category"]) for r in rows]},
                             features=features)


@pytest.mark.parametrize("reachable", [True, False])
def test_a_hub_dataset_trains_on_what_the_hub_gives(tmp_path, monkeypatch, reachable):
    """No hub here: `load_dataset` is stood in for by the local Banking77 in the hub's layout (class ids, `label`).
    Offline, the hub check fails at once, in one line, and `load_dataset` (which retried for ~25 s) is never
    called."""
    import datasets
    from huggingface_hub import HfApi

    class ConnectError(OSError):  # what huggingface_hub's HTTP client raises offline
        pass

    asked = []

    def dataset_info(self, repo_id, revision=None, **_):
        if not reachable:
            raise ConnectError("[Errno -2] Name or service not known")
        asked.append(("info", repo_id, revision))

    def load_dataset(path, split=None, revision=None, **_):
        asked.append(("load", path, split))
        return hub_banking77(split)

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # the suite runs offline; this is the online path
    monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    proc = lora("train", "recipe=banking_support", *TINY, "trainer.max_steps=2", "dataset=banking77",
                f"hydra.run.dir={tmp_path}")
    if not reachable:
        assert_one_line_error(proc, "could not load dataset 'PolyAI/banking77'", "ConnectError", "dataset.path")
        assert asked == [] and not (tmp_path / "adapter").exists()
        return
    assert proc.returncode == 0, proc.stderr
    assert set(asked) == {("info", "PolyAI/banking77", None), ("load", "PolyAI/banking77", "train")}  # eval: held out
    assert "48 train / 16 eval examples" in " ".join(proc.stderr.split())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_allocator_settings():
    """trainer.keep_freed_memory's mallopt calls are all accepted (glibc refuses, returning 0, a threshold
    above its maximum), so the setting is in force, not silently ignored."""
    from lora_cli.train import keep_freed_memory

    assert keep_freed_memory()


def test_the_duplicates_warning_names_the_columns_read(tmp_path):
    """Alpaca-style rows whose instruction is the same everywhere and whose message is in `input`, a column that
    dataset.format=columns does not read: the rows collapse into a few conversations, and the warning told the
    user to remove duplicates the file does not have. It names the columns read, by the file's names."""
    rows = [{"instruction": "Classify the message.", "input": f"message {i}", "output": f"label_{i % 2}"}
            for i in range(20)]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    proc = lora("train", "--dry-run", *TINY, "dataset=jsonl", f"dataset.path={data}", "dataset.format=columns",
                "+dataset.rename_columns.instruction=prompt", "dataset.completion_column=output")
    assert proc.returncode == 0, proc.stderr
    warning = " ".join(proc.stderr.split())
    assert "eval examples are also in the train split" in warning
    assert "the columns read: instruction, output; other columns are not read" in warning
