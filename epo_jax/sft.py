"""The supervised cold start: expert demonstrations -> a policy that writes the reply format, before RL.

    python -m epo_jax.sft --config=configs/scienceworld.py      # makes (or finds) the cold start
    python -m epo_jax.main --config=configs/scienceworld.py     # the CPU default makes it first (sft.cold_start)
    python -m epo_jax.main --config=configs/scienceworld.py:paper --config.model.init_from=DIR/policy

The embedded SmolLM2-135M never writes `<think> ... </think> <action> ... </action>` on its own, so
an RL run from it gets the same format penalty on every turn and no learning signal. This stage
teaches it the format (and a start on the tasks) from the environments' own experts. Its stages,
each announced on the progress output with its time:

  demonstrate: expert episodes of the train split (ScienceWorld's gold paths, ALFWorld's planner)
      played through the real engine, each turn rendered by the rollout's own prompt renderer
      (epo_jax.rollout.demonstrations), until `sft.episodes` episodes won within env.max_turns are
      kept. They are taken from the end of the run's shuffled train order (the RL cursor walks it
      from the start), never from the IID or OOD splits, and saved in the stage's folder. The
      expert's engine is deterministic (`expert_env_options`), so the same settings record the
      same turns on any machine.
  learn: `sft.epochs` passes over the turns in batches of `sft.batch_size` turns, each batch from
      one prompt bucket (little padding, one compile per bucket). The loss is the cross-entropy of
      the reply tokens alone, averaged over the batch's reply tokens, scored by the RL trainer's
      forward (epo_jax.train.actor_critic) at temperature 1. Same mesh and parameter sharding as the
      trainer (epo_jax.train.sharding, update.init_train_state), AdamW with its warmup and cosine
      decay (epo_jax.train.optim: peak `sft.lr`, the rest from optim.*), micro-batches of
      algo.micro_batch_size rows, orbax checkpoints every `sft.checkpoint_every_steps` steps, so a
      killed stage restarts where it stopped and ends with the same weights; metrics.jsonl and
      TensorBoard in the folder.
  write: the policy as a Hugging Face folder, <dir>/policy (models.loading.save_pretrained), which
      an RL run starts from with `--config.model.init_from=<dir>/policy` (its KL reference too).
  evaluate: the valid-format rate and success rate of that policy on `sft.eval_episodes` episodes of
      the IID split at eval.temperature, kept with everything else in <dir>/cold_start.json.

The folder is `sft.dir`, or else a cache folder named after every setting that decides the result
(COLD_START_CACHE_ENV, default ~/.cache/epo_jax/cold_start/<env>-<key>): any later run with the same
settings, from any work directory, reuses it. A folder that holds cold_start.json is complete.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from epo_jax import envs
from epo_jax.errors import ConfigError, UserError
from epo_jax.models.loading import EMBEDDED_MODEL, LoadedModel, load_pretrained, save_pretrained
from epo_jax.rollout import agent_loop
from epo_jax.rollout import demonstrations as demos_lib
from epo_jax.rollout import prompts as prompts_lib
from epo_jax.rollout.samples import TurnSample
from epo_jax.train import actor_critic, environments, evaluation, optim, processes, sharding
from epo_jax.train import batch as batch_lib
from epo_jax.train.checkpoint import Checkpointer
from epo_jax.train.metrics import MetricsWriter
from epo_jax.train.progress import Progress
from epo_jax.train.trainer import CompiledPerShape
from epo_jax.train.update import TrainState, init_train_state

COLD_START_CACHE_ENV = "EPO_JAX_COLD_START_CACHE"
SUMMARY_FILE = "cold_start.json"
DEMONSTRATIONS_FILE = "demonstrations.npz"
POLICY_DIR = "policy"
# Engines of the evaluation at once (one JVM each for ScienceWorld, ~300 MB with its 512 MB heap).
EVAL_ENVS = 4
# The expert plays at most this many episodes per one asked for, then the stage stops looking.
MAX_PLAYED_PER_KEPT = 4

# The settings that decide a cold start's result (its demonstrations, batches and updates); its
# cache folder is named after their hash. Left out: what only changes memory or the order of
# float sums (remat, micro-batch and chunk sizes, the mesh) and the evaluation settings, which
# only decide the summary: changing them reuses the cold start.
KEY_FIELDS = (
    "seed", "model.path", "model.dtype", "model.param_dtype",
    "env.name", "env.train_split", "env.tasks", "env.simplification", "env.max_turns",
    "env.history_length", "env.show_actions", "env.data_dir",
    "rollout.max_prompt_len", "rollout.max_response_len", "rollout.prompt_buckets",
    "optim.weight_decay", "optim.warmup_ratio", "optim.min_lr_ratio", "optim.grad_clip", "optim.b1",
    "optim.b2", "optim.eps", "sft.episodes", "sft.epochs", "sft.batch_size", "sft.lr")


def _field(config, name: str) -> Any:
    node = config
    for part in name.split("."):
        node = node[part]
    return node


def settings(config) -> dict[str, Any]:
    """What decides the cold start of `config`: KEY_FIELDS, the reply format's version and the
    text of the prompt template (so an edited prompt builder never reuses a stale cold start)."""
    out = {name: _field(config, name) for name in KEY_FIELDS}
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
    if out["model.path"] and os.path.exists(out["model.path"]):
        out["model.path"] = os.path.abspath(out["model.path"])
    history = [prompts_lib.Turn("first observation", "first action"),
               prompts_lib.Turn("second observation", "second action")]
    template = "\n".join(prompts_lib.user_message(
        config.env.name, task_description="TASK", observation="OBSERVATION", history=history,
        history_length=config.env.history_length, **actions)
        for actions in ({"admissible_actions": ["ACTION"]},
                        {"action_templates": ["TEMPLATE OBJ"], "objects": ["OBJECT"]}))
    out["format"] = {"version": demos_lib.FORMAT_VERSION,
                     "prompt": hashlib.sha256(template.encode()).hexdigest()[:16],
                     "reply": demos_lib.target_reply("ACTION")}
    return out


def cache_root() -> Path:
    """Where cold starts are cached: $EPO_JAX_COLD_START_CACHE or ~/.cache/epo_jax/cold_start."""
    return Path(os.environ.get(COLD_START_CACHE_ENV) or Path.home() / ".cache" / "epo_jax" / "cold_start")


def stage_dir(config) -> str:
    """The cold start's folder: `sft.dir`, else the cache folder keyed by `settings(config)`."""
    if config.sft.dir:
        return os.path.abspath(config.sft.dir)
    key = hashlib.sha256(json.dumps(settings(config), sort_keys=True).encode()).hexdigest()[:12]
    return str(cache_root() / f"{config.env.name}-{key}")


