"""Rollouts: EPO's turn prompts, action parsing, and the agent loop over an EnvPool."""
from epo_jax.rollout.actions import ParsedAction, parse_action, parse_actions, response_tail
from epo_jax.rollout.prompts import (Turn, build_prompt, chat_messages, encode_prompt, format_actions,
                                     format_history, render_prompt, user_message)

__all__ = [
    "ParsedAction", "Turn", "build_prompt", "chat_messages", "encode_prompt", "format_actions",
    "format_history", "parse_action", "parse_actions", "render_prompt", "response_tail",
    "user_message",
]
