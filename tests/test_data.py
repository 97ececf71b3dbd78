"""Formatting and tokenising: the chat template is the only formatter, and only replies carry labels."""

from __future__ import annotations

import json

import pytest
from conftest import compose_run

from lora_cli.data import (
    IGNORE_INDEX,
    collate,
    end_of_turn_id,
    load_train_eval,
    prepare,
    stop_token_ids,
    to_messages,
    tokenize_conversation,
    tokenize_split,
)
from lora_cli.errors import UserError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "I lost my card"},
        {"role": "assistant", "content": "lost_or_stolen_card\nFreeze it in the app."}]


def label_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def test_only_the_reply_and_its_end_of_turn_are_labels(tokenizer):
    example = tokenize_conversation(CHAT, tokenizer, train_on_prompt=False)
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert label_text(tokenizer, example) == "lost_or_stolen_card\nFreeze it in the app.<|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>"


def test_an_opening_assistant_turn_is_context_not_a_reply(tokenizer):
    """A conversation may open with the assistant's greeting; it answers nothing, and rendering "the turns before
    it" meant rendering an empty conversation, which the template refuses (a traceback)."""
    chat = [{"role": "assistant", "content": "Hello! How can I help?"}, *CHAT[1:]]
    example = tokenize_conversation(chat, tokenizer, train_on_prompt=False)
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(chat, tokenize=False)
    assert label_text(tokenizer, example) == "lost_or_stolen_card\nFreeze it in the app.<|im_end|>\n"
    # After a system prompt (the dataset's, or the row's own) the greeting still answers nothing: it was learnt.
    chat = [{"role": "system", "content": "You are a bank."}, *chat]
    assert label_text(tokenizer, tokenize_conversation(chat, tokenizer, train_on_prompt=False)) == \
        "lost_or_stolen_card\nFreeze it in the app.<|im_end|>\n"


def test_a_chat_template_that_refuses_the_data_says_so_in_one_line(tmp_path, tiny_checkpoint):
    """Templates raise on conversations they do not take (Gemma's: no system turn; Mistral's: turns must
    alternate), and the banking recipe always adds a system prompt."""
    import shutil

    from conftest import TINY, lora
    from test_cli import assert_one_line_error

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint.path, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<turn>{{ m['role'] }}\n{{ m['content'] }}<end>\n{% endfor %}"
        "{% if add_generation_prompt %}<turn>assistant\n{% endif %}")
    args = ["train", "--dry-run", *TINY, "model=hf", f"model.name_or_path={model}"]
    assert_one_line_error(lora(*args), "chat template refuses", "System role not supported",
                          "dataset.system_prompt=null")
    assert lora(*args, "dataset.system_prompt=null").returncode == 0


def test_train_on_prompt_labels_everything(tokenizer):
    example = tokenize_conversation(CHAT, tokenizer, train_on_prompt=True)
    assert example["labels"] == example["input_ids"]
    # What the plan calls "with labels" (and counts FLOPs by) is what a loss is computed on: not position 0
    cfg = compose_run(["recipe=banking_support", "dataset.train_on_prompt=true"]).dataset
    train_split, _, _ = prepare(cfg, tokenizer)
    assert train_split.label_tokens == train_split.tokens - len(train_split.examples)


def test_every_assistant_turn_of_a_multi_turn_chat_is_learned(tokenizer):
    chat = CHAT + [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": "You're welcome."}]
    text = label_text(tokenizer, tokenize_conversation(chat, tokenizer, train_on_prompt=False))
    assert text == "lost_or_stolen_card\nFreeze it in the app.<|im_end|>\nYou're welcome.<|im_end|>\n"


def test_replies_end_at_the_templates_end_of_turn_even_where_eos_differs(tokenizer):
    """Training teaches the template's end-of-turn token (its labels say so); generation and the label trie stop
    there, also for a tokenizer whose eos is another token (as Gemma's and Llama 3's are)."""
    import copy

    from lora_cli.labels import build_trie, label_paths

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tokenizer) == im_end and stop_token_ids(tokenizer) == [im_end]
    other = copy.deepcopy(tokenizer)
    other.eos_token = "<|endoftext|>"
    assert other.eos_token_id != im_end
    assert end_of_turn_id(other) == im_end and stop_token_ids(other) == [im_end, other.eos_token_id]
    assert label_paths(other, "card_arrival")[0][-1] == im_end and build_trie(other, ["card_arrival"]).eos == im_end


