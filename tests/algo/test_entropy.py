"""Token entropy and the chunked log-prob / entropy head against numpy and an unchunked reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epo_jax.algo import logprobs_and_entropy, token_entropy


def numpy_entropy(logits: np.ndarray) -> np.ndarray:
    """H = -sum p log p in float64 with 0 log 0 = 0."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    probs = np.exp(log_probs)
    return -np.sum(np.where(probs > 0, probs * np.where(probs > 0, log_probs, 0.0), 0.0), axis=-1)


def numpy_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def test_token_entropy_matches_numpy():
    logits = np.random.default_rng(0).normal(scale=3.0, size=(3, 5, 17)).astype(np.float32)
    np.testing.assert_allclose(token_entropy(jnp.asarray(logits)), numpy_entropy(logits), rtol=1e-5, atol=1e-6)


def test_token_entropy_known_values():
    uniform = jnp.zeros((1, 8))
    np.testing.assert_allclose(token_entropy(uniform), [np.log(8.0)], rtol=1e-6)
    one_hot = jnp.array([[0.0, -jnp.inf, -jnp.inf, -jnp.inf]])
    np.testing.assert_allclose(token_entropy(one_hot), [0.0], atol=1e-7)


def test_token_entropy_with_masked_vocabulary_has_finite_value_and_gradient():
    logits = jnp.array([[1.0, -jnp.inf, 0.5, -jnp.inf, 2.0]])
    value = token_entropy(logits)
    np.testing.assert_allclose(value, numpy_entropy(np.array([[1.0, 0.5, 2.0]])), rtol=1e-6)
    grad = jax.grad(lambda x: token_entropy(x).sum())(logits)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[0, [1, 3]], 0.0)


def test_token_entropy_of_bfloat16_is_float32_and_accurate():
    logits = np.random.default_rng(1).normal(scale=4.0, size=(4, 300)).astype(np.float32)
    bf16_logits = jnp.asarray(logits, jnp.bfloat16)
    value = token_entropy(bf16_logits)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, numpy_entropy(np.asarray(bf16_logits, np.float32)), rtol=1e-5)


def test_token_entropy_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        logits = jnp.asarray(np.random.default_rng(2).normal(size=(6,)), jnp.float64)
        grad = jax.grad(lambda x: token_entropy(x))(logits)
        assert grad.dtype == jnp.float64
        step = 1e-6
        numeric = np.array([
            (numpy_entropy(np.asarray(logits) + step * e) - numpy_entropy(np.asarray(logits) - step * e)) / (2 * step)
            for e in np.eye(6)
        ])
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def _random_head(seed: int, batch: int, seq: int, dim: int, vocab: int):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, seq, dim)), jnp.float32)
    unembedding = jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(batch, seq)), jnp.int32)
    return hidden, unembedding, targets


def _unchunked(hidden, unembedding, targets, temperature):
    """The naive head: full [B, T, V] logits."""
    logits = jnp.einsum("btd,vd->btv", hidden, unembedding) / temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return target_log_probs, entropy


