"""The jitted update: sharded == single device, accumulation == one big batch, non-finite updates skipped."""
import pathlib
import runpy

import jax
import numpy as np
import pytest

from epo_jax.models import transformer
from epo_jax.models.config import ModelConfig
from epo_jax.train import actor_critic, optim, sharding
from epo_jax.train.update import init_train_state, make_update_fn

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPT, RESPONSE = 6, 5


def tiny_config(**algo):
    c = runpy.run_path(str(ROOT / "configs" / "base.py"))["get_config"]()
    c.rollout.max_response_len = RESPONSE
    c.model.logprob_chunk_size = 16
    c.train.total_steps = 10
    # lr 1, eps 1: Adam's first step is lr * g / (|g| + eps) ~ g, a well-conditioned function of
    # the gradient (with a tiny eps it is ~sign(g), which magnifies rounding in tiny gradients).
    c.optim.lr = 1.0
    c.optim.eps = 1.0
    c.optim.warmup_ratio = 0.0
    for key, value in algo.items():
        c.algo[key] = value
    return c


def tiny_model():
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    return transformer.init_params(cfg, jax.random.key(0)), cfg


def random_batch(rows, seed=0, full_rows=None):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 64, size=(rows, PROMPT + RESPONSE)).astype(np.int32)
    attention = np.ones_like(tokens, bool)
    attention[:, :2] = rng.random((rows, 2)) < 0.5  # some left padding
    response_mask = np.ones((rows, RESPONSE), np.float32)
    if full_rows is not None:  # rows past full_rows are padding
        response_mask[full_rows:] = 0
        attention[full_rows:] = False
    return {
        "tokens": tokens, "attention_mask": attention, "response_mask": response_mask,
        "old_logprobs": (-4.0 + 0.3 * rng.standard_normal((rows, RESPONSE))).astype(np.float32),
        "ref_logprobs": (-4.0 + 0.3 * rng.standard_normal((rows, RESPONSE))).astype(np.float32),
        "advantages": rng.standard_normal((rows, RESPONSE)).astype(np.float32) * response_mask,
        "returns": rng.standard_normal((rows, RESPONSE)).astype(np.float32),
        "old_values": rng.standard_normal((rows, RESPONSE)).astype(np.float32),
        "turn_index": rng.integers(0, 3, rows).astype(np.int32),
        "traj_id": np.arange(rows, dtype=np.int32) // 2,
    }


def run_update_states(config, batch, mesh):
    """(state before, state after, metrics) of one jitted update, on the host."""
    (graphdef, policy_params), model_cfg = tiny_model()
    params = actor_critic.init_params(config, policy_params, model_cfg.hidden_size)
    optimizer = optim.make_optimizer(config.optim, 10)
    state = init_train_state(config, params, optimizer, mesh)
    before = jax.device_get(state)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    update = jax.jit(make_update_fn(config, actor_critic.make_forward_fn(config, graphdef), optimizer),
                     in_shardings=(state_sharding, None), out_shardings=(state_sharding, None))
    new_state, metrics = update(state, sharding.shard_batch(batch, mesh))
    return before, jax.device_get(new_state), jax.device_get(metrics)


def run_update(config, batch, mesh):
    before, after, metrics = run_update_states(config, batch, mesh)
    return after.params, metrics, before.params


def mesh_of(data, fsdp, devices=None):
    c = tiny_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, 1
    return sharding.make_mesh(c.mesh, devices)


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_sharded_update_matches_single_device():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
    config = tiny_config(micro_batch_size=8)
    batch = random_batch(16)
    single, m1, before = run_update(config, batch, mesh_of(1, 1, jax.devices()[:1]))
    sharded, m8, _ = run_update(config, batch, mesh_of(4, 2))
    assert_trees_close(single, sharded, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    # And the update did something.
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(before))) > 1e-4


def test_accumulation_equals_one_big_micro_batch():
    """With equal-length rows and token-mean, 4 micro-batches of 2 rows == 1 of 8 rows."""
    mesh = mesh_of(1, 1, jax.devices()[:1])
    batch = random_batch(8)
    batch["attention_mask"][:] = True
    big, _, _ = run_update(tiny_config(micro_batch_size=8), batch, mesh)
    accumulated, _, _ = run_update(tiny_config(micro_batch_size=2), batch, mesh)
    assert_trees_close(big, accumulated, rtol=1e-5, atol=1e-6)


