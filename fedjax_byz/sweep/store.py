"""The results store: one JSON line per cell, rewritten atomically after every batch.

``results.jsonl`` in a sweep's folder holds one record per (cell, seed) with the full
config, its grid values, final and best accuracy, per-round curves, the weight the rule
gave Byzantine clients, wall and compile time. ``pandas.read_json(path, lines=True)``
reads it directly. The file is replaced with ``os.replace`` after a complete write, so an
interruption at any moment leaves either the old or the new file, never a partial one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedjax_byz.sim.run import clean_json


class ResultStore:
    """Records keyed by cell identity, persisted as JSON lines.

    Args:
      path: the ``.jsonl`` file (created on the first ``add``).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self._records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict[str, Any]:
        return self._records[key]

    def records(self) -> list[dict[str, Any]]:
        return list(self._records.values())

    def add(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Adds (or replaces) records and rewrites the file atomically."""
        for r in records:
            self._records[r["key"]] = json.loads(json.dumps(clean_json(dict(r)), default=str))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as fh:
            for r in self._records.values():
                fh.write(json.dumps(r) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def load_results(path: str | Path):
    """A sweep's records as a pandas DataFrame (``path``: the folder or the .jsonl file)."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    return pd.read_json(path, lines=True)
