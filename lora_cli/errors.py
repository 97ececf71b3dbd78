"""The one exception type that means "the user can fix this": the CLI prints it as one line, no traceback."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A problem with the user's input (config, data, paths), worded as: what is wrong, where, what to do."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C / SIGTERM after saving a checkpoint; the CLI says how to resume, exit 130."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"interrupted after step {step}; checkpoint saved in {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


def did_you_mean(typed: str, candidates, shown: str = "{}", cutoff: float = 0.6) -> str:
    """'did you mean X? ' for the candidate nearest what was typed (X written as `shown` says), or '' if none is
    near: most wrong names and values are typos of a right one."""
    near = difflib.get_close_matches(typed, list(candidates), n=1, cutoff=cutoff)
    return f"did you mean {shown.format(near[0])}? " if near else ""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's message as one line for a one-line error (its first line, cut at `limit`), or its type's
    name where it has no message: `str(exc).splitlines()[0]` raised IndexError on an empty one."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if limit is None else text[:limit]
