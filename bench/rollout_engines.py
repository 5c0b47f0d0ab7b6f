"""One RL step's rollout through both engines (`rollout.engine = turns | continuous`), same run.

    python bench/rollout_engines.py [--envs 2 8 16] [--chunk-len 8] [--rounds 1] [--max-turns 0] [--out table.md]

The README's default run (configs/scienceworld.py: the embedded SmolLM2-135M-Instruct in the real
ScienceWorld, 4 turns, 64-token replies at temperature 1) with `--envs` environments (groups of
2, the first groups of the run's train order). For each size one pool of engines serves both
engines, which play the same episodes: the same specs and rollout key, and every reply sampled
from its (episode, turn) key. Each engine first plays the rollout once to compile its programs,
then `--rounds` timed times, the two engines alternating, keeping each one's fastest.

Columns: rollout wall time (and its ratio to the turn engine's), the idle-row fraction of the
decode steps (rows x steps that sampled no token of a running reply: rows whose reply had ended,
batch padding, free slots), new tokens, generated tokens per second of rollout wall time and
per second spent in the sampler, the turn engine's new tokens against the continuous one's (the
same episodes give the same count), and the load average.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import runpy
import time

import jax

from epo_jax.models.loading import load_pretrained
from epo_jax.rollout import agent_loop
from epo_jax.train import environments

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENGINES = ("turns", "continuous")


def config_for(num_envs: int, engine: str, chunk_len: int, max_turns: int = 0):
    config = runpy.run_path(str(ROOT / "configs" / "scienceworld.py"))["get_config"]("")
    config.env.max_turns = max_turns or config.env.max_turns
    config.env.group_size = 2
    config.env.num_groups = max(1, num_envs // config.env.group_size)
    config.rollout.engine = engine
    config.rollout.chunk_len = chunk_len
    return config


def rollout_once(pool, policy, tokenizer, config, specs, key) -> dict[str, float]:
    start = time.perf_counter()
    rollout = agent_loop.run_episodes(pool, policy, tokenizer, specs, key, config=config)
    stats = dict(rollout.stats, wall_s=time.perf_counter() - start, samples=len(rollout.samples),
                 load=os.getloadavg()[0])
    return stats


def measure(num_envs: int, args, model, make_policy) -> dict[str, dict]:
    configs = {engine: config_for(num_envs, engine, args.chunk_len, args.max_turns) for engine in ENGINES}
    config = configs["turns"]
    specs = environments.train_specs(config)[:config.env.num_groups]
    key = jax.random.fold_in(jax.random.key(config.seed), 1)  # the first RL step's rollout key
    policy = make_policy(model.params, temperature=config.rollout.temperature)
    best: dict[str, dict] = {}
    pool = environments.make_pool(config, config.env.num_groups * config.env.group_size,
                                  group_size=config.env.group_size, seed=config.seed)
    try:
        for engine in ENGINES:  # compiles every program the timed rollouts use
            rollout_once(pool, policy, model.tokenizer, configs[engine], specs, key)
        for round_ in range(args.rounds):
            for engine in ENGINES if round_ % 2 == 0 else ENGINES[::-1]:
                stats = rollout_once(pool, policy, model.tokenizer, configs[engine], specs, key)
                print(f"  {num_envs} envs, {engine}: {stats['wall_s']:.1f} s, idle rows "
                      f"{stats['rollout/idle_row_fraction']:.3f}, load {stats['load']:.1f}", flush=True)
                if engine not in best or stats["wall_s"] < best[engine]["wall_s"]:
                    best[engine] = stats
    finally:
        pool.close()
    return best


def format_table(results: dict[int, dict[str, dict]]) -> str:
    lines = ["| envs | engine | rollout wall s | ratio vs turns | idle-row fraction | new tokens | turn samples | "
             "tok/s (wall) | tok/s (sampler) | load |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for num_envs, by_engine in results.items():
        reference = by_engine["turns"]["wall_s"]
        for engine in ENGINES:
            s = by_engine[engine]
            lines.append(
                f"| {num_envs} | {engine} | {s['wall_s']:.1f} | {s['wall_s'] / reference:.2f} | "
                f"{s['rollout/idle_row_fraction']:.3f} | {s['rollout/new_tokens']:.0f} | {s['samples']} | "
                f"{s['rollout/new_tokens'] / s['wall_s']:.1f} | {s['throughput/rollout_tokens_per_s']:.1f} | "
                f"{s['load']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--chunk-len", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-turns", type=int, default=0, help="0: the default run's env.max_turns (8)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    header = (f"rollout engines: jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
              f"{platform.processor() or platform.machine()}, chunk_len {args.chunk_len}, max_turns "
              f"{args.max_turns or 'as the default run'}, "
              f"load average {os.getloadavg()[0]:.1f} at start")
    print(header, flush=True)
    config = config_for(2, "turns", args.chunk_len)
    model = load_pretrained(config.model.path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                            attention=config.model.attention)
    make_policy = agent_loop.make_policy(config, model.graphdef, model.config, model.tokenizer)
    results = {}
    for num_envs in args.envs:  # the table so far after each size: a long run leaves what it measured
        results[num_envs] = measure(num_envs, args, model, make_policy)
        print(format_table(results), flush=True)
    table = format_table(results)
    print(f"\n{header}; load average {os.getloadavg()[0]:.1f} at the end\n{table}")
    if args.out:
        pathlib.Path(args.out).write_text(f"{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
