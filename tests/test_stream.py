"""The data stream: one integer (the position) is the whole data state; every example once per epoch, in
plain or length-grouped order; N processes x batch b see the examples of 1 process x batch N * b."""

from __future__ import annotations

import pytest

from lora_cli.data import micro_batches, take

EXAMPLES = [{"input_ids": [1] * ((i * 7919) % 97 + 1), "labels": [1] * ((i * 7919) % 97 + 1), "i": i}
            for i in range(103)]  # 103: steps of 16 straddle epoch boundaries


def stream(grouped: bool, steps: int, size: int = 16) -> list[int]:
    return [e["i"] for s in range(steps) for e in take(EXAMPLES, 7, s * size, size, grouped)]


@pytest.mark.parametrize("grouped", [False, True])
def test_every_example_once_per_epoch_and_resumable_anywhere(grouped):
    seen = stream(grouped, steps=20)
    epochs = [seen[k * 103:(k + 1) * 103] for k in range(3)]
    assert all(sorted(epoch) == list(range(103)) for epoch in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    resumed = [e["i"] for s in range(9, 20) for e in take(EXAMPLES, 7, s * 16, 16, grouped)]
    assert resumed == seen[9 * 16:]  # a run resumed at step 9 sees exactly what the uninterrupted one saw


def padded_fraction(order: list[int], size: int = 16) -> float:
    lengths = [len(EXAMPLES[i]["input_ids"]) for i in order]
    steps = [lengths[s:s + size] for s in range(0, len(lengths), size)]
    return sum(map(sum, steps)) / sum(max(step) * len(step) for step in steps)


def test_length_grouping_removes_padding_in_every_epoch():
    plain, grouped = stream(False, steps=20), stream(True, steps=20)
    for k in range(3):  # also after epoch boundaries, where steps straddle two epochs
        window = slice(k * 96, (k + 1) * 96)
        assert padded_fraction(grouped[window]) > padded_fraction(plain[window]) + 0.2


def test_processes_split_a_step_without_changing_it():
    step = take(EXAMPLES, 7, 0, 8, True)
    one = micro_batches(step, batch_size=8, rank=0, world=1, pad_id=0)
    two = [b for rank in (0, 1) for b in micro_batches(step, batch_size=4, rank=rank, world=2, pad_id=0)]
    tokens = lambda batches: sorted(int(b["attention_mask"].sum()) for b in batches)  # noqa: E731
    assert sum(tokens(one)) == sum(tokens(two)) == sum(len(e["input_ids"]) for e in step)
    assert len(one) == 1 and len(two) == 2