def read_summary(directory: str) -> dict[str, Any] | None:
    """The summary of a complete cold start in `directory`, or None."""
    path = Path(directory) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- demonstrate -------------------------------------------------------------------------------

def expert_env_options(config) -> dict[str, Any]:
    """The options of the engine the expert plays on: the run's (`env_options`), with ALFWorld's
    planner on, and ScienceWorld's constant JVM identity hashes. Its gold path picks the object of
    some tasks by shuffling a room's contents in identity-hash order, which depends on everything
    that JVM did before; without them two recordings of one spec can differ (find-non-living-thing
    variation 95 focused on the soap or the painting), and so would a cold start named after its
    settings. Recording pays the ~15-20% per step once."""
    options = environments.env_options(config)
    if config.env.name == "alfworld":
        options["expert_plan"] = True
    elif config.env.name == "scienceworld":
        options["deterministic"] = True
    return options


def _record(config, tokenizer, directory: Path, progress: Progress) -> dict[str, Any]:
    """Plays the expert episodes, or finds them in the folder; returns their description."""
    path, meta_path = directory / DEMONSTRATIONS_FILE, directory / "demonstrations.json"
    if path.exists() and meta_path.exists():
        return json.loads(meta_path.read_text())
    t0 = time.perf_counter()
    env = envs.make(config.env.name, **expert_env_options(config))
    counts = {"played": 0, "kept": 0}

    def on_episode(episode: demos_lib.ExpertEpisode) -> None:
        counts["played"] += 1
        counts["kept"] += not episode.skipped
        progress.live(f"demonstrations: {counts['kept']} of {config.sft.episodes} episodes kept, "
                      f"{counts['played']} played")

    try:
        progress.info(f"demonstrations: {config.env.name} engine started in {time.perf_counter() - t0:.1f} s")
        # From the end of the run's train order, which the RL cursor reaches last.
        specs = environments.train_specs(config)[::-1][:MAX_PLAYED_PER_KEPT * config.sft.episodes]
        recording = demos_lib.record(env, specs, tokenizer, config, max_episodes=config.sft.episodes,
                                     on_episode=on_episode)
    finally:
        env.close()
    if not recording.demonstrations:
        first = recording.episodes[0].skipped if recording.episodes else "no train episodes"
        raise UserError(f"the expert won none of {len(recording.episodes)} {config.env.name} train episodes within "
                        f"env.max_turns={config.env.max_turns} ({first}); raise --config.env.max_turns or "
                        "choose other --config.env.tasks")
    demos = recording.demonstrations
    meta = {
        "episodes_kept": len(recording.kept), "episodes_played": len(recording.episodes), "turns": len(demos),
        "truncated_prompts": recording.truncated_prompts,
        "prompt_tokens_mean": float(np.mean([len(d.prompt_ids) for d in demos])),
        "target_tokens_mean": float(np.mean([len(d.target_ids) for d in demos])),
        "episodes": [{"task": e.spec.task, "variation": e.spec.variation, "actions": e.actions, "won": e.won,
                      "skipped": e.skipped} for e in recording.episodes],
        "time_s": time.perf_counter() - t0,
    }
    tmp = directory / f".{DEMONSTRATIONS_FILE}.{os.getpid()}.tmp.npz"
    demos_lib.save(recording, str(tmp))
    os.replace(tmp, path)
    _write_atomically(meta_path, json.dumps(meta, indent=1))
    progress.info(f"demonstrations: {meta['turns']} turns from {meta['episodes_kept']} expert episodes "
                  f"({meta['episodes_played']} played; prompts {meta['prompt_tokens_mean']:.0f} tokens, replies "
                  f"{meta['target_tokens_mean']:.0f} on average) in {meta['time_s']:.1f} s")
    return meta


