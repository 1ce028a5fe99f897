"""Sweeps on a local Ray cluster: a worker killed mid-sweep loses no cell, duplicates none."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import fedjax_byz as fb

from .test_sim import TINY

ray = pytest.importorskip("ray")

# 2 rules x 4 seeds, 2 cells per batch: 4 batches of 20 chunks (a checkpoint after each).
ROUNDS = 20
GRID = dict(
    TINY,
    seed=[0, 1, 2, 3],
    server={"rounds": ROUNDS, "eval_every": 1},
    attack={"name": "lie", "num_byzantine": 1},
    aggregator={"name": ["mean", "median"]},
    sweep={"max_batch": 2},
)
TASK = "ray::run_batch_task"


def _task_pids() -> list[int]:
    """Ray worker processes running a sweep batch (Ray titles them ``ray::<task>``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(TASK.encode()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _kill_when_checkpointed(folder: Path, killed: list[int], done: threading.Event) -> None:
    """Once a batch has written a checkpoint (it is mid-run), SIGKILLs a batch worker."""
    while not done.is_set() and not killed:
        if any((folder / "checkpoints").glob("*.npz")):
            for pid in _task_pids()[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.01)


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# Ray starts its processes with fork + exec, which JAX (already running) warns about.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_killed_worker_loses_no_cell(tmp_path, local_ray):
    killed: list[int] = []
    done = threading.Event()
    killer = threading.Thread(target=_kill_when_checkpointed, args=(tmp_path, killed, done))
    killer.start()
    try:
        records = fb.sweep(GRID, out=tmp_path, ray="local", progress=False, chunk_periods=1)
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was running a batch to kill"
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").open()]
    keys = [r["key"] for r in lines]
    assert len(keys) == 8 and len(set(keys)) == 8  # every cell exactly once
    assert len({r["program"] for r in lines}) == 2  # one per rule: parallel tasks, no branches
    assert {r["key"] for r in records} == set(keys)
    for r in records:  # a resumed batch keeps the curves of the chunks before the kill
        assert len(r["test_acc"]) == len(r["train_loss"]) == ROUNDS
    assert not list((tmp_path / "checkpoints").glob("*.npz"))
