"""A real drift: the embedded SmolLM2-135M samples real ScienceWorld turns in bfloat16
(rollout.dtype=bfloat16) and the trainer's score pass scores them in float32. The logged drift
is numpy's of the two sets of log-probs, and larger than that of a float32 sampler given the same
prompts and keys, on the tokens both samplers drew."""
import dataclasses
import pathlib
import runpy

import jax
import numpy as np
import pytest

from epo_jax.models.loading import load_pretrained, with_compute_dtype
from epo_jax.rollout import agent_loop
from epo_jax.train import actor_critic, environments
from epo_jax.train import batch as batch_lib
from epo_jax.train.trainer import make_score_fn, score_pass_metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def first_turn_config():
    config = runpy.run_path(str(ROOT / "configs" / "scienceworld.py"))["get_config"]()
    config.env.max_turns = 1
    config.rollout.max_response_len = 24
    config.algo.use_kl_loss = False  # no reference forward: the drift needs the policy's only
    return config


def update_batch(config, samples, tokenizer):
    return batch_lib.build_batch(samples, prompt_buckets=config.rollout.prompt_buckets,
                                 response_len=config.rollout.max_response_len, rows=len(samples),
                                 pad_id=agent_loop.pad_id(tokenizer), padding_id_start=100)


def np_drift(trainer, sampler, mask):
    d = (trainer.astype(np.float64) - sampler)[mask > 0]
    ratio = np.exp(d)
    return {"logprob_diff_mean": np.abs(d).mean(), "logprob_diff_max": np.abs(d).max(),
            "k3_kl": (ratio - d - 1).mean(), "ratio_outside_fraction": ((ratio < 0.5) | (ratio > 2)).mean()}


def common_prefix_mask(a, b):
    """1 on each row's tokens up to (excluding) the first position where the two responses differ."""
    mask = np.zeros(a["response_mask"].shape, np.float32)
    for row in range(mask.shape[0]):
        length = int(min(a["response_mask"][row].sum(), b["response_mask"][row].sum()))
        prompt = a["tokens"].shape[1] - mask.shape[1]
        same = a["tokens"][row, prompt:prompt + length] == b["tokens"][row, prompt:prompt + length]
        mask[row, :int(np.argmin(same)) if not same.all() else length] = 1.0
    return mask


def test_bfloat16_sampling_drifts_from_the_float32_trainer_more_than_float32_sampling():
    config = first_turn_config()
    model = load_pretrained("")
    params = actor_critic.init_params(config, model.params, model.config.hidden_size)
    key = jax.random.key(7)
    bfloat16 = with_compute_dtype(model, "bfloat16")
    policy = agent_loop.make_policy(config, bfloat16.graphdef, bfloat16.config, model.tokenizer)
    with environments.make_pool(config, 2, group_size=2, seed=0) as pool:
        rollout = agent_loop.run_episodes(pool, policy(model.params, temperature=1.0),
                                          model.tokenizer, environments.train_specs(config)[:1], key, config=config)
    samples = {"bfloat16": rollout.samples}
    assert len(samples["bfloat16"]) == 2
    # The float32 sampler on the same prompts with each reply's key (its episode's and turn's).
    keys = jax.numpy.stack([agent_loop.reply_key(key, s.traj_id, s.turn_index) for s in rollout.samples])
    generations = agent_loop.make_policy(config, model.graphdef, model.config, model.tokenizer)(
        model.params, temperature=1.0)([s.prompt_ids for s in rollout.samples], keys)
    samples["float32"] = [dataclasses.replace(s, response_ids=g.ids, response_logprobs=g.logprobs,
                                              response_entropy=g.entropy)
                          for s, g in zip(rollout.samples, generations)]

    score = jax.jit(make_score_fn(config, actor_critic.make_forward_fn(config, model.graphdef),
                                  actor_critic.make_forward_fn(config, model.graphdef, with_critic=False),
                                  trainer_logprobs=True))
    batches, trainer, logged = {}, {}, {}
    for dtype, turn_samples in samples.items():
        batches[dtype] = update_batch(config, turn_samples, model.tokenizer)
        arrays, raw = score(params, None, batches[dtype])
        trainer[dtype] = np.asarray(arrays["trainer_logprobs"])
        logged[dtype] = score_pass_metrics(jax.device_get(raw))
        expected = np_drift(trainer[dtype], batches[dtype]["old_logprobs"], batches[dtype]["response_mask"])
        for name, value in expected.items():
            np.testing.assert_allclose(logged[dtype][f"drift/{name}"], value, rtol=1e-5, err_msg=f"{dtype} {name}")
            np.testing.assert_allclose(logged[dtype][f"drift/turn_00/{name}"], value, rtol=1e-5)
    assert logged["bfloat16"]["drift/logprob_diff_mean"] > 10 * logged["float32"]["drift/logprob_diff_mean"]

    # The tokens both samplers drew (each row's common prefix): the same tokens in the same contexts.
    same = common_prefix_mask(batches["bfloat16"], batches["float32"])
    # A bfloat16 sampler's distribution differs a little, so from the same key a row diverges
    # after a few tokens (4 here; the first reply tokens are near-certain ones).
    assert same.sum() >= 4, "the two samplers should agree on some tokens before they diverge"
    np.testing.assert_allclose(trainer["bfloat16"][same > 0], trainer["float32"][same > 0], atol=1e-6)
    on_same = {dtype: np_drift(trainer[dtype], batches[dtype]["old_logprobs"], same)["logprob_diff_mean"]
               for dtype in samples}
    assert on_same["bfloat16"] > 10 * on_same["float32"], on_same
    assert on_same["float32"] < 1e-4  # one float32 graph, two programs: rounding only
