"""The supervised cold start: its loss against a numpy cross-entropy on a tiny model, its gradient
against finite differences, micro-batched and sharded steps against one whole step, the batch
plan, the cache key and its reuse, and, end to end on the real ScienceWorld, `python -m
epo_jax.main` making the cold start on first use and a killed cold start resuming to the same
weights."""
import json
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
import safetensors.numpy

from epo_jax import envs, sft
from epo_jax.models import transformer
from epo_jax.models.loading import load_pretrained
from epo_jax.rollout import demonstrations as demos_lib
from epo_jax.rollout.demonstrations import Demonstration
from epo_jax.train import optim, sharding
from epo_jax.train.metrics import read_jsonl
from epo_jax.train.update import init_train_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from tiny_policy import tiny_policy_dir  # noqa: E402

RESPONSE_LEN = 8


def tiny_config(micro_batch_size: int = 1):
    config = runpy.run_path(str(ROOT / "configs" / "scienceworld.py"))["get_config"]()
    config.rollout.max_response_len = RESPONSE_LEN
    config.rollout.max_prompt_len = 32
    config.rollout.prompt_buckets = (16, 32)
    config.rollout.temperature = 0.7  # the cold start scores at temperature 1 whatever the rollout uses
    config.algo.micro_batch_size = micro_batch_size
    config.sft.batch_size = 4
    return config


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_pretrained(tiny_policy_dir(str(tmp_path_factory.mktemp("models"))))


def random_demos(count: int, vocab: int, seed: int = 0) -> list[Demonstration]:
    rng = np.random.default_rng(seed)
    return [Demonstration(prompt_ids=rng.integers(3, vocab, rng.integers(4, 30)).astype(np.int32),
                          target_ids=rng.integers(3, vocab, rng.integers(1, RESPONSE_LEN + 1)).astype(np.int32),
                          episode=0, turn_index=i) for i in range(count)]


def numpy_cross_entropy(model, demos) -> float:
    """-mean over all target tokens of log softmax(logits)[target], each row run unpadded."""
    total, count = 0.0, 0
    for demo in demos:
        sequence = np.concatenate([demo.prompt_ids, demo.target_ids])[None]
        logits = np.asarray(transformer.logits(model.graphdef, model.params, jnp.asarray(sequence)), np.float64)[0]
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        start = len(demo.prompt_ids) - 1  # position t scores token t + 1
        total -= log_probs[start + np.arange(len(demo.target_ids)), demo.target_ids].sum()
        count += len(demo.target_ids)
    return total / count


def one_device_mesh(config, devices=1):
    config.mesh.data = devices
    return sharding.make_mesh(config.mesh, jax.devices()[:devices])


def test_loss_is_the_cross_entropy_of_the_target_tokens(model):
    config = tiny_config()
    mesh = one_device_mesh(config)
    demos = random_demos(3, model.config.vocab_size)  # 3 turns in 4 rows: one row of padding
    rows = sft.host_batch(demos, np.arange(3), config, rows=4, pad_id=2)
    assert rows["tokens"].shape == (4, 32 + RESPONSE_LEN)
    loss_and_grad = jax.jit(sft.make_loss_and_grad(config, model.graphdef))
    loss, _ = loss_and_grad({"policy": model.params}, sharding.shard_batch(rows, mesh))
    np.testing.assert_allclose(float(loss), numpy_cross_entropy(model, demos), rtol=2e-5)


def test_gradient_matches_finite_differences(model):
    config = tiny_config()
    mesh = one_device_mesh(config)
    batch = sharding.shard_batch(sft.host_batch(random_demos(4, model.config.vocab_size, seed=1),
                                                np.arange(4), config, rows=4, pad_id=2), mesh)
    loss_and_grad = jax.jit(sft.make_loss_and_grad(config, model.graphdef))
    params = {"policy": model.params}
    _, grads = loss_and_grad(params, batch)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    direction = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    norm = optax_global_norm(direction)
    direction = jax.tree.map(lambda d: d / norm, direction)
    eps = 1e-2

    def loss_at(t):
        return float(loss_and_grad(jax.tree.map(lambda p, d: p + t * d, params, direction), batch)[0])

    finite_difference = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, finite_difference, rtol=2e-2, atol=1e-4)


def optax_global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def test_micro_batched_and_sharded_gradients_equal_the_whole_batchs(model):
    demos = random_demos(4, model.config.vocab_size, seed=2)
    results = []
    for micro, devices in ((4, 1), (1, 1), (2, 2)):
        config = tiny_config(micro)
        mesh = one_device_mesh(config, devices)
        rows = sharding.shard_batch(sft.host_batch(demos, np.arange(4), config, rows=4, pad_id=2), mesh)
        params = sharding.place_params({"policy": model.params}, mesh)
        results.append(jax.device_get(jax.jit(sft.make_loss_and_grad(config, model.graphdef))(params, rows)))
    (loss, grads), others = results[0], results[1:]
    for other_loss, other_grads in others:
        np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


