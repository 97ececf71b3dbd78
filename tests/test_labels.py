"""Label-constrained prediction (eval.label_mode / generate.label_mode = generate | constrained | score) and the
classification report of `lora eval`: the trie, the labels' tokens, the tree-scoring and constrained decoding
against brute force, the metrics on hand-made lists, and the CLI on a tiny run trained to emit one label."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_run, lora
from test_cli import assert_one_line_error

from lora_cli.data import IGNORE_INDEX, load_train_eval, to_messages, tokenize_conversation
from lora_cli.evaluate import classification_metrics, confused_pairs, macro_f1
from lora_cli.labels import LabelTrie, build_trie, constrained_labels, first_line, label_paths, score_labels

LABELS = ["card", "card_arrival", "card_payment_wrong_exchange_rate", "pin_blocked", "lost_or_stolen_card"]
# tiny_llama's frozen random head moves a token's log-probability by about a nat at most, so a label of more
# tokens than another cannot win under `score` after a short training: the labels trained on are one token
# each, and the trained one is the one the untrained model ranks last.
TRAINED_LABEL, OTHER_LABELS = "balance", ("card", "transfer")


# ---------------------------------------------------------------- the trie and the labels' tokens


def test_trie_allows_only_label_paths_then_the_end_of_turn():
    # "card" is a prefix of "card_arrival": after its tokens both the end of the label and more may follow.
    eos, newline = 2, 9
    trie = LabelTrie.build({"card": [[5, eos], [5, newline]], "card_arrival": [[5, 7, 8, eos], [5, 7, 8, newline]],
                            "pin": [[6, eos]]}, eos=eos)
    assert sorted(trie.allowed([])) == [5, 6]
    assert sorted(trie.allowed([5])) == [eos, 7, newline]
    assert trie.allowed([5, 7]) == [8]
    assert trie.allowed([5, newline]) == [eos]  # the label's line is complete: only the end of the turn
    assert trie.allowed([5, 7, 8, eos, 0, 0]) == [eos]  # a finished row, padded by generate
    assert trie.allowed([4]) == [eos]  # off the trie (never under constrained decoding)
    assert trie.label([5, newline, 11, 12]) == "card" and trie.label([5, 7, 8, eos]) == "card_arrival"
    assert trie.label([5, 7]) is None and trie.label([6, newline]) is None
    assert trie.depth() == 4


def test_label_tokens_are_what_training_taught_the_model_to_emit(tokenizer):
    """Walking a real training target (tokenize_conversation's labelled tokens) through the trie ends at its
    label, for a reply that goes on after the label line and for a reply that is the label alone."""
    cfg = compose_run(["recipe=banking_support", "model=tiny_llama"]).dataset
    rows = load_train_eval(cfg)[0]
    conversations = [to_messages(rows[i], cfg) for i in range(0, 80, 8)]
    conversations.append([{"role": "user", "content": "Where is my card?"},
                          {"role": "assistant", "content": "card_arrival"}])  # Banking77 style: the label alone
    # Data as files bring it: Windows line ends, a space after the label, a blank line before it. A label dataset's
    # replies are trained as the label line eval reads back, not as "card_arrival \r\n" (a path no mode offers).
    for reply in ("card_arrival\r\nIt is on its way.", "card_arrival \nIt is on its way.", "  \ncard_arrival"):
        row = {"messages": [{"role": "user", "content": "Where is my card?"}, {"role": "assistant", "content": reply}]}
        conversations.append(to_messages(row, cfg))
    labels = sorted({first_line(c[-1]["content"]) for c in conversations} | set(LABELS))
    trie = build_trie(tokenizer, labels)
    for messages in conversations:
        targets = [t for t in tokenize_conversation(messages, tokenizer, train_on_prompt=False)["labels"]
                   if t != IGNORE_INDEX]
        assert trie.label(targets) == first_line(messages[-1]["content"])
    alone, first_of_several = label_paths(tokenizer, "card_arrival")
    assert alone[-1] == tokenizer.eos_token_id and tokenizer.decode(first_of_several[-1]) == "\n"
    assert alone[:-1] == first_of_several[:-1] == tokenizer("card_arrival", add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- scoring and decoding against brute force


@pytest.fixture(scope="module")
def adapted(tiny_run):
    from lora_cli.runs import load_adapted, load_run_config

    run_dir = tiny_run[0]
    return load_adapted(run_dir, load_run_config(run_dir, []))


def rendered(tokenizer, *messages: str) -> list[str]:
    """Prompts of different lengths, so a batch is left-padded."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
            for m in messages]


