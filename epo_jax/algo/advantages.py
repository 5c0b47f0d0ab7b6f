"""Advantage estimators for multi-turn agents: GAE, GRPO / Dr.GRPO, RLOO, GiGPO, and whitening.

Each row of a batch is one turn sample. Group methods take one score per row together with
integer ids (episode group, trajectory, anchor observation) computed by the caller; they are
jittable (segment sums with a static segment count equal to the number of rows) and accept numpy
arrays as well. Group statistics follow verl: the standard deviation is the unbiased one
(torch.std). A group with a single member gets mean 0 and std 1 at the episode level (verl's
GRPO, RLOO and GiGPO's episode_norm_reward), but its own score as mean at GiGPO's step level
(GiGPO's step_norm_reward), so a one-member step group has step advantage 0.
"""
import chex
import jax
import jax.numpy as jnp

from epo_jax.algo.aggregation import masked_mean, safe_divide

# algo.advantage: PPO with GAE on a critic, or a critic-free group method.
ADVANTAGE_ESTIMATORS = ("ppo_gae", "grpo", "drgrpo", "rloo", "gigpo")
# algo.group_count: who is a member of an episode group's statistics. "trajectory": each
# trajectory once (the GRPO / GiGPO papers' group of N episodes); "turn": every turn sample
# (verl-agent, which calls its group estimators with compute_mean_std_cross_all_data=True).
GROUP_COUNTS = ("trajectory", "turn")
# algo.gigpo_mode, verl-agent's names: "mean_std_norm" divides by the group std at both levels,
# "mean_norm" only subtracts the group mean.
GIGPO_MODES = ("mean_std_norm", "mean_norm")
# algo.gigpo_step_penalty: a turn's format penalty enters the discounted step returns of that
# turn and the earlier ones ("discounted", G_t = sum_j gamma^(j-t) r_j), or only its own turn's
# return, added after discounting ("own_turn", verl-agent's apply_invalid_action_penalty).
GIGPO_STEP_PENALTIES = ("discounted", "own_turn")

_GROUP_EPS = 1e-6
_WHITEN_EPS = 1e-8


def _valid_or_all(valid_N: jax.Array | None, num_rows: int) -> jax.Array:
    if valid_N is None:
        return jnp.ones((num_rows,), dtype=bool)
    chex.assert_shape(valid_N, (num_rows,))
    return jnp.asarray(valid_N).astype(bool)


def _first_member(same_NxN: jax.Array, valid_N: jax.Array) -> jax.Array:
    """Index of the first valid row equal to each row (its segment id in [0, N))."""
    return jnp.argmax(same_NxN & valid_N[None, :], axis=1).astype(jnp.int32)


def _outcome_groups(
    group_id_N: jax.Array, traj_id_N: jax.Array | None, valid_N: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(segment, member, valid) for outcome methods: members are valid rows, one per trajectory if given."""
    group_id_N = jnp.asarray(group_id_N)
    num_rows = group_id_N.shape[0]
    valid_N = _valid_or_all(valid_N, num_rows)
    segment_N = _first_member(group_id_N[:, None] == group_id_N[None, :], valid_N)
    if traj_id_N is None:
        return segment_N, valid_N, valid_N
    chex.assert_shape(traj_id_N, (num_rows,))
    traj_id_N = jnp.asarray(traj_id_N)
    first_of_traj_N = _first_member(traj_id_N[:, None] == traj_id_N[None, :], valid_N)
    return segment_N, valid_N & (first_of_traj_N == jnp.arange(num_rows)), valid_N


def _normalize_in_groups(
    scores_N: jax.Array,
    segment_N: jax.Array,
    member_N: jax.Array,
    *,
    normalize_by_std: bool,
    eps: float,
    center_singletons: bool = False,
) -> jax.Array:
    """(s - mean_g) / (std_g + eps) over the members of each row's group (verl's GRPO statistics).

    Only rows with member_N set enter the group mean and unbiased std; every row is normalised
    with its group's statistics. A group with one member uses std 1 and mean 0 (verl's GRPO), or
    with `center_singletons` its member's own score (GiGPO's step level: advantage 0).
    """
    num_rows = scores_N.shape[0]
    weight_N = member_N.astype(jnp.float32)
    count_G = jax.ops.segment_sum(weight_N, segment_N, num_segments=num_rows)
    # The mean is taken of the scores less a pivot, the score of the group's first member (whose row
    # is the segment id): a float32 mean of equal scores need not equal them (3 x 0.195 / 3), and
    # (s - mean) / (std + eps) would blow that rounding up to about 0.01; shifted, equal scores give 0.
    pivot_G = scores_N
    shifted_N = jnp.where(member_N, scores_N - pivot_G[segment_N], 0.0)
    member_mean_G = pivot_G + safe_divide(jax.ops.segment_sum(shifted_N, segment_N, num_segments=num_rows), count_G)
    squared_deviation_N = jnp.square(scores_N - member_mean_G[segment_N])
    sum_squared_deviation_G = jax.ops.segment_sum(
        jnp.where(member_N, squared_deviation_N, 0.0), segment_N, num_segments=num_rows
    )
    several_G = count_G > 1
    mean_G = member_mean_G if center_singletons else jnp.where(several_G, member_mean_G, 0.0)
    std_G = jnp.where(several_G, jnp.sqrt(safe_divide(sum_squared_deviation_G, count_G - 1)), 1.0)
    centred_N = scores_N - mean_G[segment_N]
    if normalize_by_std:
        return centred_N / (std_G[segment_N] + eps)
    return centred_N


def expand_to_tokens(values_B: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Broadcasts one value per turn sample to its response tokens: out_bt = v_b * M_bt."""
    chex.assert_rank([values_B, mask_BxT], [1, 2])
    return values_B[:, None].astype(jnp.float32) * mask_BxT.astype(jnp.float32)


