"""The multi-turn agent loop: every turn, one batched sampler call for all active environments.

    rollout = run_episodes(pool, generate, tokenizer, specs, rng, config=config)

Per turn: render the prompt of each active environment (task, recent history, observation,
admissible actions) through the model's chat template, generate all replies in one call, parse
each reply's <action>, and step the pool with the actions. Each turn becomes a `TurnSample`
holding the exact prompt and response token ids and the sampler's log-probabilities.

When an episode ends, its reward (the last reward the engine gave: success_reward x won with
the sparse reward, the summed score deltas with the dense one) is set on every one of its turns;
each turn also keeps its own format penalty. Episodes whose engine crashed are marked and left
out of training and of success rates by the trainer.
"""
from __future__ import annotations

import dataclasses
import time
import zlib
from typing import Any, Callable, Sequence

import jax
import numpy as np

from epo_jax.envs import EnvPool, EpisodeSpec
from epo_jax.models.sampler import Sampler, SamplingParams
from epo_jax.rollout import prompts as prompts_lib
from epo_jax.rollout.actions import parse_action
from epo_jax.rollout.samples import Episode, TurnSample


@dataclasses.dataclass
class Generation:
    """One reply of the sampler."""
    ids: np.ndarray        # int32 [R]
    logprobs: np.ndarray   # float32 [R]
    entropy: np.ndarray    # float32 [R]
    text: str


# generate(prompt_ids, rng) -> one Generation per prompt
GenerateFn = Callable[[Sequence[np.ndarray], jax.Array], list[Generation]]


@dataclasses.dataclass
class Rollout:
    samples: list[TurnSample]
    episodes: list[Episode]
    stats: dict[str, float]


def anchor_id(observation: str) -> int:
    """A stable 31-bit id of an observation text (GiGPO's step groups)."""
    return zlib.crc32(observation.encode("utf-8", "replace")) & 0x7FFFFFFF


def run_episodes(pool: EnvPool, generate: GenerateFn, tokenizer, specs: Sequence[EpisodeSpec],
                 rng: jax.Array, *, config) -> Rollout:
    """Plays one episode per environment of `pool` (group g plays specs[g]) to its end."""
    env_cfg = config.env
    max_prompt_len = int(config.rollout.max_prompt_len)
    if len(specs) != pool.num_groups:
        raise ValueError(f"run_episodes: {len(specs)} episode specs for a pool of {pool.num_groups} groups")
    t_start = time.perf_counter()
    resets = pool.reset(list(specs))
    num_envs = len(resets)
    group_ids = pool.group_ids
    episodes = [Episode(traj_id=i, group_id=int(group_ids[i]), task=specs[group_ids[i]].task,
                        variation=int(specs[group_ids[i]].variation)) for i in range(num_envs)]
    observations = [r.observation for r in resets]
    infos = [r.info for r in resets]
    histories: list[list[prompts_lib.Turn]] = [[] for _ in range(num_envs)]
    turn_samples: list[list[TurnSample]] = [[] for _ in range(num_envs)]
    stats = {"time/generate_s": 0.0, "time/env_s": 0.0, "rollout/new_tokens": 0.0,
             "rollout/prompt_tokens": 0.0, "rollout/truncated_prompts": 0.0}
    turn = 0
    while pool.active.any():
        active = [int(i) for i in np.flatnonzero(pool.active)]
        prompt_ids = []
        for i in active:
            text = prompts_lib.build_prompt(
                tokenizer, config.env.name, infos[i], observations[i], histories[i],
                history_length=env_cfg.history_length, show_actions=env_cfg.show_actions)
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) > max_prompt_len:  # keep the end: the observation and the reply cue
                ids = ids[-max_prompt_len:]
                stats["rollout/truncated_prompts"] += 1
            prompt_ids.append(np.asarray(ids, np.int32))
        t0 = time.perf_counter()
        generations = generate(prompt_ids, jax.random.fold_in(rng, turn))
        stats["time/generate_s"] += time.perf_counter() - t0
        actions = {}
        for i, ids, gen in zip(active, prompt_ids, generations):
            parsed = parse_action(gen.text)
            actions[i] = parsed.action
            stats["rollout/new_tokens"] += len(gen.ids)
            stats["rollout/prompt_tokens"] += len(ids)
            turn_samples[i].append(TurnSample(
                prompt_ids=ids, response_ids=np.asarray(gen.ids, np.int32),
                response_logprobs=np.asarray(gen.logprobs, np.float32),
                response_entropy=np.asarray(gen.entropy, np.float32), traj_id=i,
                group_id=int(group_ids[i]), turn_index=turn, anchor_id=anchor_id(observations[i]),
                valid_format=parsed.valid,
                penalty=0.0 if parsed.valid else float(env_cfg.invalid_action_penalty)))
        t0 = time.perf_counter()
        results = pool.step(actions)
        stats["time/env_s"] += time.perf_counter() - t0
        for i, result in results.items():
            episode = episodes[i]
            episode.num_turns += 1
            episode.invalid_turns += int(not turn_samples[i][-1].valid_format)
            histories[i].append(prompts_lib.Turn(observations[i], actions[i]))
            observations[i] = result.observation
            infos[i] = {**infos[i], **result.info}
            episode.reward += float(result.reward)
            if result.done or result.truncated:
                episode.won = bool(result.info.get("won", False))
                episode.score = float(result.info.get("score", 0.0) or 0.0)
                episode.truncated = bool(result.truncated)
                episode.crashed = bool(result.crashed)
        turn += 1
    samples = []
    for i, episode in enumerate(episodes):
        for sample in turn_samples[i]:
            sample.episode_reward = episode.reward
        if turn_samples[i]:
            turn_samples[i][-1].last_turn = True
        samples.extend(turn_samples[i])
    elapsed = time.perf_counter() - t_start
    stats["rollout/turns"] = float(turn)
    stats["throughput/rollout_tokens_per_s"] = stats["rollout/new_tokens"] / max(stats["time/generate_s"], 1e-9)
    stats["time/rollout_wall_s"] = elapsed
    return Rollout(samples=samples, episodes=episodes, stats=stats)


def make_generate_fn(config, graphdef, model_config, tokenizer, mesh=None):
    """generate(params, prompt_ids, rng, *, temperature) -> [Generation] with our sampler
    (one compiled program per prompt-length and batch bucket; params are an argument)."""
    sampler = Sampler(graphdef, model_config, tokenizer, stop_strings=tuple(config.rollout.stop_strings),
                      prompt_buckets=tuple(config.rollout.prompt_buckets), mesh=mesh)

    def generate(params, prompt_ids: Sequence[np.ndarray], rng: jax.Array, *,
                 temperature: float) -> list[Generation]:
        sampling = SamplingParams(
            temperature=temperature if temperature > 0 else 1.0, greedy=temperature == 0,
            top_p=float(config.rollout.top_p), top_k=int(config.rollout.top_k),
            max_new_tokens=int(config.rollout.max_response_len))
        out = sampler.generate(params, [list(map(int, p)) for p in prompt_ids], rng, sampling)
        generations = []
        for row, length in enumerate(out.lengths):
            ids = out.tokens[row, :length]
            generations.append(Generation(ids=ids, logprobs=out.logprobs[row, :length],
                                          entropy=out.entropies[row, :length],
                                          text=tokenizer.decode(ids, skip_special_tokens=True)))
        return generations

    return generate


def pad_id(tokenizer) -> int:
    """The id written into padding positions (always masked, so any valid id will do)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
