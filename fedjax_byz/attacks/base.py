"""Types of Byzantine attacks.

An attack sees everything (the omniscient threat model of the papers): the update matrix
with every client's honest update, the Byzantine mask, the server model and, for
aggregation-aware attacks, the server's rule. It returns the matrix with the Byzantine
rows replaced; honest rows come back bit-identical.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax.typing import ArrayLike

from fedjax_byz import prng

State = Any


class AttackContext(struct.PyTreeNode):
    """What the attackers know in a round.

    Attributes:
      byz: bool[n], True for Byzantine rows.
      round: int32 scalar, the communication round.
      params: f32[d], the flattened server model (None outside a simulation).
      aggregate: ``updates[n, d] -> f32[d]``, the server's rule with its current state,
        for aggregation-aware attacks (None when the server's rule is unknown).
    """

    byz: jax.Array
    round: jax.Array
    params: jax.Array | None = None
    aggregate: Callable[[jax.Array], jax.Array] | None = struct.field(
        pytree_node=False, default=None
    )

    @classmethod
    def create(cls, byz, round=0, params=None, aggregate=None) -> AttackContext:
        return cls(jnp.asarray(byz, bool), jnp.asarray(round, jnp.int32), params, aggregate)

    @property
    def f(self) -> jax.Array:
        """Number of Byzantine rows (traced)."""
        return self.byz.sum().astype(jnp.int32)

    @property
    def honest(self) -> jax.Array:
        """bool[n], True for honest rows."""
        return ~self.byz


class Attack(NamedTuple):
    """A Byzantine attack.

    Attributes:
      init: ``d -> state``.
      apply: ``(key, updates[n, d], state, ctx) -> (updates[n, d], state)``.
      relabel: for data-level attacks, ``(labels, num_classes) -> labels`` applied to the
        Byzantine clients' examples during local training; None otherwise.
    """

    init: Callable[[int], State]
    apply: Callable[[jax.Array, jax.Array, State, AttackContext], tuple[jax.Array, State]]
    relabel: Callable[[jax.Array, int], jax.Array] | None = None


def switch(index: jax.Array, attacks: Sequence[Attack]) -> Attack:
    """The attack ``attacks[index]``, chosen by a traced index (``lax.switch``: only the
    chosen branch runs while ``index`` is not batched). Its state is the tuple of every
    attack's state, each branch updating its own; ``relabel`` flips labels where the
    chosen attack does. One attack is returned as it is.
    """
    if len(attacks) == 1:
        return attacks[0]

    def init(d):
        return tuple(a.init(d) for a in attacks)

    def branch(k):
        def run(key, G, state, ctx):
            G, s = attacks[k].apply(key, G, state[k], ctx)
            return G, (*state[:k], s, *state[k + 1 :])

        return run

    def apply(key, G, state, ctx):
        return jax.lax.switch(index, [branch(k) for k in range(len(attacks))], key, G, state, ctx)

    flips = [a.relabel or (lambda y, num_classes: y) for a in attacks]

    def relabel(y, num_classes):
        return jax.lax.switch(
            index, [functools.partial(r, num_classes=num_classes) for r in flips], y
        )

    relabels = any(a.relabel is not None for a in attacks)
    return Attack(init, apply, relabel if relabels else None)


def replace_byzantine(G: jax.Array, byz: jax.Array, malicious: jax.Array) -> jax.Array:
    """Rows of ``malicious`` (``[d]`` broadcast, or ``[n, d]``) where ``byz``, else ``G``.

    The result has ``G``'s dtype: crafted rows computed in a wider type (a float32
    strength on bfloat16 updates) are cast back, so an attack keeps its input's dtype.
    One select over the matrix, which XLA fuses into whatever reads the result (a rule
    scoring a candidate attack) and which a ``vmap`` over masks batches as it is; an
    attack's own output goes through ``write_byzantine``.
    """
    malicious = jnp.broadcast_to(jnp.asarray(malicious).astype(G.dtype), G.shape)
    return jnp.where(byz[:, None], malicious, G)


def write_byzantine(G: jax.Array, byz: jax.Array, malicious: jax.Array) -> jax.Array:
    """``replace_byzantine`` for an attack's output.

    On CPU a shared ``[d]`` row is written into the Byzantine rows one after another
    (``byzantine_rows``' loop), so inside a round, where ``G``'s buffer is dead once
    attacked, XLA writes the ``f`` rows into it and leaves the others alone; the select
    rewrote every row there (ALIE at 50 x 1M in place: 28 against 40 ms, A/B here).
    Elsewhere the select: a sweep ``vmap``s over Byzantine masks on accelerators, and a
    loop over a batched count runs to the largest one, each step a select over the batch.
    """
    malicious = jnp.asarray(malicious)
    if malicious.ndim == 1 and jax.default_backend() == "cpu":
        return _each_byzantine_row(G, byz, lambda i, g: malicious)
    return replace_byzantine(G, byz, malicious)


def stateless(fn: Callable[[jax.Array, jax.Array, AttackContext], jax.Array]) -> Attack:
    """Wraps ``fn(key, updates, ctx) -> malicious ([d] or [n, d])`` as an ``Attack``."""

    def apply(key, G, state, ctx):
        return write_byzantine(G, ctx.byz, fn(key, G, ctx)), state

    return Attack(lambda d: (), apply)


Craft = Callable[[ArrayLike], jax.Array]
Family = Callable[[jax.Array, jax.Array, AttackContext], Craft]


def at_strength(family: Family, strength: ArrayLike) -> Attack:
    """The attack a ``Family`` makes at one strength.

    A family is an attack with a numeric strength (z, ε, γ's ν, STRIKE's ν) split in two:
    ``family(key, updates, ctx)`` does the work that does not depend on the strength (μ,
    σ, Gram matrices, searches) and returns ``craft(strength) -> malicious`` (``[d]`` or
    ``[n, d]``, as ``stateless``), which is cheap. ``adaptive`` evaluates ``craft`` over a
    grid after one call of ``family``.
    """
    return stateless(lambda key, G, ctx: family(key, G, ctx)(strength))


Row = Callable[[jax.Array, jax.Array], jax.Array]


def byzantine_rows(key: jax.Array, G: jax.Array, byz: jax.Array, row: Row) -> jax.Array:
    """``G`` with every Byzantine row ``i`` replaced by ``row(fold_in(key, i), g_i)``.

    ``row`` is evaluated for the Byzantine rows only (a loop over the ``f = Σ byz`` of
    them, each written in place), so a random attack draws ``f·d`` numbers instead of
    ``n·d``, and one ``[d]`` row at a time (on CPU a single ``[f, d]`` draw was 4× slower
    per number). Row ``i``'s key depends only on ``key`` and ``i``; its draws are those of
    ``key``'s generator, fused into one pass where it is Threefry (``prng.fused``). ``g_i``
    is read from the matrix being written (row ``i`` is untouched until its turn), so when
    ``G``'s buffer is dead afterwards (inside a round) XLA writes into it without copying it
    first. ``-> [n, d]``.
    """
    key = prng.fused(key)

    def new_row(i, g):
        return row(jax.random.fold_in(key, i), g)

    return _each_byzantine_row(G, byz, new_row, apart=True)


def _each_byzantine_row(G: jax.Array, byz: jax.Array, new_row, apart: bool = False) -> jax.Array:
    """``G`` with each Byzantine row ``i`` replaced by ``new_row(i, g_i) [d]``, in index order.

    With ``apart``, each row is made in a conditional branch of its own (always taken),
    which XLA cannot fuse into the row's write: its CPU backend runs that write, a
    dynamic-update-slice, on one core, and the row apart on all of them (``gaussian`` in
    place at 25 x 500k 9.9 -> 8.7 ms, ``noise`` at 100 x 100k 8.8 -> 7.4 ms here).
    """
    order = jnp.argsort(~byz, stable=True)  # the Byzantine rows first, by index
    count = byz.sum()

    def body(j, out):
        i = order[j]
        g = jax.lax.dynamic_index_in_dim(out, i, 0, False)
        new = jax.lax.cond(j < count, lambda: new_row(i, g), lambda: g) if apart else new_row(i, g)
        return jax.lax.dynamic_update_index_in_dim(out, new.astype(G.dtype), i, 0)

    return jax.lax.fori_loop(0, count, body, G)


def rowwise(make_row: Callable[[jax.Array, AttackContext], Row]) -> Attack:
    """An ``Attack`` whose Byzantine rows are drawn one by one (``byzantine_rows``).

    ``make_row(updates, ctx) -> row`` computes what the rows share once (e.g. the honest
    range); ``row(key_i, g_i) -> [d]`` crafts Byzantine row ``i``.
    """

    def apply(key, G, state, ctx):
        return byzantine_rows(key, G, ctx.byz, make_row(G, ctx)), state

    return Attack(lambda d: (), apply)
