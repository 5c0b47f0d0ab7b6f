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
from epo_jax.train import actor_critic, progress, sharding
from epo_jax.train.batch import PACK_KEYS, micro_batches_per_minibatch


class TrainState(NamedTuple):
    """Everything an RL step changes, and the frozen weights it reads (LoRA's base, inside
    params["policy"]; see epo_jax.train.actor_critic); a pytree, checkpointed without those
    (`checkpointed`)."""

    params: Any            # {"policy": model params, ["value_head" | "critic"]: critic params}
    opt_state: Any         # of the trained params only (actor_critic.split_trainable)
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
    # Moments follow their params' sharding; with LoRA only the adapters and heads have any.
    trainable = actor_critic.split_trainable(params)[0]
    opt_shardings = sharding.opt_state_shardings(jax.eval_shape(optimizer.init, trainable), trainable, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)
    return TrainState(params=params, opt_state=opt_state,
                      loss_state=sharding.put(loss_state_init(LossSettings.from_config(config)), replicated),
                      rng=sharding.put(jax.random.key(config.seed), replicated))


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
    # One lax.cond over the whole state rather than a jnp.where per leaf: with a select per leaf
    # XLA:CPU took over 10 minutes and 11 GB to compile the default run's update (30 layers),
    # against 35 s with the cond (13 s without any guard).
    kept_params, kept_opt_state = jax.lax.cond(applied, lambda: (new_params, new_opt_state),
                                               lambda: (params, opt_state))
    return GuardedUpdate(kept_params, kept_opt_state, applied, grad_norm)


def _split_rows(batch: dict[str, jax.Array], num_minibatches: int, micro_batch_size: int) -> dict[str, jax.Array]:
    """[B, ...] -> [minibatches, micro-batches, micro_batch_size, ...], strided: row r goes to
    micro-batch r mod n, so every micro-batch takes rows from every device's block of the
    data-sharded batch and no rows move between devices."""
    return jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape(micro_batch_size, num_minibatches, -1, *x.shape[1:]), 0, 2), batch)


def epoch_orders(rng: jax.Array, num_rows: int, epochs: int) -> jax.Array:
    """[epochs, num_rows] int32: the order of the batch rows in each PPO epoch of the update of a
    train state whose key is `rng` (a fresh shuffle per epoch; a one-epoch update keeps the rows
    in order and reads none of it). The host computes the same orders to lay out packed rows."""
    _, shuffle_rng = jax.random.split(rng)
    return jax.vmap(lambda key: jax.random.permutation(key, num_rows))(jax.random.split(shuffle_rng, epochs))


def _epoch_minibatches(samples: dict[str, jax.Array], layout: dict[str, jax.Array], *, epochs: int,
                       num_minibatches: int, micro_batch_size: int) -> dict[str, jax.Array]:
    """One epoch's [minibatches, micro-batches, ...] inputs: the sample rows in the epoch's order,
    split, and for a packed batch the epoch's packing layout (already in that order)."""
    if epochs > 1:  # Several passes: reshuffle rows across minibatches each epoch.
        samples = jax.tree.map(lambda x: x[layout["pack_order"]], samples)
    minibatches = _split_rows(samples, num_minibatches, micro_batch_size)
    if "pack_index" in layout:
        minibatches["pack_response_start"] = _split_rows(layout["pack_response_start"], num_minibatches,
                                                         micro_batch_size)
        index = layout["pack_index"]  # [micro-batches of the epoch, G, K, L], minibatch-major
        minibatches["pack_index"] = index.reshape(num_minibatches, -1, *index.shape[1:])
    return minibatches


def _history_sums_metrics(sums: EntropySums) -> dict[str, jax.Array]:
    return {"entropy_sum": sums.entropy_sum, "token_count": sums.token_count,
            "turn_entropy_sum": sums.turn_entropy_sum_M, "turn_token_count": sums.turn_token_count_M}


