"""`python -m epo_jax.plan`: the run's programs compiled for a mesh of 8 simulated devices, on a tiny
architecture-only Qwen2 folder (a config.json, no weights).

References: the trainer's own train state (concrete arrays from `init_train_state`) for the
abstract layout and its per-device bytes; the trainer's jitted update compiled on concrete
arguments for the planner's memory figures; FLOPs written from the transformer's matrix products
(numpy arithmetic on the architecture, not the planner's counts); hand-listed meshes.
"""
import json
import os
import runpy
import subprocess
import sys

import jax
import numpy as np
import pytest

from epo_jax import plan as plan_lib
from epo_jax.errors import UserError
from epo_jax.models import transformer
from epo_jax.train import actor_critic, batch as batch_lib, sharding, trainer
from epo_jax.train.update import init_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Matrix products dominate at this width (D = 256), so FLOPs counted by XLA and written from the
# products agree to a few percent (norms, RoPE and softmax make the rest).
TINY_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 1024, "tie_word_embeddings": True, "hidden_act": "silu", "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "max_position_embeddings": 4096, "eos_token_id": 2}
PROMPT, RESPONSE, ROWS = 64, 16, 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    (path / "config.json").write_text(json.dumps(TINY_QWEN2))
    return str(path)


@pytest.fixture(scope="module")
def config(model_dir):
    c = runpy.run_path(os.path.join(ROOT, "configs", "scienceworld.py"))["get_config"]()
    c.model.path = model_dir
    c.model.dtype = "auto"          # bfloat16 on the planned GPU
    c.env.num_groups, c.env.group_size = 4, 2
    c.rollout.max_prompt_len, c.rollout.prompt_buckets, c.rollout.max_response_len = PROMPT, (32, PROMPT), RESPONSE
    c.algo.micro_batch_size = ROWS  # one row per device on data = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    return c


@pytest.fixture(scope="module")
def planned(config):
    lines = []
    result = plan_lib.plan(config, chip=plan_lib.CHIPS["h100-80gb"], num_devices=8, mfu=0.5, run_search=False,
                           report=lines.append)
    return result, lines


def test_abstract_train_state_is_the_trainers(config):
    """The planner's abstract state has the trainer's leaves, shardings and per-device bytes."""
    model_config = plan_lib.model_config_for(config, TINY_QWEN2, plan_lib.CHIPS["h100-80gb"])
    run = plan_lib.abstract_run(config, model_config, jax.devices())
    _, policy = transformer.init_params(model_config, jax.random.key(0))
    params = actor_critic.init_params(config, policy, model_config.hidden_size)
    state = init_train_state(config, params, run.optimizer, run.mesh)
    for abstract, real in zip(jax.tree.leaves(run.state), jax.tree.leaves(state), strict=True):
        assert (abstract.shape, abstract.dtype) == (real.shape, real.dtype)
        assert abstract.sharding.is_equivalent_to(real.sharding, len(real.shape))
    # The policy's AdamW moments (optax: clip, then per-label chains whose first state is Adam's) are
    # sharded like the policy's params: the FSDP memory saving holds for the optimizer state too.
    adam = state.opt_state[1].inner_states["policy"].inner_state[0]
    for moment in (adam.mu["policy"], adam.nu["policy"]):
        for param, leaf in zip(jax.tree.leaves(state.params["policy"]), jax.tree.leaves(moment), strict=True):
            assert leaf.sharding.is_equivalent_to(param.sharding, len(param.shape))
    assert any(len(leaf.sharding.device_set) == 8 and leaf.sharding.spec != jax.sharding.PartitionSpec()
               for leaf in jax.tree.leaves(adam.mu["policy"]))
    on_device_0 = sum(shard.data.nbytes for leaf in jax.tree.leaves(state) for shard in leaf.addressable_shards
                      if shard.device == jax.devices()[0])
    assert plan_lib.device_bytes(run.state) == on_device_0
    assert run.resident_bytes == on_device_0 + plan_lib.device_bytes(run.ref_params)


