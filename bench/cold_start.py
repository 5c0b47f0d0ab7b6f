"""What the supervised cold start of the README's default run teaches the embedded SmolLM2-135M.

    python bench/cold_start.py [--episodes 24] [--quick] [--out results.json]

The raw embedded model against the cold start's policy (made first when the cache lacks it, as
`python -m epo_jax.main --config=configs/scienceworld.py` makes it) on the same held-out IID
episodes of the CPU default, at its eval temperature and with the same random keys: valid-format
rate, success rate, score and turns; then the cold start's own record (its stage times and the
load average it ran under). The cold-start step's speed is a row of `bench/run_all.py`
(`--only cold_start`: tokens/s and MFU against the matmul peak of the same run).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import runpy
import sys

import jax

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from epo_jax import sft  # noqa: E402
from epo_jax.config import validate  # noqa: E402
from epo_jax.models.loading import load_pretrained  # noqa: E402
from epo_jax.train.progress import Progress  # noqa: E402


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
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 episodes per policy")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    config = default_config()
    progress = Progress()
    results = {"load_start": os.getloadavg()[0]}
    results["eval"] = eval_rows(config, 2 if args.quick else args.episodes, progress)
    results["cold_start"] = sft.read_summary(sft.stage_dir(config))
    results["load_end"] = os.getloadavg()[0]
    print_tables(results)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
