"""The planner's per-device memory for one model and preset, full fine-tuning against LoRA, in one run.

`python -m epo_jax.plan` compiles the trainer's own programs (update, score pass, prefill, decode)
for a simulated mesh and reads XLA's buffer assignment (docs/scaling.md, section 3). This script
plans the same config twice, with full fine-tuning (float32 params, AdamW moments of every weight,
a frozen copy of the policy as the KL reference) and with LoRA (`model.lora.rank`, alpha 2 x rank
on all seven projections, the base frozen in bfloat16 and serving as the KL reference), and prints
GiB per device and LoRA / full for the resident state and each program's live peak.

    python bench/plan_lora.py [--model Qwen2.5-7B-Instruct] [--preset configs/scienceworld.py:reference]
        [--chip h100-80gb] [--devices 8] [--rank 16] [--prompt_len 0] [--full_depth] [--cache FILE]
        [--set algo.micro_batch_size=8 ...]

By default each program is compiled at 2 and 3 decoder layers and extrapolated to the model's depth
(`--full_depth=false` in the planner), as in docs/scaling.md.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import time

# The planner compiles for N simulated CPU devices, which XLA takes from its flags at start.
if __name__ == "__main__":
    _devices = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--devices=")), 8)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_collections  # noqa: E402
from absl import logging  # noqa: E402

from epo_jax import config as config_lib  # noqa: E402
from epo_jax import plan as plan_lib  # noqa: E402
from epo_jax.models.config import architecture_dir  # noqa: E402


def _load_preset(spec: str) -> ml_collections.ConfigDict:
    """`configs/<env>.py[:preset]` as `--config=` takes it."""
    path, _, preset = spec.partition(":")
    return runpy.run_path(path)["get_config"](preset)


def _override(config, assignments: list[str]) -> None:
    for assignment in assignments:
        field, _, text = assignment.partition("=")
        *parents, leaf = field.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = type(node[leaf])(text) if not isinstance(node[leaf], bool) else text.lower() == "true"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen2.5-7B-Instruct", help="an architecture folder under "
                        "epo_jax/models/architectures, or a model folder's path")
    parser.add_argument("--preset", default="configs/scienceworld.py:reference")
    parser.add_argument("--chip", default="h100-80gb", choices=sorted(plan_lib.CHIPS))
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt_len", type=int, default=0)
    parser.add_argument("--full_depth", action="store_true")
    parser.add_argument("--cache", default="", help="the planner's --cache file")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides for both")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)

    model_path = args.model if os.path.isdir(args.model) else architecture_dir(args.model)
    results, t0 = {}, time.perf_counter()
    for name, rank in (("full", 0), (f"LoRA r{args.rank}", args.rank)):
        config = _load_preset(args.preset)
        config.model.path = model_path
        _override(config, args.set)
        if rank:
            config.model.lora.rank, config.model.lora.alpha = rank, 2.0 * rank
            config.model.lora.base_dtype = "bfloat16"
        config = config_lib.validate(config)
        print(f"--- {name} " + "-" * 60, flush=True)
        results[name] = plan_lib.plan(config, chip=plan_lib.CHIPS[args.chip], num_devices=args.devices,
                                      prompt_len=args.prompt_len, full_depth=args.full_depth, run_search=False,
                                      cache=plan_lib.CostCache(args.cache))
    full, adapted = results.values()
    print(f"\n{full['model']} on {args.devices} x {args.chip}, {args.preset}, mesh "
          f"{'/'.join(map(str, full['mesh']))} (data/fsdp/tensor), micro-batch {full['micro_batch_size']}; GiB per "
          f"device ({'full depth' if args.full_depth else 'extrapolated from 2 and 3 layers'}); "
          f"planned in {time.perf_counter() - t0:.0f} s")
    names = list(results)
    print(f"{'':32s} {names[0]:>10s} {names[1]:>10s} {'ratio':>8s}")
    rows = [("trained parameters (M)", full["trained_parameters"] / 1e6, adapted["trained_parameters"] / 1e6),
            ("resident state + KL reference", full["resident_gib"], adapted["resident_gib"])]
    rows += [(f"{program}: live at peak", full["programs"][program]["live_peak_gib"],
              adapted["programs"][program]["live_peak_gib"])
             for program in full["programs"] if program in adapted["programs"]]
    rows.append(("peak of the step", full["peak_gib"], adapted["peak_gib"]))
    for label, a, b in rows:
        print(f"{label:32s} {a:10.2f} {b:10.2f} {b / a:8.3f}")
    usable = full["usable_gib"]
    print(f"usable per device: {usable:.1f} GiB; fits: full {full['fits']}, LoRA {adapted['fits']}")


if __name__ == "__main__":
    main()
