"""`lora eval`, `lora merge`, `lora generate` through the real CLI on a tiny_llama run."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import BANKING77, TINY, compose_run, lora
from test_cli import assert_one_line_error

from lora_cli.evaluate import score, token_f1
from lora_cli.merge import MERGE_RECORD

EVAL_FAST = ["eval.max_samples=12", "eval.max_new_tokens=6", "eval.show_samples=2"]


def test_token_f1_and_exact_match_scoring():
    assert token_f1("Freeze the card in the app", "freeze the card in the app") == 1.0
    assert token_f1("totally different", "freeze card") == 0.0
    assert 0 < token_f1("freeze the card", "freeze the card now please") < 1
    result = score("exact_match", ["pin_blocked\nUnblock it.", "card_arrival", "I think card_arrival"],
                   ["pin_blocked\nGo to the app.", "lost_or_stolen_card\nx", "card_arrival\ny"],
                   labels={"pin_blocked", "card_arrival", "lost_or_stolen_card"})
    assert result["correct"] == 1 and result["invalid_labels"] == 1 and result["accuracy"] == pytest.approx(1 / 3)


def test_eval_reports_base_and_adapter_side_by_side(tiny_run):
    run_dir, _ = tiny_run
    proc = lora("eval", f"run={run_dir}", *EVAL_FAST)
    assert proc.returncode == 0, proc.stderr
    assert "base model" in proc.stdout and "with adapter" in proc.stdout and "accuracy" in proc.stdout
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["metric"] == "exact_match" and report["examples"] == 12 and report["labels"] == 77
    for side in ("base", "adapter"):
        assert {"eval_loss", "perplexity", "accuracy", "invalid_labels"} <= set(report[side])
    # Training lowered the loss on the held-out replies, so the adapter must beat its own base there.
    assert report["adapter"]["eval_loss"] < report["base"]["eval_loss"]
    assert len(report["samples"]) == 2 and {"prompt", "gold", "base", "adapter"} <= set(report["samples"][0])
    assert "## Evaluation" in (run_dir / "README.md").read_text()
    assert report["trained_on"] == 0 and "training data" not in proc.stderr
    assert report["overrides"] == EVAL_FAST
    assert report["settings"]["base_model"] == "tiny-llama" and report["settings"]["quantize"] is None


def test_eval_says_when_its_loss_leaves_out_examples(tiny_run, tmp_path):
    """Examples that dataset.max_seq_len cuts to no reply token have no loss, while the task metric still counts
    them: the loss covered fewer examples than the table's count, without a word."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    proc = lora("eval", f"run={run_dir}", "dataset.max_seq_len=55", *EVAL_FAST)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "eval.json").read_text())
    assert 0 < report["loss_examples"] < report["examples"] == 12
    dropped = report["examples"] - report["loss_examples"]
    assert f"warning: {dropped} of 12 eval examples keep no reply token" in " ".join(proc.stderr.split())


def test_eval_on_examples_the_run_trained_on_says_so(tiny_run, tmp_path):
    """An eval override can pick training examples (here the train split itself; also `dataset.eval_split=null`
    after training on an eval file): the report counts them against the run's own training data, caps included,
    and warns. The run trained on 48 rows drawn from the train split; eval's 12 are drawn from it the same way."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    proc = lora("eval", f"run={run_dir}", "dataset.eval_split=train", *EVAL_FAST, "--debug")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["trained_on"] == report["examples"] == 12
    assert "warning: 12 of these 12 eval examples are in the run's training data" in " ".join(proc.stderr.split())
    assert "12 of these 12 examples were in the run's training data" in (run_dir / "README.md").read_text()
    # What the numbers were measured on travels with them (they become the run's row in `lora report`); --debug
    # is how the command reports, not what it measured.
    assert report["overrides"] == ["dataset.eval_split=train", *EVAL_FAST]
    assert f"overrides of the run's config: `dataset.eval_split=train {' '.join(EVAL_FAST)}`" in \
        (run_dir / "README.md").read_text()


@pytest.mark.skipif(not BANKING77.is_dir(), reason="needs ../shared/data/banking77")
@pytest.mark.parametrize("key", ["dataset.eval_split", "dataset.split"])  # the second: an alias for eval
def test_eval_on_another_dataset_split(tiny_run, tmp_path, key):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    proc = lora("eval", f"run={run_dir}", "dataset=banking77", f"dataset.path={BANKING77}",
                f"{key}=test", *EVAL_FAST)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["dataset"] == "banking77" and report["split"] == "test" and report["examples"] == 12


def test_eval_prints_data_with_brackets_as_text(tiny_run, tmp_path):
    """Rich would read `[bold]` in a prompt as a style and `[/]` as a closing tag with nothing open, a crash after
    eval.json is written (and, under trainer.eval_at_end, a failed training run)."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    rows = [{"messages": [{"role": "user", "content": f"Question {i} about [/] and [bold]x"},
                          {"role": "assistant", "content": f"label_{i % 2}\nSee [red]Settings[/red] > Cards."}]}
            for i in range(8)]
    data = tmp_path / "brackets.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    proc = lora("eval", f"run={run_dir}", "dataset=jsonl", f"dataset.path={data}", "dataset.eval_size=4", *EVAL_FAST)
    assert proc.returncode == 0, proc.stderr
    assert "about [/] and [bold]x" in proc.stdout and "[red]Settings[/red]" in proc.stdout


