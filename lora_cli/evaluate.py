"""`lora eval`: the adapter and its base model (adapter disabled), side by side, on the same examples.

Two measurements per model: the loss on the gold replies (and its perplexity), and a task metric on replies
generated greedily from the prompts: `exact_match` of the first line (a label) or `token_f1` (word overlap).
On label datasets `eval.label_mode` picks how the label is predicted (free greedy text, greedy constrained to
the label set, or the best-scoring label; see labels.py), and the report adds macro-F1, the most confused
label pairs and RUN_DIR/confusion.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections import Counter
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

from lora_cli.config import RunConfig
from lora_cli.data import (
    conversation_text,
    data_fingerprint,
    eval_split_of,
    load_train_eval,
    sample,
    split_at_last_reply,
    stop_token_ids,
    to_messages,
    tokenize_nonempty,
)
from lora_cli.errors import UserError
from lora_cli.labels import (
    LabelTrie,
    build_trie,
    check_label_mode,
    first_line,
    gold_labels,
    left_padded,
    predict_labels,
    render_prompts,
)
from lora_cli.paths import write_atomic
from lora_cli.report import console, eval_table, progress_steps
from lora_cli.runs import base_only, load_adapted, load_run_config, recorded
from lora_cli.train import eval_batches, evaluate_loss

CARD_START, CARD_END = "<!-- lora eval -->", "<!-- /lora eval -->"
DECODING = {"generate": "greedy", "constrained": "greedy constrained to the label set",
            "score": "every label scored by log-likelihood"}
TOP_CONFUSED = 10


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
        return classification_metrics([first_line(p) for p in predictions], [first_line(g) for g in golds], labels)
    f1 = [token_f1(p, g) for p, g in zip(predictions, golds, strict=True)]
    return {"token_f1": sum(f1) / len(f1)}


def classification_metrics(predicted: list[str], gold: list[str], labels: set[str]) -> dict:
    """Accuracy, macro-F1, the share of outputs that are no label at all, and the most confused pairs."""
    correct = sum(p == g for p, g in zip(predicted, gold, strict=True))
    invalid = sum(p not in labels for p in predicted)
    return {"accuracy": correct / len(gold), "correct": correct, "macro_f1": macro_f1(predicted, gold),
            "invalid_labels": invalid, "invalid_rate": invalid / len(gold),
            "confused": confused_pairs(predicted, gold, labels)}


def macro_f1(predicted: list[str], gold: list[str]) -> float:
    """The mean over the labels present in `gold` of F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (predicted + gold):
    every class counts the same, so a model that only learned the frequent labels cannot hide behind accuracy.
    Labels that are only ever predicted are left out (they would only add zeros); their false positives still
    count, as they are some gold label's misses."""
    hits = Counter(g for p, g in zip(predicted, gold, strict=True) if p == g)
    predicted_count, gold_count = Counter(predicted), Counter(gold)
    return sum(2 * hits[g] / (predicted_count[g] + n) for g, n in gold_count.items()) / len(gold_count)


def confused_pairs(predicted: list[str], gold: list[str], labels: set[str], top: int = TOP_CONFUSED) -> list[dict]:
    """The `top` most frequent (gold -> predicted) mistakes between two labels, most frequent first (ties by
    name, so the list is stable). Outputs that are no label are not a confusion: `invalid_labels` counts them."""
    pairs = Counter((g, p) for p, g in zip(predicted, gold, strict=True) if p != g and p in labels)
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))
    return [{"gold": g, "predicted": p, "count": n} for (g, p), n in ranked[:top]]


