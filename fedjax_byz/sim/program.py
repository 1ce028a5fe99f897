"""The compiled federated-learning program: static structure, traced hyperparameters.

``make_program(static)`` returns pure functions ``init(key, hp, data)`` and
``run(state, hp, data, start, periods)``; one round is

  1. sample the participating clients (all, or ``m`` of ``n``);
  2. local training of every participant (one mapped client function; with a device
     mesh, each device trains its own slice of the participants, see ``sharding``);
  3. updates ``g_i = w − w_i`` as ``f32[m, d]``;
  4. the attack replaces the Byzantine rows;
  5. the rule aggregates (every rule drops non-finite rows first, see
     ``aggregators.guard_nonfinite``; they are counted);
  6. the server applies the aggregate through optax (momentum optional).

Rounds run as nested ``lax.scan``s: ``eval_every`` rounds, then an evaluation on the
test set, repeated ``periods`` times per call. Everything numeric (learning rates, the
true and assumed ``f``, attack and rule knobs) lives in ``HParams`` and may be batched
with ``vmap`` by a sweep without recompiling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax
from jax.sharding import Mesh

from fedjax_byz import aggregators, attacks, models, ops
from fedjax_byz.data import ClientData
from fedjax_byz.sim import sharding
from fedjax_byz.sim.client import local_optimizer, make_client_update, map_clients
from fedjax_byz.sim.config import Config

EVAL_BATCH = 500


def _number(v: Any) -> jax.Array:
    """A numeric component parameter as float32 (so cells giving 1 and 1.5 stack)."""
    return jnp.asarray(v, jnp.float32)


class HParams(struct.PyTreeNode):
    """The numbers of an experiment, as arrays (a sweep batches them with ``vmap``).

    Attributes:
      client_lr, client_momentum, weight_decay, clip_norm: local SGD (``clip_norm = inf``
        disables clipping).
      server_lr, server_momentum: the server's optimizer.
      num_byzantine: int32, the true number of Byzantine clients.
      assumed_byzantine: int32, the ``f`` the rule assumes.
      attack: the numeric parameters of every attack of the program
        (``StaticConfig.attacks``), e.g. ``({"z": 1.5},)``: the config's own for its
        attack, zeros (unused) for the others.
      aggregator: the same for the rules (``StaticConfig.aggregators``), e.g.
        ``({"tau": 10.0},)``.
      attack_index, aggregator_index: int32, the config's attack and rule among them.
    """

    client_lr: jax.Array
    client_momentum: jax.Array
    weight_decay: jax.Array
    clip_norm: jax.Array
    server_lr: jax.Array
    server_momentum: jax.Array
    num_byzantine: jax.Array
    assumed_byzantine: jax.Array
    attack: tuple[Mapping[str, jax.Array], ...]
    aggregator: tuple[Mapping[str, jax.Array], ...]
    attack_index: jax.Array
    aggregator_index: jax.Array

    @classmethod
    def from_config(cls, cfg: Config, static: StaticConfig | None = None) -> HParams:
        """The one constructor: fixes dtypes (int32 counts, float32 reals). ``static``
        lists the program's attacks and rules (default: the config's own)."""
        t, s = cfg.train, cfg.server
        f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        (atk, atk_num), (agg, agg_num) = _split(cfg, "attack"), _split(cfg, "aggregator")
        atk_all = (atk,) if static is None else static.attacks
        agg_all = (agg,) if static is None else static.aggregators

        def numbers(branches, own, values):
            return tuple(
                {k: _number(values[k] if b == own else 0) for k in b.given} for b in branches
            )

        return cls(
            client_lr=f32(t.lr),
            client_momentum=f32(t.momentum),
            weight_decay=f32(t.weight_decay),
            clip_norm=f32(np.inf if t.clip_norm is None else t.clip_norm),
            server_lr=f32(s.lr),
            server_momentum=f32(s.momentum),
            num_byzantine=jnp.asarray(cfg.attack.num_byzantine, jnp.int32),
            assumed_byzantine=jnp.asarray(cfg.assumed_byzantine, jnp.int32),
            attack=numbers(atk_all, atk, atk_num),
            aggregator=numbers(agg_all, agg, agg_num),
            attack_index=jnp.asarray(atk_all.index(atk), jnp.int32),
            aggregator_index=jnp.asarray(agg_all.index(agg), jnp.int32),
        )


def split_aggregator_params(name: str, params: Mapping[str, Any]):
    """(static, numeric) parameters of a possibly composite rule, keys as given."""
    entries = aggregators.stages(name)
    routed = aggregators.route_params(entries, params)
    static, numeric = {}, {}
    for key in params:
        short = key.rpartition(".")[2]
        owner = next(e for e, r in zip(entries, routed, strict=True) if short in r)
        (static if short in owner.static else numeric)[key] = params[key]
    return static, numeric


def _frozen(d: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


class Branch(NamedTuple):
    """An attack or a rule as a branch of a program: what shapes its code."""

    name: str
    static: tuple  # its static parameters, frozen
    given: tuple[str, ...]  # the numeric parameters given (their values are in ``HParams``)


def _split(cfg: Config, kind: str) -> tuple[Branch, dict[str, Any]]:
    """The config's attack or rule (``kind``) as a ``Branch``, and its numeric params."""
    if kind == "attack":
        name = cfg.attack.name
        static, numeric = attacks.ATTACKS.entry(name).split(cfg.attack.params)
    else:
        name = cfg.aggregator.name
        static, numeric = split_aggregator_params(name, cfg.aggregator.params)
    given = {k: v for k, v in numeric.items() if v is not None}
    return Branch(name, _frozen(static), tuple(sorted(given))), given


