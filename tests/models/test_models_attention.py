"""Attention against a naive softmax attention written from the visibility rule (values and
gradients): causal, left padding, right padding, KV-cache decode, sequences longer than the query
block, packed segments; the cuDNN wrapper's rotation, the splash kernel in Pallas' interpreter (also
per shard over 8 CPU devices); the fused kernels themselves where their platform is present; and the
choice of kernel per platform."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from epo_jax.models import attention, transformer
from epo_jax.models.config import resolve_numerics
from epo_jax.models.sampler import Sampler, SamplingParams
from model_helpers import jitted_logits, left_padded, random_params, tiny_config

N_HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def naive_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_pos, q_seg, kv_pos, kv_seg):
    """float64 numpy: per row and head, softmax over the keys that
    segment[s] == segment[t] != 0 and position[s] <= position[t] allow; NaN for a query seeing none."""
    b, t, n, h = q_BxTxNxH.shape
    group = n // k_BxSxKxH.shape[2]
    out = np.full((b, t, n, h), np.nan)
    for row in range(b):
        seen = ((q_seg[row][:, None] == kv_seg[row][None, :]) & (kv_seg[row][None, :] != 0)
                & (kv_pos[row][None, :] <= q_pos[row][:, None]))
        for head in range(n):
            keys = k_BxSxKxH[row, :, head // group].astype(np.float64)
            values = v_BxSxKxH[row, :, head // group].astype(np.float64)
            scores = q_BxTxNxH[row, :, head].astype(np.float64) @ keys.T / np.sqrt(h)
            for query in np.flatnonzero(seen.any(axis=1)):
                z = np.where(seen[query], scores[query], -np.inf)
                p = np.exp(z - z.max())
                out[row, query, head] = (p / p.sum()) @ values
    return out


def naive_attention_jnp(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_pos, q_seg, kv_pos, kv_seg):
    """The same formula in jnp, to differentiate: kv heads repeated per query head; a finite floor
    outside the visible keys keeps queries that see nothing (padding) finite in the backward pass."""
    group = q_BxTxNxH.shape[2] // k_BxSxKxH.shape[2]
    keys, values = (jnp.repeat(x, group, axis=2) for x in (k_BxSxKxH, v_BxSxKxH))
    scores = jnp.einsum("btnh,bsnh->bnts", q_BxTxNxH, keys) / np.sqrt(q_BxTxNxH.shape[-1])
    seen = ((q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
            & (kv_pos[:, None, :] <= q_pos[:, :, None]))[:, None]
    probs = jax.nn.softmax(jnp.where(seen, scores, -1e30), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", jnp.where(seen, probs, 0.0), values)


def one_run_rows(lengths, width, left=True):
    """(positions, segments) [B, T] of rows whose real tokens are one run, left- or right-aligned."""
    positions = np.zeros((len(lengths), width), np.int32)
    segments = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        start = width - n if left else 0
        positions[row, start:start + n] = np.arange(n)
        segments[row, start:start + n] = 1
    return positions, segments


def packed_rows():
    """Two rows of 24 slots: three sequences then padding, and one sequence between paddings."""
    segments = np.array([[1] * 7 + [2] * 5 + [3] * 9 + [0] * 3, [0] * 4 + [1] * 16 + [0] * 4], np.int32)
    positions = np.zeros_like(segments)
    for row in range(2):
        for seg in set(segments[row]) - {0}:
            where = np.flatnonzero(segments[row] == seg)
            positions[row, where] = np.arange(len(where))
    return positions, segments


def random_qkv(batch, length, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, N_HEADS, HEAD_DIM)).astype(dtype)
    k, v = (rng.standard_normal((batch, length, KV_HEADS, HEAD_DIM)).astype(dtype) for _ in range(2))
    return q, k, v


def grouped(q_BxTxNxH):
    b, t, n, h = q_BxTxNxH.shape
    return jnp.reshape(q_BxTxNxH, (b, t, KV_HEADS, n // KV_HEADS, h))


def heads_first(x_BxSxKxH):
    return jnp.swapaxes(x_BxSxKxH, 1, 2)


def xla_self_attention(q, k, v, positions, segments, query_chunk=512):
    out = attention.attend(grouped(q), heads_first(k), heads_first(v), positions, segments,
                           implementation="xla", query_chunk=query_chunk)
    return out.reshape(q.shape)


def rotated_flash(q, k, v, positions, segments):
    del positions  # the kernel orders by slot
    return attention._rotated_flash_attention(grouped(q), heads_first(k), heads_first(v), segments,
                                              "xla").reshape(q.shape)


def splash_interpreted(q, k, v, positions, segments):
    del positions
    return attention._splash_attention(grouped(q), heads_first(k), heads_first(v), segments,
                                       interpret=True).reshape(q.shape)


CASES = {
    "causal": lambda: (random_qkv(2, 12), one_run_rows([12, 12], 12)),
    "left_padding": lambda: (random_qkv(3, 16, seed=1), one_run_rows([16, 9, 1], 16)),
    "right_padding": lambda: (random_qkv(2, 16, seed=2), one_run_rows([11, 4], 16, left=False)),
    "packed": lambda: (random_qkv(2, 24, seed=3), packed_rows()),
}


def assert_matches_naive(fn, case, **tolerances):
    (q, k, v), (positions, segments) = CASES[case]()
    ours = np.asarray(jax.jit(fn)(q, k, v, positions, segments))
    expected = naive_attention(q, k, v, positions, segments, positions, segments)
    real = segments != 0
    np.testing.assert_allclose(ours[real], expected[real], **tolerances)


def assert_gradients_match_naive(fn, case, **tolerances):
    """d/d(q, k, v) of sum(out * w) over the real queries, against the jnp formula's."""
    (q, k, v), (positions, segments) = CASES[case]()
    weights = np.random.default_rng(9).standard_normal(q.shape).astype(np.float32)
    weights *= (segments != 0)[:, :, None, None]

    def loss(attend_fn):
        return lambda q, k, v: jnp.sum(attend_fn(q, k, v) * weights)

    ours = jax.jit(jax.grad(loss(lambda q, k, v: fn(q, k, v, positions, segments)), argnums=(0, 1, 2)))(q, k, v)
    theirs = jax.grad(loss(lambda q, k, v: naive_attention_jnp(q, k, v, positions, segments, positions, segments)),
                      argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tolerances)


