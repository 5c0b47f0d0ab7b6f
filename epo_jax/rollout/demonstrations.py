"""Expert demonstrations from the environments themselves, rendered exactly as the RL rollout
renders its turns (the data of the supervised cold start, epo_jax/sft.py).

    env = envs.make("scienceworld", **options)            # the run's engine options
    recording = record(env, specs, tokenizer, config, max_episodes=48)

Experts: ScienceWorld's gold action sequence (`ScienceWorldEnv.gold_actions`, planned before the
episode starts); ALFWorld's planner (`AlfWorldEnv(expert_plan=True)`: the first command of
info["expert_plan"], which the engine replans after every step).

Each turn of an expert episode becomes a `Demonstration`: the prompt is
`agent_loop.prompt_token_ids` of the state (the same function the rollout feeds the sampler with,
from the same info merge and history), so a demonstration's prompt equals the rollout's prompt for
the same state token for token; the target is the reply in the trained format,

    <think>I should ACTION.</think>
    <action>ACTION</action><|im_end|>

tokenised on its own (the rollout's token-in, token-out convention: the sampler continues the
prompt's ids) and closed by the tokenizer's EOS. The rollout never needs that EOS (its sampler stops
at the stop string "</action>"); it is trained so that the policy also ends its chat turn where a
plain `generate` without stop strings would look for it. The expert's action is first put in the form
`parse_action` gives it (lower case, single spaces): the target names it so, the environment is
stepped with it, and the history records it, as in the rollout.

Only episodes the expert wins within `env.max_turns` are kept (an RL episode capped there could
not follow a longer one to its end), and only replies that fit `rollout.max_response_len` tokens
(the sampler could not write longer ones).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from epo_jax.envs import EpisodeSpec, TextEnv
from epo_jax.rollout import prompts as prompts_lib
from epo_jax.rollout.actions import parse_action
from epo_jax.rollout.agent_loop import prompt_token_ids

# Bumped whenever the reply format or the recording rules change (the cold start's cache key).
# 2: ScienceWorld's expert plays on constant JVM identity hashes (`sft.expert_env_options`).
FORMAT_VERSION = 2


def target_reply(action: str) -> str:
    """The trained reply for an expert action: a short <think> line, then the action."""
    return f"<think>I should {action}.</think>\n<action>{action}</action>"


def target_ids(tokenizer, action: str) -> np.ndarray:
    """The target token ids of an action's reply: its own tokens, then EOS."""
    ids = tokenizer.encode(target_reply(action), add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        ids = [*ids, int(tokenizer.eos_token_id)]
    return np.asarray(ids, np.int32)


@dataclasses.dataclass
class Demonstration:
    """One expert turn: the rollout's prompt for the state and the reply to learn."""

    prompt_ids: np.ndarray   # int32 [P], as agent_loop.prompt_token_ids renders it
    target_ids: np.ndarray   # int32 [R], target_reply(action) + EOS
    episode: int             # index of its episode in the recording
    turn_index: int          # 0-based turn within the episode


@dataclasses.dataclass
class ExpertEpisode:
    """What the expert did in one episode, kept or not."""

    spec: EpisodeSpec
    actions: list[str]
    won: bool
    score: float
    skipped: str = ""        # why the episode is not part of the recording ("" when kept)


@dataclasses.dataclass
class Recording:
    """The demonstrations of the kept episodes, and every episode the expert played."""

    demonstrations: list[Demonstration]
    episodes: list[ExpertEpisode]
    truncated_prompts: int = 0

    @property
    def kept(self) -> list[ExpertEpisode]:
        return [e for e in self.episodes if not e.skipped]


# expert(env, spec) -> (first observation, info, next_action(info) -> action text | None)
NextAction = Callable[[Mapping[str, Any]], "str | None"]
Expert = Callable[[TextEnv, EpisodeSpec], tuple[str, dict[str, Any], NextAction]]


def gold_path_expert(env: TextEnv, spec: EpisodeSpec) -> tuple[str, dict[str, Any], NextAction]:
    """ScienceWorld: the engine's gold action sequence, planned before the episode starts (the
    planning load ends any episode in play, so the reset comes after it)."""
    plan = iter(env.gold_actions(spec.task, spec.variation))
    observation, info = env.reset(spec.task, spec.variation)
    return observation, info, lambda info: next(plan, None)


def planner_expert(env: TextEnv, spec: EpisodeSpec) -> tuple[str, dict[str, Any], NextAction]:
    """ALFWorld: the first command of the planner's plan from the current state."""
    observation, info = env.reset(spec.task, spec.variation)
    if "expert_plan" not in info:
        raise ValueError("ALFWorld demonstrations need the planner: make the environment with "
                         "expert_plan=True")
    return observation, info, lambda info: next(iter(info.get("expert_plan") or ()), None)


EXPERTS: dict[str, Expert] = {"scienceworld": gold_path_expert, "alfworld": planner_expert}


def expert_for(env_name: str) -> Expert:
    if env_name not in EXPERTS:
        raise ValueError(f"env.name={env_name!r} has no expert to demonstrate with; the cold start "
                         f"supports {sorted(EXPERTS)}")
    return EXPERTS[env_name]


def play_expert_episode(env: TextEnv, spec: EpisodeSpec, tokenizer, config, expert: Expert,
                        episode_index: int) -> tuple[ExpertEpisode, list[Demonstration], int]:
    """Plays one episode with the expert for at most `env.max_turns` turns; returns the episode,
    its turns as demonstrations and how many of their prompts were cut to rollout.max_prompt_len."""
    observation, info, next_action = expert(env, spec)
    history: list[prompts_lib.Turn] = []
    turns: list[Demonstration] = []
    episode = ExpertEpisode(spec, [], won=False, score=0.0)
    truncated_prompts = 0
    for turn in range(int(config.env.max_turns)):
        expert_action = next_action(info)
        if expert_action is None:
            break
        # The action as the rollout would send it for this reply (lower case, single spaces): the
        # target names it so, the environment gets it, the history records it.
        action = parse_action(target_reply(expert_action)).action
        prompt_ids, truncated = prompt_token_ids(tokenizer, config, info, observation, history)
        truncated_prompts += int(truncated)
        target = target_ids(tokenizer, action)
        if len(target) > int(config.rollout.max_response_len):
            episode.skipped = (f"the reply for {action!r} takes {len(target)} tokens, more than "
                               f"rollout.max_response_len={config.rollout.max_response_len}")
            return episode, [], truncated_prompts
        turns.append(Demonstration(prompt_ids, target, episode_index, turn))
        episode.actions.append(action)
        next_observation, _, done, step_info = env.step(action)
        history.append(prompts_lib.Turn(observation, action))
        observation, info = next_observation, {**info, **step_info}
        episode.score = float(step_info.get("score", 0.0) or 0.0)
        if done:
            episode.won = bool(step_info.get("won", False))
            break
    if not episode.won:
        episode.skipped = f"the expert did not win within env.max_turns={config.env.max_turns} turns"
        return episode, [], truncated_prompts
    return episode, turns, truncated_prompts


def record(env: TextEnv, specs: Sequence[EpisodeSpec], tokenizer, config, *, max_episodes: int,
           on_episode: Callable[[ExpertEpisode], None] | None = None) -> Recording:
    """Plays the expert on `specs` in order until `max_episodes` episodes are kept (or the specs
    run out); each kept episode's turns become demonstrations."""
    expert = expert_for(config.env.name)
    recording = Recording([], [])
    for spec in specs:
        if len(recording.kept) >= max_episodes:
            break
        episode, turns, truncated = play_expert_episode(env, spec, tokenizer, config, expert,
                                                        len(recording.episodes))
        recording.episodes.append(episode)
        recording.demonstrations.extend(turns)
        recording.truncated_prompts += truncated
        if on_episode is not None:
            on_episode(episode)
    return recording


def save(recording: Recording, path: str) -> None:
    """Writes a recording's demonstrations as one .npz (ragged ids concatenated with offsets)."""
    demos = recording.demonstrations

    def packed(arrays):
        lengths = np.asarray([len(a) for a in arrays], np.int64)
        flat = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
        return flat, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    prompts, prompt_offsets = packed([d.prompt_ids for d in demos])
    targets, target_offsets = packed([d.target_ids for d in demos])
    np.savez(path, prompts=prompts, prompt_offsets=prompt_offsets, targets=targets,
             target_offsets=target_offsets, episode=np.asarray([d.episode for d in demos], np.int32),
             turn_index=np.asarray([d.turn_index for d in demos], np.int32))


def load(path: str) -> list[Demonstration]:
    """The demonstrations `save` wrote."""
    with np.load(path) as data:
        p, po, t, to = data["prompts"], data["prompt_offsets"], data["targets"], data["target_offsets"]
        return [Demonstration(p[po[i]:po[i + 1]], t[to[i]:to[i + 1]], int(e), int(k))
                for i, (e, k) in enumerate(zip(data["episode"], data["turn_index"]))]
