"""The multi-turn agent loop over an EnvPool, with one of two engines (`rollout.engine`):

    rollout = run_episodes(pool, policy, tokenizer, specs, rng, config=config)

A turn renders the prompt of an environment (task, recent history, observation, admissible
actions) through the model's chat template, generates the reply, parses its <action> and steps
the environment with it. Each turn becomes a `TurnSample` holding the exact prompt and response
token ids and the sampler's log-probabilities.

  turns       every turn, one batched sampler call for all active environments, then one
              parallel step of all of them: the turn ends when its longest reply does.
  continuous  slots without a turn barrier (epo_jax/rollout/continuous.py): a reply goes to its
              environment as soon as it ends and the environment's next prompt takes a free
              decode slot, while the other slots keep decoding.

Both engines play the same episodes: reply `turn` of the episode with trajectory id `traj`
samples from `reply_key(rng, traj, turn)` = fold_in(fold_in(rng, traj), turn), whichever
batch, slot or moment it is generated in, so the samples do not depend on the engine, the
number of slots or the order in which the environments answer.

When an episode ends, its reward (the last reward the engine gave: success_reward x won with
the sparse reward, the summed score deltas with the dense one) is set on every one of its turns;
each turn also keeps its own format penalty. Episodes whose engine crashed are marked and left
out of training and of success rates by the trainer.

With `rollout.branching`, groups spend their environments as AEPO's entropy-balanced rollout
decides: rollouts from the start plus branches that fork running episodes (see run_episodes and
epo_jax/rollout/branching.py). Each group has its own brancher and random stream, and decides
after each of its turns: the turn engine's after every turn, the continuous engine's when every
running member of the group has played the turn (the group's members keep step with each other,
the groups do not), so both engines grow the same trees.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from epo_jax.envs import EnvPool, EpisodeSpec, Replay, StepResult
from epo_jax.models.continuous import SlotEngine
from epo_jax.models.loading import cast_for_compute
from epo_jax.models.sampler import SampleOutput, Sampler, SamplingParams
from epo_jax.rollout import branching as branching_lib
from epo_jax.rollout import continuous as continuous_lib
from epo_jax.rollout import prompts as prompts_lib
from epo_jax.rollout.actions import parse_action
from epo_jax.rollout.samples import Episode, TurnSample

ENGINES = ("turns", "continuous")  # allowed values of rollout.engine


@dataclasses.dataclass
class Generation:
    """One reply of the sampler."""
    ids: np.ndarray        # int32 [R]
    logprobs: np.ndarray   # float32 [R]
    entropy: np.ndarray    # float32 [R]
    text: str


# generate(prompt_ids, keys) -> one Generation per prompt; keys[i] is prompt i's reply key
GenerateFn = Callable[[Sequence[np.ndarray], jax.Array], list[Generation]]


def reply_key(rng: jax.Array, traj_id: int, turn_index: int) -> jax.Array:
    """The key of reply `turn_index` of episode `traj_id`: what both engines sample it from."""
    return jax.random.fold_in(jax.random.fold_in(rng, traj_id), turn_index)


@jax.jit
def _reply_keys(rng: jax.Array, traj_ids: jax.Array, turn_indices: jax.Array) -> jax.Array:
    return jax.vmap(reply_key, in_axes=(None, 0, 0))(rng, traj_ids, turn_indices)


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

    def __init__(self, pool: EnvPool, tokenizer, specs: Sequence[EpisodeSpec], rng: jax.Array, config, *,
                 traj_id_offset: int, group_id_offset: int):
        self.pool, self.tokenizer, self.specs, self.rng, self.config = pool, tokenizer, specs, rng, config
        self.traj_id_offset, self.group_id_offset = traj_id_offset, group_id_offset
        self.episodes: list[Episode | None] = [None] * pool.num_envs
        self.trajectories: list[_Trajectory | None] = [None] * pool.num_envs
        self.stats = {"time/generate_s": 0.0, "time/env_s": 0.0, "rollout/new_tokens": 0.0,
                      "rollout/prompt_tokens": 0.0, "rollout/truncated_prompts": 0.0,
                      "rollout/decode_row_steps": 0.0, "rollout/active_row_steps": 0.0}

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

    def reply_keys(self, slots: Sequence[int]) -> jax.Array:
        """The keys of the slots' next replies (reply_key of each episode's id and next turn)."""
        traj_ids = [self.episodes[i].traj_id for i in slots]
        turns = [len(self.trajectories[i].samples) for i in slots]
        return _reply_keys(self.rng, jnp.asarray(traj_ids, jnp.int32), jnp.asarray(turns, jnp.int32))

    def count_decode(self, row_steps: int, active_row_steps: int) -> None:
        """Decode steps x rows computed, and how many of them sampled a token of a running reply."""
        self.stats["rollout/decode_row_steps"] += row_steps
        self.stats["rollout/active_row_steps"] += active_row_steps

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

    def running(self, slots: Sequence[int] | None = None) -> list[int]:
        """The slots (of `slots`, default all) whose episodes go on, ascending."""
        active = self.pool.active
        return [int(i) for i in (np.flatnonzero(active) if slots is None else slots) if active[i]]

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


class GroupBranchers:
    """AEPO's brancher for each group, each drawing from its own stream (seeded by the rollout key
    and the group id), so a group's starts and forks depend on its own turns alone, whichever
    engine plays them and in whatever order the groups' turns end. Slots are the pool's."""

    def __init__(self, pool: EnvPool, params: branching_lib.BranchingParams, rng: jax.Array,
                 group_id_offset: int, vocab_size: int):
        self.group_size, self.params, self.vocab_size = pool.group_size, params, vocab_size
        self.groups = [branching_lib.EntropyBalancedBrancher(
            1, pool.group_size, params, _numpy_rng(jax.random.fold_in(rng, group_id_offset + g)))
            for g in range(pool.num_groups)]

    def start(self) -> list[int]:
        """The slots that start from the root before the first turn."""
        return [g * self.group_size + s for g, brancher in enumerate(self.groups) for s in brancher.start()]

    def observe(self, slot: int, generation: Generation) -> None:
        """Records the turn entropy of the reply slot `slot` just generated."""
        entropy = branching_lib.turn_entropy(generation.entropy, self.params.entropy_tokens, self.vocab_size)
        self.groups[slot // self.group_size].observe(slot % self.group_size, entropy)

    def after_turn(self, group: int, active: Sequence[int]) -> branching_lib.Plan:
        """Group `group`'s starts and forks after its turn; `active`: the pool's running slots."""
        base = group * self.group_size
        local = [i - base for i in active if base <= i < base + self.group_size]
        plan = self.groups[group].after_turn(local)
        return branching_lib.Plan(starts=[base + i for i in plan.starts],
                                  forks=[branching_lib.Fork(base + f.parent, base + f.child) for f in plan.forks])

    def stats(self) -> dict[str, float]:
        stats = {"rollout/branches": float(sum(b.num_forks for b in self.groups)),
                 "rollout/fresh_rollouts": float(sum(b.num_starts for b in self.groups))}
        if self.params.premonitor:  # means over the groups (every group ends its monitoring)
            for key in ("h_root", "h_tool", "initial_rollouts"):
                stats[f"branching/{key}"] = float(np.mean([getattr(b, key)[0] for b in self.groups]))
        return stats


def _start_branchers(rollout: _RolloutInProgress) -> GroupBranchers | None:
    """Begins the episodes: every slot from the start, or AEPO's first rollouts of each group
    (the branchers then decide the others turn by turn)."""
    pool, config = rollout.pool, rollout.config
    if not (branching_lib.enabled(config) and pool.group_size > 1):
        for i, reset in enumerate(pool.reset(list(rollout.specs))):
            rollout.begin(i, reset)
        return None
    branchers = GroupBranchers(pool, branching_lib.BranchingParams.from_config(config.rollout), rollout.rng,
                               rollout.group_id_offset, _vocab_size(rollout.tokenizer))
    rollout.stats.update({"rollout/branches": 0.0, "rollout/fresh_rollouts": 0.0,
                          "rollout/replayed_steps": 0.0, "time/replay_s": 0.0})
    pool.stop(range(pool.num_envs))
    starts = branchers.start()
    resets = rollout.timed("time/replay_s", pool.replay,
                           {i: Replay(rollout.specs[rollout._group(i)]) for i in starts})
    for i in starts:
        rollout.begin(i, resets[i])
    return branchers


# on_turn(turn, active environments, rollout statistics so far): called after each turn.
TurnCallback = Callable[[int, int, Mapping[str, float]], None]


def run_episodes(pool: EnvPool, generate: GenerateFn | Policy, tokenizer, specs: Sequence[EpisodeSpec],
                 rng: jax.Array, *, config, traj_id_offset: int = 0, group_id_offset: int = 0,
                 on_turn: TurnCallback | None = None) -> Rollout:
    """Plays the episodes of `pool` (group g plays specs[g]) to their end.

    `generate` is the model's Policy (make_policy), which both engines use; the turn engine also
    takes any GenerateFn. `config.rollout.engine` picks the engine (`num_slots`, `chunk_len`:
    the continuous engine's slots and decode-chunk length); reply t of the episode with
    trajectory id i samples from reply_key(rng, i, t) in both.

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
    engine = config.rollout.engine
    if engine not in ENGINES:
        raise ValueError(f"rollout.engine={engine!r} is not one of {ENGINES}.")
    if engine == "continuous" and not isinstance(generate, Policy):
        raise TypeError("rollout.engine='continuous' decodes in slots and needs the model's Policy "
                        f"(agent_loop.make_policy), not a {type(generate).__name__}; use rollout.engine='turns'.")
    t_start = time.perf_counter()
    rollout = _RolloutInProgress(pool, tokenizer, specs, rng, config, traj_id_offset=traj_id_offset,
                                 group_id_offset=group_id_offset)
    branchers = _start_branchers(rollout)
    if engine == "continuous":
        slot_engine = generate.slot_engine(int(config.rollout.num_slots) or pool.num_envs,
                                           int(config.rollout.chunk_len))
        with generate.announced(("continuous", slot_engine.num_slots, slot_engine.chunk_len, generate.sampling),
                                f"the slot engine for {slot_engine.num_slots} slots x {slot_engine.chunk_len}-token "
                                "chunks", "played its first rollout"):
            turns = continuous_lib.play(rollout, slot_engine, generate.generations, branchers, on_turn)
    else:
        turns = _play_turns(rollout, generate, branchers, on_turn)
    samples, episodes = rollout.finish()
    stats = dict(rollout.stats, **{"rollout/turns": float(turns)})
    if branchers is not None:
        stats.update(branchers.stats())
    stats["throughput/rollout_tokens_per_s"] = stats["rollout/new_tokens"] / max(stats["time/generate_s"], 1e-9)
    stats["rollout/idle_row_fraction"] = idle_row_fraction(stats)
    stats["time/rollout_wall_s"] = time.perf_counter() - t_start
    return Rollout(samples=samples, episodes=episodes, stats=stats)


def idle_row_fraction(stats: Mapping[str, float]) -> float:
    """The share of the decode steps' rows that sampled no token of a running reply (rows whose
    reply had ended, free slots, batch padding)."""
    return 1.0 - stats["rollout/active_row_steps"] / max(stats["rollout/decode_row_steps"], 1.0)


def _play_turns(rollout: _RolloutInProgress, generate: GenerateFn, branchers: GroupBranchers | None,
                on_turn: TurnCallback | None) -> int:
    """The turn-batched engine: every turn, one sampler call for all running episodes, then one
    parallel step of their environments, then the groups' branching decisions. Returns the turns."""
    pool = rollout.pool
    turn = 0
    while pool.active.any():
        active = rollout.running()
        prompt_ids = [rollout.render_prompt(i) for i in active]
        generations = rollout.timed("time/generate_s", generate, prompt_ids, rollout.reply_keys(active))
        lengths = [len(g.ids) for g in generations]
        rows = generate.sampler.batch_rows(len(active)) if isinstance(generate, Policy) else len(active)
        # Token 0 comes from the prefill; each decode step then samples one token of every row.
        rollout.count_decode(rows * (max(lengths) - 1), sum(lengths) - len(lengths))
        actions = {}
        for i, ids, generation in zip(active, prompt_ids, generations):
            actions[i] = rollout.record_turn(i, ids, generation)
            if branchers is not None:
                branchers.observe(i, generation)
        results = rollout.timed("time/env_s", pool.step, actions)
        for i, result in results.items():
            rollout.apply_step(i, actions[i], result)
        if branchers is not None:
            running = rollout.running()
            plans = [branchers.after_turn(g, running) for g in range(pool.num_groups)]
            rollout.apply_plan(branching_lib.Plan(starts=[i for p in plans for i in p.starts],
                                                  forks=[f for p in plans for f in p.forks]))
        turn += 1
        if on_turn is not None:
            on_turn(turn, len(active), rollout.stats)
    return turn


@dataclasses.dataclass(frozen=True)
class Policy:
    """The model's sampler with a policy's params and sampling settings, as the engines use it:
    called like a GenerateFn by the turn engine, `slot_engine` for the continuous one."""

    sampler: Sampler
    params: Any
    sampling: SamplingParams
    tokenizer: Any
    # Hears when a call needs programs of a new shape (they compile during that call, the slow
    # part of a first rollout) and how long that call took; `compiled_for` is shared by every
    # Policy of one make_policy, as the compiled programs are.
    announce: Callable[[str], None] | None = None
    compiled_for: set = dataclasses.field(default_factory=set)

    def __call__(self, prompt_ids: Sequence[np.ndarray], keys: jax.Array) -> list[Generation]:
        rows, prompt_len = self.sampler.program_shape(len(prompt_ids), max(len(p) for p in prompt_ids))
        with self.announced(("turns", rows, prompt_len, self.sampling),
                            f"the sampler for {rows} rows x {prompt_len}-token prompts", "generated its first batch"):
            out = self.sampler.generate(self.params, [list(map(int, p)) for p in prompt_ids], keys, self.sampling)
        return self.generations(out)

    @contextlib.contextmanager
    def announced(self, shape: tuple, what: str, first_use: str):
        """Announces the programs of `shape` (`what`) around their first use (`first_use`)."""
        first = self.announce is not None and shape not in self.compiled_for
        if first:
            self.announce(f"compiling {what} (first use of this shape)")
        t_start = time.perf_counter()
        yield
        if first:
            self.compiled_for.add(shape)
            self.announce(f"compiled {what} and {first_use} in {time.perf_counter() - t_start:.1f} s")

    def generations(self, out: SampleOutput) -> list[Generation]:
        """One Generation per row of the sampler's output (the reply's text decoded)."""
        generations = []
        for row, length in enumerate(out.lengths):
            ids = out.tokens[row, :length]
            generations.append(Generation(ids=ids, logprobs=out.logprobs[row, :length],
                                          entropy=out.entropies[row, :length],
                                          text=self.tokenizer.decode(ids, skip_special_tokens=True)))
        return generations

    def slot_engine(self, num_slots: int, chunk_len: int) -> SlotEngine:
        return SlotEngine(self.sampler, self.params, self.sampling, num_slots=num_slots, chunk_len=chunk_len)


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


def make_policy(config, graphdef, model_config, tokenizer, mesh=None,
                announce: Callable[[str], None] | None = None) -> Callable[..., Policy]:
    """policy(params, *, temperature) -> Policy with our sampler (compiled programs are shared by
    every Policy: one per prompt-length and batch bucket, params are an argument); temperature 0
    decodes greedily. The sampler computes as `graphdef` / `model_config` say (the trainer's model,
    or `loading.with_compute_dtype`'s for rollout.dtype): params stored wider than that dtype are
    cast to it once per Policy. `announce(message)`, if given, hears of each program shape's first use."""
    sampler = make_sampler(config, graphdef, model_config, tokenizer, mesh)
    compiled_for: set = set()

    def policy(params, *, temperature: float) -> Policy:
        return Policy(sampler, cast_for_compute(params, model_config), sampling_params(config, temperature),
                      tokenizer, announce, compiled_for)

    return policy


def pad_id(tokenizer) -> int:
    """The id written into padding positions (always masked, so any valid id will do)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