def test_eval_scores_the_last_reply_not_a_closing_user_turn(tiny_run, tmp_path):
    """A chat may end with the user's "thanks": the gold is the last assistant turn, and the prompt what precedes
    it (the closing turn had become the gold label, and the only label)."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    labels = ["card_arrival", "lost_or_stolen_card"]
    rows = [{"messages": [{"role": "user", "content": f"Question {i}"},
                          {"role": "assistant", "content": f"{labels[i % 2]}\nSee the app."},
                          {"role": "user", "content": "thanks, bye"}]} for i in range(8)]
    data = tmp_path / "closing.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    proc = lora("eval", f"run={run_dir}", "dataset=jsonl", f"dataset.path={data}", "dataset.eval_size=4",
                "dataset.task_metric=exact_match", "eval.label_mode=constrained", *EVAL_FAST)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["labels"] == 2
    assert all(s["gold"].split("\n")[0] in labels and s["prompt"].startswith("Question") for s in report["samples"])


def test_the_model_cards_evaluation_section_survives_hand_edits(tmp_path):
    """Re-evaluating replaces the section between its markers; with a marker edited away it adds a fresh one and
    keeps every line the user wrote (it raised ValueError)."""
    from lora_cli.evaluate import CARD_END, CARD_START, update_model_card

    side = {"eval_loss": 2.0, "perplexity": 7.4, "token_f1": 0.5}
    report = {"metric": "token_f1", "dataset": "d", "split": "eval", "examples": 4, "label_mode": "generate",
              "decoding": "greedy", "base": side, "adapter": side}
    card = tmp_path / "README.md"
    card.write_text("# my notes\n")
    update_model_card(card, report)
    update_model_card(card, report)
    assert card.read_text().count(CARD_START) == 1 and card.read_text().startswith("# my notes")
    card.write_text(card.read_text().replace(CARD_END, "") + "more notes\n")
    update_model_card(card, report)
    text = card.read_text()
    assert text.startswith("# my notes") and "more notes" in text and text.rstrip().endswith(CARD_END)
    update_model_card(card, report)  # the fresh section is replaced; the orphaned marker and the notes stay
    assert card.read_text() == text


LOAD_WITHOUT_LORA_CLI = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(out).eval()
tokenizer = AutoTokenizer.from_pretrained(out)
assert not {"lora_cli", "peft"} & set(sys.modules), "merged model must load without lora_cli or peft"
with torch.no_grad():
    logits = model(input_ids=ids).logits
    greedy = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print(json.dumps({"logits": logits.tolist(), "greedy": greedy.tolist(), "template": tokenizer.chat_template}))
"""