# --- learn -------------------------------------------------------------------------------------

def batch_plan(prompt_lengths: Sequence[int], *, buckets: Sequence[int], batch_size: int, epochs: int,
               seed: int) -> list[np.ndarray]:
    """The demonstration indices of every optimizer step, all epochs in order: each epoch shuffles
    the turns, cuts each prompt bucket's turns into batches of `batch_size` (the last may be
    smaller) and shuffles the batches. A function of its arguments, so a resumed stage takes the
    same batches."""
    rng = np.random.default_rng([seed, 0x5F7])
    bucket_of = np.asarray([batch_lib.bucket(n, buckets) for n in prompt_lengths])
    plan = []
    for _ in range(epochs):
        order = rng.permutation(len(prompt_lengths))
        batches = []
        for bucket in sorted(set(bucket_of.tolist())):
            members = order[bucket_of[order] == bucket]
            batches.extend(members[k:k + batch_size] for k in range(0, len(members), batch_size))
        plan.extend(batches[i] for i in rng.permutation(len(batches)))
    return plan


def _scoring_config(config):
    """The config the trainer's forward scores targets with: temperature 1 (the model's own
    distribution), whatever the rollout samples at."""
    scoring = copy.deepcopy(config)
    scoring.rollout.temperature = 1.0
    return scoring


def make_loss_and_grad(config, graphdef):
    """loss_and_grad(params, batch) -> (loss, grads) for params {"policy": ...}: the mean
    cross-entropy of the batch's target tokens, -sum_t mask_t log p(y_t | prompt, y_<t) / sum_t mask_t,
    and its gradient, accumulated over micro-batches of algo.micro_batch_size rows (micro-batch j
    holds every (rows / micro)-th row from j, so no row moves between the batch's shards)."""
    forward_fn = actor_critic.make_forward_fn(_scoring_config(config), graphdef, with_critic=False)
    micro_batch_size = int(config.algo.micro_batch_size)

    def nll_sum(params, micro_batch):
        logprobs_BxR = forward_fn(params, micro_batch)["logprobs"]
        return -jnp.sum(logprobs_BxR * micro_batch["response_mask"])

    grad_fn = jax.value_and_grad(nll_sum)

    def loss_and_grad(params, batch: dict[str, jax.Array]) -> tuple[jax.Array, Any]:
        micro_batches = jax.tree.map(
            lambda x: x.reshape(micro_batch_size, -1, *x.shape[1:]).swapaxes(0, 1), batch)

        def micro_step(grads_acc, micro_batch):
            nll, grads = grad_fn(params, micro_batch)
            return jax.tree.map(jnp.add, grads_acc, grads), nll

        grads, nll_M = jax.lax.scan(micro_step, jax.tree.map(jnp.zeros_like, params), micro_batches)
        tokens = jnp.maximum(jnp.sum(batch["response_mask"]), 1.0)
        return jnp.sum(nll_M) / tokens, jax.tree.map(lambda g: g / tokens, grads)

    return loss_and_grad


