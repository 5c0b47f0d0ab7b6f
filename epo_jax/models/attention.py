"""Grouped-query attention behind one function, `attend`, for training, scoring, prefill and decode.

Who sees whom is computed inside the call from positions and segment ids, never handed in as a
[B, T, S] boolean (at 6656 tokens that is 44 MB per row): query t sees key s iff

    segment[s] == segment[t],  segment[s] != 0 (0 marks padding),  position[s] <= position[t].

For a left-padded row (segment 1 on its real tokens) this is causal attention over the real tokens;
in a KV cache the slots not yet written hold positions past the query's and stay unseen; rows
packed with several sequences (positions restarting in each) see only their own segment.

Implementations (`model.attention`; `select_implementation` resolves and checks the choice):
  xla     softmax(q k^T / sqrt(Hd)) v with float32 scores, in blocks of `query_chunk` queries each
          rematerialised in the backward pass, so scores never exceed B x heads x chunk x S. Any
          platform, any mask.
  cudnn   cuDNN's fused flash attention, `jax.nn.dot_product_attention(implementation="cudnn")`:
          NVIDIA GPUs, bfloat16 compute, head_dim a multiple of 8 up to 128 (256 from Hopper on).
          The kernel masks by causality and per-row lengths counted from the left, so each row's
          real tokens, one contiguous run in every batch epo-jax builds (a left-padded prompt, a
          right-padded response), are rotated to the front and rotated back afterwards. Rows packed
          with several segments are refused.
  splash  the Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`),
          TPU: a causal mask in slot order intersected with the segment ids (padding is a segment
          of its own, so no query row is empty); sequences are padded to a multiple of 128, the
          kernel's block. Under a mesh context (`jax.set_mesh`) it runs per shard in a shard_map,
          rows over "data" x "fsdp" and heads over "tensor"; Mosaic kernels cannot be partitioned
          automatically, so a multi-device program must set the mesh.
  auto    cudnn on NVIDIA GPUs when the compute dtype is bfloat16, splash on TPU, xla elsewhere.

The fused kernels serve self-attention calls (T = S: training, scoring, prefill) and order keys by
slot, which equals the rule above whenever positions increase with the slot inside each segment
(every layout built here). Decode steps (a query against a longer cache) take the xla path under
every choice: their scores are B x heads x T x S with T = 1, a single read of the cache.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")  # allowed values of model.attention
KERNELS = ("xla", "cudnn", "splash")                  # what "auto" resolves to
_SPLASH_BLOCK = 128  # the kernel's lane width: block sizes and padded lengths are multiples of it
# True runs the splash kernel in Pallas' interpreter, which works on CPU: how the tests exercise the
# splash path of the model and the sampler without a TPU.
SPLASH_INTERPRET = False


def _cuda_facts(platform: str) -> tuple[bool, tuple[int, ...] | None]:
    """(is the GPU backend CUDA, compute capability of device 0) when `platform` is the running
    backend; (True, None) when planning for a GPU from another platform."""
    if jax.default_backend() != platform:
        return True, None
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    is_cuda = capability is not None or "cuda" in getattr(device.client, "platform_version", "").lower()
    return is_cuda, (tuple(int(part) for part in str(capability).split(".")) if capability else None)


def _cudnn_problem(platform: str, dtype: str, head_dim: int) -> str | None:
    """Why cuDNN's fused attention cannot run this model here, or None (constraints from
    jax._src.cudnn.fused_attention_stablehlo: check_layout, check_is_flash_attention)."""
    if platform != "gpu":
        return f"runs on NVIDIA GPUs only (this platform is {platform!r})"
    is_cuda, capability = _cuda_facts(platform)
    if not is_cuda:
        return "needs a CUDA GPU with cuDNN (this GPU backend is not CUDA)"
    if dtype != "bfloat16":
        return f"takes 16-bit inputs only: set model.dtype='bfloat16' or 'auto' (it is {dtype!r})"
    limit = 256 if capability is not None and capability >= (9, 0) else 128
    if head_dim % 8 or head_dim > limit:
        return f"needs head_dim a multiple of 8 up to {limit} on this GPU (the model's is {head_dim})"
    return None


def select_implementation(choice: str, *, platform: str, dtype: str, head_dim: int) -> str:
    """The kernel `choice` (a model.attention value) resolves to for a model computing in `dtype`
    on `platform` ("cpu" | "gpu" | "tpu"); a one-line ValueError naming model.attention when an
    explicit choice cannot run there."""
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={choice!r} is not one of {IMPLEMENTATIONS}.")
    if choice == "auto":
        if platform == "gpu" and _cudnn_problem(platform, dtype, head_dim) is None:
            return "cudnn"
        return "splash" if platform == "tpu" else "xla"
    if choice == "cudnn":
        problem = _cudnn_problem(platform, dtype, head_dim)
        if problem:
            raise ValueError(f"model.attention='cudnn' {problem}; use model.attention='xla' or 'auto'.")
    if choice == "splash" and platform != "tpu":
        raise ValueError(f"model.attention='splash' runs on TPU only (this platform is {platform!r}); "
                         "use model.attention='xla' or 'auto'.")
    return choice


def visible(q_positions_BxT: jax.Array, q_segments_BxT: jax.Array,
            kv_positions_BxS: jax.Array, kv_segments_BxS: jax.Array) -> jax.Array:
    """[B, T, S] boolean of the rule above, for one block of queries."""
    same_segment = q_segments_BxT[:, :, None] == kv_segments_BxS[:, None, :]
    real_key = kv_segments_BxS[:, None, :] != 0
    not_later = kv_positions_BxS[:, None, :] <= q_positions_BxT[:, :, None]
    return same_segment & real_key & not_later


def _xla_block(q_BxTxKxGxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array,
               mask_BxTxS: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(Hd) masked) v for grouped queries; scores and softmax in float32.

    The G query heads sharing a kv head are folded into the query axis, so both products are
    batched matmuls over (B, K) with a [G*T, Hd] left operand: XLA:CPU runs these about twice as fast
    as the equivalent 5-D contraction, which it lowers to a loop of small matmuls.
    """
    b, t, k, g, h = q_BxTxKxGxH.shape
    s = k_BxKxSxH.shape[2]
    q_BxKxQxH = jnp.transpose(q_BxTxKxGxH, (0, 2, 3, 1, 4)).reshape(b, k, g * t, h)
    scores = jnp.einsum("bkqh,bksh->bkqs", q_BxKxQxH, k_BxKxSxH,
                        preferred_element_type=jnp.float32) / np.sqrt(h).astype(np.float32)
    scores_BxKxGxTxS = scores.reshape(b, k, g, t, s)
    # A finite floor keeps fully masked rows (padding queries) finite instead of NaN.
    scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None, :, :], scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxKxSxH.dtype).reshape(b, k, g * t, s)
    out_BxKxQxH = jnp.einsum("bkqs,bksh->bkqh", probs, v_BxKxSxH)
    return jnp.transpose(out_BxKxQxH.reshape(b, k, g, t, h), (0, 3, 1, 2, 4))


