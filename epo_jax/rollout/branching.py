"""AEPO's entropy-balanced rollout for multi-turn agents (Dong et al., arXiv 2510.14545;
docs/algorithms.md section 2 (a), (b)), as pure formulas and the bookkeeping of one rollout.

A group (the environments playing one task and variation) has a budget of n = group_size
rollouts, one pool slot each. AEPO spends it in two ways: m rollouts play the episode from its
start, and the other n - m are *branches* that fork a running rollout after one of its turns and
continue it with a fresh sample. How many start from the root is set by entropy
pre-monitoring (a); when a rollout forks is decided after every turn by its entropy rise (b).

Turn entropy. H(turn) is the mean full-vocabulary entropy of the first `entropy_tokens` (20)
tokens of the turn's reply, divided by log V (V = vocabulary size), so 0 <= H <= 1. The
official code reads the same first 20 tokens but sums -p log p over their top-10 candidates;
the mean over the full distribution keeps H on one scale whatever the reply length.

(a) Pre-monitoring. The group's first rollout is a probe: it plays alone for
`monitor_turns` (K = 3) turns, or until its episode ends.
  H_root = H of its turn 0, the reply to the bare task (the root of the tree);
  H_tool = mean H of its turns 1 .. K-1, the replies to the environment's answers (the
           multi-turn counterpart of AEPO's steps after a tool result); H_root if it ended
           before turn 1, as the official code falls back.
  m = clamp(int(n * sigmoid(beta * (H_root - H_tool))) + 1, 1, n)
The probe is an ordinary rollout from the start, so it is kept as the first of the m (the
official pass is a separate rollout that is thrown away); the other m - 1 start when the
probe's monitoring ends. Without pre-monitoring, m = clamp(round(initial_fraction * n), 1, n)
rollouts start at once (AEPO's fixed "initial rollouts", n / 2 by default).

(b) Branching. After each turn, every rollout of a group past monitoring that is still running
draws, in slot order while the budget lasts:
  dH = H_now - H_first   (this turn's H against the H of its trajectory's turn 0)
  p = (U[0,1) + w * dH) * max(0, 1 - decay * l),   l = consecutive turns the group forked
and forks if p >= threshold (0.5): at most one fork per rollout per turn, never more than n
rollouts per group. A branch's turn 0 is its parent's (shared), so it inherits the parent's
H_first; the official code instead takes the branch's first own reply. l grows by one for every
turn in which the group forked and returns to 0 after a turn in which it did not.

Unused budget (`fill`, as the official code does): when every rollout of a group past
monitoring has ended and slots remain, one fresh rollout from the start begins, so that each
group still ends with n episodes for its advantage baseline.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Sequence
from typing import NamedTuple

import numpy as np


# --- Formulas -----------------------------------------------------------------------------

def turn_entropy(token_entropy: Sequence[float] | np.ndarray, num_tokens: int,
                 vocab_size: int) -> float:
    """Normalised entropy of a reply's start: mean over its first `num_tokens` tokens of the
    full-vocabulary entropy, divided by log(vocab_size); 0.0 for an empty reply."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens!r} must be at least 1")
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size!r} must be at least 2")
    head = np.asarray(token_entropy, np.float64)[:num_tokens]
    if head.size == 0:
        return 0.0
    return float(head.mean() / math.log(vocab_size))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def initial_rollouts(n: int, h_root: float, h_tool: float, beta: float) -> int:
    """AEPO's pre-monitoring: m = clamp(int(n * sigmoid(beta * (H_root - H_tool))) + 1, 1, n)."""
    if n < 1:
        raise ValueError(f"n={n!r} must be at least 1")
    return max(1, min(n, int(n * sigmoid(beta * (h_root - h_tool))) + 1))


def fixed_initial_rollouts(n: int, fraction: float) -> int:
    """Rollouts from the start without pre-monitoring: clamp(round(fraction * n), 1, n)."""
    if n < 1:
        raise ValueError(f"n={n!r} must be at least 1")
    return max(1, min(n, int(round(fraction * n))))


def branch_probability(u: float, h_now: float, h_first: float, streak: int, weight: float,
                       decay: float) -> float:
    """AEPO's branching score: (u + w * (H_now - H_first)) * max(0, 1 - decay * l)."""
    return (u + weight * (h_now - h_first)) * max(0.0, 1.0 - decay * streak)


# --- Bookkeeping ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BranchingParams:
    """The knobs of configs/base.py's rollout.branch_* fields (defaults: AEPO's)."""

    premonitor: bool = True
    initial_fraction: float = 0.5
    beta: float = 0.5
    monitor_turns: int = 3
    entropy_tokens: int = 20
    weight: float = 0.2
    decay: float = 0.05
    threshold: float = 0.5
    fill: bool = True

    @classmethod
    def from_config(cls, rollout) -> BranchingParams:
        """From a config's `rollout` section."""
        return cls(premonitor=bool(rollout.branch_premonitor),
                   initial_fraction=float(rollout.branch_initial_fraction),
                   beta=float(rollout.branch_beta), monitor_turns=int(rollout.branch_monitor_turns),
                   entropy_tokens=int(rollout.branch_entropy_tokens),
                   weight=float(rollout.branch_w), decay=float(rollout.branch_decay),
                   threshold=float(rollout.branch_threshold), fill=bool(rollout.branch_fill))


