"""Every experiment file (and each of its profiles) expands to valid configs."""

from pathlib import Path

import pytest
import yaml

from fedjax_byz import sim
from fedjax_byz.sweep import grid

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))


def _profiles(path):
    raw = yaml.safe_load(path.read_text()) or {}
    names = set(raw.get("profiles") or {})
    parent = raw.get("extends")
    while parent:
        parent_raw = yaml.safe_load((path.parent / parent).read_text())
        names |= set(parent_raw.get("profiles") or {})
        parent = parent_raw.get("extends")
    return [None, *sorted(names)]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_files_are_valid_grids(path):
    for profile in _profiles(path):
        raw, opts = grid.split_options(sim.load_yaml(path, profile))
        cells = grid.expand_cells(raw, opts["vmap"])
        assert cells, (path, profile)
        assert len({c.key for c in cells}) == len(cells)  # no duplicate cells


def test_cpu_profiles_exist_for_paper_experiments():
    for path in EXPERIMENTS:
        if path.stem.split("_")[0] in ("strike", "signguard", "stress"):
            assert "cpu" in _profiles(path), path.name
