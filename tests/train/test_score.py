"""The score pass on a tiny model: the trainer's log-probs of the rollout tokens against an
independent float64 forward, their drift from the sampler's against numpy, pi_old from the trainer
(the first minibatch's ratio exactly 1), and the rollout correction on every kind of score pass."""
import jax
import numpy as np
import pytest

from epo_jax.train import actor_critic, optim, sharding
from epo_jax.train.batch_advantages import make_advantage_fn
from epo_jax.train.trainer import make_score_fn, score_pass_metrics, trainer_logprobs_due
from epo_jax.train.update import init_train_state, make_update_fn
from test_update import PROMPT, RESPONSE, mesh_of, random_batch, tiny_config, tiny_model

ROWS = 8


def rollout_batch(seed=0):
    """A batch as the batch builder makes it: random tokens, some padding, whatever the sampler
    reported as old_logprobs (here: far from the model's own log-probs, a sampler that drifted)."""
    batch = random_batch(ROWS, seed=seed, full_rows=ROWS - 1)
    batch["turn_index"] = np.array([0, 0, 1, 1, 2, 3, 0, 0], np.int32)
    batch["group_id"] = np.arange(ROWS, dtype=np.int32) // 4
    batch["valid"] = batch["response_mask"].any(-1)
    batch["episode_reward"] = np.random.default_rng(seed).normal(size=ROWS).astype(np.float32)
    batch["turn_penalty"] = np.zeros(ROWS, np.float32)
    batch["last_turn"] = np.ones(ROWS, bool)
    batch["anchor_id"] = np.arange(ROWS, dtype=np.int32)
    rng = np.random.default_rng(seed + 1)
    batch["old_logprobs"] = (-4.2 + 0.8 * rng.standard_normal((ROWS, RESPONSE))).astype(np.float32)
    return batch


def scored(config, batch, mesh, *, sampler_logprobs=None):
    """(state, forward, optimizer, score arrays, score metrics, the batch on the mesh with the
    arrays); `sampler_logprobs` makes batch["old_logprobs"] from the trainer's log-probs (the
    score pass runs twice for it)."""
    (graphdef, policy_params), model_cfg = tiny_model()
    params = actor_critic.init_params(config, policy_params, model_cfg.hidden_size)
    optimizer = optim.make_optimizer(config.optim, 10)
    state = init_train_state(config, params, optimizer, mesh)
    forward = actor_critic.make_forward_fn(config, graphdef)
    policy_forward = actor_critic.make_forward_fn(config, graphdef, with_critic=False)
    score = jax.jit(make_score_fn(config, forward, policy_forward, trainer_logprobs=True))
    ref = state.params["policy"] if config.algo.use_kl_loss else None
    if sampler_logprobs is not None:
        arrays, _ = score(state.params, ref, sharding.shard_batch(batch, mesh))
        batch = dict(batch, old_logprobs=sampler_logprobs(np.asarray(arrays["trainer_logprobs"])))
    on_mesh = sharding.shard_batch(batch, mesh)
    arrays, metrics = score(state.params, ref, on_mesh)
    return state, forward, optimizer, jax.device_get(arrays), jax.device_get(metrics), dict(on_mesh, **arrays)


def score_and_update(config, batch, mesh, *, sampler_logprobs=None):
    """(score arrays, score metrics, update metrics, params after) of one RL step's learn stage."""
    state, forward, optimizer, arrays, metrics, on_mesh = scored(config, batch, mesh,
                                                                 sampler_logprobs=sampler_logprobs)
    on_mesh.update(jax.jit(make_advantage_fn(config))(on_mesh, on_mesh.get("old_values")))
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    update = jax.jit(make_update_fn(config, forward, optimizer), in_shardings=(state_sharding, None),
                     out_shardings=(state_sharding, None))
    new_state, update_metrics = update(state, on_mesh)
    return arrays, metrics, jax.device_get(update_metrics), jax.device_get(new_state.params)


def np_policy_logprobs(batch):
    """log softmax of the tiny model's float32 logits in float64, at the response positions."""
    from epo_jax.models import transformer

    (graphdef, params), _ = tiny_model()
    logits = np.asarray(jax.jit(transformer.logits, static_argnums=0)(
        graphdef, params, batch["tokens"], None, batch["attention_mask"]), np.float64)
    scores = logits[:, PROMPT - 1:-1]  # position t scores token t + 1
    scores = scores - scores.max(-1, keepdims=True)
    log_probs = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    return np.take_along_axis(log_probs, batch["tokens"][:, PROMPT:, None], -1)[..., 0]


