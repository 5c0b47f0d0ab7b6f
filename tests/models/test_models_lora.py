"""LoRA adapters: the base model's logits at init (B = 0), PEFT's logits on transformers for the same
adapters, gradients against finite differences, the merged weights, the sampler running the
adapters, and adapters sharded over 8 CPU devices like the weights they adapt."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from epo_jax.models import loading, lora, transformer
from epo_jax.models.sampler import Sampler, SamplingParams
from model_helpers import jitted_logits, left_padded, random_params, tiny_config, torch_reference

SPEC = lora.LoraSpec(rank=4, alpha=12.0)
PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 61, 128], [301, 12, 9, 88], [40, 41, 42, 43, 44, 45, 46]]


def random_adapters(params: nnx.State, seed: int, scale: float = 0.3) -> nnx.State:
    """The adapters of `params` with every A and B random (B != 0: the adapters change the model)."""
    rng = np.random.default_rng(seed)
    adapters = jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype),
                            lora.adapter_params(params))
    return nnx.merge_state(lora.base_params(params), adapters)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def adapted(request):
    """(config, base graphdef, base params, adapted graphdef, adapted params with random A and B)."""
    config = tiny_config(request.param)
    graphdef, params = random_params(config, seed=3)
    lora_graphdef, lora_params = lora.with_adapters(graphdef, params, SPEC, jax.random.key(7))
    return config, graphdef, params, lora_graphdef, random_adapters(lora_params, seed=8)


def test_zero_b_at_init_gives_the_base_logits():
    config = tiny_config("qwen2")
    graphdef, params = random_params(config, seed=1)
    lora_graphdef, lora_params = lora.with_adapters(graphdef, params, SPEC, jax.random.key(0))
    adapters = lora.adapter_params(lora_params)
    b_leaves = [v for path, v in nnx.to_flat_state(adapters) if path[-1] == "lora_b"]
    a_leaves = [v for path, v in nnx.to_flat_state(adapters) if path[-1] == "lora_a"]
    assert len(b_leaves) == len(a_leaves) == 7 * config.num_layers
    assert all(not np.any(np.asarray(b.get_value())) for b in b_leaves)
    assert all(np.std(np.asarray(a.get_value())) > 0 for a in a_leaves)  # A is drawn, not zero
    tokens, mask = left_padded(PROMPTS)
    np.testing.assert_array_equal(jitted_logits(lora_graphdef, lora_params, tokens, mask),
                                  jitted_logits(graphdef, params, tokens, mask))


def test_adapted_logits_match_peft_on_transformers(adapted, tmp_path, toy_tokenizer):
    import peft

    config, graphdef, params, lora_graphdef, lora_params = adapted
    loading.save_pretrained(params, config, toy_tokenizer, str(tmp_path))
    reference = peft.get_peft_model(torch_reference(str(tmp_path)), peft.LoraConfig(
        r=SPEC.rank, lora_alpha=SPEC.alpha, target_modules=list(SPEC.modules), lora_dropout=0.0))
    tensors = {name: torch.from_numpy(array) for name, array in lora.peft_tensors(lora_params).items()}
    result = peft.set_peft_model_state_dict(reference, tensors)
    assert not result.unexpected_keys
    tokens, mask = left_padded(PROMPTS)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        theirs = reference.eval()(input_ids=torch.tensor(tokens, dtype=torch.long),
                                  attention_mask=torch.tensor(mask, dtype=torch.long),
                                  position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    ours = jitted_logits(lora_graphdef, lora_params, tokens, mask)
    assert np.abs(ours - theirs)[mask].max() <= 1e-4
    base = jitted_logits(graphdef, params, tokens, mask)
    assert np.abs(ours - base)[mask].max() > 1e-1  # the adapters matter


def test_merged_weights_give_the_adapted_logits(adapted):
    _, graphdef, params, lora_graphdef, lora_params = adapted
    merged_graphdef, merged_params = lora.merged(lora_graphdef, lora_params)
    assert merged_graphdef == graphdef
    assert jax.tree.structure(merged_params) == jax.tree.structure(params)
    tokens, mask = left_padded(PROMPTS)
    np.testing.assert_allclose(jitted_logits(merged_graphdef, merged_params, tokens, mask),
                               jitted_logits(lora_graphdef, lora_params, tokens, mask), rtol=1e-4, atol=1e-4)


def test_adapter_gradients_match_finite_differences(adapted):
    """d/d(adapters) of sum(w * log_softmax(logits)) against central differences along random
    directions, one direction per adapter matrix of the first layer (adapters of std 0.1).

    In float32 the rounding of the logits, not the curvature, limits a difference quotient: at a
    step of 3e-3 it is off by up to 2% on some machines. So the step is 3e-2, its O(eps^2) error
    removed by Richardson extrapolation, (4 D(eps/2) - D(eps)) / 3, and the two objectives are
    differenced element by element in float64 before summing (no cancellation of two sums near 800)."""
    config, _, _, lora_graphdef, lora_params = adapted
    lora_params = random_adapters(lora_params, seed=9, scale=0.1)
    base, adapters = lora.base_params(lora_params), lora.adapter_params(lora_params)
    tokens, mask = left_padded(PROMPTS)
    weights = np.random.default_rng(0).standard_normal((*tokens.shape, config.vocab_size)).astype(np.float32)

    @jax.jit
    def objective_terms(adapters):
        logits = transformer.logits(lora_graphdef, nnx.merge_state(base, adapters), tokens, None, mask)
        return jnp.where(mask[..., None], weights * jax.nn.log_softmax(logits), 0.0)

    grads = jax.grad(lambda adapters: jnp.sum(objective_terms(adapters)))(adapters)
    rng = np.random.default_rng(1)
    checked = 0
    for path, grad in nnx.to_flat_state(grads):
        if path[1] != 0:
            continue
        direction = rng.standard_normal(grad.shape).astype(np.float32)
        direction /= np.linalg.norm(direction)

        def central_difference(step, path=path, direction=direction):
            def terms_at(offset):
                moved = jax.tree_util.tree_map_with_path(
                    lambda p, x: x + offset * direction if tuple(k.key for k in p[:-1]) == path else x, adapters)
                return np.asarray(objective_terms(moved), np.float64)
            return float(np.sum(terms_at(step) - terms_at(-step))) / (2 * step)

        eps = 3e-2
        numeric = (4 * central_difference(eps / 2) - central_difference(eps)) / 3
        analytic = float(np.sum(np.asarray(grad.get_value()) * direction))
        assert abs(analytic) > 1e-2, path  # a gradient that is really there
        np.testing.assert_allclose(analytic, numeric, rtol=1e-2, err_msg=str(path))
        checked += 1
    assert checked == 14  # A and B of q, k, v, o, gate, up, down


def test_sampler_generates_with_the_adapters(adapted):
    """Prefill and decode run the adapters: the sampler's log-probs are the adapted model's
    teacher-forced ones, not the base model's."""
    config, graphdef, params, lora_graphdef, lora_params = adapted
    out = Sampler(lora_graphdef, config, prompt_buckets=(16,)).generate(
        lora_params, PROMPTS, jax.random.key(2), SamplingParams(temperature=1.0, max_new_tokens=6))
    sequences = [list(p) + list(out.tokens[i, :out.lengths[i]]) for i, p in enumerate(PROMPTS)]
    tokens, mask = left_padded(sequences)
    width = tokens.shape[1]

    def chosen_logprobs(g, p):
        logp = jax.nn.log_softmax(jitted_logits(g, p, tokens, mask), axis=-1)
        return [np.asarray(logp[i, np.arange(width - n - 1, width - 1), tokens[i, width - n:]])
                for i, n in enumerate(out.lengths)]

    adapted_logp, base_logp = chosen_logprobs(lora_graphdef, lora_params), chosen_logprobs(graphdef, params)
    for i, n in enumerate(out.lengths):
        np.testing.assert_allclose(out.logprobs[i, :n], adapted_logp[i], atol=1e-4)
        assert np.abs(out.logprobs[i, :n] - base_logp[i]).max() > 1e-2


