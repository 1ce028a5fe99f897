"""Gradient-skew and robustness measures of one round's update matrix (numpy, float64).

Notation as in the STRIKE paper (Sec. 4): honest updates ``g_i, i ∈ H``, their mean
``ḡ = μ_H`` (the "optimal gradient") and coordinate-wise median ``g_med``;
``u = g_med − ḡ`` (Eq. 6) and the projections ``p_i = ⟨g_i, u/‖u‖⟩`` (Eq. 7). Under
skew, a dense group of honest updates sits away from ``ḡ`` on the side of the median
(Pearson: mode and median lie on the same side of the mean), so along ``u`` the dense
group has the largest ``p_i`` and the long tail points the other way: the skewness of the
``p_i`` is negative. Because ``u`` is estimated from the same rows, symmetric updates
give skewness around 0 with a spread of about ±0.3 at 50 rows (``tests``); compare with
an IID run rather than with 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def skew_direction(H: np.ndarray) -> np.ndarray:
    """``u = g_med − ḡ`` over the honest rows ``H [h, d]`` (STRIKE Eq. 6). ``-> [d]``."""
    return np.median(H, axis=0) - H.mean(axis=0)


def projections(H: np.ndarray, u: np.ndarray | None = None) -> np.ndarray:
    """``p_i = ⟨g_i, u/‖u‖⟩`` (STRIKE Eq. 7); zeros when ``u = 0``. ``[h, d] -> [h]``."""
    u = skew_direction(H) if u is None else u
    norm = np.linalg.norm(u)
    return H @ (u / norm) if norm > 0 else np.zeros(len(H))


def moment_skewness(p: np.ndarray) -> float:
    """Pearson's moment coefficient ``E[(p − μ)³] / σ³`` (0 for symmetric data)."""
    c = p - p.mean()
    s = np.sqrt(np.mean(c**2))
    return float(np.mean(c**3) / s**3) if s > 0 else 0.0


def median_skewness(p: np.ndarray) -> float:
    """Pearson's second (median) skewness ``3 (μ − median) / σ``."""
    s = p.std()
    return float(3 * (p.mean() - np.median(p)) / s) if s > 0 else 0.0


def _neighbour_distances(H: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distances with ``inf`` on the diagonal. ``[h, d] -> [h, h]``."""
    sq = np.sum(H**2, axis=1)
    D = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * H @ H.T, 0.0))
    np.fill_diagonal(D, np.inf)
    return D


def densest_region(H: np.ndarray, k: int | None = None) -> np.ndarray:
    """Indices of the densest honest region: the update with the smallest mean distance to
    its ``k`` nearest other updates, then those ``k`` (``k = max(1, ⌊0.1 h⌋)``, the
    neighbourhood size of the STRIKE paper's appendix A). ``[h, d] -> int[k + 1]``."""
    k = max(1, len(H) // 10) if k is None else k
    D = _neighbour_distances(H)
    i = int(np.argmin(np.sort(D, axis=1)[:, :k].mean(axis=1)))
    return np.concatenate([[i], np.argsort(D[i], kind="stable")[:k]])


def densest_point(H: np.ndarray, k: int | None = None) -> int:
    """Index of the update at the centre of ``densest_region``."""
    return int(densest_region(H, k)[0])


def round_measures(
    updates: np.ndarray, byz: np.ndarray, aggregate: np.ndarray, weights: np.ndarray
) -> dict[str, float]:
    """Every measure of one captured round.

    Honest rows are the rows outside ``byz`` that are finite (the server drops
    non-finite rows, as the simulator's ``agg_error`` does).

    Args:
      updates: ``[m, d]`` rows the rule received (Byzantine rows already attacked).
      byz: ``bool[m]`` Byzantine mask.
      aggregate: ``[d]`` the rule's output.
      weights: ``[m]`` the rule's weights (NaN for coordinate-wise rules).

    Returns:
      ``skew_moment``, ``skew_median`` of the honest projections ``p_i``;
      ``mode_distance``: ``‖ḡ − c‖ / spread`` with ``c`` the centre (mean) of the densest
      honest region (``densest_region``), how far the mean sits from the dense group
      (exactly the cluster offset for tight clusters; about ``1/sqrt(k + 1)`` for
      isotropic noise in high dimension, the noise of a k + 1-point mean);
      ``agg_error``: ‖aggregate − ḡ‖; ``spread``: the honest spread
      ``sqrt((1/|H|) Σ_H ‖g_i − ḡ‖²)``; ``kappa``: the empirical κ of (f, κ)-robustness
      (Allouah et al. 2023; STRIKE Definition 1), ``‖aggregate − ḡ‖² / spread²``;
      ``honest_kept``, ``byzantine_kept``: the fractions of honest and Byzantine rows the
      rule gave positive weight (SignGuard's Table II; NaN for coordinate-wise rules).
    """
    G = np.asarray(updates, np.float64)
    byz = np.asarray(byz, bool)
    honest = ~byz & np.all(np.isfinite(G), axis=1)
    H = G[honest]
    mean = H.mean(axis=0)
    p = projections(H)
    spread2 = float(np.mean(np.sum((H - mean) ** 2, axis=1)))
    err2 = float(np.sum((np.asarray(aggregate, np.float64) - mean) ** 2))
    w = np.asarray(weights, np.float64)
    has_w = bool(np.all(np.isfinite(w)))
    kept = w > 0
    spread = np.sqrt(spread2)
    centre = H[densest_region(H)].mean(axis=0)
    return {
        "skew_moment": moment_skewness(p),
        "skew_median": median_skewness(p),
        "mode_distance": float(np.linalg.norm(mean - centre) / spread) if spread > 0 else 0.0,
        "agg_error": float(np.sqrt(err2)),
        "spread": float(spread),
        "kappa": err2 / spread2 if spread2 > 0 else float("nan"),
        "honest_kept": float(kept[~byz].mean()) if has_w else float("nan"),
        "byzantine_kept": float(kept[byz].mean()) if has_w and byz.any() else float("nan"),
    }


def capture_measures(captures: dict[str, Any]) -> dict[str, list[float]]:
    """``round_measures`` of every captured round, as lists aligned with ``rounds``."""
    rows = [
        round_measures(
            captures["updates"][k],
            captures["byz"][k],
            captures["aggregate"][k],
            captures["weights"][k],
        )
        for k in range(len(captures["rounds"]))
    ]
    out = {"rounds": [int(r) for r in captures["rounds"]]}
    for name in rows[0] if rows else ():
        out[name] = [r[name] for r in rows]
    return out
