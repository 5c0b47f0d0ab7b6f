"""Token entropy and memory-bounded log-probabilities over a large vocabulary.

Notation follows the EPO paper (arXiv 2509.22576): H = -sum_v p(v) log p(v) is the full-vocabulary
entropy of one token's next-token distribution, computed in at least float32 whatever the input dtype.
"""
import chex
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def _entropy_from_log_probs(log_probs_xV: jax.Array) -> jax.Array:
    """H = -sum_v p log p, with 0 log 0 = 0 so that -inf logits give neither NaN values nor gradients."""
    probs_xV = jnp.exp(log_probs_xV)
    # Where p == 0 the log is -inf; substituting 0 keeps both p * log p and its derivative finite.
    finite_log_probs_xV = jnp.where(probs_xV > 0, log_probs_xV, 0.0)
    return -jnp.sum(probs_xV * finite_log_probs_xV, axis=-1)


def token_entropy(logits_xV: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) over the last axis (docs/algorithms.md section 1, H = -sum_v p(v) log p(v)).

    Computed as H = -sum_v p(v) log_softmax(logits)(v) in at least float32 (bf16 logits are upcast),
    so masked (-inf) vocabulary entries contribute exactly 0 and no NaN appears in value or gradient.

    Args:
      logits_xV: logits with the vocabulary on the last axis, any leading shape, any float dtype.

    Returns:
      float32 entropies (float64 for float64 logits) with the leading shape of `logits_xV`.
    """
    if logits_xV.ndim < 1:
        raise ValueError(f"logits_xV needs a vocabulary axis, got a scalar of shape {logits_xV.shape}.")
    compute_dtype = jnp.promote_types(logits_xV.dtype, jnp.float32)
    log_probs_xV = jax.nn.log_softmax(logits_xV.astype(compute_dtype), axis=-1)
    return _entropy_from_log_probs(log_probs_xV)


def _chunk_log_probs(hidden_NxD: jax.Array, unembedding_VxD: jax.Array, temperature: jax.Array) -> jax.Array:
    """log_softmax(hidden @ unembedding^T / temperature) for the N tokens of one chunk, [N, V]."""
    # At least float32 (bf16 inputs accumulate in float32; float64 stays float64).
    logits_dtype = jnp.promote_types(jnp.result_type(hidden_NxD, unembedding_VxD), jnp.float32)
    logits_NxV = jax.lax.dot_general(
        hidden_NxD, unembedding_VxD, (((1,), (1,)), ((), ())), preferred_element_type=logits_dtype
    ) / temperature
    return jax.nn.log_softmax(logits_NxV, axis=-1)


@jax.custom_vjp
def _chunked_head(
    hidden_KxBxWxD: jax.Array, targets_KxBxW: jax.Array, unembedding_VxD: jax.Array, temperature: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(log p(target), H), each [K, B, W], for K chunks of W positions; see `logprobs_and_entropy`."""
    return _chunked_head_forward(hidden_KxBxWxD, targets_KxBxW, unembedding_VxD, temperature)[0]


def _chunked_head_forward_rule(hidden_KxBxWxD, targets_KxBxW, unembedding_VxD, temperature):
    """custom_vjp forward rule; with symbolic_zeros the arguments arrive as CustomVJPPrimal."""
    return _chunked_head_forward(hidden_KxBxWxD.value, targets_KxBxW.value, unembedding_VxD.value, temperature.value)


def _chunked_head_forward(hidden_KxBxWxD, targets_KxBxW, unembedding_VxD, temperature):
    _, batch_size, width, hidden_dim = hidden_KxBxWxD.shape

    def one_chunk(chunk):
        hidden_BxWxD, targets_BxW = chunk
        # [B, W] -> [B * W] merges a (possibly sharded) major axis with a minor one: no data moves.
        log_probs_NxV = _chunk_log_probs(hidden_BxWxD.reshape(-1, hidden_dim), unembedding_VxD, temperature)
        target_log_probs_N = jnp.take_along_axis(log_probs_NxV, targets_BxW.reshape(-1, 1), axis=-1)[:, 0]
        entropy_N = _entropy_from_log_probs(log_probs_NxV)
        return target_log_probs_N.reshape(batch_size, width), entropy_N.reshape(batch_size, width)

    logprobs_KxBxW, entropy_KxBxW = jax.lax.map(one_chunk, (hidden_KxBxWxD, targets_KxBxW))
    # Residuals are the inputs and the entropies only: the backward recomputes each chunk's logits.
    residuals = (hidden_KxBxWxD, targets_KxBxW, unembedding_VxD, temperature, entropy_KxBxW)
    return (logprobs_KxBxW, entropy_KxBxW), residuals


