"""The policy (and critic) update of one RL step, jitted whole.

`make_update_fn(...)` returns `update(train_state, batch) -> (train_state, metrics)`: PPO
epochs x minibatches x micro-batches (gradient accumulation) as nested `lax.scan`s, AdamW, and
a guard on every minibatch update: it is applied only when all of its results are finite (the
loss, the gradient, the update, the new parameters and the new optimizer state, each with a
finite float32 sum of squares); otherwise the parameters and optimizer state stay as they were
and metrics["skipped"] counts it (out of algo.ppo_epochs x algo.num_minibatches updates).
A sum of squares, not only the elements, is checked: parameters or steps of magnitude ~1e30
(a learning rate of 1e30) are finite elementwise but poison the next forward pass.

EPO's entropy history advances once per RL step with the entropy of the step's first epoch,
taken over the minibatches whose update was applied: when some are skipped it is the mean over
the others' tokens, and when every first-epoch update is skipped the history stays as it was
(the step counter k of the LossState advances regardless: it is the RL step, which beta_k and
Clip-Cov's draws follow).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from epo_jax.algo import EntropySums, LossSettings, LossState, loss_state_init, loss_state_update, make_loss_fn
from epo_jax.train import progress, sharding
from epo_jax.train.batch import micro_batches_per_minibatch


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


def _finite(*trees: Any) -> jax.Array:
    """True when the sum of squares of every floating leaf of `trees` is finite in float32
    (integer leaves, such as optimizer step counts, cannot overflow)."""
    finite = jnp.ones((), bool)
    for leaf in jax.tree.leaves(trees):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            finite = finite & jnp.isfinite(jnp.sum(jnp.square(leaf.astype(jnp.float32))))
    return finite


class GuardedUpdate(NamedTuple):
    """One minibatch's optimizer step after the guard."""

    params: Any
    opt_state: Any
    applied: jax.Array    # bool scalar: the step's results were all finite and it was applied
    grad_norm: jax.Array


def guarded_optimizer_step(optimizer: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any,
                           loss: jax.Array) -> GuardedUpdate:
    """Applies `optimizer` to `grads`, or keeps params and opt_state when a result is not finite."""
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    applied = (jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(loss))
               & _finite(updates, new_params, new_opt_state))
    return GuardedUpdate(_tree_where(applied, new_params, params), _tree_where(applied, new_opt_state, opt_state),
                         applied, grad_norm)


def _split_rows(batch: dict[str, jax.Array], num_minibatches: int, micro_batch_size: int) -> dict[str, jax.Array]:
    """[B, ...] -> [minibatches, micro-batches, micro_batch_size, ...], strided: row r goes to
    micro-batch r mod n, so every micro-batch takes rows from every device's block of the
    data-sharded batch and no rows move between devices."""
    return jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape(micro_batch_size, num_minibatches, -1, *x.shape[1:]), 0, 2), batch)


def _history_sums_metrics(sums: EntropySums) -> dict[str, jax.Array]:
    return {"entropy_sum": sums.entropy_sum, "token_count": sums.token_count,
            "turn_entropy_sum": sums.turn_entropy_sum_M, "turn_token_count": sums.turn_token_count_M}


