"""Loss aggregation modes against hand-computed cases and numpy loops written from the spec."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epo_jax.algo import LOSS_AGG_MODES, aggregate_loss, dense_segment_ids

# Three turn samples of two trajectories plus one padding row.
LOSS = np.array(
    [
        [1.0, 2.0, 3.0, 0.0],
        [4.0, 0.0, 0.0, 0.0],
        [2.0, 2.0, 0.0, 0.0],
        [9.0, 9.0, 9.0, 9.0],
    ],
    np.float32,
)
MASK = np.array(
    [
        [1, 1, 1, 0],
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
    ],
    np.float32,
)
TRAJ = np.array([7, 7, 3, 5], np.int32)


@pytest.mark.parametrize(
    "mode, expected",
    [
        # (1 + 2 + 3 + 4 + 2 + 2) / 6 tokens
        ("token-mean", 14.0 / 6.0),
        # rows: mean 2, 4, 2 -> mean over the 3 valid rows
        ("seq-mean-token-mean", 8.0 / 3.0),
        # rows: sum 6, 4, 4 -> mean over the 3 valid rows
        ("seq-mean-token-sum", 14.0 / 3.0),
        # sum / T with T = 4 columns
        ("seq-mean-token-sum-norm", 14.0 / 4.0),
        # trajectory 7: turns with means 2 and 4 -> 3; trajectory 3: 2; padding trajectory 5 counts nowhere
        ("trajectory", (3.0 + 2.0) / 2.0),
    ],
)
def test_hand_computed_cases(mode, expected):
    value = aggregate_loss(jnp.asarray(LOSS), jnp.asarray(MASK), mode, jnp.asarray(TRAJ))
    np.testing.assert_allclose(value, expected, rtol=1e-6)


def numpy_aggregate(loss, mask, mode, traj):
    """Spec section 3 / EPO Eq. 2 as explicit loops over rows and trajectories."""
    rows = [b for b in range(loss.shape[0]) if mask[b].sum() > 0]
    if not rows:
        return 0.0
    row_sum = {b: float(np.sum(loss[b] * mask[b])) for b in rows}
    row_mean = {b: row_sum[b] / float(mask[b].sum()) for b in rows}
    if mode == "token-mean":
        return sum(row_sum.values()) / float(mask.sum())
    if mode == "seq-mean-token-mean":
        return float(np.mean([row_mean[b] for b in rows]))
    if mode == "seq-mean-token-sum":
        return float(np.mean([row_sum[b] for b in rows]))
    if mode == "seq-mean-token-sum-norm":
        return sum(row_sum.values()) / loss.shape[1]
    turns = {}
    for b in rows:
        turns.setdefault(int(traj[b]), []).append(row_mean[b])
    return float(np.mean([np.mean(v) for v in turns.values()]))


@functools.partial(jax.jit, static_argnames=("mode",))
def jit_aggregate_with_grad(loss, mask, traj, mode):
    return jax.value_and_grad(lambda x: aggregate_loss(x, mask, mode, traj))(loss)


@st.composite
def masked_batches(draw):
    """A 5 x 4 loss matrix with a random mask (empty rows included) and trajectory ids in [-3, 3)."""
    rng = np.random.default_rng(draw(st.integers(0, 10_000)))
    loss = rng.normal(size=(5, 4)).astype(np.float32)
    mask = (rng.random((5, 4)) < draw(st.floats(0.0, 1.0))).astype(np.float32)
    traj = rng.integers(-3, 3, size=5).astype(np.int32)
    return loss, mask, traj


@settings(max_examples=30, deadline=None)
@given(batch=masked_batches(), mode=st.sampled_from(LOSS_AGG_MODES))
def test_matches_numpy_loops(batch, mode):
    loss, mask, traj = batch
    value, _ = jit_aggregate_with_grad(loss, mask, traj, mode)
    np.testing.assert_allclose(value, numpy_aggregate(loss, mask, mode, traj), rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(batch=masked_batches(), mode=st.sampled_from(LOSS_AGG_MODES), garbage_seed=st.integers(0, 100))
def test_masked_tokens_change_neither_value_nor_gradient(batch, mode, garbage_seed):
    loss, mask, traj = batch
    garbage = np.random.default_rng(garbage_seed).normal(scale=1e3, size=loss.shape).astype(np.float32)
    garbage[0, 0] = np.inf
    dirty = np.where(mask > 0, loss, garbage)
    clean_value, clean_grad = jit_aggregate_with_grad(loss, mask, traj, mode)
    dirty_value, dirty_grad = jit_aggregate_with_grad(dirty, mask, traj, mode)
    np.testing.assert_array_equal(clean_value, dirty_value)
    np.testing.assert_array_equal(clean_grad, dirty_grad)
    np.testing.assert_array_equal(np.asarray(clean_grad)[mask == 0], 0.0)


@settings(max_examples=25, deadline=None)
@given(batch=masked_batches(), mode=st.sampled_from(LOSS_AGG_MODES))
def test_padding_rows_count_nowhere(batch, mode):
    loss, mask, traj = batch
    extra_rows = 2
    padded_loss = np.concatenate([loss, np.full((extra_rows, 4), 5.0, np.float32)])
    padded_mask = np.concatenate([mask, np.zeros((extra_rows, 4), np.float32)])
    # Padding rows may even share a real trajectory's id.
    padded_traj = np.concatenate([traj, np.full(extra_rows, traj[0], np.int32)])
    plain, _ = jit_aggregate_with_grad(loss, mask, traj, mode)
    padded, _ = jit_aggregate_with_grad(padded_loss, padded_mask, padded_traj, mode)
    np.testing.assert_allclose(plain, padded, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", [m for m in LOSS_AGG_MODES if m != "seq-mean-token-sum-norm"])
def test_padding_columns_change_nothing_except_the_sum_norm(mode):
    padded_loss = np.pad(LOSS, ((0, 0), (0, 3)), constant_values=4.0)
    padded_mask = np.pad(MASK, ((0, 0), (0, 3)))
    plain = aggregate_loss(jnp.asarray(LOSS), jnp.asarray(MASK), mode, jnp.asarray(TRAJ))
    padded = aggregate_loss(jnp.asarray(padded_loss), jnp.asarray(padded_mask), mode, jnp.asarray(TRAJ))
    np.testing.assert_allclose(plain, padded, rtol=1e-6)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_jit_matches_eager(mode):
    fn = lambda l, m, t: aggregate_loss(l, m, mode, t)  # noqa: E731
    args = (jnp.asarray(LOSS), jnp.asarray(MASK), jnp.asarray(TRAJ))
    np.testing.assert_allclose(jax.jit(fn)(*args), fn(*args), rtol=1e-6)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_all_padding_batch_gives_zero(mode):
    value = aggregate_loss(jnp.ones((2, 3)), jnp.zeros((2, 3)), mode, jnp.array([0, 1]))
    np.testing.assert_array_equal(value, 0.0)


def test_trajectory_gradient_weights_each_trajectory_equally():
    grad = jax.grad(lambda l: aggregate_loss(l, jnp.asarray(MASK), "trajectory", jnp.asarray(TRAJ)))(jnp.asarray(LOSS))
    # 2 trajectories -> 1/2 each; trajectory 7 has 2 turns -> 1/4 per turn; divided by the turn's tokens.
    expected = np.zeros_like(LOSS)
    expected[0, :3] = 1.0 / 2 / 2 / 3
    expected[1, 0] = 1.0 / 2 / 2 / 1
    expected[2, :2] = 1.0 / 2 / 1 / 2
    np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_dense_segment_ids_group_equal_ids():
    ids = jnp.array([42, -7, 42, 3, -7, 1_000_000])
    np.testing.assert_array_equal(dense_segment_ids(ids), [0, 1, 0, 3, 1, 5])


def test_unknown_mode_and_missing_traj_ids_are_rejected():
    with pytest.raises(ValueError, match="token-sum"):
        aggregate_loss(jnp.asarray(LOSS), jnp.asarray(MASK), "token-sum")
    with pytest.raises(ValueError, match="traj_id_B"):
        aggregate_loss(jnp.asarray(LOSS), jnp.asarray(MASK), "trajectory")
