"""`lora eval`: the adapter and its base model (adapter disabled), side by side, on the same examples.

Two measurements per model: the loss on the gold replies (and its perplexity), and a task metric on replies
generated greedily from the prompts: `exact_match` of the first line (a label) or `token_f1` (word overlap).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from lora_cli.config import RunConfig
from lora_cli.data import collate, load_train_eval, sample, to_messages, tokenize_split
from lora_cli.report import eval_table, progress_steps
from lora_cli.runs import base_only, load_adapted
from lora_cli.train import evaluate_loss

CARD_START, CARD_END = "<!-- lora eval -->", "<!-- /lora eval -->"


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD-style F1 over lower-cased word tokens."""
    pred, ref = re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", gold.lower())
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(metric: str, predictions: list[str], golds: list[str], labels: set[str]) -> dict:
    if metric == "exact_match":
        predicted = [first_line(p) for p in predictions]
        correct = sum(p == first_line(g) for p, g in zip(predicted, golds, strict=True))
        invalid = sum(p not in labels for p in predicted)
        return {"accuracy": correct / len(golds), "correct": correct, "invalid_labels": invalid,
                "invalid_rate": invalid / len(golds)}
    f1 = [token_f1(p, g) for p, g in zip(predictions, golds, strict=True)]
    return {"token_f1": sum(f1) / len(f1)}


def first_line_done(tokenizer, prompt_length: int):
    """A stopping rule for label metrics: a sequence is done once its reply has a complete first line."""
    import torch
    from transformers import StoppingCriteria

    class FirstLineDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_length:], skip_special_tokens=True)
            return torch.tensor(["\n" in t.lstrip() for t in texts], device=input_ids.device)

    return FirstLineDone()


def generate_replies(model, tokenizer, prompts: list[list[dict]], cfg: RunConfig, stop_at_newline: bool,
                     label: str) -> list[str]:
    """Greedy replies to chat prompts, in batches, left-padded (decoder-only models continue from the right)."""
    import torch

    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    replies: list[str] = []
    tokenizer.padding_side = "left"
    size = cfg.eval.batch_size
    with progress_steps(f"generate ({label})", math.ceil(len(texts) / size)) as advance, torch.no_grad():
        for start in range(0, len(texts), size):
            batch = tokenizer(texts[start:start + size], return_tensors="pt", padding=True, add_special_tokens=False)
            prompt_length = batch["input_ids"].shape[1]
            stop = [first_line_done(tokenizer, prompt_length)] if stop_at_newline else None
            out = model.generate(**batch.to(model.device), max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 stopping_criteria=stop)
            new_tokens = out[:, prompt_length:]
            replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            advance()
    tokenizer.padding_side = "right"
    return replies


@contextmanager
def merged_for_decoding(model):
    """Fold the adapter into the base weights while decoding: token-by-token generation pays the adapter's
    extra matmuls at every step otherwise. Unfolded afterwards, so the run's model is unchanged. A 4-bit
    base is left as is: merging into it would re-quantize (lossy), and the numbers must be the trained model's."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model.base_model.model, "is_loaded_in_4bit", False):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def evaluate_run(run_dir: Path, cfg: RunConfig) -> dict:
    started = time.perf_counter()
    adapted = load_adapted(run_dir, cfg)
    model, tokenizer = adapted.model, adapted.tokenizer
    # The whole split (training-time caps do not apply here), then eval.max_samples of it.
    full = dataclasses.replace(cfg.dataset, max_train_examples=None, max_eval_examples=None)
    train_rows, eval_rows = load_train_eval(full)
    eval_rows = sample(eval_rows, cfg.eval.max_samples)
    conversations = [to_messages(row, cfg.dataset) for row in eval_rows]
    prompts = [c[:-1] for c in conversations]
    golds = [c[-1]["content"] for c in conversations]
    metric = cfg.dataset.task_metric
    # The valid labels: every gold first line the data knows (train and eval), not just this sample's.
    labels = {first_line(m[-1]["content"]) for m in (to_messages(r, cfg.dataset) for r in train_rows)} | \
        {first_line(g) for g in golds}
    split = tokenize_split(conversations, tokenizer, cfg.dataset)
    examples = sorted(split.examples, key=lambda e: len(e["input_ids"]))
    batches = [collate(examples[i:i + cfg.eval.batch_size], pad_id=tokenizer.pad_token_id)
               for i in range(0, len(examples), cfg.eval.batch_size)]

    results, outputs = {}, {}
    for name in ("base", "adapter"):
        with base_only(adapted) if name == "base" else merged_for_decoding(model):
            t0 = time.perf_counter()
            loss = evaluate_loss(model, batches, model.device)
            outputs[name] = generate_replies(model, tokenizer, prompts, cfg, metric == "exact_match", name)
            results[name] = {"eval_loss": loss, "perplexity": math.exp(loss),
                             **score(metric, outputs[name], golds, labels), "seconds": time.perf_counter() - t0}

    samples = [{"prompt": p[-1]["content"], "gold": g, "base": b, "adapter": a}
               for p, g, b, a in zip(prompts, golds, outputs["base"], outputs["adapter"], strict=True)]
    report = {
        "run_dir": str(run_dir), "dataset": cfg.dataset.name,
        "split": cfg.dataset.eval_split or f"held-out {cfg.dataset.eval_size} of {cfg.dataset.train_split}",
        "examples": len(golds), "metric": metric, "decoding": "greedy", "labels": len(labels),
        "base": results["base"], "adapter": results["adapter"],
        "samples": samples[: cfg.eval.show_samples],
        "settings": {"max_samples": cfg.eval.max_samples, "batch_size": cfg.eval.batch_size,
                     "max_new_tokens": cfg.eval.max_new_tokens, "max_seq_len": cfg.dataset.max_seq_len},
        "seconds": time.perf_counter() - started,
    }
    write_report(run_dir, report)
    eval_table(report)
    return report


def write_report(run_dir: Path, report: dict) -> None:
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    card = run_dir / "README.md"
    if card.is_file():
        update_model_card(card, report)


def update_model_card(card: Path, report: dict) -> None:
    """Add (or replace) the evaluation section of the run's model card."""
    rows = [("eval loss", "eval_loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}")]
    rows += [("accuracy", "accuracy", "{:.1%}"), ("invalid labels", "invalid_rate", "{:.1%}")] \
        if report["metric"] == "exact_match" else [("token F1", "token_f1", "{:.3f}")]
    lines = [CARD_START, "## Evaluation", "",
             f"`lora eval` on {report['dataset']} ({report['split']}, {report['examples']} examples, "
             f"{report['decoding']} decoding):", "", "| | base model | with adapter |", "| --- | --- | --- |"]
    lines += [f"| {name} | {fmt.format(report['base'][key])} | {fmt.format(report['adapter'][key])} |"
              for name, key, fmt in rows]
    section = "\n".join([*lines, CARD_END])
    text = card.read_text()
    if CARD_START in text:
        text = text[: text.index(CARD_START)] + section + text[text.index(CARD_END) + len(CARD_END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    card.write_text(text)