def test_merged_checkpoint_loads_without_lora_cli_and_matches(tiny_run, tmp_path, tokenizer):
    from lora_cli.runs import load_adapted, load_run_config

    run_dir, out = tiny_run[0], tmp_path / "merged"
    proc = lora("merge", f"run={run_dir}", f"output={out}")
    assert proc.returncode == 0, proc.stderr
    assert "parity" in proc.stdout and "pass" in proc.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert "sha256" in (out / "README.md").read_text()
    # Provenance travels with the checkpoint (config.json), not only in its card: the adapter's header, its hash.
    recorded = json.loads((out / "config.json").read_text())["lora_cli_provenance"]
    adapter_file = run_dir / "adapter" / "adapter_model.safetensors"
    assert recorded["base_model"] == "tiny-llama" and recorded["run_dir"] == str(run_dir)
    assert recorded["adapter_sha256"] == hashlib.sha256(adapter_file.read_bytes()).hexdigest()
    # Given relative (run=run, from its parent), the run is recorded where it is: the checkpoint travels, "run" says
    # nothing elsewhere.
    again = lora("merge", f"run={run_dir.name}", f"output={tmp_path / 'again'}", cwd=run_dir.parent)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "again/config.json").read_text())["lora_cli_provenance"]["run_dir"] == str(run_dir)

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "I lost my card"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_LORA_CLI, str(out), json.dumps(ids)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    merged = json.loads(loaded.stdout)
    adapted = load_adapted(run_dir, load_run_config(run_dir, []), device="cpu")  # where the subprocess computed
    with torch.no_grad():
        reference = adapted.model(input_ids=torch.tensor(ids)).logits
        greedy = adapted.model.generate(input_ids=torch.tensor(ids), max_new_tokens=8, do_sample=False,
                                        pad_token_id=adapted.tokenizer.pad_token_id)
    assert (torch.tensor(merged["logits"]) - reference).abs().max().item() <= 1e-4
    assert merged["greedy"] == greedy.tolist()
    assert merged["template"] == adapted.tokenizer.chat_template


def test_merge_refuses_what_it_cannot_do_cleanly(tiny_run, tmp_path):
    run_dir = tiny_run[0]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("user data")
    assert_one_line_error(lora("merge", f"run={run_dir}", f"output={taken}"), "merge.overwrite=true")
    # merge.overwrite replaces an earlier merge's output only: never a folder of the user's, nor the run itself.
    assert_one_line_error(lora("merge", f"run={run_dir}", f"output={taken}", "merge.overwrite=true"),
                          "not an earlier lora merge output")
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    for holder in (run_dir, run_dir.parent):
        assert_one_line_error(lora("merge", f"run={run_dir}", f"output={holder}", "merge.overwrite=true"),
                              "holds the run being merged")
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    earlier = tmp_path / "earlier_merge"  # `output=.` from inside an earlier merge's output emptied it
    earlier.mkdir()
    (earlier / MERGE_RECORD).write_text("{}")
    for output in (".", ".."):
        assert_one_line_error(lora("merge", f"run={run_dir}", f"output={output}", "merge.overwrite=true", cwd=earlier),
                              "the folder this command runs in")
    assert [p.name for p in earlier.iterdir()] == [MERGE_RECORD]

    no_adapter = tmp_path / "no_adapter"
    shutil.copytree(run_dir, no_adapter, ignore=shutil.ignore_patterns("adapter"))
    assert_one_line_error(lora("merge", f"run={no_adapter}", f"output={tmp_path / 'o1'}"), "no complete adapter")

    corrupted = tmp_path / "corrupted"
    shutil.copytree(run_dir, corrupted)
    weights = corrupted / "adapter/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(lora("merge", f"run={corrupted}", f"output={tmp_path / 'o2'}"), "corrupted")

    assert_one_line_error(lora("merge", f"run={tmp_path / 'nope'}", f"output={tmp_path / 'o3'}"), "no such directory")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(taken)
    for output, needle in (("notes.txt", "is a file"), ("notes.txt/merged", "is a file"), ("link", "symbolic link")):
        assert_one_line_error(lora("merge", f"run={run_dir}", f"output={tmp_path / output}"), needle)
    assert (tmp_path / "notes.txt").read_text() == "mine" and [p.name for p in taken.iterdir()] == ["mine.txt"]
    assert_one_line_error(lora("merge", f"run={run_dir}"), "output=")
    assert_one_line_error(lora("merge", f"run={run_dir}", f"output={tmp_path / 'o4'}", "merge.tolernce=1"),
                          "merge.tolerance")
    # A failed parity check (an impossible tolerance) leaves nothing that looks like a checkpoint.
    assert_one_line_error(lora("merge", f"run={run_dir}", f"output={tmp_path / 'o5'}", "merge.tolerance=1e-30"),
                          "parity check failed")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("o", ".o"))]


