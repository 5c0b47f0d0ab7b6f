"""Reductions of per-token [B, T] matrices over masked tokens.

Each row of a batch is one turn sample (prompt = observation + history, response = that turn's
tokens); a row whose mask is all zero is padding and counts nowhere. Masked entries of the loss
matrix never reach the result, not even as NaN or inf.
"""
import chex
import jax
import jax.numpy as jnp

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "trajectory",
)


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator where denominator > 0, else 0 (empty groups contribute nothing)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), 0.0)


def masked_sum(values: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """sum(values * mask), with masked entries (mask == 0) excluded even when they are inf/NaN."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask > 0, values * mask, 0.0), axis=axis)


def masked_mean(values: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """sum(values * mask) / sum(mask); 0 where the mask is empty."""
    return safe_divide(masked_sum(values, mask, axis), jnp.sum(mask.astype(jnp.float32), axis=axis))


def dense_segment_ids(ids_N: jax.Array) -> jax.Array:
    """Maps arbitrary integer ids to the index of their first occurrence, a segment id in [0, N).

    Equal ids get equal segment ids, so `jax.ops.segment_sum(..., num_segments=N)` groups them with
    a static segment count whatever the range of the caller's ids (global trajectory numbers,
    hashes of observation text). O(N^2) comparisons: fine for the few thousand turn samples of
    one RL step.
    """
    chex.assert_rank(ids_N, 1)
    return jnp.argmax(ids_N[:, None] == ids_N[None, :], axis=1).astype(jnp.int32)


def aggregate_loss(
    loss_BxT: jax.Array,
    mask_BxT: jax.Array,
    mode: str,
    traj_id_B: jax.Array | None = None,
) -> jax.Array:
    """Reduces a per-token loss matrix L with mask M to a scalar (docs/algorithms.md section 3, verl's agg_loss).

    Modes, with valid rows b (sum_t M_bt > 0) and T the padded response length:
      token-mean:              sum(L M) / sum(M)
      seq-mean-token-mean:     mean_b [ sum_t L M / sum_t M ]
      seq-mean-token-sum:      mean_b [ sum_t L M ]
      seq-mean-token-sum-norm: sum(L M) / T                    (T a constant, not the token count)
      trajectory:              EPO Eq. 2: 1/|trajectories| sum_traj 1/|turns| sum_turns
                               1/|turn| sum_tokens L -- tokens -> turn -> trajectory -> batch,
                               where `traj_id_B` names each row's trajectory.
    Padding rows (all-zero mask) count in no mean; an all-padding batch gives 0.

    Args:
      loss_BxT: per-token loss, float.
      mask_BxT: response mask (1 = token counts), float or bool.
      mode: one of LOSS_AGG_MODES.
      traj_id_B: int trajectory id of each row; required for mode="trajectory".

    Returns:
      A scalar, float32 (float64 for a float64 loss).
    """
    chex.assert_rank(loss_BxT, 2)
    chex.assert_equal_shape([loss_BxT, mask_BxT])
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"Unknown loss aggregation mode {mode!r}; choose one of {LOSS_AGG_MODES}.")
    mask_BxT = mask_BxT.astype(jnp.float32)
    loss_BxT = loss_BxT.astype(jnp.promote_types(loss_BxT.dtype, jnp.float32))
    row_sum_B = masked_sum(loss_BxT, mask_BxT, axis=-1)
    row_count_B = jnp.sum(mask_BxT, axis=-1)
    row_valid_B = (row_count_B > 0).astype(jnp.float32)

    if mode == "token-mean":
        return safe_divide(jnp.sum(row_sum_B), jnp.sum(row_count_B))
    if mode == "seq-mean-token-sum-norm":
        return jnp.sum(row_sum_B) / loss_BxT.shape[-1]
    if mode == "seq-mean-token-sum":
        return safe_divide(jnp.sum(row_sum_B * row_valid_B), jnp.sum(row_valid_B))
    row_mean_B = safe_divide(row_sum_B, row_count_B)
    if mode == "seq-mean-token-mean":
        return safe_divide(jnp.sum(row_mean_B * row_valid_B), jnp.sum(row_valid_B))

    if traj_id_B is None:
        raise ValueError("aggregate_loss(mode='trajectory') needs traj_id_B, the trajectory id of each row.")
    chex.assert_shape(traj_id_B, (loss_BxT.shape[0],))
    segment_B = dense_segment_ids(traj_id_B)
    num_rows = loss_BxT.shape[0]
    traj_sum_B = jax.ops.segment_sum(row_mean_B * row_valid_B, segment_B, num_segments=num_rows)
    traj_turns_B = jax.ops.segment_sum(row_valid_B, segment_B, num_segments=num_rows)
    traj_mean_B = safe_divide(traj_sum_B, traj_turns_B)
    traj_valid_B = (traj_turns_B > 0).astype(jnp.float32)
    return safe_divide(jnp.sum(traj_mean_B * traj_valid_B), jnp.sum(traj_valid_B))
