"""What a report and a resumed run may trust: the folder's current sweep, valid metrics and
stores, honest marking of partial cells, and checkpoints that belong to the run."""

import json

import numpy as np
import pytest

import fedjax_byz as fb
from fedjax_byz import cli
from fedjax_byz.sim import run as run_lib
from fedjax_byz.sweep import report
from fedjax_byz.sweep.store import ResultStore

from .test_sim import TINY


def _record(attack, rule, seed, acc, lr=0.1):
    """A hand-written store record (the fields the report reads)."""
    config = {
        "name": "hand",
        "seed": seed,
        "train": {"lr": lr},
        "attack": {"name": attack},
        "aggregator": {"name": rule},
    }
    return {
        "key": f"{attack}-{rule}-{seed}-{lr}",
        "name": "hand",
        "config": config,
        "grid": {"seed": seed, "attack.name": attack, "aggregator.name": rule},
        "best_acc": acc,
        "final_acc": acc - 0.01,
        "final_loss": 2.0 - acc,
    }


def _store(folder, records, plan=None):
    ResultStore(folder / "results.jsonl").add(records)
    if plan is not None:
        (folder / "plan.json").write_text(json.dumps({"batches": [[r["key"] for r in plan]]}))
    return folder


# 1. The report covers the folder's current sweep only.


def test_report_leaves_out_records_of_an_earlier_sweep_into_the_folder(tmp_path, capsys):
    grid = dict(TINY, seed=[0, 1], aggregator={"name": ["mean", "median"]})
    first = fb.sweep(grid, out=tmp_path, progress=False, log=None)
    # rerun into the same folder with another lr and a smaller grid (median dropped)
    rerun = {"train.lr": 0.05, "aggregator.name": "mean"}
    second = fb.sweep(grid, out=tmp_path, progress=False, log=None, overrides=rerun)
    assert len(ResultStore(tmp_path / "results.jsonl")) == len(first) + len(second) == 6
    assert cli.main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    capsys.readouterr()
    assert "median" not in md  # the dropped column is gone
    assert "4 record(s)" in md and "left out" in md
    acc = [r["best_acc"] for r in second]
    assert f"{100 * np.mean(acc):.1f} ± {100 * np.std(acc, ddof=1):.1f}" in md
    mixed = [r["best_acc"] for r in first if r["grid"]["aggregator.name"] == "mean"] + acc
    assert f"{100 * np.mean(mixed):.1f} ± {100 * np.std(mixed, ddof=1):.1f}" not in md


def test_store_records_follow_plan_json(tmp_path):
    old = [_record("lie", "mean", s, 0.5, lr=0.1) for s in (0, 1)]
    new = [_record("lie", "mean", s, 0.7, lr=0.05) for s in (0, 1)]
    _store(tmp_path, old + new, plan=new + [_record("lie", "mean", 2, 0.7, lr=0.05)])
    records = ResultStore(tmp_path / "results.jsonl").records()
    assert [r["key"] for r in records] == [r["key"] for r in new]
    assert records.left_out == 2 and records.missing == 1
    md = report.summary(records)
    assert "2 record(s)" in md and "left out" in md and "1 cell(s)" in md
    assert "70.0 ± 0.0" in md and "60.0" not in md