def _xla_attention(q_BxTxKxGxH, k_BxKxSxH, v_BxKxSxH, q_positions_BxT, q_segments_BxT,
                   kv_positions_BxS, kv_segments_BxS, query_chunk: int) -> jax.Array:
    """Attention in blocks of `query_chunk` queries, each block's mask built and its scores
    recomputed in the backward pass; one block when T <= query_chunk."""
    b, t, k, g, h = q_BxTxKxGxH.shape

    def block(q, q_positions, q_segments):
        mask = visible(q_positions, q_segments, kv_positions_BxS, kv_segments_BxS)
        return _xla_block(q, k_BxKxSxH, v_BxKxSxH, mask)

    if t <= query_chunk:
        return block(q_BxTxKxGxH, q_positions_BxT, q_segments_BxT)
    n_chunks = -(-t // query_chunk)
    pad = n_chunks * query_chunk - t
    # Padded queries get segment 0: they see nothing and are cut off below.
    q = jnp.pad(q_BxTxKxGxH, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    q_positions, q_segments = (jnp.pad(x, ((0, 0), (0, pad))) for x in (q_positions_BxT, q_segments_BxT))

    def chunks(x):
        return jnp.moveaxis(x.reshape(b, n_chunks, query_chunk, *x.shape[2:]), 1, 0)

    out = jax.lax.map(jax.checkpoint(lambda args: block(*args)), (chunks(q), chunks(q_positions), chunks(q_segments)))
    return jnp.moveaxis(out, 0, 1).reshape(b, n_chunks * query_chunk, k, g, h)[:, :t]


def _rotated_flash_attention(q_BxTxKxGxH, k_BxKxTxH, v_BxKxTxH, segments_BxT, implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` (causal, per-row lengths) on rows whose real tokens are one
    contiguous run: each row is rotated so the run starts at slot 0, attended, and rotated back;
    padding queries give 0. `implementation` is "cudnn" (or "xla", the same semantics on any
    platform, which is how the rotation is tested without a GPU)."""
    b, t, k, g, h = q_BxTxKxGxH.shape
    real_BxT = segments_BxT != 0
    lengths_B = jnp.maximum(jnp.sum(real_BxT, axis=1, dtype=jnp.int32), 1)  # an empty row attends to slot 0
    first_B = jnp.argmax(real_BxT, axis=1).astype(jnp.int32)
    slots_T = jnp.arange(t, dtype=jnp.int32)

    def rotate(x_BxTx___, shift_B):
        index = (slots_T[None, :] + shift_B[:, None]) % t
        return jnp.take_along_axis(x_BxTx___, index.reshape(b, t, *([1] * (x_BxTx___.ndim - 2))), axis=1)

    q_BxTxNxH = rotate(q_BxTxKxGxH.reshape(b, t, k * g, h), first_B)
    k_BxTxKxH = rotate(jnp.swapaxes(k_BxKxTxH, 1, 2), first_B)
    v_BxTxKxH = rotate(jnp.swapaxes(v_BxKxTxH, 1, 2), first_B)
    out_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, is_causal=True, query_seq_lengths=lengths_B,
        key_value_seq_lengths=lengths_B, implementation=implementation)
    out_BxTxNxH = rotate(out_BxTxNxH, -first_B)
    # The kernel leaves queries past a row's length undefined; zeros keep them out of every gradient.
    out_BxTxNxH = jnp.where(real_BxT[:, :, None, None], out_BxTxNxH, jnp.zeros((), out_BxTxNxH.dtype))
    return out_BxTxNxH.reshape(b, t, k, g, h)


@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, length: int, interpret: bool):
    """A causal splash-attention kernel for [num_heads, length, Hd] queries (built once per shape:
    its block masks are computed on the host)."""
    from jax.experimental.pallas.ops.tpu import splash_attention

    block = max(b for b in (512, 256, 128) if length % b == 0)
    sizes = splash_attention.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash_attention.MultiHeadMask([splash_attention.CausalMask((length, length))] * num_heads)
    with jax.ensure_compile_time_eval():  # concrete mask arrays, reusable by every later trace
        return splash_attention.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                                interpret=interpret)


def _splash_local(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segments_BxT, interpret: bool) -> jax.Array:
    """The kernel on this shard's rows, vmapped over them (it takes one row at a time)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    kernel = _splash_kernel(q_BxNxTxH.shape[1], q_BxNxTxH.shape[2], interpret)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(
        q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segments_BxT)


def _mesh_specs(batch: int, kv_heads: int) -> tuple[object, PartitionSpec, PartitionSpec] | None:
    """(context mesh, spec of [B, heads, T, Hd] arrays, spec of [B, T] arrays) for running the splash
    kernel per shard; None without a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    rows = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
    if batch % int(np.prod([sizes[a] for a in rows], dtype=int)):
        rows = ()
    heads = "tensor" if sizes.get("tensor", 1) > 1 and kv_heads % sizes["tensor"] == 0 else None
    rows_spec = rows or None
    return mesh, PartitionSpec(rows_spec, heads, None, None), PartitionSpec(rows_spec, None)


def _splash_attention(q_BxTxKxGxH, k_BxKxTxH, v_BxKxTxH, segments_BxT, *, interpret: bool = False) -> jax.Array:
    """Splash attention over self-attention rows padded to a multiple of 128; the kernel does not
    scale scores, so q carries 1 / sqrt(Hd)."""
    b, t, k, g, h = q_BxTxKxGxH.shape
    pad = -t % _SPLASH_BLOCK
    q = jnp.transpose(q_BxTxKxGxH.reshape(b, t, k * g, h), (0, 2, 1, 3)) * jnp.asarray(h ** -0.5, q_BxTxKxGxH.dtype)
    q, k_, v_ = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k_BxKxTxH, v_BxKxTxH))
    segments = jnp.pad(segments_BxT.astype(jnp.int32), ((0, 0), (0, pad)))
    local = functools.partial(_splash_local, interpret=interpret)
    sharded = _mesh_specs(b, k)
    if sharded is not None:
        mesh, heads_spec, rows_spec = sharded
        local = jax.shard_map(local, mesh=mesh, in_specs=(heads_spec, heads_spec, heads_spec, rows_spec),
                              out_specs=heads_spec, check_vma=False)
    out_BxNxTxH = local(q, k_, v_, segments)[:, :, :t]
    return jnp.transpose(out_BxNxTxH, (0, 2, 1, 3)).reshape(b, t, k, g, h)


def attend(
    q_BxTxKxGxH: jax.Array,
    k_BxKxSxH: jax.Array,
    v_BxKxSxH: jax.Array,
    q_positions_BxT: jax.Array,
    q_segments_BxT: jax.Array,
    kv_positions_BxS: jax.Array | None = None,
    kv_segments_BxS: jax.Array | None = None,
    *,
    implementation: str,
    query_chunk: int,
) -> jax.Array:
    """Attention output [B, T, K, G, Hd] of grouped queries (G query heads per kv head) over keys and
    values [B, K, S, Hd], under the visibility rule of the module docstring; `implementation` is
    one of KERNELS (see `select_implementation`).

    Without kv positions and segments the call is self-attention (the keys are the queries' own
    tokens, S = T) and may take a fused kernel; with them (a KV cache) it takes the xla path.
    """
    self_attention = kv_positions_BxS is None
    if self_attention != (kv_segments_BxS is None):
        raise ValueError("attend: pass kv positions and kv segments together (or neither, for self-attention)")
    if self_attention:
        kv_positions_BxS, kv_segments_BxS = q_positions_BxT, q_segments_BxT
    if implementation == "xla" or not self_attention or q_BxTxKxGxH.shape[1] == 1:
        return _xla_attention(q_BxTxKxGxH, k_BxKxSxH, v_BxKxSxH, q_positions_BxT, q_segments_BxT,
                              kv_positions_BxS, kv_segments_BxS, query_chunk)
    if implementation == "cudnn":
        return _rotated_flash_attention(q_BxTxKxGxH, k_BxKxSxH, v_BxKxSxH, q_segments_BxT, "cudnn")
    if implementation == "splash":
        return _splash_attention(q_BxTxKxGxH, k_BxKxSxH, v_BxKxSxH, q_segments_BxT, interpret=SPLASH_INTERPRET)
    raise ValueError(f"model.attention={implementation!r} is not one of {KERNELS}.")
