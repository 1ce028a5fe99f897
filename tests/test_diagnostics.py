"""Skew and robustness measures on synthetic updates with known answers; the pictures."""

import json

import jax
import numpy as np
import pytest

from fedjax_byz import diagnostics as dg


def _two_clusters(h=100, d=30, share=0.8, noise=1e-4, seed=0):
    """``share`` of the rows at A, the rest at B (plus tiny noise)."""
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal(d), rng.standard_normal(d) + 5.0
    at_a = np.arange(h) < share * h
    H = np.where(at_a[:, None], A, B) + noise * rng.standard_normal((h, d))
    return H, A, B, at_a


def test_two_cluster_mixture_skew_mode_and_spread():
    H, A, B, at_a = _two_clusters()
    # 80 % at A: a two-point law with skewness (1 − 2·0.8)/sqrt(0.8·0.2) = −1.5, and the
    # median skewness 3(0.8 − 1)/0.4 = −1.5 as well.
    p = dg.projections(H)
    assert dg.moment_skewness(p) == pytest.approx(-1.5, abs=1e-3)
    assert dg.median_skewness(p) == pytest.approx(-1.5, abs=1e-3)
    assert at_a[dg.densest_point(H)]
    m = dg.round_measures(H, np.zeros(len(H), bool), H.mean(0), np.full(len(H), 0.01))
    # mean = 0.8A + 0.2B: ‖mean − A‖ = 0.2‖B − A‖, spread = 0.4‖B − A‖
    assert m["mode_distance"] == pytest.approx(0.5, abs=1e-3)
    assert m["spread"] == pytest.approx(0.4 * np.linalg.norm(B - A), rel=1e-3)
    assert m["kappa"] == pytest.approx(0.0, abs=1e-12)


def test_symmetric_updates_have_no_skew():
    H = np.random.default_rng(1).standard_normal((400, 20))
    p = dg.projections(H)
    assert abs(dg.moment_skewness(p)) < 0.3 and abs(dg.median_skewness(p)) < 0.3


def test_symmetric_noise_floor_in_high_dimension():
    # u is estimated from the same 50 rows: in d = 2000 the skewness of symmetric rows
    # scatters around 0 by about ±0.3 (the floor REPRODUCTION.md compares against).
    rng = np.random.default_rng(5)
    s = [dg.moment_skewness(dg.projections(rng.standard_normal((50, 2000)))) for _ in range(40)]
    assert abs(np.mean(s)) < 0.15 and 0.15 < np.std(s) < 0.45


def test_kappa_and_kept_fractions():
    rng = np.random.default_rng(2)
    G = rng.standard_normal((10, 8))
    byz = np.arange(10) < 3
    H = G[~byz]
    mean = H.mean(0)
    spread = np.sqrt(np.mean(np.sum((H - mean) ** 2, 1)))
    e = np.eye(8)[0]
    weights = np.where(np.arange(10) < 4, 0.0, 1 / 6)  # drops 3 Byzantine + 1 honest
    m = dg.round_measures(G, byz, mean + 2 * spread * e, weights)
    assert m["kappa"] == pytest.approx(4.0)  # ‖agg − mean‖² / spread² = 2²
    assert m["honest_kept"] == pytest.approx(6 / 7) and m["byzantine_kept"] == 0.0
    nan = dg.round_measures(G, byz, mean, np.full(10, np.nan))
    assert np.isnan(nan["honest_kept"]) and np.isnan(nan["byzantine_kept"])


def test_capture_measures_and_pictures(tmp_path):
    H, *_ = _two_clusters(h=30, noise=0.05)
    byz = np.arange(30) < 6
    caps = {
        "rounds": np.array([3, 7]),
        "updates": np.stack([H, H[::-1]]),
        "byz": np.stack([byz, byz]),
        "aggregate": np.stack([H.mean(0)] * 2),
        "weights": np.full((2, 30), np.nan),
    }
    out = dg.capture_measures(caps)
    assert out["rounds"] == [3, 7] and len(out["kappa"]) == 2
    png = dg.plot_captures(caps, tmp_path / "skew.png", "test")
    assert png.stat().st_size > 10_000
    for method in ("lle", "pca"):
        Z = dg.embed(np.vstack([H, H.mean(0)[None]]), method)
        assert Z.shape == (31, 2) and np.all(np.isfinite(Z))


