"""The RL loop: rollouts in real environments, sharded jitted updates, checkpoints, metrics, eval.

    train_and_evaluate(config)   # what `python -m epo_jax.main` runs

One RL step k:
  1. rollout: `num_groups` episode specs from the shuffled train split (a cursor into it is part
     of the checkpoint); every group of `group_size` environments plays its spec; each turn is
     one batched sampler call for all active environments (epo_jax.rollout.agent_loop).
     On several processes (a pod), process h plays groups [h G/P, (h+1) G/P) with its own
     environment pool and samples on its own devices from a host-local copy of the params.
  2. batch: turn samples -> padded arrays (epo_jax.train.batch), sharded over data x fsdp; the
     processes agree on one shape and each contributes its own rows.
  3. score: critic values and reference log-probs, one jitted forward.
  4. advantages: GAE / GRPO / Dr.GRPO / RLOO / GiGPO (epo_jax.train.batch_advantages).
  5. update: PPO epochs x minibatches x micro-batches with EPO's objective (epo_jax.train.update).
  6. metrics, checkpoint every `checkpoint.every_steps` (and on SIGTERM), evaluation every
     `eval.every_steps` on the IID and OOD splits at the eval temperature.
The PRNG key of step k is fold_in(seed key, k): a resumed run draws exactly what an
uninterrupted one would.
"""
from __future__ import annotations

import functools
import os
import signal
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from epo_jax.rollout.samples import Episode

from epo_jax import envs
from epo_jax.models.loading import load_pretrained
from epo_jax.rollout import agent_loop
from epo_jax.train import batch as batch_lib
from epo_jax.train import actor_critic, optim, sharding
from epo_jax.train.batch_advantages import make_advantage_fn
from epo_jax.train.checkpoint import Checkpointer, check_resume_config
from epo_jax.train.metrics import MetricsWriter, progress_line
from epo_jax.train.update import TrainState, init_train_state, make_update_fn


class _Preemption:
    """Turns SIGTERM into a flag checked between steps, so the step in flight completes and is saved."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: finishing this step, saving a checkpoint, then exiting")
        self.requested = True

    def agreed(self) -> bool:
        """Whether any process was asked to stop: all processes must save and leave at the same
        step, or the ones still running would wait forever in the next collective."""
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _split_options(config) -> dict[str, Any]:
    """What `envs.episodes` needs besides the split: the task filter and ALFWorld's data."""
    options: dict[str, Any] = {"tasks": tuple(config.env.tasks)} if config.env.tasks else {}
    if config.env.name == "alfworld" and config.env.data_dir:
        options["data_dir"] = config.env.data_dir
    return options


def _train_specs(config) -> list[envs.EpisodeSpec]:
    """The train split in a seed-determined order (the cursor walks it, wrapping around)."""
    specs = envs.episodes(config.env.name, config.env.train_split, **_split_options(config))
    if not specs:
        raise ValueError(f"env.train_split={config.env.train_split!r} with env.tasks={tuple(config.env.tasks)} "
                         "has no episodes; check the task names")
    order = np.random.default_rng(config.seed).permutation(len(specs))
    return [specs[i] for i in order]


def _eval_specs(config, split: str) -> list[envs.EpisodeSpec]:
    specs = envs.episodes(config.env.name, split, **_split_options(config))
    # A fixed, evenly spread subset, the same at every evaluation.
    idx = np.linspace(0, len(specs) - 1, num=min(config.eval.num_episodes, len(specs))).round().astype(int)
    return [specs[i] for i in sorted(set(idx))]


def _env_options(config) -> dict[str, Any]:
    options: dict[str, Any] = {"reward": config.env.reward,
                               "success_reward": float(config.env.success_reward)}
    if config.env.name == "scienceworld":
        # EPO shows ScienceWorld's action templates and objects (the ~3k valid combinations
        # would not fit a prompt); ALFWorld's admissible commands are few and cheap.
        # Constant JVM identity hashes make an episode replayable (branching needs that) at
        # ~15-20% more time per step, so they are only paid for when branches replay episodes.
        options.update(simplification=config.env.simplification, jvm_heap=config.env.jvm_heap,
                       available_actions=bool(config.env.show_actions),
                       deterministic=bool(config.rollout.branching))
    else:
        options["admissible"] = bool(config.env.show_actions)
        if config.env.data_dir:
            options["data_dir"] = config.env.data_dir
    return options