def test_replies_also_end_at_every_eos_the_models_generation_config_lists(tokenizer):
    """generate() takes an explicit eos list instead of the model's, so the model's own (Llama 3 lists <|eot_id|>
    and <|eom_id|>) must be in it."""
    from transformers import GenerationConfig

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tokenizer, GenerationConfig(eos_token_id=[im_end, 7, 9])) == [im_end, 7, 9]
    assert stop_token_ids(tokenizer, GenerationConfig(eos_token_id=5)) == [im_end, 5]
    assert stop_token_ids(tokenizer, GenerationConfig()) == [im_end]


def test_pad_token_is_not_eos(tokenizer):
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_columns_format_becomes_a_chat_with_the_system_prompt():
    cfg = compose_run(["dataset=csv", "dataset.path=x.csv", "dataset.system_prompt=S"]).dataset
    assert to_messages({"prompt": "hi", "completion": "hello"}, cfg) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]


def test_csv_cells_are_read_as_the_text_they_are(tmp_path):
    """pandas guesses types: a reply `00507` became 507 and `None` / `NA` became missing values. A BOM is dropped."""
    path = tmp_path / "codes.csv"
    path.write_text("\ufeffprompt,completion\nMy code?,00507\nSay nothing,None\nThe flag,NA\nA price,1.50\n",
                    encoding="utf-8")
    cfg = compose_run(["dataset=csv", f"dataset.path={path}", "dataset.eval_size=1"]).dataset
    train, evaluation = load_train_eval(cfg)
    replies = {to_messages(row, cfg)[-1]["content"] for rows in (train, evaluation) for row in rows}
    assert replies == {"00507", "None", "NA", "1.50"}


@pytest.mark.parametrize("suffix, layout", [(".jsonl", "lines"), (".json", "array"), (".json", "lines")])
def test_json_numbers_and_booleans_are_read_as_the_text_they_are(tmp_path, suffix, layout):
    """`datasets` inferred a column type: in a completion column holding 3 and 2.5 the 3 trained as "3.0", a long
    integer in a column with a float lost its digits, and true trained as "True". JSON Lines, one array, or JSON
    Lines saved as .json. A column training does not read, holding an object here and text there, made the rows
    unreadable as one table ("cannot mix struct and non-struct")."""
    path = tmp_path / f"numbers{suffix}"
    replies = ["3", "2.5", "12345678901234567", "1.50", "1e3", "true", '"00507"']  # as written in the file
    metadata = ['{"source": "web"}', '"web"']
    lines = [f'{{"prompt": "question {i}", "completion": {reply}, "meta": {metadata[i % 2]}}}'
             for i, reply in enumerate(replies)]
    path.write_text("\n".join(lines) + "\n" if layout == "lines" else "[" + ",\n".join(lines) + "]\n")
    cfg = compose_run(["dataset=jsonl", f"dataset.path={path}", "dataset.format=columns",
                       "dataset.eval_size=1"]).dataset
    train, evaluation = load_train_eval(cfg)
    assert {to_messages(row, cfg)[-1]["content"] for rows in (train, evaluation) for row in rows} == {
        reply.strip('"') for reply in replies}


def class_id_parquet(path, ids: list[int]) -> None:
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["card_lost", "refund", "other"])})
    Dataset.from_dict({"text": [f"question {i}" for i in range(len(ids))], "label": ids},
                      features=features).to_parquet(str(path))