def test_logprobs_and_entropy_matches_numpy_with_temperature():
    hidden, unembedding, targets = _random_head(3, 2, 7, 5, 23)
    logprobs, entropy = logprobs_and_entropy(hidden, unembedding, targets, chunk_size=4, temperature=0.7)
    logits = np.einsum("btd,vd->btv", np.asarray(hidden, np.float64), np.asarray(unembedding, np.float64)) / 0.7
    np.testing.assert_allclose(logprobs, numpy_logprobs(logits, np.asarray(targets)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, numpy_entropy(logits), rtol=1e-5, atol=1e-5)
    assert logprobs.dtype == entropy.dtype == jnp.float32


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _chunked_and_naive_with_gradients(hidden, unembedding, targets, weights, *, chunk_size, temperature):
    """Values and (hidden, unembedding) gradients of sum(w0 logp + w1 H) for both heads."""

    def objective(head_fn, hidden, unembedding):
        logprobs, entropy = head_fn(hidden, unembedding)
        return jnp.sum(weights[0] * logprobs + weights[1] * entropy)

    def chunked(h, w):
        return logprobs_and_entropy(h, w, targets, chunk_size=chunk_size, temperature=temperature)

    def naive(h, w):
        return _unchunked(h, w, targets, temperature)

    results = []
    for head_fn in (chunked, naive):
        grads = jax.grad(lambda h, w: objective(head_fn, h, w), argnums=(0, 1))(hidden, unembedding)
        results.append((*head_fn(hidden, unembedding), *grads))
    return results


@settings(max_examples=25, deadline=None)
@given(
    shape_and_chunk=st.sampled_from([((2, 7), 3), ((2, 7), 64), ((3, 4), 5), ((1, 1), 8)]),
    temperature=st.sampled_from([1.0, 0.4]),
    seed=st.integers(0, 1000),
)
def test_chunked_equals_unchunked_in_values_and_gradients(shape_and_chunk, temperature, seed):
    (batch, seq), chunk_size = shape_and_chunk
    hidden, unembedding, targets = _random_head(seed, batch, seq, 4, 13)
    weights = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(2, batch, seq)), jnp.float32)
    chunked, naive = _chunked_and_naive_with_gradients(
        hidden, unembedding, targets, weights, chunk_size=chunk_size, temperature=jnp.float32(temperature)
    )
    for got, want in zip(chunked, naive):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("used", ["logprobs", "entropy"])
def test_gradients_when_the_loss_uses_one_output(used):
    """The backward pass has a separate path for an unused (symbolically zero) output."""
    hidden, unembedding, targets = _random_head(8, 2, 5, 4, 11)
    pick = 0 if used == "logprobs" else 1

    def chunked(h, w):
        return jnp.sum(logprobs_and_entropy(h, w, targets, chunk_size=3)[pick] ** 2)

    def naive(h, w):
        return jnp.sum(_unchunked(h, w, targets, 1.0)[pick] ** 2)

    got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, unembedding)
    want = jax.grad(naive, argnums=(0, 1))(hidden, unembedding)
    for got_grad, want_grad in zip(got, want):
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-5)


def test_logprobs_and_entropy_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        hidden, unembedding, targets = _random_head(4, 1, 3, 3, 5)
        hidden = hidden.astype(jnp.float64)
        unembedding = unembedding.astype(jnp.float64)

        @jax.jit
        def objective(w):
            logprobs, entropy = logprobs_and_entropy(hidden, w, targets, chunk_size=2)
            return jnp.sum(logprobs) + 0.5 * jnp.sum(entropy)

        grad = np.asarray(jax.grad(objective)(unembedding))
        step = 1e-5
        flat = np.asarray(unembedding).ravel()
        numeric = np.zeros_like(flat)
        for i in range(flat.size):
            bump = np.zeros_like(flat)
            bump[i] = step
            plus = objective(jnp.asarray((flat + bump).reshape(unembedding.shape)))
            minus = objective(jnp.asarray((flat - bump).reshape(unembedding.shape)))
            numeric[i] = (plus - minus) / (2 * step)
    np.testing.assert_allclose(grad.ravel(), numeric, rtol=1e-3, atol=1e-4)


