"""Label-constrained prediction for classification-style datasets (`eval.label_mode`, `generate.label_mode`).

A label dataset's reply starts with a label on its first line. Free greedy decoding (`generate`) may write
anything there; the two other modes always answer with one of the labels the data knows:

- `constrained`: greedy decoding restricted, token by token, to a prefix tree (trie) of the labels' token
  sequences; once a label is complete only the end of its line may follow.
- `score`: every label ranked by its log-likelihood as the reply's first line, given the prompt; exact
  (no greedy commitment to a first token), at the price of reading every label's tokens for every prompt.

The labels' token sequences are those the model was trained to emit: they come from the same
`tokenize_conversation` that builds the training targets, so whatever the chat template puts around a reply
(and however the tokenizer merges the label with the newline after it) is matched exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lora_cli.config import DatasetConfig
from lora_cli.data import (
    IGNORE_INDEX,
    end_of_turn_id,
    load_train_eval,
    split_at_last_reply,
    to_messages,
    tokenize_conversation,
)
from lora_cli.errors import UserError
from lora_cli.report import progress_steps

if TYPE_CHECKING:
    import torch

# Scoring keeps the log-probabilities of every label token for a batch of prompts: at most this many floats
# (256 MiB in fp32), so a 49k vocabulary x ~400 label tokens fits a few prompts per forward on a laptop.
LOGIT_BUDGET = 2**26
# What follows the label in the "first line of a longer reply" rendering; any word does, the newline matters.
CONTINUATION = "More"


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def gold_labels(rows: Iterable[dict], cfg: DatasetConfig) -> list[str]:
    """The valid labels: every gold reply's first line among `rows`, sorted."""
    return sorted({first_line(split_at_last_reply(to_messages(row, cfg))[1]) for row in rows})


def load_labels(cfg: DatasetConfig) -> list[str]:
    """The label set of a whole dataset (train and eval splits, training-time caps lifted), as `lora eval`
    computes it, for `lora generate`, which has no rows loaded."""
    import dataclasses
    from itertools import chain

    full = dataclasses.replace(cfg, max_train_examples=None, max_eval_examples=None)
    return gold_labels(chain(*load_train_eval(full)), cfg)


def check_label_mode(mode: str, cfg: DatasetConfig, key: str) -> None:
    """constrained/score need a label on the reply's first line; a free-form dataset has none."""
    if mode != "generate" and cfg.task_metric != "exact_match":
        raise UserError(f"{key}={mode} needs a label dataset (dataset.task_metric=exact_match, the label on the "
                        f"reply's first line); dataset {cfg.name!r} is scored by {cfg.task_metric}: set {key}=generate")


# ---------------------------------------------------------------- the labels' tokens


def reply_targets(tokenizer, reply: str) -> list[int]:
    """The token ids a model is trained to emit for the assistant reply `reply` (the labelled tokens of
    data.tokenize_conversation: the reply as the chat template renders it, end-of-turn included)."""
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": reply}]
    return [t for t in tokenize_conversation(messages, tokenizer, train_on_prompt=False)["labels"]
            if t != IGNORE_INDEX]


def label_paths(tokenizer, label: str) -> list[list[int]]:
    """The token paths by which a reply starts with `label` as its complete first line: the label as the whole
    reply (up to the end-of-turn token), and as the first line of a longer one (up to the token that ends
    the line). Both end in the token that says "the label is complete", so "card" is not a "card_arrival"."""
    alone = reply_targets(tokenizer, label)
    eos = end_of_turn_id(tokenizer)
    paths = [alone[: alone.index(eos) + 1] if eos in alone else alone]
    longer = reply_targets(tokenizer, f"{label}\n{CONTINUATION}")
    end = next((k for k in range(1, len(longer) + 1) if f"{label}\n" in tokenizer.decode(longer[:k])), None)
    if end is not None and longer[:end] != paths[0]:
        paths.append(longer[:end])
    return paths


