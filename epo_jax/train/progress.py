"""What a run shows while it works: timestamped start-up lines, a live line during each step,
and the per-step progress line.

On a terminal the live line (rollout turn t / T, active environments, tokens generated and
tokens/s; then the update's micro-batch i / n) is redrawn in place by tqdm; when the output is
not a terminal (CI logs, SLURM files) the same text is printed as a plain line at most every
`plain_interval_s` seconds, so a log shows that the run is alive without filling up.
Only process 0 prints.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import tqdm

_ACTIVE: list[Progress] = []  # the reporter the update's micro-batch callback reaches


class Progress:
    """Start-up and live progress of one run."""

    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None, tty: bool | None = None,
                 plain_interval_s: float = 30.0):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.plain_interval_s = plain_interval_s
        self._start = time.perf_counter()
        self._bar: tqdm.tqdm | None = None
        self._last_plain = -float("inf")
        self._prefix = ""
        self._micro_batches = (0, 0)  # (done, of) in the update in flight

    def __enter__(self) -> Progress:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.clear()
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def info(self, message: str) -> None:
        """A start-up or event line with the seconds since the run started."""
        self.line(f"[{self.elapsed():7.1f}s] {message}")

    def line(self, text: str) -> None:
        """A permanent line (the live line, if any, is cleared first)."""
        if not self.enabled:
            return
        self.clear()
        print(text, file=self.stream, flush=True)

    def begin_step(self, step: int, total: int) -> None:
        self._prefix = f"step {step}/{total}"
        self._last_plain = time.perf_counter()  # the first plain line comes an interval in

    def live(self, text: str) -> None:
        """The live line of the step in flight: redrawn on a terminal, rate-limited otherwise."""
        if not self.enabled:
            return
        text = f"{self._prefix} | {text}" if self._prefix else text
        if self.tty:
            if self._bar is None:
                self._bar = tqdm.tqdm(file=self.stream, bar_format="{desc}", leave=False, dynamic_ncols=True)
            self._bar.set_description_str(text)
        elif time.perf_counter() - self._last_plain >= self.plain_interval_s:
            self._last_plain = time.perf_counter()
            print(f"[{self.elapsed():7.1f}s] {text}", file=self.stream, flush=True)

    def clear(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # Hooks of the stages ----------------------------------------------------------------------

    def rollout_turn(self, max_turns: int, turn: int, active: int, stats: dict[str, Any]) -> None:
        tokens = stats.get("rollout/new_tokens", 0.0)
        rate = tokens / max(stats.get("time/generate_s", 0.0), 1e-9)
        self.live(f"rollout turn {turn}/{max_turns} | {active} active | {tokens:.0f} tokens | {rate:.0f} tok/s")

    def begin_update(self, micro_batches: int) -> None:
        """The update about to run has this many micro-batches (over its epochs and minibatches)."""
        self._micro_batches = (0, micro_batches)

    def micro_batch(self) -> None:
        done, count = self._micro_batches
        self._micro_batches = (done + 1, count)
        self.live(f"update micro-batch {done + 1}/{count}")


def micro_batch_done(*_) -> None:
    """Host callback of the jitted update (`jax.debug.callback`): one more micro-batch is done;
    counted by the run's active Progress, if any (it is a module function, not a method, so the
    compiled update does not hold on to one run's reporter)."""
    if _ACTIVE:
        _ACTIVE[-1].micro_batch()
