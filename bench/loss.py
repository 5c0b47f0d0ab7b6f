"""Cost of the EPO objective against plain PPO, and memory of the chunked log-prob / entropy head.

Prints two tables:
  1. Step time of jax.value_and_grad of the full loss (make_loss_fn) with the EPO entropy terms
     (paper mode, smoothing active) against the plain PPO loss (algo.entropy_control="none"),
     both on the same chunked head (logprobs_and_entropy), with their ratio.
  2. Memory of the compiled value_and_grad of the EPO loss with the chunked head against a naive
     head that materialises the float32 [B, T, V] logits, read from the compiled executable's
     memory_analysis(): nothing is executed, so the naive ~40 GB program need not fit in memory.

The "model" is the head alone: params are the final hidden states [B, T, D] and the unembedding
[V, D] (Qwen2.5-0.5B: D = 896, V = 151936), so the gradient reaches both. The full 64 x 1024
batch costs ~7e13 FLOPs per step with rematerialisation, minutes on a 2-core CPU, so the timing
uses a smaller batch (--time-batch, --time-seq); the memory table uses the full one.

  python bench/loss.py [--batch 64 --seq 1024 --vocab 151936 --hidden 896 --chunk 1024
                        --time-batch 2 --time-seq 512 --repeats 3]
"""
import argparse
import pathlib
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from epo_jax.algo import (LossSettings, entropy_sums, logprobs_and_entropy, loss_state_init, loss_state_update,
                          make_loss_fn)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs.base import get_config  # noqa: E402

GIB = 1024**3


def chunked_forward(chunk_size: int) -> Callable[[Any, dict], dict]:
    def forward(params: dict, batch: dict) -> dict:
        logprobs, entropy = logprobs_and_entropy(
            params["hidden"], params["unembedding"], batch["targets"], chunk_size=chunk_size
        )
        return {"logprobs": logprobs, "entropy": entropy}

    return forward


def naive_forward(params: dict, batch: dict) -> dict:
    """The textbook head: full float32 [B, T, V] logits, log-softmax and entropy."""
    logits = jnp.einsum("btd,vd->btv", params["hidden"], params["unembedding"])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    logprobs = jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return {"logprobs": logprobs, "entropy": entropy}


def run_config(entropy_control: str):
    config = get_config()
    config.algo.entropy_control = entropy_control
    config.epo.mode = "paper"
    return config


def loss_fn_for(config, forward):
    """The objective of a run config (`make_loss_fn` on its LossSettings)."""
    return make_loss_fn(LossSettings.from_config(config), forward)


def loss_state_with_history(config):
    """A state at step 3 whose history makes the smoothing penalty active."""
    state = loss_state_init(LossSettings.from_config(config))
    for value in (0.8, 1.0, 1.2):
        sums = entropy_sums(jnp.full((4, 8), value), jnp.ones((4, 8)), jnp.arange(4), config.epo.max_turns)
        state = loss_state_update(state, sums)
    return state