def np_drift(trainer, sampler, mask):
    d = (trainer.astype(np.float64) - sampler)[mask > 0]
    ratio = np.exp(d)
    return {"logprob_diff_mean": np.abs(d).mean(), "logprob_diff_max": np.abs(d).max(),
            "k3_kl": (ratio - d - 1).mean(), "ratio_outside_fraction": ((ratio < 0.5) | (ratio > 2)).mean()}


def test_score_pass_log_probs_and_drift_match_numpy():
    config = tiny_config(micro_batch_size=4)
    batch = rollout_batch()
    _, _, _, arrays, raw, _ = scored(config, batch, mesh_of(1, 1, jax.devices()[:1]))
    mask = batch["response_mask"]
    trainer = np.asarray(arrays["trainer_logprobs"])
    np.testing.assert_allclose(trainer[mask > 0], np_policy_logprobs(batch)[mask > 0], atol=2e-5)
    metrics = score_pass_metrics(raw)
    for name, value in np_drift(trainer, batch["old_logprobs"], mask).items():
        np.testing.assert_allclose(metrics[f"drift/{name}"], value, rtol=1e-5, err_msg=name)
    for turn in range(4):
        in_turn = mask * (batch["turn_index"] == turn)[:, None]
        for name, value in np_drift(trainer, batch["old_logprobs"], in_turn).items():
            np.testing.assert_allclose(metrics[f"drift/turn_{turn:02d}/{name}"], value, rtol=1e-5)
    assert not any(key.startswith("drift/turn_04") for key in metrics)  # no tokens of turn 4
    assert "old_logprobs" not in arrays  # algo.old_logprobs=sampler: the sampler's stay pi_old
    assert 0 < metrics["drift/ratio_outside_fraction"] < 1


@pytest.mark.parametrize("algo", [dict(advantage="ppo_gae"), dict(advantage="ppo_gae", critic="separate"),
                                  dict(advantage="grpo")], ids=["value_head", "separate_critic", "grpo"])
def test_every_kind_of_score_pass_gives_pi_old_and_the_correction(algo):
    """With or without a critic (and its own backbone), the score pass hands the update the
    trainer's log-probs as pi_old and the correction of the drifted sampler's tokens."""
    config = tiny_config(micro_batch_size=4, old_logprobs="trainer", rollout_correction="mis",
                         rollout_correction_level="sequence", **algo)
    batch = rollout_batch()
    _, _, _, arrays, raw, _ = scored(config, batch, mesh_of(1, 1, jax.devices()[:1]))
    mask = batch["response_mask"]
    trainer = np.asarray(arrays["trainer_logprobs"])
    np.testing.assert_allclose(trainer[mask > 0], np_policy_logprobs(batch)[mask > 0], atol=2e-5)
    np.testing.assert_array_equal(arrays["old_logprobs"], trainer)
    log_rho = np.clip(((trainer - batch["old_logprobs"]) * mask).sum(-1), -20, 20)
    keep = (mask > 0) & (np.abs(log_rho) <= np.log(2.0))[:, None]
    np.testing.assert_array_equal(arrays["rollout_keep"], keep)
    np.testing.assert_allclose(arrays["rollout_weight"], np.where(keep, np.exp(log_rho)[:, None], 0), rtol=1e-5)
    assert ("old_values" in arrays) == (algo["advantage"] == "ppo_gae")
    np.testing.assert_allclose(raw["rollout_correction/masked_fraction"], 1 - keep[mask > 0].mean(), rtol=1e-6)