@pytest.mark.parametrize("case", sorted(CASES))
def test_xla_attention_matches_the_formula_in_values_and_gradients(case):
    assert_matches_naive(xla_self_attention, case, atol=2e-6, rtol=1e-5)
    assert_gradients_match_naive(xla_self_attention, case, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["left_padding", "packed"])
def test_xla_attention_in_query_blocks_matches_one_block(case):
    """Sequences longer than the query block (with a ragged last block) give the one-block result."""
    chunked = lambda q, k, v, p, s: xla_self_attention(q, k, v, p, s, query_chunk=5)
    assert_matches_naive(chunked, case, atol=2e-6, rtol=1e-5)
    assert_gradients_match_naive(chunked, case, atol=2e-5, rtol=1e-4)


def test_long_sequences_in_query_blocks_match_the_formula():
    (q, k, v), (positions, segments) = random_qkv(1, 700, seed=4), one_run_rows([650], 700)
    ours = np.asarray(jax.jit(lambda *a: xla_self_attention(*a, query_chunk=128))(q, k, v, positions, segments))
    expected = naive_attention(q, k, v, positions, segments, positions, segments)
    np.testing.assert_allclose(ours[segments != 0], expected[segments != 0], atol=2e-6, rtol=1e-5)


def test_kv_cache_decode_sees_the_prompt_and_what_was_written():
    """One query against a cache [left-padded prompt | generated slots], some not yet written."""
    rng = np.random.default_rng(5)
    prompt_lengths, prompt_width, new_slots, step = np.array([5, 8, 2]), 8, 6, 3
    b, s = len(prompt_lengths), prompt_width + new_slots
    prompt_pos, prompt_seg = one_run_rows(prompt_lengths, prompt_width)
    kv_pos = np.concatenate([prompt_pos, prompt_lengths[:, None] + np.arange(new_slots)], axis=1).astype(np.int32)
    kv_seg = np.concatenate([prompt_seg, np.ones((b, new_slots), np.int32)], axis=1)
    q_pos = (prompt_lengths + step)[:, None].astype(np.int32)  # the token written at slot P + step
    q = rng.standard_normal((b, 1, N_HEADS, HEAD_DIM)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, KV_HEADS, HEAD_DIM)).astype(np.float32) for _ in range(2))
    ones = np.ones((b, 1), np.int32)
    ours = attention.attend(grouped(q), heads_first(k), heads_first(v), q_pos, ones, kv_pos, kv_seg,
                            implementation="cudnn", query_chunk=512)  # decode runs the xla path
    expected = naive_attention(q, k, v, q_pos, ones, kv_pos, kv_seg)
    np.testing.assert_allclose(np.asarray(ours).reshape(q.shape), expected, atol=2e-6, rtol=1e-5)
    # Unwritten slots (past P + step) are never seen: garbage there changes nothing.
    k_garbage = k.copy()
    k_garbage[:, prompt_width + step + 1:] = 1e4
    again = attention.attend(grouped(q), heads_first(k_garbage), heads_first(v), q_pos, ones, kv_pos, kv_seg,
                             implementation="xla", query_chunk=512)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(ours))


