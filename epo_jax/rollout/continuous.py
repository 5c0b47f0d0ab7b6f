"""The continuous engine (`rollout.engine = "continuous"`): rollouts without a turn barrier, every
environment at its own pace.

A fixed number of decode slots (`SlotEngine`, epo_jax/models/continuous.py) decode in jitted
chunks of `rollout.chunk_len` tokens. The loop:

  1. environments whose next prompt is due take the free slots: the prompt is rendered,
     prefilled and inserted between two chunks;
  2. one chunk runs over every slot; each reply that ended (EOS, a stop string or the length
     limit) becomes its episode's turn at once, and its action goes to the environment's worker
     thread (`EnvPool.step_async`) while the other slots keep decoding;
  3. the environments that have answered are applied; an episode that goes on queues for its
     next prompt. With nothing left to decode, the loop waits for the first answer.

Replies sample from reply_key(rng, episode, turn), prompts are prefilled alone and each slot's
cache row depends on its own prompt only, so an episode's replies are the same whatever the number
of slots, the chunk length or the order in which the environments answer (and the same as the
turn engine's, up to float rounding of a different batch shape).

AEPO's branching groups decide after each of their turns, as the turn engine does: a member
whose turn ended waits until every running member of its group has played the turn, then the
group's brancher plans its starts and forks and its running members queue together. Groups do
not wait for each other, and groups without branching do not wait at all.

Statistics, beside the turn engine's: time/generate_s is the time spent prefilling and decoding,
time/env_s the time spent waiting for environments with nothing to decode (their steps otherwise
run beside the decoding), rollout/turns the turns of the longest episode.
"""
from __future__ import annotations

import collections
from typing import Callable, Sequence

import numpy as np

from epo_jax.models.continuous import SlotEngine
from epo_jax.models.sampler import SampleOutput


def _admit(rollout, engine: SlotEngine, queue: collections.deque, decoding: dict[int, tuple[int, np.ndarray]]) -> None:
    """Queued environments take free slots: their prompts are rendered and inserted."""
    admitted = []
    for slot in engine.free_slots:
        if not queue:
            break
        admitted.append((slot, queue.popleft()))
    if not admitted:
        return
    prompts = [rollout.render_prompt(env) for _, env in admitted]
    keys = rollout.reply_keys([env for _, env in admitted])
    rollout.timed("time/generate_s", engine.insert,
                  [(slot, prompt, keys[i]) for i, ((slot, _), prompt) in enumerate(zip(admitted, prompts))])
    for (slot, env), prompt in zip(admitted, prompts):
        decoding[slot] = (env, prompt)


class _Flight:
    """Which environments are between a prompt and its step's answer, and what follows an answer."""

    def __init__(self, rollout, branchers):
        self.rollout, self.branchers = rollout, branchers
        self.queue: collections.deque[int] = collections.deque(rollout.running())
        self.decoding: dict[int, tuple[int, np.ndarray]] = {}  # decode slot -> (environment, prompt ids)
        self.stepping: dict[int, tuple[str, object]] = {}     # environment -> (action, PendingStep)

    def busy(self) -> bool:
        return bool(self.queue or self.decoding or self.stepping)

    def _in_flight(self, members: range) -> bool:
        decoding = {env for env, _ in self.decoding.values()}
        return any(m in self.stepping or m in decoding or m in self.queue for m in members)

    def answered(self, env: int) -> None:
        """After environment `env`'s step was applied: what queues next."""
        rollout = self.rollout
        if self.branchers is None:
            if rollout.pool.active[env]:
                self.queue.append(env)
            return
        size = rollout.pool.group_size
        group = env // size
        members = range(group * size, (group + 1) * size)
        if self._in_flight(members):
            return  # the group's turn goes on
        rollout.apply_plan(self.branchers.after_turn(group, rollout.running()))
        self.queue.extend(rollout.running(members))


def play(rollout, engine: SlotEngine, generations: Callable[[SampleOutput], Sequence], branchers,
         on_turn) -> int:
    """Plays `rollout`'s episodes to their end through `engine`; `generations` turns the engine's
    replies into Generations. Returns the turns of the longest episode."""
    pool = rollout.pool
    flight = _Flight(rollout, branchers)
    while flight.busy():
        _admit(rollout, engine, flight.queue, flight.decoding)
        if engine.busy:
            slots, out = rollout.timed("time/generate_s", engine.decode)
            for slot, generation in zip(slots, generations(out)):
                env, prompt_ids = flight.decoding.pop(slot)
                action = rollout.record_turn(env, prompt_ids, generation)
                if branchers is not None:
                    branchers.observe(env, generation)
                flight.stepping[env] = (action, pool.step_async(env, action))
        if not engine.busy and not flight.queue:  # nothing to decode until an environment answers
            rollout.timed("time/env_s", pool.wait_steps, [pending for _, pending in flight.stepping.values()])
        answered = sorted(env for env, (_, pending) in flight.stepping.items() if pending.ready())
        for env in answered:
            action, pending = flight.stepping.pop(env)
            rollout.apply_step(env, action, pool.finish_step(pending))
            flight.answered(env)
        if answered and on_turn is not None:
            on_turn(_longest(rollout), len(rollout.running()), rollout.stats)
    rollout.count_decode(*engine.row_steps())
    return _longest(rollout)


def _longest(rollout) -> int:
    return max((episode.num_turns for episode in rollout.episodes if episode is not None), default=0)