def place_reward_on_last_token(reward_B: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Token-level rewards with each row's reward on its last valid response token (docs/algorithms.md section 1).

    Rows with an all-zero mask get no reward.
    """
    chex.assert_rank([reward_B, mask_BxT], [1, 2])
    valid_BxT = mask_BxT > 0
    seq_len = mask_BxT.shape[1]
    last_B = seq_len - 1 - jnp.argmax(valid_BxT[:, ::-1], axis=1)
    has_tokens_B = jnp.any(valid_BxT, axis=1)
    one_hot_BxT = jax.nn.one_hot(last_B, seq_len, dtype=jnp.float32)
    return one_hot_BxT * jnp.where(has_tokens_B, reward_B, 0.0)[:, None].astype(jnp.float32)


def gae_advantages(
    rewards_BxT: jax.Array,
    values_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """GAE within each turn sample's response (docs/algorithms.md section 3; verl's compute_gae_advantage_return).

      delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t
    computed right to left over the valid tokens only: masked tokens are skipped (V_{t+1} and
    A_{t+1} are those of the next valid token; 0 after the last one). With the reward on the last
    valid token (`place_reward_on_last_token`) this is verl-agent's per-turn PPO target.

    Returns:
      (advantages_BxT, returns_BxT), zero on masked tokens. Whitening is separate
      (`whiten_advantages`).
    """
    chex.assert_rank(rewards_BxT, 2)
    chex.assert_equal_shape([rewards_BxT, values_BxT, mask_BxT])
    rewards_TxB = rewards_BxT.astype(jnp.float32).T
    values_TxB = values_BxT.astype(jnp.float32).T
    valid_TxB = mask_BxT.T > 0

    def step(carry, inputs):
        next_value_B, next_advantage_B = carry
        reward_B, value_B, valid_B = inputs
        delta_B = reward_B + gamma * next_value_B - value_B
        advantage_B = delta_B + gamma * lam * next_advantage_B
        next_value_B = jnp.where(valid_B, value_B, next_value_B)
        next_advantage_B = jnp.where(valid_B, advantage_B, next_advantage_B)
        return (next_value_B, next_advantage_B), next_advantage_B

    zeros_B = jnp.zeros(rewards_TxB.shape[1], jnp.float32)
    _, advantages_TxB = jax.lax.scan(step, (zeros_B, zeros_B), (rewards_TxB, values_TxB, valid_TxB), reverse=True)
    advantages_BxT = jnp.where(valid_TxB.T, advantages_TxB.T, 0.0)
    returns_BxT = jnp.where(valid_TxB.T, advantages_BxT + values_BxT, 0.0)
    return advantages_BxT, returns_BxT


def whiten_advantages(
    advantages_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    shift_mean: bool = True,
    eps: float = _WHITEN_EPS,
) -> jax.Array:
    """Masked whitening (verl's masked_whiten): (A - mean) / sqrt(var + eps) over valid tokens.

    mean and var are masked token statistics; var is unbiased (times n / (n - 1)). With
    shift_mean=False the mean is added back. Masked tokens are set to 0.
    """
    chex.assert_equal_shape([advantages_BxT, mask_BxT])
    advantages_BxT = advantages_BxT.astype(jnp.float32)
    mean = masked_mean(advantages_BxT, mask_BxT)
    count = jnp.sum(mask_BxT.astype(jnp.float32))
    variance = masked_mean(jnp.square(advantages_BxT - mean), mask_BxT) * safe_divide(count, count - 1)
    whitened_BxT = (advantages_BxT - mean) * jax.lax.rsqrt(variance + eps)
    if not shift_mean:
        whitened_BxT = whitened_BxT + mean
    return jnp.where(mask_BxT > 0, whitened_BxT, 0.0)


def grpo_advantages(
    scores_N: jax.Array,
    group_id_N: jax.Array,
    *,
    traj_id_N: jax.Array | None = None,
    valid_N: jax.Array | None = None,
    normalize_by_std: bool = True,
    eps: float = _GROUP_EPS,
) -> jax.Array:
    """GRPO outcome advantages (docs/algorithms.md section 3): A_i = (R_i - mean_group R) / (std_group R + 1e-6).

    `normalize_by_std=False` is Dr.GRPO (A_i = R_i - mean_group R). Every valid row is a member of
    its group's statistics, as verl-agent counts turn samples (`algo.group_count="turn"`); with
    `traj_id_N` given each trajectory counts once however many turns it has, with the score of its
    first valid row (`algo.group_count="trajectory"`, the papers' group of N episodes). A group
    with one member gets mean 0 and std 1 (verl). Rows with valid_N False count nowhere and get
    advantage 0.
    """
    chex.assert_rank([scores_N, group_id_N], [1, 1])
    chex.assert_equal_shape([scores_N, group_id_N])
    scores_N = jnp.asarray(scores_N, jnp.float32)
    segment_N, member_N, valid_N = _outcome_groups(group_id_N, traj_id_N, valid_N)
    advantages_N = _normalize_in_groups(scores_N, segment_N, member_N, normalize_by_std=normalize_by_std, eps=eps)
    return jnp.where(valid_N, advantages_N, 0.0)


def rloo_advantages(
    scores_N: jax.Array,
    group_id_N: jax.Array,
    *,
    traj_id_N: jax.Array | None = None,
    valid_N: jax.Array | None = None,
) -> jax.Array:
    """RLOO (Ahmadian et al. 2024; verl's compute_rloo_outcome_advantage): A_i = R_i - mean_{j != i} R_j.

    Equivalently n / (n - 1) * (R_i - mean_group R) for a group of n; a group of one keeps A = R
    (verl). `traj_id_N` and `valid_N` as in `grpo_advantages`.
    """
    chex.assert_rank([scores_N, group_id_N], [1, 1])
    chex.assert_equal_shape([scores_N, group_id_N])
    num_rows = scores_N.shape[0]
    scores_N = jnp.asarray(scores_N, jnp.float32)
    segment_N, member_N, valid_N = _outcome_groups(group_id_N, traj_id_N, valid_N)
    weight_N = member_N.astype(jnp.float32)
    count_G = jax.ops.segment_sum(weight_N, segment_N, num_segments=num_rows)
    mean_G = safe_divide(jax.ops.segment_sum(weight_N * scores_N, segment_N, num_segments=num_rows), count_G)
    count_N = count_G[segment_N]
    leave_one_out_N = safe_divide(count_N, count_N - 1) * (scores_N - mean_G[segment_N])
    advantages_N = jnp.where(count_N > 1, leave_one_out_N, scores_N)
    return jnp.where(valid_N, advantages_N, 0.0)


def step_discounted_returns(
    rewards_N: jax.Array,
    traj_id_N: jax.Array,
    turn_index_N: jax.Array,
    *,
    gamma: float,
    valid_N: jax.Array | None = None,
) -> jax.Array:
    """Discounted return of each turn within its trajectory (GiGPO, arXiv 2505.10978 Sec. 4.2).

      G_i = r_i + gamma^(turn_next(i) - turn_i) G_next(i)    (G_i = r_i for a trajectory's last turn)
    where next(i) is the trajectory's next valid turn, whatever the row order: the recursion of
    verl-agent's compute_step_discounted_returns. It runs as that recursion, one step per turn of
    the longest trajectory, rather than as one matmul of discount powers: a matmul sums each row's
    terms in an order set by the rows' positions, so two trajectories with the same rewards could
    get returns one rounding apart, which a step group's (G - mean) / (std + eps) blows up to
    about 0.01 instead of 0.
    """
    chex.assert_rank([rewards_N, traj_id_N, turn_index_N], [1, 1, 1])
    chex.assert_equal_shape([rewards_N, traj_id_N, turn_index_N])
    num_rows = rewards_N.shape[0]
    valid_N = _valid_or_all(valid_N, num_rows)
    rewards_N = jnp.where(valid_N, jnp.asarray(rewards_N, jnp.float32), 0.0)
    traj_id_N = jnp.asarray(traj_id_N)
    turn_index_N = jnp.asarray(turn_index_N, jnp.int32)
    turn_gap_NxN = turn_index_N[None, :] - turn_index_N[:, None]
    same_traj_NxN = (traj_id_N[:, None] == traj_id_N[None, :]) & valid_N[None, :]
    later_in_traj_NxN = same_traj_NxN & (turn_gap_NxN > 0)
    next_row_N = jnp.argmin(jnp.where(later_in_traj_NxN, turn_gap_NxN, jnp.iinfo(jnp.int32).max), axis=1)
    next_gap_N = jnp.take_along_axis(turn_gap_NxN, next_row_N[:, None], axis=1)[:, 0]
    next_discount_N = jnp.where(
        jnp.any(later_in_traj_NxN, axis=1), jnp.power(jnp.float32(gamma), jnp.maximum(next_gap_N, 0)), 0.0
    )
    longest_traj = jnp.max(jnp.sum(same_traj_NxN & valid_N[:, None], axis=1))

    def one_turn_back(_, returns_N):
        return rewards_N + next_discount_N * returns_N[next_row_N]

    returns_N = jax.lax.fori_loop(0, longest_traj, one_turn_back, jnp.zeros(num_rows, jnp.float32))
    return jnp.where(valid_N, returns_N, 0.0)


def gigpo_advantages(
    episode_scores_N: jax.Array,
    step_rewards_N: jax.Array,
    group_id_N: jax.Array,
    traj_id_N: jax.Array,
    turn_index_N: jax.Array,
    anchor_id_N: jax.Array,
    *,
    omega: float = 1.0,
    gamma: float = 0.95,
    normalize_by_std: bool = True,
    eps: float = _GROUP_EPS,
    valid_N: jax.Array | None = None,
    group_count: str = "trajectory",
    own_turn_rewards_N: jax.Array | None = None,
) -> jax.Array:
    """GiGPO advantages (arXiv 2505.10978; docs/algorithms.md section 3): A = A_episode + omega * A_step.

      A_episode: GRPO over the episode group (`group_id_N`, envs playing the same task) of the
                 episode scores, each trajectory counted once (`group_count="trajectory"`) or
                 every turn sample (`"turn"`, verl-agent's episode_norm_reward); a one-member
                 group has mean 0 and std 1.
      A_step:    the same over step groups -- turn samples of one episode group whose anchor
                 observation is identical (`anchor_id_N`, e.g. a hash of the observation text) --
                 of the discounted step returns G_t (`step_discounted_returns` of the per-turn
                 `step_rewards_N` with `gamma`) plus `own_turn_rewards_N`, rewards that count for
                 their own turn only (verl-agent subtracts its format penalty this way, after
                 discounting), each turn sample counted once. A one-member step group is centred
                 on its own return, so its A_step is 0 (GiGPO's step_norm_reward).
    `normalize_by_std=False` drops the std at both levels (GiGPO's mean_norm).
    """
    chex.assert_rank([episode_scores_N, step_rewards_N, group_id_N, anchor_id_N], [1, 1, 1, 1])
    chex.assert_equal_shape([episode_scores_N, step_rewards_N, group_id_N, traj_id_N, turn_index_N, anchor_id_N])
    num_rows = episode_scores_N.shape[0]
    valid_N = _valid_or_all(valid_N, num_rows)
    if group_count not in GROUP_COUNTS:
        raise ValueError(f"group_count={group_count!r} (algo.group_count) must be one of {GROUP_COUNTS}.")
    episode_advantages_N = grpo_advantages(
        episode_scores_N, group_id_N, traj_id_N=traj_id_N if group_count == "trajectory" else None,
        valid_N=valid_N, normalize_by_std=normalize_by_std, eps=eps,
    )
    step_returns_N = step_discounted_returns(step_rewards_N, traj_id_N, turn_index_N, gamma=gamma, valid_N=valid_N)
    if own_turn_rewards_N is not None:
        chex.assert_shape(own_turn_rewards_N, (num_rows,))
        step_returns_N = step_returns_N + jnp.asarray(own_turn_rewards_N, jnp.float32)
    group_id_N = jnp.asarray(group_id_N)
    anchor_id_N = jnp.asarray(anchor_id_N)
    same_step_group_NxN = (group_id_N[:, None] == group_id_N[None, :]) & (anchor_id_N[:, None] == anchor_id_N[None, :])
    step_segment_N = _first_member(same_step_group_NxN, valid_N)
    step_advantages_N = _normalize_in_groups(
        step_returns_N, step_segment_N, valid_N, normalize_by_std=normalize_by_std, eps=eps, center_singletons=True
    )
    return jnp.where(valid_N, episode_advantages_N + omega * step_advantages_N, 0.0)