def test_mis_with_the_samplers_pi_old_only_rejects():
    """With pi_old = pi_sampler the PPO ratio carries the importance weight: MIS keeps the same
    tokens as with the trainer's pi_old, each with weight 1 (no rho on top of the ratio)."""
    batch = rollout_batch()
    mask = batch["response_mask"]
    settings = dict(micro_batch_size=4, advantage="grpo", rollout_correction="mis")
    arrays = {source: scored(tiny_config(old_logprobs=source, **settings), batch, mesh_of(1, 1, jax.devices()[:1]))[3]
              for source in ("sampler", "trainer")}
    log_rho = np.clip(np.asarray(arrays["sampler"]["trainer_logprobs"]) - batch["old_logprobs"], -20, 20)
    keep = (mask > 0) & (np.abs(log_rho) <= np.log(2.0))
    assert 0 < keep[mask > 0].mean() < 1
    for source in arrays:
        np.testing.assert_array_equal(arrays[source]["rollout_keep"], keep)
    np.testing.assert_array_equal(arrays["sampler"]["rollout_weight"], keep)
    assert "old_logprobs" not in arrays["sampler"]
    np.testing.assert_allclose(arrays["trainer"]["rollout_weight"], np.where(keep, np.exp(log_rho), 0), rtol=1e-5)


@pytest.fixture(scope="module")
def learned():
    """The learn stage of GRPO with pi_old from the trainer: without a correction and with TIS, on
    a sampler equal to the trainer; with MIS on a drifted one; and the first on 8 devices."""
    one_device = mesh_of(1, 1, jax.devices()[:1])
    batch = rollout_batch()
    common = dict(micro_batch_size=4, old_logprobs="trainer", advantage="grpo")
    same = lambda trainer: trainer  # noqa: E731
    return {
        "none": score_and_update(tiny_config(**common), batch, one_device, sampler_logprobs=same),
        "tis": score_and_update(tiny_config(rollout_correction="tis", **common), batch, one_device,
                                sampler_logprobs=same),
        "mis": score_and_update(tiny_config(rollout_correction="mis", **common), batch, one_device),
        "8 devices": score_and_update(tiny_config(**common), batch, mesh_of(4, 2), sampler_logprobs=same),
        "batch": batch,
    }


@pytest.mark.parametrize("variant", ["none", "tis", "mis", "8 devices"])
def test_old_logprobs_from_the_trainer_give_a_first_ratio_of_exactly_one(learned, variant):
    """One minibatch, one epoch: the update's only minibatch sees the rollout params, and with the
    trainer's pi_old every log-ratio is exactly 0 (ppo_kl and the clip fraction are exact zeros),
    however far the sampler drifted ("mis": its drift makes ratios of 0.4-2.4 had pi_old been the
    sampler's), sharded or not."""
    _, score_metrics, update_metrics, _ = learned[variant]
    assert float(update_metrics["ppo_kl"]) == 0.0 and float(update_metrics["pg_clipfrac"]) == 0.0
    if variant == "mis":
        assert score_metrics["drift"].outside_fraction > 0.05


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_unit_weights_leave_the_update_as_it_is_and_mis_changes_it(learned):
    """A sampler equal to the trainer gives TIS weights of exactly 1: the same update as without a
    correction, bitwise. The drifted sampler's MIS drops tokens and changes the update."""
    arrays, raw, _, unit = learned["tis"]
    np.testing.assert_array_equal(arrays["rollout_weight"], learned["batch"]["response_mask"])
    assert float(raw["rollout_correction/masked_fraction"]) == 0.0
    plain = learned["none"][3]
    for x, y in zip(leaves(plain), leaves(unit)):
        np.testing.assert_array_equal(x, y)
    arrays, raw, _, dropped = learned["mis"]
    assert 0.0 < float(raw["rollout_correction/masked_fraction"]) < 1.0
    assert max(np.abs(x - y).max() for x, y in zip(leaves(plain), leaves(dropped))) > 1e-4


def test_trainer_logprobs_are_computed_where_needed_or_due():
    config = tiny_config()  # ppo_gae with a value head: the value forward gives them
    assert all(trainer_logprobs_due(config, step) for step in (1, 2, 3))
    config.algo.advantage = "grpo"  # they cost a forward: every drift_every steps from step 1
    config.rollout.drift_every = 3
    assert [trainer_logprobs_due(config, step) for step in range(1, 8)] == [True, False, False, True, False,
                                                                              False, True]
    config.rollout.drift_every = 0
    assert not trainer_logprobs_due(config, 1)
    config.algo.rollout_correction = "mis"
    assert trainer_logprobs_due(config, 2)
    config.algo.rollout_correction, config.algo.old_logprobs = "none", "trainer"
    assert trainer_logprobs_due(config, 2)