def test_update_memory_is_that_of_the_trainers_compiled_update(config, planned):
    """The trainer's jitted update, compiled on concrete arguments (a real train state and a real
    sharded batch), has the planner's argument, output and temporary bytes."""
    result, _ = planned
    model_config = plan_lib.model_config_for(config, TINY_QWEN2, plan_lib.CHIPS["h100-80gb"])
    run = plan_lib.abstract_run(config, model_config, jax.devices())
    _, policy = transformer.init_params(model_config, jax.random.key(0))
    state = init_train_state(config, actor_critic.init_params(config, policy, model_config.hidden_size),
                             run.optimizer, run.mesh)
    programs = trainer.jit_learner_programs(config, run.graphdef, run.optimizer,
                                            jax.tree.map(lambda x: x.sharding, state))
    rows = result["workload"]["update_rows"]
    host = batch_lib.build_batch([], prompt_buckets=config.rollout.prompt_buckets, response_len=RESPONSE, rows=rows,
                                 pad_id=0, padding_id_start=0, prompt_len=PROMPT)
    host.update(old_values=np.zeros((rows, RESPONSE), np.float32), ref_logprobs=np.zeros((rows, RESPONSE), np.float32),
                advantages=np.zeros((rows, RESPONSE), np.float32), returns=np.zeros((rows, RESPONSE), np.float32))
    batch = sharding.shard_batch(host, run.mesh)
    memory = programs.update.lower(state, batch).compile(
        compiler_options=plan_lib.COMPILER_OPTIONS).memory_analysis()
    planned_update = result["programs"]["update"]
    assert planned_update["argument_gib"] * plan_lib.GiB == memory.argument_size_in_bytes
    assert planned_update["output_gib"] * plan_lib.GiB == memory.output_size_in_bytes
    assert planned_update["temp_gib"] * plan_lib.GiB == memory.temp_size_in_bytes


def _forward_flops_per_token(hf, tokens_seen: int) -> float:
    """Matrix-product FLOPs of one token through the decoder layers, attending to `tokens_seen` keys."""
    d, f = hf["hidden_size"], hf["intermediate_size"]
    n, k = hf["num_attention_heads"], hf["num_key_value_heads"]
    h = d // n
    projections = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
    return hf["num_hidden_layers"] * (2 * projections + 4 * tokens_seen * n * h)


def test_flops_per_step_match_the_matrix_products(planned):
    """The extrapolated FLOP counts against the products written out: update = forward + recomputed
    forward + backward (2x) of every layer and of the log-prob head; prefill = one forward over the
    prompts; decode = one forward of a token against the whole cache, for every row."""
    result, _ = planned
    hf, w = TINY_QWEN2, result["workload"]
    length = PROMPT + RESPONSE
    head = 2 * hf["vocab_size"] * hf["hidden_size"]
    update = 4 * (length * _forward_flops_per_token(hf, length) + RESPONSE * head) * w["update_rows"]
    prefill = PROMPT * _forward_flops_per_token(hf, PROMPT) * w["environments"] + head * w["environments"]
    decode = (_forward_flops_per_token(hf, PROMPT + RESPONSE) + head) * w["environments"] * RESPONSE
    flops = result["flops_per_step"]
    np.testing.assert_allclose(flops["update"], update, rtol=0.1)
    np.testing.assert_allclose(flops["prefill"], prefill * w["turns"], rtol=0.1)
    # A decode step also converts every weight (float32 -> bfloat16, and XLA:CPU's bfloat16 -> float32
    # for its matrix kernels), one FLOP per element each: at 8 rows that is a quarter of the products.
    np.testing.assert_allclose(flops["decode"], decode * w["turns"], rtol=0.35)


def test_step_time_follows_from_flops_and_the_chip(planned):
    result, lines = planned
    chip = plan_lib.CHIPS["h100-80gb"]
    rate = chip.bf16_flops * 8 * 0.5
    for name in ("update", "score pass", "prefill"):
        assert result["seconds_per_step"][name] == pytest.approx(result["flops_per_step"][name] / rate)
    assert result["run_hours"] == pytest.approx(result["step_minutes"] * 60 * result["workload"]["total_steps"] / 3600)
    assert result["fits"]
    assert any(line.startswith("memory: XLA:CPU's buffer assignment") for line in lines)


@pytest.mark.slow
def test_search_returns_the_fewest_devices_that_fit(config):
    """A tiny model fits one H100: the search stops at one device, the config's micro-batch, with
    the peak it compiled."""
    lines = []
    found = plan_lib.search(config, TINY_QWEN2, plan_lib.CHIPS["h100-80gb"], jax.devices(),
                            plan_lib._workload(config, 0, 0), lines.append)
    assert found.mesh_shape == (1, 1, 1) and found.micro_batch_size == ROWS
    assert 0 < found.peak_bytes <= plan_lib.CHIPS["h100-80gb"].usable_bytes
    # One row per batch shard first (it fits, so some micro-batch does), then the config's.
    assert [line.split(":")[0] for line in lines] == ["  1 devices, mesh data=1 fsdp=1 tensor=1, micro-batch 1",
                                                      "  1 devices, mesh data=1 fsdp=1 tensor=1, micro-batch 8"]


