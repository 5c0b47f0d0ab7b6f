"""Update time of a default-run-sized step under the update's options, each against padded rows
in the same process: packed rows (algo.pack), packed rows with LoRA adapters (model.lora), and a
rollout correction (algo.rollout_correction = tis | mis, token level, cap 2).

The update of the README's default run (`configs/scienceworld.py`: PPO + EPO with a value head
and the KL term, 2 rows per micro-batch, remat, prompt buckets 512 / 768 / 1024, 64-token
responses) on one batch of turn samples, built twice: as padded rows (`build_batch`, one sample
per row of the step's prompt bucket + the response length) and as packed rows (`algo.pack`,
samples end to end in rows of at most `algo.pack_tokens`, `trainer.pack_layout`'s layout). The
model has SmolLM2-135M's shape (width 576, 9 / 3 heads, vocabulary 49152) with `--layers` of its
30 decoder layers, randomly initialised; the turn samples are 2 episodes x 4 turns with prompts of
`--prompt-min`..`--prompt-max` tokens (the default run's later turns: 500-700) and 20-64 response
tokens. The variants (`--variants`):

  padded         build_batch's rows, one sample per row of the step's bucket (the reference);
  packed         the same samples packed (trainer.pack_layout's layout of the rows in order);
  packed+lora    packed, the policy with rank `--lora-rank` adapters on all seven projections of a
                 float32 base (only the adapters and the value head trained);
  tis, mis       padded, with the score pass's rollout weights and masks in the batch (drawn: the
                 work does not depend on their values) and algo.old_logprobs=trainer.

Each variant's update is compiled first, then they are timed in interleaved rounds; the best
round of each is kept and the ratio is against the padded update in the same process. The tokens
the decoder runs on per pass (rows x row length) do not depend on the machine's load.

  python bench/update_options.py [--layers 4] [--rounds 3] [--pack-tokens 0] [--lora-rank 16]
                                 [--variants padded packed packed+lora tis mis]
"""
import argparse
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from epo_jax.models import transformer
from epo_jax.models.config import ModelConfig
from epo_jax.rollout.samples import TurnSample
from epo_jax.train import actor_critic, optim, sharding
from epo_jax.train import batch as batch_lib
from epo_jax.train.trainer import jit_learner_programs, pack_tokens
from epo_jax.train.update import init_train_state

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs.scienceworld import get_config  # noqa: E402

VOCAB = 49152


def smollm2_shape(layers: int) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=576, intermediate_size=1536,
                       num_layers=layers, num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True,
                       rope_theta=100000.0, max_position_embeddings=8192, remat=True)


def turn_samples(args) -> list[TurnSample]:
    rng = np.random.default_rng(0)
    samples = []
    for traj in range(2):
        for turn in range(4):
            p, r = int(rng.integers(args.prompt_min, args.prompt_max + 1)), int(rng.integers(20, 65))
            samples.append(TurnSample(
                prompt_ids=rng.integers(3, VOCAB, p).astype(np.int32),
                response_ids=rng.integers(3, VOCAB, r).astype(np.int32),
                response_logprobs=rng.normal(-2.0, 1.0, r).astype(np.float32),
                response_entropy=np.ones(r, np.float32), traj_id=traj, group_id=0, turn_index=turn, anchor_id=turn,
                valid_format=True, penalty=0.0, episode_reward=float(traj), last_turn=turn == 3))
    return samples


def update_inputs(config, samples: list[TurnSample], packed: bool) -> dict[str, np.ndarray]:
    """The update's batch: build_batch's rows, the score pass's and advantages' fields (random:
    the work does not depend on them; with a rollout correction its weights and masks too) and,
    packed, the packing layout of the rows in order."""
    response_len = config.rollout.max_response_len
    rows = batch_lib.update_rows(len(samples), num_minibatches=1, micro_batch_size=config.algo.micro_batch_size)
    batch = batch_lib.build_batch(samples, prompt_buckets=config.rollout.prompt_buckets, response_len=response_len,
                                  rows=rows, pad_id=0, padding_id_start=1000)
    rng = np.random.default_rng(1)
    for key in ("ref_logprobs", "advantages", "returns", "old_values"):
        batch[key] = rng.normal(size=batch["response_mask"].shape).astype(np.float32)
    if config.algo.rollout_correction != "none":
        batch["rollout_weight"] = rng.uniform(0.5, 2.0, batch["response_mask"].shape).astype(np.float32)
        batch["rollout_keep"] = rng.uniform(size=batch["response_mask"].shape) < 0.95
    if packed:
        prompt_lens, seq_lens = batch_lib.sequence_lengths(batch, response_len)
        batch.update(batch_lib.pack_batch(
            prompt_lens, seq_lens, np.arange(rows)[None], num_micro_batches=rows // config.algo.micro_batch_size,
            shards=1, pack_tokens=pack_tokens(config), prompt_width=batch["tokens"].shape[1] - response_len,
            row_width=batch["tokens"].shape[1]))
    return batch


