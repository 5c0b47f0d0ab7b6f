"""The slot engine (continuous batching): its replies equal the turn-batched sampler's and the
teacher-forced values, do not depend on slots, insertion order or timing, and shard over 8 devices."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from epo_jax.models import transformer
from epo_jax.models.continuous import SlotEngine
from epo_jax.models.sampler import Sampler, SamplingParams
from model_helpers import jitted_logits, left_padded, random_params, tiny_config

LENGTHS = (9, 3, 14, 5, 11, 2, 16, 7, 12, 4)
STOPS = ("th", "e ")


@pytest.fixture(scope="module")
def model():
    config = tiny_config("llama")
    graphdef, params = random_params(config, seed=11)
    return config, graphdef, params


@pytest.fixture(scope="module")
def sampler(model, toy_tokenizer):
    config, graphdef, _ = model
    return Sampler(graphdef, config, toy_tokenizer, stop_strings=STOPS, prompt_buckets=(8, 16))


def _prompts(lengths=LENGTHS, seed=0) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [list(rng.randint(3, 300, n)) for n in lengths]


def play(engine: SlotEngine, prompts, keys, order=None, per_chunk: int | None = None) -> dict[int, tuple]:
    """Every prompt through the engine: queued in `order`, at most `per_chunk` inserted between
    two chunks (default: as many as there are free slots). {prompt index: (tokens, logprobs,
    entropies, length, finish reason)}."""
    queue = list(range(len(prompts)) if order is None else order)
    owner, replies = {}, {}
    while queue or engine.busy:
        requests = []
        for slot in engine.free_slots[:per_chunk]:
            if not queue:
                break
            i = queue.pop(0)
            owner[slot] = i
            requests.append((slot, prompts[i], keys[i]))
        engine.insert(requests)
        slots, out = engine.decode()
        for row, slot in enumerate(slots):
            n = out.lengths[row]
            replies[owner.pop(slot)] = (out.tokens[row, :n], out.logprobs[row, :n], out.entropies[row, :n], n,
                                        out.finish_reasons[row])
    return replies


def assert_same_as_sampler(replies, reference):
    for i, (tokens, logprobs, entropies, length, reason) in replies.items():
        assert (length, reason) == (reference.lengths[i], reference.finish_reasons[i])
        np.testing.assert_array_equal(tokens, reference.tokens[i, :length])
        np.testing.assert_allclose(logprobs, reference.logprobs[i, :length], atol=1e-5)
        np.testing.assert_allclose(entropies, reference.entropies[i, :length], atol=1e-5)


GREEDY = SamplingParams(temperature=0.7, greedy=True, max_new_tokens=12)
SAMPLED = SamplingParams(temperature=1.8, top_p=0.9, top_k=40, max_new_tokens=12)


@pytest.mark.parametrize("num_slots, chunk_len", [(3, 2), (16, 16)])
def test_greedy_replies_equal_the_turn_batched_sampler(model, sampler, num_slots, chunk_len):
    """Fewer slots than prompts (slots are reused) and more; replies end at EOS, after a stop
    string or at the length limit."""
    _, _, params = model
    prompts = _prompts()
    keys = jax.random.split(jax.random.key(0), len(prompts))
    reference = sampler.generate(params, prompts, keys, GREEDY)
    engine = SlotEngine(sampler, params, GREEDY, num_slots=num_slots, chunk_len=chunk_len)
    replies = play(engine, prompts, keys)
    assert sorted(replies) == list(range(len(prompts)))
    assert_same_as_sampler(replies, reference)
    assert not engine.busy and engine.free_slots == list(range(num_slots))
    # Token 0 of a reply comes from its prefill; every decode step samples one token per running reply.
    decoded, active = engine.row_steps()
    assert active == sum(int(r[3]) - 1 for r in replies.values()) and decoded % num_slots == 0
    assert active <= decoded


def test_sampled_replies_do_not_depend_on_slots_order_or_timing(model, sampler):
    _, graphdef, params = model
    prompts = _prompts((6, 13, 2, 9, 15, 4, 8, 11, 16, 3), seed=3)
    keys = jax.random.split(jax.random.key(7), len(prompts))
    reference = sampler.generate(params, prompts, keys, SAMPLED)
    first = play(SlotEngine(sampler, params, SAMPLED, num_slots=4, chunk_len=3), prompts, keys)
    assert {int(r[4]) for r in first.values()} == {0, 1, 2}  # length, EOS and stop strings all occur
    assert_same_as_sampler(first, reference)
    assert_teacher_forced(graphdef, params, prompts, first, SAMPLED.temperature)
    # Other slots, insertion order and moments: the same bits.
    reversed_order = list(range(len(prompts)))[::-1]
    odd_first = list(range(1, len(prompts), 2)) + list(range(0, len(prompts), 2))
    for order, per_chunk in ((reversed_order, None), (odd_first, 1)):
        again = play(SlotEngine(sampler, params, SAMPLED, num_slots=4, chunk_len=3), prompts, keys, order, per_chunk)
        for i, reply in first.items():
            for mine, theirs in zip(again[i], reply):
                np.testing.assert_array_equal(mine, theirs)
    # Another number of slots and chunk length: the same replies (float rounding of another batch
    # shape aside).
    assert_same_as_sampler(play(SlotEngine(sampler, params, SAMPLED, num_slots=16, chunk_len=16), prompts, keys),
                           reference)


def assert_teacher_forced(graphdef, params, prompts, replies, temperature):
    """Log-probs and entropies against one forward pass over prompt + reply (how the trainer
    scores them), in numpy."""
    sequences = [list(p) + list(replies[i][0]) for i, p in enumerate(prompts)]
    tokens, mask = left_padded(sequences)
    z = jitted_logits(graphdef, params, tokens, mask).astype(np.float64) / temperature
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    width = tokens.shape[1]
    for i, (_, logprobs, entropies, n, _) in replies.items():
        at = np.arange(width - n - 1, width - 1)  # position t scores token t + 1
        np.testing.assert_allclose(logprobs, logp[i, at, tokens[i, at + 1]], atol=1e-4)
        np.testing.assert_allclose(entropies, -np.sum(np.exp(logp[i, at]) * logp[i, at], -1), atol=1e-4)


def test_sharded_over_8_devices_matches_one_device(model, sampler, toy_tokenizer):
    config, graphdef, params = model
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    specs = transformer.param_partition_specs(params, mesh)
    sharded_params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    sharded_sampler = Sampler(graphdef, config, toy_tokenizer, stop_strings=STOPS, prompt_buckets=(8, 16), mesh=mesh)
    prompts = _prompts(seed=12)
    keys = jax.random.split(jax.random.key(6), len(prompts))
    engine = SlotEngine(sharded_sampler, sharded_params, SAMPLED, num_slots=3, chunk_len=4)
    assert engine.num_slots == 8  # a multiple of the 8 row shards
    assert_same_as_sampler(play(engine, prompts, keys), sampler.generate(params, prompts, keys, SAMPLED))


def test_bad_input(model, sampler):
    _, _, params = model
    key = jax.random.key(0)
    engine = SlotEngine(sampler, params, GREEDY, num_slots=2, chunk_len=2)
    with pytest.raises(ValueError, match="slot 1 is not a free slot"):
        engine.insert([(1, [5], key), (1, [6], key)])
    with pytest.raises(ValueError, match="slot 2 is not a free slot"):
        engine.insert([(2, [5], key)])
    with pytest.raises(ValueError, match="length 17 exceeds the largest bucket 16"):
        engine.insert([(0, [5] * 17, key)])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.insert([(0, [], key)])
    assert engine.free_slots == [0, 1] and not engine.busy
    with pytest.raises(ValueError, match="num_slots=0"):
        SlotEngine(sampler, params, GREEDY, num_slots=0, chunk_len=8)