def test_densest_region_is_the_tight_cluster_in_high_dimension():
    # 40 rows in a tight cluster at A, 10 spread widely: in d = 5000 the single densest
    # update and its neighbours are A's, and the region's centre is A to within noise.
    rng = np.random.default_rng(3)
    A = rng.standard_normal(5000)
    H = np.vstack([A + 0.01 * rng.standard_normal((40, 5000)), rng.standard_normal((10, 5000))])
    region = dg.densest_region(H)
    assert len(region) == 6 and np.all(region < 40)
    assert np.linalg.norm(H[region].mean(0) - A) < 0.01 * np.sqrt(5000)


def test_mode_distance_averages_the_noise_of_the_dense_region():
    # 80 rows at 0 and 20 at B (‖B‖ = 10) with per-row noise of squared norm 10 (40 for
    # B's rows): spread² = 0.16·100 + 0.8·10 + 0.2·40 = 32. The centre of the densest
    # region (11 rows at 0) carries noise 10/11, the mean 0.2·B plus noise 0.16, so the
    # mode distance is sqrt((4 + 10/11 + 0.16) / 32) ≈ 0.398; a single densest row
    # would carry its whole noise, sqrt((4 + 10) / 32) ≈ 0.66.
    rng = np.random.default_rng(0)
    d, h = 4000, 100
    B = np.zeros(d)
    B[0] = 10.0
    at_a = np.arange(h) < 80
    noise = np.where(at_a, 1.0, 2.0)[:, None] * np.sqrt(10 / d) * rng.standard_normal((h, d))
    H = np.where(at_a[:, None], 0.0, B) + noise
    m = dg.round_measures(H, np.zeros(h, bool), H.mean(0), np.ones(h))
    assert m["mode_distance"] == pytest.approx(np.sqrt((4 + 10 / 11 + 0.16) / 32), abs=0.03)


def test_nonfinite_rows_are_not_honest():
    H, A, B, _ = _two_clusters()
    G = H.copy()
    G[5] = np.nan
    m = dg.round_measures(G, np.zeros(len(G), bool), H.mean(0), np.full(len(G), 0.01))
    ref = dg.round_measures(np.delete(H, 5, 0), np.zeros(len(H) - 1, bool), H.mean(0), np.ones(99))
    assert np.isfinite(m["kappa"]) and m["spread"] == pytest.approx(ref["spread"])
    assert m["skew_moment"] == pytest.approx(ref["skew_moment"])


# -- attack impact and selection rates in the report -------------------------------------


def _record(attack, rule, acc, seed=0, beta=0.5, kept=None):
    cfg = {
        "name": "t",
        "seed": seed,
        "data": {"beta": beta},
        "attack": {"name": attack, "num_byzantine": 0 if attack == "none" else 2},
        "aggregator": {"name": rule},
    }
    r = {
        "config": cfg,
        "grid": {"seed": seed, "attack.name": attack, "aggregator.name": rule},
        "best_acc": acc,
    }
    if kept is not None:
        r["diagnostics"] = {"honest_kept": kept[0], "byzantine_kept": kept[1]}
    return r


def test_attack_impact_against_the_matching_baseline():
    from fedjax_byz.sweep import report

    records = [
        _record("none", "mean", 0.90, seed=0),
        _record("none", "mean", 0.80, seed=1),
        _record("lie", "median", 0.60, seed=0),
        _record("lie", "median", 0.70, seed=1),
        _record("none", "median", 0.85, seed=0),
        _record("lie", "median", 0.50, seed=0, beta=0.1),  # no baseline at beta = 0.1
    ]
    impact = report.attack_impact(records)
    assert impact[:5] == pytest.approx([0.0, 0.0, 0.30, 0.10, 0.05])
    assert impact[5] is None
    md = report.summary(records[:5])
    assert "Attack impact" in md
    assert "**20.0 ± 14.1**" in md  # lie vs median: drops 30 and 10 points
    assert "add `none` to the attacks" in report.summary(records[5:])


def test_selection_rates_table():
    from fedjax_byz.sweep import report

    records = [
        _record("lie", "signguard", 0.8, seed=0, kept=([1.0, 0.5], [0.0, 0.5])),
        _record("lie", "signguard", 0.8, seed=1, kept=([1.0, 1.0], [0.0, 0.0])),
        _record("lie", "median", 0.8, kept=([np.nan], [np.nan])),
    ]
    assert report.selection_rates(records[0]) == (0.75, 0.25)
    tables = report.selection_table(records, report.Layout(records))
    (table,) = tables.values()
    assert "| lie | 0.875 / 0.125 |" in table and "median" not in table
    assert "Selection rates" in report.summary(records)


