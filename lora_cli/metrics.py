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
    """One record as a line of strict JSON, non-finite numbers as null."""
    strict = {key: None if isinstance(value, float) and not math.isfinite(value) else value
              for key, value in record.items()}
    return json.dumps(strict, allow_nan=False) + "\n"


def from_line(line: str) -> dict:
    """One record from its line; null numbers (non-finite when written) as NaN. Raises ValueError if the line
    is not JSON (e.g. cut short by a killed run)."""
    return {key: math.nan if value is None else value for key, value in json.loads(line).items()}


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
