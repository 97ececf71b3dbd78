"""Data: load rows with `datasets`, turn each into a chat conversation, tokenise it with the model's own
chat template, mask the prompt out of the labels, and collate batches.

The chat template is the one source of truth for formatting: training, eval and generation all render
conversations through it, and it is saved with the adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from lora_cli.config import DatasetConfig
from lora_cli.errors import UserError, first_line
from lora_cli.paths import PACKAGE_DIR

IGNORE_INDEX = -100
BUILTIN_PREFIX = "builtin://"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
HOLDOUT_SEED = 0  # the held-out eval split must not move when the training seed changes


def predicted_labels(example: dict) -> int:
    """Label tokens of one example that a loss is computed on (position 0 is never predicted: with
    train_on_prompt its label is set, and nothing is computed on it)."""
    return sum(t != IGNORE_INDEX for t in example["labels"][1:])


@dataclass
class TokenizedSplit:
    """Tokenised examples of one split, with what happened on the way."""

    examples: list[dict] = field(default_factory=list)  # {"input_ids": [...], "labels": [...]}
    rows: int = 0
    truncated: int = 0
    dropped: int = 0  # no trainable label token left after truncation
    also_in_train: int = 0  # eval split: conversations the train split holds too (their metrics flatter)
    # The system turn every conversation opens with ("" where none has one, None where they differ): what
    # `lora generate` opens its chat with, as training did.
    system_prompt: str | None = ""
    columns_read: tuple[str, ...] = ()  # the file's columns that make the conversations (the others are not read)

    @property
    def tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)

    @property
    def label_tokens(self) -> int:
        return sum(map(predicted_labels, self.examples))

    @property
    def longest(self) -> int:
        return max((len(e["input_ids"]) for e in self.examples), default=0)


# ---------------------------------------------------------------- loading


def resolve_path(path: str) -> Path:
    if path.startswith(BUILTIN_PREFIX):
        return PACKAGE_DIR / "assets" / path.removeprefix(BUILTIN_PREFIX)
    return Path(path).expanduser()


def _split_file(folder: Path, split: str) -> Path:
    """The split's file in a dataset folder. Whatever exists under the name is returned, so that a directory
    or an unreadable file there is reported as such rather than as a missing split."""
    found = [folder / f"{split}{suffix}" for suffix in FILE_BUILDERS if (folder / f"{split}{suffix}").exists()]
    if len(found) > 1:
        raise UserError(f"{folder} holds {len(found)} {split} files ({', '.join(p.name for p in found)}) and one "
                        "would be read without the others; keep one, or merge them")
    if found:
        return found[0]
    present = ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix in FILE_BUILDERS)) or "none"
    raise UserError(f"no {split} file in {folder} (looked for {split}.jsonl/.json/.csv/.parquet; "
                    f"data files present: {present}); set dataset.train_split/eval_split to match")


def _load_file(path: Path, cfg: DatasetConfig):
    """Check the file before `datasets` reads it: its reader's errors span lines and lack line numbers."""
    from datasets import Dataset, load_dataset

    _check_readable(path)
    rows, options = None, {}
    if path.suffix == ".jsonl":
        rows = _scan_jsonl(path, cfg)
    elif path.suffix == ".json":
        rows = _json_array(path, cfg)  # None for another layout, which `datasets` reads (or reports)
        if rows is None and _opens_with_an_object_line(path):  # JSON Lines saved as .json: read as .jsonl is
            rows = _scan_jsonl(path, cfg)
    elif path.suffix == ".csv":
        _scan_csv(path)
        options = _csv_as_text(path)
    try:
        with _datasets_silenced():
            if rows is not None:
                return Dataset.from_list(rows)
            return load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train", **options)
    except Exception as exc:
        where = _json_error(path) if path.suffix == ".json" else None
        raise UserError(f"could not read dataset file {path}: {where or _first_line(exc)}; check its format") from None