@pytest.mark.parametrize("case", ["causal", "left_padding", "right_padding"])
def test_cudnn_wrapper_rotation_matches_the_formula(case):
    """The rotation around the fused kernel, run through jax's XLA implementation of the same call."""
    assert_matches_naive(rotated_flash, case, atol=2e-6, rtol=1e-5)
    assert_gradients_match_naive(rotated_flash, case, atol=2e-5, rtol=1e-4)


def test_splash_kernel_in_the_interpreter_matches_the_formula():
    """Packed rows (one of them padded on both sides), padded to the kernel's 128-slot blocks."""
    assert_matches_naive(splash_interpreted, "packed", atol=2e-5, rtol=1e-4)
    assert_gradients_match_naive(splash_interpreted, "packed", atol=1e-4, rtol=1e-3)


def test_splash_runs_per_shard_under_a_mesh_context():
    """Rows over data x fsdp and kv heads over tensor, in a shard_map; the same values as unsharded."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    (q, k, v), (positions, segments) = random_qkv(4, 16, seed=6), one_run_rows([16, 9, 3, 12], 16)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    q, k, v, segments = (jax.device_put(x, rows) for x in (q, k, v, segments))
    with jax.set_mesh(mesh):
        sharded = jax.jit(splash_interpreted)(q, k, v, positions, segments)
    single = jax.jit(splash_interpreted)(*(np.asarray(x) for x in (q, k, v)), positions, np.asarray(segments))
    real = np.asarray(segments) != 0
    np.testing.assert_allclose(np.asarray(sharded)[real], np.asarray(single)[real], atol=1e-6)


def test_the_model_and_the_sharded_sampler_run_the_splash_kernel(monkeypatch):
    """A tiny Qwen2 with model.attention=splash (kernel interpreted): the same logits as with xla,
    and the same greedy continuations from a sampler over 8 devices (prefill per shard)."""
    monkeypatch.setattr(attention, "SPLASH_INTERPRET", True)
    config = tiny_config("qwen2")
    graphdef, params = random_params(config, seed=7)
    splash_graphdef, _ = transformer.abstract_params(config.replace(attention="splash"))
    prompts = [list(np.random.RandomState(row).randint(3, 300, n)) for row, n in enumerate((9, 4, 13, 1))]
    tokens, mask = left_padded(prompts)
    np.testing.assert_allclose(jitted_logits(splash_graphdef, params, tokens, mask)[mask],
                               jitted_logits(graphdef, params, tokens, mask)[mask], atol=2e-4, rtol=1e-4)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 1, 2), ("data", "fsdp", "tensor"))
    specs = transformer.param_partition_specs(params, mesh)
    sharded = jax.device_put(params, jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs))
    greedy = SamplingParams(greedy=True, max_new_tokens=6)
    ours = Sampler(splash_graphdef, config, prompt_buckets=(16,), mesh=mesh).generate(sharded, prompts,
                                                                                       jax.random.key(0), greedy)
    xla = Sampler(graphdef, config, prompt_buckets=(16,)).generate(params, prompts, jax.random.key(0), greedy)
    np.testing.assert_array_equal(ours.tokens, xla.tokens)


def _platform_kernel(platform: str, kernel: str):
    return pytest.mark.skipif(jax.default_backend() != platform,
                              reason=f"the {kernel} kernel needs a {platform.upper()} (this run has "
                                     f"{jax.default_backend()!r})")


@_platform_kernel("gpu", "cudnn")
@pytest.mark.parametrize("case", ["causal", "left_padding", "right_padding"])
def test_cudnn_kernel_matches_the_formula_in_bfloat16(case):
    to_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    fn = lambda q, k, v, p, s: attention.attend(
        grouped(to_bf16(q)), heads_first(to_bf16(k)), heads_first(to_bf16(v)), p, s,
        implementation="cudnn", query_chunk=512).reshape(q.shape).astype(jnp.float32)
    assert_matches_naive(fn, case, atol=3e-2, rtol=3e-2)
    assert_gradients_match_naive(fn, case, atol=5e-2, rtol=5e-2)


@_platform_kernel("tpu", "splash")
@pytest.mark.parametrize("case", ["left_padding", "packed"])
def test_splash_kernel_on_tpu_matches_the_formula(case):
    fn = lambda q, k, v, p, s: attention.attend(grouped(q), heads_first(k), heads_first(v), p, s,
                                                implementation="splash", query_chunk=512).reshape(q.shape)
    assert_matches_naive(fn, case, atol=1e-2, rtol=1e-2)
    assert_gradients_match_naive(fn, case, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("choice, platform, dtype, head_dim, kernel", [
    ("auto", "cpu", "float32", 64, "xla"),
    ("auto", "gpu", "bfloat16", 128, "cudnn"),
    ("auto", "gpu", "float32", 128, "xla"),      # cuDNN's fused kernel takes 16-bit inputs only
    ("auto", "gpu", "bfloat16", 160, "xla"),     # past its head_dim limit
    ("auto", "tpu", "bfloat16", 64, "splash"),
    ("xla", "tpu", "bfloat16", 128, "xla"),
    ("cudnn", "gpu", "bfloat16", 64, "cudnn"),
])
def test_kernel_choice_per_platform(choice, platform, dtype, head_dim, kernel):
    assert attention.select_implementation(choice, platform=platform, dtype=dtype, head_dim=head_dim) == kernel


@pytest.mark.parametrize("choice, platform, dtype, head_dim, words", [
    ("cudnn", "cpu", "float32", 64, ["model.attention='cudnn'", "NVIDIA", "'xla'"]),
    ("cudnn", "gpu", "float32", 64, ["model.attention='cudnn'", "model.dtype='bfloat16'"]),
    ("cudnn", "gpu", "bfloat16", 12, ["model.attention='cudnn'", "multiple of 8"]),
    ("splash", "gpu", "bfloat16", 128, ["model.attention='splash'", "TPU"]),
    ("flash", "gpu", "bfloat16", 128, ["model.attention='flash'", "'splash'"]),
])
def test_a_choice_that_cannot_run_names_model_attention(choice, platform, dtype, head_dim, words):
    with pytest.raises(ValueError) as error:
        attention.select_implementation(choice, platform=platform, dtype=dtype, head_dim=head_dim)
    assert "\n" not in str(error.value)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("platform, dtype", [("cpu", "float32"), ("gpu", "bfloat16"), ("tpu", "bfloat16")])
def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu(platform, dtype):
    assert resolve_numerics("auto", "xla", 64, platform)["dtype"] == dtype
    assert resolve_numerics("float32", "xla", 64, platform)["dtype"] == "float32"
