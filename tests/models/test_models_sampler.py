"""The sampler: log-probs/entropies equal teacher-forced values, truncation, the sampling distribution,
stop strings and EOS, determinism, sharding over 8 CPU devices, and bad input."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from epo_jax.models import transformer
from epo_jax.models.sampler import (FINISH_EOS, FINISH_LENGTH, FINISH_STOP_STRING, Sampler, SamplingParams,
                                    stop_string_table)
from epo_jax.models.tokenizer import token_bytes
from model_helpers import jitted_logits, left_padded, random_params, tiny_config


@pytest.fixture(scope="module")
def model():
    config = tiny_config("llama")
    graphdef, params = random_params(config, seed=11)
    return config, graphdef, params


def _prompts(lengths, seed=0) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [list(rng.randint(3, 300, n)) for n in lengths]


def _teacher_forced(graphdef, params, prompts, out, temperature):
    """log softmax(logits / T) of the generated tokens and the entropies, recomputed by one forward pass
    over the left-padded prompt + response sequences (as the trainer scores them)."""
    sequences = [list(p) + list(out.tokens[i, :out.lengths[i]]) for i, p in enumerate(prompts)]
    tokens, mask = left_padded(sequences)
    logits = jitted_logits(graphdef, params, tokens, mask).astype(np.float64) / temperature
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    width = tokens.shape[1]
    results = []
    for i, length in enumerate(out.lengths):
        positions = np.arange(width - length - 1, width - 1)  # position t scores token t + 1
        chosen = logp[i, positions, tokens[i, positions + 1]]
        entropy = -np.sum(np.exp(logp[i, positions]) * logp[i, positions], axis=-1)
        results.append((chosen, entropy, logp[i, positions]))
    return results


@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=0.7, max_new_tokens=12),
    SamplingParams(temperature=1.6, top_p=0.8, top_k=20, max_new_tokens=12),
    SamplingParams(temperature=0.4, greedy=True, max_new_tokens=12),
])
def test_logprobs_and_entropies_equal_teacher_forced_values(model, sampling):
    config, graphdef, params = model
    prompts = _prompts((9, 3, 14))
    out = Sampler(graphdef, config, prompt_buckets=(8, 16)).generate(params, prompts, jax.random.key(4), sampling)
    assert out.tokens.shape == (3, 12) and (out.lengths >= 1).all()
    for i, (chosen, entropy, _) in enumerate(_teacher_forced(graphdef, params, prompts, out, sampling.temperature)):
        np.testing.assert_allclose(out.logprobs[i, :out.lengths[i]], chosen, atol=1e-4)
        np.testing.assert_allclose(out.entropies[i, :out.lengths[i]], entropy, atol=1e-4)
        assert (out.logprobs[i, out.lengths[i]:] == 0).all()


def test_greedy_picks_the_argmax_and_truncation_restricts_choices(model):
    config, graphdef, params = model
    prompts = _prompts((5,) * 16, seed=3)
    sampler = Sampler(graphdef, config, prompt_buckets=(8,))
    greedy = sampler.generate(params, prompts, jax.random.key(0), SamplingParams(greedy=True, max_new_tokens=6))
    for i, (_, _, logp) in enumerate(_teacher_forced(graphdef, params, prompts, greedy, 1.0)):
        np.testing.assert_array_equal(greedy.tokens[i, :greedy.lengths[i]], logp.argmax(-1))
    top_k = sampler.generate(params, prompts, jax.random.key(1),
                             SamplingParams(temperature=2.0, top_k=3, max_new_tokens=6))
    for i, (chosen, _, logp) in enumerate(_teacher_forced(graphdef, params, prompts, top_k, 2.0)):
        third_best = np.sort(logp, axis=-1)[:, -3]
        assert (chosen >= third_best - 1e-6).all()
    top_p = sampler.generate(params, prompts, jax.random.key(2),
                             SamplingParams(temperature=2.0, top_p=0.3, max_new_tokens=6))
    for i, (chosen, _, logp) in enumerate(_teacher_forced(graphdef, params, prompts, top_p, 2.0)):
        # The nucleus holds every token whose more probable tokens have mass < top_p.
        probs = np.exp(logp)
        mass_above_chosen = np.sum(np.where(logp > chosen[:, None], probs, 0.0), axis=-1)
        assert (mass_above_chosen < 0.3 + 1e-5).all()


def test_sampled_token_frequencies_follow_the_truncated_distribution(model):
    config, graphdef, params = model
    prompt = _prompts((6,), seed=5)[0]
    n = 2048
    sampling = SamplingParams(temperature=1.5, top_k=4, max_new_tokens=1)
    out = Sampler(graphdef, config, prompt_buckets=(8,)).generate(params, [prompt] * n, jax.random.key(7), sampling)
    logits = jitted_logits(graphdef, params, np.array([prompt])).astype(np.float64)[0, -1] / 1.5
    top4 = np.argsort(logits)[-4:]
    expected = np.exp(logits[top4] - logits[top4].max())
    expected = n * expected / expected.sum()
    observed = np.array([(out.tokens[:, 0] == t).sum() for t in top4])
    assert observed.sum() == n
    chi_square = np.sum((observed - expected) ** 2 / expected)
    assert chi_square < 16.27  # 3 degrees of freedom, p = 0.001


def test_same_key_same_output_and_rows_do_not_depend_on_the_batch(model):
    config, graphdef, params = model
    sampler = Sampler(graphdef, config, prompt_buckets=(16,))
    prompts = _prompts((7, 12, 4), seed=8)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    first = sampler.generate(params, prompts, jax.random.key(3), sampling)
    again = sampler.generate(params, prompts, jax.random.key(3), sampling)
    other = sampler.generate(params, prompts, jax.random.key(4), sampling)
    alone = sampler.generate(params, prompts[:1], jax.random.key(3), sampling)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.logprobs, again.logprobs)
    assert not np.array_equal(first.tokens, other.tokens)
    np.testing.assert_array_equal(alone.tokens[0], first.tokens[0])


def test_stop_string_table_agrees_with_searching_the_decoded_bytes():
    rng = np.random.RandomState(0)
    alphabet = b"</aciton>\n "
    vocab = [bytes(rng.choice(list(alphabet), rng.randint(1, 5))) for _ in range(60)] + [b"", b"</action>x"]
    stops = ["</action>", "aab", "abab", "\n\n"]
    table = stop_string_table(stops, vocab)
    for _ in range(300):
        sequence = rng.randint(0, len(vocab), 30)
        states = np.zeros(len(stops), np.int64)
        for step, token in enumerate(sequence):
            states = table[np.arange(len(stops)), states, token]
            text = b"".join(vocab[t] for t in sequence[:step + 1])
            for i, stop in enumerate(stops):
                assert (states[i] == len(stop)) == (stop.encode() in text)


def test_generation_stops_at_eos_or_after_a_stop_string(model, toy_tokenizer):
    config, graphdef, params = model
    stops = ("th", "e ")
    sampler = Sampler(graphdef, config, toy_tokenizer, stop_strings=stops, prompt_buckets=(8,))
    assert sampler.eos_token_ids == (2,)
    vocab = token_bytes(toy_tokenizer, config.vocab_size)
    sampling = SamplingParams(temperature=3.0, max_new_tokens=24)
    out = sampler.generate(params, _prompts((6,) * 64, seed=9), jax.random.key(5), sampling)
    seen = set()
    for row in range(64):
        length, reason = out.lengths[row], out.finish_reasons[row]
        tokens = list(out.tokens[row, :length])
        before_last = b"".join(vocab[t] for t in tokens[:-1])
        assert not any(s.encode() in before_last for s in stops) and 2 not in tokens[:-1]
        text = b"".join(vocab[t] for t in tokens)
        if reason == FINISH_EOS:
            assert tokens[-1] == 2
        elif reason == FINISH_STOP_STRING:
            assert any(s.encode() in text for s in stops)
        else:
            assert reason == FINISH_LENGTH and length == 24
        seen.add(int(reason))
    assert seen == {FINISH_EOS, FINISH_STOP_STRING, FINISH_LENGTH}


def test_sharded_over_8_devices_matches_one_device(model):
    config, graphdef, params = model
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    specs = transformer.param_partition_specs(params, mesh)
    sharded_params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    prompts = _prompts((5, 9, 2), seed=12)
    sampling = SamplingParams(temperature=0.9, max_new_tokens=8)
    single = Sampler(graphdef, config, prompt_buckets=(16,)).generate(params, prompts, jax.random.key(6), sampling)
    sharded = Sampler(graphdef, config, prompt_buckets=(16,), mesh=mesh).generate(
        sharded_params, prompts, jax.random.key(6), sampling)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)


def test_bad_input_is_reported(model):
    config, graphdef, params = model
    sampler = Sampler(graphdef, config, prompt_buckets=(8,))
    with pytest.raises(ValueError, match="length 9 exceeds the largest bucket 8"):
        sampler.generate(params, [[5] * 9], jax.random.key(0))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate(params, [[5], []], jax.random.key(0))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 320\)"):
        sampler.generate(params, [[5, 320]], jax.random.key(0))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        Sampler(graphdef, config, stop_strings=("</action>",))
