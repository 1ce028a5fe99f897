"""Agreement: fedjax_byz rules and attacks against ByzFL's and ByzPy's, number for number.

Every rule and attack that ByzFL (``byzfl``) or ByzPy (``byzpy``) also implements is run
on the same float32 inputs on both sides: skewed random updates (a dense off-centre
cluster of honest rows, heavy-tailed Student-t rows and f far rows, in random order)
and the same updates rounded to a coarse grid, where exact ties occur, at several small
(n, d, f). For each (fedjax_byz spec, reference constructor) pair in ``RULES`` and
``ATTACKS`` the script records the largest absolute difference and the largest
difference relative to the norm of the reference's output over all cases, and the
verdict: ``agrees`` when every case is within ``TOL`` (float32 round-off), else
``differs``. Where the two sides only name the same thing differently (the sign of
ALIE's z, ByzPy's ``EmpireAttack(scale=-eps)``, Krum's neighbour count), the parameters
are mapped so that the same thing is compared, and the table says how; each pair's
``why`` says, from reading both sources, what differs when they do. Random attacks are
compared in distribution (two-sample Kolmogorov-Smirnov test over all cases pooled).

Run in the benchmark environment (jax + torch + byzfl + byzpy + this package):

    /work/venv-bench/bin/python benchmarks/agreement.py

Writes ``benchmarks/results/agreement.md`` (generated; do not edit by hand).
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from byzfl import attacks as bfa
from byzfl.aggregators import aggregators as bf
from byzfl.aggregators import preaggregators as bfp
from byzpy.aggregators.coordinate_wise.mean_of_medians import MeanOfMedians
from byzpy.aggregators.coordinate_wise.median import CoordinateWiseMedian
from byzpy.aggregators.coordinate_wise.trimmed_mean import CoordinateWiseTrimmedMean
from byzpy.aggregators.geometric_wise.geometric_median import GeometricMedian
from byzpy.aggregators.geometric_wise.krum import Krum, MultiKrum
from byzpy.aggregators.geometric_wise.minimum_diameter_average import (
    MinimumDiameterAveraging,
)
from byzpy.aggregators.geometric_wise.monna import MoNNA
from byzpy.aggregators.geometric_wise.smea import SMEA
from byzpy.aggregators.norm_wise.caf import CAF
from byzpy.aggregators.norm_wise.center_clipping import CenteredClipping
from byzpy.aggregators.norm_wise.comparative_gradient_elimination import (
    ComparativeGradientElimination,
)
from byzpy.attacks.empire import EmpireAttack
from byzpy.attacks.gaussian import GaussianAttack
from byzpy.attacks.inf import InfAttack
from byzpy.attacks.little import LittleAttack
from byzpy.attacks.mimic import MimicAttack
from byzpy.attacks.sign_flip import SignFlipAttack
from byzpy.pre_aggregators.arc import ARC
from byzpy.pre_aggregators.bucketing import Bucketing
from byzpy.pre_aggregators.clipping import Clipping
from byzpy.pre_aggregators.nnm import NearestNeighborMixing
from machine import version
from scipy import stats

import fedjax_byz as fb
from fedjax_byz.aggregators import AggregatorContext, pre

COMMAND = "/work/venv-bench/bin/python benchmarks/agreement.py"
TOL = 1e-5  # max |ours - ref| / ||ref||: float32 round-off, several steps deep
SHAPES = [(7, 5), (10, 100), (25, 1000)]  # (n, d); two f each, two seeds, two kinds
SEEDS = (0, 1)
KINDS = ("skewed", "grid")
KS_P = 1e-3  # random attacks agree unless the KS test rejects at this level


class Case(NamedTuple):
    idx: int  # seeds the random attacks on both sides
    n: int
    d: int
    f: int
    seed: int
    kind: str  # "skewed" or "grid" (values on a 0.25 / sqrt(d) grid: exact ties)
    G: np.ndarray  # f32[n, d]
    byz: np.ndarray  # bool[n], for the attacks


class Pair(NamedTuple):
    """One comparison: our registry name and parameters against a reference call.

    ``params(case)`` gives our keywords (a key ``"f"`` overrides the assumed f);
    ``ref(case)`` runs the reference and returns its output ([d], or [f, d] for an
    attack whose Byzantine rows differ). ``note``: how the two are set up to compute the
    same thing; ``why``: what makes them differ, from reading both sources (written as
    the cause when the pair differs, as a possible difference when it agrees).
    ``max_n``: cases with more rows are skipped (exact subset searches). ``random``:
    compare in distribution.
    """

    ours: str
    params: Callable[[Case], dict]
    ours_label: str
    ref_label: str
    ref: Callable[[Case], Any]
    note: str = ""
    why: str = ""
    max_n: int = 1000
    random: bool = False


def updates(n: int, d: int, f: int, seed: int, kind: str) -> np.ndarray:
    """Skewed updates: 60% of the honest rows in a dense cluster off the common
    component, the rest Student-t (3 dof), f rows far away; rows shuffled, scaled so a
    typical row norm is about 1 whatever d (so clipping radii of 1 bite)."""
    rng = np.random.default_rng([seed, n, d, f])
    h = n - f
    k = 3 * h // 5
    base = rng.standard_normal(d)
    G = np.empty((n, d))
    G[:k] = base + 1.0 + 0.1 * rng.standard_normal((k, d))
    G[k:h] = base + rng.standard_t(3, size=(h - k, d))
    G[h:] = base + 3.0 + 5.0 * rng.standard_normal((f, d))
    G = G[rng.permutation(n)] / math.sqrt(d)
    if kind == "grid":
        step = 0.25 / math.sqrt(d)
        G = np.round(G / step) * step
    return G.astype(np.float32)


def cases() -> list[Case]:
    out = []
    for n, d in SHAPES:
        for f in (1, (n - 1) // 3):
            for seed in SEEDS:
                for kind in KINDS:
                    byz = np.random.default_rng([seed, n, f]).permutation(n) < f
                    G = updates(n, d, f, seed, kind)
                    out.append(Case(len(out), n, d, f, seed, kind, G, byz))
    return out


# ---------------------------------------------------------------- reference plumbing


def T(G: np.ndarray) -> torch.Tensor:
    """A fresh torch copy: ByzFL's ARC and Clipping write into their input."""
    return torch.from_numpy(np.array(G, copy=True))


def numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def byzfl(make, pre_make=None):
    """``make(case)`` builds a ByzFL aggregator, called on the [n, d] tensor."""

    def run(c):
        X = T(c.G)
        if pre_make is not None:
            X = pre_make(c)(X)
        return make(c)(X)

    return run


def byzpy(make, pre_make=None):
    """``make(case)`` builds a ByzPy aggregator, called on the list of rows."""

    def run(c):
        xs = list(T(c.G))
        if pre_make is not None:
            xs = pre_make(c).pre_aggregate(xs)
        return make(c).aggregate(xs)

    return run


def seeded(run):
    """Seeds torch's global RNG with the case index first: ByzFL's CAF and SMEA start
    their power iteration from ``torch.randn``, its Gaussian attack draws from it."""

    def call(c):
        torch.manual_seed(c.idx)
        return run(c)

    return call


def translated(run):
    """The reference on ``G - mean(G)``, shifted back: a zero start becomes the mean."""

    def call(c):
        mu = c.G.mean(axis=0, dtype=np.float64).astype(np.float32)
        return numpy(run(c._replace(G=c.G - mu))) + mu

    return call


def our_buckets(c: Case, s: int = 2) -> np.ndarray:
    """Our bucketing's order of the rows in ``fb.aggregate("bucketing+...", G, f=f)``:
    stage 0 of a composite draws with ``fold_in(key, 0)``, the key being
    ``jax.random.key(0)`` by default. Read off the pre-aggregator's mixing matrix."""
    ctx = AggregatorContext.create(c.f, jax.random.fold_in(jax.random.key(0), 0))
    _, _, M = pre.bucketing(s).update(jnp.asarray(c.G), (), ctx)
    return np.concatenate([np.flatnonzero(row) for row in np.asarray(M)])


def byzfl_bucketed(make, s: int = 2):
    """ByzFL ``Bucketing(s)`` then ``make(case)``, with our permutation: ByzFL shuffles
    with ``torch.randperm``; its draw ``p`` under a fixed seed is known, so the rows are
    handed over in the order ``q`` with ``q[p] = π``, and ByzFL's shuffle yields ``G[π]``."""

    def run(c):
        torch.manual_seed(0)
        p = torch.randperm(c.n).numpy()
        q = np.empty(c.n, int)
        q[p] = our_buckets(c, s)
        torch.manual_seed(0)
        return make(c)(bfp.Bucketing(s)(T(c.G[q])))

    return run


def byzpy_bucketed(make, s: int = 2):
    """ByzPy ``Bucketing(s, perm=π)`` (it takes a permutation) then ``make(case)``."""

    def run(c):
        xs = Bucketing(s, perm=our_buckets(c, s).tolist()).pre_aggregate(list(T(c.G)))
        return make(c).aggregate(xs)

    return run


def honest(c: Case) -> torch.Tensor:
    return T(c.G[~c.byz])