def test_class_id_columns_train_on_the_class_names(tmp_path, tokenizer):
    """The hub's Banking77 stores intents as class ids. Mapped to names while the column stayed a ClassLabel,
    `datasets` encoded them straight back: the model trained on replies "0", "1", "2"."""
    path = tmp_path / "classes.parquet"
    class_id_parquet(path, [0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    cfg = compose_run(["dataset=banking77", f"dataset.path={path}", "dataset.eval_size=2"]).dataset
    train, evaluation = load_train_eval(cfg)
    replies = sorted(to_messages(row, cfg)[-1]["content"] for rows in (train, evaluation) for row in rows)
    assert replies == sorted(["card_lost", "refund", "other"] * 3 + ["other"])
    train_split, _, _ = prepare(cfg, tokenizer)
    assert {label_text(tokenizer, e) for e in train_split.examples} <= {f"{n}<|im_end|>\n"
                                                                       for n in ("card_lost", "refund", "other")}


def test_rows_without_a_class_are_refused_not_given_the_last_one(tmp_path):
    from conftest import TINY, lora
    from test_cli import assert_one_line_error

    path = tmp_path / "classes.parquet"
    class_id_parquet(path, [0, 1, 2, 0, 1, -1, 0, 1, 2, 2])
    proc = lora("train", *TINY, "dataset=banking77", f"dataset.path={path}", "dataset.eval_size=2",
                f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, "'category' column", "1 row(s) have no class")
    assert not (tmp_path / "run").exists()


def test_truncation_is_counted_and_empty_examples_dropped(tokenizer):
    cfg = compose_run(["dataset.max_seq_len=40"]).dataset
    long_reply = CHAT[:2] + [{"role": "assistant", "content": "word " * 100}]
    no_room = [{"role": "system", "content": "context " * 60}] + CHAT[1:]
    split = tokenize_split([CHAT, long_reply, no_room], tokenizer, cfg)
    assert split.rows == 3 and split.truncated == 2 and split.dropped == 1
    assert all(len(e["input_ids"]) <= 40 for e in split.examples)


def test_collate_pads_right_and_masks_padding(tokenizer):
    a = tokenize_conversation(CHAT, tokenizer, False)
    b = tokenize_conversation(CHAT[:2] + [{"role": "assistant", "content": "ok"}], tokenizer, False)
    batch = collate([a, b], pad_id=tokenizer.pad_token_id)
    n = len(b["input_ids"])
    assert batch["attention_mask"][1, :n].all() and not batch["attention_mask"][1, n:].any()
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, n:] == tokenizer.pad_token_id).all()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_folder_with_train_and_eval_files_and_a_fingerprint(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT[1:]}] * 5)
    write_jsonl(tmp_path / "eval.jsonl", [{"messages": CHAT[1:]}] * 2)
    cfg = compose_run(["dataset=jsonl", f"dataset.path={tmp_path}", "dataset.eval_split=eval"]).dataset
    train, evaluation, fingerprint = prepare(cfg, tokenizer)
    assert len(train.examples) == 5 and len(evaluation.examples) == 2
    assert fingerprint == prepare(cfg, tokenizer)[2]
    write_jsonl(tmp_path / "eval.jsonl", [{"messages": CHAT}] * 2)
    assert fingerprint != prepare(cfg, tokenizer)[2]


def test_a_folders_own_eval_file_is_the_eval_split(tmp_path):
    """dataset=jsonl on a folder with train.jsonl and eval.jsonl: eval.jsonl is what the run evaluates on (with
    dataset.eval_split left null it was ignored, and 10% of train held out instead, silently)."""
    from conftest import lora

    def chat(i: int) -> dict:
        return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"{i}"}]}

    write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(30)])
    write_jsonl(tmp_path / "eval.jsonl", [chat(i) for i in range(100, 110)])
    plan = lora("train", "--dry-run", "model=tiny_llama", "dataset=jsonl", f"dataset.path={tmp_path}")
    assert plan.returncode == 0, plan.stderr
    assert "30 train, 10 eval" in plan.stdout
    (tmp_path / "eval.jsonl").unlink()
    held_out = lora("train", "--dry-run", "model=tiny_llama", "dataset=jsonl", f"dataset.path={tmp_path}")
    assert "27 train, 3 eval" in held_out.stdout


def test_held_out_eval_split_is_fixed_and_disjoint(tmp_path, tokenizer):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(40)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = compose_run(["dataset=jsonl", f"dataset.path={tmp_path / 'd.jsonl'}", "dataset.format=columns",
                       "dataset.eval_size=10"]).dataset
    train, evaluation, _ = prepare(cfg, tokenizer)
    assert len(train.examples) == 30 and len(evaluation.examples) == 10
    seen = {tuple(e["input_ids"]) for e in train.examples}
    assert not seen & {tuple(e["input_ids"]) for e in evaluation.examples}
    assert [e["input_ids"] for e in prepare(cfg, tokenizer)[1].examples] == \
        [e["input_ids"] for e in evaluation.examples]


def test_missing_columns_are_named(tmp_path, tokenizer):
    write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}] * 4)
    cfg = compose_run(["dataset=jsonl", f"dataset.path={tmp_path / 'd.jsonl'}", "dataset.format=columns",
                       "dataset.eval_size=1"]).dataset
    with pytest.raises(UserError, match="prompt, completion not found.*question, answer"):
        prepare(cfg, tokenizer)
