"""Plain-numpy, float64 loop transcriptions of the attack formulas (test oracles).

Written from the papers' formulas (see ``docs/attacks.md``), not from the JAX code: loops
over clients, full-matrix distance evaluations inside the searches, no Gram tricks.
``G`` is ``[n, d]``, ``byz`` a boolean ``[n]``; all return the full attacked matrix
unless said otherwise.
"""

from __future__ import annotations

import statistics

import numpy as np


def rows(byz, knowledge="omniscient"):
    return [i for i in range(len(byz)) if (not byz[i]) == (knowledge == "omniscient")]


def mean(G, idx):
    total = np.zeros(G.shape[1])
    for i in idx:
        total += G[i]
    return total / max(len(idx), 1)


def std(G, idx):
    mu = mean(G, idx)
    total = np.zeros(G.shape[1])
    for i in idx:
        total += (G[i] - mu) ** 2
    return np.sqrt(total / max(len(idx) - 1, 1))


def dist(u, v):
    return float(np.sqrt(np.sum((u - v) ** 2)))


def fill(G, byz, vector_for):
    out = np.array(G, dtype=np.float64)
    for i in range(len(byz)):
        if byz[i]:
            out[i] = vector_for(i)
    return out


def baruch_z(n, f):
    s = np.floor(n / 2 + 1) - f
    return statistics.NormalDist().inv_cdf((n - s) / n)


def lie_vector(G, byz, z=None, knowledge="omniscient"):
    idx = rows(byz, knowledge)
    z = baruch_z(len(byz), sum(byz)) if z is None else z
    return mean(G, idx) - z * std(G, idx)


def lie(G, byz, z=None, knowledge="omniscient"):
    m = lie_vector(G, byz, z, knowledge)
    return fill(G, byz, lambda i: m)


def ipm(G, byz, eps=0.1, knowledge="omniscient"):
    m = -eps * mean(G, rows(byz, knowledge))
    return fill(G, byz, lambda i: m)


def largest_feasible(ok, init, rtol=1e-12):
    """Largest x ≥ 0 with ok(x) (feasible set [0, x*]): doubling, then bisection (float64)."""
    lo, hi, x = 0.0, np.inf, init
    for _ in range(3000):
        if ok(x):
            lo = x
        else:
            hi = x
        if np.isfinite(hi) and hi - lo <= rtol * hi:
            break
        if not np.isfinite(hi) and lo > 1e200:
            break
        x = 0.5 * (lo + hi) if np.isfinite(hi) else 2 * x
    return lo


def direction(G, idx, kind):
    mu = mean(G, idx)
    if kind == "std":
        return -std(G, idx)
    if kind == "unit":
        return -mu / np.linalg.norm(mu)
    return -np.sign(mu)


def minmax_gamma(G, byz, kind="std", knowledge="omniscient"):
    idx = rows(byz, knowledge)
    mu, p = mean(G, idx), direction(G, idx, kind)
    bound = max(dist(G[i], G[j]) for i in idx for j in idx)
    return largest_feasible(lambda g: max(dist(mu + g * p, G[i]) for i in idx) <= bound, 10.0)


def minsum_gamma(G, byz, kind="std", knowledge="omniscient"):
    idx = rows(byz, knowledge)
    mu, p = mean(G, idx), direction(G, idx, kind)
    bound = max(sum(dist(G[i], G[j]) ** 2 for j in idx) for i in idx)
    return largest_feasible(lambda g: sum(dist(mu + g * p, G[i]) ** 2 for i in idx) <= bound, 10.0)


def minmax(G, byz, kind="std", knowledge="omniscient"):
    idx = rows(byz, knowledge)
    m = mean(G, idx) + minmax_gamma(G, byz, kind, knowledge) * direction(G, idx, kind)
    return fill(G, byz, lambda i: m)


def minsum(G, byz, kind="std", knowledge="omniscient"):
    idx = rows(byz, knowledge)
    m = mean(G, idx) + minsum_gamma(G, byz, kind, knowledge) * direction(G, idx, kind)
    return fill(G, byz, lambda i: m)