def _json_error(path: Path) -> str | None:
    """Where a .json file stops being JSON, by line and column: the reader under `datasets` words its errors
    differently from one pandas/pyarrow version to the next, and some name no place at all."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    except (OSError, UnicodeDecodeError, RecursionError):
        return None
    return None


def _check_readable(path: Path) -> None:
    """Missing, wrong type, unreadable or empty: each with its own fix."""
    if not path.exists():
        raise UserError(f"dataset file {path} does not exist; check dataset.path")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise UserError(f"dataset file {path} is {kind}, so it cannot be read as data; rename or remove it, or "
                        "point dataset.path elsewhere")
    if path.suffix not in FILE_BUILDERS:
        raise UserError(f"dataset file {path}: unsupported type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise UserError(f"dataset file {path} is not readable (permission denied); make it readable "
                        f"(chmod a+r {path}) or point dataset.path at a copy") from None
    except OSError as exc:
        raise UserError(f"dataset file {path} cannot be opened ({exc.strerror}); check dataset.path") from None
    if path.stat().st_size == 0:
        raise UserError(f"dataset file {path} is empty (0 bytes); point dataset.path at a file with examples")


@contextmanager
def _datasets_silenced():
    """`datasets` logs a multi-line error of its own before raising; the one-line UserError says it all."""
    import logging

    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    """The innermost cause's first line: `datasets` wraps the useful error in a generic one."""
    for _ in range(10):  # a bounded walk: exception chains can, rarely, loop
        if (inner := exc.__cause__ or exc.__context__) is None:
            break
        exc = inner
    return first_line(exc)


def _scan_jsonl(path: Path, cfg: DatasetConfig) -> list[dict]:
    """Every line of a JSONL file parsed and checked as a row, so a bad one is named by file and line number;
    the rows, with numbers and booleans as the text the file has (`_json_row`). Read by `datasets`, a column's type was
    inferred: a completion column of 3 and 2.5 trained on "3.0", 12345678901234567 on "1.2345678901234568e+16",
    true on "True"."""
    rows = []
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM is fine, as for `datasets`
            except UnicodeDecodeError:
                raise UserError(f"{path}:{number}: not UTF-8 text; save the file as UTF-8 JSON Lines") from None
            if not text.strip():
                continue
            rows.append(_checked_row(_json_row(text, path, number), cfg, f"{path}:{number}"))
    if not rows:
        raise UserError(f"dataset file {path} holds only blank lines; add one JSON object per line")
    return rows


def _opens_with_an_object_line(path: Path) -> bool:
    """Whether the file's first non-blank line is a JSON object on its own: JSON Lines (a file that is one
    object, a wrapper such as {"data": [...]}, opens with one too, and is then refused as a row)."""
    with open(path, encoding="utf-8-sig", errors="replace") as lines:
        first = next((line for line in lines if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def _json_array(path: Path, cfg: DatasetConfig) -> list[dict] | None:
    """A .json file that is one array of objects, read and checked as JSONL is (the same type inference otherwise);
    None for anything else: JSON Lines saved as .json (read as .jsonl is), or a layout `datasets` reads or reports."""
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"), parse_int=str, parse_float=str)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(items, list) or not items:
        return None
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"{path}: item {i} is {_shown(item)}, not an object; each item must be one "
                            'object such as {"messages": [...]} or {"prompt": ..., "completion": ...}')
    return [_checked_row(item, cfg, f"{path}: item {i}") for i, item in enumerate(items)]


def _checked_row(raw: dict, cfg: DatasetConfig, where: str) -> dict:
    """A parsed JSON row, its booleans as the file writes them, checked as a row (columns renamed), and kept to
    what training reads: a column it does not use (metadata of one type here, another there) or a turn's other
    keys would make the rows unreadable as one table ("cannot mix struct and non-struct")."""
    row = {k: json.dumps(v) if isinstance(v, bool) else v for k, v in raw.items()}
    renames = column_renames(list(row), cfg, where)
    problem = _row_problem({renames.get(k, k): v for k, v in row.items()}, cfg)
    if problem:
        raise UserError(f"{where}: {problem}")
    needed = _needed_columns(cfg)
    kept = {k: v for k, v in row.items() if renames.get(k, k) in needed}
    if cfg.format == "messages":
        kept = {k: [{"role": t["role"], "content": t["content"]} for t in turns] for k, turns in kept.items()}
    return kept


def _scan_csv(path: Path) -> None:
    """Every row as wide as the header, and at least one. pandas takes a row's extra first field as its index
    ("Hello, I lost my card,lost_card" trained on " I lost my card") and `datasets` would only say that a
    header-only file "corresponds to no data"."""
    import csv

    _check_utf8_lines(path, "save it as UTF-8 (Excel: CSV UTF-8)")
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if "" in header:
            raise UserError(f"{path}:1: the header has an empty column name (column {header.index('') + 1}); "
                            "name every column, or remove the trailing comma")
        twice = next((name for i, name in enumerate(header) if name in header[:i]), None)
        if twice is not None:  # pandas would read one of them and drop the other without a word
            raise UserError(f"{path}:1: the header names column {twice!r} twice (columns {header.index(twice) + 1} "
                            f"and {header.index(twice, header.index(twice) + 1) + 1}); give each column its own name")
        rows = 0
        for row in reader:
            if not any(cell.strip() for cell in row):  # blank lines, which pandas skips too
                continue
            rows += 1
            if len(row) != len(header):
                raise UserError(f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)}; a "
                                'comma inside a cell needs the cell quoted ("Hello, I lost my card")')
    if not rows:
        raise UserError(f"dataset file {path} has a header but no data rows; add examples, one per line")


