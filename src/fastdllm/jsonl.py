"""Reading JSONL files of objects, with errors that name the file and the line."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import FastDLLMError


def read_jsonl(path: str | os.PathLike, *, expected: str,
               missing_hint: str = "check the path") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line. `expected` describes the object a line
    must hold and `missing_hint` the fix for a missing file; both go into the error messages."""
    path = Path(path)
    if not path.is_file():
        raise FastDLLMError(f"data file {str(path)!r} does not exist; {missing_hint}")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FastDLLMError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); "
                                    "each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise FastDLLMError(f"{path}:{number}: expected a JSON object ({expected}), "
                                    f"got {type(record).__name__}")
            records.append((number, record))
    return records
