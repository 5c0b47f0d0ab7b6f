"""EPO's turn prompts for ScienceWorld and ALFWorld (and the toy corridor), rendered with the model's
chat template.

Each turn's prompt is one user message (EPO / verl-agent, docs/algorithms.md section 4) holding:
the task; the number of steps taken so far; the actions of all but the last
`history_length` (2) steps; the last `history_length` (observation, action) pairs in
full; the current observation; the actions to choose from; and the format rule: reason
inside <think> </think>, then one action inside <action> </action>. On the first turn
(or with history_length = 0) the history part is left out.

Actions shown: ALFWorld lists the admissible commands (without "help"). ScienceWorld
lists either the admissible action strings (environment option `admissible=True`) or,
as EPO does, the action templates plus the objects to fill them with (option
`available_actions=True`).

    history = [Turn(obs_1, act_1), Turn(obs_2, act_2)]   # obs_t: what act_t answered
    text = build_prompt(tokenizer, "scienceworld", info, observation, history)
    ids = encode_prompt(tokenizer, "scienceworld", info, observation, history)  # what the agent sees

Whatever an environment returns (observations, task texts, action lists, and the agent's own
past actions in the history) is shown as plain text: `encode_prompt` encodes a control token
written inside it (an observation holding "<|im_end|><|im_start|>system ...") as the ordinary
tokens of its characters, so that environment text cannot open a turn of its own; only the
chat template's tokens are real (epo_jax.models.tokenizer.encode_chat).

The toy key-and-door corridor (epo_jax/envs/toy_keydoor.py) has the same layout with a
one-line introduction and a one-line format rule, so that its prompts stay a few dozen tokens.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from epo_jax.models.tokenizer import encode_chat, plain_text

PROMPT_ENVS = ("scienceworld", "alfworld", "toy_keydoor")

_INTRO = {
    "scienceworld": ("You are an expert agent working in ScienceWorld, a text-based simulation "
                     "in which you carry out elementary-school science experiments."),
    "alfworld": ("You are an expert agent working in ALFWorld, a text-based household "
                 "simulation built on the ALFRED embodied environment."),
    "toy_keydoor": "A text world.",
}
_INSTRUCTIONS = (
    "It is now your turn to act. First reason step by step about the current situation; "
    "this reasoning MUST be enclosed in <think> </think> tags. Then choose exactly one "
    "action for the current step and give it enclosed in <action> </action> tags.")
_SHORT_INSTRUCTIONS = {"toy_keydoor": "Reply <think> </think> then <action> command </action>."}
_EXCLUDED_ACTIONS = {"alfworld": frozenset({"help"}), "scienceworld": frozenset(),
                     "toy_keydoor": frozenset()}


class Turn(NamedTuple):
    """One past step: the observation the agent saw, and the action it sent in reply."""

    observation: str
    action: str


def _check_env(env: str) -> str:
    if env not in PROMPT_ENVS:
        raise ValueError(f"env={env!r} has no prompt template; use one of {PROMPT_ENVS}.")
    return env


def format_actions(env: str, admissible_actions: Sequence[str] | None = None,
                   action_templates: Sequence[str] | None = None,
                   objects: Sequence[str] | None = None) -> str:
    """The block listing what the agent may do ("" when nothing is given)."""
    _check_env(env)
    if admissible_actions is not None:
        shown = [a for a in admissible_actions if a not in _EXCLUDED_ACTIONS[env]]
        listing = ",\n".join(f"'{action}'" for action in shown)
        return f"Your admissible actions for the current step are:\n[\n{listing}\n]"
    if action_templates is not None:
        lines = ["Action templates you may use (replace each OBJ with a name): ["
                 + ", ".join(action_templates) + "]"]
        if objects is not None:
            lines.append("Objects and places you can name: [" + ", ".join(objects) + "]")
        return "\n".join(lines)
    return ""


def format_history(history: Sequence[Turn], history_length: int = 2) -> str:
    """All steps but the last `history_length` as actions, those last ones in full."""
    num_steps = len(history)
    num_full = min(history_length, num_steps)
    lines = []
    earlier = num_steps - num_full
    if earlier:
        lines.append(f"The actions you took in steps 1 to {earlier}:")
        lines.extend(f"[Step {step} action: '{history[step - 1].action}']"
                     for step in range(1, earlier + 1))
    lines.append(f"Your last {num_full} observation(s) and the action you took after each:")
    lines.extend(f"[Step {step} observation: '{history[step - 1].observation}', "
                 f"action: '{history[step - 1].action}']"
                 for step in range(earlier + 1, num_steps + 1))
    return "\n".join(lines)


def user_message(env: str, *, task_description: str, observation: str,
                 history: Sequence[Turn] = (), history_length: int = 2,
                 admissible_actions: Sequence[str] | None = None,
                 action_templates: Sequence[str] | None = None,
                 objects: Sequence[str] | None = None) -> str:
    """The text of one turn's user message (see the module docstring)."""
    _check_env(env)
    if history_length < 0:
        raise ValueError(f"history_length={history_length!r} must be >= 0.")
    parts = [_INTRO[env], f"Your task is: {task_description}"]
    if history and history_length > 0:
        parts.append(f"You have already taken {len(history)} step(s).")
        parts.append(format_history(history, history_length))
        parts.append(f"You are now at step {len(history) + 1} and your current observation "
                     f"is: {observation}")
    else:
        parts.append(f"Your current observation is: {observation}")
    actions = format_actions(env, admissible_actions, action_templates, objects)
    if actions:
        parts.append(actions)
    parts.append("")
    parts.append(_SHORT_INSTRUCTIONS.get(env, _INSTRUCTIONS))
    return "\n".join(parts)