def _check_utf8_lines(path: Path, fix: str) -> None:
    """The first line that is not UTF-8, named: a Windows-1252 file (Excel's plain "CSV") failed with the codec's
    byte offset alone."""
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{number}: not UTF-8 text; {fix}") from None


def _csv_as_text(path: Path) -> dict:
    """Every CSV cell as the text it is: pandas would read a reply `00507` as the number 507, and `None` or `NA`
    as a missing value."""
    import csv

    from datasets import Features, Value

    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:  # -sig: as pandas, drop a BOM
        header = next(csv.reader(f))
    return {"features": Features({name: Value("string") for name in header}), "keep_default_na": False}


def _json_row(text: str, path: Path, number: int) -> dict:
    try:
        row = json.loads(text, parse_int=str, parse_float=str)  # numbers as written: they are text to a model
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); fix that line or "
                        "remove it (JSON Lines: one complete JSON object per line)") from None
    if not isinstance(row, dict):
        raise UserError(f"{path}:{number}: {_shown(row)} is not an object; each line must be one "
                        'object such as {"messages": [...]} or {"prompt": ..., "completion": ...}')
    return row


def _load_hub(cfg: DatasetConfig, split: str):
    """The split from the hub. One quick request first: offline, `load_dataset` retried for ~25 s, logging each
    retry, before its error. HF_DATASETS_OFFLINE=1 skips it, for a copy in the Hugging Face cache."""
    from datasets import config as datasets_config
    from datasets import load_dataset

    try:
        if not datasets_config.HF_HUB_OFFLINE:
            from huggingface_hub import HfApi

            HfApi().dataset_info(cfg.hub_id, revision=cfg.revision, timeout=20)
        return load_dataset(cfg.hub_id, split=split, revision=cfg.revision)
    except Exception as exc:
        raise UserError(f"could not load dataset {cfg.hub_id!r} split {split!r} from the hub "
                        f"({type(exc).__name__}); set dataset.path to a local copy (or HF_DATASETS_OFFLINE=1 for "
                        "one in the Hugging Face cache)") from None


def load_split(cfg: DatasetConfig, split: str):
    """One split as a `datasets.Dataset`, from a local file, a local folder, or the hub."""
    if cfg.path:
        path = resolve_path(cfg.path)
        if path.is_dir():
            path = _split_file(path, split)
        elif split != cfg.train_split:
            raise UserError(f"dataset.path={cfg.path} is a single file, which holds only the train split; "
                            f"point dataset.path at a folder with {split} data, or set dataset.eval_split=null")
        ds = _normalise_columns(_load_file(path, cfg), cfg)
        check_columns(ds, cfg, str(path))
        if path.suffix != ".jsonl":  # JSONL rows were checked line by line already
            check_rows(ds, cfg, str(path))
        return ds
    ds = _normalise_columns(_load_hub(cfg, split), cfg)
    where = f"dataset {cfg.hub_id!r} ({split} split)"
    check_columns(ds, cfg, where)
    check_rows(ds, cfg, where)
    return ds


