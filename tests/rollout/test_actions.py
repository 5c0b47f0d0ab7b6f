"""Action parsing: hand-made cases, and a fuzz test against a regex re-implementation."""
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epo_jax.rollout.actions import ParsedAction, parse_action, parse_actions, response_tail

# Code points the spec calls CJK: kana, CJK ideographs (+ extension A, compatibility), Hangul.
_CJK_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF),
               (0xF900, 0xFAFF))


def reference_parse(text: str) -> tuple[str, bool]:
    """The spec's rule written independently: regexes over the lower-cased text."""
    lowered = text.lower()
    has_think = re.search(r"<think>.*?</think>", lowered, re.DOTALL) is not None
    match = re.search(r"<action>(.*?)</action>", lowered, re.DOTALL)
    action = re.sub(r"\s+", " ", match.group(1)).strip()[:512] if match else ""
    has_cjk = any(lo <= ord(ch) <= hi for ch in text for lo, hi in _CJK_RANGES)
    if has_think and action and not has_cjk:
        return action, True
    return text.rstrip()[-30:].lower(), False


@pytest.mark.parametrize("text, expected", [
    ("<think>the door is open</think><action>go to kitchen</action>",
     ParsedAction("go to kitchen", True)),
    # Tags in any case; the action is lower-cased and its whitespace collapsed.
    ("<THINK>hm</Think>\n<Action>  Pick Up\n  Thermometer </ACTION>",
     ParsedAction("pick up thermometer", True)),
    # Only the first action block counts.
    ("<think>a</think><action>look around</action><action>wait</action>",
     ParsedAction("look around", True)),
    # No think block: invalid, the tail goes to the environment.
    ("I will go now. <action>go to kitchen</action>",
     ParsedAction("now. <action>go to kitchen</action>"[-30:], False)),
    # Unclosed action tag.
    ("<think>x</think><action>go to kitch", ParsedAction("<think>x</think><action>go to kitch"[-30:], False)),
    # Closing tag before the opening one only.
    ("<think>x</think></action>open door<action>", ParsedAction("</think></action>open door<action>"[-30:], False)),
    # Empty action.
    ("<think>x</think><action>   </action>", ParsedAction("<think>x</think><action>   </action>"[-30:], False)),
    # CJK anywhere (even inside the reasoning) makes the turn invalid.
    ("<think>去厨房</think><action>go to kitchen</action>",
     ParsedAction("<think>去厨房</think><action>go to kitchen</action>"[-30:], False)),
    ("<think>부엌</think><action>go to kitchen</action>",
     ParsedAction("<think>부엌</think><action>go to kitchen</action>"[-30:], False)),
    # Trailing whitespace is not part of the tail.
    ("Nothing to see HERE   \n\n", ParsedAction("nothing to see here", False)),
    ("", ParsedAction("", False)),
])
def test_hand_made_cases(text, expected):
    assert parse_action(text) == expected


def test_lowercasing_that_changes_length_keeps_the_action_intact():
    # "İ".lower() is two code points, shifting every later index of the lowered text.
    text = "<think>İİİİ</think><action>OPEN Door</action>"
    assert parse_action(text) == ParsedAction("open door", True)


def test_megabyte_responses_are_cheap_and_safe():
    body = "x" * 5_000_000
    assert parse_action(body + "<action>look") == ParsedAction(("x" * 30 + "<action>look")[-30:],
                                                                False)
    long_action = parse_action("<think>t</think><action>" + body + "</action>")
    assert long_action == ParsedAction("x" * 512, True)
    assert parse_action("<think>t</think><action>" + body + "</action>",
                        max_action_chars=10).action == "x" * 10


def test_lone_surrogates_and_control_characters():
    text = "\ud800<think>\x00</think><action>\udfff wait\x07</action>"
    assert parse_action(text) == ParsedAction("\udfff wait\x07", True)


def test_tail_length_option_and_batch():
    assert response_tail("ABCDEF", 3) == "def"
    assert response_tail("ABCDEF", 0) == ""
    assert parse_action("no tags here", tail_chars=4) == ParsedAction("here", False)
    assert parse_actions(["<think>a</think><action>wait</action>", "junk"]) == [
        ParsedAction("wait", True), ParsedAction("junk", False)]


def test_non_string_is_rejected():
    with pytest.raises(TypeError, match="response must be a str"):
        parse_action(b"<action>x</action>")


_PIECES = st.sampled_from([
    "<think>", "</think>", "<action>", "</action>", "<THINK>", "</Action>", "<act", "ion>",
    "<", ">", "/", " ", "\n", "\t", "go to kitchen", "Look Around", "漢", "ア", "한", "İ", "ß",
    "\ud800", "\x00", "",
])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=30).map("".join))
def test_fuzz_matches_the_reference(text):
    parsed = parse_action(text)
    assert isinstance(parsed.action, str) and isinstance(parsed.valid, bool)
    assert (parsed.action, parsed.valid) == reference_parse(text)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_fuzz_arbitrary_unicode(text):
    parsed = parse_action(text)
    assert (parsed.action, parsed.valid) == reference_parse(text)
    assert len(parsed.action) <= 512