def _chunked_head_backward(residuals, cotangents):
    """Closed-form gradients per chunk, with z the logits and p = softmax(z):
    d log p(y) / dz = onehot(y) - p,   dH / dz = -p (log p + H),   z = h W^T / temperature."""
    hidden_KxBxWxD, targets_KxBxW, unembedding_VxD, temperature, entropy_KxBxW = residuals
    logprobs_grad_KxBxW, entropy_grad_KxBxW = cotangents
    hidden_dim = hidden_KxBxWxD.shape[-1]
    # A loss that does not differentiate the entropy (plain PPO) skips its gradient term entirely.
    entropy_is_differentiated = not isinstance(entropy_grad_KxBxW, SymbolicZero)
    if isinstance(logprobs_grad_KxBxW, SymbolicZero):
        logprobs_grad_KxBxW = jnp.zeros(entropy_KxBxW.shape, entropy_KxBxW.dtype)
    if not entropy_is_differentiated:
        entropy_grad_KxBxW = jnp.zeros(entropy_KxBxW.shape, entropy_KxBxW.dtype)
    vocab_V = jnp.arange(unembedding_VxD.shape[0])

    def one_chunk(unembedding_grad_VxD, chunk):
        hidden_BxWxD, targets_BxW, logprobs_grad_BxW, entropy_grad_BxW, entropy_BxW = chunk
        hidden_NxD = hidden_BxWxD.reshape(-1, hidden_dim)
        logprobs_grad_N = logprobs_grad_BxW.reshape(-1)
        log_probs_NxV = _chunk_log_probs(hidden_NxD, unembedding_VxD, temperature)
        probs_NxV = jnp.exp(log_probs_NxV)
        weight_NxV = logprobs_grad_N[:, None]
        if entropy_is_differentiated:
            finite_log_probs_NxV = jnp.where(probs_NxV > 0, log_probs_NxV, 0.0)
            entropy_weight_NxV = finite_log_probs_NxV + entropy_BxW.reshape(-1, 1)
            weight_NxV = weight_NxV + entropy_grad_BxW.reshape(-1, 1) * entropy_weight_NxV
        is_target_NxV = vocab_V == targets_BxW.reshape(-1, 1)
        logits_grad_NxV = jnp.where(is_target_NxV, logprobs_grad_N[:, None], 0.0) - probs_NxV * weight_NxV
        logits_grad_NxV = (logits_grad_NxV / temperature).astype(log_probs_NxV.dtype)
        hidden_grad_NxD = jax.lax.dot_general(
            logits_grad_NxV, unembedding_VxD, (((1,), (0,)), ((), ())), preferred_element_type=log_probs_NxV.dtype
        )
        unembedding_grad_VxD = unembedding_grad_VxD + jax.lax.dot_general(
            logits_grad_NxV, hidden_NxD, (((0,), (0,)), ((), ())), preferred_element_type=log_probs_NxV.dtype
        )
        return unembedding_grad_VxD, hidden_grad_NxD.reshape(hidden_BxWxD.shape).astype(hidden_BxWxD.dtype)

    accumulator_dtype = jnp.promote_types(unembedding_VxD.dtype, jnp.float32)
    unembedding_grad_VxD, hidden_grad_KxBxWxD = jax.lax.scan(
        one_chunk,
        jnp.zeros(unembedding_VxD.shape, accumulator_dtype),
        (hidden_KxBxWxD, targets_KxBxW, logprobs_grad_KxBxW, entropy_grad_KxBxW, entropy_KxBxW),
    )
    return hidden_grad_KxBxWxD, None, unembedding_grad_VxD.astype(unembedding_VxD.dtype), None


_chunked_head.defvjp(_chunked_head_forward_rule, _chunked_head_backward, symbolic_zeros=True)


