"""A loaded model seen in another compute dtype (the sampler's rollout.dtype): the same params run
a bfloat16 graph, casting them once changes no output, and bfloat16 log-probs drift from float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epo_jax.models.loading import LoadedModel, cast_for_compute, with_compute_dtype
from epo_jax.models.sampler import Sampler, SamplingParams
from model_helpers import jitted_logits, left_padded, random_params, tiny_config


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    config = tiny_config("qwen2")  # q/k/v biases: every kind of parameter is cast
    graphdef, params = random_params(config, seed=5)
    return LoadedModel(graphdef, params, config, tokenizer=None)


def test_model_and_auto_keep_the_trainer_graph_on_cpu(model):
    assert with_compute_dtype(model, "model") is model
    assert with_compute_dtype(model, "auto") is model  # auto is float32 on a CPU
    assert with_compute_dtype(model, "float32") is model


def test_a_bfloat16_view_shares_the_params_and_computes_in_bfloat16(model):
    view = with_compute_dtype(model, "bfloat16")
    assert view.params is model.params and view.tokenizer is model.tokenizer
    assert (view.config.dtype, view.config.param_dtype, view.config.attention) == ("bfloat16", "float32", "xla")
    assert view.config.replace(dtype="float32") == model.config  # nothing else changed
    tokens, mask = left_padded([[5, 9, 31, 7, 100], [3, 4]])
    low = jitted_logits(view.graphdef, model.params, tokens, mask)
    high = jitted_logits(model.graphdef, model.params, tokens, mask)
    real = mask[..., None].repeat(low.shape[-1], -1)
    difference = np.abs(low - high)[real]
    assert 1e-3 < difference.max() < 0.5  # bfloat16 rounding: visible, small
    with pytest.raises(ValueError, match="model.attention"):
        with_compute_dtype(model, "bfloat16", attention="cudnn")  # no cuDNN kernel on a CPU


def test_casting_the_params_once_changes_no_sampled_token_or_log_prob(model):
    view = with_compute_dtype(model, "bfloat16")
    cast = cast_for_compute(model.params, view.config)
    assert {leaf.dtype for leaf in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
    assert cast_for_compute(model.params, model.config) is model.params  # nothing wider than float32
    sampler = Sampler(view.graphdef, view.config, prompt_buckets=(8,))
    prompts = [[5, 9, 31, 7, 100], [3, 4], [200, 201, 202]]
    sampling = SamplingParams(temperature=0.9, max_new_tokens=10)
    as_stored = sampler.generate(model.params, prompts, jax.random.key(3), sampling)
    as_cast = sampler.generate(cast, prompts, jax.random.key(3), sampling)
    for field in ("tokens", "logprobs", "entropies", "lengths"):
        np.testing.assert_array_equal(getattr(as_cast, field), getattr(as_stored, field), err_msg=field)


def test_bfloat16_sampling_drifts_from_float32_teacher_forcing(model):
    """The bfloat16 sampler's log-probs of its own tokens against the float32 graph's
    teacher-forced ones (the trainer's view): they differ by bfloat16 rounding, no more."""
    view = with_compute_dtype(model, "bfloat16")
    sampler = Sampler(view.graphdef, view.config, prompt_buckets=(8,))
    prompts = [[5, 9, 31, 7, 100], [3, 4], [200, 201, 202], [17] * 6]
    out = sampler.generate(cast_for_compute(model.params, view.config), prompts, jax.random.key(8),
                           SamplingParams(temperature=1.0, max_new_tokens=10))
    sequences = [p + list(out.tokens[i, :out.lengths[i]]) for i, p in enumerate(prompts)]
    tokens, mask = left_padded(sequences)
    logits = jitted_logits(model.graphdef, model.params, tokens, mask).astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    width = tokens.shape[1]
    differences = []
    for i, length in enumerate(out.lengths):
        positions = np.arange(width - length - 1, width - 1)
        differences.append(np.abs(logp[i, positions, tokens[i, positions + 1]] - out.logprobs[i, :length]))
    differences = np.concatenate(differences)
    assert 1e-3 < differences.mean() < 0.1 and differences.max() < 0.5
