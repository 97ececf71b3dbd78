"""The main job on the embedded SmolLM2-135M, end to end (minutes: `make test-all`, not `make test`)."""

from __future__ import annotations

import json

import pytest
from conftest import lora, read_metrics

from lora_cli.data import resolve_path
from lora_cli.evaluate import first_line

pytestmark = pytest.mark.slow


def test_banking_support_recipe_trains_evaluates_and_answers(tmp_path):
    run_dir = tmp_path / "run"
    train = lora("train", "recipe=banking_support", f"hydra.run.dir={run_dir}", timeout=1800)
    assert train.returncode == 0, train.stderr
    evals = [r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r]
    assert evals[-1] < evals[0]

    evaluation = lora("eval", f"run={run_dir}", timeout=1800)
    assert evaluation.returncode == 0, evaluation.stderr
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["adapter"]["accuracy"] > report["base"]["accuracy"] + 0.2
    assert report["adapter"]["invalid_labels"] < report["base"]["invalid_labels"]

    shipped = resolve_path("builtin://banking_support") / "train.jsonl"
    labels = {first_line(json.loads(line)["messages"][-1]["content"]) for line in shipped.read_text().splitlines()}
    answer = lora("generate", f"run={run_dir}", "prompt=I lost my card", timeout=600)
    assert answer.returncode == 0, answer.stderr
    assert first_line(answer.stdout) in labels