def test_a_step_applies_the_optimizer_to_the_gradient(model):
    config = tiny_config(2)
    config.optim.warmup_ratio = 0.0  # the first step at the peak rate (warmup starts at 0)
    config.optim.lr = 1e-3
    mesh = one_device_mesh(config)
    demos = random_demos(4, model.config.vocab_size, seed=4)
    batch = sharding.shard_batch(sft.host_batch(demos, np.arange(4), config, rows=4, pad_id=2), mesh)
    optimizer = optim.make_optimizer(config.optim, 10)
    state = init_train_state(config, {"policy": model.params}, optimizer, mesh)
    loss, grads = jax.jit(sft.make_loss_and_grad(config, model.graphdef))(state.params, batch)
    updates, _ = optimizer.update(grads, state.opt_state, state.params)
    expected = jax.device_get(optax.apply_updates(state.params, updates))
    before = jax.device_get(state.params)
    state, metrics = jax.jit(sft.make_sft_step(config, model.graphdef, optimizer))(state, batch)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(metrics["target_tokens"]) == sum(len(d.target_ids) for d in demos)
    for got, want, old in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(expected),
                              jax.tree.leaves(before)):
        np.testing.assert_allclose(got, want, atol=1e-7)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(before)))
    assert moved > 1e-4


def test_batch_plan_covers_every_turn_once_per_epoch_within_one_bucket():
    lengths = [10, 20, 30, 12, 25, 15, 40, 8, 17, 33]
    plan = sft.batch_plan(lengths, buckets=(16, 32, 64), batch_size=3, epochs=2, seed=0)
    first_epoch_batches = 2 + 2 + 1  # buckets 16, 32 and 64 hold 4, 4 and 2 turns
    for epoch in (plan[:first_epoch_batches], plan[first_epoch_batches:]):
        assert sorted(np.concatenate(epoch).tolist()) == list(range(len(lengths)))
    for batch in plan:
        assert len(batch) <= 3 and len({16 if lengths[i] <= 16 else 32 if lengths[i] <= 32 else 64 for i in batch}) == 1
    again = sft.batch_plan(lengths, buckets=(16, 32, 64), batch_size=3, epochs=2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(plan, again))
    other = sft.batch_plan(lengths, buckets=(16, 32, 64), batch_size=3, epochs=2, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(plan, other))


def test_the_cache_folder_is_named_after_what_decides_the_result(monkeypatch, tmp_path):
    monkeypatch.setenv(sft.COLD_START_CACHE_ENV, str(tmp_path))
    config = tiny_config()
    base = sft.stage_dir(config)
    assert base.startswith(str(tmp_path / "scienceworld-"))
    for field, value in (("sft.lr", 3e-4), ("env.tasks", ("boil",)), ("env.history_length", 1),
                         ("env.max_turns", 9), ("sft.episodes", 5), ("seed", 1)):
        changed = tiny_config()
        section, name = field.split(".") if "." in field else (None, field)
        setattr(changed[section] if section else changed, name, value)
        assert sft.stage_dir(changed) != base, field
    for field, value in (("env.group_size", 8), ("eval.temperature", 0.0), ("sft.eval_episodes", 30),
                         ("train.total_steps", 3), ("optim.lr", 1e-6)):
        same = tiny_config()
        section, name = field.split(".")
        setattr(same[section], name, value)
        assert sft.stage_dir(same) == base, field
    config.sft.dir = str(tmp_path / "mine")
    assert sft.stage_dir(config) == str(tmp_path / "mine")


def test_a_complete_cold_start_is_reused_and_an_explicit_init_from_wins(tmp_path, capsys):
    config = tiny_config()
    config.sft.dir = str(tmp_path / "cold")
    config.sft.cold_start = False
    assert sft.with_cold_start(config).model.init_from == ""
    config.sft.cold_start = True
    (tmp_path / "cold").mkdir()
    summary = {"policy": str(tmp_path / "cold" / "policy"),
               "eval": {"eval/iid/valid_format_rate": 0.9, "eval/iid/success_rate": 0.5, "eval/iid/episodes": 8}}
    (tmp_path / "cold" / sft.SUMMARY_FILE).write_text(json.dumps(summary))
    assert sft.with_cold_start(config).model.init_from == summary["policy"]
    assert f"cold start: reusing {tmp_path / 'cold'} (valid format 0.90, success 0.50 on 8 IID episodes)" \
        in capsys.readouterr().out
    config.model.init_from = str(tmp_path)  # given explicitly: the cold start is not looked at
    assert sft.with_cold_start(config).model.init_from == str(tmp_path)


