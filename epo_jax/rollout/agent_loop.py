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
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from epo_jax.envs import EnvPool, EpisodeSpec, Replay, StepResult
from epo_jax.models.loading import cast_for_compute
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


def prompt_token_ids(tokenizer, config, info: Mapping[str, Any], observation: str,
                     history: Sequence[prompts_lib.Turn]) -> tuple[np.ndarray, bool]:
    """The prompt token ids of a turn (the environment's info and observation, the episode's
    history so far) exactly as the rollout feeds them to the sampler, and whether they were cut
    to their last `rollout.max_prompt_len` tokens (the observation and the reply cue are at the
    end). Anything trained on the rollout's prompts (a supervised start) renders them here."""
    env_cfg = config.env
    ids = prompts_lib.encode_prompt(tokenizer, env_cfg.name, info, observation, history,
                                    history_length=env_cfg.history_length, show_actions=env_cfg.show_actions)
    max_prompt_len = int(config.rollout.max_prompt_len)
    truncated = len(ids) > max_prompt_len
    return np.asarray(ids[-max_prompt_len:] if truncated else ids, np.int32), truncated


class _RolloutInProgress:
    """One rollout's episodes while they play: slot i of the pool holds trajectory i.

    Trajectory and group ids are fixed when an episode starts: `traj_id_offset + slot` and
    `group_id_offset + group`, unique across the processes of a run when each passes its own
    offsets; every turn sample of an episode carries them unchanged.
    """

    def __init__(self, pool: EnvPool, tokenizer, specs: Sequence[EpisodeSpec], config, *,
                 traj_id_offset: int, group_id_offset: int):
        self.pool, self.tokenizer, self.specs, self.config = pool, tokenizer, specs, config
        self.traj_id_offset, self.group_id_offset = traj_id_offset, group_id_offset
        self.episodes: list[Episode | None] = [None] * pool.num_envs
        self.trajectories: list[_Trajectory | None] = [None] * pool.num_envs
        self.stats = {"time/generate_s": 0.0, "time/env_s": 0.0, "rollout/new_tokens": 0.0,
                      "rollout/prompt_tokens": 0.0, "rollout/truncated_prompts": 0.0}

    def timed(self, key: str, fn: Callable, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.stats[key] += time.perf_counter() - t0
        return out

    def _group(self, slot: int) -> int:
        return int(self.pool.group_ids[slot])

    def begin(self, slot: int, reset: tuple[str, dict[str, Any]]) -> None:
        """Slot `slot` starts its group's episode from the environment's first observation."""
        spec = self.specs[self._group(slot)]
        self.trajectories[slot] = _Trajectory.start(*reset)
        self.episodes[slot] = Episode(traj_id=self.traj_id_offset + slot,
                                      group_id=self.group_id_offset + self._group(slot),
                                      task=spec.task, variation=int(spec.variation))

    def render_prompt(self, slot: int) -> np.ndarray:
        state = self.trajectories[slot]
        ids, truncated = prompt_token_ids(self.tokenizer, self.config, state.info, state.observation,
                                          state.history)
        self.stats["rollout/truncated_prompts"] += float(truncated)
        return ids

    def record_turn(self, slot: int, prompt_ids: np.ndarray, generation: Generation) -> str:
        """Keeps the turn as a TurnSample (token in, token out); returns the parsed action."""
        state, episode = self.trajectories[slot], self.episodes[slot]
        parsed = parse_action(generation.text)
        self.stats["rollout/new_tokens"] += len(generation.ids)
        self.stats["rollout/prompt_tokens"] += len(prompt_ids)
        state.samples.append(TurnSample(
            prompt_ids=prompt_ids, response_ids=np.asarray(generation.ids, np.int32),
            response_logprobs=np.asarray(generation.logprobs, np.float32),
            response_entropy=np.asarray(generation.entropy, np.float32), traj_id=episode.traj_id,
            group_id=episode.group_id, turn_index=len(state.samples),
            anchor_id=anchor_id(state.observation), valid_format=parsed.valid,
            penalty=0.0 if parsed.valid else float(self.config.env.invalid_action_penalty)))
        return parsed.action

    def apply_step(self, slot: int, action: str, result: StepResult) -> None:
        """The environment's answer to the turn's action; the episode's outcome once it ends."""
        episode, state = self.episodes[slot], self.trajectories[slot]
        episode.num_turns += 1
        episode.invalid_turns += int(not state.samples[-1].valid_format)
        state.history.append(prompts_lib.Turn(state.observation, action))
        state.actions.append(action)
        state.observation = result.observation
        state.info = {**state.info, **result.info}
        state.trace.append((result.observation, _score(result.info)))
        episode.reward += float(result.reward)
        if result.done or result.truncated:
            episode.won = bool(result.info.get("won", False))
            episode.score = _score(result.info)
            episode.truncated = bool(result.truncated)
            episode.crashed = bool(result.crashed)

    def apply_plan(self, plan: branching_lib.Plan) -> None:
        """Starts a branching plan's fresh rollouts and forks (docs of `run_episodes`)."""
        if not (plan.starts or plan.forks):
            return
        requests = {i: Replay(self.specs[self._group(i)]) for i in plan.starts}
        for parent, child in plan.forks:
            source = self.trajectories[parent]
            requests[child] = Replay(self.specs[self._group(parent)], tuple(source.actions),
                                     tuple(source.trace))
        started = self.timed("time/replay_s", self.pool.replay, requests)
        for i in plan.starts:
            self.begin(i, started[i])
        for parent, child in plan.forks:
            # The branch shows the parent's own texts: its next prompt is the parent's.
            child_id = self.traj_id_offset + child
            self.trajectories[child] = self.trajectories[parent].fork(child_id)
            self.episodes[child] = dataclasses.replace(
                self.episodes[parent], traj_id=child_id, parent=self.episodes[parent].traj_id,
                branch_turn=self.episodes[parent].num_turns)
            self.stats["rollout/replayed_steps"] += len(self.trajectories[parent].actions)

    def finish(self) -> tuple[list[TurnSample], list[Episode]]:
        """The played episodes in slot order, each with its turn samples; every sample carries
        its episode's reward, and the last turn is marked."""
        samples, episodes = [], []
        for episode, state in zip(self.episodes, self.trajectories):
            if episode is None:
                continue
            for sample in state.samples:
                sample.episode_reward = episode.reward
            if state.samples:
                state.samples[-1].last_turn = True
            samples.extend(state.samples)
            episodes.append(episode)
        return samples, episodes


def _start_brancher(rollout: _RolloutInProgress, rng: jax.Array
                    ) -> branching_lib.EntropyBalancedBrancher | None:
    """Begins the episodes: every slot from the start, or AEPO's first rollouts of each group
    (the brancher then decides the others turn by turn)."""
    pool, config = rollout.pool, rollout.config
    if not (branching_lib.enabled(config) and pool.group_size > 1):
        for i, reset in enumerate(pool.reset(list(rollout.specs))):
            rollout.begin(i, reset)
        return None
    params = branching_lib.BranchingParams.from_config(config.rollout)
    brancher = branching_lib.EntropyBalancedBrancher(pool.num_groups, pool.group_size, params,
                                                     _numpy_rng(rng))
    rollout.stats.update({"rollout/branches": 0.0, "rollout/fresh_rollouts": 0.0,
                          "rollout/replayed_steps": 0.0, "time/replay_s": 0.0})
    pool.stop(range(pool.num_envs))
    starts = brancher.start()
    resets = rollout.timed("time/replay_s", pool.replay,
                           {i: Replay(rollout.specs[rollout._group(i)]) for i in starts})
    for i in starts:
        rollout.begin(i, resets[i])
    return brancher


def _branching_stats(brancher: branching_lib.EntropyBalancedBrancher) -> dict[str, float]:
    stats = {"rollout/branches": float(brancher.num_forks),
             "rollout/fresh_rollouts": float(brancher.num_starts)}
    if brancher.params.premonitor:  # means over the groups (every group ends its monitoring)
        for key, values in (("h_root", brancher.h_root), ("h_tool", brancher.h_tool),
                            ("initial_rollouts", brancher.initial_rollouts)):
            stats[f"branching/{key}"] = float(np.mean(values))
    return stats


# on_turn(turn, active environments, rollout statistics so far): called after each turn.
TurnCallback = Callable[[int, int, Mapping[str, float]], None]


def run_episodes(pool: EnvPool, generate: GenerateFn, tokenizer, specs: Sequence[EpisodeSpec],
                 rng: jax.Array, *, config, traj_id_offset: int = 0, group_id_offset: int = 0,
                 on_turn: TurnCallback | None = None) -> Rollout:
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
    the shared prefix included. Branches keep the parent's group id. Slot i's episode has
    trajectory id traj_id_offset + i (ids of unused slots are skipped); Episode.parent /
    branch_turn record the tree. Episodes and samples come in slot order.
    """
    if len(specs) != pool.num_groups:
        raise ValueError(f"run_episodes: {len(specs)} episode specs for a pool of {pool.num_groups} groups")
    t_start = time.perf_counter()
    rollout = _RolloutInProgress(pool, tokenizer, specs, config, traj_id_offset=traj_id_offset,
                                 group_id_offset=group_id_offset)
    brancher = _start_brancher(rollout, rng)
    vocab_size = _vocab_size(tokenizer)
    turn = 0
    while pool.active.any():
        active = [int(i) for i in np.flatnonzero(pool.active)]
        prompt_ids = [rollout.render_prompt(i) for i in active]
        generations = rollout.timed("time/generate_s", generate, prompt_ids, jax.random.fold_in(rng, turn))
        actions = {}
        for i, ids, generation in zip(active, prompt_ids, generations):
            actions[i] = rollout.record_turn(i, ids, generation)
            if brancher is not None:
                brancher.observe(i, branching_lib.turn_entropy(
                    generation.entropy, brancher.params.entropy_tokens, vocab_size))
        results = rollout.timed("time/env_s", pool.step, actions)
        for i, result in results.items():
            rollout.apply_step(i, actions[i], result)
        if brancher is not None:
            rollout.apply_plan(brancher.after_turn(np.flatnonzero(pool.active)))
        turn += 1
        if on_turn is not None:
            on_turn(turn, len(active), rollout.stats)
    samples, episodes = rollout.finish()
    stats = dict(rollout.stats, **{"rollout/turns": float(turn)})
    if brancher is not None:
        stats.update(_branching_stats(brancher))
    stats["throughput/rollout_tokens_per_s"] = stats["rollout/new_tokens"] / max(stats["time/generate_s"], 1e-9)
    stats["time/rollout_wall_s"] = time.perf_counter() - t_start
    return Rollout(samples=samples, episodes=episodes, stats=stats)


def make_sampler(config, graphdef, model_config, tokenizer, mesh=None) -> Sampler:
    """The rollout's sampler for a run config (also what `epo_jax.plan` lowers)."""
    return Sampler(graphdef, model_config, tokenizer, stop_strings=tuple(config.rollout.stop_strings),
                   prompt_buckets=tuple(config.rollout.prompt_buckets), mesh=mesh)


def sampling_params(config, temperature: float) -> SamplingParams:
    """How the rollout samples at `temperature` (0 = greedy)."""
    return SamplingParams(
        temperature=temperature if temperature > 0 else 1.0, greedy=temperature == 0,
        top_p=float(config.rollout.top_p), top_k=int(config.rollout.top_k),
        max_new_tokens=int(config.rollout.max_response_len))


def make_generate_fn(config, graphdef, model_config, tokenizer, mesh=None,
                     announce: Callable[[str], None] | None = None):
    """generate(params, prompt_ids, rng, *, temperature) -> [Generation] with our sampler
    (one compiled program per prompt-length and batch bucket; params are an argument), computing
    as `graphdef` / `model_config` say (the trainer's model, or `loading.with_compute_dtype`'s for
    rollout.dtype): params stored wider than that dtype are cast to it first.

    `announce(message)`, if given, hears when a call needs programs of a new shape (they compile
    during that call, which is the slow part of a first rollout) and how long that call took."""
    sampler = make_sampler(config, graphdef, model_config, tokenizer, mesh)
    compiled_for: set = set()

    def generate(params, prompt_ids: Sequence[np.ndarray], rng: jax.Array, *,
                 temperature: float) -> list[Generation]:
        sampling = sampling_params(config, temperature)
        rows, prompt_len = sampler.program_shape(len(prompt_ids), max(len(p) for p in prompt_ids))
        first = announce is not None and (rows, prompt_len, sampling) not in compiled_for
        if first:
            announce(f"compiling the sampler for {rows} rows x {prompt_len}-token prompts (first use of this shape)")
            t0 = time.perf_counter()
        out = sampler.generate(cast_for_compute(params, model_config), [list(map(int, p)) for p in prompt_ids],
                               rng, sampling)
        if first:
            compiled_for.add((rows, prompt_len, sampling))
            announce(f"compiled the sampler and generated its first batch in {time.perf_counter() - t0:.1f} s")
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
