"""Attack speed: every fedjax_byz attack against the PyPI reference implementations.

Times, at (n, d) = (25, 500k), (50, 1M), (100, 100k) with f = n/5 Byzantine clients on
skewed random updates, every registered attack (``fb.attack``, jitted, warm), the time to
compute μ_H and σ_H once (the yardstick of issue 3), ByzFL's and ByzPy's attacks on the
same honest rows (torch, float32) and, for the SignGuard paper's code and Blades, which
are not installable here, the figures measured on this machine and quoted in issue 3.

Run in the benchmark environment (jax + torch + byzfl + byzpy + this package):

    /work/venv-bench/bin/python benchmarks/attack_speed.py

Writes ``benchmarks/results/attack_speed.md``. Times are the minimum over repeats (the
machine is shared; the minimum is the least noisy estimate of the cost).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_byz as fb
from fedjax_byz import ops

SIZES = [(25, 500_000), (50, 1_000_000), (100, 100_000)]
# Figures measured on this machine at (25, 500k), quoted in issue 3 (codes not installable).
QUOTED = {
    "SignGuard code Min-Max": ("minmax", 0.88),
    "SignGuard code Min-Sum": ("minsum", 7.3),
    "Blades Min-Max": ("minmax", 0.26),
    "ByzFL Optimal ALIE vs TrMean, 20 evals": ("adaptive-lie", 7.5),
    "ByzFL ALIE": ("lie", 0.11),
}
AGGREGATOR = {  # the server rule aggregation-aware attacks calibrate against
    "adaptive-lie": "trmean",
    "adaptive-ipm": "trmean",
    "adaptive-strike": "trmean",
    "adaptive-byzmean": "trmean",
    "fang": "trmean",
}


def timeit(fn, repeats: int, budget: float = 2.0) -> float:
    """Minimum wall time of ``fn()`` over up to ``repeats`` calls after one warm-up."""
    jax.block_until_ready(fn())
    best, spent = np.inf, 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget:
            break
    return best


@jax.jit
def honest_mean_std(G, honest):
    """The yardstick: μ_H and σ_H (ddof=1) once."""
    mu = ops.masked_mean(G, honest)
    return mu, ops.masked_std(G, honest, mu)


def updates(n: int, d: int) -> np.ndarray:
    """Skewed updates: a dense off-centre cluster (60%) and heavy-tailed stragglers."""
    rng = np.random.default_rng(0)
    k = 3 * n // 5
    base = 0.01 * rng.standard_normal(d, dtype=np.float32)
    G = np.empty((n, d), np.float32)
    G[:k] = base + 0.01 + 0.002 * rng.standard_normal((k, d), dtype=np.float32)
    G[k:] = base + 0.01 * rng.standard_t(3, size=(n - k, d)).astype(np.float32)
    return G[rng.permutation(n)]


def our_attacks() -> list[tuple[str, dict]]:
    out = [(name, {}) for name in fb.attacks.ATTACKS.names() if name != "labelflip"]
    if "krum" in fb.aggregators.names():
        out.append(("fang", {"rule": "krum"}))
    return out


def reference_attacks(f: int):
    """name -> (fedjax_byz name it corresponds to, callable on the honest rows)."""
    refs = {}
    try:
        import byzfl

        refs.update(
            {
                "byzfl ALittleIsEnough": ("lie", byzfl.ALittleIsEnough(1.5)),
                "byzfl InnerProductManipulation": ("ipm", byzfl.InnerProductManipulation(0.1)),
                "byzfl SignFlipping": ("bitflip", byzfl.SignFlipping()),
                "byzfl Mimic": ("mimic", byzfl.Mimic(0)),
                "byzfl Gaussian": ("gaussian", byzfl.Gaussian(0.0, 0.5)),
                "byzfl Inf": ("inf", byzfl.Inf()),
                "byzfl Optimal_ALittleIsEnough (TrMean, 20 evals)": (
                    "adaptive-lie",
                    byzfl.Optimal_ALittleIsEnough(
                        byzfl.TrMean(f=f), pre_agg_list=[], f=f, evals=20
                    ),
                ),
                "byzfl Optimal_InnerProductManipulation (TrMean, 20 evals)": (
                    "adaptive-ipm",
                    byzfl.Optimal_InnerProductManipulation(
                        byzfl.TrMean(f=f), pre_agg_list=[], f=f, evals=20
                    ),
                ),
            }
        )
    except ImportError:
        pass
    try:
        from byzpy.attacks.empire import EmpireAttack
        from byzpy.attacks.gaussian import GaussianAttack
        from byzpy.attacks.little import LittleAttack
        from byzpy.attacks.mimic import MimicAttack

        def call(attack):
            return lambda X: attack.apply(honest_grads=list(X))

        refs.update(
            {
                "byzpy LittleAttack": ("lie", call(LittleAttack(f=f))),
                "byzpy EmpireAttack": ("ipm", call(EmpireAttack(scale=-0.1))),
                "byzpy MimicAttack": ("mimic", call(MimicAttack(0))),
                "byzpy GaussianAttack": ("gaussian", call(GaussianAttack(0.0, 0.5))),
            }
        )
    except ImportError:
        pass
    return refs


def version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/attack_speed.md")
    parser.add_argument("--sizes", default=",".join(f"{n}x{d}" for n, d in SIZES))
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]

    ours: dict[str, dict] = {}
    refs: dict[str, dict] = {}
    corr: dict[str, str] = {}
    base: dict = {}
    for n, d in sizes:
        f = n // 5
        Gn = updates(n, d)
        G = jnp.asarray(Gn)
        byz = jnp.asarray(np.arange(n) < f)
        base[(n, d)] = timeit(lambda G=G, h=~byz: honest_mean_std(G, h), args.repeats)
        print(f"n={n} d={d} f={f}: μ_H, σ_H {base[(n, d)]:.4f} s", flush=True)
        for name, params in our_attacks():
            label = name + "".join(f" ({k}={v})" for k, v in params.items())
            agg = "krum" if params.get("rule") == "krum" else AGGREGATOR.get(name)

            def run(name=name, params=params, agg=agg, G=G, byz=byz):
                return fb.attack(name, G, byz, aggregator=agg, **params)

            ours.setdefault(label, {})[(n, d)] = timeit(run, args.repeats)
            print(f"  {label:28s} {ours[label][(n, d)]:.4f} s", flush=True)
        import torch

        X = torch.from_numpy(Gn[f:].copy())
        for label, (ours_name, ref) in reference_attacks(f).items():
            corr[label] = ours_name
            refs.setdefault(label, {})[(n, d)] = timeit(lambda ref=ref, X=X: ref(X), args.repeats)
            print(f"  {label:28s} {refs[label][(n, d)]:.4f} s", flush=True)

    write(args, sizes, base, ours, refs, corr)


def write(args, sizes, base, ours, refs, corr):
    small = sizes[0]
    cols = " | ".join(f"n={n}, d={d // 1000}k" for n, d in sizes)
    lines = [
        "# Attack speed",
        "",
        f"Generated by `benchmarks/attack_speed.py` on {datetime.date.today()}; reproduce with",
        "",
        "    /work/venv-bench/bin/python benchmarks/attack_speed.py",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        "(shared with other jobs while measuring), no accelerator. "
        f"jax {jax.__version__}, numpy {np.__version__}, torch {version('torch')}, "
        f"byzfl {version('byzfl')}, byzpy {version('byzpy')}. f = n/5 Byzantine clients; "
        "updates are skewed random (a dense off-centre cluster plus Student-t stragglers). "
        "Times are the minimum over up to "
        f"{args.repeats} warm calls (jitted; compile time excluded). Aggregation-aware "
        "attacks calibrate against the trimmed mean (`fang`, `adaptive-*`) or Krum "
        "(`fang (rule=krum)`).",
        "",
        "## fedjax_byz, and the ratio to computing μ_H and σ_H once",
        "",
        f"| attack | {cols} |",
        "|---|" + "---|" * len(sizes),
        "| μ_H and σ_H once | " + " | ".join(f"{base[s] * 1e3:.1f} ms" for s in sizes) + " |",
    ]
    for label, t in ours.items():
        cells = [f"{t[s] * 1e3:.1f} ms ({t[s] / base[s]:.1f}×)" for s in sizes]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Reference implementations, measured in the same run",
        "",
        "Each reference returns one vector from the honest rows; fedjax_byz returns the full "
        "attacked matrix. In parentheses: reference time / fedjax_byz time (above 1: "
        "fedjax_byz is faster).",
        "",
        f"| reference | fedjax_byz | {cols} |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for label, t in refs.items():
        mine = ours[corr[label]]
        cells = [f"{t[s] * 1e3:.1f} ms ({t[s] / mine[s]:.1f}×)" for s in sizes]
        lines.append(f"| {label} | `{corr[label]}` | " + " | ".join(cells) + " |")
    if small == SIZES[0]:
        write_quoted(lines, ours, small)
    write_targets(lines, sizes, base, ours, refs, small)
    lines += NOTES.splitlines()
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def write_quoted(lines, ours, small):
    lines += [
        "",
        f"## Figures quoted in issue 3 (measured on this machine at n={small[0]}, "
        f"d={small[1] // 1000}k)",
        "",
        "| implementation | figure | fedjax_byz | speed-up |",
        "|---|---|---|---|",
    ]
    for label, (name, secs) in QUOTED.items():
        t = ours[name][small]
        lines.append(f"| {label} | {secs:.2f} s | `{name}` {t * 1e3:.1f} ms | {secs / t:.0f}× |")


NOTES = """
## Notes

