"""The policy (and critic) update of one RL step, jitted whole.

`make_update_fn(...)` returns `update(train_state, batch) -> (train_state, metrics)`: PPO
epochs x minibatches x micro-batches (gradient accumulation) as nested `lax.scan`s, AdamW, and
a guard that skips an update whose loss or gradient is not finite (the parameters and
optimizer state stay as they were; `update/skipped` counts it). EPO's entropy history advances
once per RL step with the entropy of the step's first epoch.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from epo_jax.algo import (EntropySums, LossState, entropy_sums_from_metrics, loss_state_init, loss_state_update,
                          make_loss_fn)
from epo_jax.train import sharding

# Metrics that are sums over micro-batches (the rest are averaged).
_SUMMED = ("entropy_sum", "token_count", "turn_entropy_sum", "turn_token_count")


class TrainState(NamedTuple):
    """Everything an RL step changes; a pytree, checkpointed whole."""

    params: Any            # {"policy": model params, ["value_head" | "critic"]: critic params}
    opt_state: Any
    loss_state: LossState  # RL step k and EPO's entropy history
    rng: jax.Array         # PRNG key of the run (rollouts and minibatch shuffling)


def init_train_state(config, params: Any, optimizer: optax.GradientTransformation,
                     mesh: jax.sharding.Mesh) -> TrainState:
    """The state at step 0 with params placed on the mesh (`sharding.place_params`), optimizer
    moments sharded like their params (`sharding.opt_state_shardings`), and the small pieces
    replicated; every leaf is committed, as the update's outputs are, so that the second step does
    not compile again."""
    params = sharding.place_params(params, mesh)
    replicated = sharding.replicated(mesh)
    opt_shardings = sharding.opt_state_shardings(jax.eval_shape(optimizer.init, params), params, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    return TrainState(params=params, opt_state=opt_state,
                      loss_state=sharding.put(loss_state_init(config), replicated),
                      rng=sharding.put(jax.random.key(config.seed), replicated))


def _tree_where(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_update_fn(config, forward_fn: Callable[[Any, Mapping[str, jax.Array]], dict],
                   optimizer: optax.GradientTransformation
                   ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]:
    """Builds the jittable update of one RL step.

    `batch` arrays have a leading dimension B = algo.num_minibatches x (micro-batches per
    minibatch) x algo.micro_batch_size; the micro-batch count follows from B, so each row count
    compiles once. Rows past the real samples are padding with an all-zero response_mask.
    """
    loss_fn = make_loss_fn(config, forward_fn)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    epochs = int(config.algo.ppo_epochs)
    num_minibatches = int(config.algo.num_minibatches)
    micro_batch_size = int(config.algo.micro_batch_size)

    def num_micro_batches(num_rows: int) -> int:
        if num_rows % (num_minibatches * micro_batch_size):
            raise ValueError(f"update: {num_rows} rows are not a multiple of algo.num_minibatches x "
                             f"algo.micro_batch_size = {num_minibatches * micro_batch_size}")
        return num_rows // (num_minibatches * micro_batch_size)

    def minibatch_step(carry, minibatch):
        params, opt_state, loss_state = carry

        def micro_step(grads_acc, micro_batch):
            (_, metrics), grads = grad_fn(params, micro_batch, loss_state)
            return jax.tree.map(jnp.add, grads_acc, grads), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, metrics = jax.lax.scan(micro_step, zeros, minibatch)
        # Mean over the micro-batches that hold samples: all-padding ones (the row count is
        # rounded up to few shapes) must not dilute the gradient.
        filled = jnp.sum(jnp.any(minibatch["response_mask"] > 0, axis=(1, 2)))
        grads = jax.tree.map(lambda g: g / jnp.maximum(filled, 1), grads)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(metrics["loss"]))
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        params = _tree_where(finite, new_params, params)
        opt_state = _tree_where(finite, new_opt_state, opt_state)
        metrics = {k: (jnp.sum(v, 0) if k in _SUMMED else jnp.mean(v, 0)) for k, v in metrics.items()}
        metrics["grad_norm"] = grad_norm
        metrics["skipped"] = (~finite).astype(jnp.float32)
        return (params, opt_state, loss_state), metrics

    def update(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        rng, shuffle_rng = jax.random.split(state.rng)
        num_rows = batch["response_mask"].shape[0]
        num_micro_batches(num_rows)  # checks the row count

        def epoch_step(carry, epoch_rng):
            if epochs > 1:  # Several passes: reshuffle rows across minibatches each epoch.
                order = jax.random.permutation(epoch_rng, num_rows)
                epoch_batch = jax.tree.map(lambda x: x[order], batch)
            else:
                epoch_batch = batch
            # Strided split (row r -> micro-batch r mod n): every micro-batch takes rows from every
            # device's block of the data-sharded batch, so no rows move between devices.
            shaped = jax.tree.map(
                lambda x: jnp.moveaxis(x.reshape(micro_batch_size, num_minibatches, -1, *x.shape[1:]), 0, 2),
                epoch_batch)
            return jax.lax.scan(minibatch_step, carry, shaped)

        carry = (state.params, state.opt_state, state.loss_state)
        (params, opt_state, loss_state), metrics = jax.lax.scan(
            epoch_step, carry, jax.random.split(shuffle_rng, epochs))
        # metrics: [epochs, minibatches, ...]. The history takes the first epoch's entropy.
        first_epoch = {k: jnp.sum(metrics[k][0], 0) for k in _SUMMED}
        new_loss_state = loss_state_update(loss_state, entropy_sums_from_metrics(first_epoch))
        out = {k: jnp.mean(v) for k, v in metrics.items() if k not in _SUMMED}
        out["skipped"] = jnp.sum(metrics["skipped"])
        out.update(first_epoch)
        return TrainState(params, opt_state, new_loss_state, rng), out

    return update


def skip_rl_step(state: TrainState) -> TrainState:
    """RL step k -> k + 1 without an update (the step had no sample to learn from): the phase
    schedule stays in step with the run; parameters, optimizer state and history are unchanged."""
    turns = state.loss_state.entropy_history.turn_mean_sum_M.shape[0]
    no_tokens = EntropySums(entropy_sum=jnp.zeros((), jnp.float32), token_count=jnp.zeros((), jnp.float32),
                            turn_entropy_sum_M=jnp.zeros((turns,), jnp.float32),
                            turn_token_count_M=jnp.zeros((turns,), jnp.float32))
    return state._replace(loss_state=loss_state_update(state.loss_state, no_tokens))
