"""Update time of the default run's first step, padded rows against packed rows (algo.pack).

Builds the README's default run (`configs/scienceworld.py`: SmolLM2-135M-Instruct, PPO + EPO,
real ScienceWorld engines), plays its first step's episodes once, and hands the same turn
samples to the trainer's LEARN stage (score pass, advantages, update) twice: as padded rows
(`build_batch`, one sample per row of the step's prompt bucket + the response length) and as
packed rows (`algo.pack`, samples end to end in rows of at most `algo.pack_tokens`). Each
variant is compiled first (its compile time is printed), then the two are timed in interleaved
rounds; the best round of each is kept and the ratio
is against the padded time measured in the same process. The tokens the decoder runs on per
update (rows x row length) are printed too: they do not depend on the machine's load.

  python bench/packing.py [--rounds 2] [--pack-tokens 0]
"""
import argparse
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

from epo_jax.train import trainer
from epo_jax.train.progress import Progress

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs.scienceworld import get_config  # noqa: E402


def decoder_tokens(arrays: dict) -> int:
    """Tokens one forward pass over the batch runs the decoder on: rows x row length."""
    if "pack_index" in arrays:  # [arrangements, micro-batches, shards, K, L]
        return int(np.prod(arrays["pack_index"].shape[1:]))
    return int(np.prod(arrays["tokens"].shape))


def timed_learn(run, state, update_batch):
    """(seconds, new state) of one LEARN stage (score, advantages, update) until the new state is
    ready. Each call continues from the last one's state (the update donates its input, and a
    copy per call would hold a second 1.5 GB train state): parameter values do not change the
    work."""
    t0 = time.perf_counter()
    state, _ = trainer.learn(run, state, update_batch)
    jax.block_until_ready(state)
    return time.perf_counter() - t0, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pack-tokens", type=int, default=0, help="algo.pack_tokens of the packed variant")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        config = get_config()
        config.workdir = workdir
        run, state = trainer._setup(config, Progress(enabled=True))
        try:
            collected, _ = trainer.collect(run, state, 1, trainer.RunCursor())
            samples = collected.samples
            batches = {"padded": trainer.make_update_batch(run, samples)}
            packed_config = config.copy_and_resolve_references()
            packed_config.algo.pack, packed_config.algo.pack_tokens = True, args.pack_tokens
            run.config = packed_config
            batches["packed"] = trainer.make_update_batch(run, samples, state.rng)
            run.config = config
            seconds = {}
            for name, update_batch in batches.items():
                t_compile, state = timed_learn(run, state, update_batch)
                print(f"{name}: first LEARN (compiles) {t_compile:.1f} s", flush=True)
            for r in range(args.rounds):
                for name in (list(batches) if r % 2 == 0 else list(batches)[::-1]):
                    elapsed, state = timed_learn(run, state, batches[name])
                    seconds.setdefault(name, []).append(elapsed)
                    print(f"round {r + 1}: {name} {seconds[name][-1]:.1f} s", flush=True)
        finally:
            run.close()
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    print(f"\n{len(samples)} turn samples of {min(lengths)}-{max(lengths)} tokens (prompt + response), "
          f"{sum(lengths)} in all; load average {os.getloadavg()[0]:.1f}")
    print("| batch  | decoder tokens / pass | LEARN s (best) | ratio |")
    print("|--------|----------------------:|---------------:|------:|")
    reference = min(seconds["padded"])
    for name, update_batch in batches.items():
        shape = update_batch.arrays["pack_index"].shape if name == "packed" else update_batch.arrays["tokens"].shape
        best = min(seconds[name])
        print(f"| {name:6} | {decoder_tokens(update_batch.arrays):>8} {str(tuple(shape)):>12} | {best:14.1f} | "
              f"{best / reference:5.2f} |")


if __name__ == "__main__":
    main()
