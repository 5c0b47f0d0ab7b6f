"""The parameters of an RL run, which of them are trained, and the forward pass the loss sees.

params = {"policy": <transformer params>,
          "value_head": {"w": [D], "b": []}                          (algo.critic = "value_head";
                                                                       PPO: a linear head on the
                                                                       policy's own hidden states)
          "critic": {"backbone": <transformer params>, "head": ...}}  (algo.critic = "separate")
GRPO / RLOO / GiGPO need no critic. A frozen copy of the initial policy is the KL reference.

With LoRA (model.lora.rank > 0, epo_jax/models/lora.py) params["policy"] holds the frozen base
weights and the policy's adapters (one nnx.State of the adapted model, which the sampler and the
forward pass run as they are); a separate critic's backbone is its own adapters on the same
base. Only the adapters and the heads are trained (`split_trainable`): the optimizer, its state
and the checkpoints hold nothing else. The KL reference is the base itself, the adapters off
(`reference_params`: the same arrays, no second copy).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from epo_jax.algo import logprobs_and_entropy
from epo_jax.models import lora, transformer

# fold_in constants of the adapters' initial draws from the run's seed (the run's own key stays unused).
_POLICY_ADAPTERS, _CRITIC_ADAPTERS = 1, 2


def needs_critic(config) -> bool:
    return config.algo.advantage == "ppo_gae"


def base_param_dtype(config) -> str:
    """The storage dtype of the loaded model's weights: model.lora.base_dtype when they stay
    frozen under adapters, else model.param_dtype."""
    return config.model.lora.base_dtype if config.model.lora.rank else config.model.param_dtype


def _adapter_key(config, which: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(config.seed), which)


def policy_model(config, graphdef: nnx.GraphDef, params: nnx.State) -> tuple[nnx.GraphDef, nnx.State]:
    """The (graphdef, params) the run trains and samples with: the loaded model itself, or with
    model.lora.rank > 0 the model with fresh adapters (A drawn from the run's seed, B = 0)."""
    spec = lora.LoraSpec.from_config(config)
    if spec is None:
        return graphdef, params
    return lora.with_adapters(graphdef, params, spec, _adapter_key(config, _POLICY_ADAPTERS))


def init_params(config, policy_params: nnx.State, hidden_size: int) -> dict[str, Any]:
    """The run's params: the policy plus, for PPO, a zero-initialised value head (V = 0 at start,
    so the first advantages are the returns themselves). A separate critic starts as a copy of the
    policy, or, when the policy has adapters, as adapters of its own on the policy's base."""
    params: dict[str, Any] = {"policy": policy_params}
    if needs_critic(config):
        head = {"w": jnp.zeros((hidden_size,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
        if config.algo.critic == "separate":
            backbone = (lora.reinitialized(lora.adapter_params(policy_params), _adapter_key(config, _CRITIC_ADAPTERS))
                        if lora.has_adapters(policy_params) else jax.tree.map(jnp.copy, policy_params))
            params["critic"] = {"backbone": backbone, "head": head}
        else:
            params["value_head"] = head
    return params


def split_trainable(params: dict[str, Any]) -> tuple[dict[str, Any], nnx.State | None]:
    """(trained params, frozen weights): everything and None, or with LoRA the params with the
    policy reduced to its adapters, and the base weights."""
    policy = params["policy"]
    if not lora.has_adapters(policy):
        return params, None
    return {**params, "policy": lora.adapter_params(policy)}, lora.base_params(policy)


def join_trainable(trainable: dict[str, Any], frozen: nnx.State | None) -> dict[str, Any]:
    """The inverse of `split_trainable`."""
    if frozen is None:
        return trainable
    return {**trainable, "policy": nnx.merge_state(frozen, trainable["policy"])}


def reference_params(params: dict[str, Any]) -> nnx.State | None:
    """The KL reference a LoRA policy carries: its base weights, for the base graphdef (None
    without adapters: the reference is then a copy of the initial policy)."""
    return split_trainable(params)[1]


def _critic_backbone(params: Mapping[str, Any]) -> nnx.State:
    backbone = params["critic"]["backbone"]
    if lora.has_adapters(params["policy"]):  # the critic's adapters on the policy's base
        return nnx.merge_state(lora.base_params(params["policy"]), backbone)
    return backbone


def _values(head: Mapping[str, jax.Array], hidden_BxTxD: jax.Array) -> jax.Array:
    return jnp.einsum("btd,d->bt", hidden_BxTxD.astype(jnp.float32), head["w"]) + head["b"]


def make_forward_fn(config, graphdef: nnx.GraphDef, *, with_critic: bool = True):
    """forward(params, batch) -> {"logprobs", "entropy"[, "values"]}, each [B, R].

    batch["tokens"] is [B, P + R] (left-padded prompt, right-padded response) with
    batch["attention_mask"]; R = rollout.max_response_len. The hidden state at position t scores
    token t + 1, so the response's scores come from positions P - 1 .. P + R - 2. Log-probs are
    taken at the rollout temperature, as the sampler took them, so the first PPO ratio is 1.
    `with_critic=False` gives the policy alone: with the base model's graphdef, the frozen KL
    reference (`reference_params` of a LoRA policy, or a copy of the initial policy).
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
            critic_hidden = response_hidden(_critic_backbone(params), tokens_BxL, mask_BxL)
            out["values"] = _values(params["critic"]["head"], critic_hidden)
        return out

    return forward
