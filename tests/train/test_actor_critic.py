"""The run's params under LoRA: only the adapters and heads are trained and held by the optimizer,
checkpoints leave the base out, the update matches on one device and on 8, and the KL reference
is the base model itself, the same arrays as the policy's frozen weights."""
import jax
import numpy as np
import pytest
from flax import nnx

from epo_jax.models import lora, transformer
from epo_jax.train import actor_critic, optim, sharding
from epo_jax.train.trainer import make_score_fn
from epo_jax.train.update import checkpointed, init_train_state, make_update_fn, with_frozen
from test_update import PROMPT, RESPONSE, mesh_of, random_batch, tiny_config, tiny_model


def lora_config(**algo):
    config = tiny_config(**algo)
    config.model.lora.rank, config.model.lora.alpha = 4, 8.0
    return config


def lora_params(config, adapter_scale: float = 0.0):
    """(base graphdef, loaded params, policy graphdef, run params); adapters with B = 0, or every A
    and B random of std `adapter_scale`."""
    (graphdef, loaded), model_config = tiny_model()
    policy_graphdef, policy = actor_critic.policy_model(config, graphdef, loaded)
    if adapter_scale:
        rng = np.random.default_rng(5)
        adapters = jax.tree.map(lambda x: (adapter_scale * rng.standard_normal(x.shape)).astype(x.dtype),
                                lora.adapter_params(policy))
        policy = nnx.merge_state(lora.base_params(policy), adapters)
    return graphdef, loaded, policy_graphdef, actor_critic.init_params(config, policy, model_config.hidden_size)


def one_update(config, mesh):
    """(state before, state after) of one jitted LoRA update on a random batch of 16 rows, on the host."""
    _, _, policy_graphdef, params = lora_params(config)
    optimizer = optim.make_optimizer(config.optim, 10)
    state = init_train_state(config, params, optimizer, mesh)
    before = jax.device_get(state)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    update = jax.jit(make_update_fn(config, actor_critic.make_forward_fn(config, policy_graphdef), optimizer),
                     in_shardings=(state_sharding, None), out_shardings=(state_sharding, None))
    after, _ = update(state, sharding.shard_batch(random_batch(16), mesh))
    return before, jax.device_get(after)


def leaves_by_path(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("critic", ["value_head", pytest.param("separate", marks=pytest.mark.slow)])
def test_update_trains_only_the_adapters_and_the_critic(critic):
    # Two minibatches: the zero value head passes no gradient to a separate critic's adapters until
    # the first minibatch has moved it.
    config = lora_config(micro_batch_size=8, num_minibatches=2, critic=critic)
    before, after = one_update(config, mesh_of(1, 1, jax.devices()[:1]))
    old, new = leaves_by_path(before.params), leaves_by_path(after.params)
    assert old.keys() == new.keys()
    frozen = [p for p in old if "policy" in p and "adapter" not in p]
    trained = [p for p in old if p not in frozen]
    assert len(frozen) == len(jax.tree.leaves(tiny_model()[0][1]))
    for path in frozen:
        np.testing.assert_array_equal(new[path], old[path], err_msg=path)
    lora_b = [p for p in trained if "lora_b" in p]
    assert len(lora_b) == 14 * (2 if critic == "separate" else 1)
    assert all(np.abs(new[p]).max() > 0 for p in lora_b)  # B left 0: the update reached every adapter
    if critic == "separate":  # the critic's own adapters on the same base, drawn apart from the policy's
        assert all("adapter" in p for p in trained if "backbone" in p)
        a_policy = before.params["policy"]["layers"][0]["mlp"]["up_proj"]["adapter"]["lora_a"].get_value()
        a_critic = before.params["critic"]["backbone"]["layers"][0]["mlp"]["up_proj"]["adapter"]["lora_a"].get_value()
        assert np.abs(a_policy - a_critic).max() > 1e-3
    # AdamW's moments exist for the trained params only; a checkpoint holds those and no base weight.
    trained_size = sum(old[p].size for p in trained if old[p].ndim)
    moments = sum(x.size for x in jax.tree.leaves(before.opt_state) if x.ndim)  # mu and nu; counts are scalars
    assert moments == 2 * trained_size
    saved = leaves_by_path(checkpointed(before).params)
    assert sorted(saved) == sorted(trained)
    rebuilt = leaves_by_path(with_frozen(checkpointed(before), before).params)
    assert rebuilt.keys() == old.keys() and all(np.array_equal(rebuilt[p], old[p]) for p in old)


def test_sharded_lora_update_matches_single_device():
    config = lora_config(micro_batch_size=8)
    _, single = one_update(config, mesh_of(1, 1, jax.devices()[:1]))
    _, sharded = one_update(config, mesh_of(4, 2))
    for x, y in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_kl_reference_is_the_base_model_and_no_copy():
    config = lora_config(micro_batch_size=4)
    graphdef, loaded, policy_graphdef, params = lora_params(config, adapter_scale=0.3)
    reference = actor_critic.reference_params(params)
    # The same arrays as the policy's frozen weights: no second copy of the model.
    base_leaves = jax.tree.leaves(lora.base_params(params["policy"]))
    assert all(a is b for a, b in zip(jax.tree.leaves(reference), base_leaves, strict=True))
    batch = random_batch(4)
    score = jax.jit(make_score_fn(
        config, actor_critic.make_forward_fn(config, policy_graphdef),
        actor_critic.make_forward_fn(config, policy_graphdef, with_critic=False), trainer_logprobs=False,
        reference_forward_fn=actor_critic.make_forward_fn(config, graphdef, with_critic=False)))
    ref_logprobs = np.asarray(score(params, reference, batch)[0]["ref_logprobs"])
    # The base model alone, as loaded (no adapters anywhere), scored independently.
    logits = np.asarray(transformer.logits(graphdef, loaded, batch["tokens"], None, batch["attention_mask"]),
                        np.float64)[:, PROMPT - 1:-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = np.take_along_axis(logp, batch["tokens"][:, PROMPT:, None], axis=-1)[..., 0]
    assert ref_logprobs.shape == (4, RESPONSE)
    np.testing.assert_allclose(ref_logprobs, expected, atol=2e-5)
    policy_logprobs = np.asarray(actor_critic.make_forward_fn(config, policy_graphdef)(params, batch)["logprobs"])
    assert np.abs(policy_logprobs - expected).max() > 1e-2  # the policy itself does differ from its reference