def column_renames(columns: list[str], cfg: DatasetConfig, where: str) -> dict[str, str]:
    """dataset.rename_columns as it applies to these columns; refused where two columns would share a name."""
    renames = {old: new for old, new in cfg.rename_columns.items() if old in columns}
    kept = set(columns) - set(renames)
    taken = sorted(f"{old}->{new}" for old, new in renames.items() if new in kept)
    if taken or len(set(renames.values())) < len(renames):
        clash = taken[0] if taken else ", ".join(f"{o}->{n}" for o, n in renames.items())
        raise UserError(f"{where}: dataset.rename_columns ({clash}) would give two columns one name (columns "
                        f"present: {', '.join(columns)}); rename to a free name, or rename the other column too")
    return renames


def _normalise_columns(ds, cfg: DatasetConfig):
    from datasets import ClassLabel

    renames = column_renames(ds.column_names, cfg, str(cfg.path or cfg.hub_id))
    ds = ds.rename_columns(renames) if renames else ds
    for name, feature in list(ds.features.items()):
        if isinstance(feature, ClassLabel):  # e.g. the hub's Banking77 stores intents as class ids
            ds = _class_names(ds, name, feature)
    return ds


def _class_names(ds, column: str, feature):
    """A class-id column as its class names. The column's type must change with it: kept a ClassLabel, `datasets`
    encodes the names straight back into ids, and the model would train on the digits."""
    from datasets import Value

    unlabelled = sum(1 for i in ds[column] if i is None or i < 0)
    if unlabelled:
        raise UserError(f"dataset {column!r} column: {unlabelled} row(s) have no class (-1 or empty); drop them or "
                        "give them a class")
    features = ds.features.copy()
    features[column] = Value("string")
    names = feature.names
    return ds.map(lambda row: {column: names[row[column]]}, features=features)


def eval_split_of(cfg: DatasetConfig) -> str | None:
    """The eval split: dataset.eval_split; else, for a dataset folder with an eval file of its own (eval.jsonl,
    eval.csv, ...), that file, which its name marks as the examples to evaluate on (it was ignored); else None:
    a held-out slice of train."""
    if cfg.eval_split or not cfg.path or cfg.path.startswith(BUILTIN_PREFIX):
        return cfg.eval_split
    folder = resolve_path(cfg.path)
    return "eval" if folder.is_dir() and any((folder / f"eval{suffix}").exists() for suffix in FILE_BUILDERS) \
        else None


def load_train_eval(cfg: DatasetConfig):
    """(train, eval) datasets; without an eval split, a fixed held-out slice of train."""
    train, eval_split = load_split(cfg, cfg.train_split), eval_split_of(cfg)
    if eval_split:
        evaluation = load_split(cfg, eval_split)
    else:
        if len(train) < 2:
            raise UserError(f"dataset {cfg.name!r} has {len(train)} row(s) in its {cfg.train_split} split: holding "
                            "examples out for eval needs at least 2; add rows, or give it an eval split "
                            "(a folder with train and eval files, and dataset.eval_split=NAME)")
        size = int(cfg.eval_size) if cfg.eval_size >= 1 else cfg.eval_size
        held_out = size if isinstance(size, int) else math.ceil(size * len(train))  # as train_test_split counts
        if held_out >= len(train):
            raise UserError(f"dataset.eval_size={cfg.eval_size} holds out {held_out} of {len(train)} rows, leaving "
                            f"none to train on; lower it (e.g. dataset.eval_size=0.1) or set dataset.eval_split")
        parts = train.train_test_split(test_size=size, seed=HOLDOUT_SEED, shuffle=True)
        train, evaluation = parts["train"], parts["test"]
    return sample(train, cfg.max_train_examples), sample(evaluation, cfg.max_eval_examples)


def sample(ds, n: int | None):
    """A fixed random subset of n rows (files are often sorted by label, so the first n would not do)."""
    if not n or n >= len(ds):
        return ds
    return ds.shuffle(seed=HOLDOUT_SEED).select(range(n))


# ---------------------------------------------------------------- formatting