def test_bfloat16_inputs_accumulate_in_float32():
    hidden, unembedding, targets = _random_head(5, 2, 3, 8, 40)
    logprobs, entropy = jax.jit(logprobs_and_entropy)(
        hidden.astype(jnp.bfloat16), unembedding.astype(jnp.bfloat16), targets
    )
    want_logprobs, want_entropy = _unchunked(
        hidden.astype(jnp.bfloat16).astype(jnp.float32), unembedding.astype(jnp.bfloat16).astype(jnp.float32),
        targets, 1.0,
    )
    assert logprobs.dtype == entropy.dtype == jnp.float32
    np.testing.assert_allclose(logprobs, want_logprobs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(entropy, want_entropy, rtol=1e-4, atol=1e-4)

    def objective(h, w):
        logprobs, entropy = logprobs_and_entropy(h, w, targets, chunk_size=4)
        return jnp.sum(logprobs) + jnp.sum(entropy)

    gradient = jax.jit(jax.grad(objective, argnums=(0, 1)))
    grads = gradient(hidden.astype(jnp.bfloat16), unembedding.astype(jnp.bfloat16))
    want_grads = gradient(
        hidden.astype(jnp.bfloat16).astype(jnp.float32), unembedding.astype(jnp.bfloat16).astype(jnp.float32)
    )
    for grad, want in zip(grads, want_grads):
        assert grad.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(grad, np.float32), want, rtol=2e-2, atol=2e-2)


def test_backward_pass_never_holds_the_full_logits():
    """Compiled value_and_grad: temporaries stay far below one float32 [B*T, V] array."""
    batch, seq, dim, vocab, chunk = 16, 512, 16, 8192, 128
    full_logits_bytes = batch * seq * vocab * 4
    shapes = (
        jax.ShapeDtypeStruct((batch, seq, dim), jnp.float32),
        jax.ShapeDtypeStruct((vocab, dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
    )

    def loss(hidden, unembedding, targets):
        logprobs, entropy = logprobs_and_entropy(hidden, unembedding, targets, chunk_size=chunk)
        return jnp.sum(logprobs) + jnp.sum(entropy)

    def naive_loss(hidden, unembedding, targets):
        logprobs, entropy = _unchunked(hidden, unembedding, targets, 1.0)
        return jnp.sum(logprobs) + jnp.sum(entropy)

    def temp_bytes(fn):
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked_bytes = temp_bytes(loss)
    assert chunked_bytes < full_logits_bytes / 8
    assert temp_bytes(naive_loss) >= full_logits_bytes


@pytest.mark.skipif(jax.device_count() < 4, reason="needs several (CPU) devices")
def test_batch_sharded_over_devices_stays_sharded_and_matches():
    """Chunks keep the batch axis whole, so a data-sharded batch gives data-sharded results."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    by_row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    hidden, unembedding, targets = _random_head(9, 8, 6, 4, 13)

    def objective(h, w, t):
        logprobs, entropy = logprobs_and_entropy(h, w, t, chunk_size=16)
        return jnp.sum(logprobs) + jnp.sum(entropy), (logprobs, entropy)

    step = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True))
    sharded_args = (jax.device_put(hidden, by_row), unembedding, jax.device_put(targets, by_row))
    # Only d unembedding is summed across devices; no device gathers the others' rows.
    assert "all-gather" not in step.lower(*sharded_args).compile().as_text()
    (hidden_grad, unembedding_grad), (logprobs, _) = step(*sharded_args)
    (want_hidden_grad, want_unembedding_grad), (want_logprobs, _) = step(hidden, unembedding, targets)
    assert logprobs.sharding.is_equivalent_to(by_row, 2)
    assert hidden_grad.sharding.is_equivalent_to(by_row, 3)
    np.testing.assert_allclose(logprobs, want_logprobs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hidden_grad, want_hidden_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(unembedding_grad, want_unembedding_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5])
def test_bad_chunk_size_is_rejected(chunk_size):
    hidden, unembedding, targets = _random_head(6, 1, 2, 3, 5)
    with pytest.raises(ValueError, match="chunk_size"):
        logprobs_and_entropy(hidden, unembedding, targets, chunk_size=chunk_size)


def test_mismatched_hidden_size_is_rejected():
    hidden, unembedding, targets = _random_head(7, 1, 2, 3, 5)
    with pytest.raises(AssertionError):
        logprobs_and_entropy(hidden, unembedding[:, :2], targets)
