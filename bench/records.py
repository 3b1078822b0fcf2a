"""How every benchmark and probe keeps its measurements: one JSON object per line, appended as each is measured,
so a long measurement stopped part-way keeps what it had."""
from __future__ import annotations

import json
from pathlib import Path


def append_record(path, record: dict) -> None:
    """Append `record` as one line to the JSON-lines file `path` (its folder made if missing); no path: nothing."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as out:
            out.write(json.dumps(record) + "\n")
