"""Local training of one client, written for one client and mapped over clients."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax


def local_optimizer(lr, momentum, weight_decay, clip_norm) -> optax.GradientTransformation:
    """PyTorch-style SGD: clip the gradient's global norm, add ``wd·w``, momentum, step.

    ``buf ← μ·buf + (clip(g) + wd·w)``, ``w ← w − lr·buf`` (``torch.optim.SGD`` after
    ``clip_grad_norm_``, as in the STRIKE paper's Table 5 setup). All four numbers may
    be traced; ``clip_norm = inf`` disables clipping, ``momentum = 0`` is plain SGD.
    """
    return optax.chain(
        clip_by_global_norm(clip_norm),
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum),
        optax.scale(-lr),
    )


def clip_by_global_norm(max_norm) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` (``g ← g·max_norm/‖g‖`` when ``‖g‖ ≥ max_norm``, the
    same arithmetic), whose norm is computed only when ``max_norm`` is finite: a
    ``lax.cond`` on the traced bound. The norm is one more pass over every gradient, a
    sixth of a round of the digits MLP's 20 clients on a CPU here; the cond returns the
    norm alone, so skipping it copies nothing."""

    def update(updates, state, params=None):
        del params
        g_norm = lax.cond(
            jnp.isinf(max_norm), lambda u: jnp.zeros((), jnp.float32), optax.tree.norm, updates
        )
        keep = g_norm < max_norm
        clip = lambda t: lax.select(keep, t, (t / g_norm.astype(t.dtype)) * max_norm)  # noqa: E731
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over the examples where ``mask`` is set (0 when none)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    w = mask.astype(loss.dtype)
    return jnp.sum(loss * w) / jnp.maximum(w.sum(), 1.0)


def make_client_update(
    apply_fn: Callable,
    normalize: Callable[[jax.Array], jax.Array],
    *,
    batch_size: int,
    local_epochs: int,
    local_steps: int | None,
    shared_first_step: bool = False,
) -> Callable:
    """Builds ``client_update(params, i, x, y, count, key, opt, relabel) -> (g, mean_loss)``.

    ``x: [n, m_max, ...]`` and ``y: [n, m_max]`` hold every client's padded block; client
    ``i``'s examples are ``x[i, :count]``. Batches are gathered as ``x[i, idx]`` straight
    from the shared arrays, so no client's block is ever copied (slicing ``x[i]`` first
    costs a copy of the whole block per client, which dominates a round of few local
    steps on a CPU). Each local epoch visits them in a fresh
    random order in mini-batches of ``B``, the last one partial with its padding masked
    out of the loss. A client takes ``E·⌈count/B⌉`` steps (or ``K`` with ``local_steps``),
    so clients with fewer examples take fewer steps: the loops have data-dependent trip
    counts, which stop early when clients run one at a time and which JAX masks under
    ``vmap``, so no client ever trains on padding. ``relabel`` maps the batch's labels
    (label flipping); identity for honest clients. Returns the update ``g = w − w_local``
    as a pytree like ``params`` (the caller flattens the mapped clients' updates into
    ``[m, d]`` once, see ``ops.to_matrix``) and the mean loss over the steps taken.

    ``shared_first_step`` takes the first step from the shared ``params``, outside the
    loops: under ``vmap`` its forward pass is then one matrix product over every client's
    batch (inside a loop the carried weights are per client), and with one local step
    there is no loop at all (1.3-2x faster rounds for the MLPs of
    ``benchmarks/round_speed.py`` on a CPU). Clients run one at a time gain nothing from
    it, and keep the loop-only program.
    """
    B = batch_size

    def client_update(params, i, x, y, count, key, opt: optax.GradientTransformation, relabel):
        m_max = x.shape[1]
        span = -(-m_max // B) * B  # the index buffer covers every batch start
        # An epoch reads at most ``local_steps`` batches of its order: when those are fewer
        # than the block, ``top_k`` finds them in O(m_max) instead of sorting the block
        # (same indices: XLA's top-k breaks ties by the lower index, as the stable argsort).
        used = span if local_steps is None else min(span, local_steps * B)
        per_epoch = jnp.maximum(-(-count // B), 1)
        steps = local_steps if local_steps is not None else local_epochs * per_epoch
        steps = jnp.where(count > 0, steps, 0)
        is_real = jnp.arange(m_max) < count

        def loss_fn(p, xb, yb, mask):
            return masked_cross_entropy(apply_fn(p, normalize(xb)), yb, mask)

        def order_of(e):
            keys = jax.random.uniform(jax.random.fold_in(key, e), (m_max,))
            keys = jnp.where(is_real, keys, 2.0)  # padding sorts last
            if used < m_max:
                return lax.top_k(-keys, used)[1]
            return jnp.pad(jnp.argsort(keys), (0, used - m_max))

        def step(order, pos, carry):
            p, opt_state, loss_sum = carry
            mask = pos * B + jnp.arange(B) < count
            # Slots past the client's examples reuse a real one (with zero weight), so
            # padding never enters the computation, not even multiplied by zero.
            idx = jnp.where(mask, lax.dynamic_slice(order, (pos * B,), (B,)), order[0])
            loss, grads = jax.value_and_grad(loss_fn)(p, x[i, idx], relabel(y[i, idx]), mask)
            updates, opt_state = opt.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss_sum + loss

        carry = (params, opt.init(params), jnp.zeros((), jnp.float32))
        if shared_first_step:
            first = step(order_of(0), 0, carry)
            carry = jax.tree.map(lambda a, b: jnp.where(steps > 0, a, b), first, carry)

        def epoch(e, carry):
            start = jnp.where(e == 0, 1, 0) if shared_first_step else 0
            stop = jnp.minimum(per_epoch, steps - e * per_epoch)
            return lax.fori_loop(start, stop, functools.partial(step, order_of(e)), carry)

        if not (shared_first_step and local_steps == 1):
            carry = lax.fori_loop(0, -(-steps // per_epoch), epoch, carry)
        final, _, loss_sum = carry
        g = jax.tree.map(jnp.subtract, params, final)
        return g, loss_sum / jnp.maximum(steps, 1)

    return client_update


def map_clients(fn: Callable, args, parallelism: int):
    """Applies ``fn`` to every client (leading axis of ``args``, typically client indices).

    ``parallelism >= m`` vmaps all clients at once (accelerators); smaller values run
    chunks of that many clients one after another inside the compiled program
    (``lax.map``), which on CPU is fastest at 1.
    """
    m = jax.tree.leaves(args)[0].shape[0]
    if parallelism >= m:
        return jax.vmap(fn)(*args)
    return lax.map(lambda a: fn(*a), args, batch_size=None if parallelism == 1 else parallelism)