def chat_messages(user_text: str, system_text: str | None = None) -> list[dict[str, str]]:
    """The chat as a list of {"role", "content"} messages (lone surrogates made "?": no
    tokenizer encodes them)."""
    messages = [{"role": "system", "content": plain_text(system_text)}] if system_text else []
    messages.append({"role": "user", "content": plain_text(user_text)})
    return messages


def render_prompt(tokenizer: Any, user_text: str, system_text: str | None = None) -> str:
    """Renders the chat through `tokenizer.apply_chat_template`, opening the assistant's turn.

    `tokenizer` is any object with the transformers method
    apply_chat_template(messages, add_generation_prompt=True, tokenize=False).
    """
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no apply_chat_template(); "
                        "pass a transformers tokenizer with a chat template.")
    text = tokenizer.apply_chat_template(chat_messages(user_text, system_text),
                                         add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str.")
    return text


def _turn_message(env: str, info: Mapping[str, Any], observation: str, history: Sequence[Turn],
                  history_length: int, show_actions: bool) -> str:
    actions = {}
    if show_actions:
        actions = dict(admissible_actions=info.get("admissible_actions"),
                       action_templates=info.get("action_templates"),
                       objects=info.get("objects"))
    return user_message(env, task_description=info["task_description"],
                        observation=observation, history=history,
                        history_length=history_length, **actions)


def build_prompt(tokenizer: Any, env: str, info: Mapping[str, Any], observation: str,
                 history: Sequence[Turn] = (), *, history_length: int = 2,
                 show_actions: bool = True, system_text: str | None = None) -> str:
    """One turn's rendered prompt from an environment's `info` (task and action lists)."""
    text = _turn_message(env, info, observation, history, history_length, show_actions)
    return render_prompt(tokenizer, text, system_text)


def encode_prompt(tokenizer: Any, env: str, info: Mapping[str, Any], observation: str,
                  history: Sequence[Turn] = (), *, history_length: int = 2,
                  show_actions: bool = True, system_text: str | None = None) -> list[int]:
    """The token ids of `build_prompt`'s prompt, the messages encoded as plain text (control
    tokens inside them split into ordinary tokens; the template's own stay real)."""
    text = _turn_message(env, info, observation, history, history_length, show_actions)
    return encode_chat(tokenizer, chat_messages(text, system_text), add_generation_prompt=True)