def make_inputs(batch: int, seq: int, vocab: int, hidden: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {
        "hidden": jnp.asarray(rng.normal(size=(batch, seq, hidden)), jnp.float32),
        "unembedding": jnp.asarray(rng.normal(scale=hidden**-0.5, size=(vocab, hidden)), jnp.float32),
    }
    mask = (np.arange(seq)[None, :] < rng.integers(seq // 2, seq + 1, size=(batch, 1))).astype(np.float32)
    data = {
        "targets": jnp.asarray(rng.integers(0, vocab, size=(batch, seq)), jnp.int32),
        "response_mask": jnp.asarray(mask),
        "old_logprobs": jnp.asarray(rng.normal(-11.0, 1.0, size=(batch, seq)), jnp.float32),
        "advantages": jnp.asarray(rng.normal(size=(batch, seq)), jnp.float32),
        "ref_logprobs": jnp.asarray(rng.normal(-11.0, 1.0, size=(batch, seq)), jnp.float32),
        "traj_id": jnp.asarray(np.arange(batch) // 4, jnp.int32),
        "turn_index": jnp.asarray(np.arange(batch) % 4, jnp.int32),
    }
    return params, data


def input_shapes(batch: int, seq: int, vocab: int, hidden: int):
    """Shapes and dtypes of make_inputs' arrays, for compiling without allocating them."""
    params = {
        "hidden": jax.ShapeDtypeStruct((batch, seq, hidden), jnp.float32),
        "unembedding": jax.ShapeDtypeStruct((vocab, hidden), jnp.float32),
    }
    data = {key: jax.ShapeDtypeStruct((batch, seq), jnp.float32)
            for key in ("response_mask", "old_logprobs", "advantages", "ref_logprobs")}
    data["targets"] = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    data["traj_id"] = data["turn_index"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return params, data


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def time_step(step_fn, params, data, state, repeats: int) -> float:
    jax.block_until_ready(step_fn(params, data, state))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step_fn(params, data, state))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compiled_cost(step_fn, params, data, state) -> tuple[float, float]:
    """(GFLOP, GB accessed) of the compiled step as XLA's cost analysis counts them."""
    analysis = step_fn.lower(params, data, state).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return analysis["flops"] / 1e9, analysis["bytes accessed"] / 1e9


def memory_row(forward, config, params, data, state) -> dict[str, float]:
    step = jax.jit(jax.value_and_grad(loss_fn_for(config, forward), has_aux=True))
    analysis = step.lower(abstract(params), abstract(data), abstract(state)).compile().memory_analysis()
    row = {
        "temp": analysis.temp_size_in_bytes / GIB,
        "arguments": analysis.argument_size_in_bytes / GIB,
        "outputs": analysis.output_size_in_bytes / GIB,
    }
    row["total"] = row["temp"] + row["arguments"] + row["outputs"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="rows of the memory-analysis batch")
    parser.add_argument("--seq", type=int, default=1024, help="response tokens per row (memory analysis)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of the head")
    parser.add_argument("--time-batch", type=int, default=2, help="rows of the timed batch")
    parser.add_argument("--time-seq", type=int, default=512, help="tokens per row of the timed batch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    epo_config, ppo_config = run_config("epo"), run_config("none")
    state = loss_state_with_history(epo_config)
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}")

    params, data = make_inputs(args.time_batch, args.time_seq, args.vocab, args.hidden)
    forward = chunked_forward(args.chunk)
    rows = []
    for name, config in (("PPO (entropy_control=none)", ppo_config), ("EPO (paper, smoothing on)", epo_config)):
        step = jax.jit(jax.value_and_grad(loss_fn_for(config, forward), has_aux=True))
        rows.append((name, time_step(step, params, data, state, args.repeats), compiled_cost(step, params, data, state)))
    tokens = args.time_batch * args.time_seq
    print(
        f"\nvalue_and_grad step time, B x T = {args.time_batch} x {args.time_seq} = {tokens} tokens, "
        f"V = {args.vocab}, D = {args.hidden}, chunk {args.chunk}, median of {args.repeats}"
    )
    if (args.time_batch, args.time_seq) != (args.batch, args.seq):
        print(f"(timed on a smaller batch than {args.batch} x {args.seq}: that one costs "
              f"{args.batch * args.seq / tokens:.0f}x the work per step)")
    print("(XLA's cost analysis of the compiled step, independent of machine load, in the last two columns)")
    print("| loss | step s | tokens/s | ratio vs PPO | XLA GFLOP | XLA GB accessed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, seconds, (gflop, gbytes) in rows:
        print(
            f"| {name} | {seconds:.3f} | {tokens / seconds:,.0f} | {seconds / rows[0][1]:.3f} "
            f"| {gflop:,.0f} | {gbytes:.1f} |"
        )

    params, data = input_shapes(args.batch, args.seq, args.vocab, args.hidden)
    memory = [
        (f"chunked (logprobs_and_entropy, chunk {args.chunk})", memory_row(forward, epo_config, params, data, state)),
        ("naive (float32 [B, T, V] logits)", memory_row(naive_forward, epo_config, params, data, state)),
    ]
    logits_gib = args.batch * args.seq * args.vocab * 4 / GIB
    print(
        f"\nmemory of the compiled EPO value_and_grad, B x T = {args.batch} x {args.seq}, V = {args.vocab}, "
        f"D = {args.hidden} (one float32 [B, T, V] array = {logits_gib:.1f} GiB)"
    )
    print("from Compiled.memory_analysis() of programs that are compiled only, never executed")
    print("| head | temp GiB | arguments GiB | outputs GiB | total GiB | ratio vs chunked |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in memory:
        print(
            f"| {name} | {row['temp']:.2f} | {row['arguments']:.2f} | {row['outputs']:.2f} | "
            f"{row['total']:.2f} | {row['total'] / memory[0][1]['total']:.1f} |"
        )


if __name__ == "__main__":
    main()