def attack_branch(cfg: Config) -> Branch:
    """The config's attack as a branch of a program (``StaticConfig.attacks``)."""
    return _split(cfg, "attack")[0]


def aggregator_branch(cfg: Config) -> Branch:
    """The config's rule as a branch of a program (``StaticConfig.aggregators``)."""
    return _split(cfg, "aggregator")[0]


@dataclasses.dataclass(frozen=True)
class StaticConfig:
    """Everything that shapes the compiled program (hashable).

    ``attacks`` and ``aggregators`` are the program's ``Branch``es: one, or, for a
    batch of configs run one after another
    (``map`` mode), every attack and rule among them, chosen per config by a traced
    index (``attacks.switch``, ``aggregators.switch``), so an attack × rule grid
    compiles one program.
    """

    model: str
    model_params: tuple
    num_classes: int
    input_shape: tuple[int, ...]
    num_clients: int
    participants: int
    eval_every: int
    batch_size: int
    local_epochs: int
    local_steps: int | None
    attacks: tuple[Branch, ...]
    aggregators: tuple[Branch, ...]
    client_parallelism: int
    capture_rounds: tuple[int, ...] = ()

    @classmethod
    def from_config(
        cls, cfg: Config | Sequence[Config], num_classes: int, input_shape
    ) -> StaticConfig:
        """From a config, or from the configs of one batch (equal but for their attacks,
        rules and numbers)."""
        cfgs = [cfg] if isinstance(cfg, Config) else list(cfg)
        cfg = cfgs[0]
        cp = cfg.client_parallelism
        if cp == "auto":
            cp = models.clients_at_once(cfg.model.name, cfg.participants, jax.default_backend())
        return cls(
            model=cfg.model.name,
            model_params=_frozen(cfg.model.params),
            num_classes=num_classes,
            input_shape=tuple(input_shape),
            num_clients=cfg.data.num_clients,
            participants=cfg.participants,
            eval_every=cfg.server.eval_every,
            batch_size=cfg.train.batch_size,
            local_epochs=cfg.train.local_epochs,
            local_steps=cfg.train.local_steps,
            attacks=tuple(dict.fromkeys(attack_branch(c) for c in cfgs)),
            aggregators=tuple(dict.fromkeys(aggregator_branch(c) for c in cfgs)),
            client_parallelism=int(cp),
            capture_rounds=tuple(sorted(set(cfg.diagnostics.capture_rounds))),
        )


class ServerState(struct.PyTreeNode):
    """The carry of the round loop."""

    params: Any
    opt_state: Any
    agg_state: Any
    attack_state: Any
    byz: jax.Array  # bool[n], fixed for the run
    key: jax.Array
    captures: Any  # {} or the update matrices of the capture rounds (see ``make_program``)


class Program(NamedTuple):
    """The pure functions of one experiment structure."""

    init: Any  # (key, hp, data) -> ServerState
    run: Any  # (state, hp, data, start, periods) -> (state, (round_metrics, eval_metrics))
    evaluate: Any  # (params, data) -> (accuracy, loss)
    model: models.Model