def make_update_fn(config, forward_fn: Callable[[Any, Mapping[str, jax.Array]], dict],
                   optimizer: optax.GradientTransformation
                   ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]:
    """Builds the jittable update of one RL step.

    `batch` arrays have a leading dimension B = algo.num_minibatches x (micro-batches per
    minibatch) x algo.micro_batch_size; the micro-batch count follows from B, so each row count
    compiles once. Rows past the real samples are padding with an all-zero response_mask.

    Metrics: the loss's metrics and grad_norm averaged over epochs and minibatches, skipped (the
    number of minibatch updates the guard refused), and the entropy sums that entered the history
    (entropy_sum, token_count, turn_entropy_sum [epo.max_turns], turn_token_count).
    """
    grad_fn = jax.value_and_grad(make_loss_fn(LossSettings.from_config(config), forward_fn), has_aux=True)
    epochs = int(config.algo.ppo_epochs)
    num_minibatches = int(config.algo.num_minibatches)
    micro_batch_size = int(config.algo.micro_batch_size)

    def minibatch_step(carry, minibatch):
        params, opt_state, loss_state = carry

        def micro_step(grads_acc, micro_batch):
            (_, (metrics, sums)), grads = grad_fn(params, micro_batch, loss_state)
            # Tells the run's progress line that this micro-batch is done (after its loss exists).
            jax.debug.callback(progress.micro_batch_done, metrics["loss"])
            return jax.tree.map(jnp.add, grads_acc, grads), (metrics, sums)

        grads, (metrics, sums) = jax.lax.scan(micro_step, jax.tree.map(jnp.zeros_like, params), minibatch)
        # Mean over the micro-batches that hold samples: all-padding ones (the row count is
        # rounded up to few shapes) must not dilute the gradient.
        filled = jnp.sum(jnp.any(minibatch["response_mask"] > 0, axis=(1, 2)))
        grads = jax.tree.map(lambda g: g / jnp.maximum(filled, 1), grads)
        step = guarded_optimizer_step(optimizer, grads, opt_state, params, metrics["loss"])
        metrics = {k: jnp.mean(v, 0) for k, v in metrics.items()}
        metrics["grad_norm"] = step.grad_norm
        metrics["skipped"] = (~step.applied).astype(jnp.float32)
        # A skipped minibatch's entropies stay out of the history (they may be the fault's NaNs).
        applied_sums = jax.tree.map(lambda x: jnp.where(step.applied, jnp.sum(x, 0), 0.0), sums)
        return (step.params, step.opt_state, loss_state), (metrics, applied_sums)

    def update(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        rng, shuffle_rng = jax.random.split(state.rng)
        num_rows = batch["response_mask"].shape[0]
        micro_batches_per_minibatch(num_rows, num_minibatches=num_minibatches, micro_batch_size=micro_batch_size)

        def epoch_step(carry, epoch_rng):
            if epochs > 1:  # Several passes: reshuffle rows across minibatches each epoch.
                order = jax.random.permutation(epoch_rng, num_rows)
                epoch_batch = jax.tree.map(lambda x: x[order], batch)
            else:
                epoch_batch = batch
            return jax.lax.scan(minibatch_step, carry, _split_rows(epoch_batch, num_minibatches, micro_batch_size))

        carry = (state.params, state.opt_state, state.loss_state)
        (params, opt_state, loss_state), (metrics, sums) = jax.lax.scan(
            epoch_step, carry, jax.random.split(shuffle_rng, epochs))
        # metrics and sums: [epochs, minibatches, ...]. The history takes the first epoch's entropy.
        first_epoch: EntropySums = jax.tree.map(lambda x: jnp.sum(x[0], 0), sums)
        out = {k: jnp.mean(v) for k, v in metrics.items()}
        out["skipped"] = jnp.sum(metrics["skipped"])
        out.update(_history_sums_metrics(first_epoch))
        return TrainState(params, opt_state, loss_state_update(loss_state, first_epoch), rng), out

    return update


def skip_rl_step(state: TrainState) -> TrainState:
    """RL step k -> k + 1 without an update (the step had no sample to learn from): the phase
    schedule stays in step with the run; parameters, optimizer state and history are unchanged."""
    turns = state.loss_state.entropy_history.turn_mean_sum_M.shape[0]
    no_tokens = EntropySums(entropy_sum=jnp.zeros((), jnp.float32), token_count=jnp.zeros((), jnp.float32),
                            turn_entropy_sum_M=jnp.zeros((turns,), jnp.float32),
                            turn_token_count_M=jnp.zeros((turns,), jnp.float32))
    return state._replace(loss_state=loss_state_update(state.loss_state, no_tokens))