def make_sft_step(config, graphdef, optimizer: optax.GradientTransformation):
    """step(state, batch) -> (state, metrics): one optimizer step on `make_loss_and_grad`'s loss."""
    loss_and_grad = make_loss_and_grad(config, graphdef)

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, grads = loss_and_grad(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "target_tokens": jnp.sum(batch["response_mask"])}
        return state._replace(params=params, opt_state=opt_state), metrics

    return step


def host_batch(demos: Sequence[demos_lib.Demonstration], indices: np.ndarray, config, *, rows: int,
               pad_id: int) -> dict[str, np.ndarray]:
    """The rows of one step: the trainer's layout (left-padded prompt of the bucket, right-padded
    reply of rollout.max_response_len), rows past the turns fully masked."""
    samples = [TurnSample(prompt_ids=demos[i].prompt_ids, response_ids=demos[i].target_ids,
                          response_logprobs=np.zeros(len(demos[i].target_ids), np.float32),
                          response_entropy=np.zeros(len(demos[i].target_ids), np.float32),
                          traj_id=int(i), group_id=int(i), turn_index=demos[i].turn_index, anchor_id=0,
                          valid_format=True) for i in indices]
    full = batch_lib.build_batch(samples, prompt_buckets=config.rollout.prompt_buckets,
                                 response_len=config.rollout.max_response_len, rows=rows, pad_id=pad_id,
                                 padding_id_start=processes.PADDING_ID_START)
    return {k: full[k] for k in ("tokens", "attention_mask", "response_mask")}


