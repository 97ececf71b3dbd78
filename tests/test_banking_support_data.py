"""The shipped banking_support dataset: complete, consistent with its labels, and our own writing."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
from conftest import BANKING77

from lora_cli.data import resolve_path

DATA = resolve_path("builtin://banking_support")


def load(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]


def intent(row: dict) -> str:
    return row["messages"][-1]["content"].split("\n", 1)[0]


@pytest.fixture(scope="module")
def labels() -> list[str]:
    if not BANKING77.is_dir():
        pytest.skip("needs ../shared/data/banking77 for the label list")
    return json.loads((BANKING77 / "categories.json").read_text())


def test_every_intent_has_enough_examples(labels):
    for split, minimum in (("train", 10), ("eval", 2)):
        counts = Counter(intent(row) for row in load(split))
        assert set(counts) == set(labels), split
        assert min(counts.values()) >= minimum, split


def test_replies_name_a_label_then_give_a_next_step(labels):
    for row in load("train") + load("eval"):
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"]
        label, next_step = row["messages"][1]["content"].split("\n", 1)
        assert label in labels
        assert 8 <= len(next_step.split()) <= 60


def test_messages_are_distinct_and_eval_is_held_out():
    train = [row["messages"][0]["content"].lower() for row in load("train")]
    evaluation = [row["messages"][0]["content"].lower() for row in load("eval")]
    assert len(set(train)) == len(train) and len(set(evaluation)) == len(evaluation)
    assert not set(train) & set(evaluation)


def test_written_by_this_project_not_copied_from_banking77():
    if not BANKING77.is_dir():
        pytest.skip("needs ../shared/data/banking77")
    theirs = set()
    for name in ("train.csv", "test.csv"):
        with open(BANKING77 / name, newline="") as f:
            theirs |= {row["text"].strip().lower() for row in csv.DictReader(f)}
    ours = {row["messages"][0]["content"].strip().lower() for row in load("train") + load("eval")}
    assert not ours & theirs
