"""Packed update batches (algo.pack) against the padded rows they replace: the layout puts every
sample's tokens in one segment and reads its response back; the forward pass, the score pass,
the advantages, every entropy control's loss and gradient and EPO's history, and the whole
sharded multi-epoch update are those of the padded batch to float32 rounding."""
import functools
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epo_jax import algo
from epo_jax.algo import LossSettings, loss_state_init, loss_state_update, make_loss_fn
from epo_jax.models import transformer
from epo_jax.models.config import ModelConfig
from epo_jax.rollout.samples import TurnSample
from epo_jax.train import actor_critic, optim, sharding
from epo_jax.train import batch as batch_lib
from epo_jax.train.batch_advantages import make_advantage_fn
from epo_jax.train.trainer import make_score_fn
from epo_jax.train.update import epoch_orders, init_train_state, make_update_fn

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPT_BUCKETS, MAX_PROMPT, RESPONSE, VOCAB = (8, 16, 24), 24, 6, 128
PACK_TOKENS = MAX_PROMPT + RESPONSE


def make_samples(seed=0, trajectories=4, turns=3):
    """Trajectories of several turns in groups of two, with prompts and responses of mixed lengths."""
    rng = np.random.default_rng(seed)
    samples = []
    for traj in range(trajectories):
        for turn in range(turns):
            p, r = int(rng.integers(2, MAX_PROMPT + 1)), int(rng.integers(1, RESPONSE + 1))
            samples.append(TurnSample(
                prompt_ids=rng.integers(3, VOCAB, p).astype(np.int32),
                response_ids=rng.integers(3, VOCAB, r).astype(np.int32),
                response_logprobs=np.zeros(r, np.float32), response_entropy=np.zeros(r, np.float32),
                traj_id=traj, group_id=traj // 2, turn_index=turn, anchor_id=turn, valid_format=True,
                penalty=-0.1 * (turn == 1), episode_reward=10.0 * (traj % 2), last_turn=turn == turns - 1))
    return samples


def padded_batch(samples, *, num_minibatches, micro_batch_size):
    rows = batch_lib.update_rows(len(samples), num_minibatches=num_minibatches, micro_batch_size=micro_batch_size)
    return batch_lib.build_batch(samples, prompt_buckets=PROMPT_BUCKETS, response_len=RESPONSE, rows=rows,
                                 pad_id=0, padding_id_start=1000)


def packing_layout(batch, orders, *, micro_batch_size, shards=1, pack_tokens=PACK_TOKENS):
    prompt_lens, seq_lens = batch_lib.sequence_lengths(batch, RESPONSE)
    width = batch["tokens"].shape[1]
    return batch_lib.pack_batch(prompt_lens, seq_lens, np.asarray(orders),
                                num_micro_batches=len(seq_lens) // micro_batch_size, shards=shards,
                                pack_tokens=pack_tokens, prompt_width=width - RESPONSE, row_width=width)


# --- the layout, against the samples themselves ---------------------------------------------


def test_first_fit_decreasing_by_hand():
    row, start, used = batch_lib.first_fit_decreasing(np.array([2, 5, 4, 0, 5]), 8)
    # Longest first (5, 5, 4, 2; ties in input order): 5 -> row 0, 5 -> row 1, 4 -> row 2, 2 -> row 0.
    assert used == 3
    np.testing.assert_array_equal(row[[1, 4, 2, 0]], [0, 1, 2, 0])
    np.testing.assert_array_equal(start[[1, 4, 2, 0]], [0, 0, 0, 5])
    assert batch_lib.pack_lengths(30) == (4, 8, 12, 15, 19, 23, 27, 30)


