"""`lora generate`: talk to an adapted model. One prompt, or a multi-turn chat until Ctrl-D.

The prompt goes through the same chat template (and system prompt) the adapter was trained with, and tokens
stream to the terminal until the end-of-turn token. On a label dataset, `generate.label_mode=constrained|score`
answers with one of the dataset's labels instead (see labels.py)."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

from lora_cli.config import GenerateConfig, RunConfig
from lora_cli.data import stop_token_ids
from lora_cli.errors import UserError
from lora_cli.labels import (
    LabelTrie,
    build_trie,
    check_label_mode,
    constrained_labels,
    load_labels,
    render_prompts,
    score_labels,
)
from lora_cli.report import console
from lora_cli.runs import base_only, load_adapted, recorded

RUNNERS_UP = 5  # labels shown with their shares under label_mode=score


def not_utf8(text: str) -> bool:
    """Python reads bytes that are not UTF-8 (a Latin-1 terminal's é) as lone surrogates, which the tokenizer
    refuses with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def reply(model, tokenizer, messages: list[dict], cfg: GenerateConfig) -> str:
    """Stream one assistant turn to stdout and return its text."""
    import torch
    from transformers import TextStreamer

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} \
        if cfg.temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stops = stop_token_ids(tokenizer, model.generation_config)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, streamer=streamer,
                             eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def label_reply(model, tokenizer, messages: list[dict], trie: LabelTrie, mode: str) -> str:
    """Print one label as the reply (stdout holds the label alone, for scripts); under `score`, the best
    labels' shares of the probability over the label set go to stderr."""
    prompt = render_prompts(tokenizer, [messages])
    if mode == "constrained":
        label = constrained_labels(model, tokenizer, prompt, trie, batch_size=1, name="constrained")[0]
    else:
        shares = score_labels(model, tokenizer, prompt, trie, batch_size=1, name="score")[0].softmax(dim=0)
        top = shares.topk(min(RUNNERS_UP, len(trie.labels)))
        label = trie.labels[int(top.indices[0])]
        console.print("score: " + ", ".join(f"{trie.labels[int(i)]} {float(p):.1%}"
                                            for p, i in zip(top.values, top.indices, strict=True)), markup=False)
    print(label, flush=True)
    return label


def opening_system_prompt(adapted, cfg: RunConfig, given: bool) -> str | None:
    """The system turn a chat opens with: dataset.system_prompt where this command line sets it; else the one every
    training conversation opened with, recorded with the adapter, be it the data's own (a messages file's system
    turns, which the config does not hold) or dataset.system_prompt. Where they differed there is none to pick,
    and stderr says so."""
    import json

    trained = recorded(adapted.adapter_dir).get("system_prompt")
    if given or trained is None:  # an adapter from before the record: its config's is all there is
        return cfg.dataset.system_prompt
    trained = json.loads(trained)
    if trained is None:
        console.print("the training conversations opened with different system prompts; this chat has none (set "
                      "dataset.system_prompt=... to give it one)", markup=False)
    return trained


def generate(run_dir: Path, cfg: RunConfig, prompt: str | None, system_prompt_given: bool = False) -> None:
    mode = cfg.generate.label_mode
    check_label_mode(mode, cfg.dataset, "generate.label_mode")
    if prompt is not None and not prompt.strip():  # as the chat skips a blank line
        raise UserError('prompt= is empty; pass the message to answer (prompt="I lost my card"), or leave prompt= '
                        "out to chat")
    if prompt is not None and not_utf8(prompt):
        raise UserError("prompt= is not UTF-8 text (the terminal or the script sent other bytes); pass it as UTF-8")
    adapted = load_adapted(run_dir, cfg)
    model, tokenizer = adapted.model, adapted.tokenizer
    trie = build_trie(tokenizer, load_labels(cfg.dataset)) if mode != "generate" else None

    def answer(messages: list[dict]) -> str:
        if trie is None:
            return reply(model, tokenizer, messages, cfg.generate)
        return label_reply(model, tokenizer, messages, trie, mode)

    system_prompt = opening_system_prompt(adapted, cfg, system_prompt_given)
    history = [{"role": "system", "content": system_prompt}] if system_prompt else []
    with nullcontext() if cfg.generate.adapter else base_only(adapted):
        if prompt is not None:
            answer([*history, {"role": "user", "content": prompt}])
            return
        who = "adapter" if cfg.generate.adapter else "base model"
        print(f"Chatting with {who} of {run_dir} (Ctrl-D to quit).", file=sys.stderr)
        typed = sys.stdin.isatty()  # piped lines (`lora generate run=... < prompts.txt`): stdout holds replies alone
        while True:
            try:
                line = input("you> " if typed else "")
            except EOFError:
                if typed:  # off the prompt line that Ctrl-D left
                    print()
                return
            line = line.removeprefix("\ufeff").removesuffix("\r")  # a BOM, Windows line endings: as data files
            if not line.strip():
                continue
            if not_utf8(line):
                print("that line is not UTF-8 text (the terminal sent other bytes); type it again", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": answer(history)})
