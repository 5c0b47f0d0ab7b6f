"""Turning a model response into an environment action, as EPO / verl-agent do.

A response is valid when it holds a `<think> ... </think>` block, an
`<action> ... </action>` block with a non-blank action, and no CJK character (spec
section 4; EPO arXiv 2509.22576 App. B). Tags are matched case-insensitively; the action
is the text between the first `<action>` and the first `</action>` after it, lower-cased,
with every run of whitespace made one space and none at either end.

An invalid turn still reaches the environment (it answers with something like "No
known action matches that input.") and earns the invalid-format penalty (-0.1 in EPO).
What it sends is the response's tail: its last `TAIL_CHARS` (30, as in verl-agent)
characters after trailing whitespace is removed, lower-cased.
The official code differs in one corner: a response with well-formed action tags but no
think block (or with CJK text) sends its extracted action while still being penalised;
here every invalid turn sends the tail, as the spec states.

Any string is safe: empty, megabytes long, unbalanced tags, arbitrary unicode.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

TAIL_CHARS = 30
MAX_ACTION_CHARS = 512

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ACTION_OPEN, _ACTION_CLOSE = "<action>", "</action>"
# Hiragana/Katakana, CJK Unified Ideographs with Extension A, Hangul syllables and
# CJK compatibility ideographs: broader than verl-agent's U+4E00-U+9FFF check, since a
# Japanese or Korean answer is just as off-format.
_CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


class ParsedAction(NamedTuple):
    """The text sent to the environment and whether the response followed the format."""

    action: str
    valid: bool


def response_tail(response: str, num_chars: int = TAIL_CHARS) -> str:
    """The last `num_chars` characters of the response without trailing whitespace, lower-cased."""
    return response.rstrip()[-num_chars:].lower() if num_chars > 0 else ""


def parse_action(response: str, *, tail_chars: int = TAIL_CHARS,
                 max_action_chars: int = MAX_ACTION_CHARS) -> ParsedAction:
    """Extracts the action of one response (see the module docstring for the rules).

    Args:
      response: the model's text for one turn.
      tail_chars: length of the tail sent for an invalid response.
      max_action_chars: a longer action is cut to this many characters.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}.")
    # Lower-casing can change a string's length (e.g. "İ"), so search and slice the same copy.
    lowered = response.lower()
    think_start = lowered.find(_THINK_OPEN)
    has_think = think_start >= 0 and lowered.find(
        _THINK_CLOSE, think_start + len(_THINK_OPEN)) >= 0
    action_start = lowered.find(_ACTION_OPEN)
    action = ""
    if action_start >= 0:
        content_start = action_start + len(_ACTION_OPEN)
        action_end = lowered.find(_ACTION_CLOSE, content_start)
        if action_end >= 0:
            # Runs of whitespace (newlines included) become one space: engines parse one line.
            action = " ".join(lowered[content_start:action_end].split())[:max_action_chars]
    valid = has_think and bool(action) and _CJK.search(response) is None
    if not valid:
        return ParsedAction(response_tail(response, tail_chars), False)
    return ParsedAction(action, True)


def parse_actions(responses: Sequence[str], **kwargs) -> list[ParsedAction]:
    """`parse_action` over a batch of responses."""
    return [parse_action(response, **kwargs) for response in responses]