def _episode_metrics(prefix: str, episodes: list) -> dict[str, float]:
    finished = [e for e in episodes if not e.crashed]
    out = {f"{prefix}episodes": float(len(finished)),
           f"{prefix}crashed_episodes": float(len(episodes) - len(finished))}
    if finished:
        out[f"{prefix}success_rate"] = float(np.mean([e.won for e in finished]))
        out[f"{prefix}reward_mean"] = float(np.mean([e.reward for e in finished]))
        out[f"{prefix}score_mean"] = float(np.mean([e.score for e in finished]))
        out[f"{prefix}turns_mean"] = float(np.mean([e.num_turns for e in finished]))
        out[f"{prefix}invalid_turn_rate"] = float(
            np.sum([e.invalid_turns for e in finished]) / max(1, np.sum([e.num_turns for e in finished])))
    return out


def _allgather(values: np.ndarray) -> np.ndarray:
    """[P, ...]: every process's `values` (same shape on all), in process order."""
    if jax.process_count() == 1:
        return np.asarray(values)[None]
    return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


def _host_value(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this process (np.asarray refuses arrays spanning other hosts)."""
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


_EPISODE_FIELDS = ("won", "score", "reward", "num_turns", "invalid_turns", "truncated", "crashed")


def _gather_episodes(episodes: list[Episode], capacity: int, tasks: list[str]) -> list[Episode]:
    """All processes' episodes (each process passes at most `capacity`), in process order; one
    process returns its own list unchanged. Task names travel as indices into `tasks`."""
    if jax.process_count() == 1:
        return episodes
    rows = np.zeros((capacity, len(_EPISODE_FIELDS) + 3), np.float64)  # + present, task, variation
    for i, e in enumerate(episodes):
        rows[i] = [float(getattr(e, f)) for f in _EPISODE_FIELDS] + [1.0, tasks.index(e.task), e.variation]
    gathered = _allgather(rows).reshape(-1, rows.shape[1])
    out = []
    for row in gathered[gathered[:, -3] > 0]:
        values = dict(zip(_EPISODE_FIELDS, row))
        out.append(Episode(traj_id=len(out), group_id=len(out), task=tasks[int(row[-2])], variation=int(row[-1]),
                           won=bool(values["won"]), score=values["score"], reward=values["reward"],
                           num_turns=int(values["num_turns"]), invalid_turns=int(values["invalid_turns"]),
                           truncated=bool(values["truncated"]), crashed=bool(values["crashed"])))
    return out


def _combine_rollout_stats(stats: dict[str, float]) -> dict[str, float]:
    """The processes' rollout statistics as one run's: token and prompt counts add up, turn counts
    and times take the slowest process (the step waits for it), per-group means of the branching
    statistics average (every process plays the same number of groups), throughput is recomputed."""
    if jax.process_count() == 1:
        return stats
    keys = sorted(stats)
    key_sets = _allgather(np.asarray([zlib.crc32("|".join(keys).encode())], np.int64))
    if len(set(key_sets.ravel().tolist())) > 1:
        raise RuntimeError("processes report different rollout statistics; they must run the same config")
    values = _allgather(np.asarray([stats[k] for k in keys], np.float64))
    out = {}
    for i, key in enumerate(keys):
        if key.startswith("branching/"):
            out[key] = float(values[:, i].mean())
        elif key.startswith("rollout/") and key != "rollout/turns":
            out[key] = float(values[:, i].sum())
        else:
            out[key] = float(values[:, i].max())
    if "rollout/new_tokens" in out and "time/generate_s" in out:
        out["throughput/rollout_tokens_per_s"] = out["rollout/new_tokens"] / max(out["time/generate_s"], 1e-9)
    return out


def _micro_batches(num_samples: int, config) -> int:
    """Micro-batches per minibatch for this step's sample count, rounded up to a power of two so
    that the update compiles for a handful of shapes only."""
    per_micro = config.algo.num_minibatches * config.algo.micro_batch_size
    needed = max(1, -(-num_samples // per_micro))
    return 1 << (needed - 1).bit_length()


def _batch_rows(num_samples: int, config) -> int:
    """Rows of the global batch for `num_samples` turn samples: a multiple of what one update
    consumes (minibatches x micro-batches x micro-batch size)."""
    multiple = config.algo.num_minibatches * config.algo.micro_batch_size * _micro_batches(num_samples, config)
    return -(-num_samples // multiple) * multiple


def _process_key(key: jax.Array) -> jax.Array:
    """This process's share of a key: processes sample their own environments independently."""
    return key if jax.process_count() == 1 else jax.random.fold_in(key, jax.process_index())


def make_score_fn(config, forward_fn, ref_forward_fn):
    """score(params, ref_params, batch) -> {"old_values"?, "ref_logprobs"?}, in micro-batches."""
    micro = int(config.algo.micro_batch_size)

    def score(params, ref_params, batch):
        def one(micro_batch):
            out = {}
            if actor_critic.needs_critic(config):
                out["old_values"] = forward_fn(params, micro_batch)["values"]
            if ref_params is not None:
                out["ref_logprobs"] = ref_forward_fn({"policy": ref_params}, micro_batch)["logprobs"]
            return out

        rows = batch["tokens"].shape[0]
        inputs = {k: batch[k].reshape(micro, rows // micro, *batch[k].shape[1:]).swapaxes(0, 1)
                  for k in ("tokens", "attention_mask")}
        out = jax.lax.map(one, inputs)
        return {k: v.swapaxes(0, 1).reshape(rows, *v.shape[2:]) for k, v in out.items()}

    return score


def train_and_evaluate(config) -> TrainState:
    """Runs (or resumes) the RL job described by a validated config; returns the final state."""
    workdir = config.workdir if "://" in config.workdir else os.path.abspath(config.workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local or remote (gs://...)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    if config.algo.micro_batch_size % sharding.batch_divisor(mesh):
        raise ValueError(f"algo.micro_batch_size={config.algo.micro_batch_size} must be a multiple of the "
                         f"batch shards (mesh data x fsdp = {sharding.batch_divisor(mesh)})")

    loaded = load_pretrained(config.model.path, dtype=config.model.dtype,
                             param_dtype=config.model.param_dtype, remat=config.model.remat, mesh=mesh)
    graphdef, policy_params, tokenizer, model_config = (
        loaded.graphdef, loaded.params, loaded.tokenizer, loaded.config)
    params = actor_critic.init_params(config, policy_params, model_config.hidden_size)
    use_ref = bool(config.algo.use_kl_loss)
    ref_params = jax.tree.map(jnp.copy, policy_params) if use_ref else None

    total_updates = config.train.total_steps * config.algo.ppo_epochs * config.algo.num_minibatches
    optimizer = optim.make_optimizer(config.optim, total_updates)
    state = init_train_state(config, params, optimizer, mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)

    checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    train_specs = _train_specs(config)
    cursor, start_step = 0, 0
    if checkpointer.latest_step() is not None:
        check_resume_config(workdir, config)  # before config.json is overwritten below
        state, meta = checkpointer.restore(state)  # the newest checkpoint that verifies
        cursor, start_step = int(meta["cursor"]), int(meta["step"])
        logging.info("resumed from step %d (%s)", start_step, workdir)
    writer = MetricsWriter(workdir, resume_step=start_step, jsonl=config.logging.jsonl,
                           tensorboard=config.logging.tensorboard, enabled=is_main)
    if is_main:  # what the run was, for `epo_jax.export` and the notebooks
        (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))

    forward_fn = actor_critic.make_forward_fn(config, graphdef)
    update_fn = jax.jit(
        make_update_fn(config, forward_fn, optimizer),
        in_shardings=(state_sharding, None), out_shardings=(state_sharding, None),
        donate_argnums=(0,))
    score_fn = jax.jit(make_score_fn(config, forward_fn,
                                     actor_critic.make_forward_fn(config, graphdef, with_critic=False)))
    advantage_fn = jax.jit(make_advantage_fn(config))

    num_processes, process = jax.process_count(), jax.process_index()
    if config.env.num_groups % num_processes:
        raise ValueError(f"env.num_groups={config.env.num_groups} must be a multiple of the number of "
                         f"processes ({num_processes}): each process plays the same number of groups")
    local_groups = config.env.num_groups // num_processes
    num_envs = local_groups * config.env.group_size  # this process's environments
    local_mesh = sharding.rollout_mesh(mesh)
    sampler = agent_loop.make_generate_fn(config, graphdef, model_config, tokenizer, local_mesh)
    pool = envs.make_pool(config.env.name, num_envs, group_size=config.env.group_size,
                          max_turns=config.env.max_turns, step_timeout_s=config.env.step_timeout_s,
                          seed=config.seed, **_env_options(config))
    base_key = jax.random.key(config.seed)
    rollout_key, eval_key = jax.random.split(base_key)
    eval_pool = None
    try:
        with _Preemption() as preemption:
            for step in range(start_step + 1, config.train.total_steps + 1):
                t0 = time.perf_counter()
                specs = [train_specs[(cursor + g) % len(train_specs)]
                         for g in range(process * local_groups, (process + 1) * local_groups)]
                rollout_params = sharding.host_local_params(state.params["policy"], mesh, local_mesh)
                rollout = agent_loop.run_episodes(
                    pool, functools.partial(sampler, rollout_params, temperature=config.rollout.temperature),
                    tokenizer, specs, _process_key(jax.random.fold_in(rollout_key, step)), config=config)
                cursor = (cursor + config.env.num_groups) % len(train_specs)
                t_rollout = time.perf_counter() - t0
                samples = [s for s in rollout.samples if not rollout.episodes[s.traj_id].crashed]
                for s in samples:  # ids unique across processes: groups never mix hosts' episodes
                    s.traj_id += process * num_envs
                    s.group_id += process * local_groups
                episodes = _gather_episodes(rollout.episodes, num_envs, sorted({s.task for s in train_specs}))
                metrics = {**_combine_rollout_stats(rollout.stats), **_episode_metrics("", episodes)}
                # Every process hands the update the same shape: room for the largest share, padded.
                counts = _allgather(np.asarray([len(samples), max((len(s.prompt_ids) for s in samples),
                                                                  default=1)]))
                total_samples = int(counts[:, 0].sum())
                if total_samples:
                    t1 = time.perf_counter()
                    global_rows = _batch_rows(int(counts[:, 0].max()) * num_processes, config)
                    if global_rows % num_processes:
                        raise ValueError(f"the update's rows ({global_rows}) do not split over {num_processes} "
                                         "processes; make algo.micro_batch_size a multiple of the process count")
                    local_rows = global_rows // num_processes
                    host_batch = batch_lib.build_batch(
                        samples, prompt_buckets=config.rollout.prompt_buckets,
                        response_len=config.rollout.max_response_len, row_multiple=1,
                        rows=local_rows,
                        prompt_len=batch_lib.bucket(int(counts[:, 1].max()), config.rollout.prompt_buckets),
                        pad_id=agent_loop.pad_id(tokenizer),
                        padding_id_start=1_000_000 + process * local_rows)
                    batch = sharding.shard_batch(host_batch, mesh)
                    batch.update(score_fn(state.params, ref_params, batch))
                    batch.update(advantage_fn(batch, batch.get("old_values")))
                    state, update_metrics = update_fn(state, batch)
                    update_metrics = jax.tree.map(_host_value, update_metrics)
                    metrics.update(_update_metrics(update_metrics))
                    metrics["time/update_s"] = time.perf_counter() - t1
                    metrics["batch/turn_samples"] = float(total_samples)
                    metrics["batch/rows"] = float(global_rows)
                    metrics["batch/prompt_len"] = float(host_batch["tokens"].shape[1]
                                                        - config.rollout.max_response_len)
                else:
                    logging.warning("step %d: every episode crashed; no update", step)
                    # Still advance k so the phase schedule and the run stay in step.
                    state = state._replace(loss_state=state.loss_state._replace(
                        step=state.loss_state.step + 1))
                metrics["time/rollout_s"] = t_rollout
                metrics["time/step_s"] = time.perf_counter() - t0
                if config.eval.every_steps and (step % config.eval.every_steps == 0
                                                or step == config.train.total_steps):
                    if eval_pool is None:
                        eval_pool = envs.make_pool(
                            config.env.name, min(num_envs, -(-config.eval.num_episodes // num_processes)),
                            group_size=1,
                            max_turns=config.env.max_turns, step_timeout_s=config.env.step_timeout_s,
                            seed=config.seed + 1, **_env_options(config))
                    t_eval = time.perf_counter()
                    eval_params = sharding.host_local_params(state.params["policy"], mesh, local_mesh)
                    metrics.update(evaluate(config, eval_params, sampler, tokenizer,
                                            jax.random.fold_in(eval_key, step), eval_pool))
                    metrics["time/eval_s"] = time.perf_counter() - t_eval
                scalars = writer.write(step, metrics)
                if is_main and step % config.logging.every_steps == 0:
                    print(progress_line(step, config.train.total_steps, scalars), flush=True)
                stop = preemption.agreed()
                if (step % config.checkpoint.every_steps == 0 or step == config.train.total_steps
                        or stop):
                    checkpointer.save(step, state, {"step": step, "cursor": cursor})
                if stop:
                    logging.warning("preempted after step %d; checkpoint saved", step)
                    break
    finally:
        pool.close()
        if eval_pool is not None:
            eval_pool.close()
        checkpointer.close()
        writer.close()
    return state


def _update_metrics(raw: dict[str, Any]) -> dict[str, float]:
    """Flattens the update's metrics; per-turn entropy becomes entropy/turn_<t>."""
    out = {k: float(v) for k, v in raw.items() if np.ndim(v) == 0}
    counts = np.asarray(raw["turn_token_count"])
    sums = np.asarray(raw["turn_entropy_sum"])
    for t in np.flatnonzero(counts):
        out[f"entropy/turn_{t:02d}"] = float(sums[t] / counts[t])
    for key in ("beta", "smooth_penalty", "smooth_fraction", "entropy_reference", "entropy_loss"):
        if key in out:
            out[f"epo/{key}"] = out.pop(key)
    return out


def evaluate(config, policy_params, generate, tokenizer, rng, pool) -> dict[str, float]:
    """Success rate and score on each eval split at the eval temperature, one episode per spec,
    played in waves of `pool`'s size (a pool of groups of one)."""
    out: dict[str, float] = {}
    generate_eval = functools.partial(generate, policy_params, temperature=config.eval.temperature)
    rng = _process_key(rng)
    for split in config.env.eval_splits:
        all_specs = _eval_specs(config, split)
        specs = all_specs[jax.process_index()::jax.process_count()]  # this process's share
        episodes = []
        for wave, start in enumerate(range(0, len(specs), pool.num_groups)):
            chunk = specs[start:start + pool.num_groups]
            padded = chunk + [chunk[0]] * (pool.num_groups - len(chunk))  # extras are dropped
            rollout = agent_loop.run_episodes(
                pool, generate_eval, tokenizer, padded,
                jax.random.fold_in(jax.random.fold_in(rng, zlib.crc32(split.encode())), wave),
                config=config)
            episodes.extend(rollout.episodes[:len(chunk)])
        episodes = _gather_episodes(episodes, -(-len(all_specs) // jax.process_count()),
                                    sorted({s.task for s in all_specs}))
        out.update(_episode_metrics(f"eval/{split}/", episodes))
        for task in sorted({e.task for e in episodes}):
            finished = [e for e in episodes if e.task == task and not e.crashed]
            if finished:
                out[f"eval/{split}/success_rate/{task}"] = float(np.mean([e.won for e in finished]))
                out[f"eval/{split}/score/{task}"] = float(np.mean([e.score for e in finished]))
    return out
