"""The command line: list, run (single and grid), and one-sentence errors."""

import json

import pytest
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


@pytest.mark.parametrize(
    "text,over,expect",
    [
        ("train: {lr: 1e-2}\n", [], None),  # YAML 1.1 reads 1e-2 as a string: not here
        ("", ["train.lr=5e-3"], None),
        ("data: {source: digits\n", [], "error: config "),
        ("", ["attack.name=[lie"], "error: --set attack.name: not valid YAML"),
        ("", ["model.hidden.x=1"], "error: model.hidden.x: model.hidden holds"),
        ("extends: bad.yaml\n", [], "error: extends: the chain of configs loops"),
    ],
)
def test_config_syntax_errors_are_one_sentence(tmp_path, capsys, text, over, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(TINY) + text)
    args = ["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]
    code = cli.main([*args, *(a for o in over for a in ("--set", o))])
    err = capsys.readouterr().err.strip()
    if expect is None:
        assert code == 0, err
        lr = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]
        assert isinstance(lr["config"]["train"]["lr"], float)
    else:
        assert code == 2 and err.startswith(expect) and "\n" not in err, err


def test_out_must_be_a_folder_and_set_name_names_it(tmp_path, capsys, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY))
    (tmp_path / "file").write_text("")
    assert cli.main(["run", str(path), "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.startswith("error: --out:")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", str(path), "--quiet", "--set", "name=renamed"]) == 0
    assert (tmp_path / "runs" / "renamed" / "results.json").exists()


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
    args = ["skew", str(path), "--out", str(out), "--quiet", "--rounds", "2"]
    assert cli.main([*args, "--set", "train.clip_norm=null"]) == 0  # null stays null
    text = capsys.readouterr().out
    assert "skew (moment)" in text and "lie / multikrum" in text
    assert len(list((out / "skew").glob("*.png"))) == 1
    assert (out / "skew" / "measures.md").read_text().count("lie / multikrum") == 2