def test_tree_scores_equal_one_forward_per_label(adapted):
    """Scoring every label at once under the tree attention mask gives the log-likelihood that reading each
    label path after the prompt in a row of its own gives (right-padded: a causal model never sees that)."""
    model, tokenizer = adapted.model, adapted.tokenizer
    trie = build_trie(tokenizer, LABELS)
    prompts = rendered(tokenizer, "I lost my card", "My new card has not arrived after two weeks, where is it?")
    scores = score_labels(model, tokenizer, prompts, trie, batch_size=2, name="test")
    paths = [(column, path) for column, label in enumerate(LABELS) for path in label_paths(tokenizer, label)]
    width = max(len(path) for _, path in paths)
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        batch = torch.tensor([ids + path + [tokenizer.pad_token_id] * (width - len(path)) for _, path in paths])
        with torch.no_grad():  # the positions from the prompt's last token on
            logits = model(input_ids=batch.to(model.device), logits_to_keep=width + 1).logits
            logprobs = logits.cpu().log_softmax(-1)
        expected = torch.full((len(LABELS),), -torch.inf)
        for i, (column, path) in enumerate(paths):
            path_logprob = sum(logprobs[i, j, t] for j, t in enumerate(path))
            expected[column] = torch.logaddexp(expected[column], path_logprob)
        assert scores[row].tolist() == pytest.approx(expected.tolist(), abs=1e-3)


def test_constrained_decoding_is_greedy_over_the_trie(adapted):
    """Batched, left-padded constrained decoding picks what a step-by-step greedy walk over the trie picks."""
    model, tokenizer = adapted.model, adapted.tokenizer
    trie = build_trie(tokenizer, LABELS)
    prompts = rendered(tokenizer, "I lost my card", "My new card has not arrived after two weeks, where is it?")
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply: list[int] = []
        while trie.label(reply) is None:
            with torch.no_grad():
                step = torch.tensor([ids + reply], device=model.device)
                logits = model(input_ids=step, logits_to_keep=1).logits[0, -1].cpu()
            allowed = trie.allowed(reply)
            reply.append(allowed[int(logits[allowed].argmax())])
        expected.append(trie.label(reply))
    assert constrained_labels(model, tokenizer, prompts, trie, batch_size=2, name="test") == expected


# ---------------------------------------------------------------- metrics