def enabled(config) -> bool:
    """Whether a run config asks for branching rollouts (configs without the field: no)."""
    return bool(config.rollout.get("branching", False))


class Fork(NamedTuple):
    """Slot `child` continues the rollout of slot `parent` from where it stands."""

    parent: int
    child: int


@dataclasses.dataclass
class Plan:
    """What to start after a turn: slots beginning a rollout from the episode's start, and forks."""

    starts: list[int] = dataclasses.field(default_factory=list)
    forks: list[Fork] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Group:
    free: list[int]                  # slots never used in this rollout, ascending
    monitoring: bool
    probe: int = -1
    probe_entropy: list[float] = dataclasses.field(default_factory=list)
    streak: int = 0                  # l: consecutive turns in which the group forked
    m: int = 0                       # rollouts from the start decided for the group
    h_root: float | None = None
    h_tool: float | None = None


class EntropyBalancedBrancher:
    """Decides, turn by turn, which pool slots start from the root and which fork.

    Slots g * n .. g * n + n - 1 belong to group g (EnvPool's layout). Per turn: `observe` each
    reply's turn entropy, then `after_turn` with the slots still running after the step, which
    returns the Plan to carry out before the next turn. The uniform draws come from `rng`.
    """

    def __init__(self, num_groups: int, group_size: int, params: BranchingParams,
                 rng: np.random.Generator):
        if num_groups < 1 or group_size < 1:
            raise ValueError(f"num_groups={num_groups!r} and group_size={group_size!r} must be "
                             "at least 1")
        self.num_groups = num_groups
        self.group_size = group_size
        self.params = params
        self._rng = rng
        self._groups = [_Group(free=list(range(g * group_size, (g + 1) * group_size)),
                               monitoring=params.premonitor) for g in range(num_groups)]
        self._h_first: dict[int, float] = {}
        self._h_now: dict[int, float] = {}
        self.num_forks = 0
        self.num_starts = 0
        self._started = False

    def group_of(self, slot: int) -> int:
        return slot // self.group_size

    def used(self, group: int) -> int:
        """Rollouts the group has started so far (from the root or forked)."""
        return self.group_size - len(self._groups[group].free)

    def streak(self, group: int) -> int:
        return self._groups[group].streak

    def monitoring(self, group: int) -> bool:
        return self._groups[group].monitoring

    def h_first(self, slot: int) -> float | None:
        return self._h_first.get(slot)

    @property
    def initial_rollouts(self) -> list[int]:
        """m of each group (0 while it is still monitoring)."""
        return [group.m for group in self._groups]

    @property
    def h_root(self) -> list[float | None]:
        return [group.h_root for group in self._groups]

    @property
    def h_tool(self) -> list[float | None]:
        return [group.h_tool for group in self._groups]

    def start(self) -> list[int]:
        """The slots that start from the root before the first turn."""
        if self._started:
            raise RuntimeError("start() was already called for this rollout")
        self._started = True
        starts = []
        for group in self._groups:
            if self.params.premonitor:
                group.probe = group.free.pop(0)
                starts.append(group.probe)
            else:
                group.m = fixed_initial_rollouts(self.group_size, self.params.initial_fraction)
                starts.extend(group.free.pop(0) for _ in range(group.m))
        self.num_starts += len(starts)
        return starts

    def observe(self, slot: int, entropy: float) -> None:
        """Records the turn entropy of the reply slot `slot` just generated."""
        self._h_now[slot] = float(entropy)
        self._h_first.setdefault(slot, float(entropy))
        group = self._groups[self.group_of(slot)]
        if group.monitoring and slot == group.probe:
            group.probe_entropy.append(float(entropy))

    def after_turn(self, active: Collection[int]) -> Plan:
        """The starts and forks after a turn; `active` holds the slots whose episodes go on."""
        active = set(int(i) for i in active)
        played = self._h_now
        plan = Plan()
        for g, group in enumerate(self._groups):
            members = range(g * self.group_size, (g + 1) * self.group_size)
            if group.monitoring:
                if len(group.probe_entropy) < self.params.monitor_turns and group.probe in active:
                    continue
                self._end_monitoring(group, plan)
            forked = False
            for slot in members:
                if not group.free:
                    break
                if slot not in played or slot not in active:
                    continue
                u = float(self._rng.random())
                p = branch_probability(u, played[slot], self._h_first[slot], group.streak,
                                       self.params.weight, self.params.decay)
                if p >= self.params.threshold:
                    child = group.free.pop(0)
                    self._h_first[child] = self._h_first[slot]
                    plan.forks.append(Fork(slot, child))
                    forked = True
            group.streak = group.streak + 1 if forked else 0
            if (self.params.fill and group.free and not forked
                    and not any(slot in active for slot in members)
                    and not any(self.group_of(s) == g for s in plan.starts)):
                plan.starts.append(group.free.pop(0))
        self._h_now = {}
        self.num_forks += len(plan.forks)
        self.num_starts += len(plan.starts)
        return plan

    def _end_monitoring(self, group: _Group, plan: Plan) -> None:
        entropies = group.probe_entropy
        group.h_root = entropies[0]
        later = entropies[1:self.params.monitor_turns]
        group.h_tool = float(np.mean(later)) if later else group.h_root
        group.m = initial_rollouts(self.group_size, group.h_root, group.h_tool, self.params.beta)
        plan.starts.extend(group.free.pop(0) for _ in range(group.m - 1))
        group.monitoring = False