def test_what_a_finished_run_cannot_take_is_refused_in_one_line(tiny_run, tmp_path):
    """`lora eval run=... adapter.r=4` would change what the report and the merged model's card say, not the saved
    weights: refused, naming what the run trained. How the base loads under the adapter may still change. A
    training setting changes nothing at all."""
    from lora_cli.runs import load_run_config

    run_dir = tiny_run[0]
    assert_one_line_error(lora("eval", f"run={run_dir}", "adapter.r=4"), "adapter.r=4", "adapter.r=16",
                          "train a new run")
    assert_one_line_error(lora("merge", f"run={run_dir}", f"output={tmp_path / 'out'}", "adapter=slora"),
                          "adapter=lora")
    assert not (tmp_path / "out").exists()
    assert_one_line_error(lora("generate", f"run={run_dir}", "adapter.rr=4"), "did you mean adapter.r",
                          "`lora generate --help` lists every key")
    # The command's own arguments, misspelt: not "unknown config key 'promt'; (`lora train --help` ...)"
    assert_one_line_error(lora("generate", f"run={run_dir}", "promt=hi"), "takes no promt=", "did you mean prompt=?")
    assert_one_line_error(lora("merge", f"run={run_dir}", "ouput=x"), "takes no ouput=", "did you mean output=?")
    assert_one_line_error(lora("eval", f"run={run_dir}", "datset=banking77"), "did you mean dataset=?")
    # Training settings did nothing after training, silently: `trainer.eval_batch_size=4` is not eval.batch_size.
    for override in ("trainer.lr=1", "trainer.batch_size=4", "trainer=default"):
        assert_one_line_error(lora("eval", f"run={run_dir}", override), override, "eval.batch_size")
    assert_one_line_error(lora("eval", f"run={run_dir}", "~dataset"), "~dataset", "keeps every key")
    # Training's data caps were ignored by eval without a word (the whole split, up to half an hour on Banking77).
    for override in ("dataset.max_eval_examples=2", "dataset.max_train_examples=2"):
        assert_one_line_error(lora("eval", f"run={run_dir}", override), override, "eval.max_samples=N")
    assert load_run_config(run_dir, ["adapter.quantize=nf4"]).adapter.quantize == "nf4"
    # A max_seq_len that leaves nothing to score: the same one-line reason training gives, nothing written.
    assert_one_line_error(lora("eval", f"run={run_dir}", "dataset.max_seq_len=8"), "(eval split)",
                          "dataset.max_seq_len=8 leaves no reply token")
    assert_one_line_error(lora("merge", f"run={run_dir}", f"output={tmp_path / 'out'}", "dataset.max_seq_len=8"),
                          "merge probes", "dataset.max_seq_len=8 leaves no reply token")
    assert not (tmp_path / "out").exists()
    # A config.yaml edited by hand, from another version, or emptied.
    for name, text, needle in (("foreign", "foo: 1\n", "Key 'foo' not in 'RunConfig'"),
                               ("broken", "model: {name: [\n", "while parsing"), ("empty", "", "the file is empty")):
        copy = tmp_path / name
        shutil.copytree(run_dir, copy)
        (copy / "config.yaml").write_text((copy / "config.yaml").read_text() + text if name == "foreign" else text)
        assert_one_line_error(lora("eval", f"run={copy}"), "config.yaml is not a config this lora-cli can read",
                              needle)
    # Another base under the adapter: the warning, then the shapes that do not fit, not a bare first line.
    assert_one_line_error(lora("eval", f"run={run_dir}", "model.architecture.hidden_size=32"), "size mismatch for",
                          "load the base it was trained on")
    # Same shapes, other weights: it loads, and says so.
    other_weights = lora("generate", f"run={run_dir}", "prompt=hi", "generate.max_new_tokens=2", "model.init_seed=1")
    assert other_weights.returncode == 0, other_weights.stderr
    assert "differ from those the adapter was trained on" in other_weights.stderr
    assert_one_line_error(lora("generate", f"run={run_dir}", "prompt= "), "prompt= is empty", "leave prompt= out")


