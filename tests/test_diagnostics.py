"""Skew and robustness measures on synthetic updates with known answers; the pictures."""

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
