"""`lora generate`: talk to an adapted model. One prompt, or a multi-turn chat until Ctrl-D.

The prompt goes through the same chat template (and the dataset's system prompt) the adapter was trained
with, and tokens stream to the terminal until the end-of-turn token."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

from lora_cli.config import GenerateConfig, RunConfig
from lora_cli.runs import base_only, load_adapted


def reply(model, tokenizer, messages: list[dict], cfg: GenerateConfig) -> str:
    """Stream one assistant turn to stdout and return its text."""
    import torch
    from transformers import TextStreamer

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} \
        if cfg.temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, streamer=streamer,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def generate(run_dir: Path, cfg: RunConfig, prompt: str | None) -> None:
    adapted = load_adapted(run_dir, cfg)
    model, tokenizer = adapted.model, adapted.tokenizer
    history = [{"role": "system", "content": cfg.dataset.system_prompt}] if cfg.dataset.system_prompt else []
    with nullcontext() if cfg.generate.adapter else base_only(adapted):
        if prompt is not None:
            reply(model, tokenizer, [*history, {"role": "user", "content": prompt}], cfg.generate)
            return
        who = "adapter" if cfg.generate.adapter else "base model"
        print(f"Chatting with {who} of {run_dir} (Ctrl-D to quit).", file=sys.stderr)
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": reply(model, tokenizer, history, cfg.generate)})
