"""The trainable parameters of an RL run and the forward pass the loss sees.

params = {"policy": <transformer params>,
          "value_head": {"w": [D], "b": []}                          (algo.critic = "value_head";
                                                                       PPO: a linear head on the
                                                                       policy's own hidden states)
          "critic": {"backbone": <transformer params>, "head": ...}}  (algo.critic = "separate")
GRPO / RLOO / GiGPO need no critic. A frozen copy of the initial policy is the KL reference.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from epo_jax.algo import logprobs_and_entropy
from epo_jax.models import transformer


def needs_critic(config) -> bool:
    return config.algo.advantage == "ppo_gae"


def init_params(config, policy_params: nnx.State, hidden_size: int) -> dict[str, Any]:
    """Trainable params: the policy plus, for PPO, a zero-initialised value head (V = 0 at start,
    so the first advantages are the returns themselves)."""
    params: dict[str, Any] = {"policy": policy_params}
    if needs_critic(config):
        head = {"w": jnp.zeros((hidden_size,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
        if config.algo.critic == "separate":
            params["critic"] = {"backbone": jax.tree.map(jnp.copy, policy_params), "head": head}
        else:
            params["value_head"] = head
    return params


def _values(head: Mapping[str, jax.Array], hidden_BxTxD: jax.Array) -> jax.Array:
    return jnp.einsum("btd,d->bt", hidden_BxTxD.astype(jnp.float32), head["w"]) + head["b"]


def make_forward_fn(config, graphdef: nnx.GraphDef, *, with_critic: bool = True):
    """forward(params, batch) -> {"logprobs", "entropy"[, "values"]}, each [B, R].

    batch["tokens"] is [B, P + R] (left-padded prompt, right-padded response) with
    batch["attention_mask"]; R = rollout.max_response_len. The hidden state at position t scores
    token t + 1, so the response's scores come from positions P - 1 .. P + R - 2. Log-probs are
    taken at the rollout temperature, as the sampler took them, so the first PPO ratio is 1.
    `with_critic=False` gives the policy alone (the frozen KL reference).
    """
    response_len = int(config.rollout.max_response_len)
    chunk_size = int(config.model.logprob_chunk_size)
    temperature = float(config.rollout.temperature) or 1.0
    critic = config.algo.critic if with_critic and needs_critic(config) else None

    def response_hidden(params, tokens_BxL, mask_BxL):
        hidden_BxLxD = transformer.hidden_states(graphdef, params, tokens_BxL, None, mask_BxL)
        prompt_len = tokens_BxL.shape[1] - response_len
        return hidden_BxLxD[:, prompt_len - 1:-1]

    def forward(params, batch):
        tokens_BxL, mask_BxL = batch["tokens"], batch["attention_mask"]
        hidden_BxRxD = response_hidden(params["policy"], tokens_BxL, mask_BxL)
        logprobs_BxR, entropy_BxR = logprobs_and_entropy(
            hidden_BxRxD, transformer.unembedding(params["policy"]), tokens_BxL[:, -response_len:],
            chunk_size=chunk_size, temperature=temperature)
        out = {"logprobs": logprobs_BxR, "entropy": entropy_BxR}
        if critic == "value_head":
            out["values"] = _values(params["value_head"], hidden_BxRxD)
        elif critic == "separate":
            critic_hidden = response_hidden(params["critic"]["backbone"], tokens_BxL, mask_BxL)
            out["values"] = _values(params["critic"]["head"], critic_hidden)
        return out

    return forward