def z_max(n: int, f: int) -> float:
    """Baruch et al.'s z_max, as the issue and ByzPy write it: s = max(⌊n/2 + 1⌋ − f, 1),
    z = Φ⁻¹((n − s)/n)."""
    s = max(n // 2 + 1 - f, 1)
    return statistics.NormalDist().inv_cdf((n - s) / n)


def byzpy_attack(make):
    return lambda c: make(c).apply(honest_grads=list(honest(c)))


# ---------------------------------------------------------------- the pairs


def P(**kw) -> Callable[[Case], dict]:
    return lambda c: dict(kw)


KRUM_WHY = (
    "ByzFL and ByzPy score a row by its n − f − 1 nearest other rows (`sort(D)[:, 1:n−f]`, "
    "column 0 being the row itself), ours by n − f − 2, Blanchard et al.'s count (NeurIPS "
    "2017: i → j over the n − f − 2 closest vectors), so another row can win"
)
MEDIAN_LOW = (
    "for even n ByzPy's torch backend takes `torch.median`, the lower of the two middle "
    "values; ours (as numpy and ByzFL's `torch.quantile(q=0.5)`) their mean"
)


def ties(ref: str) -> str:
    return (
        f"on an exact tie in distance ours keeps the lowest index, {ref} what `torch.topk` returns"
    )


BYZPY_GEOMED = dict(init="mean", max_iter=8, eps=1e-6, tol=1e-30)
BYZPY_GEOMED_LABEL = "GeometricMedian(init='mean', max_iter=8, eps=1e-6, tol=1e-30)"

RULES = [
    Pair("mean", P(), "mean", "ByzFL Average()", byzfl(lambda c: bf.Average())),
    Pair("median", P(), "median", "ByzFL Median()", byzfl(lambda c: bf.Median())),
    Pair(
        "median",
        P(),
        "median",
        "ByzPy CoordinateWiseMedian()",
        byzpy(lambda c: CoordinateWiseMedian()),
        why=MEDIAN_LOW + " (n = 10 here)",
    ),
    Pair("trmean", P(), "trmean", "ByzFL TrMean(f)", byzfl(lambda c: bf.TrMean(c.f))),
    Pair(
        "trmean",
        P(),
        "trmean",
        "ByzPy CoordinateWiseTrimmedMean(f)",
        byzpy(lambda c: CoordinateWiseTrimmedMean(c.f)),
    ),
    Pair(
        "meamed",
        P(),
        "meamed",
        "ByzFL Meamed(f)",
        byzfl(lambda c: bf.Meamed(c.f)),
        why="ties: where the (n − f)-th and (n − f + 1)-th smallest distances to the "
        "median are equal (x = med ± δ), ours keeps the smaller value, ByzFL whichever "
        "`torch.topk` returns; the paper's rule leaves such ties open",
    ),
    Pair(
        "meamed",
        P(),
        "meamed",
        "ByzPy MeanOfMedians(f)",
        byzpy(lambda c: MeanOfMedians(c.f)),
        why="the centre: " + MEDIAN_LOW + "; and ties in the distance to the median, as with ByzFL",
    ),
    Pair("krum", P(), "krum", "ByzFL Krum(f)", byzfl(lambda c: bf.Krum(c.f)), why=KRUM_WHY),
    Pair(
        "krum",
        lambda c: {"f": c.f - 1},
        "krum, f − 1 (mapped)",
        "ByzFL Krum(f)",
        byzfl(lambda c: bf.Krum(c.f)),
        note="our f − 1 scores by n − f − 1 neighbours, ByzFL's count (Krum uses f for "
        "nothing else): the neighbour count is the whole difference",
    ),
    Pair("krum", P(), "krum", "ByzPy Krum(f)", byzpy(lambda c: Krum(c.f)), why=KRUM_WHY),
    Pair(
        "krum",
        lambda c: {"f": c.f - 1},
        "krum, f − 1 (mapped)",
        "ByzPy Krum(f)",
        byzpy(lambda c: Krum(c.f)),
        note="as for ByzFL",
    ),
    Pair(
        "multikrum",
        P(),
        "multikrum",
        "ByzFL MultiKrum(f)",
        byzfl(lambda c: bf.MultiKrum(c.f)),
        note="both average the n − f best-scored rows; no mapping (f sets both counts)",
        why=KRUM_WHY,
    ),
    Pair(
        "multikrum",
        P(),
        "multikrum",
        "ByzPy MultiKrum(f, q=n−f)",
        byzpy(lambda c: MultiKrum(c.f, c.n - c.f)),
        note="q = n − f rows averaged, as ours; no mapping (ByzPy refuses q > n − f)",
        why=KRUM_WHY,
    ),
    Pair(
        "geomed",
        P(),
        "geomed (defaults: iters=8, nu=1e-6)",
        "ByzFL GeometricMedian() (defaults: nu=0.1, T=3)",
        byzfl(lambda c: bf.GeometricMedian()),
        why="defaults (ours T = 8, STRIKE Table 4, ν = 1e-6, RFA; ByzFL T = 3, ν = 0.1) and "
        "the starting point (next row)",
    ),
    Pair(
        "geomed",
        P(iters=8, nu=1e-6),
        "geomed(iters=8, nu=1e-6)",
        "ByzFL GeometricMedian(nu=1e-6, T=8)",
        byzfl(lambda c: bf.GeometricMedian(nu=1e-6, T=8)),
        why="the starting point: ByzFL's Weiszfeld starts from z = 0 (`zeros_like`), ours "
        "from the mean ḡ; 8 steps do not converge, so the iterates differ",
    ),
    Pair(
        "geomed",
        P(iters=8, nu=1e-6),
        "geomed(iters=8, nu=1e-6)",
        "ByzFL GeometricMedian(nu=1e-6, T=8) on G − ḡ, plus ḡ",
        translated(byzfl(lambda c: bf.GeometricMedian(nu=1e-6, T=8))),
        note="equal starts by construction: Weiszfeld is translation-equivariant, so ByzFL "
        "run on the centred rows starts from the mean, as ours",
    ),
    Pair(
        "geomed",
        P(),
        "geomed (defaults: iters=8, nu=1e-6)",
        "ByzPy GeometricMedian() (defaults: init='median', max_iter=256, tol=1e-6)",
        byzpy(lambda c: GeometricMedian()),
        why="defaults: ByzPy starts from the coordinate-wise median and iterates to "
        "convergence (step < 1e-6), ours stops after 8 steps from the mean",
    ),
    Pair(
        "geomed",
        P(iters=8, nu=1e-6),
        "geomed(iters=8, nu=1e-6)",
        "ByzPy " + BYZPY_GEOMED_LABEL,
        byzpy(lambda c: GeometricMedian(**BYZPY_GEOMED)),
        note="ByzPy's clamp `eps` is our ν; tol = 1e-30 keeps it from stopping early",
    ),
    Pair(
        "cclip",
        P(tau=1.0, iters=1),
        "cclip(tau=1, iters=1)",
        "ByzFL CenteredClipping(L=1, tau=1.0)",
        byzfl(lambda c: bf.CenteredClipping(L=1, tau=1.0)),
        note="both start from v = 0 (ours: the stateless first round; ByzFL: `m=None`); "
        "τ = 1 clips at this data's scale (defaults: ours 10, ByzFL 100)",
    ),
    Pair(
        "cclip",
        P(tau=1.0, iters=3),
        "cclip(tau=1, iters=3)",
        "ByzFL CenteredClipping(L=3, tau=1.0)",
        byzfl(lambda c: bf.CenteredClipping(L=3, tau=1.0)),
        note="as above; our L > 1 runs on the Gram matrix",
    ),
    Pair(
        "cclip",
        P(tau=1.0, iters=3),
        "cclip(tau=1, iters=3)",
        "ByzPy CenteredClipping(c_tau=1, M=3, init='zero')",
        byzpy(lambda c: CenteredClipping(c_tau=1.0, M=3, init="zero")),
        note="ByzPy starts from the mean unless `init='zero'`, our first round",
    ),
    Pair(
        "monna", P(), "monna", "ByzFL MoNNA(f)", byzfl(lambda c: bf.MoNNA(c.f)), why=ties("ByzFL")
    ),
    Pair("monna", P(), "monna", "ByzPy MoNNA(f)", byzpy(lambda c: MoNNA(c.f)), why=ties("ByzPy")),
    Pair(
        "cge",
        P(),
        "cge",
        "ByzPy ComparativeGradientElimination(f)",
        byzpy(lambda c: ComparativeGradientElimination(c.f)),
        why="on an exact tie in norm ours keeps the lowest index, ByzPy what `argsort` returns",
    ),
    Pair(
        "caf",
        P(),
        "caf",
        "ByzFL CAF(f) (torch seeded)",
        seeded(byzfl(lambda c: bf.CAF(c.f))),
        why="ByzFL estimates the top eigenpair by one power-iteration step from a random "
        "vector (`max_iters=1`; λ = ‖Σ_c v‖ after that step), so its filter weights and the "
        "λ it minimises are approximate and change with the seed; ours are exact (`eigh` "
        "of the weighted n × n Gram matrix)",
    ),
    Pair(
        "caf",
        P(),
        "caf",
        "ByzPy CAF(f, power_iters=1000)",
        byzpy(lambda c: CAF(c.f, power_iters=1000)),
        note="ByzPy's seeded power iteration (default 3 steps) run to convergence",
    ),
    Pair(
        "mda",
        P(),
        "mda",
        "ByzFL MDA(f)",
        byzfl(lambda c: bf.MDA(c.f)),
        why="on an exact tie in diameter ByzFL keeps the first subset in `combinations` "
        "order, ours the smallest bitmask",
        max_n=10,
    ),
    Pair(
        "mda",
        P(),
        "mda",
        "ByzPy MinimumDiameterAveraging(f)",
        byzpy(lambda c: MinimumDiameterAveraging(c.f)),
        why="on an exact tie in diameter, the first minimal subset ByzPy's seeded "
        "depth-first search meets",
        max_n=10,
    ),
    Pair(
        "smea",
        P(),
        "smea",
        "ByzFL SMEA(f) (torch seeded)",
        seeded(byzfl(lambda c: bf.SMEA(c.f))),
        why="ByzFL scores each subset by one power-iteration step from a fresh random "
        "vector (an underestimate of λ_max, by a different amount for every subset), so it "
        "can pick another subset; ours is exact (`eigvalsh`), as the paper's argmin asks",
        max_n=10,
    ),
    Pair(
        "smea",
        P(),
        "smea",
        "ByzPy SMEA(f)",
        byzpy(lambda c: SMEA(c.f)),
        note="both exact (`eigvalsh` of the centred sub-Gram matrix)",
        max_n=10,
    ),
    Pair(
        "nnm+median",
        P(),
        "nnm+median",
        "ByzFL NNM(f) → Median()",
        byzfl(lambda c: bf.Median(), lambda c: bfp.NNM(c.f)),
        why=ties("ByzFL"),
    ),
    Pair(
        "nnm+trmean",
        P(),
        "nnm+trmean",
        "ByzFL NNM(f) → TrMean(f)",
        byzfl(lambda c: bf.TrMean(c.f), lambda c: bfp.NNM(c.f)),
        why=ties("ByzFL"),
    ),
    Pair(
        "nnm+trmean",
        P(),
        "nnm+trmean",
        "ByzPy NearestNeighborMixing(f) → CoordinateWiseTrimmedMean(f)",
        byzpy(lambda c: CoordinateWiseTrimmedMean(c.f), lambda c: NearestNeighborMixing(c.f)),
        why=ties("ByzPy"),
    ),
    Pair(
        "arc+trmean",
        P(),
        "arc+trmean",
        "ByzFL ARC(f) → TrMean(f)",
        byzfl(lambda c: bf.TrMean(c.f), lambda c: bfp.ARC(c.f)),
    ),
    Pair(
        "arc+trmean",
        P(),
        "arc+trmean",
        "ByzPy ARC(f) → CoordinateWiseTrimmedMean(f)",
        byzpy(lambda c: CoordinateWiseTrimmedMean(c.f), lambda c: ARC(c.f)),
    ),
    Pair(
        "clip+mean",
        P(c=1.0),
        "clip(c=1)+mean",
        "ByzFL Clipping(c=1.0) → Average()",
        byzfl(lambda c: bf.Average(), lambda c: bfp.Clipping(1.0)),
    ),
    Pair(
        "clip+mean",
        P(c=1.0),
        "clip(c=1)+mean",
        "ByzPy Clipping(threshold=1) → mean",
        lambda c: torch.stack(Clipping(1.0).pre_aggregate(list(T(c.G)))).mean(0),
    ),
    Pair(
        "bucketing+median",
        lambda c: {"s": 2, "f": 0},
        "bucketing(s=2)+median",
        "ByzFL Bucketing(2) → Median(), with our permutation",
        byzfl_bucketed(lambda c: bf.Median()),
        note="ByzFL's seeded shuffle turned into ours (`byzfl_bucketed`); the median uses "
        "no f, so f = 0 is passed (our check refuses f ≥ m/2 for the m = ⌈n/2⌉ buckets)",
    ),
    Pair(
        "bucketing+geomed",
        P(s=2, iters=8, nu=1e-6),
        "bucketing(s=2)+geomed(iters=8, nu=1e-6)",
        "ByzPy Bucketing(2, perm=π) → " + BYZPY_GEOMED_LABEL,
        byzpy_bucketed(lambda c: GeometricMedian(**BYZPY_GEOMED)),
        note="π is our permutation, passed to ByzPy's `perm`",
    ),
]

ATTACKS = [
    Pair(
        "bitflip",
        P(),
        "bitflip",
        "ByzPy SignFlipAttack(scale=-1), base_grad = each Byzantine row",
        lambda c: torch.stack([SignFlipAttack(-1.0).apply(base_grad=g) for g in T(c.G[c.byz])]),
        note="both send −g_i, the client's own update",
    ),
    Pair(
        "ipm",
        P(eps=1.0),
        "ipm(eps=1) (mapped)",
        "ByzFL SignFlipping()",
        lambda c: bfa.SignFlipping()(honest(c)),
        note="ByzFL's sign flipping sends −μ_H, IPM with ε = 1 (our `bitflip` sends −g_i)",
    ),
    Pair(
        "ipm",
        P(eps=2.0),
        "ipm(eps=2)",
        "ByzFL InnerProductManipulation(tau=2.0)",
        lambda c: bfa.InnerProductManipulation(2.0)(honest(c)),
        note="ByzFL's τ is our ε (defaults: ByzFL 2, ours 0.1 as Xie et al.)",
    ),
    Pair(
        "ipm",
        P(eps=0.1),
        "ipm(eps=0.1) (mapped)",
        "ByzPy EmpireAttack(scale=-0.1)",
        byzpy_attack(lambda c: EmpireAttack(scale=-0.1)),
        note="ByzPy sends scale·μ_H: scale = −ε",
    ),
    Pair(
        "lie",
        P(z=-1.5),
        "lie(z=-1.5) (mapped)",
        "ByzFL ALittleIsEnough(tau=1.5)",
        lambda c: bfa.ALittleIsEnough(1.5)(honest(c)),
        note="ByzFL sends μ + τσ, ours μ − zσ (SignGuard Eq. 1, STRIKE App. D.1): z = −τ; "
        "both σ with ddof = 1",
    ),
    Pair(
        "lie",
        P(),
        "lie (default z = z_max) (mapped)",
        "ByzFL ALittleIsEnough(tau=−z_max(n, f))",
        lambda c: bfa.ALittleIsEnough(-z_max(c.n, c.f))(honest(c)),
        note="checks our default z against z_max = Φ⁻¹((n − s)/n), s = max(⌊n/2+1⌋ − f, 1) "
        "(Baruch et al.), computed here with `statistics.NormalDist`",
    ),
    Pair(
        "lie",
        lambda c: {"z": -z_max(c.n, c.f) * math.sqrt((c.n - c.f - 1) / (c.n - c.f))},
        "lie(z = −z_max·√((h−1)/h)) (mapped)",
        "ByzPy LittleAttack(f)",
        byzpy_attack(lambda c: LittleAttack(c.f)),
        note="ByzPy sends μ + z_max·σ with its own z_max and σ of ddof = 0 (ours and "
        "ByzFL: ddof = 1); the sign and √((h−1)/h), h = n − f, map one onto the other",
    ),
    Pair(
        "mimic",
        lambda c: {"client": int(np.flatnonzero(~c.byz)[1])},
        "mimic(client = 2nd honest row)",
        "ByzFL Mimic(epsilon=1)",
        lambda c: bfa.Mimic(1)(honest(c)),
        note="ByzFL's ε indexes the honest rows, our `client` all rows",
    ),
    Pair(
        "mimic",
        lambda c: {"client": int(np.flatnonzero(~c.byz)[1])},
        "mimic(client = 2nd honest row)",
        "ByzPy MimicAttack(epsilon=1)",
        byzpy_attack(lambda c: MimicAttack(1)),
        note="as for ByzFL",
    ),
    Pair("inf", P(), "inf", "ByzFL Inf()", lambda c: bfa.Inf()(honest(c))),
    Pair("inf", P(), "inf", "ByzPy InfAttack()", byzpy_attack(lambda c: InfAttack())),
    Pair(
        "gaussian",
        P(sigma=0.5),
        "gaussian(sigma=0.5)",
        "ByzFL Gaussian(mu=0.0, sigma=0.5), f draws",
        seeded(lambda c: torch.stack([bfa.Gaussian(0.0, 0.5)(honest(c)) for _ in range(c.f)])),
        random=True,
    ),
    Pair(
        "gaussian",
        P(sigma=0.5),
        "gaussian(sigma=0.5)",
        "ByzPy GaussianAttack(0.0, 0.5), f draws",
        lambda c: np.stack(
            [
                numpy(GaussianAttack(0.0, 0.5, seed=[c.idx, i]).apply(honest_grads=list(honest(c))))
                for i in range(c.f)
            ]
        ),
        random=True,
    ),
]


NOT_COMPARED = [
    (
        "`adaptive-lie`, `adaptive-ipm`",
        "ByzFL Optimal_ALittleIsEnough, Optimal_InnerProductManipulation",
        "Different searches, both heuristics: ByzFL walks τ from 0 by steps of 10, doubling "
        "while the distance ‖agg − μ_H‖ grows, then shrinking the step by 0.8 (20 "
        "evaluations, the path depends on every evaluation); ours scores the fixed grid "
        "`linspace(0, 10, 20)` and keeps the best; and ByzFL's ALIE moves along +σ, "
        "ours along −σ. The chosen strengths, hence the outputs, differ by design; the "
        "building blocks (ALIE, IPM, the rules) are compared above.",
    ),
    (
        "`mimic` (default `client=None`)",
        "ByzFL Mimic, ByzPy MimicAttack",
        "Ours picks the honest client farthest along the top principal direction each round; "
        "the references copy a fixed index ε (compared above with `client=`).",
    ),
    (
        "`labelflip`",
        "ByzFL LabelFlipping, ByzPy LabelFlipAttack",
        "Data-level (labels y → C−1−y before local training), not a function of the update "
        "matrix; ByzFL's LabelFlipping returns the honest mean as a stand-in.",
    ),
    (
        "`bucketing` with its own random permutation",
        "ByzFL Bucketing, ByzPy Bucketing",
        "Each side draws its permutation from its own RNG; compared above with one shared "
        "permutation instead.",
    ),
]

NO_REFERENCE = (
    "`bulyan`, `dnc`, `aksel`, `rbtm`, `signguard`, `signguard-sim`, `signguard-dist`, "
    "`clippedclustering`; attacks `noise`, `zero`, `nan`, `minmax`, `minsum`, `strike`, "
    "`byzmean`, `fang`, `adaptive-byzmean`, `adaptive-minmax`, `adaptive-minsum`, "
    "`adaptive-strike`: neither ByzFL 0.0.11 nor ByzPy 0.1.4 implements them."
)


# ---------------------------------------------------------------- comparison


def ours_output(pair: Pair, c: Case, kind: str) -> np.ndarray:
    params = pair.params(c)
    if kind == "rule":
        f = params.pop("f", c.f)
        return np.asarray(fb.aggregate(pair.ours, c.G, f=f, **params))
    key = jax.random.key(c.idx)
    return np.asarray(fb.attack(pair.ours, c.G, c.byz, key=key, **params))[c.byz]


def difference(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """``(max |ours − ref|, max over rows of max |ours − ref| / ‖ref row‖)``; a [d]
    reference is compared with every row of ours; equal entries (infinities too)
    count 0."""
    ours, ref = np.broadcast_arrays(
        np.atleast_2d(ours).astype(np.float64), np.atleast_2d(ref).astype(np.float64)
    )
    with np.errstate(invalid="ignore"):  # inf - inf where both are inf
        diff = np.where(ours == ref, 0.0, np.abs(ours - ref))
    diff = np.where(np.isnan(diff), np.inf, diff).max(axis=1)
    if not diff.any():
        return 0.0, 0.0
    scale = np.linalg.norm(np.where(np.isfinite(ref), ref, 0.0), axis=1)
    with np.errstate(divide="ignore"):
        rel = np.where(diff == 0, 0.0, diff / scale)
    return float(diff.max()), float(rel.max())


def compare(pair: Pair, kind: str, all_cases: list[Case]) -> dict:
    """Runs one pair on every case it admits; returns the row of the results table."""
    row = {"pair": pair, "cases": 0, "abs": 0.0, "rel": 0.0, "bad": [], "errors": []}
    draws_ours, draws_ref = [], []
    for c in all_cases:
        if c.n > pair.max_n:
            continue
        try:
            ours = ours_output(pair, c, kind)
            ref = numpy(pair.ref(c))
        except Exception as e:  # noqa: BLE001 -- a failing side is reported, not fatal
            row["errors"].append(f"{c.n}x{c.d} f={c.f}: {type(e).__name__}: {e}"[:160])
            continue
        row["cases"] += 1
        if pair.random:
            draws_ours.append(ours.ravel())
            draws_ref.append(ref.ravel())
            continue
        a, r = difference(ours, ref)
        row["abs"], row["rel"] = max(row["abs"], a), max(row["rel"], r)
        if r > TOL:
            row["bad"].append(c)
    if pair.random and draws_ours:
        x, y = np.concatenate(draws_ours), np.concatenate(draws_ref)
        p = stats.ks_2samp(x, y).pvalue
        row["stats"] = (
            f"pooled {x.size} vs {y.size} draws: mean {x.mean():+.4f} vs {y.mean():+.4f}, "
            f"std {x.std():.4f} vs {y.std():.4f}, KS p = {p:.2f}"
        )
        row["agrees"] = p > KS_P
    else:
        row["agrees"] = row["cases"] > 0 and not row["bad"] and not row["errors"]
    return row


# ---------------------------------------------------------------- writing


def describe_bad(row: dict) -> str:
    bad = row["bad"]
    if not bad:
        return f"0/{row['cases']}"
    grid = sum(c.kind == "grid" for c in bad)
    where = "all on the tie grid" if grid == len(bad) else f"{grid} on the tie grid"
    return f"{len(bad)}/{row['cases']} ({where})"


def fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def table(lines: list[str], rows: list[dict]) -> None:
    lines += [
        "| fedjax_byz | reference | cases | differing | max abs diff | max rel diff | verdict "
        "| mapping / why |",
        "|---|---|---:|---|---:|---:|---|---|",
    ]
    for row in rows:
        p = row["pair"]
        if "stats" in row:
            cells = f"{row['cases']} | — | — | — "
        else:
            cells = f"{row['cases']} | {describe_bad(row)} | {fmt(row['abs'])} | {fmt(row['rel'])} "
        text = [p.note, row.get("stats", "")]
        if p.why:
            text.append(("**Why:** " if not row["agrees"] else "Could differ (not here): ") + p.why)
        if row["errors"]:
            text.append("errors: " + "; ".join(row["errors"][:2]))
        verdict = "agrees" if row["agrees"] else "**differs**"
        why = "; ".join(t for t in text if t).replace("|", "\\|")
        lines.append(f"| `{p.ours_label}` | {p.ref_label} | {cells}| {verdict} | {why} |")


def write(path: str, rule_rows, attack_rows, all_cases, seconds: float) -> None:
    shapes = sorted({(c.n, c.d, c.f) for c in all_cases})
    lines = [
        "# Agreement with ByzFL and ByzPy",
        "",
        f"Generated by `benchmarks/agreement.py` on {datetime.date.today()} in "
        f"{seconds:.0f} s; do not edit by hand. Reproduce with",
        "",
        f"    {COMMAND}",
        "",
        f"Versions: fedjax_byz {fb.__version__}, jax {jax.__version__}, torch "
        f"{version('torch')}, numpy {np.__version__}, byzfl {version('byzfl')}, byzpy "
        f"{version('byzpy')}.",
        "",
        "Inputs (float32 on both sides; ByzFL gets an [n, d] torch tensor, ByzPy a list of "
        "row tensors): skewed updates, 60% of the honest rows in a dense cluster off a "
        "common component, the others Student-t (3 dof), f rows far away, shuffled, "
        "scaled to row norms near 1; and the same rounded to a grid of 0.25/√d "
        "(`grid`), where exact ties in values and distances occur. (n, d, f) in "
        + ", ".join(f"({n}, {d}, {f})" for n, d, f in shapes)
        + f", seeds {', '.join(map(str, SEEDS))}, both kinds: {len(all_cases)} cases "
        "(MDA and SMEA: n ≤ 10, the references enumerate every subset in Python). "
        "Attacks get a random Byzantine mask of f rows; the references get the honest "
        "rows, and their vector is compared with every Byzantine row of ours.",
        "",
        f"`max rel diff` is max |ours − ref| / ‖ref‖ over the cases; a case agrees when it "
        f"is at most {TOL:g} (float32 round-off), a pair when every case does. `differing`: "
        "the cases beyond that, and how many of them are on the tie grid. `(mapped)`: the "
        "parameters are translated so that the same thing is compared; the last column "
        "says how. Random attacks are compared in distribution (two-sample "
        f"Kolmogorov-Smirnov over all cases pooled; agrees when p > {KS_P:g}).",
        "",
        "## Aggregation rules and pre-aggregators",
        "",
    ]
    table(lines, rule_rows)
    lines += ["", "## Attacks", ""]
    table(lines, attack_rows)
    lines += [
        "",
        "## Not compared",
        "",
        "| fedjax_byz | reference | why |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {why} |" for a, b, why in NOT_COMPARED]
    lines += ["", "No reference implementation: " + NO_REFERENCE, ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    print("wrote", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/agreement.md")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(1)
    all_cases = cases()
    rows = {}
    for kind, pairs in (("rule", RULES), ("attack", ATTACKS)):
        rows[kind] = []
        for pair in pairs:
            row = compare(pair, kind, all_cases)
            rows[kind].append(row)
            print(
                f"{pair.ours_label:40s} {pair.ref_label[:45]:45s} {row['cases']:3d} "
                f"{describe_bad(row):24s} rel {fmt(row['rel'])} {row['errors'][:1]}",
                flush=True,
            )
    write(args.out, rows["rule"], rows["attack"], all_cases, time.perf_counter() - start)


if __name__ == "__main__":
    main()