def plot_confusion(path: Path, predicted: list[str], gold: list[str], labels: set[str], title: str) -> None:
    """A row-normalised confusion matrix as a heat map: rows are gold labels, columns predictions (plus one for
    outputs that are no label), over the labels that occur. No per-cell numbers and small tick labels, so all
    77 Banking77 intents stay legible on one page; the square root colour scale keeps rare confusions visible
    next to the diagonal. The exact counts of the worst pairs are in eval.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import PowerNorm

    names = sorted(set(gold) | (set(predicted) & labels))
    index = {name: i for i, name in enumerate(names)}
    counts = np.zeros((len(names), len(names) + 1))
    for p, g in zip(predicted, gold, strict=True):
        counts[index[g], index.get(p, len(names))] += 1
    shares = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    side = 3 + 0.15 * len(names)
    fig, ax = plt.subplots(figsize=(side + 2, side + 1))
    image = ax.imshow(shares, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    font = 8 if len(names) <= 30 else 5
    ax.set_xticks(range(len(names) + 1), [*names, "(not a label)"], rotation=90, fontsize=font)
    ax.set_yticks(range(len(names)), names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="share of the gold label's examples")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


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

    texts = render_prompts(tokenizer, prompts)
    replies: list[str] = []
    size = cfg.eval.batch_size
    stops = stop_token_ids(tokenizer, model.generation_config)
    with progress_steps(f"generate ({label})", math.ceil(len(texts) / size)) as advance, torch.no_grad(), \
            left_padded(tokenizer):
        for start in range(0, len(texts), size):
            batch = tokenizer(texts[start:start + size], return_tensors="pt", padding=True, add_special_tokens=False)
            prompt_length = batch["input_ids"].shape[1]
            stop = [first_line_done(tokenizer, prompt_length)] if stop_at_newline else None
            out = model.generate(**batch.to(model.device), max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
                                 stopping_criteria=stop)
            new_tokens = out[:, prompt_length:]
            replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            advance()
    return replies


def predict(model, tokenizer, prompts: list[list[dict]], cfg: RunConfig, trie: LabelTrie | None,
            name: str) -> list[str]:
    """What the task metric scores: greedy replies (label_mode=generate), else one label per prompt."""
    if trie is None:
        return generate_replies(model, tokenizer, prompts, cfg, cfg.dataset.task_metric == "exact_match", name)
    return predict_labels(cfg.eval.label_mode, model, tokenizer, render_prompts(tokenizer, prompts), trie,
                          cfg.eval.batch_size, name)


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


def trained_on(run_dir: Path, conversations: list[list[dict]]) -> tuple[int | None, str | None]:
    """How many of these eval conversations the run trained on, by the run's own data config (caps included), or
    None and why that is unknown. Overrides at eval time can pick them (another file, or `dataset.eval_split=null`
    after training on an eval file, whose "held-out" slice then comes from data the run saw), and their numbers
    flatter the adapter. Files changed since training (rows added) re-draw a held-out split from rows the run
    may have trained on, and today's files no longer say which: the data fingerprint recorded with the adapter
    tells."""
    trained = load_run_config(run_dir, []).dataset
    try:
        train_rows, eval_rows = load_train_eval(trained)
    except UserError as exc:
        return None, f"the run's training data can no longer be read ({exc})"
    texts = [[conversation_text(to_messages(row, trained)) for row in rows] for rows in (train_rows, eval_rows)]
    recorded_fingerprint = recorded(run_dir / "adapter").get("dataset_fingerprint")
    if recorded_fingerprint and recorded_fingerprint != data_fingerprint(*texts):
        return None, (f"the run's data files changed since training (data fingerprint {recorded_fingerprint[:12]}, "
                      f"now {data_fingerprint(*texts)[:12]})")
    train_texts = set(texts[0])
    return sum(conversation_text(messages) in train_texts for messages in conversations), None


def evaluate_run(run_dir: Path, cfg: RunConfig, overrides: list[str] | None = None) -> dict:
    """`overrides`: those given to `lora eval` on top of the run's config, recorded with the numbers (a 4-bit
    base, other data), which `lora report` then shows as the run's."""
    started = time.perf_counter()
    mode, metric = cfg.eval.label_mode, cfg.dataset.task_metric
    check_label_mode(mode, cfg.dataset, "eval.label_mode")
    adapted = load_adapted(run_dir, cfg)
    model, tokenizer = adapted.model, adapted.tokenizer
    # The whole split (training-time caps do not apply here), then eval.max_samples of it.
    full = dataclasses.replace(cfg.dataset, max_train_examples=None, max_eval_examples=None)
    train_rows, eval_rows = load_train_eval(full)
    # The valid labels: every gold first line the data knows (train and eval), not just this sample's.
    labels = gold_labels(chain(train_rows, eval_rows), cfg.dataset)
    eval_rows = sample(eval_rows, cfg.eval.max_samples)
    conversations = [to_messages(row, cfg.dataset) for row in eval_rows]
    prompts, golds = (list(part) for part in zip(*map(split_at_last_reply, conversations), strict=True))
    trie = build_trie(tokenizer, labels) if mode != "generate" else None
    split = tokenize_nonempty(conversations, tokenizer, cfg.dataset, f"dataset {cfg.dataset.name!r} (eval split)")
    if split.dropped:
        console.print(f"[yellow]warning: {split.dropped} of {len(conversations)} eval examples keep no reply token "
                      f"within dataset.max_seq_len={cfg.dataset.max_seq_len}: the loss leaves them out (the task "
                      "metric does not)[/]")
    batches = eval_batches(split, cfg.eval.batch_size, tokenizer.pad_token_id)

    results, outputs = {}, {}
    for name in ("base", "adapter"):
        with base_only(adapted) if name == "base" else merged_for_decoding(model):
            t0 = time.perf_counter()
            loss = evaluate_loss(model, batches, model.device, model.get_output_embeddings())
            t1 = time.perf_counter()
            outputs[name] = predict(model, tokenizer, prompts, cfg, trie, name)
            # The loss is teacher-forced on the gold replies; only the task metric depends on the label mode.
            results[name] = {"eval_loss": loss, "perplexity": math.exp(loss), "label_mode": mode,
                             **score(metric, outputs[name], golds, set(labels)),
                             "predict_seconds": time.perf_counter() - t1, "seconds": time.perf_counter() - t0}

    samples = [{"prompt": p[-1]["content"], "gold": g, "base": b, "adapter": a}
               for p, g, b, a in zip(prompts, golds, outputs["base"], outputs["adapter"], strict=True)]
    overlap, unknown = trained_on(run_dir, conversations)
    split_name = eval_split_of(cfg.dataset) or f"held-out {cfg.dataset.eval_size} of {cfg.dataset.train_split}"
    report = {
        "run_dir": str(run_dir), "dataset": cfg.dataset.name, "split": split_name,
        "examples": len(golds), "loss_examples": len(split.examples), "trained_on": overlap,
        **({"trained_on_unknown": unknown} if unknown else {}), "metric": metric,
        "label_mode": mode, "decoding": DECODING[mode],
        "labels": len(labels), "base": results["base"], "adapter": results["adapter"],
        "samples": samples[: cfg.eval.show_samples],
        "settings": {"max_samples": cfg.eval.max_samples, "batch_size": cfg.eval.batch_size,
                     "max_new_tokens": cfg.eval.max_new_tokens, "max_seq_len": cfg.dataset.max_seq_len,
                     "label_mode": mode, "base_model": adapted.checkpoint.model_id, "model_dtype": cfg.model.dtype,
                     "quantize": cfg.adapter.quantize},
        "overrides": list(overrides or []),
    }
    if metric == "exact_match":
        report["confusion_png"] = str(run_dir / "confusion.png")
        plot_confusion(run_dir / "confusion.png", [first_line(o) for o in outputs["adapter"]],
                       [first_line(g) for g in golds], set(labels),
                       f"{cfg.dataset.name} ({split_name}), with adapter, label_mode={mode}: "
                       f"accuracy {results['adapter']['accuracy']:.1%}")
    report["seconds"] = time.perf_counter() - started
    write_report(run_dir, report)
    eval_table(report)
    return report