def to_messages(row: dict, cfg: DatasetConfig) -> list[dict]:
    """A row as chat turns, with the dataset's system prompt first (unless the row brings its own)."""
    if cfg.format == "messages":
        messages = [{"role": m["role"], "content": m["content"]} for m in row[cfg.messages_column]]
    else:
        messages = [{"role": "user", "content": str(row[cfg.prompt_column])},
                    {"role": "assistant", "content": str(row[cfg.completion_column])}]
    if cfg.task_metric == "exact_match":
        messages = [{**m, "content": label_reply(m["content"])} if m["role"] == "assistant" else m for m in messages]
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def label_reply(text: str) -> str:
    """A label dataset's reply as training teaches it: the label alone on its first line, as `lora eval` reads it
    back (labels.first_line), and "\n" line ends. "card \r\nMore" would train the tokens of "card \r\n", a path
    the label trie (built from "card") never offers `constrained` or `score`."""
    first, newline, rest = text.replace("\r\n", "\n").strip().partition("\n")
    return first.strip() + newline + rest


def split_at_last_reply(messages: list[dict]) -> tuple[list[dict], str]:
    """(the turns before the last assistant turn, that turn's text): what `lora eval` prompts with and scores
    against. Turns after it (a closing user message) carry no label in training, and are no reply to score."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise UserError(f"a conversation has no assistant turn to score ({messages[-1]['content'][:60]!r}); "
                        "every example needs a reply")
    return messages[:last], messages[last]["content"]


def _needed_columns(cfg: DatasetConfig) -> list[str]:
    return [cfg.messages_column] if cfg.format == "messages" else [cfg.prompt_column, cfg.completion_column]


def columns_read(cfg: DatasetConfig) -> tuple[str, ...]:
    """The columns training reads, by the names the data gives them (before dataset.rename_columns)."""
    original = {new: old for old, new in (cfg.rename_columns or {}).items()}
    return tuple(original.get(column, column) for column in _needed_columns(cfg))


def _missing_columns(missing: list[str], present: list[str], cfg: DatasetConfig) -> str:
    keys = "dataset.messages_column" if cfg.format == "messages" else "dataset.prompt_column/completion_column"
    return (f"column(s) {', '.join(missing)} not found (columns present: {', '.join(present) or 'none'}); "
            f"set {keys} or dataset.format")


def check_columns(ds, cfg: DatasetConfig, where: str) -> None:
    missing = [c for c in _needed_columns(cfg) if c not in ds.column_names]
    if missing:
        raise UserError(f"{where}: {_missing_columns(missing, ds.column_names, cfg)}")
    if len(ds) == 0:
        raise UserError(f"{where} has no rows; add examples or point dataset.path elsewhere")


def check_rows(ds, cfg: DatasetConfig, where: str) -> None:
    """Every row has what `to_messages` needs, else the first bad row is named (1-based, a header not counted)."""
    columns = _needed_columns(cfg)
    for index, values in enumerate(zip(*(ds[c] for c in columns), strict=True)):
        problem = _row_problem(dict(zip(columns, values, strict=True)), cfg)
        if problem:
            raise UserError(f"{where} data row {index + 1}: {problem}")


def _row_problem(row: dict, cfg: DatasetConfig) -> str | None:
    """What makes one row unusable (columns already renamed), worded to be fixed; None if it is fine."""
    missing = [c for c in _needed_columns(cfg) if c not in row]
    if missing:
        return _missing_columns(missing, list(row), cfg)
    if cfg.format == "messages":
        return _messages_problem(row[cfg.messages_column], cfg.messages_column)
    if row[cfg.prompt_column] is None:
        return f"{cfg.prompt_column} is empty (null); fill it in or drop the row"
    nested = next((c for c in (cfg.prompt_column, cfg.completion_column) if isinstance(row[c], dict | list)), None)
    if nested:
        return f"{nested} must be text, not {_shown(row[nested])}; write it as a string"
    completion = row[cfg.completion_column]
    if completion is None or not str(completion).strip():
        return f"{cfg.completion_column} is empty, so there is nothing to learn; fill it in or drop the row"
    return None


def _messages_problem(turns, column: str) -> str | None:
    if not isinstance(turns, list) or not turns:
        return (f"{column} must be a non-empty list of {{\"role\": ..., \"content\": ...}} turns, not "
                f"{_shown(turns)}; fix the row or set dataset.format=columns for prompt/completion data")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            return (f"{column}[{i}] is not a turn with string role and content: {_shown(turn)}; write it as "
                    '{"role": "user", "content": "..."}')
        unsupported = next((key for key in ("tool_calls", "function_call") if turn.get(key)), None)
        weight = turn.get("weight")  # OpenAI's format: 0 for a turn not to learn (numbers are read as text)
        if unsupported or str(weight) not in ("None", "1", "1.0"):
            what = f"a {unsupported}" if unsupported else f"weight {weight}"
            return (f"{column}[{i}] has {what}, which lora-cli does not train on (only each turn's role and content "
                    "are read, so the reply would be learnt without it); drop such turns or rows")
    roles = [turn["role"] for turn in turns]
    if "assistant" not in roles:
        return (f"no assistant turn in {column} (roles: {', '.join(roles)}), so there is nothing to learn; "
                "add the reply as a turn with role \"assistant\"")
    if not any(is_reply(roles, i) for i in range(len(roles))):
        return (f"no assistant turn in {column} follows a user's turn, so none answers anything and there is "
                "nothing to learn; add the user's turn before the reply")
    empty = [i for i, turn in enumerate(turns) if turn["role"] == "assistant" and not turn["content"].strip()]
    if empty:
        return f"{column}[{empty[0]}] is an empty assistant reply, so there is nothing to learn; fill it in"
    return None


def is_reply(roles: list[str], i: int) -> bool:
    """Whether turn i is a reply, to learn: an assistant turn after some non-system turn. One that opens the
    conversation (a greeting), after a system prompt or not, answers nothing: it is context, as a prompt is."""
    return roles[i] == "assistant" and any(role != "system" for role in roles[:i])


def _shown(value, limit: int = 60) -> str:
    """A value as short one-line JSON, for messages."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def conversation_text(messages: list[dict]) -> str:
    """One conversation as canonical text: equal conversations, equal texts."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def fingerprint(texts: list[str]) -> str:
    """A content hash of the formatted data (`conversation_text` of each conversation, in order)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- tokenising


