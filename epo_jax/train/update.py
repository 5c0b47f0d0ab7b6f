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

from epo_jax.algo import EntropySums, LossSettings, LossState, loss_state_init, loss_state_update, make_loss_fn
from epo_jax.train import sharding


class TrainState(NamedTuple):
    """Everything an RL step changes; a pytree, checkpointed whole."""

    params: Any            # {"policy": model params, ["value_head" | "critic"]: critic params}
    opt_state: Any
    loss_state: LossState  # RL step k and EPO's entropy history
    rng: jax.Array         # PRNG key of the run (rollouts and minibatch shuffling)


def init_train_state(config, params: Any, optimizer: optax.GradientTransformation,
                     mesh: jax.sharding.Mesh) -> TrainState:
    """The state at step 0 with params placed on the mesh (`sharding.place_params`), optimizer
    moments sharded like their params, and the small pieces replicated."""
    params = sharding.place_params(params, mesh)
    replicated = sharding.replicated(mesh)
    opt_state = jax.jit(optimizer.init)(params)  # moments follow their params' sharding
    # Commit every leaf (scalars replicated) so that the update's outputs, which are committed,
    # match its inputs and the second step does not compile again.
    opt_state = jax.tree.map(
        lambda x: (x if x.committed else jax.device_put(x, x.sharding))
        if len(x.sharding.device_set) == mesh.size else sharding.put(x, replicated), opt_state)
    return TrainState(params=params, opt_state=opt_state,
                      loss_state=sharding.put(loss_state_init(LossSettings.from_config(config)), replicated),
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
    loss_fn = make_loss_fn(LossSettings.from_config(config), forward_fn)
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
            (_, (metrics, sums)), grads = grad_fn(params, micro_batch, loss_state)
            return jax.tree.map(jnp.add, grads_acc, grads), (metrics, sums)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (metrics, sums) = jax.lax.scan(micro_step, zeros, minibatch)
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
        metrics = {k: jnp.mean(v, 0) for k, v in metrics.items()}
        metrics["grad_norm"] = grad_norm
        metrics["skipped"] = (~finite).astype(jnp.float32)
        return (params, opt_state, loss_state), (metrics, jax.tree.map(lambda x: jnp.sum(x, 0), sums))

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
        (params, opt_state, loss_state), (metrics, sums) = jax.lax.scan(
            epoch_step, carry, jax.random.split(shuffle_rng, epochs))
        # metrics and sums: [epochs, minibatches, ...]. The history takes the first epoch's entropy.
        first_epoch: EntropySums = jax.tree.map(lambda x: jnp.sum(x[0], 0), sums)
        new_loss_state = loss_state_update(loss_state, first_epoch)
        out = {k: jnp.mean(v) for k, v in metrics.items()}
        out["skipped"] = jnp.sum(metrics["skipped"])
        out.update(entropy_sum=first_epoch.entropy_sum, token_count=first_epoch.token_count,
                   turn_entropy_sum=first_epoch.turn_entropy_sum_M, turn_token_count=first_epoch.turn_token_count_M)
        return TrainState(params, opt_state, new_loss_state, rng), out

    return update