def write_report(run_dir: Path, report: dict) -> None:
    write_atomic(run_dir / "eval.json", json.dumps(report, indent=2, ensure_ascii=False))
    card = run_dir / "README.md"
    if card.is_file():
        update_model_card(card, report)


def update_model_card(card: Path, report: dict) -> None:
    """Add (or replace) the evaluation section of the run's model card."""
    rows = [("eval loss", "eval_loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}")]
    rows += [("accuracy", "accuracy", "{:.1%}"), ("macro-F1", "macro_f1", "{:.3f}"),
             ("invalid labels", "invalid_rate", "{:.1%}")] \
        if report["metric"] == "exact_match" else [("token F1", "token_f1", "{:.3f}")]
    lines = [CARD_START, "## Evaluation", "",
             f"`lora eval` on {report['dataset']} ({report['split']}, {report['examples']} examples; "
             f"eval.label_mode={report['label_mode']}: {report['decoding']}):", "",
             "| | base model | with adapter |", "| --- | --- | --- |"]
    lines += [f"| {name} | {fmt.format(report['base'][key])} | {fmt.format(report['adapter'][key])} |"
              for name, key, fmt in rows]
    if report.get("overrides"):
        lines += ["", f"Evaluated with overrides of the run's config: `{' '.join(report['overrides'])}`."]
    if report.get("trained_on"):
        lines += ["", f"{report['trained_on']} of these {report['examples']} examples were in the run's training "
                  "data: these numbers flatter the adapter."]
    if report.get("trained_on_unknown"):
        lines += ["", f"Which of these examples the run trained on is unknown: {report['trained_on_unknown']}."]
    section = "\n".join([*lines, CARD_END])
    text = card.read_text() if card.is_file() else ""
    end = text.find(CARD_END)
    start = text.rfind(CARD_START, 0, max(end, 0))  # the section that marker closes, not an orphaned start above it
    if 0 <= start < end:
        text = text[:start] + section + text[end + len(CARD_END):]
    else:  # no section yet, or its markers edited away: what the user wrote stays, a fresh section follows
        text = text.rstrip() + "\n\n" + section + "\n"
    write_atomic(card, text)