@pytest.mark.slow
def test_the_expert_records_the_same_turns_whatever_its_engine_played_before(model):
    """ScienceWorld's gold path for find-non-living-thing focuses on the first solid thing of the
    room's contents shuffled in JVM identity-hash order, which depends on all the JVM did before. On
    the run's own engine options a fresh engine focused on the soap in variation 95 and one that had
    played two other variations on a cup; the expert's engine must record the same turns on both."""
    config = tiny_config()
    config.env.max_turns, config.rollout.max_response_len = 8, 32
    spec = envs.EpisodeSpec("find-non-living-thing", 95)
    recordings = []
    for played_before in ((), (90, 91)):
        with envs.make("scienceworld", **sft.expert_env_options(config)) as env:
            for variation in played_before:
                env.reset(spec.task, variation)
                env.step("look around")
            recordings.append(demos_lib.record(env, [spec], model.tokenizer, config, max_episodes=1))
    fresh, after_others = recordings
    assert fresh.episodes[0].won and not fresh.episodes[0].skipped
    assert fresh.episodes[0].actions == after_others.episodes[0].actions
    assert len(fresh.demonstrations) == len(after_others.demonstrations) == len(fresh.episodes[0].actions)
    for a, b in zip(fresh.demonstrations, after_others.demonstrations):
        np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
        np.testing.assert_array_equal(a.target_ids, b.target_ids)


# --- End to end: python -m epo_jax.sft / epo_jax.main on the real ScienceWorld ------------------

def cold_start_args(model_dir, folder) -> list[str]:
    return [f"--config.model.path={model_dir}", f"--config.sft.dir={folder}", "--config.sft.episodes=3",
            "--config.sft.batch_size=1", "--config.algo.micro_batch_size=1", "--config.env.max_turns=8",
            "--config.env.tasks=('find-non-living-thing','lifespan-longest-lived')",
            "--config.rollout.max_response_len=32", "--config.sft.checkpoint_every_steps=1",
            "--config.checkpoint.async_save=False", "--config.sft.eval_episodes=1"]


def run(module: str, *args: str, **kwargs):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    command = [sys.executable, "-m", module, "--config=configs/scienceworld.py", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, text=True, **kwargs)


def finished(proc, timeout=900) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return out


def policy_weights(folder) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(os.path.join(folder, "policy", "model.safetensors"))


@pytest.mark.slow
def test_main_makes_the_cold_start_and_a_killed_one_resumes_to_the_same_weights(tmp_path):
    model_dir = tiny_policy_dir(str(tmp_path / "models"))
    # First use through the README's entry point: the cold start, then RL from it.
    straight = tmp_path / "straight"
    rl = [f"--config.workdir={tmp_path / 'rl'}", "--config.sft.cold_start=True", "--config.train.total_steps=1",
          "--config.epo.beta_schedule=constant", "--config.eval.every_steps=0"]
    out = finished(run("epo_jax.main", *cold_start_args(model_dir, straight), *rl,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    assert "cold start done" in out and f"{straight}/policy (model.init_from" in out and "step 1/1" in out
    summary = json.loads((straight / sft.SUMMARY_FILE).read_text())
    steps = int(summary["learn"]["steps"])
    assert steps == summary["demonstrations"]["turns"] >= 4  # batches of one turn, one epoch
    assert summary["eval"]["eval/iid/episodes"] == 1 and not (straight / "checkpoints").exists()

    # The same cold start killed mid-way (SIGKILL after a checkpoint), then started again.
    resumed = tmp_path / "resumed"
    proc = run("epo_jax.sft", *cold_start_args(model_dir, resumed), stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not any(p.name.isdigit() for p in (resumed / "checkpoints").glob("*")) and time.time() < deadline:
        assert proc.poll() is None, "the cold start ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "policy").exists(), "killed too late: the cold start had finished learning"
    out = finished(run("epo_jax.sft", *cold_start_args(model_dir, resumed), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE))
    assert "resumed the cold start from its checkpoint of step" in out
    assert [r["step"] for r in read_jsonl(str(resumed / "metrics.jsonl"))] == list(range(1, steps + 1))
    straight_weights, resumed_weights = policy_weights(straight), policy_weights(resumed)
    assert sorted(straight_weights) == sorted(resumed_weights)
    for name, value in straight_weights.items():
        np.testing.assert_array_equal(value, resumed_weights[name], err_msg=name)

