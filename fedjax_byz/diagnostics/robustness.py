"""Empirical κ and selection rates of every rule under every attack, on captured updates.

The κ of (f, κ)-robustness (Allouah et al. 2023; STRIKE Definition 1) bounds how far a
rule's output may fall from the honest mean:
``‖F(g_1..g_n) − ḡ_H‖² ≤ κ · (1/|H|) Σ_{i∈H} ‖g_i − ḡ_H‖²``. Its empirical value on one
round is the smallest κ that holds there (``measures.round_measures``). Here it is
measured offline, on real honest update matrices a no-attack run captured: ``f`` of the
rows are marked Byzantine, each attack replaces them (``fb.attack``, told the rule, as in
the simulator, so aggregation-aware attacks tailor themselves to it), each rule aggregates
(``fb.aggregate``) and the round's measures are taken. These are pure functions of the
matrices: no training, one compile per attack × rule. Attacks that act through training
(``labelflip`` poisons labels) cannot be replayed on fixed updates and are left out; the
others run from their initial state on every matrix, so an attack or a rule with memory
across rounds (CClip's centre, Clipped Clustering's history) acts as in its first round.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_byz import aggregators, attacks
from fedjax_byz.diagnostics.measures import round_measures
from fedjax_byz.registry import ConfigError

# Attacks that act through local training, not on the update matrix.
TRAINING_ATTACKS = ("labelflip",)


@functools.cache
def uses_rule(attack: str) -> bool:
    """Whether ``attack`` (with its defaults) calls the server's rule: traced once on a
    small matrix with a rule that records the call (no compilation)."""
    called = []

    def rule(U):
        called.append(True)
        return U[0]

    atk = attacks.get(attack)
    ctx = attacks.AttackContext.create(jnp.arange(6) < 1, aggregate=rule)
    jax.eval_shape(lambda G: atk.apply(jax.random.key(0), G, atk.init(4), ctx)[0], jnp.ones((6, 4)))
    return bool(called)


def pair_measures(
    updates: np.ndarray,
    byz: np.ndarray,
    attack: str,
    rule: str,
    *,
    f: int,
    key: jax.Array,
    **attack_params: Any,
) -> dict[str, float]:
    """``round_measures`` after ``attack`` (its defaults, or ``attack_params``) replaces the
    ``byz`` rows of the honest ``updates [n, d]`` and ``rule`` aggregates them assuming
    ``f`` Byzantine rows. The attack is told the rule when it uses it (``uses_rule``);
    others compile once for every rule."""
    k_attack, k_rule = jax.random.split(key)
    aware = rule if uses_rule(attack) else None
    G = attacks.attack(attack, updates, byz, key=k_attack, aggregator=aware, **attack_params)
    out, aux = aggregators.aggregate(rule, G, f=f, key=k_rule, return_aux=True)
    return round_measures(np.asarray(G), byz, np.asarray(out), np.asarray(aux["weights"]))


def default_pairs(n: int, f: int) -> tuple[list[str], list[str], dict[str, str]]:
    """Every registered attack that acts on updates, every registered rule that accepts
    ``n`` rows and ``f`` Byzantine, and ``{rule: why it was left out}`` for the others."""
    names = [a for a in attacks.ATTACKS.names() if a not in TRAINING_ATTACKS]
    rules, skipped = [], {}
    for rule in aggregators.RULES.names():
        try:
            aggregators.check(rule, n, f)
            rules.append(rule)
        except ConfigError as e:
            skipped[rule] = str(e)
    return names, rules, skipped


def robustness_grid(
    matrices: np.ndarray,
    *,
    clients: int,
    byzantine: int,
    attack_names: Sequence[str],
    rule_names: Sequence[str],
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measures of every rule × attack on every captured round.

    Args:
      matrices: ``[K, m, d]`` honest updates of ``K`` rounds (``m >= clients``).
      clients: ``n``, the rows each evaluation uses: the same seeded random ``n`` of the
        ``m`` rows in every round (a fixed set of clients).
      byzantine: ``f``, how many of them are Byzantine (a seeded random fixed set); the
        rules assume the true ``f``.
      attack_names, rule_names: registry names.
      seed: draws the rows, the Byzantine set and the attacks' and rules' keys.
      log: called with one line per rule.

    Returns:
      One record per (rule, attack, round): ``rule``, ``attack``, ``round`` (index into
      ``matrices``) and the ``round_measures`` (``kappa``, ``honest_kept``, ...).
    """
    K, m, _ = matrices.shape
    if not 0 <= byzantine < clients <= m:
        raise ConfigError(
            f"kappa: needs 0 <= byzantine < clients <= {m} (the captured rows), "
            f"got byzantine={byzantine}, clients={clients}."
        )
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(m, clients, replace=False))
    byz = rng.permutation(clients) < byzantine
    keys = jax.random.split(jax.random.key(seed), K)
    out = []
    for rule in rule_names:
        for attack in attack_names:
            for k in range(K):
                G = np.asarray(matrices[k][rows], np.float32)
                m_k = pair_measures(G, byz, attack, rule, f=byzantine, key=keys[k])
                out.append({"rule": rule, "attack": attack, "round": k, **m_k})
        if log:
            log(f"  {rule}: {len(attack_names)} attacks × {K} rounds")
    return out