def server_optimizer(hp: HParams) -> optax.GradientTransformation:
    """``w ← w − lr·v``, ``v ← μ·v + aggregate`` (μ = 0 is plain ``w − lr·g``)."""
    return optax.chain(optax.trace(decay=hp.server_momentum), optax.scale(-hp.server_lr))


def make_program(static: StaticConfig, mesh: Mesh | None = None) -> Program:
    """Builds the program for ``static``; nothing is compiled until it is called. With a
    ``mesh`` (``sharding.make_mesh``) every round's clients are split over its devices."""
    model = models.get(
        static.model, static.num_classes, static.input_shape, **dict(static.model_params)
    )
    n, m = static.num_clients, static.participants

    def build(hp: HParams):
        attack = attacks.switch(
            hp.attack_index,
            [
                attacks.get(b.name, **dict(b.static), **p)
                for b, p in zip(static.attacks, hp.attack, strict=True)
            ],
        )
        rule = aggregators.switch(
            hp.aggregator_index,
            [
                aggregators.get(b.name, **dict(b.static), **p)
                for b, p in zip(static.aggregators, hp.aggregator, strict=True)
            ],
        )
        return attack, rule

    def init(key, hp, data: ClientData) -> ServerState:
        k_model, k_byz, k_run = jax.random.split(key, 3)
        params = model.init(k_model)
        d = jax.flatten_util.ravel_pytree(params)[0].shape[0]
        attack, rule = build(hp)
        byz = ops.ranks(jax.random.uniform(k_byz, (n,))) < hp.num_byzantine
        return ServerState(
            params=params,
            opt_state=server_optimizer(hp).init(params),
            agg_state=rule.init(d),
            attack_state=attack.init(d),
            byz=byz,
            key=k_run,
            captures=empty_captures(d),
        )

    K = len(static.capture_rounds)
    capture_at = jnp.asarray(static.capture_rounds or (0,), jnp.int32)

    def empty_captures(d):
        if not K:
            return {}
        return {
            "updates": jnp.zeros((K, m, d), jnp.float32),  # rows as the rule received them
            "byz": jnp.zeros((K, m), bool),
            "clients": jnp.zeros((K, m), jnp.int32),
            "aggregate": jnp.zeros((K, d), jnp.float32),
            "weights": jnp.zeros((K, m), jnp.float32),
        }

    def capture(captures, r, record):
        """Stores ``record`` in the slot of round ``r + 1`` if it is a capture round (the
        round index is not batched, so this is a real branch even in a vmapped sweep)."""
        if not K:
            return captures
        slot = jnp.minimum(jnp.searchsorted(capture_at, r + 1), K - 1)
        hit = capture_at[slot] == r + 1

        def write(c):
            return {k: c[k].at[slot].set(record[k]) for k in c}

        return lax.cond(hit, write, lambda c: c, captures)

    def evaluate(params, data: ClientData):
        """Test accuracy and loss, in batches of at most ``EVAL_BATCH`` examples split over
        the mesh's client devices (one batch or more each)."""
        N = data.x_test.shape[0]
        devices = 1 if mesh is None else mesh.shape[sharding.CLIENTS]
        size = min(EVAL_BATCH, -(-N // devices))
        nb = -(-N // size)
        pad = nb * size - N
        xs = jnp.pad(data.x_test, ((0, pad),) + ((0, 0),) * (data.x_test.ndim - 1))
        ys = jnp.pad(data.y_test, (0, pad))
        valid = jnp.arange(nb * size) < N
        shape = (nb, size)

        def batches(shared, chunk):
            params, data = shared

            def batch(args):
                x, y, v = args
                logits = model.apply(params, data.normalize(x))
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
                return jnp.sum((logits.argmax(-1) == y) * v), jnp.sum(loss * v)

            return lax.map(batch, chunk)

        chunks = (xs.reshape(shape + xs.shape[1:]), ys.reshape(shape), valid.reshape(shape))
        correct, loss = sharding.over_clients(batches, (params, data), chunks, mesh)
        return correct.sum() / N, loss.sum() / N

    def train_clients(shared, per_client):
        """Local training of the clients ``per_client = (idx [k], byz [k], keys [k])``
        from the shared ``(params, hp, data)``: ``(G [k, d], losses [k])``."""
        params, hp, data = shared
        attack, _ = build(hp)
        opt = local_optimizer(hp.client_lr, hp.client_momentum, hp.weight_decay, hp.clip_norm)
        client_update = make_client_update(
            model.apply,
            data.normalize,
            batch_size=static.batch_size,
            local_epochs=static.local_epochs,
            local_steps=static.local_steps,
            shared_first_step=static.client_parallelism > 1,
        )

        def train_client(i, is_byz, key):
            def relabel(y):
                if attack.relabel is None:
                    return y
                return jnp.where(is_byz, attack.relabel(y, data.num_classes), y)

            return client_update(params, i, data.x, data.y, data.counts[i], key, opt, relabel)

        updates, losses = map_clients(train_client, per_client, static.client_parallelism)
        # Flattened once, after the map: flattening inside a client lets XLA's CPU backend
        # fuse the copy into the gradient's matmul, ~20x slower for the 784-100-10 MLP.
        return ops.to_matrix(updates)[0], losses

    def round_step(state: ServerState, r: jax.Array, hp: HParams, data: ClientData):
        attack, rule = build(hp)
        key, k_sample, k_train, k_attack, k_agg = jax.random.split(state.key, 5)
        if m == n:
            idx = jnp.arange(n)
        else:
            idx = jax.random.choice(k_sample, n, (m,), replace=False)
        byz = state.byz[idx]

        G, losses = sharding.over_clients(  # [m, d], [m]
            train_clients,
            (state.params, hp, data),
            (idx, byz, jax.random.split(k_train, m)),
            mesh,
        )
        G = sharding.spread_columns(G, mesh)

        flat_params, unravel = jax.flatten_util.ravel_pytree(state.params)
        agg_ctx = aggregators.AggregatorContext(hp.assumed_byzantine, k_agg, r)

        def server_rule(U):
            return rule.update(U, state.agg_state, agg_ctx)[0]

        atk_ctx = attacks.AttackContext(byz, r, flat_params, server_rule)
        with sharding.columns_split(mesh):
            G, attack_state = attack.apply(k_attack, G, state.attack_state, atk_ctx)
            aggregate, agg_state, aux = rule.update(G, state.agg_state, agg_ctx)

        grads = unravel(aggregate)
        updates, opt_state = server_optimizer(hp).update(grads, state.opt_state, state.params)
        honest = ~byz & ~aux["nonfinite"]
        trained = honest & (data.counts[idx] > 0)  # clients without data report no loss
        mu_h = ops.masked_mean(G, honest)
        metrics = {
            "train_loss": jnp.sum(losses * trained) / jnp.maximum(trained.sum(), 1),
            # NaN for rules without per-client weights, in every round (a product with a
            # NaN weight and a False mask may be folded into 0)
            "byz_weight": jnp.where(
                jnp.isnan(aux["weights"]).any(), jnp.nan, jnp.sum(aux["weights"] * byz)
            ),
            "agg_error": jnp.linalg.norm(aggregate - mu_h),
            "agg_norm": jnp.linalg.norm(aggregate),
            "nonfinite": jnp.sum(aux["nonfinite"]),
        }
        captures = capture(
            state.captures,
            r,
            {
                "updates": G,
                "byz": byz,
                "clients": idx.astype(jnp.int32),
                "aggregate": aggregate,
                "weights": aux["weights"],
            },
        )
        new_state = ServerState(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            agg_state=agg_state,
            attack_state=attack_state,
            byz=state.byz,
            key=key,
            captures=captures,
        )
        return new_state, metrics

    def period(state, first, hp, data):
        rounds = first + jnp.arange(static.eval_every, dtype=jnp.int32)
        state, round_metrics = lax.scan(lambda s, r: round_step(s, r, hp, data), state, rounds)
        acc, loss = evaluate(state.params, data)
        return state, (round_metrics, {"test_acc": acc, "test_loss": loss})

    def run(state, hp, data, start, periods: int):
        """``periods`` evaluation periods from round index ``start`` (an int32 that is
        never batched: every cell of a sweep runs the same rounds)."""
        firsts = start + static.eval_every * jnp.arange(periods, dtype=jnp.int32)
        state, (rm, em) = lax.scan(lambda s, p: period(s, p, hp, data), state, firsts)
        rm = jax.tree.map(lambda a: a.reshape(-1), rm)  # [periods * eval_every]
        return state, (rm, em)

    return Program(init, run, evaluate, model)
