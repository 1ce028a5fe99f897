"""The results store: one JSON line per cell, rewritten atomically after every batch.

``results.jsonl`` in a sweep's folder holds one record per (cell, seed) with the full
config, its grid values, final and best accuracy, per-round curves, the weight the rule
gave Byzantine clients, wall and compile time. ``pandas.read_json(path, lines=True)``
reads it directly. The file is replaced with ``os.replace`` after a complete write, so an
interruption at any moment leaves either the old or the new file, never a partial one.
Several processes (the workers of a Ray sweep) may add to one store: each write re-reads
the file under an exclusive lock (``results.jsonl.lock``), so none drops another's records.

The store keeps every record ever written to its folder, also those of an earlier sweep
rerun there with another config or grid. ``plan.json`` beside it names the cells of the
folder's current sweep (``sweep.runner`` rewrites it), and ``ResultStore.records`` returns
only theirs, counting the records it left out; a store without ``plan.json`` (written by
hand) returns every record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from fedjax_byz.registry import ConfigError
from fedjax_byz.sim.run import clean_json

EXPECTED = "one JSON record per line, as a sweep writes to its results.jsonl"


class Records(list):
    """A store's records (a plain list) and what they leave out.

    Attributes:
      path: the ``.jsonl`` file they come from.
      left_out: records of the store outside the folder's current sweep (``plan.json``).
      missing: cells of the current sweep with no record yet.
    """

    def __init__(
        self, records=(), *, path: Path | None = None, left_out: int = 0, missing: int = 0
    ):
        super().__init__(records)
        self.path = path
        self.left_out = left_out
        self.missing = missing


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
        out = {}
        for i, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                r = None
            if not isinstance(r, dict) or "key" not in r:
                raise ConfigError(
                    f"results: {str(self.path)!r} is not a results store: expected {EXPECTED}; "
                    f"line {i} is not a JSON object with a 'key'."
                )
            out[r["key"]] = r
        return out

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

    @property
    def plan_path(self) -> Path:
        return self.path.with_name("plan.json")

    def plan_keys(self) -> list[str] | None:
        """The cell keys of the folder's current sweep: ``plan.json``'s ``cells`` when it
        lists them, else the keys of its ``batches``; None without a ``plan.json``."""
        if not self.plan_path.exists():
            return None
        try:
            plan = json.loads(self.plan_path.read_text())
            keys = plan["cells"] if "cells" in plan else [k for b in plan["batches"] for k in b]
            return list(dict.fromkeys(str(k) for k in keys))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(
                f"results: {str(self.plan_path)!r} is not a sweep plan: expected "
                f'{{"batches": [[cell keys]]}} as a sweep writes it ({e}).'
            ) from None

    def records(self, current: bool = True) -> Records:
        """The records of the folder's current sweep (with ``current`` and a ``plan.json``;
        ``left_out`` counts the others), else every record of the store."""
        keys = self.plan_keys() if current else None
        if keys is None:
            return Records(self._records.values(), path=self.path)
        mine = [self._records[k] for k in keys if k in self._records]
        return Records(
            mine,
            path=self.path,
            left_out=len(self._records) - len(mine),
            missing=len(keys) - len(mine),
        )

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


def load_results(path: str | Path, current: bool = True):
    """A sweep's records as a pandas DataFrame (``path``: the folder or the .jsonl file):
    those of the folder's current sweep, as ``ResultStore.records`` gives them (every
    record of the store with ``current=False``)."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    return pd.DataFrame(ResultStore(path).records(current))
