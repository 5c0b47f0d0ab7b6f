"""Sampler / trainer drift of the default run's first step, float32 and bfloat16 sampling.

The default config (`configs/scienceworld.py`: SmolLM2-135M-Instruct in float32, 1 group x 2
ScienceWorld environments, 4 turns of up to 64 tokens) plays its first RL step's episodes twice,
with the same episodes and keys: once with the sampler in float32 (rollout.dtype=model, the
default) and once in bfloat16 (rollout.dtype=bfloat16). Each rollout's batch goes through the
trainer's score pass in float32 (`epo_jax.train.trainer.make_score_fn`), which logs the drift of
the sampler's log-probs from the trainer's teacher-forced ones; the table gives it overall and
per turn index.

  python bench/drift.py
"""
import argparse
import os
import pathlib
import sys
import time

import jax

from epo_jax.models.loading import load_pretrained, with_compute_dtype
from epo_jax.rollout import agent_loop
from epo_jax.train import actor_critic, environments, sharding
from epo_jax.train import batch as batch_lib
from epo_jax.train.trainer import make_score_fn, score_pass_metrics

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs.scienceworld import get_config  # noqa: E402

DRIFT_NAMES = ("logprob_diff_mean", "logprob_diff_max", "k3_kl", "ratio_outside_fraction")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def rollout_batch(config, model, params, pool, specs, key, dtype: str) -> tuple[dict, float]:
    """The step's episodes played with the sampler computing in `dtype`: the update batch and the
    rollout's wall time."""
    sampler = with_compute_dtype(model, dtype, config.model.attention)
    policy = agent_loop.make_policy(config, sampler.graphdef, sampler.config, model.tokenizer)
    start = time.perf_counter()
    rollout = agent_loop.run_episodes(pool, policy(params["policy"], temperature=config.rollout.temperature),
                                      model.tokenizer, specs, key, config=config)
    seconds = time.perf_counter() - start
    rows = batch_lib.update_rows(len(rollout.samples), num_minibatches=config.algo.num_minibatches,
                                 micro_batch_size=config.algo.micro_batch_size)
    batch = batch_lib.build_batch(rollout.samples, prompt_buckets=config.rollout.prompt_buckets,
                                  response_len=config.rollout.max_response_len, rows=rows,
                                  pad_id=agent_loop.pad_id(model.tokenizer), padding_id_start=10_000)
    return batch, seconds


def drift_table(drifts: dict[str, dict[str, float]]) -> None:
    print("\n| sampler / trainer | turn | tokens | mean abs dlogp | max abs dlogp | k3 KL | ratio outside [0.5, 2] |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, (metrics, batch) in drifts.items():
        mask, turns = batch["response_mask"], batch["turn_index"]
        rows = [("all", "drift/{}", mask.sum())]
        rows += [(str(t), f"drift/turn_{t:02d}/{{}}", (mask * (turns == t)[:, None]).sum())
                 for t in sorted(set(turns[batch["valid"]].tolist()))]
        for turn, key, tokens in rows:
            values = [metrics[key.format(name)] for name in DRIFT_NAMES]
            print(f"| {label} | {turn} | {tokens:.0f} | {values[0]:.2e} | {values[1]:.2e} | {values[2]:.2e} "
                  f"| {values[3]:.4f} |")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    config = get_config()
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s), "
          f"load average {load_average()}", flush=True)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    model = load_pretrained(config.model.path, dtype=config.model.dtype, remat=config.model.remat)
    params = actor_critic.init_params(config, model.params, model.config.hidden_size)
    specs = environments.train_specs(config)[:config.env.num_groups]
    key = jax.random.fold_in(jax.random.split(jax.random.key(config.seed))[0], 1)  # the trainer's step 1
    num_envs = config.env.num_groups * config.env.group_size
    drifts = {}
    with environments.make_pool(config, num_envs, group_size=config.env.group_size, seed=config.seed) as pool:
        for dtype in ("float32", "bfloat16"):
            batch, seconds = rollout_batch(config, model, params, pool, specs, key, dtype)
            on_mesh = sharding.shard_batch(batch, mesh)
            forward = actor_critic.make_forward_fn(config, model.graphdef)
            score = jax.jit(make_score_fn(config, forward, actor_critic.make_forward_fn(
                config, model.graphdef, with_critic=False), trainer_logprobs=True))
            _, raw = score(params, params["policy"], on_mesh)
            drifts[f"{dtype} / float32"] = (score_pass_metrics(jax.device_get(raw)), batch)
            print(f"{dtype} sampler: {int(batch['valid'].sum())} turn samples, "
                  f"{int(batch['response_mask'].sum())} tokens, rollout {seconds:.0f} s", flush=True)
    drift_table(drifts)


if __name__ == "__main__":
    main()