def logprobs_and_entropy(
    hidden_BxTxD: jax.Array,
    unembedding_VxD: jax.Array,
    targets_BxT: jax.Array,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token log p(target) and entropy H without materialising the [B, T, V] logits.

    logits = hidden @ unembedding^T / temperature;  logprob_t = log_softmax(logits_t)[target_t];
    H_t = -sum_v p_t(v) log p_t(v)  (docs/algorithms.md section 1; temperature as in verl's actor, which divides the
    logits by the rollout temperature before both quantities).

    The sequence axis is cut into chunks of W = max(1, chunk_size // B) positions (zero-padded to a
    multiple of W), so each chunk holds B x W ~ chunk_size tokens and keeps the batch axis whole:
    a batch sharded over devices stays sharded in every chunk. The forward pass maps over the
    chunks with `lax.map`; the backward pass is a `lax.scan` over the same chunks (a custom VJP)
    that keeps only the inputs and the [B, T] entropies from the forward pass, recomputes each
    chunk's logits (what `jax.checkpoint` would do) and applies the closed-form gradients
    d log p(y)/dz = onehot(y) - p and dH/dz = -p (log p + H), accumulating d unembedding across
    chunks. Neither pass holds more than a few [B, W, V] arrays: O(chunk_size * V) memory instead
    of O(B * T * V) (about 37 GiB in float32 for 64 x 1024 tokens at Qwen2.5's V = 151936). A
    loss that does not differentiate the entropy (plain PPO) skips its gradient term.
    Differentiable w.r.t. `hidden_BxTxD` and `unembedding_VxD` (not `temperature`); logits are
    accumulated in float32 for bf16/float32 inputs (float64 inputs stay float64).

    Args:
      hidden_BxTxD: final hidden states (after the last norm).
      unembedding_VxD: output projection in Hugging Face layout (lm_head.weight / tied embedding).
      targets_BxT: integer token ids whose log-probabilities are wanted.
      chunk_size: tokens per chunk across the batch (`config.model.logprob_chunk_size`).
      temperature: the sampling temperature the logits are divided by.

    Returns:
      (logprobs_BxT, entropy_BxT), float32 (float64 for float64 inputs).
    """
    chex.assert_rank([hidden_BxTxD, unembedding_VxD, targets_BxT], [3, 2, 2])
    batch_size, seq_len, hidden_dim = hidden_BxTxD.shape
    chex.assert_shape(unembedding_VxD, (None, hidden_dim))
    chex.assert_shape(targets_BxT, (batch_size, seq_len))
    if not jnp.issubdtype(targets_BxT.dtype, jnp.integer):
        raise TypeError(f"targets_BxT must hold integer token ids, got dtype {targets_BxT.dtype}.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}; "
            "set model.logprob_chunk_size to e.g. 1024."
        )

    # Chunks slice the sequence axis and keep the batch axis whole, so a batch sharded over devices
    # stays sharded inside every chunk and all devices work on every chunk.
    width = min(max(1, chunk_size // batch_size), seq_len)
    num_chunks = -(-seq_len // width)
    padding = num_chunks * width - seq_len
    hidden_KxBxWxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, padding), (0, 0)))
    hidden_KxBxWxD = hidden_KxBxWxD.reshape(batch_size, num_chunks, width, hidden_dim).transpose(1, 0, 2, 3)
    targets_KxBxW = jnp.pad(targets_BxT.astype(jnp.int32), ((0, 0), (0, padding)))
    targets_KxBxW = targets_KxBxW.reshape(batch_size, num_chunks, width).transpose(1, 0, 2)

    logprobs_KxBxW, entropy_KxBxW = _chunked_head(
        hidden_KxBxWxD, targets_KxBxW, unembedding_VxD, jnp.asarray(temperature, jnp.float32)
    )

    def unchunk(values_KxBxW: jax.Array) -> jax.Array:
        return values_KxBxW.transpose(1, 0, 2).reshape(batch_size, num_chunks * width)[:, :seq_len]

    logprobs_BxT, entropy_BxT = unchunk(logprobs_KxBxW), unchunk(entropy_KxBxW)
    return logprobs_BxT, entropy_BxT