def _rows(config) -> int:
    micro = int(config.algo.micro_batch_size)
    return -(-int(config.sft.batch_size) // micro) * micro


@dataclasses.dataclass
class _Learner:
    """The learn stage's model, state, program and output, built once."""

    config: Any
    directory: Path
    mesh: jax.sharding.Mesh
    model: LoadedModel
    state: TrainState
    step_fn: CompiledPerShape
    checkpointer: Checkpointer
    progress: Progress


def _load_model(config, mesh, progress: Progress) -> LoadedModel:
    t0 = time.perf_counter()
    model = load_pretrained(config.model.path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                            remat=config.model.remat, mesh=mesh, attention=config.model.attention)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
    progress.info(f"model: {model.config.model_type}, {num_params / 1e6:.1f}M parameters, from "
                  f"{config.model.path or EMBEDDED_MODEL}, loaded in {time.perf_counter() - t0:.1f} s")
    return model


def _build_learner(config, model: LoadedModel, mesh, directory: Path, total_steps: int,
                   progress: Progress) -> _Learner:
    sft_optim = copy.deepcopy(config.optim)
    sft_optim.lr = float(config.sft.lr)
    optimizer = optim.make_optimizer(sft_optim, total_steps)
    state = init_train_state(config, {"policy": model.params}, optimizer, mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(make_sft_step(config, model.graphdef, optimizer), in_shardings=(state_sharding, None),
                   out_shardings=(state_sharding, None), donate_argnums=(0,))
    checkpointer = Checkpointer(str(directory), keep=1, async_save=config.checkpoint.async_save)
    return _Learner(config, directory, mesh, model, state, CompiledPerShape(step, "the SFT step", progress),
                    checkpointer, progress)


def _make_mesh(config) -> jax.sharding.Mesh:
    mesh = sharding.make_mesh(config.mesh)
    divisor = sharding.batch_divisor(mesh)
    if config.algo.micro_batch_size % divisor:
        raise ConfigError(f"config field 'algo.micro_batch_size' = {config.algo.micro_batch_size} is invalid: "
                          f"expected a multiple of the batch shards (mesh data x fsdp = {divisor})")
    return mesh


def _learn(learner: _Learner, demos: list[demos_lib.Demonstration], plan: list[np.ndarray]) -> dict[str, float]:
    """Runs (or resumes) the optimizer steps of `plan`; returns the last step's metrics and the
    stage's time."""
    config, progress = learner.config, learner.progress
    start = 0
    if learner.checkpointer.latest_step() is not None:
        learner.state, meta = learner.checkpointer.restore(learner.state)
        start = int(meta["step"])
        progress.info(f"resumed the cold start from its checkpoint of step {start}")
    writer = MetricsWriter(str(learner.directory), resume_step=start, jsonl=config.logging.jsonl,
                           tensorboard=config.logging.tensorboard)
    pad_id = agent_loop.pad_id(learner.model.tokenizer)
    t_stage, last = time.perf_counter(), {}
    try:
        for step in range(start + 1, len(plan) + 1):
            t0 = time.perf_counter()
            rows = host_batch(demos, plan[step - 1], config, rows=_rows(config), pad_id=pad_id)
            batch = sharding.shard_batch(rows, learner.mesh)
            learner.state, metrics = learner.step_fn(learner.state, batch)
            last = {k: float(processes.host_value(v)) for k, v in metrics.items()}
            seconds = time.perf_counter() - t0
            tokens = int(rows["attention_mask"].sum())
            last.update({"time/step_s": seconds, "throughput/tokens_per_s": tokens / seconds,
                         "batch/prompt_len": float(batch["tokens"].shape[1] - config.rollout.max_response_len)})
            writer.write(step, last)
            progress.line(f"sft step {step}/{len(plan)} | loss {last['loss']:.3f} | grad {last['grad_norm']:.2f} | "
                          f"{len(plan[step - 1])} turns x {int(last['batch/prompt_len'])}+"
                          f"{config.rollout.max_response_len} | {seconds:.1f}s | tok/s {last['throughput/tokens_per_s']:.0f}")
            if step % config.sft.checkpoint_every_steps == 0 and step < len(plan):
                learner.checkpointer.save(step, learner.state, {"step": step})
    finally:
        writer.close()
    last["time/learn_s"] = time.perf_counter() - t_stage
    last["steps"] = float(len(plan))
    return last


# --- write and evaluate ------------------------------------------------------------------------

def _write_policy(learner: _Learner) -> str:
    """The policy as a Hugging Face folder, written beside and then renamed into <dir>/policy."""
    t0 = time.perf_counter()
    target = learner.directory / POLICY_DIR
    tmp = learner.directory / f".{POLICY_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy = sharding.host_local_params(learner.state.params["policy"], learner.mesh,
                                        sharding.rollout_mesh(learner.mesh))
    save_pretrained(policy, learner.model.config, learner.model.tokenizer, str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    learner.progress.info(f"policy written to {target} in {time.perf_counter() - t0:.1f} s")
    return str(target)


def evaluate_policy(config, model: LoadedModel, policy_params, num_episodes: int, progress: Progress,
                    mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
    """Valid-format rate, success rate and score of a policy on `num_episodes` IID episodes at
    eval.temperature (the trainer's evaluation, its IID split only)."""
    eval_config = copy.deepcopy(config)
    eval_config.eval.num_episodes = int(num_episodes)
    eval_config.env.eval_splits = ("iid",)
    t0 = time.perf_counter()
    pool = environments.make_pool(eval_config, min(EVAL_ENVS, num_episodes), group_size=1, seed=config.seed + 1)
    try:
        mesh = mesh or sharding.make_mesh(config.mesh)
        policy = agent_loop.make_policy(config, model.graphdef, model.config, model.tokenizer,
                                        sharding.rollout_mesh(mesh))
        metrics = evaluation.evaluate(eval_config, policy_params, policy, model.tokenizer,
                                      jax.random.key(config.seed + 1), pool,
                                      processes.ProcessLayout.from_config(config))
    finally:
        pool.close()
    metrics["eval/iid/valid_format_rate"] = 1.0 - metrics.get("eval/iid/invalid_turn_rate", 1.0)
    metrics["time/eval_s"] = time.perf_counter() - t0
    progress.info(f"evaluated on {int(metrics.get('eval/iid/episodes', 0))} IID episodes: valid format "
                  f"{metrics['eval/iid/valid_format_rate']:.2f} | success {metrics.get('eval/iid/success_rate', 0):.2f} "
                  f"| score {metrics.get('eval/iid/score_mean', 0):.1f} | turns {metrics.get('eval/iid/turns_mean', 0):.1f} "
                  f"in {metrics['time/eval_s']:.1f} s")
    return metrics


# --- the stage ---------------------------------------------------------------------------------

def _check_stage(config) -> None:
    if jax.process_count() > 1:
        raise UserError("the cold start runs in one process: run `python -m epo_jax.sft` on one host, then "
                        "start the RL run with --config.model.init_from=<its folder>/policy")
    if config.env.train_split != "train":
        raise ConfigError(f"config field 'env.train_split' = {config.env.train_split!r} is invalid: the cold "
                          "start demonstrates on the train split only; use 'train' or --config.sft.cold_start=False")


def make_cold_start(config, progress: Progress | None = None) -> dict[str, Any]:
    """Makes the cold start of `config` in `stage_dir(config)` (resuming a partial one), or returns
    the summary of the complete one already there."""
    progress = progress or Progress(enabled=jax.process_index() == 0)
    directory = Path(stage_dir(config))
    summary = read_summary(str(directory))
    if summary is not None:
        return summary
    _check_stage(config)
    directory.mkdir(parents=True, exist_ok=True)
    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    progress.info(f"cold start: {config.sft.episodes} expert {config.env.name} episodes, {config.sft.epochs} "
                  f"epoch(s) in batches of {config.sft.batch_size} turns, lr {config.sft.lr:g}; folder {directory}")
    _write_atomically(directory / "settings.json", json.dumps(settings(config), indent=1, sort_keys=True))
    with progress:
        mesh = _make_mesh(config)
        model = _load_model(config, mesh, progress)
        recorded = _record(config, model.tokenizer, directory, progress)
        demos = demos_lib.load(str(directory / DEMONSTRATIONS_FILE))
        plan = batch_plan([len(d.prompt_ids) for d in demos], buckets=config.rollout.prompt_buckets,
                          batch_size=config.sft.batch_size, epochs=config.sft.epochs, seed=config.seed)
        learner = _build_learner(config, model, mesh, directory, len(plan), progress)
        try:
            learned = _learn(learner, demos, plan)
            policy = _write_policy(learner)
        finally:
            learner.checkpointer.close()
        # The checkpoints only served a resume of the learn stage; the policy folder replaces them.
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)
        evaluated = {}
        if config.sft.eval_episodes:
            evaluated = evaluate_policy(config, model, learner.state.params["policy"], config.sft.eval_episodes,
                                        progress, mesh)
    summary = {
        "policy": policy, "settings": settings(config),
        "demonstrations": {k: v for k, v in recorded.items() if k != "episodes"},
        "learn": learned, "eval": {k: v for k, v in evaluated.items() if k.startswith(("eval/", "time/"))},
        "eval_settings": {"episodes": config.sft.eval_episodes, "temperature": config.eval.temperature},
        "time_s": time.perf_counter() - t0,
        # The machine's load while the stage ran (its times are only comparable under like loads).
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
    }
    _write_atomically(directory / SUMMARY_FILE, json.dumps(summary, indent=1))
    progress.info(f"cold start done in {summary['time_s']:.0f} s: {policy}")
    return summary


def with_cold_start(config):
    """With `sft.cold_start` (and no `model.init_from` given), makes or reuses the config's cold
    start and returns the config with `model.init_from` pointing at its policy; else the config as
    it is. `python -m epo_jax.main` calls it before the RL run."""
    if not config.sft.cold_start or config.model.init_from:
        return config
    progress = Progress(enabled=jax.process_index() == 0)
    directory = stage_dir(config)
    summary = read_summary(directory)
    if summary is None:
        summary = make_cold_start(config, progress)
        gc.collect()  # the stage's optimizer state and programs go before the RL run allocates its own
    else:
        result = summary.get("eval", {})
        progress.info(f"cold start: reusing {directory} (valid format {result.get('eval/iid/valid_format_rate', float('nan')):.2f}, "
                      f"success {result.get('eval/iid/success_rate', float('nan')):.2f} on "
                      f"{int(result.get('eval/iid/episodes', 0))} IID episodes)")
    config.model.init_from = summary["policy"]
    return config


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}; set fields as --config.a.b=value.")
    from epo_jax import config as config_lib
    from epo_jax import main as entry
    try:
        config = config_lib.validate(flags.FLAGS.config)
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        summary = make_cold_start(config)
        print(f"cold start: {summary['policy']}\nstart RL from it with --config.model.init_from={summary['policy']}",
              flush=True)
    except UserError as error:
        entry.exit_with(error, flags.FLAGS.verbose)


if __name__ == "__main__":
    from epo_jax import main as _entry  # defines --config and --verbose, and parses them as the RL run does
    app.run(_main, flags_parser=_entry.parse_flags)