def make_update_fn(config, forward_fn: Callable[[Any, Mapping[str, jax.Array]], dict],
                   optimizer: optax.GradientTransformation
                   ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]:
    """Builds the jittable update of one RL step.

    `batch` arrays have a leading dimension B = algo.num_minibatches x (micro-batches per
    minibatch) x algo.micro_batch_size; the micro-batch count follows from B, so each row count
    compiles once. Rows past the real samples are padding with an all-zero response_mask. A
    packed batch (algo.pack) adds its packing layout (`epo_jax.train.batch.PACK_KEYS`, whose
    pack_order gives each epoch's shuffle); each micro-batch then holds the samples it holds
    unpacked, and the forward pass runs on their packed rows.

    Metrics: the loss's metrics and grad_norm averaged over epochs and minibatches, skipped (the
    number of minibatch updates the guard refused), and the entropy sums that entered the history
    (entropy_sum, token_count, turn_entropy_sum [epo.max_turns], turn_token_count).
    """
    loss_fn = make_loss_fn(LossSettings.from_config(config), forward_fn)
    # Differentiated with respect to the trained params only: frozen weights get no gradient.
    grad_fn = jax.value_and_grad(
        lambda trainable, frozen, batch, loss_state: loss_fn(actor_critic.join_trainable(trainable, frozen),
                                                             batch, loss_state), has_aux=True)
    epochs = int(config.algo.ppo_epochs)
    num_minibatches = int(config.algo.num_minibatches)
    micro_batch_size = int(config.algo.micro_batch_size)

    def minibatch_step(carry, minibatch):
        params, opt_state, loss_state = carry
        params, frozen = actor_critic.split_trainable(params)

        def micro_step(grads_acc, micro_batch):
            (_, (metrics, sums)), grads = grad_fn(params, frozen, micro_batch, loss_state)
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
        return (actor_critic.join_trainable(step.params, frozen), step.opt_state, loss_state), (metrics, applied_sums)

    def update(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        rng, _ = jax.random.split(state.rng)
        num_rows = batch["response_mask"].shape[0]
        micro_batches_per_minibatch(num_rows, num_minibatches=num_minibatches, micro_batch_size=micro_batch_size)
        samples = {k: v for k, v in batch.items() if k not in PACK_KEYS}
        if "pack_index" in batch:
            # Arrangement 0 holds the rows in order, 1 + e epoch e's order (epo_jax.train.batch).
            layouts = {k: batch[k][1:] if epochs > 1 else batch[k][:1] for k in PACK_KEYS}
        else:
            layouts = {"pack_order": epoch_orders(state.rng, num_rows, epochs)}

        def epoch_step(carry, layout):
            return jax.lax.scan(minibatch_step, carry, _epoch_minibatches(
                samples, layout, epochs=epochs, num_minibatches=num_minibatches, micro_batch_size=micro_batch_size))

        carry = (state.params, state.opt_state, state.loss_state)
        (params, opt_state, loss_state), (metrics, sums) = jax.lax.scan(epoch_step, carry, layouts)
        # metrics and sums: [epochs, minibatches, ...]. The history takes the first epoch's entropy.
        first_epoch: EntropySums = jax.tree.map(lambda x: jnp.sum(x[0], 0), sums)
        out = {k: jnp.mean(v) for k, v in metrics.items()}
        out["skipped"] = jnp.sum(metrics["skipped"])
        out.update(_history_sums_metrics(first_epoch))
        return TrainState(params, opt_state, loss_state_update(loss_state, first_epoch), rng), out

    return update


def checkpointed(state: TrainState) -> TrainState:
    """What a checkpoint holds: the state without its frozen weights (LoRA's base, which a
    resumed run loads again from model.path)."""
    return state._replace(params=actor_critic.split_trainable(state.params)[0])


def with_frozen(saved: TrainState, state: TrainState) -> TrainState:
    """A restored `checkpointed` state completed with the frozen weights of `state`."""
    frozen = actor_critic.split_trainable(state.params)[1]
    return saved._replace(params=actor_critic.join_trainable(saved.params, frozen))


def skip_rl_step(state: TrainState) -> TrainState:
    """RL step k -> k + 1 without an update (the step had no sample to learn from): the phase
    schedule stays in step with the run; parameters, optimizer state and history are unchanged."""
    turns = state.loss_state.entropy_history.turn_mean_sum_M.shape[0]
    no_tokens = EntropySums(entropy_sum=jnp.zeros((), jnp.float32), token_count=jnp.zeros((), jnp.float32),
                            turn_entropy_sum_M=jnp.zeros((turns,), jnp.float32),
                            turn_token_count_M=jnp.zeros((turns,), jnp.float32))
    return state._replace(loss_state=loss_state_update(state.loss_state, no_tokens))
