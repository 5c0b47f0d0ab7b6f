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
    `with_critic=False` gives the policy alone (the frozen KL reference).
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
            critic_hidden = response_hidden(params["critic"]["backbone"], batch)
            out["values"] = _values(params["critic"]["head"], critic_hidden)
        return out

    return forward