def test_mesh_and_micro_batch_candidates():
    assert sorted(plan_lib.mesh_shapes(8, 2)) == sorted([
        (8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2)])
    assert plan_lib.mesh_shapes(1, 4) == [(1, 1, 1)]
    c = runpy.run_path(os.path.join(ROOT, "configs", "base.py"))["get_config"]()
    c.algo.micro_batch_size = 64
    assert plan_lib.micro_batch_sizes(c, (1, 8, 1)) == [64, 32, 16, 8]
    assert plan_lib.micro_batch_sizes(c, (2, 1, 4)) == [64, 32, 16, 8, 4, 2]


def test_search_drops_meshes_whose_state_overflows_without_compiling(config):
    """A chip smaller than the resident state of every mesh: nothing fits, nothing is compiled."""
    chip = plan_lib.Chip("tiny", "gpu", 1024, 1.0, 1e12, 1e12)
    lines = []
    workload = plan_lib._workload(config, 0, 0)
    assert plan_lib.search(config, TINY_QWEN2, chip, jax.devices(), workload, lines.append) is None
    assert len(lines) == sum(len(plan_lib.mesh_shapes(n, 2)) for n in (1, 2, 4, 8))
    assert all("not compiled" in line for line in lines)


def test_bad_input_is_one_line_naming_the_flag(config, tmp_path):
    with pytest.raises(UserError, match=r"--config.model.path=.*has no config.json"):
        plan_lib._hf_config(str(tmp_path))
    with pytest.raises(UserError, match=r"--prompt_len=100 is not one of rollout.prompt_buckets"):
        plan_lib._workload(config, 100, 0)
    bad = config.copy_and_resolve_references()
    bad.algo.micro_batch_size = 3
    with pytest.raises(UserError, match=r"algo.micro_batch_size=3 must be a multiple"):
        plan_lib.abstract_run(bad, plan_lib.model_config_for(bad, TINY_QWEN2, plan_lib.CHIPS["tpu-v5e"]),
                              jax.devices())
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "epo_jax.plan", "--config=configs/scienceworld.py",
                          "--chip=h900"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: --chip='h900' is not one of h100-80gb")


def test_lora_state_is_the_trainers_and_holds_no_reference_copy(config):
    """With LoRA the planner's abstract state is the trainer's (base in bfloat16 with adapters, moments
    for the trained leaves only), the KL reference is the base itself, and the per-device bytes are
    those written out from the shapes: base at 2 bytes, adapters and heads at 4 bytes and their two
    moments, no reference copy."""
    lora_config = config.copy_and_resolve_references()
    lora_config.model.lora.rank, lora_config.model.lora.base_dtype = 4, "bfloat16"
    lora_config.mesh.data, lora_config.mesh.fsdp, lora_config.mesh.tensor = 1, 1, 1
    lora_config.algo.micro_batch_size = 1
    model_config = plan_lib.model_config_for(lora_config, TINY_QWEN2, plan_lib.CHIPS["h100-80gb"])
    assert model_config.param_dtype == "bfloat16"
    run = plan_lib.abstract_run(lora_config, model_config, jax.devices()[:1])
    graphdef, base = transformer.init_params(model_config, jax.random.key(0))
    _, policy = actor_critic.policy_model(lora_config, graphdef, base)
    state = init_train_state(lora_config, actor_critic.init_params(lora_config, policy, model_config.hidden_size),
                             run.optimizer, run.mesh)
    for abstract, real in zip(jax.tree.leaves(run.state), jax.tree.leaves(state), strict=True):
        assert (abstract.shape, abstract.dtype) == (real.shape, real.dtype)
    assert run.ref_params is None and run.reference_graphdef is not None
    reference = run.reference_args
    assert [x.shape for x in jax.tree.leaves(reference)] == [x.shape for x in jax.tree.leaves(base)]
    # Bytes from the architecture: every projection of every layer gets A [in, r] and B [r, out].
    d, f, layers, r = TINY_QWEN2["hidden_size"], TINY_QWEN2["intermediate_size"], TINY_QWEN2["num_hidden_layers"], 4
    h = d // TINY_QWEN2["num_attention_heads"]
    q, kv = TINY_QWEN2["num_attention_heads"] * h, TINY_QWEN2["num_key_value_heads"] * h
    projections = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    adapters = layers * sum(r * (i + o) for i, o in projections)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    base_count = count(base)
    assert count(state.params["policy"]) == base_count + adapters
    trained = count(state.params) - base_count  # the adapters, and the value head and critic where there are
    assert count(actor_critic.split_trainable(state.params)[0]) == trained
    # Everything else, read off the trainer's concrete state: optax's step counts, EPO's history, the key.
    counters = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if np.issubdtype(x.dtype, np.integer))
    small = sum(np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x).nbytes
                for x in jax.tree.leaves((state.loss_state, state.rng)))
    assert run.resident_bytes == 2 * base_count + 4 * trained + 2 * 4 * trained + counters + small
