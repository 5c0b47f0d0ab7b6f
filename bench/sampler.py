"""Decode throughput of our sampler against transformers PyTorch `generate` on SmolLM2-135M-Instruct.

    python bench/sampler.py [--batches 1 8 32] [--prompt-len 64] [--new-tokens 64] [--repeats 3] [--no-bf16]

Both sides run the embedded SmolLM2-135M-Instruct with the same weights (ours loaded from the GGUF,
PyTorch from the folder our `save_pretrained` writes), on the same random 64-token prompts, sampling
at temperature 1 over the full vocabulary with EOS disabled, so every row makes exactly
`--new-tokens` tokens. Our sampler also returns each token's log-prob and entropy. Times are the
best of `--repeats` rounds after a warm-up (compilation excluded); each round runs every contender
once, so changes in machine load hit all of them alike.

The bandwidth column: bytes a decode step must read (every weight once, the tied embedding as the
unembedding, plus the KV cache our sampler attends over: all prompt + new slots) times steps/s,
divided by the copy bandwidth (bytes read + written per second by a 256 MB numpy copy) measured
in the same run.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from epo_jax.models import loading
from epo_jax.models.sampler import Sampler, SamplingParams


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes read + written per second by np.copyto of a large float32 array (best of `repeats`)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def bytes_per_step(policy: loading.LoadedModel, batch: int, cache_len: int) -> int:
    config = policy.config
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(policy.params))
    kv_cache = 2 * config.num_layers * batch * config.num_kv_heads * cache_len * config.head_dim * 4
    return weights + kv_cache


def time_ours(sampler, params, prompts, sampling, seed: int) -> float:
    start = time.perf_counter()
    out = sampler.generate(params, prompts, jax.random.key(seed), sampling)
    elapsed = time.perf_counter() - start
    assert (out.lengths == sampling.max_new_tokens).all()
    return elapsed


def time_torch(model, prompts, new_tokens: int) -> float:
    ids = torch.tensor(prompts, dtype=torch.long)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=2)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-bf16", action="store_true", help="skip the PyTorch bfloat16 column")
    args = parser.parse_args()

    policy = loading.load_pretrained("")
    with tempfile.TemporaryDirectory() as folder:
        loading.save_pretrained(policy.params, policy.config, policy.tokenizer, folder)
        torch_fp32 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch_fp32.generation_config.eos_token_id = None
    torch_bf16 = None if args.no_bf16 else copy.deepcopy(torch_fp32).to(torch.bfloat16)

    sampler = Sampler(policy.graphdef, policy.config, policy.tokenizer, eos_token_ids=(),
                      prompt_buckets=(args.prompt_len,))
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
    rng = np.random.RandomState(0)
    bandwidth = copy_bandwidth()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    header = (f"{'batch':>5} | {'ours tok/s':>10} | {'torch fp32':>10} | {'ratio':>5} | "
              f"{'torch bf16':>10} | {'ratio':>5} | {'MB/step':>7} | {'of bandwidth':>12}")
    print(header)
    print("-" * len(header))
    for batch in args.batches:
        prompts = [list(rng.randint(100, 40000, args.prompt_len)) for _ in range(batch)]
        sampler.generate(policy.params, prompts, jax.random.key(0), sampling)  # compile
        models = {"fp32": torch_fp32} if torch_bf16 is None else {"fp32": torch_fp32, "bf16": torch_bf16}
        for model in models.values():
            time_torch(model, prompts, 2)  # warm-up
        # Rounds interleave the contenders so that a change in machine load hits all of them alike.
        best = {name: np.inf for name in ("ours", *models)}
        for round_index in range(args.repeats):
            best["ours"] = min(best["ours"], time_ours(sampler, policy.params, prompts, sampling, round_index + 1))
            for name, model in models.items():
                best[name] = min(best[name], time_torch(model, prompts, args.new_tokens))
        ours, fp32 = best["ours"], best["fp32"]
        tokens = batch * args.new_tokens
        bf16_cells = f"{'-':>10} | {'-':>5}"
        if "bf16" in best:
            bf16_cells = f"{tokens / best['bf16']:10.1f} | {best['bf16'] / ours:5.2f}"
        step_bytes = bytes_per_step(policy, sampler_batch(batch), args.prompt_len + args.new_tokens)
        fraction = step_bytes * (args.new_tokens / ours) / bandwidth
        print(f"{batch:5d} | {tokens / ours:10.1f} | {tokens / fp32:10.1f} | {fp32 / ours:5.2f} | {bf16_cells} | "
              f"{step_bytes / 1e6:7.0f} | {fraction:11.0%}")


def sampler_batch(batch: int) -> int:
    """The batch bucket the sampler pads to (a power of two)."""
    return 1 << max(0, (batch - 1).bit_length())


if __name__ == "__main__":
    main()
