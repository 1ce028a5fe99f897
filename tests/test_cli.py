"""The command line: list, run (single and grid), and one-sentence errors."""

import json

import yaml

from fedjax_byz import cli

from .test_sim import TINY


def test_list_prints_every_registry(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for word in (
        "attacks:",
        "aggregators:",
        "datasets:",
        "partitioners:",
        "models:",
        "lie",
        "trmean",
        "dirichlet",
        "imagefolder",
        "resnet18",
    ):
        assert word in out


def test_run_grid_writes_results_table_and_plot(tmp_path, capsys):
    cfg = dict(
        TINY,
        attack=[{"name": "none", "num_byzantine": 1}, {"name": "bitflip", "num_byzantine": 1}],
        aggregator={"name": ["mean", "median"]},
    )
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out_dir = tmp_path / "out"
    assert (
        cli.main(
            [
                "run",
                str(path),
                "--out",
                str(out_dir),
                "--quiet",
                "--set",
                "server.rounds=2",
                "--set",
                "server.eval_every=1",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "attack \\ defense" in text and "median" in text
    results = json.loads((out_dir / "results.json").read_text())
    assert len(results["runs"]) == 4
    assert all(len(r["test_acc"]) == 2 for r in results["runs"])
    assert (out_dir / "accuracy.png").stat().st_size > 1000


def test_run_bad_config_is_one_sentence(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, attack={"name": "lei", "num_byzantine": 1})))
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: attack.name: unknown attack 'lei'") and "\n" not in err


def test_profiles_overlay(tmp_path):
    from fedjax_byz import sim

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, profiles={"cpu": {"server": {"rounds": 2}}})))
    assert sim.load_yaml(path, "cpu")["server"] == {"rounds": 2, "eval_every": 2}
    assert sim.load_yaml(path)["server"]["rounds"] == 4


def test_skew_command_draws_and_measures(tmp_path, capsys):
    path = tmp_path / "skew.yaml"
    path.write_text(
        yaml.safe_dump(
            dict(TINY, attack={"name": "lie", "num_byzantine": 1}, aggregator={"name": "multikrum"})
        )
    )
    out = tmp_path / "out"
    assert cli.main(["skew", str(path), "--out", str(out), "--quiet", "--rounds", "2"]) == 0
    text = capsys.readouterr().out
    assert "skew (moment)" in text and "lie / multikrum" in text
    assert len(list((out / "skew").glob("*.png"))) == 1
    assert (out / "skew" / "measures.md").read_text().count("lie / multikrum") == 2
