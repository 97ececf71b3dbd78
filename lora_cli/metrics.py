"""metrics.jsonl: one JSON object per logged step or eval, written as it happens and read back on resume.

A step skipped as non-finite (`trainer.on_nonfinite=skip`) has a NaN or infinite loss. Python's json would
write that as a bare `NaN`, which is not JSON: jq, JavaScript and most other readers refuse the whole file.
So non-finite numbers are written as null, and read back as NaN, which is what the loop and the plots expect.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def to_line(record: dict) -> str:
    """One record as a line of strict JSON, non-finite numbers as null (in lists too: S-LoRA's scales)."""
    return json.dumps(_finite_or_null(record), allow_nan=False) + "\n"


def _finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(item) for item in value]
    return value


def from_line(line: str) -> dict:
    """One record from its line; null numbers (non-finite when written) as NaN. Raises ValueError if the line
    is not JSON (e.g. cut short by a killed run)."""
    return _null_as_nan(json.loads(line))


def _null_as_nan(value):
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {key: _null_as_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_null_as_nan(item) for item in value]
    return value


class MetricsLog:
    """metrics.jsonl, one record per step or eval; the records also stay in memory (plots, checkpoints)."""

    def __init__(self, path: Path, records: list[dict], enabled: bool):
        self.records = records
        self.file = open(path, "w") if enabled else None  # noqa: SIM115 (closed by close())
        if self.file:
            self.file.write("".join(map(to_line, records)))

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.file:
            self.file.write(to_line(record))
            self.file.flush()

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.records if key in r]

    def close(self) -> None:
        if self.file:
            self.file.close()
