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


def kl_reference(config, params: dict[str, Any], reference_copy: nnx.State | None) -> nnx.State | None:
    """The score pass's KL reference: None without the KL loss; else the frozen copy of the initial
    policy, or under LoRA (no copy) the base weights of `params` themselves, the adapters off."""
    if not config.algo.use_kl_loss:
        return None
    return reference_copy if reference_copy is not None else reference_params(params)


def _critic_backbone(params: Mapping[str, Any]) -> nnx.State:
    backbone = params["critic"]["backbone"]
    if lora.has_adapters(params["policy"]):  # the critic's adapters on the policy's base
        return nnx.merge_state(lora.base_params(params["policy"]), backbone)
    return backbone


def _values(head: Mapping[str, jax.Array], hidden_BxTxD: jax.Array) -> jax.Array:
    return jnp.einsum("btd,d->bt", hidden_BxTxD.astype(jnp.float32), head["w"]) + head["b"]


def packed_rows(micro_batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, positions, segment ids), each [G x K, L]: the packed rows of a micro-batch.

    micro_batch holds its S samples as `build_batch` rows ("tokens", "attention_mask", [S, C]) and
    their packing layout (`epo_jax.train.batch.pack_batch`), "pack_index" [G, K, L]: each of the G
    batch shards gathers its own rows' tokens into its K packed rows. A sample's segment id is its
    row on its shard + 1 (0: no token); its positions count its own tokens from 0.
    """
    tokens_SxC, mask_SxC = micro_batch["tokens"], micro_batch["attention_mask"]
    index_GxKxL = micro_batch["pack_index"]
    shards, rows, length = index_GxKxL.shape
    width = tokens_SxC.shape[1]
    index_GxN = index_GxKxL.reshape(shards, rows * length)
    real_GxN = index_GxN >= 0
    source_GxN = jnp.maximum(index_GxN, 0)

    def gather(values_SxC):  # each shard reads its own rows only
        return jnp.take_along_axis(values_SxC.reshape(shards, -1), source_GxN, axis=1).reshape(shards * rows, length)

    positions = jnp.where(real_GxN.reshape(shards * rows, length), gather(transformer.positions_from_mask(mask_SxC)), 0)
    segments = jnp.where(real_GxN, source_GxN // width + 1, 0).reshape(shards * rows, length)
    return gather(tokens_SxC), positions, segments


def packed_response_hidden(graphdef: nnx.GraphDef, params: nnx.State, micro_batch: Mapping[str, jax.Array],
                           response_len: int) -> jax.Array:
    """[S, R, D] response hidden states of a micro-batch whose forward runs on packed rows
    (`packed_rows`): the decoder runs on the packed rows, and "pack_response_start" [S] says where
    each sample's hidden states that score its response tokens are, those the padded rows give."""
    shards, rows, length = micro_batch["pack_index"].shape
    num_samples = micro_batch["tokens"].shape[0]
    tokens, positions, segments = packed_rows(micro_batch)
    hidden_GxNxD = transformer.hidden_states(graphdef, params, tokens, positions, None, segments).reshape(
        shards, rows * length, -1)
    # Response token t is scored at start + t; positions past a sample's response are masked in
    # every loss term and only need to exist.
    at_SxR = jnp.minimum(micro_batch["pack_response_start"][:, None] + jnp.arange(response_len), rows * length - 1)
    picked = jnp.take_along_axis(hidden_GxNxD, at_SxR.reshape(shards, -1)[..., None], axis=1)
    return picked.reshape(num_samples, response_len, hidden_GxNxD.shape[-1])


def make_forward_fn(config, graphdef: nnx.GraphDef, *, with_critic: bool = True):
    """forward(params, batch) -> {"logprobs", "entropy"[, "values"]}, each [B, R].

    batch["tokens"] is [B, P + R] (left-padded prompt, right-padded response) with
    batch["attention_mask"]; R = rollout.max_response_len. The hidden state at position t scores
    token t + 1, so the response's scores come from positions P - 1 .. P + R - 2. A batch holding
    a packing layout ("pack_index", algo.pack) runs the decoder on packed rows instead and reads
    the same hidden states back (`packed_response_hidden`). Log-probs are taken at the rollout
    temperature, as the sampler took them, so the first PPO ratio is 1.
    `with_critic=False` gives the policy alone: with the base model's graphdef, the frozen KL
    reference (`reference_params` of a LoRA policy, or a copy of the initial policy).
    """
    response_len = int(config.rollout.max_response_len)
    chunk_size = int(config.model.logprob_chunk_size)
    temperature = float(config.rollout.temperature) or 1.0
    critic = config.algo.critic if with_critic and needs_critic(config) else None

    def response_hidden(params, batch):
        if "pack_index" in batch:
            return packed_response_hidden(graphdef, params, batch, response_len)
        tokens_BxL = batch["tokens"]
        hidden_BxLxD = transformer.hidden_states(graphdef, params, tokens_BxL, None, batch["attention_mask"])
        prompt_len = tokens_BxL.shape[1] - response_len
        return hidden_BxLxD[:, prompt_len - 1:-1]

    def forward(params, batch):
        tokens_BxL = batch["tokens"]
        hidden_BxRxD = response_hidden(params["policy"], batch)
        logprobs_BxR, entropy_BxR = logprobs_and_entropy(
            hidden_BxRxD, transformer.unembedding(params["policy"]), tokens_BxL[:, -response_len:],
            chunk_size=chunk_size, temperature=temperature)
        out = {"logprobs": logprobs_BxR, "entropy": entropy_BxR}
        if critic == "value_head":
            out["values"] = _values(params["value_head"], hidden_BxRxD)
        elif critic == "separate":
            critic_hidden = response_hidden(_critic_backbone(params), batch)
            out["values"] = _values(params["critic"]["head"], critic_hidden)
        return out

    return forward