@dataclass
class LabelTrie:
    """The labels' token paths as a prefix tree. Node 0 is the root (the start of the reply); a node is the
    path of tokens leading to it, and `ends` marks the nodes that complete a label."""

    labels: list[str]
    eos: int
    token: list[int] = field(default_factory=lambda: [-1])
    parent: list[int] = field(default_factory=lambda: [-1])
    children: list[dict[int, int]] = field(default_factory=lambda: [{}])
    ends: dict[int, int] = field(default_factory=dict)  # node -> index of the label it completes

    @classmethod
    def build(cls, paths: dict[str, list[list[int]]], eos: int) -> LabelTrie:
        trie = cls(labels=list(paths), eos=eos)
        for index, label_paths_ in enumerate(paths.values()):
            for path in label_paths_:
                trie.add(path, index)
        return trie

    def add(self, path: list[int], label: int) -> None:
        node = 0
        for token in path:
            if token not in self.children[node]:
                self.children[node][token] = len(self.token)
                self.token.append(token)
                self.parent.append(node)
                self.children.append({})
            node = self.children[node][token]
        if self.ends.get(node, label) != label:
            raise UserError(f"labels {self.labels[self.ends[node]]!r} and {self.labels[label]!r} tokenise to the same "
                            "tokens, so no decoding can tell them apart; make the labels distinct")
        self.ends[node] = label

    def walk(self, tokens: Iterable[int]) -> int | None:
        """The node `tokens` lead to, stopping at the first completed label; None once they leave the trie."""
        node = 0
        for token in tokens:
            if node in self.ends:
                break
            node = self.children[node].get(token)
            if node is None:
                return None
        return node

    def allowed(self, tokens: Iterable[int]) -> list[int]:
        """The tokens that may follow `tokens` (the reply so far): the trie's next tokens, or, once a label is
        complete (or the reply left the trie: never under constrained decoding), only end-of-turn."""
        node = self.walk(tokens)
        if node is None or node in self.ends:
            return [self.eos]
        return list(self.children[node])

    def label(self, tokens: Iterable[int]) -> str | None:
        node = self.walk(tokens)
        return self.labels[self.ends[node]] if node in self.ends else None

    def depth(self) -> int:
        """Tokens in the longest path, for max_new_tokens."""
        depths = [0] * len(self.token)
        for node in range(1, len(self.token)):  # parents are always created before their children
            depths[node] = depths[self.parent[node]] + 1
        return max(depths)


def build_trie(tokenizer, labels: list[str]) -> LabelTrie:
    return LabelTrie.build({label: label_paths(tokenizer, label) for label in labels}, end_of_turn_id(tokenizer))


# ---------------------------------------------------------------- prediction


@contextmanager
def left_padded(tokenizer):
    """Decoder-only models continue from the right end of each row, so batched prompts are padded on the left."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side


def render_prompts(tokenizer, prompts: list[list[dict]]) -> list[str]:
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]


def predict_labels(mode: str, model, tokenizer, prompts: list[str], trie: LabelTrie, batch_size: int,
                   name: str) -> list[str]:
    """One label per rendered prompt, by `constrained` decoding or by `score` (the best-scoring label)."""
    if mode == "constrained":
        return constrained_labels(model, tokenizer, prompts, trie, batch_size, name)
    scores = score_labels(model, tokenizer, prompts, trie, batch_size, name)
    return [trie.labels[i] for i in scores.argmax(dim=1).tolist()]


def constrained_labels(model, tokenizer, prompts: list[str], trie: LabelTrie, batch_size: int,
                       name: str) -> list[str]:
    """Greedy decoding where each step may only pick a token that keeps the reply on a path of the trie:
    `generate`'s prefix_allowed_tokens_fn masks every other token. Stops once every row completed a label."""
    import torch

    predicted: list[str] = []
    steps = math.ceil(len(prompts) / batch_size)
    with progress_steps(f"constrained ({name})", steps) as advance, torch.no_grad(), left_padded(tokenizer):
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            width = batch["input_ids"].shape[1]
            out = model.generate(**batch, do_sample=False, max_new_tokens=trie.depth() + 1,
                                 prefix_allowed_tokens_fn=lambda _, ids, w=width: trie.allowed(ids[w:].tolist()),
                                 eos_token_id=trie.eos, pad_token_id=tokenizer.pad_token_id)
            predicted += [trie.label(row.tolist()) or "" for row in out[:, width:]]
            advance()
    return predicted


@dataclass
class TreeInputs:
    """The trie flattened for scoring: the inner nodes (those with children) are fed after the prompt; each
    node's log-probability is read at its parent's position (the prompt's last token for the root's children)."""

    tokens: list[int]  # the fed nodes' tokens
    depths: list[int]  # 1 for a child of the root
    sees: torch.Tensor  # bool (fed, fed): node i attends to node j (itself or an ancestor)
    edge_slot: torch.Tensor  # per non-root node: where its log-probability is read (0: prompt end, i + 1: fed node i)
    edge_token: torch.Tensor  # per non-root node: its token
    paths: torch.Tensor  # float (ends, non-root nodes): 1 where a node lies on the path to an end
    label_ends: list[list[int]]  # per label: its ends (the label alone, or as the first of several lines)