def tokenize_conversation(messages: list[dict], tokenizer, train_on_prompt: bool) -> dict:
    """Token ids and labels of one conversation, rendered turn by turn with the chat template.

    Each turn's text is the difference between the rendering of the conversation up to it and up to the
    turn before, so the token stream is exactly what the template produces, and replies (`is_reply`) with what the
    template closes them with (SmolLM2's `<|im_end|>` and its newline) are the only labels unless
    `train_on_prompt`."""
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""

    def append(text: str, trainable: bool) -> None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if trainable or train_on_prompt else [IGNORE_INDEX] * len(ids))

    roles = [message["role"] for message in messages]
    for i in range(len(messages)):
        reply = is_reply(roles, i)  # (a template cannot render the empty conversation before an opening turn)
        if reply:  # the "<|im_start|>assistant\n" header is prompt, not something to learn
            header = _render(tokenizer, messages[:i], add_generation_prompt=True, prefix=rendered)
            append(header[len(rendered):], trainable=False)
            rendered = header
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False, prefix=rendered)
        append(full[len(rendered):], trainable=reply)
        rendered = full
    return {"input_ids": input_ids, "labels": labels}


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with, which training teaches the model to emit (it is
    among the reply's labels): the tokenizer's eos for many templates (SmolLM2's <|im_end|>), another special
    token for some (Gemma's <end_of_turn>, Llama 3's <|eot_id|>). Generation stops there."""
    reply = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "x"}]
    labels = [t for t in tokenize_conversation(reply, tokenizer, train_on_prompt=False)["labels"] if t != IGNORE_INDEX]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next((t for t in labels if t in special), tokenizer.eos_token_id)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """What ends a generated reply: the template's end of turn, the tokenizer's eos where that differs, and the
    model's own eos list (`generation_config.json`; some models list several, e.g. Llama 3's <|eot_id|> and
    <|eom_id|>), which an explicit `eos_token_id=` to `generate()` would otherwise replace."""
    listed = getattr(generation_config, "eos_token_id", None)
    listed = [listed] if isinstance(listed, int) else list(listed or [])
    return list(dict.fromkeys(t for t in (end_of_turn_id(tokenizer), tokenizer.eos_token_id, *listed)
                              if t is not None))


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, prefix: str) -> str:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:  # the template's own `raise_exception`: Gemma's takes no system turn, for one
        raise UserError(f"the model's chat template refuses a conversation of the data: {_first_line(exc)}; make "
                        "the data fit it (for a template without system turns: dataset.system_prompt=null)") from None
    if not text.startswith(prefix):
        raise UserError("the model's chat template renders earlier turns differently once later turns are "
                        "added, so prompt and reply tokens cannot be told apart; use single-turn data")
    return text


def tokenize_split(conversations: list[list[dict]], tokenizer, cfg: DatasetConfig) -> TokenizedSplit:
    """Tokenise, truncate to `max_seq_len`, and drop examples left with nothing to learn."""
    split = TokenizedSplit(rows=len(conversations))
    for messages in conversations:
        example = tokenize_conversation(messages, tokenizer, cfg.train_on_prompt)
        if len(example["input_ids"]) > cfg.max_seq_len:
            split.truncated += 1
            example = {k: v[: cfg.max_seq_len] for k, v in example.items()}
        if not predicted_labels(example):  # position 0 is never predicted
            split.dropped += 1
            continue
        split.examples.append(example)
    return split


def prepare(cfg: DatasetConfig, tokenizer) -> tuple[TokenizedSplit, TokenizedSplit, str]:
    """Train and eval splits, tokenised, plus the data fingerprint. Fails loudly on empty results."""
    train_rows, eval_rows = load_train_eval(cfg)
    splits, texts = [], []
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        where = f"dataset {cfg.name!r} ({name} split)"
        check_columns(rows, cfg, where)
        conversations = [to_messages(row, cfg) for row in rows]
        splits.append(tokenize_nonempty(conversations, tokenizer, cfg, where))
        splits[-1].system_prompt = shared_system_prompt(conversations)
        splits[-1].columns_read = columns_read(cfg)
        texts.append([conversation_text(messages) for messages in conversations])
    train_texts = set(texts[0])
    splits[1].also_in_train = sum(text in train_texts for text in texts[1])
    return splits[0], splits[1], data_fingerprint(*texts)


def data_fingerprint(train_texts: list[str], eval_texts: list[str]) -> str:
    """The run's data fingerprint: both splits' `conversation_text`s, as a checkpoint and the adapter record it."""
    return hashlib.sha256((fingerprint(train_texts) + fingerprint(eval_texts)).encode()).hexdigest()


def shared_system_prompt(conversations: list[list[dict]]) -> str | None:
    """The system turn that opens every conversation: "" if none opens with one, None if they differ."""
    opening = {c[0]["content"] if c and c[0]["role"] == "system" else "" for c in conversations}
    return opening.pop() if len(opening) == 1 else None


def tokenize_nonempty(conversations: list[list[dict]], tokenizer, cfg: DatasetConfig, where: str) -> TokenizedSplit:
    """tokenize_split, refusing a split that `max_seq_len` left with no example (`where` names it)."""
    split = tokenize_split(conversations, tokenizer, cfg)
    if not split.examples:
        raise UserError(_nothing_to_learn(where, conversations, tokenizer, cfg))
    return split


def _nothing_to_learn(where: str, conversations: list[list[dict]], tokenizer, cfg: DatasetConfig) -> str:
    """Every example was truncated to no reply token: say how long the prompts are, so the fix is one number.

    Runs only on this failure path, so tokenising the conversations a second time costs nothing otherwise."""
    if cfg.train_on_prompt:
        return (f"{where}: dataset.max_seq_len={cfg.max_seq_len} leaves no token to predict in any example; "
                "set dataset.max_seq_len to 2 or more")
    prompts, lengths = [], []
    for messages in conversations:
        labels = tokenize_conversation(messages, tokenizer, train_on_prompt=False)["labels"]
        prompts.append(next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels)))
        lengths.append(len(labels))
    return (f"{where}: dataset.max_seq_len={cfg.max_seq_len} leaves no reply token to learn in any of the "
            f"{len(conversations)} examples, as the prompts fill it: the shortest prompt is {min(prompts)} "
            f"tokens (chat template and system prompt included) and the longest example {max(lengths)}; set "
            f"dataset.max_seq_len={max(lengths)} (at least {min(prompts) + 1}) or shorten the prompts")


# ---------------------------------------------------------------- batching


GROUP_WINDOW = 64  # length grouping sorts windows of this many steps' examples


@lru_cache(maxsize=4)
def epoch_order(lengths: tuple[int, ...], seed: int, epoch: int, step_size: int = 0) -> tuple[int, ...]:
    """Epoch `epoch`'s shuffled order: a function of its arguments alone, so a resumed run, or another
    process, computes the same order without any state.

    With `step_size`, the order is length-grouped: each window of the shuffled order is sorted by length and
    cut into step-sized groups, and the groups are shuffled. A step then holds examples of similar length,
    which removes most padding (~30% of a random batch of 16 on Banking77), while the steps still come in
    random order. Groups line up with the steps of the endless stream across epoch boundaries (the first
    group completes the step that straddles the boundary)."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not step_size:
        return tuple(order)
    first = -epoch * len(lengths) % step_size  # examples still owed to the step begun in the last epoch
    head, rest = order[:first], order[first:]
    window = step_size * GROUP_WINDOW
    groups = []
    for start in range(0, len(rest), window):
        chunk = sorted(rest[start:start + window], key=lambda i: lengths[i])
        groups += [chunk[i:i + step_size] for i in range(0, len(chunk), step_size)]
    # A short last group stays last: the next epoch's first examples complete its step.
    tail = groups.pop() if groups and len(groups[-1]) < step_size else []
    shuffled = torch.randperm(len(groups), generator=generator).tolist()
    return tuple(head + [i for g in shuffled for i in groups[g]] + tail)


def take(examples: list[dict], seed: int, start: int, count: int, group_by_length: bool = False) -> list[dict]:
    """Examples [start, start + count) of the endless stream that concatenates every epoch's shuffled order.

    One integer, the position, is the whole data state of a run: every example is seen exactly once per
    epoch, a step may straddle two epochs, and resuming at position p continues exactly where it stopped.
    `group_by_length` groups `count`-sized steps by length (see `epoch_order`)."""
    lengths = tuple(len(e["input_ids"]) for e in examples)
    n, taken = len(examples), []
    while len(taken) < count:
        epoch, offset = divmod(start + len(taken), n)
        order = epoch_order(lengths, seed, epoch, count if group_by_length else 0)
        taken += [examples[i] for i in order[offset: offset + count - len(taken)]]
    return taken


def micro_batches(step_examples: list[dict], batch_size: int, rank: int, world: int, pad_id: int,
                  pack_width: int | None = None) -> list[dict]:
    """This process's micro-batches of one optimizer step.

    The step's examples are sorted by length first (less padding; the step's gradient is a sum over the
    same examples either way), then micro-batch k of process `rank` is slice (k * world + rank) of size
    `batch_size`: N processes x batch b see exactly the examples of 1 process x batch N * b. With
    `pack_width`, each micro-batch is packed into rows of that many tokens (see `pack`) instead of padded."""
    ordered = sorted(step_examples, key=lambda e: len(e["input_ids"]))
    slices = range(rank, len(ordered) // batch_size, world)
    chunks = [ordered[i * batch_size:(i + 1) * batch_size] for i in slices]
    if pack_width:
        return [pack(chunk, pad_id, pack_width) for chunk in chunks]
    return [collate(chunk, pad_id) for chunk in chunks]


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a batch to its longest example; padding is masked out of attention and labels."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack(examples: list[dict], pad_id: int, width: int) -> dict:
    """Several examples per row, laid end to end in rows of at most `width` tokens (first fit, longest first).

    Exact, not an approximation: position ids restart at 0 for each example, and with them (and no attention
    mask) transformers builds a block-diagonal causal mask, so no token attends across examples. Each
    example's first label is dropped, since in a row it would be predicted from the previous example's last
    token; unpacked, position 0 is never predicted either. The tail of a row is padding that forms its own
    block and carries no label. No `attention_mask` key: that is what tells the model the rows are packed."""
    import torch

    rows: list[list[dict]] = []
    free: list[int] = []
    for example in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(example["input_ids"])
        fits = next((r for r, room in enumerate(free) if room >= n), None)
        if fits is None:
            fits = len(rows)
            rows.append([])
            free.append(max(width, n))
        rows[fits].append(example)
        free[fits] -= n
    length = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example["input_ids"])
            input_ids[r, at:at + n] = torch.tensor(example["input_ids"])
            labels[r, at + 1:at + n] = torch.tensor(example["labels"][1:])
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(length - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