def mean_over_rounds(rows: Sequence[Mapping[str, Any]], measure: str) -> dict[tuple, float]:
    """``{(rule, attack): mean of measure over rounds}`` (non-finite rounds propagate)."""
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        acc.setdefault((r["rule"], r["attack"]), []).append(r[measure])
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _fmt(v: float) -> str:
    """Three significant digits; rounding error of an exact 0 (below 1e-9) shows as 0."""
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞"
    return "0" if abs(v) < 1e-9 else f"{v:.3g}"


def kappa_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per rule, sorted by its worst-case κ (the largest over attacks of
    the mean over rounds; NaN counts as worst), then the worst attack and every attack's
    κ, attacks in registry order."""
    kappa = mean_over_rounds(rows, "kappa")
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    names = list(dict.fromkeys(r["attack"] for r in rows))

    def worst(rule):
        vals = [kappa[rule, a] for a in names]
        bad = [a for a, v in zip(names, vals, strict=True) if math.isnan(v)]
        if bad:
            return math.inf, bad[0]
        i = int(np.argmax(vals))
        return vals[i], names[i]

    rules.sort(key=lambda rule: worst(rule)[0])
    lines = [
        "| rule | worst κ | worst attack | " + " | ".join(names) + " |",
        "|---" * (len(names) + 3) + "|",
    ]
    for rule in rules:
        w, a = worst(rule)
        cells = " | ".join(_fmt(kappa[rule, x]) for x in names)
        lines.append(f"| {rule} | {_fmt(w)} | {a} | {cells} |")
    return "\n".join(lines)


def kappa_report(
    config: str | Path | Mapping[str, Any],
    *,
    out: str | Path | None = None,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Runs a no-attack config that captures rounds (``fb.sweep``), then the κ table of
    every rule × attack on its captured updates; writes ``kappa.md`` and ``kappa.json``
    into the sweep's folder and returns the markdown file.

    A ``kappa:`` section of the config (or ``--set kappa.clients=10``; experiment files
    leave it out, it is no simulation setting) sets ``clients`` (n, default 20),
    ``byzantine`` (f, default 4), ``attacks`` and ``rules`` (default: every registered one
    that applies, ``default_pairs``) and ``seed`` (default 0).
    """
    from fedjax_byz.sim import config as config_lib
    from fedjax_byz.sweep.runner import sweep

    raw = config_lib.load_yaml(config, profile) if isinstance(config, str | Path) else dict(config)
    for key, value in (overrides or {}).items():
        raw = config_lib.set_path(raw, key, value)
    opts = {"clients": 20, "byzantine": 4, "attacks": None, "rules": None, "seed": 0}
    for k, v in (raw.pop("kappa", None) or {}).items():
        if k not in opts:
            raise ConfigError(f"kappa.{k}: unknown setting; allowed: {sorted(opts)}.")
        opts[k] = v
    if (raw.get("attack") or {}).get("name", "none") != "none":
        raise ConfigError(
            "attack.name: the κ table needs the honest updates of a run with no attack, "
            f"got {raw['attack']['name']!r}; allowed: 'none'."
        )
    if not (raw.get("diagnostics") or {}).get("capture_rounds"):
        raise ConfigError("diagnostics.capture_rounds: list the rounds whose updates to use.")
    n, f = opts["clients"], opts["byzantine"]
    names, rules, skipped = default_pairs(n, f)
    names = opts["attacks"] or names
    if opts["rules"]:
        rules, skipped = opts["rules"], {}
    records = sweep(raw, out=out, progress=progress, log=log)
    out = Path(out or Path("runs") / records[0]["name"])
    md, dump = [], []
    for r in records:
        with np.load(out / r["captures"]) as z:
            matrices = z["updates"]
        if log:
            log(f"κ table of {r['key']}: {len(rules)} rules × {len(names)} attacks")
        rows = robustness_grid(
            matrices,
            clients=n,
            byzantine=f,
            attack_names=names,
            rule_names=rules,
            seed=opts["seed"],
            log=log,
        )
        rounds = [int(x) for x in r["diagnostics"]["rounds"]]
        grid = ", ".join(f"{k}={v}" for k, v in r["grid"].items()) or r["name"]
        md += [
            f"## {grid}",
            "",
            f"Empirical κ, mean over rounds {rounds}; n = {n} rows of which f = {f} "
            "Byzantine; rules sorted by their worst case.",
            "",
            kappa_table(rows),
            "",
        ]
        dump.append({"key": r["key"], "grid": r["grid"], "rounds": rounds, "rows": rows})
    if skipped:
        md += ["Rules left out:", ""] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    (out / "kappa.json").write_text(json.dumps({"n": n, "f": f, "cells": dump}, indent=1))
    path = out / "kappa.md"
    path.write_text("\n".join(md))
    return path
