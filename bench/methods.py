"""Cost of one RL update step under each entropy control, relative to plain PPO.

For every method, one jitted update (`epo_jax.train.update.make_update_fn` with the real forward
pass `epo_jax.train.actor_critic.make_forward_fn`: decoder, chunked log-prob / entropy head, value head,
AdamW) on a random Llama-shaped model (`epo_jax.models.transformer.init_params`) and one random
batch shared by all methods. Each method's update is compiled first (compile time excluded),
then the methods are timed in interleaved rounds (round r times every method once, in an order
rotated by r) and each keeps its best time over the rounds; the ratio is against PPO's best in
the same process. XLA's cost analysis of each compiled update (FLOPs, bytes accessed) is
reported too: it does not depend on the machine's load.

  python bench/methods.py [--hidden 256 --layers 4 --vocab 49152 --batch 8 --prompt 256
                           --response 64 --rounds 5]
"""
import argparse
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from epo_jax.algo import entropy_sums, loss_state_update
from epo_jax.models import transformer
from epo_jax.models.config import ModelConfig
from epo_jax.train import actor_critic, optim, sharding
from epo_jax.train.update import init_train_state, make_update_fn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs.base import get_config  # noqa: E402

# (name, algo overrides, epo overrides); every other field is the configs/base.py default
# (PPO + GAE with a value head, KL loss on, clip 0.2 / 0.2, dual clip 3).
METHODS = (
    ("ppo", {"entropy_control": "none"}, {}),
    ("ppo+bonus", {"entropy_control": "bonus", "entropy_coef": 0.001}, {}),
    ("epo paper", {"entropy_control": "epo"}, {"mode": "paper"}),
    ("epo code", {"entropy_control": "epo"}, {"mode": "code"}),
    ("aepo", {"entropy_control": "aepo"}, {}),
    ("clip_cov", {"entropy_control": "clip_cov"}, {}),
    ("kl_cov", {"entropy_control": "kl_cov"}, {}),
    ("top_entropy", {"entropy_control": "top_entropy"}, {}),
    ("clip-higher", {"entropy_control": "none", "clip_low": 0.2, "clip_high": 0.28}, {}),
)


def method_config(args, algo: dict, epo: dict):
    config = get_config()
    config.rollout.max_response_len = args.response
    config.model.logprob_chunk_size = args.chunk
    config.algo.micro_batch_size = args.batch
    config.algo.num_minibatches = 1
    config.algo.ppo_epochs = 1
    for key, value in algo.items():
        config.algo[key] = value
    for key, value in epo.items():
        config.epo[key] = value
    return config


def model_config(args) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 128), head_dim=64,
        tie_word_embeddings=True, max_position_embeddings=args.prompt + args.response,
    )


def random_batch(args, seed: int = 0) -> dict[str, np.ndarray]:
    """Left-padded prompts, right-padded responses; turn indices reach past EPO code mode's gate (25)."""
    rng = np.random.default_rng(seed)
    rows, length = args.batch, args.prompt + args.response
    tokens = rng.integers(3, args.vocab, size=(rows, length)).astype(np.int32)
    attention = np.ones((rows, length), bool)
    prompt_lens = rng.integers(args.prompt // 2, args.prompt + 1, size=rows)
    response_lens = rng.integers(args.response // 2, args.response + 1, size=rows)
    response_mask = np.zeros((rows, args.response), np.float32)
    for i in range(rows):
        attention[i, :args.prompt - prompt_lens[i]] = False
        attention[i, args.prompt + response_lens[i]:] = False
        response_mask[i, :response_lens[i]] = 1.0
    shape = (rows, args.response)
    return {
        "tokens": tokens, "attention_mask": attention, "response_mask": response_mask,
        "old_logprobs": rng.normal(-10.5, 1.0, shape).astype(np.float32),
        "ref_logprobs": rng.normal(-10.5, 1.0, shape).astype(np.float32),
        "advantages": (rng.normal(size=shape) * response_mask).astype(np.float32),
        "returns": rng.normal(size=shape).astype(np.float32),
        "old_values": rng.normal(size=shape).astype(np.float32),
        "turn_index": rng.integers(0, 30, rows).astype(np.int32),
        "traj_id": (np.arange(rows) // 2).astype(np.int32),
    }


def with_history(state, config):
    """Three earlier RL steps in EPO's entropy history, so that its smoothing penalty is live."""
    loss_state = state.loss_state
    for value in (8.0, 9.0, 10.0):
        sums = entropy_sums(jnp.full((30, 4), value), jnp.ones((30, 4)), jnp.arange(30), config.epo.max_turns)
        loss_state = loss_state_update(loss_state, sums)
    return state._replace(loss_state=jax.device_put(loss_state, state.loss_state.step.sharding))


def compile_method(config, graphdef, policy_params, hidden_size, mesh, batch):
    params = actor_critic.init_params(config, policy_params, hidden_size)
    optimizer = optim.make_optimizer(config.optim, config.train.total_steps)
    state = with_history(init_train_state(config, params, optimizer, mesh), config)
    update = jax.jit(make_update_fn(config, actor_critic.make_forward_fn(config, graphdef), optimizer))
    compiled = update.lower(state, batch).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    jax.block_until_ready(compiled(state, batch))  # warm-up run
    return compiled, state, analysis["flops"] / 1e9, analysis["bytes accessed"] / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024, help="model.logprob_chunk_size")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    device = jax.devices()[0]
    mesh = sharding.make_mesh(get_config().mesh, [device])
    cfg = model_config(args)
    graphdef, policy_params = transformer.init_params(cfg, jax.random.key(0))
    batch = sharding.shard_batch(random_batch(args), mesh)
    print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"model: llama, hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads "
          f"({cfg.num_kv_heads} kv), ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}, tied embeddings; "
          f"batch {args.batch} x (prompt {args.prompt} + response {args.response})")

    runs = {}
    for name, algo, epo in METHODS:
        start = time.perf_counter()
        runs[name] = compile_method(method_config(args, algo, epo), graphdef, policy_params, cfg.hidden_size,
                                    mesh, batch)
        print(f"compiled {name} in {time.perf_counter() - start:.1f} s", flush=True)

    best = {name: float("inf") for name in runs}
    names = list(runs)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            compiled, state, _, _ = runs[name]
            start = time.perf_counter()
            jax.block_until_ready(compiled(state, batch))
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    settings = {name: ", ".join([f"{k}={v}" for k, v in algo.items()] + [f"epo.{k}={v}" for k, v in epo.items()])
                for name, algo, epo in METHODS}
    print(f"\none jitted update step, best of {args.rounds} interleaved rounds, compile excluded")
    print("| method | config (algo.*) | step s | ratio vs PPO | XLA GFLOP | XLA GB accessed |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in names:
        _, _, gflop, gbytes = runs[name]
        print(f"| {name} | {settings[name]} | {best[name]:.3f} | {best[name] / best['ppo']:.3f} "
              f"| {gflop:,.1f} | {gbytes:.2f} |")


if __name__ == "__main__":
    main()