@pytest.mark.parametrize("shards,epochs", [(1, 1), (2, 3)])
def test_layout_holds_each_sample_once_as_one_segment(shards, epochs):
    """Reading the packed rows back through the layout gives, for every sample of every
    arrangement, its prompt + response ids as one run inside one row of its own shard's block,
    and the response start points at its last prompt token."""
    samples = make_samples(seed=1)
    batch = padded_batch(samples, num_minibatches=2, micro_batch_size=4)
    rows = len(batch["valid"])
    orders = [np.arange(rows)] + [np.random.default_rng(e).permutation(rows) for e in range(epochs - 1)]
    layout = packing_layout(batch, orders, micro_batch_size=4, shards=shards)
    index = layout["pack_index"]
    arrangements, micro_batches, groups, k, length = index.shape
    assert (arrangements, micro_batches, groups) == (epochs, rows // 4, shards)
    assert length <= PACK_TOKENS
    per_shard = 4 // shards
    for a, order in enumerate(orders):
        np.testing.assert_array_equal(layout["pack_order"][a], order)
        for m in range(micro_batches):
            slots = [s * micro_batches + m for s in range(4)]  # the update's strided split
            for g in range(shards):
                local_rows = order[slots[g * per_shard:(g + 1) * per_shard]]
                local_tokens = batch["tokens"][local_rows].reshape(-1)
                block = index[a, m, g].reshape(-1)
                for i, b in enumerate(local_rows):
                    width = batch["tokens"].shape[1]
                    where = np.flatnonzero((block >= 0) & (block // width == i))
                    if b >= len(samples):
                        assert where.size == 0
                        continue
                    s = samples[b]
                    expected = np.concatenate([s.prompt_ids, s.response_ids])
                    assert where.size == expected.size and np.all(np.diff(where) == 1)  # one run
                    assert where[0] // length == where[-1] // length  # in one row
                    np.testing.assert_array_equal(local_tokens[block[where]], expected)
                    start = layout["pack_response_start"][a, slots[g * per_shard + i]]
                    assert start == where[0] + len(s.prompt_ids) - 1


def test_pack_shape_takes_the_fewest_tokens():
    """Shards of one micro-batch holding samples of 20 + 10 and 24 + 6 tokens (rows of 30, whose
    lengths are 4, 8, ..., 27, 30): one row of 30 (30 tokens) beats two rows of 23 / 27."""
    seq_lens = np.array([20, 10, 24, 6])
    assert batch_lib.pack_shape(seq_lens, np.array([[[[0, 1], [2, 3]]]]), 30) == (1, 30)
    # 20 and 19 cannot share a row of 30; two rows of the shortest length that holds 20: 23.
    assert batch_lib.pack_shape(np.array([20, 19]), np.array([[[[0, 1]]]]), 30) == (2, 23)
    with pytest.raises(ValueError, match="algo.pack_tokens=16; raise algo.pack_tokens to at least 20"):
        batch_lib.pack_shape(np.array([20, 19]), np.array([[[[0, 1]]]]), 16)


def test_packed_rows_restart_positions_in_each_segment():
    """The model's inputs: each sample's ids under one segment id of its own within its row,
    at positions 0, 1, ..., and nothing else (segment 0) elsewhere."""
    samples = make_samples(seed=2)
    batch = padded_batch(samples, num_minibatches=1, micro_batch_size=4)
    layout = packing_layout(batch, [np.arange(len(batch["valid"]))], micro_batch_size=4, shards=2)
    micro_batches = len(batch["valid"]) // 4
    for m in range(micro_batches):
        rows = [s * micro_batches + m for s in range(4)]
        micro_batch = {"tokens": batch["tokens"][rows], "attention_mask": batch["attention_mask"][rows],
                       "pack_index": layout["pack_index"][0, m]}
        tokens, positions, segments = map(np.asarray, actor_critic.packed_rows(micro_batch))
        packed_rows_per_shard = tokens.shape[0] // 2
        seen = []
        for row in range(tokens.shape[0]):
            for segment in set(segments[row]) - {0}:
                where = np.flatnonzero(segments[row] == segment)
                sample = samples[rows[(row // packed_rows_per_shard) * 2 + segment - 1]]
                np.testing.assert_array_equal(tokens[row, where], np.concatenate([sample.prompt_ids,
                                                                                  sample.response_ids]))
                np.testing.assert_array_equal(positions[row, where], np.arange(where.size))
                seen.append(id(sample))
            assert np.all(positions[row][segments[row] == 0] == 0)
        assert sorted(seen) == sorted(id(samples[r]) for r in rows if r < len(samples))


def test_packed_forward_stays_on_its_shards():
    """On a 4-shard mesh, the packed forward pass and its gradient gather and scatter within each
    shard: no all-gather, all-to-all or collective-permute (the gradient's all-reduces of the
    replicated parameters are the data-parallel ones)."""
    config = run_config(micro_batch_size=4)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 1, 1
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
    params = sharding.place_params(trainable_params(config), mesh)
    batch = padded_batch(make_samples(), num_minibatches=1, micro_batch_size=4)
    layout = packing_layout(batch, [np.arange(len(batch["valid"]))], micro_batch_size=4, shards=4)
    rows = [s * (len(batch["valid"]) // 4) for s in range(4)]  # micro-batch 0
    micro_batch = sharding.shard_batch({k: batch[k][rows] for k in ("tokens", "attention_mask")}, mesh)
    micro_batch.update(sharding.place_packing(
        {"pack_index": layout["pack_index"][0, 0], "pack_response_start": layout["pack_response_start"][0, rows]},
        {"pack_index": 0, "pack_response_start": 0}, mesh))
    forward = actor_critic.make_forward_fn(config, model()[0])
    loss = jax.grad(lambda p, b: sum(jnp.sum(v) for v in forward(p, b).values()))
    hlo = jax.jit(loss).lower(params, micro_batch).compile().as_text()
    for collective in ("all-gather", "all-to-all", "collective-permute"):
        assert collective not in hlo


# --- forward, score pass, advantages, loss and gradients: packed == padded ------------------


@functools.cache
def model():
    cfg = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    graphdef, params = transformer.init_params(cfg, jax.random.key(0))
    # Larger embeddings than the 0.02 init: peaked, varied next-token distributions.
    params["embed_tokens"]["weight"] = params["embed_tokens"]["weight"][...] * 8.0
    return graphdef, params


def run_config(advantage="ppo_gae", critic="value_head", micro_batch_size=16, **algo_fields):
    c = runpy.run_path(str(ROOT / "configs" / "base.py"))["get_config"]()
    c.rollout.max_response_len, c.rollout.max_prompt_len = RESPONSE, MAX_PROMPT
    c.model.logprob_chunk_size = 16
    c.algo.advantage, c.algo.critic, c.algo.micro_batch_size = advantage, critic, micro_batch_size
    c.epo.code_turn_gate = 1  # code mode smooths turns >= 1 here
    c.optim.lr, c.optim.eps, c.optim.warmup_ratio = 1.0, 1.0, 0.0  # Adam's step ~ the gradient itself
    c.train.total_steps = 10
    for key, value in algo_fields.items():
        c.algo[key] = value
    return c


def trainable_params(config):
    graphdef, policy = model()
    params = actor_critic.init_params(config, policy, 32)
    heads = [params["value_head"]] if "value_head" in params else (
        [params["critic"]["head"]] if "critic" in params else [])
    for head in heads:  # a live critic: V != 0
        head["w"] = jnp.asarray(np.random.default_rng(5).standard_normal(32), jnp.float32)
    return params


@functools.cache
def forward_programs(critic):
    """Jitted forward and parameter-VJP of the policy (+ critic), shared by every method."""
    config = run_config(advantage="ppo_gae" if critic else "grpo", critic=critic or "value_head")
    forward = actor_critic.make_forward_fn(config, model()[0])
    vjp = jax.jit(lambda params, batch, cotangent: jax.vjp(lambda p: forward(p, batch), params)[1](cotangent)[0])
    return jax.jit(forward), vjp


@functools.cache
def scored_batches(critic):
    """{"padded", "packed"}: the test batch after the score pass (critic values, reference
    log-probs of a perturbed reference) and the advantages, each computed on its own layout; the
    packed one holds the layout of its single micro-batch, as the forward pass reads it."""
    config = run_config(advantage="ppo_gae" if critic else "grpo", critic=critic or "value_head")
    graphdef, policy = model()
    params = trainable_params(config)
    ref_params = jax.tree.map(lambda x: x * 1.05, policy)
    score = jax.jit(make_score_fn(config, actor_critic.make_forward_fn(config, graphdef),
                                  actor_critic.make_forward_fn(config, graphdef, with_critic=False),
                                  trainer_logprobs=False))
    advantages = jax.jit(make_advantage_fn(config))
    padded = padded_batch(make_samples(), num_minibatches=1, micro_batch_size=16)
    rows = len(padded["valid"])
    layout = packing_layout(padded, [np.arange(rows)], micro_batch_size=16)
    out = {}
    for name, batch in (("padded", padded), ("packed", {**padded, **layout})):
        batch = dict(batch)
        batch.update(jax.device_get(score(params, ref_params, batch)[0]))
        # Off-policy behaviour log-probs, so that ratios move and clipping happens.
        noise = 0.3 * np.random.default_rng(7).standard_normal(batch["response_mask"].shape)
        batch["old_logprobs"] = (batch["ref_logprobs"] + noise).astype(np.float32)
        batch.update(jax.device_get(advantages(batch, batch.get("old_values"))))
        if name == "packed":  # one micro-batch of the rows in order: the forward pass's view
            del batch["pack_order"]
            batch.update(pack_index=layout["pack_index"][0, 0], pack_response_start=layout["pack_response_start"][0])
        out[name] = batch
    return out


def masked(x, batch):
    return np.where(batch["response_mask"] > 0, np.asarray(x), 0.0)


@pytest.mark.parametrize("critic", ["value_head", "separate", None])
def test_forward_score_pass_and_advantages_match_padded(critic):
    forward, _ = forward_programs(critic)
    params = trainable_params(run_config(critic=critic or "value_head", advantage="ppo_gae" if critic else "grpo"))
    batches = scored_batches(critic)
    outputs = {name: jax.device_get(forward(params, batch)) for name, batch in batches.items()}
    padded = batches["padded"]
    assert padded["response_mask"].sum() > 30 and len(np.unique(padded["traj_id"][padded["valid"]])) == 4
    for key in outputs["padded"]:
        np.testing.assert_allclose(masked(outputs["packed"][key], padded), masked(outputs["padded"][key], padded),
                                   rtol=1e-5, atol=1e-5, err_msg=key)
    for key in ("ref_logprobs", "old_values", "advantages", "returns"):
        if key in padded:
            np.testing.assert_allclose(masked(batches["packed"][key], padded), masked(padded[key], padded),
                                       rtol=1e-5, atol=1e-5, err_msg=key)
    assert np.ptp(masked(outputs["padded"]["entropy"], padded)) > 1.0  # varied distributions


# (advantage, critic, algo fields, epo fields): every entropy control on PPO + GAE with its value
# head, EPO with both aggregations and in code mode, GRPO, and PPO with a separate critic.
METHODS = {
    **{f"ppo+{control}": ("ppo_gae", "value_head", {"entropy_control": control}, {})
       for control in algo.ENTROPY_CONTROLS if control != "epo"},
    "ppo+epo trajectory": ("ppo_gae", "value_head", {"entropy_control": "epo"}, {"entropy_agg": "trajectory"}),
    "ppo+epo token": ("ppo_gae", "value_head", {"entropy_control": "epo"}, {"entropy_agg": "token"}),
    # Code mode's reference includes this step's entropy: a corridor of 1 x reference cuts through it.
    "ppo+epo code": ("ppo_gae", "value_head", {"entropy_control": "epo"}, {"mode": "code", "kappa_r": 1.0}),
    "grpo+epo trajectory": ("grpo", None, {"entropy_control": "epo"}, {"entropy_agg": "trajectory"}),
    "grpo+epo token seq-mean-token-mean": ("grpo", None, {"entropy_control": "epo", "loss_agg": "seq-mean-token-mean"},
                                           {"entropy_agg": "token"}),
    "ppo+epo separate critic": ("ppo_gae", "separate", {"entropy_control": "epo"}, {}),
}
# Settings under which each method acts on this small batch.
METHOD_FIELDS = {"bonus": {"entropy_coef": 0.01}, "clip_cov": {"clip_cov_ratio": 0.1, "clip_cov_lb": -100.0},
                 "kl_cov": {"kl_cov_ratio": 0.1}}


def method_settings(name):
    advantage, critic, algo_fields, epo_fields = METHODS[name]
    config = run_config(advantage=advantage, critic=critic or "value_head", **algo_fields,
                        **METHOD_FIELDS.get(algo_fields["entropy_control"], {}))
    for key, value in epo_fields.items():
        config.epo[key] = value
    return config, LossSettings.from_config(config)


@functools.cache
def loss_on_outputs(settings):
    """value_and_grad of the objective as a function of the forward pass's outputs: the model's
    gradient is its cotangent pulled back through the forward VJP (the chain rule)."""
    return jax.jit(jax.value_and_grad(make_loss_fn(settings, lambda outputs, batch: outputs), has_aux=True))


def history_state(settings, batch, entropy_BxR):
    """A loss state with one earlier step in the history, at 0.45 x this batch's entropy, so the
    corridor's upper bound (kappa_r = 2) cuts through the tokens and the smoothing penalty is live."""
    sums = algo.entropy_sums(jnp.asarray(0.45 * entropy_BxR), jnp.asarray(batch["response_mask"]),
                             jnp.asarray(batch["turn_index"]), settings.epo.max_turns)
    return loss_state_update(loss_state_init(settings), sums)


@pytest.mark.parametrize("name", list(METHODS))
def test_loss_gradient_and_history_match_padded(name):
    config, settings = method_settings(name)
    critic = METHODS[name][1]
    forward, vjp = forward_programs(critic)
    params = trainable_params(config)
    batches = scored_batches(critic)
    padded = batches["padded"]
    state = history_state(settings, padded, np.asarray(forward(params, padded)["entropy"]))
    results = {}
    for layout, batch in batches.items():
        outputs = forward(params, batch)
        (loss, (metrics, sums)), cotangent = loss_on_outputs(settings)(outputs, batch, state)
        results[layout] = jax.device_get((loss, metrics, sums, vjp(params, batch, cotangent)))
    (loss, metrics, sums, grads), (packed_loss, packed_metrics, packed_sums, packed_grads) = (
        results["padded"], results["packed"])
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-5, atol=1e-6)
    for key in metrics:
        np.testing.assert_allclose(packed_metrics[key], metrics[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(packed_sums), jax.tree.leaves(sums)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
    for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    # The method acts here: the entropy term or its per-token reshaping is live.
    control = settings.entropy_control
    live = {"bonus": "entropy_loss", "epo": "smooth_fraction", "aepo": "aepo_adv_scale_max",
            "clip_cov": "cov_selected_fraction", "kl_cov": "kl_cov_penalty",
            "top_entropy": "top_entropy_kept_fraction"}.get(control)
    assert live is None or metrics[live] != 0.0
    assert critic is None or metrics["value_loss"] > 0.0
    assert metrics["kl_loss"] != 0.0 and (control == "kl_cov" or metrics["pg_clipfrac"] > 0.0)  # KL-Cov: no clip


# --- the whole update: sharded, packed, two epochs of two minibatches == padded, one device ---


def test_sharded_multi_epoch_packed_update_matches_padded_single_device():
    config = run_config(micro_batch_size=4, ppo_epochs=2, num_minibatches=2, entropy_control="epo")
    graphdef, _ = model()
    optimizer = optim.make_optimizer(config.optim, 10)
    batch = dict(scored_batches("value_head")["padded"])
    rows = len(batch["valid"])
    results = {}
    for name, devices, shards in (("padded", jax.devices()[:1], 1), ("packed", jax.devices()[:2], 2)):
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, shards, 1
        mesh = sharding.make_mesh(config.mesh, devices)
        state = init_train_state(config, trainable_params(config), optimizer, mesh)
        arrays = sharding.shard_batch(batch, mesh)
        if name == "packed":
            orders = [np.arange(rows), *np.asarray(epoch_orders(state.rng, rows, 2))]
            layout = packing_layout(batch, orders, micro_batch_size=4, shards=shards)
            arrays.update(sharding.place_packing(layout, batch_lib.PACK_SHARD_AXIS, mesh))
        state_sharding = jax.tree.map(lambda x: x.sharding, state)
        update = jax.jit(make_update_fn(config, actor_critic.make_forward_fn(config, graphdef), optimizer),
                         in_shardings=(state_sharding, None), out_shardings=(state_sharding, None))
        results[name] = jax.device_get(update(state, arrays))
    (padded_state, padded_metrics), (packed_state, packed_metrics) = results["padded"], results["packed"]
    assert padded_metrics["skipped"] == 0.0
    for key in ("loss", "entropy", "kl_loss", "value_loss", "pg_clipfrac", "entropy_sum", "token_count"):
        np.testing.assert_allclose(packed_metrics[key], padded_metrics[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(packed_state.params), jax.tree.leaves(padded_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(packed_state.loss_state), jax.tree.leaves(padded_state.loss_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