def test_adapters_shard_like_their_weights_and_match_one_device(adapted):
    _, _, _, lora_graphdef, lora_params = adapted
    annotated = transformer.param_partition_specs(lora_params)["layers"][0]
    # A takes the mesh axis of the kernel's first input dimension, B that of its first output dimension.
    for module, (a_axis, b_axis) in {("self_attn", "q_proj"): ("fsdp", "tensor"), ("self_attn", "o_proj"):
                                     ("tensor", "fsdp"), ("mlp", "up_proj"): ("fsdp", "tensor"),
                                     ("mlp", "down_proj"): ("tensor", "fsdp")}.items():
        adapter = annotated[module[0]][module[1]]["adapter"]
        assert adapter["lora_a"].get_value() == PartitionSpec(a_axis, None)
        assert adapter["lora_b"].get_value() == PartitionSpec(None, b_axis)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    specs = transformer.param_partition_specs(lora_params, mesh)
    placed = jax.device_put(lora_params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    q_b = placed["layers"][0]["self_attn"]["q_proj"]["adapter"]["lora_b"].get_value()
    assert q_b.sharding.shard_shape(q_b.shape)[1] == q_b.shape[1] // 2  # split over the tensor axis
    tokens, mask = left_padded(PROMPTS + [[7, 8, 9]])
    sharded = jitted_logits(lora_graphdef, placed, tokens, mask)
    single = jitted_logits(lora_graphdef, lora_params, tokens, mask)
    assert np.abs(sharded - single)[mask].max() <= 1e-4


def test_spec_rejects_bad_ranks_and_targets():
    with pytest.raises(ValueError, match="rank 0 must be >= 1"):
        lora.LoraSpec(rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="subset of"):
        lora.LoraSpec(rank=2, alpha=1.0, targets=("q", "qkv"))