- Random attacks (`gaussian`, `noise`, `fang` with trmean/median) draw n×d numbers; on this
  CPU the PRNG alone costs about 4× μ_H/σ_H, so they cannot meet the 3× target here.
- Min-Max, STRIKE, Mimic and Fang's Krum attack need every pairwise distance (a Gram matrix,
  O(n²d)); μ_H/σ_H is O(nd). At n=25, d=500k the Gram product alone costs about as much as
  μ_H and σ_H, so `minmax` lands near 3× μ_H/σ_H, i.e. about 7× faster than the SignGuard
  code's 0.88 s rather than the 20× targeted; `minsum` needs no Gram matrix (its bound is
  a sum of row norms about the mean) and meets its target.
- `fedjax_byz` returns the whole attacked n×d matrix (honest rows included); the references
  return one vector, so for the trivial attacks (`ipm`, `bitflip`, `mimic`, `inf`) the
  comparison mostly measures that copy.
- The machine was shared with other jobs during the run (load average 4–7 on 2 cores);
  ratios within one row are more trustworthy than absolute times."""


def write_targets(lines, sizes, base, ours, refs, small):
    lines += ["", "## Targets of issue 3", ""]
    for name, secs in (("minmax", 0.88), ("minsum", 7.3)):
        if small != SIZES[0]:
            break
        speedup = secs / ours[name][small]
        verdict = "met" if speedup >= 20 else "NOT met"
        lines.append(
            f"- `{name}` ≥ 20× faster than the SignGuard paper's code: {speedup:.0f}× ({verdict})."
        )
    key = "byzfl Optimal_ALittleIsEnough (TrMean, 20 evals)"
    if key in refs:
        speedup = refs[key][small] / ours["adaptive-lie"][small]
        verdict = "met" if speedup >= 5 else "NOT met"
        lines.append(
            f"- `adaptive-lie` ≥ 5× faster than ByzFL's Optimal ALIE (TrMean, 20 evaluations), "
            f"same run: {speedup:.1f}× ({verdict})."
        )
    over = [
        f"`{label}` at n={s[0]} ({t[s] / base[s]:.1f}×)"
        for label, t in ours.items()
        for s in sizes
        if t[s] / base[s] > 3 and not label.startswith("adaptive-")
    ]
    lines.append(
        "- Every attack within 3× of computing μ_H and σ_H once (the `adaptive-*` wrappers "
        "run the server's rule once per grid point by design and are measured against ByzFL "
        "above): " + ("met." if not over else "not met by " + ", ".join(over) + ".")
    )


if __name__ == "__main__":
    main()