def decoder_tokens(batch: dict) -> tuple[int, tuple[int, ...]]:
    """Tokens one forward pass over the batch runs the decoder on, and the shape they come in."""
    if "pack_index" in batch:  # [arrangements, micro-batches, shards, K, L]
        shape = batch["pack_index"].shape[1:]
        return int(np.prod(shape)), shape
    return int(np.prod(batch["tokens"].shape)), batch["tokens"].shape


VARIANTS = ("padded", "packed", "packed+lora", "tis", "mis")


def variant_config(args, name: str):
    """The default run's config with variant `name`'s options."""
    config = get_config()
    config.algo.pack_tokens = args.pack_tokens
    config.algo.pack = name.startswith("packed")
    if name == "packed+lora":
        config.model.lora.rank = args.lora_rank
    if name in ("tis", "mis"):
        config.algo.rollout_correction, config.algo.old_logprobs = name, "trainer"
    return config


def variant_update(args, name: str, graphdef, policy, mesh, samples):
    """(compiled update, its train state, its batch) for variant `name`."""
    config = variant_config(args, name)
    # A copy of its own: the update donates the state, and the variants' states must not share buffers.
    policy_graphdef, policy_params = actor_critic.policy_model(config, graphdef, jax.tree.map(jnp.copy, policy))
    optimizer = optim.make_optimizer(config.optim, 100)
    state = init_train_state(config, actor_critic.init_params(config, policy_params, 576), optimizer, mesh)
    # The trainer's own jitted update (shardings and donation as a run compiles it).
    update = jit_learner_programs(config, policy_graphdef, optimizer, jax.tree.map(lambda x: x.sharding, state)).update
    batch = sharding.shard_batch(update_inputs(config, samples, config.algo.pack), mesh)
    t0 = time.perf_counter()
    compiled = update.lower(state, batch).compile()
    print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    return compiled, state, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pack-tokens", type=int, default=0, help="algo.pack_tokens (0: the longest turn sample)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--prompt-min", type=int, default=500)
    parser.add_argument("--prompt-max", type=int, default=700)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    names = ["padded"] + [n for n in args.variants if n != "padded"]
    graphdef, policy = transformer.init_params(smollm2_shape(args.layers), jax.random.key(0))
    mesh = sharding.make_mesh(get_config().mesh, jax.devices()[:1])
    samples = turn_samples(args)
    compiled, states, batches = {}, {}, {}
    for name in names:
        compiled[name], states[name], batches[name] = variant_update(args, name, graphdef, policy, mesh, samples)
    seconds: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            # Each call continues from the variant's last state (the update donates it).
            t0 = time.perf_counter()
            states[name], _ = compiled[name](states[name], batches[name])
            jax.block_until_ready(states[name])
            seconds.setdefault(name, []).append(time.perf_counter() - t0)
            print(f"round {r + 1}: {name} {seconds[name][-1]:.2f} s", flush=True)
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    print(f"\n{len(samples)} turn samples of {min(lengths)}-{max(lengths)} tokens, {sum(lengths)} in all; "
          f"{args.layers} layers; load average {os.getloadavg()[0]:.1f}")
    print("| update | decoder tokens / pass (shape) | update s (best) | ratio |")
    print("|--------|------------------------------:|----------------:|------:|")
    reference = min(seconds["padded"])
    for name in names:
        tokens, shape = decoder_tokens(batches[name])
        best = min(seconds[name])
        print(f"| {name} | {tokens} {tuple(shape)} | {best:.2f} | {best / reference:.2f} |")


if __name__ == "__main__":
    main()