def test_a_failed_run_says_why_it_has_no_adapter(tmp_path):
    """Not "not a lora-cli run dir": its run.json says what ended it."""
    run_dir = tmp_path / "run"
    proc = lora("train", "recipe=banking_support", *TINY, "trainer.max_steps=2", "trainer.lr=1e38",
                f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    assert_one_line_error(lora("generate", f"run={run_dir}", "prompt=hi"), "holds a run that failed before it saved",
                          "non-finite loss", "train it again")


@pytest.mark.parametrize("command", [["eval"], ["generate", "prompt=hi"], ["merge", "output=merged"]])
def test_a_run_still_training_is_not_called_unfinished(tmp_path, command):
    """A run still going (its checkpoints there, its lock held) was told to `resume=auto`, which would have started
    a second process on it."""
    from lora_cli.rundir import claim_run_dir

    finished, run_dir = tmp_path / "finished", tmp_path / "run"
    proc = lora("train", "recipe=banking_support", *TINY, "trainer.max_steps=2", "trainer.save_every=1",
                f"hydra.run.dir={finished}")
    assert proc.returncode == 0, proc.stderr
    shutil.copytree(finished / "checkpoints", run_dir / "checkpoints")  # a run part-way: a checkpoint, no adapter
    with claim_run_dir(run_dir):  # as the training process holds it
        proc = lora(command[0], f"run={run_dir}", *command[1:], cwd=tmp_path)
    assert_one_line_error(proc, "is still training", "when that run has finished")
    assert not (tmp_path / "merged").exists()
    # Once no process holds it, it is a run to finish.
    assert_one_line_error(lora(command[0], f"run={run_dir}", *command[1:], cwd=tmp_path), "unfinished run",
                          "resume=auto")


def test_a_run_on_relative_paths_is_evaluated_from_anywhere(tmp_path):
    """config.yaml keeps local paths absolute, so eval (merge, generate, resume) finds the data from any working
    directory, not only the one training ran in."""
    import yaml

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"Question {i}"},
                          {"role": "assistant", "content": f"label_{i % 3}"}]} for i in range(24)]
    (work / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    proc = lora("train", "recipe=banking_support", *TINY, "trainer.max_steps=1", "dataset=jsonl",
                "dataset.path=data.jsonl", "hydra.run.dir=run", cwd=work)
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((work / "run/config.yaml").read_text())
    assert saved["dataset"]["path"] == str((work / "data.jsonl").resolve())
    proc = lora("eval", f"run={work / 'run'}", *EVAL_FAST, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr

def test_merge_stores_bfloat16_after_checking_the_fp32_merge(tiny_run, tmp_path):
    """merge.dtype=bfloat16: the parity check runs on the fp32 merge; the storage rounding is reported apart,
    never shown as the checked number."""
    from safetensors import safe_open

    out = tmp_path / "merged"
    proc = lora("merge", f"run={tiny_run[0]}", f"output={out}", "merge.dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "lora_cli_merge.json").read_text())
    assert record["merge_max_abs_diff"] <= record["allowed_max_abs_diff"] < record["saved_max_abs_diff"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}  # noqa: SIM118
    text = " ".join(proc.stdout.replace("│", " ").split())  # the table's cells, unwrapped
    assert f"= {record['merge_max_abs_diff']:.2e}" in text and "reported, not checked" in text


def test_merge_tolerance_is_relative_to_the_logits(tmp_path):
    """A base with larger weights (initializer_range 0.5: logits up to ~20) rounds its merge by more than 1e-4 in
    absolute terms, ~1e-5 of its largest logit: the check scales with the logits, so the merge passes."""
    run_dir, out = tmp_path / "run", tmp_path / "merged"
    trained = lora("train", "recipe=banking_support", *TINY, "+model.architecture.initializer_range=0.5",
                   f"hydra.run.dir={run_dir}")
    assert trained.returncode == 0, trained.stderr
    proc = lora("merge", f"run={run_dir}", f"output={out}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "lora_cli_merge.json").read_text())
    assert result["saved_max_abs_diff"] > 1e-4, "not a case an absolute 1e-4 would have refused"
    assert result["saved_max_abs_diff"] <= result["allowed_max_abs_diff"] == 1e-4 * result["max_abs_logit"]
    # Merged again over that output: merge.overwrite replaces an earlier merge's output.
    stale = out / "model.safetensors"
    stale.write_bytes(b"stale")
    again = lora("merge", f"run={run_dir}", f"output={out}", "merge.overwrite=true")
    assert again.returncode == 0, again.stderr
    assert stale.stat().st_size > 1000


def test_merge_refuses_a_merge_that_is_one_percent_off(tiny_run, tmp_path, monkeypatch):
    """The relative tolerance still catches a subtly wrong merge: every delta folded in at 99% of its size."""
    from peft.tuners.lora.layer import Linear

    delta = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, adapter: 0.99 * delta(self, adapter))
    out = tmp_path / "merged"
    assert_one_line_error(lora("merge", f"run={tiny_run[0]}", f"output={out}"), "parity check failed")
    assert not out.exists()


def test_generate_streams_the_greedy_reply_with_and_without_the_adapter(tiny_run):
    from contextlib import nullcontext

    from lora_cli.runs import load_adapted, load_run_config

    run_dir = tiny_run[0]
    cfg = load_run_config(run_dir, [])
    adapted = load_adapted(run_dir, cfg)
    messages = [{"role": "system", "content": cfg.dataset.system_prompt}, {"role": "user", "content": "I lost my card"}]
    text = adapted.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = adapted.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    for switch, context in (([], nullcontext()), (["adapter=false"], adapted.model.disable_adapter())):
        with context, torch.no_grad():
            out = adapted.model.generate(input_ids=ids, max_new_tokens=64, do_sample=False,
                                         pad_token_id=adapted.tokenizer.pad_token_id)
        expected = adapted.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        proc = lora("generate", f"run={run_dir}", "prompt=I lost my card", "generate.max_new_tokens=64", *switch)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.rstrip("\n") == expected.rstrip("\n")


def test_generate_chat_loop_ends_at_end_of_input(tiny_run):
    from conftest import LORA

    chat = subprocess.run([str(LORA), "generate", f"run={tiny_run[0]}", "generate.max_new_tokens=3"],
                          input="hello\nmy card is stuck\n", capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "Chatting with adapter" in chat.stderr
    # Piped in, the lines are the turns and stdout holds the replies alone: no "you> " prompts between them
    assert "you> " not in chat.stdout and chat.stdout.count("\n") >= 2 and chat.stdout.endswith("\n")


def test_generate_takes_bytes_that_are_not_utf8_without_a_traceback(tiny_run):
    """A Latin-1 terminal's é reaches Python as a lone surrogate, which the tokenizer refused with a TypeError:
    the one prompt is refused in one line; in a chat, the line is skipped and the chat goes on."""
    from conftest import LORA

    run = f"run={tiny_run[0]}"
    assert_one_line_error(lora("generate", run, "prompt=caf\udce9"), "prompt= is not UTF-8 text")
    chat = subprocess.run([str(LORA), "generate", run, "generate.max_new_tokens=3"], input=b"caf\xe9\nhello\n",
                          capture_output=True, timeout=300)
    assert chat.returncode == 0, chat.stderr.decode()
    assert b"not UTF-8 text" in chat.stderr and b"Traceback" not in chat.stderr
    assert chat.stderr.count(b"not UTF-8 text") == 1 and chat.stdout.count(b"\n") >= 1  # hello's reply


def test_generate_into_a_pipe_closed_early_stops_quietly(tiny_run):
    """`lora generate ... | head -n 1`, the natural way to take a label: the reader leaves while the reply streams.
    A BrokenPipeError traceback, exit 1; now what a shell shows for a writer whose reader left."""
    from conftest import LORA

    process = subprocess.Popen([str(LORA), "generate", f"run={tiny_run[0]}", "prompt=I lost my card",
                                "generate.max_new_tokens=300"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.read(1)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_eval_config_overrides_are_checked(tiny_run):
    cfg = compose_run(["eval.batch_size=4"])
    assert cfg.eval.batch_size == 4
    assert_one_line_error(lora("eval", f"run={tiny_run[0]}", "eval.batch_sise=4"), "eval.batch_size")


def test_generate_opens_with_the_system_turn_the_training_conversations_had(tmp_path, monkeypatch):
    """A messages file whose every conversation opens with its own system turn: `lora generate` prompted without it
    (only dataset.system_prompt counted), so the chat template put in its default one, unlike training and
    `lora eval`. It opens with the data's; dataset.system_prompt on the command line wins; where the conversations'
    system turns differ, none, and stderr says so. Piped lines lose a BOM and Windows line endings."""
    import io

    from lora_cli import generate

    def chats(systems: list[str]) -> str:
        return "".join(json.dumps({"messages": [{"role": "system", "content": system},
                                                {"role": "user", "content": f"question {i}"},
                                                {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                       for i, system in enumerate(systems))

    seen = []
    monkeypatch.setattr(generate, "reply", lambda model, tokenizer, messages, cfg: seen.append(messages) or "ok")
    runs = {}
    for name, systems in {"shared": ["Be terse."] * 24, "mixed": ["Be terse.", "Be kind."] * 12}.items():
        (tmp_path / f"{name}.jsonl").write_text(chats(systems))
        runs[name] = tmp_path / name
        proc = lora("train", *TINY, "dataset=jsonl", f"dataset.path={tmp_path / f'{name}.jsonl'}",
                    "trainer.max_steps=1", "trainer.eval_at_end=false", f"hydra.run.dir={runs[name]}")
        assert proc.returncode == 0, proc.stderr

    def opening(*args: str) -> tuple[list[dict], str]:
        seen.clear()
        proc = lora("generate", *args)
        assert proc.returncode == 0, proc.stderr
        return seen[-1], proc.stderr

    shared = f"run={runs['shared']}"
    assert opening(shared, "prompt=hi")[0] == [{"role": "system", "content": "Be terse."},
                                               {"role": "user", "content": "hi"}]
    assert opening(shared, "prompt=hi", "dataset.system_prompt=Be loud.")[0][0]["content"] == "Be loud."
    messages, stderr = opening(f"run={runs['mixed']}", "prompt=hi")
    assert messages == [{"role": "user", "content": "hi"}]
    assert "different system prompts" in stderr
    monkeypatch.setattr("sys.stdin", io.StringIO("\ufeffI lost my card\r\nwhere is it\r\n"))
    messages, _ = opening(shared)
    assert [m["content"] for m in messages if m["role"] == "user"] == ["I lost my card", "where is it"]


def test_eval_after_the_data_files_changed_says_it_cannot_tell_what_the_run_trained_on(tmp_path):
    """Rows added to the training file after training: the held-out eval split is drawn again from today's rows,
    which can hold rows the run trained on, and `trained_on` counted 0 against today's train split without a
    word. The data fingerprint recorded with the adapter tells: trained_on is null, with the reason, on stderr,
    in eval.json and on the card."""
    def rows(numbers) -> str:
        return "".join(json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) + "\n" for i in numbers)

    data, run_dir = tmp_path / "data.jsonl", tmp_path / "run"
    data.write_text(rows(range(40)))
    common = ["dataset=jsonl", f"dataset.path={data}", "dataset.format=columns"]
    proc = lora("train", *TINY, *common, "trainer.max_steps=1", "trainer.eval_at_end=false",
                f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    assert lora("eval", f"run={run_dir}", *EVAL_FAST).returncode == 0
    assert json.loads((run_dir / "eval.json").read_text())["trained_on"] == 0  # the files as trained: known
    data.write_text(rows(range(100, 130)) + data.read_text())
    proc = lora("eval", f"run={run_dir}", *EVAL_FAST)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["trained_on"] is None and "data files changed since training" in report["trained_on_unknown"]
    assert "which of these eval examples the run trained on is unknown" in " ".join(proc.stderr.split())
    assert "Which of these examples the run trained on is unknown" in (run_dir / "README.md").read_text()
