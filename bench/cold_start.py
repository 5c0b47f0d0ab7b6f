"""The supervised cold start of the README's default run, measured: what it teaches the embedded
SmolLM2-135M, and how fast it learns.

    python bench/cold_start.py [--episodes 24] [--quick] [--out results.json]

  eval        the raw embedded model against the cold start's policy (made first if the cache lacks
              it, as `python -m epo_jax.main --config=configs/scienceworld.py` makes it) on the same
              held-out IID episodes of the CPU default at its eval temperature: valid-format rate,
              success rate, score, turns;
  throughput  one cold-start optimizer step of SmolLM2 on a batch of the default's shape (4 turns x
              768 prompt + 64 reply tokens, layers rematerialised): tokens/s, and model FLOPs
              utilisation against the float32 matmul peak measured in this same run (the ratio
              that carries to another machine: cold start minutes = padded tokens / tokens/s);
  the cold start's own record: its stage times, steps and the load average it ran under.

Every timing row is a ratio between two measurements of this same run; the evaluation compares
two policies on the same episodes and random keys.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import runpy
import sys
import time

import jax
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from epo_jax import sft  # noqa: E402
from epo_jax.config import validate  # noqa: E402
from epo_jax.models.loading import load_pretrained  # noqa: E402
from epo_jax.train import optim, sharding  # noqa: E402
from epo_jax.train.progress import Progress  # noqa: E402
from epo_jax.train.update import init_train_state  # noqa: E402


def _run_all():
    spec = importlib.util.spec_from_file_location("bench_run_all", HERE / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_config():
    return validate(runpy.run_path(str(ROOT / "configs" / "scienceworld.py"))["get_config"]())


def eval_rows(config, episodes: int, progress: Progress) -> list[dict]:
    summary = sft.read_summary(sft.stage_dir(config)) or sft.make_cold_start(config, progress)
    rows = []
    for name, path in (("raw embedded SmolLM2-135M-Instruct", ""), ("cold start", summary["policy"])):
        model = load_pretrained(path, dtype=config.model.dtype, param_dtype=config.model.param_dtype)
        result = sft.evaluate_policy(config, model, model.params, episodes, progress)
        rows.append({"policy": name, "path": path or "embedded",
                     **{k.split("/", 2)[2]: v for k, v in result.items() if k.startswith("eval/iid/")
                        and k.count("/") == 2},
                     "eval_s": result["time/eval_s"]})
    return rows


def throughput_rows(config, quick: bool) -> list[dict]:
    rows_per_step, prompt = (2, 128) if quick else (int(config.sft.batch_size), 768)
    response = int(config.rollout.max_response_len)
    model = load_pretrained("", dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                            remat=config.model.remat)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    optimizer = optim.make_optimizer(config.optim, 100)
    state = init_train_state(config, {"policy": model.params}, optimizer, mesh)
    step = jax.jit(sft.make_sft_step(config, model.graphdef, optimizer), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    batch = sharding.shard_batch({
        "tokens": rng.integers(3, model.config.vocab_size, (rows_per_step, prompt + response)).astype(np.int32),
        "attention_mask": np.ones((rows_per_step, prompt + response), bool),
        "response_mask": np.ones((rows_per_step, response), np.float32)}, mesh)
    state, _ = step(state, batch)  # compile
    jax.block_until_ready(state)
    best = np.inf
    for _ in range(1 if quick else 2):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - start)
    cfg = model.config
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
    seq = prompt + response
    tokens = rows_per_step * seq
    # PaLM's count (6N + 12 L D T per token), as bench/run_all.py's update row (without the
    # rematerialised forward).
    model_flops = tokens * (6 * num_params + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq)
    peak = _run_all().matmul_peak(np.float32)
    return [{"measurement": f"cold-start step, {rows_per_step} x {seq} tokens", "seconds": best,
             "tokens_per_s": tokens / best, "matmul_peak_gflops": peak / 1e9, "mfu": model_flops / best / peak}]


def print_tables(results: dict) -> None:
    print(f"\nload average at the start {results['load_start']:.1f}, at the end {results['load_end']:.1f}; "
          f"{jax.device_count()} {jax.default_backend()} device(s)")
    if results.get("eval"):
        print("\n| policy | IID episodes | valid format | success | score | turns | eval s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in results["eval"]:
            print(f"| {r['policy']} | {r.get('episodes', 0):.0f} | {r.get('valid_format_rate', 0):.2f} | "
                  f"{r.get('success_rate', 0):.2f} | {r.get('score_mean', 0):.1f} | {r.get('turns_mean', 0):.1f} | "
                  f"{r['eval_s']:.0f} |")
    for r in results.get("throughput", []):
        print(f"\n| measurement | s | tok/s | reference: fp32 matmul peak GFLOP/s | ratio (MFU) |\n| --- | ---: | ---: | ---: | ---: |\n"
              f"| {r['measurement']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {r['matmul_peak_gflops']:.0f} | "
              f"{r['mfu']:.2f} |")
    record = results.get("cold_start")
    if record:
        learn = record["learn"]
        print(f"\ncold start record ({record['policy']}): {record['time_s']:.0f} s in all, "
              f"demonstrations {record['demonstrations']['time_s']:.0f} s ({record['demonstrations']['turns']} turns), "
              f"learning {learn['time/learn_s']:.0f} s ({learn['steps']:.0f} steps), "
              f"evaluation {record['eval'].get('time/eval_s', 0):.0f} s; load average "
              f"{record.get('load_average', {}).get('start', float('nan')):.1f} -> "
              f"{record.get('load_average', {}).get('end', float('nan')):.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=24, help="IID episodes per policy")
    parser.add_argument("--only", nargs="*", default=["eval", "throughput"], choices=["eval", "throughput"])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 episodes, a small throughput batch")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    config = default_config()
    progress = Progress()
    results = {"load_start": os.getloadavg()[0]}
    if "eval" in args.only:
        results["eval"] = eval_rows(config, 2 if args.quick else args.episodes, progress)
        results["cold_start"] = sft.read_summary(sft.stage_dir(config))
    if "throughput" in args.only:
        results["throughput"] = throughput_rows(config, args.quick)
    results["load_end"] = os.getloadavg()[0]
    print_tables(results)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