def test_padding_micro_batches_do_not_dilute_the_gradient():
    mesh = mesh_of(1, 1, jax.devices()[:1])
    batch = random_batch(4)
    batch["attention_mask"][:] = True
    padded = {k: np.concatenate([v, np.zeros_like(v)]) for k, v in batch.items()}
    padded["traj_id"][4:] = 100 + np.arange(4)
    base, _, _ = run_update(tiny_config(micro_batch_size=4), batch, mesh)
    with_padding, _, _ = run_update(tiny_config(micro_batch_size=4), padded, mesh)
    assert_trees_close(base, with_padding, rtol=1e-5, atol=1e-6)


def float_leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree) if np.issubdtype(np.asarray(x).dtype, np.inexact)]


def assert_trees_equal(a, b):
    a_leaves, b_leaves = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(a_leaves) == len(b_leaves)
    for x, y in zip(a_leaves, b_leaves):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_non_finite_update_is_skipped():
    mesh = mesh_of(1, 1, jax.devices()[:1])
    batch = random_batch(8)
    batch["advantages"][0, 0] = np.nan
    before, after, metrics = run_update_states(tiny_config(micro_batch_size=4), batch, mesh)
    assert metrics["skipped"] == 1.0
    assert_trees_equal(after.params, before.params)
    assert_trees_equal(after.opt_state, before.opt_state)
    # The step's only update was skipped: the entropy history stays empty; the RL step advances.
    assert_trees_equal(after.loss_state.entropy_history, before.loss_state.entropy_history)
    assert int(after.loss_state.step) == 1


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e39 -> inf in float32
@pytest.mark.parametrize("lr", [1e30, 1e39])
def test_huge_learning_rate_skips_every_update(lr):
    """lr 1e30: the step (~1e30 per parameter) is finite elementwise, but its sum of squares is not,
    and applied it would make every later forward pass overflow; lr 1e39 is inf in float32. Either
    way each minibatch update is skipped: params and optimizer state unchanged and finite."""
    mesh = mesh_of(1, 1, jax.devices()[:1])
    config = tiny_config(micro_batch_size=2, num_minibatches=2)
    config.optim.lr = lr
    before, after, metrics = run_update_states(config, random_batch(8), mesh)
    assert metrics["skipped"] == 2.0
    for leaf in float_leaves((after.params, after.opt_state, after.loss_state)):
        assert np.all(np.isfinite(leaf))
    assert_trees_equal(after.params, before.params)
    assert_trees_equal(after.opt_state, before.opt_state)
    assert_trees_equal(after.loss_state.entropy_history, before.loss_state.entropy_history)
    assert metrics["token_count"] == 0.0


def test_a_skipped_minibatch_leaves_the_history_to_the_applied_ones():
    """Two minibatches, one holding a NaN advantage: one update is skipped, the other applied, and
    the history takes the applied minibatch's tokens only (half of the batch's)."""
    mesh = mesh_of(1, 1, jax.devices()[:1])
    batch = random_batch(8)
    batch["advantages"][3, 1] = np.nan
    before, after, metrics = run_update_states(tiny_config(micro_batch_size=2, num_minibatches=2), batch, mesh)
    assert metrics["skipped"] == 1.0
    assert metrics["token_count"] == pytest.approx(batch["response_mask"].sum() / 2)
    history = after.loss_state.entropy_history
    assert int(history.num_steps) == 1
    np.testing.assert_allclose(history.step_mean_sum, metrics["entropy_sum"] / metrics["token_count"], rtol=1e-6)
    assert any(np.any(x != y) for x, y in zip(float_leaves(after.params), float_leaves(before.params)))
    for leaf in float_leaves((after.params, after.opt_state)):
        assert np.all(np.isfinite(leaf))


@pytest.mark.parametrize("epochs, minibatches", [(2, 2)])
def test_epochs_and_minibatches_run_and_advance_history(epochs, minibatches):
    mesh = mesh_of(1, 1, jax.devices()[:1])
    config = tiny_config(micro_batch_size=2, ppo_epochs=epochs, num_minibatches=minibatches)
    batch = random_batch(8)
    _, after, metrics = run_update_states(config, batch, mesh)
    assert np.isfinite(metrics["loss"]) and metrics["skipped"] == 0.0
    # The history takes the first epoch's tokens once: every response token of the batch.
    assert metrics["token_count"] == pytest.approx(batch["response_mask"].sum())
    assert int(after.loss_state.entropy_history.num_steps) == 1
