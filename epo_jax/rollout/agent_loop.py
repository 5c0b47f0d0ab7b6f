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

With `rollout.branching`, groups spend their environments as AEPO's entropy-balanced rollout
decides: rollouts from the start plus branches that fork running episodes (see run_episodes and
epo_jax/rollout/branching.py).
"""
from __future__ import annotations

import dataclasses
import time
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from epo_jax.envs import EnvPool, EpisodeSpec, Replay
from epo_jax.models.sampler import Sampler, SamplingParams
from epo_jax.rollout import branching as branching_lib
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


@dataclasses.dataclass
class _Trajectory:
    """What one slot's running episode has seen and done."""
    observation: str
    info: dict[str, Any]
    history: list[prompts_lib.Turn] = dataclasses.field(default_factory=list)
    samples: list[TurnSample] = dataclasses.field(default_factory=list)
    actions: list[str] = dataclasses.field(default_factory=list)
    # (observation, score) after the reset and after each action: what a replay must reproduce.
    trace: list[tuple[str, float]] = dataclasses.field(default_factory=list)

    @classmethod
    def start(cls, observation: str, info: dict[str, Any]) -> _Trajectory:
        return cls(observation, dict(info), trace=[(observation, _score(info))])

    def fork(self, traj_id: int) -> _Trajectory:
        """A copy for a branch: the shared turns become the branch's own samples too."""
        return _Trajectory(self.observation, dict(self.info), list(self.history),
                           [dataclasses.replace(s, traj_id=traj_id) for s in self.samples],
                           list(self.actions), list(self.trace))


def _score(info: dict[str, Any]) -> float:
    return float(info.get("score", 0.0) or 0.0)


def _vocab_size(tokenizer) -> int:
    try:
        return int(len(tokenizer))
    except TypeError:
        return int(tokenizer.vocab_size)


_BRANCH_STREAM = 0x7FFFFFFF  # fold_in data of the branching draws (turn numbers stay far below)


def _numpy_rng(rng: jax.Array) -> np.random.Generator:
    """A numpy generator drawn from `rng` on a stream the per-turn sampling keys never use."""
    bits = jax.random.bits(jax.random.fold_in(rng, _BRANCH_STREAM), (4,), jnp.uint32)
    return np.random.default_rng(np.asarray(bits).tolist())