# -- offline κ and selection on fixed update matrices ------------------------------------


def _honest(n=12, d=40, seed=4):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) + 3.0).astype(np.float32)


def test_pair_measures_match_numpy_oracles():
    from fedjax_byz.diagnostics import robustness as rb

    G = _honest()
    byz = np.arange(12) < 3
    H = G[~byz].astype(np.float64)
    mu = H.mean(0)
    spread2 = np.mean(np.sum((H - mu) ** 2, 1))
    key = jax.random.key(0)
    for attack, rule, oracle in (
        ("none", "mean", G.mean(0)),
        ("none", "median", np.median(G, 0)),
        ("zero", "mean", H.sum(0) / 12),
    ):
        m = rb.pair_measures(G, byz, attack, rule, f=3, key=key)
        want = np.sum((oracle - mu) ** 2) / spread2
        assert m["kappa"] == pytest.approx(want, rel=1e-4), (attack, rule)
    # Far outliers: Multi-Krum keeps exactly the n − f honest rows.
    m = rb.pair_measures(G, byz, "gaussian", "multikrum", f=3, key=key, sigma=100.0)
    assert (m["honest_kept"], m["byzantine_kept"]) == (1.0, 0.0)
    assert m["kappa"] == pytest.approx(0.0, abs=1e-8)


def test_uses_rule_finds_the_aggregation_aware_attacks():
    from fedjax_byz.diagnostics import robustness as rb

    assert rb.uses_rule("adaptive-lie") and rb.uses_rule("fang")
    assert not rb.uses_rule("lie") and not rb.uses_rule("strike")


@pytest.mark.parametrize(
    "over, field",
    [
        ({"attack": {"name": "lie", "num_byzantine": 1}}, "attack.name"),
        ({"diagnostics": {"capture_rounds": []}}, "diagnostics.capture_rounds"),
        ({"kappa": {"clients": 6, "f": 1}}, "kappa.f"),
    ],
)
def test_kappa_report_rejects_bad_configs_before_running(tmp_path, over, field):
    import fedjax_byz as fb
    from fedjax_byz.diagnostics import robustness as rb

    from .test_sim import TINY

    cfg = {**TINY, "diagnostics": {"capture_rounds": [2]}, **over}
    with pytest.raises(fb.ConfigError, match=field):
        rb.kappa_report(cfg, out=tmp_path, progress=False, log=None)


def test_kappa_table_sorts_rules_by_worst_case():
    from fedjax_byz.diagnostics import robustness as rb

    rows = [
        {"rule": r, "attack": a, "round": k, "kappa": v + k}
        for r, vals in (("a", (0.1, 9.0)), ("b", (0.2, 1.0)), ("c", (0.0, np.nan)))
        for a, v in zip(("none", "lie"), vals, strict=True)
        for k in (0, 1)
    ]
    lines = rb.kappa_table(rows).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| b", "| a", "| c"]
    assert lines[2] == "| b | 1.5 | lie | 0.7 | 1.5 |"  # means over the two rounds
    assert lines[4].startswith("| c | ∞ | lie |")


def test_kappa_command_on_a_tiny_run(tmp_path, capsys):
    import yaml

    from fedjax_byz import cli

    from .test_sim import TINY

    cfg = dict(
        TINY,
        diagnostics={"capture_rounds": [2, 4]},
        kappa={"clients": 6, "byzantine": 1, "rules": ["mean", "multikrum"]},
    )
    cfg["kappa"]["attacks"] = ["none", "gaussian"]
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["kappa", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    md = (tmp_path / "o" / "kappa.md").read_text()
    assert "| rule | worst κ | worst attack | none | gaussian |" in md
    assert md.index("| multikrum |") < md.index("| mean |")  # mean is the worst
    rows = json.loads((tmp_path / "o" / "kappa.json").read_text())["cells"][0]["rows"]
    assert len(rows) == 2 * 2 * 2
    bad = dict(cfg, attack={"name": "lie", "num_byzantine": 1})
    path.write_text(yaml.safe_dump(bad))
    assert cli.main(["kappa", str(path), "--out", str(tmp_path / "p"), "--quiet"]) == 2
    assert "attack.name" in capsys.readouterr().err
