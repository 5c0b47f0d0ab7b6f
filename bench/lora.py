"""LoRA against full fine-tuning: update time on the default CPU step's padded micro-batch, and the
memory of the train state for Qwen2.5-7B.

Prints two tables:
  1. One jitted PPO+EPO update (epo_jax.train.update with the default CPU run's settings:
     configs/scienceworld.py, rematerialised layers, SmolLM2-135M-Instruct) on `--rows` rows of
     `--prompt` + 64 tokens, every row padded to the prompt bucket as the update pads them: full
     fine-tuning, then LoRA rank `--rank` on all seven projections (float32 base, and a bfloat16
     base), timed interleaved (best of `--repeats`), each against full fine-tuning; beside it the
     compiled update's temporary memory (memory_analysis of the executable) and the train state's
     bytes (params, optimizer moments, KL reference copy).
  2. The train state of Qwen2.5-7B-Instruct (the shipped architecture; shapes only, nothing is
     allocated): weights, trained params, AdamW moments and the KL reference, full fine-tuning in
     float32 against LoRA rank `--rank` on a bfloat16 base, in total and per device when the state
     is sharded evenly over `--devices` devices. Activations are not included.

  python bench/lora.py [--rows 2 --prompt 768 --rank 16 --repeats 2 --devices 8]
"""
from __future__ import annotations

import argparse
import pathlib
import runpy
import sys
import time

import jax
import numpy as np

from epo_jax.models import lora, transformer
from epo_jax.models.config import architecture_dir, from_hf_config
from epo_jax.models.loading import load_pretrained
from epo_jax.train import actor_critic, optim, sharding
from epo_jax.train.update import init_train_state, make_update_fn

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 1024**3
MIB = 1024**2