def run_episodes(pool: EnvPool, generate: GenerateFn, tokenizer, specs: Sequence[EpisodeSpec],
                 rng: jax.Array, *, config) -> Rollout:
    """Plays the episodes of `pool` (group g plays specs[g]) to their end.

    Without branching, every environment plays one episode from the start. With
    `config.rollout.branching` (and groups of two or more), each group's slots are spent as
    AEPO's entropy-balanced rollout decides (epo_jax/rollout/branching.py): some start from the
    beginning, the others fork a running episode after one of its turns. A fork is a fresh
    environment of the same task and variation that replays the parent's actions (checked
    against the parent's observations and scores; an engine that does not reproduce them raises
    ReplayError) and then samples its own next reply to the same prompt. Its episode is a whole
    trajectory: the parent's turns up to the fork are copied into it as its own turn samples
    (same tokens, log-probabilities and turn indices, the branch's trajectory id and, at the
    end, the branch's episode reward), as AEPO trains each rollout on its full sequence with
    the shared prefix included. Branches keep the parent's group id. Episodes are numbered
    (traj_id) in slot order over the slots that played; Episode.parent / branch_turn record
    the tree.
    """
    env_cfg = config.env
    max_prompt_len = int(config.rollout.max_prompt_len)
    if len(specs) != pool.num_groups:
        raise ValueError(f"run_episodes: {len(specs)} episode specs for a pool of {pool.num_groups} groups")
    t_start = time.perf_counter()
    num_envs = pool.num_envs
    group_ids = pool.group_ids
    stats = {"time/generate_s": 0.0, "time/env_s": 0.0, "rollout/new_tokens": 0.0,
             "rollout/prompt_tokens": 0.0, "rollout/truncated_prompts": 0.0}
    episodes: list[Episode | None] = [None] * num_envs
    trajectories: list[_Trajectory | None] = [None] * num_envs

    def new_episode(i: int) -> Episode:
        spec = specs[group_ids[i]]
        return Episode(traj_id=i, group_id=int(group_ids[i]), task=spec.task,
                       variation=int(spec.variation))

    brancher = None
    if branching_lib.enabled(config) and pool.group_size > 1:
        params = branching_lib.BranchingParams.from_config(config.rollout)
        brancher = branching_lib.EntropyBalancedBrancher(pool.num_groups, pool.group_size, params,
                                                         _numpy_rng(rng))
        vocab_size = _vocab_size(tokenizer)
        stats.update({"rollout/branches": 0.0, "rollout/fresh_rollouts": 0.0,
                      "rollout/replayed_steps": 0.0, "time/replay_s": 0.0})
        pool.stop(range(num_envs))
        starts = brancher.start()
        t0 = time.perf_counter()
        resets = pool.replay({i: Replay(specs[group_ids[i]]) for i in starts})
        stats["time/replay_s"] += time.perf_counter() - t0
        for i in starts:
            trajectories[i] = _Trajectory.start(*resets[i])
            episodes[i] = new_episode(i)
    else:
        for i, reset in enumerate(pool.reset(list(specs))):
            trajectories[i] = _Trajectory.start(*reset)
            episodes[i] = new_episode(i)

    turn = 0
    while pool.active.any():
        active = [int(i) for i in np.flatnonzero(pool.active)]
        prompt_ids = []
        for i in active:
            state = trajectories[i]
            ids = prompts_lib.encode_prompt(
                tokenizer, config.env.name, state.info, state.observation, state.history,
                history_length=env_cfg.history_length, show_actions=env_cfg.show_actions)
            if len(ids) > max_prompt_len:  # keep the end: the observation and the reply cue
                ids = ids[-max_prompt_len:]
                stats["rollout/truncated_prompts"] += 1
            prompt_ids.append(np.asarray(ids, np.int32))
        t0 = time.perf_counter()
        generations = generate(prompt_ids, jax.random.fold_in(rng, turn))
        stats["time/generate_s"] += time.perf_counter() - t0
        actions = {}
        for i, ids, gen in zip(active, prompt_ids, generations):
            state = trajectories[i]
            parsed = parse_action(gen.text)
            actions[i] = parsed.action
            stats["rollout/new_tokens"] += len(gen.ids)
            stats["rollout/prompt_tokens"] += len(ids)
            state.samples.append(TurnSample(
                prompt_ids=ids, response_ids=np.asarray(gen.ids, np.int32),
                response_logprobs=np.asarray(gen.logprobs, np.float32),
                response_entropy=np.asarray(gen.entropy, np.float32), traj_id=i,
                group_id=int(group_ids[i]), turn_index=len(state.samples),
                anchor_id=anchor_id(state.observation), valid_format=parsed.valid,
                penalty=0.0 if parsed.valid else float(env_cfg.invalid_action_penalty)))
            if brancher is not None:
                brancher.observe(i, branching_lib.turn_entropy(
                    gen.entropy, brancher.params.entropy_tokens, vocab_size))
        t0 = time.perf_counter()
        results = pool.step(actions)
        stats["time/env_s"] += time.perf_counter() - t0
        for i, result in results.items():
            episode, state = episodes[i], trajectories[i]
            episode.num_turns += 1
            episode.invalid_turns += int(not state.samples[-1].valid_format)
            state.history.append(prompts_lib.Turn(state.observation, actions[i]))
            state.actions.append(actions[i])
            state.observation = result.observation
            state.info = {**state.info, **result.info}
            state.trace.append((result.observation, _score(result.info)))
            episode.reward += float(result.reward)
            if result.done or result.truncated:
                episode.won = bool(result.info.get("won", False))
                episode.score = float(result.info.get("score", 0.0) or 0.0)
                episode.truncated = bool(result.truncated)
                episode.crashed = bool(result.crashed)
        if brancher is not None:
            plan = brancher.after_turn(np.flatnonzero(pool.active))
            if plan.starts or plan.forks:
                requests = {i: Replay(specs[group_ids[i]]) for i in plan.starts}
                for parent, child in plan.forks:
                    source = trajectories[parent]
                    requests[child] = Replay(specs[group_ids[parent]], tuple(source.actions),
                                             tuple(source.trace))
                t0 = time.perf_counter()
                started = pool.replay(requests)
                stats["time/replay_s"] += time.perf_counter() - t0
                for i in plan.starts:
                    trajectories[i] = _Trajectory.start(*started[i])
                    episodes[i] = new_episode(i)
                for parent, child in plan.forks:
                    # The branch shows the parent's own texts: its next prompt is the parent's.
                    trajectories[child] = trajectories[parent].fork(child)
                    episodes[child] = dataclasses.replace(
                        episodes[parent], traj_id=child, parent=parent,
                        branch_turn=episodes[parent].num_turns)
                    stats["rollout/replayed_steps"] += len(trajectories[parent].actions)
        turn += 1

    # Number the episodes that were played in slot order; samples and parents follow.
    played = [i for i in range(num_envs) if episodes[i] is not None]
    new_id = {slot: k for k, slot in enumerate(played)}
    samples, out_episodes = [], []
    for slot in played:
        episode, state = episodes[slot], trajectories[slot]
        episode.traj_id = new_id[slot]
        if episode.parent >= 0:
            episode.parent = new_id[episode.parent]
        for sample in state.samples:
            sample.traj_id = episode.traj_id
            sample.episode_reward = episode.reward
        if state.samples:
            state.samples[-1].last_turn = True
        samples.extend(state.samples)
        out_episodes.append(episode)
    elapsed = time.perf_counter() - t_start
    stats["rollout/turns"] = float(turn)
    if brancher is not None:
        stats["rollout/branches"] = float(brancher.num_forks)
        stats["rollout/fresh_rollouts"] = float(brancher.num_starts)
        if brancher.params.premonitor:  # means over the groups (every group ends its monitoring)
            for key, values in (("h_root", brancher.h_root), ("h_tool", brancher.h_tool),
                                ("initial_rollouts", brancher.initial_rollouts)):
                stats[f"branching/{key}"] = float(np.mean(values))
    stats["throughput/rollout_tokens_per_s"] = stats["rollout/new_tokens"] / max(stats["time/generate_s"], 1e-9)
    stats["time/rollout_wall_s"] = elapsed
    return Rollout(samples=samples, episodes=out_episodes, stats=stats)


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