def strike_parts(G, byz):
    """(S, ḡ_S, s, α) of STRIKE Algorithm 1 with S of size n − 2f (Eq. 8)."""
    n, f = len(byz), int(sum(byz))
    H = rows(byz)
    g_bar = mean(G, H)
    g_med = np.median(np.stack([G[i] for i in H]), axis=0)
    u = g_med - g_bar
    u = u / np.linalg.norm(u)
    p = {i: float(np.dot(G[i] - g_bar, u)) for i in H}
    S = sorted(H, key=lambda i: (-p[i], i))[: max(n - 2 * f, 1)]
    g_S = mean(G, S)
    s = np.sign(g_S - g_bar) * std(G, S)
    bound = max(dist(G[i], G[j]) for i in S for j in S)
    alpha = largest_feasible(lambda a: max(dist(g_S + a * s, G[i]) for i in S) <= bound, 1.0)
    return S, g_S, s, alpha


def strike(G, byz, nu=1.0):
    _, g_S, s, alpha = strike_parts(G, byz)
    return fill(G, byz, lambda i: g_S + nu * alpha * s)


def mimic_client(G, byz):
    H = rows(byz)
    X = np.stack([G[i] for i in H]) - mean(G, H)
    z = np.linalg.svd(X, full_matrices=False)[2][0]
    proj = {i: abs(float(np.dot(G[i] - mean(G, H), z))) for i in H}
    return max(H, key=lambda i: proj[i])


def mimic(G, byz):
    j = mimic_client(G, byz)
    return fill(G, byz, lambda i: G[j])


def byzmean(G, byz, target):
    n, f = len(byz), int(sum(byz))
    m1 = f // 2
    B = [i for i in range(n) if byz[i]]
    honest_sum = sum((G[i] for i in rows(byz)), np.zeros(G.shape[1]))
    other = ((n - m1) * target - honest_sum) / max(f - m1, 1)
    return fill(G, byz, lambda i: target if B.index(i) < m1 else other)


def fang_trmean(G, byz, direction_of, u, b=2.0):
    """Fang et al. Sec. 4.3 in update space; ``u[i, j]`` the uniform draw of row i, coord j."""
    H = rows(byz)
    out = np.array(G, dtype=np.float64)
    for j in range(G.shape[1]):
        vals = [G[i, j] for i in H]
        for i in range(len(byz)):
            if not byz[i]:
                continue
            if direction_of[j] > 0:  # below the smallest honest value
                e = min(vals)
                far = b * e if e <= 0 else e / b
            else:  # above the largest honest value
                e = max(vals)
                far = b * e if e > 0 else e / b
            out[i, j] = e + u[i, j] * (far - e)
    return out


def krum_index(U, f):
    """Krum (Blanchard et al.): argmin of the sum of squared distances to the n − f − 2 nearest."""
    n = len(U)
    scores = []
    for i in range(n):
        d = sorted(dist(U[i], U[j]) ** 2 for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return int(np.argmin(scores))


def fang_krum_lambda(G, byz, direction_of, threshold=1e-5):
    n, d, f = G.shape[0], G.shape[1], int(sum(byz))
    H = rows(byz)
    near = []
    for i in H:
        ds = sorted(dist(G[i], G[l]) for l in H if l != i)
        near.append(sum(ds[: n - f - 2]))
    lam = min(near) / ((n - 2 * f - 1) * np.sqrt(d)) + max(
        np.linalg.norm(G[i]) for i in H
    ) / np.sqrt(d)
    s = np.sign(direction_of)
    while lam >= threshold:
        U = fill(G, byz, lambda i, lam=lam: -lam * s)
        if byz[krum_index(U, f)]:
            break
        lam /= 2
    return lam


def trmean(U, f):
    n = len(U)
    S = np.sort(U, axis=0)
    return S[f : n - f].mean(axis=0)
