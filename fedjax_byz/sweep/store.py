"""The results store: one JSON line per cell, rewritten atomically after every batch.

``results.jsonl`` in a sweep's folder holds one record per (cell, seed) with the full
config, its grid values, final and best accuracy, per-round curves, the weight the rule
gave Byzantine clients, wall and compile time. ``pandas.read_json(path, lines=True)``
reads it directly. The file is replaced with ``os.replace`` after a complete write, so an
interruption at any moment leaves either the old or the new file, never a partial one.
Several processes (the workers of a Ray sweep) may add to one store: each write re-reads
the file under an exclusive lock (``results.jsonl.lock``), so none drops another's records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping
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
        self._records = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        records = (json.loads(line) for line in self.path.read_text().splitlines() if line.strip())
        return {r["key"]: r for r in records}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict[str, Any]:
        return self._records[key]

    def records(self) -> list[dict[str, Any]]:
        return list(self._records.values())

    def add(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Adds (or replaces) records and rewrites the file atomically, keeping the records
        other processes added since this store last read it."""
        new = [json.loads(json.dumps(clean_json(dict(r)), default=str)) for r in records]
        with self._locked():
            self._records = self._read()
            self._records.update((r["key"], r) for r in new)
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