def test_classification_metrics_by_hand():
    gold = ["a", "a", "a", "b", "b", "c"]
    predicted = ["a", "b", "not a label", "b", "a", "a"]
    metrics = classification_metrics(predicted, gold, labels={"a", "b", "c"})
    assert metrics["accuracy"] == pytest.approx(2 / 6) and metrics["correct"] == 2
    # F1 = 2 TP / (predicted + gold): a = 2*1/(3+3), b = 2*1/(2+2), c = 0 (never predicted right)
    assert metrics["macro_f1"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert metrics["invalid_labels"] == 1 and metrics["invalid_rate"] == pytest.approx(1 / 6)
    assert [(p["gold"], p["predicted"], p["count"]) for p in metrics["confused"]] == \
        [("a", "b", 1), ("b", "a", 1), ("c", "a", 1)]
    assert macro_f1(["x", "y"], ["x", "y"]) == 1.0


def test_confused_pairs_are_the_ten_most_frequent():
    gold = [f"g{i}" for i in range(12) for _ in range(i + 1)]  # pair g_i -> p_i happens i + 1 times
    predicted = [g.replace("g", "p") for g in gold]
    pairs = confused_pairs(predicted, gold, labels=set(gold) | set(predicted))
    assert [(p["gold"], p["count"]) for p in pairs] == [(f"g{i}", i + 1) for i in range(11, 1, -1)]


# ---------------------------------------------------------------- the CLI, on a run trained to emit one label


@pytest.fixture(scope="module")
def one_label_run(tmp_path_factory) -> Path:
    """tiny_llama trained on replies that all start with TRAINED_LABEL; the eval split brings two more labels."""
    root = tmp_path_factory.mktemp("one_label")
    rows = [(f"Message number {i}: a question for the bank", TRAINED_LABEL) for i in range(40)]
    evaluation = [("Where is my new card?", OTHER_LABELS[0]), ("My PIN is blocked after three tries.", OTHER_LABELS[1]),
                  ("Someone stole my wallet.", TRAINED_LABEL)]
    for name, split in (("train", rows), ("eval", evaluation)):
        lines = [json.dumps({"messages": [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": f"{label}\nWe will look into it."}]})
                 for prompt, label in split]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    run_dir = root / "run"
    proc = lora("train", "model=tiny_llama", "dataset=jsonl", f"dataset.path={root}", "dataset.eval_split=eval",
                "dataset.task_metric=exact_match", "trainer.max_steps=15", "trainer.lr=2e-2", "trainer.batch_size=8",
                "trainer.warmup_ratio=0", "trainer.eval_every=15", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.mark.parametrize("mode", ["score", "constrained"])
def test_eval_label_modes_pick_the_trained_label_and_report_it(one_label_run, mode):
    proc = lora("eval", f"run={one_label_run}", f"eval.label_mode={mode}", "eval.show_samples=3")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((one_label_run / "eval.json").read_text())
    assert report["label_mode"] == mode and report["labels"] == 3 and report["examples"] == 3
    # Training made the difference: the adapter always answers the trained label, its base model never does.
    assert [s["adapter"] for s in report["samples"]] == [TRAINED_LABEL] * 3
    assert TRAINED_LABEL not in [s["base"] for s in report["samples"]]
    for side in ("base", "adapter"):  # the untrained base too: always a valid label
        assert report[side]["label_mode"] == mode and report[side]["invalid_labels"] == 0
    adapter = report["adapter"]
    assert adapter["accuracy"] == pytest.approx(1 / 3)
    assert adapter["confused"] == [{"gold": label, "predicted": TRAINED_LABEL, "count": 1}
                                   for label in sorted(OTHER_LABELS)]
    assert adapter["macro_f1"] == pytest.approx((2 * 1 / (3 + 1) + 0 + 0) / 3)
    assert f"accuracy, exact label ({mode})" in proc.stdout and f"label_mode={mode}" in proc.stdout
    assert (one_label_run / "confusion.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("mode", ["score", "constrained"])
def test_generate_label_modes_answer_the_trained_label(one_label_run, mode):
    proc = lora("generate", f"run={one_label_run}", "prompt=Is my PIN blocked?", f"generate.label_mode={mode}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{TRAINED_LABEL}\n"
    if mode == "score":  # the runners-up, with their share of the probability over the label set
        assert f"score: {TRAINED_LABEL} " in proc.stderr


def test_label_modes_need_a_label_dataset(tiny_run):
    assert_one_line_error(lora("eval", f"run={tiny_run[0]}", "eval.label_mode=score", "dataset.task_metric=token_f1"),
                          "eval.label_mode=score needs a label dataset", "eval.label_mode=generate")
    assert_one_line_error(lora("generate", f"run={tiny_run[0]}", "prompt=hi", "generate.label_mode=constrained",
                               "dataset.task_metric=token_f1"), "generate.label_mode=generate")