def _batch(rows: int, prompt: int, response: int, vocab: int, seed: int = 0) -> dict:
    """A padded update batch: prompts of random length left-padded to `prompt`, full responses."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(rows, prompt + response)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    for row, length in enumerate(rng.integers(prompt * 5 // 8, prompt + 1, size=rows)):
        mask[row, :prompt - length] = False  # ~500-768 real prompt tokens in a 768 bucket, as on the default run
    return {"tokens": tokens, "attention_mask": mask, "response_mask": np.ones((rows, response), np.float32),
            "old_logprobs": (-4.0 + 0.3 * rng.standard_normal((rows, response))).astype(np.float32),
            "ref_logprobs": (-4.0 + 0.3 * rng.standard_normal((rows, response))).astype(np.float32),
            "advantages": rng.standard_normal((rows, response)).astype(np.float32),
            "returns": rng.standard_normal((rows, response)).astype(np.float32),
            "old_values": rng.standard_normal((rows, response)).astype(np.float32),
            "turn_index": np.zeros(rows, np.int32), "traj_id": np.arange(rows, dtype=np.int32)}


def _config(rows: int, rank: int, base_dtype: str):
    config = runpy.run_path(str(ROOT / "configs" / "scienceworld.py"))["get_config"]()
    config.algo.micro_batch_size = rows
    config.model.lora.rank, config.model.lora.base_dtype = rank, base_dtype
    return config


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
               if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


class _Variant:
    """A compiled update of one run config and its state."""

    def __init__(self, name: str, config, rows: int, prompt: int):
        self.name = name
        loaded = load_pretrained("", dtype=config.model.dtype, param_dtype=actor_critic.base_param_dtype(config),
                                 remat=True)
        mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
        graphdef, policy = actor_critic.policy_model(config, loaded.graphdef, loaded.params)
        params = actor_critic.init_params(config, policy, loaded.config.hidden_size)
        optimizer = optim.make_optimizer(config.optim, 100)
        self.state = init_train_state(config, params, optimizer, mesh)
        self.batch = sharding.shard_batch(
            _batch(rows, prompt, int(config.rollout.max_response_len), loaded.config.vocab_size), mesh)
        # Full fine-tuning keeps a frozen copy of the initial policy as the KL reference; LoRA uses its base.
        reference = 0 if config.model.lora.rank else _nbytes(loaded.params)
        self.state_bytes = (_nbytes(self.state.params), _nbytes(self.state.opt_state), reference)
        update = jax.jit(make_update_fn(config, actor_critic.make_forward_fn(config, graphdef), optimizer),
                         donate_argnums=(0,))
        start = time.perf_counter()
        self.compiled = update.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.temp_bytes = self.compiled.memory_analysis().temp_size_in_bytes
        self.times: list[float] = []
        print(f"compiled {name} in {self.compile_s:.0f} s", file=sys.stderr, flush=True)

    def time_once(self) -> None:
        start = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(metrics)
        self.times.append(time.perf_counter() - start)


def update_table(rows: int, prompt: int, rank: int, repeats: int) -> str:
    variants = [_Variant("full fine-tuning", _config(rows, 0, "float32"), rows, prompt),
                _Variant(f"LoRA r{rank}, float32 base", _config(rows, rank, "float32"), rows, prompt),
                _Variant(f"LoRA r{rank}, bfloat16 base", _config(rows, rank, "bfloat16"), rows, prompt)]
    for _ in range(repeats + 1):  # the first round warms up (allocations), then interleaved rounds
        for variant in variants:
            variant.time_once()
            print(f"{variant.name}: {variant.times[-1]:.2f} s", file=sys.stderr, flush=True)
    reference = min(variants[0].times[1:])
    lines = [f"Update of {rows} x ({prompt} + 64) tokens, SmolLM2-135M, best of {repeats} interleaved:", "",
             "| variant | update s | / full | compile s | update temp MiB | params MiB | moments MiB | KL ref MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        best = min(v.times[1:])
        params, moments, ref = (b / MIB for b in v.state_bytes)
        lines.append(f"| {v.name} | {best:.2f} | {best / reference:.2f} | {v.compile_s:.0f} | "
                     f"{v.temp_bytes / MIB:.0f} | {params:.0f} | {moments:.0f} | {ref:.0f} |")
    return "\n".join(lines)


def memory_table(rank: int, devices: int) -> str:
    import json

    with open(pathlib.Path(architecture_dir("Qwen2.5-7B-Instruct")) / "config.json", encoding="utf-8") as f:
        hf = json.load(f)
    full_config = from_hf_config(hf, param_dtype="float32")
    _, full = transformer.abstract_params(full_config)
    weights = _nbytes(full)
    spec = lora.LoraSpec(rank=rank, alpha=2.0 * rank)
    _, adapted = lora.abstract_with_adapters(from_hf_config(hf, param_dtype="bfloat16"), spec)
    base, adapters = _nbytes(lora.base_params(adapted)), _nbytes(lora.adapter_params(adapted))
    rows = {"full fine-tuning (float32)": (weights, weights, 2 * weights, weights),
            f"LoRA r{rank} on a bfloat16 base": (base + adapters, adapters, 2 * adapters, 0)}
    lines = [f"Qwen2.5-7B-Instruct train state (shapes only; no activations), per device = total / {devices}:", "",
             "| variant | weights GiB | trained GiB | AdamW moments GiB | KL reference GiB | total GiB | "
             "per device GiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (held, trained, moments, reference) in rows.items():
        total = held + moments + reference
        lines.append(f"| {name} | {held / GIB:.2f} | {trained / GIB:.3f} | {moments / GIB:.3f} | "
                     f"{reference / GIB:.2f} | {total / GIB:.2f} | {total / devices / GIB:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2, help="rows of the update batch (one micro-batch)")
    parser.add_argument("--prompt", type=int, default=768, help="the prompt bucket every row is padded to")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--devices", type=int, default=8, help="devices the 7B state is sharded over")
    parser.add_argument("--skip-update", action="store_true", help="print the memory table only")
    args = parser.parse_args()
    print(memory_table(args.rank, args.devices))
    if not args.skip_update:
        print()
        print(update_table(args.rows, args.prompt, args.rank, args.repeats))


if __name__ == "__main__":
    main()
