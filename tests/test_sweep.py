"""Sweeps: grid expansion, grouping, batching, the resumable store, reports."""

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fedjax_byz as fb
from fedjax_byz.sim import run as run_lib
from fedjax_byz.sweep import grid, report, runner, workers
from fedjax_byz.sweep.store import ResultStore

from .test_sim import TINY

GRID = dict(
    TINY,
    seed=[0, 1, 2],
    attack={"name": "lie", "num_byzantine": 1, "z": [0.5, 2.0]},
    aggregator={"name": ["mean", "median"]},
)
METRICS = ("test_acc", "test_loss", "train_loss", "byz_weight", "agg_error", "best_acc")


def _workers_alive() -> bool:
    """Whether a sweep worker process (``sweep.workers``) is running on this machine."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if b"sweep.workers import serve" in cmdline.read_bytes():
                return True
    return False


def _metrics(records):
    return {r["key"]: {m: r[m] for m in METRICS} for r in records}


def test_expansion_grouping_and_batch_counts(tmp_path, capsys):
    cells = grid.expand_cells(GRID)
    assert len(cells) == 12 and len({c.key for c in cells}) == 12
    groups = grid.group_cells(cells)
    assert [len(g) for g in groups] == [6, 6]  # one program per rule; seeds × z batched
    assert [len(g) for g in grid.group_cells(cells, branches=True)] == [12]  # rules: branches
    records = fb.sweep(dict(GRID, sweep={"max_batch": 4}), out=tmp_path, progress=False)
    out = capsys.readouterr().out  # on one CPU: cells run one after another, one program
    assert "12 cells in 1 compiled program(s), 3 batch(es)" in out
    assert sorted(r["batch_size"] for r in records) == [4] * 12
    assert len(ResultStore(tmp_path / "results.jsonl")) == 12
    records = fb.sweep(dict(GRID, sweep={"mode": "vmap"}), out=tmp_path / "v", progress=False)
    assert "12 cells in 2 compiled program(s), 2 batch(es)" in capsys.readouterr().out


def test_attack_and_rule_branches_equal_single_runs(tmp_path, capsys):
    """One program for an attack × rule grid (stateful rule, label flipping, a composite
    rule, several seeds and partitions), its cells dealt to 2 worker processes: every cell
    exactly as its own single run."""
    cfg = dict(
        TINY,
        seed=[0, 1],
        attack={"grid": [{"name": "labelflip"}, {"name": "lie", "z": 1.0}, {"name": "none"}]},
        aggregator={"grid": [{"name": "cclip", "tau": 0.5}, {"name": "bucketing+krum"}]},
        sweep={"threads": 2},
    )
    records = fb.sweep(cfg, out=tmp_path, progress=False)
    assert "12 cells in 1 compiled program(s), 2 batch(es)" in capsys.readouterr().out
    assert len({r["program"] for r in records}) == 1 and len(records) == 12
    for r in records:
        single = fb.simulate(r["config"], progress=False)
        for m in METRICS[:-1]:
            np.testing.assert_array_equal(r[m], single[m], err_msg=m)


def test_auto_mode_maps_on_one_cpu_and_vmaps_over_devices():
    assert run_lib.batch_mode("auto") == "map"  # on the CPUs of one process
    assert run_lib.batch_mode("vmap") == "vmap" and run_lib.batch_mode("map") == "map"


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_batched_cells_equal_single_runs(tmp_path, mode):
    records = fb.sweep(dict(GRID, sweep={"mode": mode}), out=tmp_path, progress=False)
    for r in records[::5]:
        single = fb.simulate(r["config"], progress=False)
        np.testing.assert_allclose(r["test_acc"], single["test_acc"], atol=1e-6)
        np.testing.assert_allclose(r["train_loss"], single["train_loss"], rtol=1e-5)


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_batches_of_a_group_share_one_program(mode):
    """Batches holding different seeds (partitions) of one group: one compiled program,
    whatever partitions each batch holds."""
    group = [c.config for c in grid.group_cells(grid.expand_cells(GRID), branches=mode == "map")[0]]
    by_seed = [[c for c in group if c.seed == s][:2] for s in (0, 1)]
    blocks = {max(map(len, run_lib.partition_of(c.data, c.seed))) for c in group}
    assert len(blocks) > 1  # alone, the seeds' partitions pad to different shapes
    programs = set()
    for cfgs in by_seed + [by_seed[0][:1] + by_seed[1][:1]]:
        batch = run_lib.Batch(cfgs, mode, group=group)
        programs.add(id(batch.compile(batch.init(), 1)[0]))
    assert len(programs) == 1


def test_worker_processes_on_a_cpu_in_map_mode_only(tmp_path):
    plan = runner.plan_sweep(GRID, out=tmp_path, log=lambda *a: None, complete=False)
    assert plan.workers == runner.worker_count(plan.opts, plan.cells) == 1  # 12 tiny cells
    assert runner.worker_count(plan.opts, plan.cells * 10_000) == run_lib.default_threads()
    assert runner.worker_count(dict(plan.opts, threads=3), plan.cells) == 3
    assert runner.worker_count(dict(plan.opts, threads=3, mode="vmap"), plan.cells) == 1


def test_a_failing_batch_fails_the_sweep():
    worker = workers.Worker(0)
    with pytest.raises(RuntimeError, match="(?s)batch 3 failed in a sweep worker.*AttributeError"):
        worker.run(pickle.dumps((None, 2, 10)))  # no plan
    worker.close()
    assert worker.process.returncode == 0


@pytest.mark.parametrize("threads", [None, 2])  # in this process; in worker processes
def test_finished_sweep_reruns_as_noop(tmp_path, monkeypatch, threads):
    cfg = dict(GRID, sweep={"threads": threads})
    first = fb.sweep(cfg, out=tmp_path, progress=False)
    monkeypatch.setattr(runner, "run_batch", lambda *a, **k: pytest.fail("re-ran a cell"))
    monkeypatch.setattr(runner, "Worker", lambda *a, **k: pytest.fail("started a worker"))
    again = fb.sweep(cfg, out=tmp_path, progress=False)
    assert _metrics(again) == _metrics(first)


def test_a_grown_grid_runs_only_its_new_cells(tmp_path, monkeypatch, capsys):
    """A finished sweep given one more seed runs the new seed's cells alone, in the
    program of their group, and keeps every finished record as it was."""
    first = fb.sweep(dict(GRID, seed=[0, 1]), out=tmp_path, progress=False)
    ran = []
    run_batch = runner.run_batch
    monkeypatch.setattr(runner, "run_batch", lambda b, **k: ran.append(b.cfgs) or run_batch(b, **k))
    again = fb.sweep(GRID, out=tmp_path, progress=False)
    assert sorted(c.seed for cfgs in ran for c in cfgs) == [2] * 4
    assert "12 cells in 1 compiled program(s), 2 batch(es)" in capsys.readouterr().out
    assert again[:8] == first  # the records of seeds 0 and 1 untouched
    assert [r["config"]["seed"] for r in again[8:]] == [2] * 4


def test_memory_budget_splits_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "memory_budget", lambda fraction: 1)
    records = fb.sweep(GRID, out=tmp_path, progress=False)
    assert {r["batch_size"] for r in records} == {1}
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["batches"]) == 12


def _interrupt_after_two_chunks(monkeypatch, batch, ckpt):
    """Runs ``batch`` in chunks of 2 periods, checkpointing to ``ckpt``, and stops it with a
    ``KeyboardInterrupt`` right after its second checkpoint."""
    saved, calls = run_lib.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        saved(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_lib, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_lib.run_batch(batch, progress=False, chunk_periods=2, checkpoint=ckpt)
    monkeypatch.setattr(run_lib, "save_checkpoint", saved)


def test_checkpoint_resumes_an_interrupted_batch(tmp_path, monkeypatch):
    cfg = fb.sim.from_dict(dict(TINY, server={"rounds": 6, "eval_every": 1}))
    whole = run_lib.run_batch(run_lib.Batch([cfg]), progress=False, chunk_periods=2)[0]
    ckpt = tmp_path / "c.npz"
    _interrupt_after_two_chunks(monkeypatch, run_lib.Batch([cfg]), ckpt)
    assert ckpt.exists()
    resumed = run_lib.run_batch(
        run_lib.Batch([cfg]), progress=False, chunk_periods=2, checkpoint=ckpt
    )[0]
    assert not ckpt.exists()
    for m in ("test_acc", "train_loss", "agg_error"):
        assert resumed[m] == whole[m]


def test_threads_share_cells_and_resume_with_another_count(tmp_path, monkeypatch):
    """Cells split over threads, or padded with a repeated cell, give a single thread's
    numbers; a checkpoint written by 3 threads resumes with 2 (it holds the cells in
    order, not the threads' shares)."""
    cfgs = [
        fb.sim.from_dict(dict(TINY, seed=s, server={"rounds": 6, "eval_every": 1}))
        for s in range(4)
    ]
    one = run_lib.run_batch(run_lib.Batch(cfgs, "map", threads=1), progress=False)
    padded = run_lib.Batch(cfgs[:3], "map", threads=1, size=4)  # the last cell run twice
    assert padded.shares(padded.init())[0][1].client_lr.shape == (4,)
    for a, b in zip(one, run_lib.run_batch(padded, progress=False), strict=False):
        for m in METRICS:
            np.testing.assert_array_equal(a[m], b[m], err_msg=m)
    batch = run_lib.Batch(cfgs, "map", threads=3)
    assert batch.threads == 3 and batch.shares(batch.init())[2][1].client_lr.shape == (2,)
    ckpt = tmp_path / "c.npz"
    _interrupt_after_two_chunks(monkeypatch, batch, ckpt)
    two = run_lib.Batch(cfgs, "map", threads=2)
    resumed = run_lib.run_batch(two, progress=False, chunk_periods=2, checkpoint=ckpt)
    assert [r["config"]["seed"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(one, resumed, strict=True):
        for m in METRICS:
            np.testing.assert_array_equal(a[m], b[m], err_msg=m)


def test_killed_sweep_resumes_to_identical_results(tmp_path):
    """kill -9 mid-sweep (running its batches in worker processes, which end with it),
    start again: every cell once, same numbers as an unbroken run."""
    cfg = dict(GRID, sweep={"max_batch": 2, "threads": 2})
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "killed"
    code = (
        "import json, sys, fedjax_byz as fb; "
        f"fb.sweep(json.load(open({str(path)!r})), out={str(out)!r}, progress=False)"
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    store = out / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if store.exists() and len(store.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10  # its worker processes end with it
    while time.time() < deadline and _workers_alive():
        time.sleep(0.1)
    assert not _workers_alive()
    partial = len(ResultStore(store)) if store.exists() else 0
    assert partial < 12, "the sweep finished before it could be killed"
    resumed = fb.sweep(cfg, out=out, progress=False)
    unbroken = fb.sweep(cfg, out=tmp_path / "unbroken", progress=False)
    assert len(resumed) == 12 and len(ResultStore(store)) == 12
    assert _metrics(resumed) == _metrics(unbroken)
    plan = json.loads((out / "plan.json").read_text())["batches"]
    assert plan == json.loads((tmp_path / "unbroken" / "plan.json").read_text())["batches"]


@pytest.mark.parametrize(
    "over,field",
    [
        ({"trian": {"lr": 0.1}}, "trian"),
        ({"seed": []}, "seed"),
        ({"sweep": {"vmap": ["train.batch_size"]}}, "sweep.vmap"),
        ({"sweep": {"mode": "pmap"}}, "sweep.mode"),
        ({"sweep": {"batchsize": 3}}, "sweep.batchsize"),
        ({"attack": {"name": ["lie", "lei"], "num_byzantine": 1}}, "attack.name"),
        ({"seed": [0, 0]}, "grid"),
        ({"name": ["a", "b"]}, "name"),
        ({"sweep": [1]}, "sweep"),
        ({"sweep": {"max_batch": 0}}, "sweep.max_batch"),
        ({"sweep": {"threads": 1.5}}, "sweep.threads"),
        ({"sweep": {"memory_fraction": -1}}, "sweep.memory_fraction"),
        ({"sweep": {"vmap": "seed"}}, "sweep.vmap"),
        ({"profiles": ["cpu"]}, "profiles"),
        # a missing file in a later cell stops the sweep before the first cell runs
        (
            {"data": {"grid": [{"source": "digits"}, {"source": "arrays", "path": "/no.npz"}]}},
            "data.path",
        ),
    ],
)
def test_bad_grids_fail_before_running(tmp_path, monkeypatch, over, field):
    monkeypatch.setattr(runner, "run_batch", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(fb.ConfigError) as err:
        fb.sweep(dict(GRID, **over), out=tmp_path, progress=False)
    assert str(err.value).startswith(field), str(err.value)


def test_report_tables_heatmaps_and_ablations(tmp_path):
    cfg = dict(
        TINY,
        seed=[0, 1],
        attack=[{"name": "none", "num_byzantine": 1}, {"name": "bitflip", "num_byzantine": 1}],
        aggregator={"name": ["mean", "median"]},
        data=dict(TINY["data"], beta=[0.3, 1.0]),
    )
    records = fb.sweep(cfg, out=tmp_path, progress=False)
    path = report.write_report(records, tmp_path / "report")
    md = path.read_text()
    # per beta: the accuracy table and the attack-impact table (none x mean is a cell)
    assert md.count("| attack \\ defense |") == 4 and "Attack impact" in md
    assert "±" in md and "**" in md
    assert (tmp_path / "report" / "report.tex").read_text().count(r"\textbf") >= 2
    assert (tmp_path / "report" / "ablation_data_beta.png").stat().st_size > 1000
    assert len(list((tmp_path / "report").glob("heatmap_*.png"))) == 2
    # the table's numbers are the mean over seeds of the best accuracy
    rows, cols, stats = next(iter(report.aggregate_table(records, report.Layout(records)).values()))
    mine = [
        r["best_acc"]
        for r in records
        if r["grid"]["data.beta"] == 0.3
        and r["grid"]["attack.name"] == "none"
        and r["grid"]["aggregator.name"] == "mean"
    ]
    assert stats[rows[0], cols[0]][0] == pytest.approx(np.mean(mine))


def test_markdown_table_bolds_the_strongest_attack():
    stats = {
        ("a", "x"): (0.9, 0.01, 3),
        ("b", "x"): (0.2, 0.02, 3),
        ("a", "y"): (0.5, 0.0, 3),
        ("b", "y"): (0.7, 0.0, 3),
    }
    md = report.markdown_table(["a", "b"], ["x", "y"], stats)
    assert "**20.0 ± 2.0**" in md and "**50.0 ± 0.0**" in md and "**90.0" not in md


def test_captures_are_saved_beside_the_store(tmp_path):
    cfg = dict(TINY, seed=[0, 1], diagnostics={"capture_rounds": [2]})
    records = fb.sweep(cfg, out=tmp_path, progress=False)
    for r in records:
        with np.load(tmp_path / r["captures"]) as z:
            assert z["updates"].shape[0] == 1 and list(z["rounds"]) == [2]
    first, second = (np.load(tmp_path / r["captures"])["updates"] for r in records)
    assert not np.allclose(first, second)  # each seed keeps its own matrices


def _record(attack, rule, grid, acc=0.5):
    config = {"attack": {"name": attack}, "aggregator": {"name": rule}}
    return {"grid": grid, "config": config, "best_acc": acc, "name": "t"}


def test_layout_folds_counts_that_follow_a_rule_and_ablates_co_varying_axes():
    # one rule run with its own assumed f labels its column instead of splitting panels
    recs = [
        _record("lie", rule, {"aggregator.name": rule, **extra})
        for rule, extra in [
            ("median", {}),
            ("krum", {}),
            ("bucketing+rbtm", {"aggregator.assumed_byzantine": 8}),
        ]
    ]
    layout = report.Layout(recs)
    assert layout.other_axes == []
    assert layout.col(recs[2]) == "bucketing+rbtm(assumed_byzantine=8)"
    assert len(report.aggregate_table(recs, layout)) == 1
    # f set together with n (a top-level grid of variants): one line against n
    recs = [
        _record("strike", "dnc", {"data.num_clients": n, "attack.num_byzantine": n // 5})
        for n in (10, 30, 50)
    ]
    layout = report.Layout(recs)
    assert layout.follows("data.num_clients") == {"attack.num_byzantine"}
    crossed = [
        _record("lie", "mean", {"data.num_clients": n, "attack.num_byzantine": f})
        for n in (10, 30)
        for f in (1, 2)
    ]
    assert report.Layout(crossed).follows("data.num_clients") == set()