def flatten(trie: LabelTrie) -> TreeInputs:
    import torch

    fed = [n for n in range(1, len(trie.token)) if trie.children[n]]
    slot = {0: 0, **{node: i + 1 for i, node in enumerate(fed)}}
    lineage = [ancestry(trie, node) for node in range(len(trie.token))]
    sees = torch.tensor([[other in lineage[node] for other in fed] for node in fed], dtype=torch.bool)
    ends = list(trie.ends)
    paths = torch.tensor([[float(node in lineage[end]) for node in range(1, len(trie.token))] for end in ends])
    return TreeInputs(tokens=[trie.token[n] for n in fed], depths=[len(lineage[n]) for n in fed], sees=sees,
                      edge_slot=torch.tensor([slot[trie.parent[n]] for n in range(1, len(trie.token))]),
                      edge_token=torch.tensor(trie.token[1:]), paths=paths,
                      label_ends=[[i for i, end in enumerate(ends) if trie.ends[end] == label]
                                  for label in range(len(trie.labels))])


def ancestry(trie: LabelTrie, node: int) -> set[int]:
    """`node` and its ancestors, the root excluded."""
    lineage = set()
    while node > 0:
        lineage.add(node)
        node = trie.parent[node]
    return lineage


def score_labels(model, tokenizer, prompts: list[str], trie: LabelTrie, batch_size: int, name: str) -> torch.Tensor:
    """Log-likelihood of every label as the reply's first line given each prompt: a (prompts, labels) tensor.

    One forward per batch of prompts reads the prompt once and the whole trie once: each row is the prompt
    followed by the trie's inner nodes, and a tree attention mask lets every node see the prompt and its own
    ancestors only, so node i is computed exactly as if its path alone followed the prompt. Labels share
    prefixes ("card_..."), so the trie is shorter than the labels' tokens laid end to end, and no KV cache
    has to be copied per label."""
    import torch

    tree = flatten(trie)
    per_forward = max(1, min(batch_size, LOGIT_BUDGET // ((len(tree.tokens) + 1) * len(tokenizer))))
    scores = []
    with progress_steps(f"score ({name})", math.ceil(len(prompts) / per_forward)) as advance, torch.no_grad(), \
            left_padded(tokenizer):
        for start in range(0, len(prompts), per_forward):
            batch = tokenizer(prompts[start:start + per_forward], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            scores.append(score_batch(model, batch["input_ids"], batch["attention_mask"], tree))
            advance()
    return torch.cat(scores)


def score_batch(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tree: TreeInputs) -> torch.Tensor:
    """(batch, labels) log-likelihoods for one batch of left-padded prompts."""
    import torch

    rows, nodes = prompt_ids.shape[0], len(tree.tokens)
    input_ids = torch.cat([prompt_ids, torch.tensor(tree.tokens).expand(rows, nodes)], dim=1)
    lengths = prompt_mask.sum(dim=1, keepdim=True)
    positions = torch.cat([(prompt_mask.cumsum(dim=1) - 1).clamp(min=0),
                           lengths - 1 + torch.tensor(tree.depths)], dim=1)
    dtype = model.get_input_embeddings().weight.dtype
    mask = torch.where(tree_mask(prompt_mask, tree.sees), 0.0, torch.finfo(dtype).min).to(dtype)
    device = model.device
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   logits_to_keep=nodes + 1, use_cache=False).logits.float()  # the prompt's last position + nodes
    # log p(token | its parent's position), for every edge of the trie; logsumexp, not log_softmax: only the
    # edges' entries of the (rows, nodes, vocabulary) log-probabilities are needed.
    slot, token = tree.edge_slot.to(device), tree.edge_token.to(device)
    edges = logits[:, slot, token] - logits.logsumexp(dim=-1)[:, slot]
    ends = (edges @ tree.paths.T.to(device)).cpu()  # (rows, ends): each end's whole path
    return torch.stack([ends[:, group].logsumexp(dim=1) for group in tree.label_ends], dim=1)


def tree_mask(prompt_mask: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
    """(rows, 1, width + nodes, width + nodes) bool, True where a query may attend: causal over the real prompt
    tokens, every node over the real prompt and its own ancestry; the diagonal always, so padding rows stay
    finite."""
    import torch

    rows, width = prompt_mask.shape
    nodes = sees.shape[0]
    real = prompt_mask.bool()[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    top = torch.cat([causal & real, torch.zeros(rows, width, nodes, dtype=torch.bool)], dim=2)
    bottom = torch.cat([real.expand(rows, nodes, width), sees.expand(rows, nodes, nodes)], dim=2)
    mask = torch.cat([top, bottom], dim=1) | torch.eye(width + nodes, dtype=torch.bool)
    return mask[:, None]