def test_plan_json_cells_are_preferred_to_its_batches(tmp_path):
    """A plan that lists every cell before its batches are planned (a sweep interrupted
    while planning) still covers the cells it has not batched yet."""
    records = [_record("lie", "mean", s, 0.5) for s in (0, 1)]
    _store(tmp_path, records)
    plan = {"cells": [r["key"] for r in records], "batches": [[records[0]["key"]]]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    got = ResultStore(tmp_path / "results.jsonl").records()
    assert len(got) == 2 and got.left_out == 0


def test_store_without_plan_json_keeps_every_record(tmp_path):
    records = [_record("lie", "mean", 0, 0.5, lr=0.1), _record("lie", "mean", 0, 0.7, lr=0.05)]
    _store(tmp_path, records)
    got = ResultStore(tmp_path / "results.jsonl").records()
    assert len(got) == 2 and got.left_out == 0
    assert "left out" not in report.summary(got)


# 2. --metric is one of the accuracies.


@pytest.mark.parametrize("metric", ["foo", "final_loss"])
def test_report_metric_must_be_an_accuracy(tmp_path, capsys, metric):
    _store(tmp_path, [_record("lie", "mean", 0, 0.5), _record("none", "mean", 0, 0.9)])
    records = ResultStore(tmp_path / "results.jsonl").records()
    with pytest.raises(fb.ConfigError) as err:
        report.write_report(records, tmp_path / "report", metric=metric)
    msg = str(err.value)
    assert msg.startswith("--metric") and "best_acc" in msg and "final_acc" in msg
    assert not (tmp_path / "report").exists()
    assert cli.main(["report", str(tmp_path), "--metric", metric]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --metric") and "\n" not in err
    assert cli.main(["report", str(tmp_path), "--metric", "final_acc"]) == 0


# 3. Empty or foreign files are one clear error.


def test_report_of_an_empty_store_is_one_error(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text("")
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: results:") and "results.jsonl" in err and "\n" not in err
    assert "no records" in err


def test_report_of_a_file_that_is_not_json_lines_is_one_error(tmp_path, capsys):
    path = tmp_path / "results.json"
    fb.sim.save_json({"name": "x", "runs": [_record("lie", "mean", 0, 0.5)]}, path)
    assert cli.main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: results:") and "results.json" in err and "\n" not in err
    assert "one JSON record per line" in err
    with pytest.raises(fb.ConfigError):
        ResultStore(path)
    (tmp_path / "other.jsonl").write_text('{"name": "no key"}\n')
    with pytest.raises(fb.ConfigError, match="other.jsonl"):
        ResultStore(tmp_path / "other.jsonl")


# 4. Partial cells are marked; the no-attack row is never the strongest attack.


def test_cells_with_fewer_seeds_are_marked(tmp_path):
    records = [
        _record("lie", "mean", 0, 0.5),
        _record("lie", "mean", 1, 0.6),
        _record("lie", "median", 0, 0.7),  # seed 1 missing
        _record("none", "mean", 0, 0.9),
        _record("none", "mean", 1, 0.9),
        _record("none", "median", 0, 0.8),
        _record("none", "median", 1, 0.8),
    ]
    md = report.summary(records)
    assert md.count("n=1 of 2 seeds") == 2  # the accuracy and the attack-impact cell
    line = next(x for x in md.splitlines() if x.startswith("| lie |"))
    assert "**70.0** (n=1 of 2 seeds)" in line  # bold: the only attack
    assert "55.0 ± 7.1" in line and "55.0 ± 7.1 (n=" not in line
    path = report.write_report(records, tmp_path / "report")
    assert "n=1 of 2" in (tmp_path / "report" / "report.tex").read_text()
    assert "n=1 of 2 seeds" in path.read_text()


def test_the_no_attack_row_is_never_bolded():
    records = [
        _record("none", "median", 0, 0.3),  # no attack, yet the lowest accuracy
        _record("lie", "median", 0, 0.6),
        _record("ipm", "median", 0, 0.5),
    ]
    md = report.summary(records)
    rows = {x.split("|")[1].strip(): x for x in md.splitlines() if x.startswith("| ")}
    assert "**" not in rows["none"] and "**50.0**" in rows["ipm"] and "**" not in rows["lie"]
    rows, cols, stats = next(iter(report.aggregate_table(records, report.Layout(records)).values()))
    tex = report.latex_table(rows, cols, stats)
    assert r"\textbf{50.0}" in tex and r"\textbf{30.0}" not in tex


# 5. A checkpoint belongs to one config and resumes whatever the chunking.

CKPT = dict(TINY, server={"rounds": 6, "eval_every": 1})


def _interrupt(monkeypatch, cfg, ckpt, chunk_periods, after):
    """Runs ``cfg`` and dies after ``after`` checkpoints."""
    saved = run_lib.save_checkpoint
    calls = []

    def save_then_die(*args, **kwargs):
        saved(*args, **kwargs)
        calls.append(1)
        if len(calls) == after:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_lib, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fb.simulate(cfg, progress=False, chunk_periods=chunk_periods, checkpoint=ckpt)
    monkeypatch.setattr(run_lib, "save_checkpoint", saved)
    assert ckpt.exists()


def test_checkpoint_of_another_config_is_refused(tmp_path, monkeypatch):
    ckpt = tmp_path / "c.npz"
    _interrupt(monkeypatch, CKPT, ckpt, chunk_periods=2, after=1)
    other = dict(CKPT, train=dict(CKPT["train"], lr=0.05))
    with pytest.raises(fb.ConfigError) as err:
        fb.simulate(other, progress=False, chunk_periods=2, checkpoint=ckpt)
    msg = str(err.value)
    assert msg.startswith("checkpoint") and str(ckpt) in msg and "another config" in msg
    assert ckpt.exists()  # left for the run it belongs to


def test_checkpoint_without_identity_is_refused(tmp_path):
    ckpt = tmp_path / "old.npz"
    np.savez(ckpt, chunk=1, leaf0=np.zeros(3))
    with pytest.raises(fb.ConfigError, match="checkpoint"):
        fb.simulate(CKPT, progress=False, chunk_periods=2, checkpoint=ckpt)


@pytest.mark.parametrize("before,after,done", [(2, 1, 1), (2, 3, 2), (2, 4, 1)])
def test_checkpoint_resumes_with_another_chunking(tmp_path, monkeypatch, before, after, done):
    whole = fb.simulate(CKPT, progress=False, chunk_periods=before)
    ckpt = tmp_path / "c.npz"
    _interrupt(monkeypatch, CKPT, ckpt, chunk_periods=before, after=done)
    resumed = fb.simulate(CKPT, progress=False, chunk_periods=after, checkpoint=ckpt)
    assert not ckpt.exists()
    for m in ("test_acc", "train_loss", "agg_error"):
        assert len(resumed[m]) == len(whole[m]), m
        np.testing.assert_allclose(resumed[m], whole[m], rtol=1e-6, atol=1e-7)
