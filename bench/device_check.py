"""The accelerator check of epo-jax on one GPU (H100 / H200), printed as one table; run it through
`bench/device_check.sh` (which bounds it to 8 minutes), or with `--cpu` as a smoke run of the same code
paths at toy sizes on a CPU (what CI runs).

Rows, each against a reference measured or computed in the same run:
  sampler     new tokens/s at batch 32 and 128 (256-token prompts, 128 new tokens, prefill included) for
              SmolLM2-135M and a random Qwen2.5-0.5B-shaped model, against the HBM roofline: batch x
              bandwidth / the bytes one decode step reads (every weight as stored, the whole KV cache).
  update      the trainer's update in bfloat16 (remat on, cuDNN attention where available): MFU = model
              FLOPs per second / the chip's dense bfloat16 peak, model FLOPs = 3 x the forward's matrix
              products (the recomputation of remat not counted, as MFU is usually defined).
  attention   model.attention cudnn against xla: forward + backward time on left-padded rows, and the
              largest difference of their outputs.
  memory      the planner's live peak of the update (python -m epo_jax.plan on simulated CPU devices)
              against memory_stats()["peak_bytes_in_use"] after running the same update in a fresh
              process.
  rl steps    two RL steps of the default config (configs/scienceworld.py) on the device: the step lines'
              entropies and seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from epo_jax import plan as plan_lib  # noqa: E402
from epo_jax.models import attention as attention_lib, config as model_config_lib, loading, transformer  # noqa: E402
from epo_jax.models.sampler import Sampler, SamplingParams  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each check runs at: the GPU sizes, or toy ones for the CPU smoke run."""

    batches: tuple[int, ...] = (32, 128)
    prompt_len: int = 256
    new_tokens: int = 128
    update_rows: int = 8
    update_len: int = 2048
    attention: tuple[int, int, int, int, int] = (4, 4096, 14, 2, 64)  # B, T, heads, KV heads, head dim
    layers: int | None = None  # cut every model to this many layers (the smoke run)
    repeats: int = 3


GPU_SIZES = Sizes()
CPU_SIZES = Sizes(batches=(2, 4), prompt_len=16, new_tokens=4, update_rows=2, update_len=64,
                  attention=(2, 128, 4, 2, 16), layers=2, repeats=1)


@dataclasses.dataclass
class Row:
    check: str
    setting: str
    measured: str
    reference: str
    ratio: str
    note: str = ""


def _chip() -> plan_lib.Chip | None:
    """The planner's figures for this device (None on a CPU or an unknown accelerator)."""
    kind = jax.devices()[0].device_kind.lower()
    for key, name in (("h200", "h200-141gb"), ("h100", "h100-80gb"), ("a100", "a100-80gb"), ("v5 lite", "tpu-v5e"),
                      ("v5e", "tpu-v5e"), ("v5p", "tpu-v5p"), ("v4", "tpu-v4"), ("v6", "tpu-v6e")):
        if key in kind:
            return plan_lib.CHIPS[name]
    return None


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of `repeats` calls after a warm-up (compilation excluded)."""
    jax.block_until_ready(fn())
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def _ratio(measured: float | None, reference: float | None) -> str:
    return "-" if not measured or not reference else f"{measured / reference:.2f}"


def _dtype() -> str:
    return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"


# ------------------------------------------------------------------------------------------ sampler

def _sampler_models(sizes: Sizes) -> list[tuple[str, Any, Any, Any]]:
    """(name, graphdef, params, ModelConfig) of SmolLM2-135M (its weights) and a random Qwen2.5-0.5B;
    in the smoke run, random models of both families cut to a few narrow layers."""
    dtype = _dtype()
    with open(os.path.join(model_config_lib.architecture_dir("Qwen2.5-0.5B-Instruct"), "config.json")) as f:
        qwen = model_config_lib.from_hf_config(json.load(f), dtype=dtype)
    if sizes.layers:
        smol = model_config_lib.ModelConfig(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                                            num_layers=sizes.layers, num_heads=4, num_kv_heads=2, head_dim=16,
                                            tie_word_embeddings=True, dtype=dtype)
        small_qwen = qwen.replace(num_layers=sizes.layers, hidden_size=64, intermediate_size=128, num_heads=4,
                                  num_kv_heads=2, head_dim=16, vocab_size=512)
        return [(f"{name} (random, {sizes.layers} narrow layers)", *transformer.init_params(c, jax.random.key(1)), c)
                for name, c in (("SmolLM2-shaped", smol), ("Qwen2.5-shaped", small_qwen))]
    smollm2 = loading.load_pretrained("", dtype=dtype)
    return [("SmolLM2-135M", smollm2.graphdef, smollm2.params, smollm2.config),
            ("Qwen2.5-0.5B (random)", *transformer.init_params(qwen, jax.random.key(0)), qwen)]


def decode_bytes(params, model_config, batch: int, cache_len: int) -> int:
    """Bytes one decode step reads: every weight as stored, and the whole KV cache it attends over."""
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    itemsize = jnp.dtype(model_config.dtype).itemsize
    cache = 2 * model_config.num_layers * batch * model_config.num_kv_heads * cache_len * model_config.head_dim
    return weights + cache * itemsize


def sampler_rows(sizes: Sizes, chip: plan_lib.Chip | None) -> list[Row]:
    rows = []
    rng = np.random.default_rng(0)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=sizes.new_tokens)
    for name, graphdef, params, model_config in _sampler_models(sizes):
        # No EOS: every row makes all its tokens.
        sampler = Sampler(graphdef, model_config, None, eos_token_ids=(), prompt_buckets=(sizes.prompt_len,))
        for batch in sizes.batches:
            prompts = [list(rng.integers(3, model_config.vocab_size, sizes.prompt_len)) for _ in range(batch)]
            seconds = _best_time(lambda: sampler.generate(params, prompts, jax.random.key(0), sampling).tokens,
                                 sizes.repeats)
            tokens_per_s = batch * sizes.new_tokens / seconds
            bound = None
            if chip is not None:
                step_bytes = decode_bytes(params, model_config, batch, sizes.prompt_len + sizes.new_tokens)
                bound = batch * chip.hbm_bytes_per_s / step_bytes
            rows.append(Row("sampler", f"{name}, batch {batch}", f"{tokens_per_s:,.0f} tok/s",
                            "-" if bound is None else f"{bound:,.0f} tok/s roofline", _ratio(tokens_per_s, bound),
                            "prefill included"))
    return rows


# ------------------------------------------------------------------------------------------- update

def _run_config(model_path: str, *, rows: int, length: int):
    from epo_jax import config as config_lib

    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "scienceworld.py"))
    response = min(512, length // 4)
    config.model.path, config.model.dtype, config.model.remat = model_path, _dtype(), True
    config.rollout.max_response_len = response
    config.rollout.max_prompt_len, config.rollout.prompt_buckets = length - response, (length - response,)
    config.algo.micro_batch_size, config.mesh.data = rows, 1
    return config


def _dense_batch(config, rows: int, vocab: int) -> dict[str, np.ndarray]:
    """An update batch whose every token is real (random ids), as a full step would have."""
    rng = np.random.default_rng(0)
    prompt, response = config.rollout.max_prompt_len, config.rollout.max_response_len
    batch = {"tokens": rng.integers(3, vocab, (rows, prompt + response)).astype(np.int32),
             "attention_mask": np.ones((rows, prompt + response), bool)}
    for key, value in (("response_mask", 1.0), ("old_logprobs", -2.0), ("old_values", 0.0), ("ref_logprobs", -2.0),
                       ("returns", 1.0)):
        batch[key] = np.full((rows, response), value, np.float32)
    batch["advantages"] = rng.standard_normal((rows, response)).astype(np.float32)
    ints = dict(turn_index=np.zeros(rows), traj_id=np.arange(rows), group_id=np.arange(rows), anchor_id=np.zeros(rows))
    batch.update({k: v.astype(np.int32) for k, v in ints.items()})
    batch.update(episode_reward=np.ones(rows, np.float32), turn_penalty=np.zeros(rows, np.float32),
                 last_turn=np.ones(rows, bool), valid=np.ones(rows, bool))
    return batch


def build_update(config):
    """(update program, train state, ModelConfig, KL reference) of the trainer for a config, random weights."""
    from epo_jax.train import actor_critic, optim, sharding, trainer
    from epo_jax.train.update import init_train_state

    with open(os.path.join(config.model.path, "config.json")) as f:
        model_config = model_config_lib.from_hf_config(json.load(f), dtype=config.model.dtype,
                                                       remat=config.model.remat, attention=config.model.attention)
    mesh = sharding.make_mesh(config.mesh)
    graphdef, policy = transformer.init_params(model_config, jax.random.key(0))
    optimizer = optim.make_optimizer(config.optim, 100)
    state = init_train_state(config, actor_critic.init_params(config, policy, model_config.hidden_size), optimizer,
                             mesh)
    ref = jax.tree.map(jnp.copy, sharding.place_params({"policy": policy}, mesh)["policy"])
    programs = trainer.jit_learner_programs(config, graphdef, optimizer, jax.tree.map(lambda x: x.sharding, state))
    return programs.update, state, model_config, ref


def model_flops(model_config, rows: int, length: int, response: int) -> float:
    """3 x the forward's matrix products (forward + backward) of the decoder over every token and of
    the log-prob head over the response tokens; attention counted over all keys, as the xla kernel
    computes it."""
    d, f, n, k, h = (model_config.hidden_size, model_config.intermediate_size, model_config.num_heads,
                     model_config.num_kv_heads, model_config.head_dim)
    per_token = model_config.num_layers * (2 * (2 * d * n * h + 2 * d * k * h + 3 * d * f) + 4 * length * n * h)
    return 3 * rows * (length * per_token + response * 2 * model_config.vocab_size * d)


def update_rows(sizes: Sizes, chip: plan_lib.Chip | None) -> list[Row]:
    arch = model_config_lib.architecture_dir("Qwen2.5-0.5B-Instruct")
    model_path = arch
    if sizes.layers:
        model_path = _cut_architecture(arch, sizes.layers)
    config = _run_config(model_path, rows=sizes.update_rows, length=sizes.update_len)
    from epo_jax.train import sharding

    update, state, model_config, _ = build_update(config)
    batch = sharding.shard_batch(_dense_batch(config, sizes.update_rows, model_config.vocab_size),
                                 sharding.make_mesh(config.mesh))
    holder = {"state": state}

    def step():
        holder["state"], metrics = update(holder["state"], batch)
        return metrics["loss"] if "loss" in metrics else jax.tree.leaves(metrics)[0]

    seconds = _best_time(step, sizes.repeats)
    flops = model_flops(model_config, sizes.update_rows, sizes.update_len, config.rollout.max_response_len)
    achieved = flops / seconds
    peak = None if chip is None else chip.bf16_flops
    return [Row("update", f"Qwen2.5-0.5B{' cut' if sizes.layers else ''} (random), {sizes.update_rows} x "
                f"{sizes.update_len} tokens, {model_config.dtype}, {model_config.attention} attention",
                f"{achieved / 1e12:.1f} TFLOP/s", "-" if peak is None else f"{peak / 1e12:.0f} TFLOP/s peak",
                _ratio(achieved, peak), "MFU; remat on" + ("" if chip else " (no chip peak on this device)"))]


def _cut_architecture(arch_dir: str, layers: int) -> str:
    with open(os.path.join(arch_dir, "config.json")) as f:
        hf = json.load(f)
    hf.update(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512)
    folder = tempfile.mkdtemp(prefix="device-check-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)
    return folder


# ---------------------------------------------------------------------------------------- attention

def attention_rows(sizes: Sizes) -> list[Row]:
    b, t, n, k, h = sizes.attention
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(_dtype())
    q = jnp.asarray(rng.standard_normal((b, t, k, n // k, h)), dtype)
    kk = jnp.asarray(rng.standard_normal((b, k, t, h)), dtype)
    v = jnp.asarray(rng.standard_normal((b, k, t, h)), dtype)
    lengths = np.linspace(t // 2, t, b).astype(int)  # left-padded rows of different lengths
    segments = jnp.asarray(np.arange(t)[None, :] >= (t - lengths)[:, None], jnp.int32)
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    kernels = ["xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
    outputs, times = {}, {}
    for kernel in kernels:
        def loss(q, kk, v, kernel=kernel):
            out = attention_lib.attend(q, kk, v, positions, segments, implementation=kernel, query_chunk=512)
            return jnp.sum(out.astype(jnp.float32) ** 2), out

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        times[kernel] = _best_time(lambda grad=grad: grad(q, kk, v)[0][0], sizes.repeats)
        outputs[kernel] = np.asarray(grad(q, kk, v)[0][1].astype(jnp.float32))
    setting = f"B={b} T={t} heads={n}/{k} Hd={h} {dtype.name}, forward + backward"
    if "cudnn" not in times:
        return [Row("attention", setting, f"xla {times['xla'] * 1e3:.1f} ms", "-", "-", "cudnn needs an NVIDIA GPU")]
    diff = float(np.max(np.abs(outputs["cudnn"] - outputs["xla"])))
    return [Row("attention", setting, f"cudnn {times['cudnn'] * 1e3:.1f} ms", f"xla {times['xla'] * 1e3:.1f} ms",
                _ratio(times["xla"], times["cudnn"]), f"speed-up; max |cudnn - xla| = {diff:.3g}")]


# ------------------------------------------------------------------------------------------- memory

def _memory_fields(model_path: str, sizes: Sizes) -> dict[str, Any]:
    """The planned and measured layout: the default config's shapes (toy prompts in the smoke run),
    one device, the device's compute dtype."""
    fields = {"model.path": model_path, "model.dtype": _dtype(), "mesh.data": 1,
              "algo.micro_batch_size": sizes.update_rows}
    if sizes.layers:
        fields.update({"rollout.max_prompt_len": 32, "rollout.prompt_buckets": (32,), "rollout.max_response_len": 8})
    return fields


def _memory_config_args(model_path: str, sizes: Sizes) -> list[str]:
    return [f"--config={os.path.join(ROOT, 'configs', 'scienceworld.py')}"] + [
        f"--config.{name}={value}" for name, value in _memory_fields(model_path, sizes).items()]


def start_planner(model_path: str, sizes: Sizes, chip_name: str, out_json: str) -> subprocess.Popen:
    """`python -m epo_jax.plan` for the memory row, on the host's CPUs while the device runs the other checks."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    args = [sys.executable, "-m", "epo_jax.plan", *_memory_config_args(model_path, sizes), "--devices=1",
            f"--chip={chip_name}", "--search=false", f"--json={out_json}"]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def measure_update_peak(model_path: str, sizes: Sizes) -> dict[str, Any]:
    """In this (fresh) process: the trainer's state, KL reference and update batch for the planner's
    layout, one update run; the device's peak bytes in use."""
    from epo_jax import config as config_lib
    from epo_jax.train import batch as batch_lib, sharding

    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "scienceworld.py"))
    for name, value in _memory_fields(model_path, sizes).items():
        section, field = name.split(".")
        config[section][field] = value
    rows = batch_lib.update_rows(config.env.num_groups * config.env.group_size * config.env.max_turns,
                                 num_minibatches=config.algo.num_minibatches, micro_batch_size=sizes.update_rows)
    config.rollout.max_prompt_len = config.rollout.prompt_buckets[-1]
    update, state, model_config, ref = build_update(config)
    mesh = sharding.make_mesh(config.mesh)
    batch = sharding.shard_batch(_dense_batch(config, rows, model_config.vocab_size), mesh)
    state, metrics = update(state, batch)
    jax.block_until_ready(metrics)
    stats = jax.devices()[0].memory_stats() or {}
    return {"peak_bytes_in_use": stats.get("peak_bytes_in_use"), "rows": rows, "ref": len(jax.tree.leaves(ref))}


def memory_rows(sizes: Sizes, planner: subprocess.Popen, plan_json: str, model_path: str) -> list[Row]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        measured = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure-update-peak", model_path,
                                   *(["--cpu"] if sizes.layers else [])], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=600)
        output, _ = planner.communicate(timeout=600)
    except subprocess.TimeoutExpired as error:
        planner.kill()
        return [Row("memory", "update, planner vs device", "failed", "-", "-", f"timed out: {error.cmd[1:3]}")]
    if planner.returncode or measured.returncode:
        failed = output if planner.returncode else measured.stderr
        return [Row("memory", "update, planner vs device", "failed", "-", "-", failed.strip().splitlines()[-1])]
    with open(plan_json) as f:
        predicted = json.load(f)["programs"]["update"]["live_peak_gib"] * plan_lib.GiB
    peak = json.loads(measured.stdout.strip().splitlines()[-1])["peak_bytes_in_use"]
    setting = f"update of the default config's shapes, 1 device, {_dtype()}"
    if peak is None:
        return [Row("memory", setting, "-", f"planner {_gib(predicted)}", "-",
                    f"no memory_stats() on {jax.default_backend()}")]
    return [Row("memory", setting, f"{_gib(peak)} peak_bytes_in_use",
                f"planner {_gib(predicted)}", _ratio(peak, predicted), "measured / predicted")]


def _gib(num_bytes: float) -> str:
    """Three significant figures: the smoke run's toy update is a few MiB, which .2f would print as 0.00."""
    return f"{num_bytes / plan_lib.GiB:.3g} GiB"


# ---------------------------------------------------------------------------------------- rl steps

_STEP_LINE = re.compile(r"step (\d+)/\d+ \|.*?\| H ([0-9.]+)")


def rl_rows(sizes: Sizes) -> list[Row]:
    if sizes.layers:
        return [Row("rl steps", "default config, 2 steps", "-", "-", "-", "not in the CPU smoke run (minutes)")]
    missing = [m for m in ("scienceworld",) if subprocess.run([sys.executable, "-c", f"import {m}"],
                                                              capture_output=True).returncode]
    if missing or subprocess.run(["java", "-version"], capture_output=True).returncode:
        return [Row("rl steps", "default config, 2 steps", "-", "-", "-", "needs scienceworld and Java 17")]
    workdir = tempfile.mkdtemp(prefix="device-check-run-")
    args = [sys.executable, "-m", "epo_jax.main", f"--config={os.path.join(ROOT, 'configs', 'scienceworld.py')}",
            "--config.train.total_steps=2", f"--config.workdir={workdir}", "--config.eval.every_steps=0"]
    start = time.perf_counter()
    out = subprocess.run(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                         timeout=360)
    seconds = time.perf_counter() - start
    text = out.stdout + out.stderr
    entropies = [m.group(2) for m in _STEP_LINE.finditer(text)]
    if out.returncode:
        return [Row("rl steps", "default config, 2 steps", "failed", "-", "-", text.strip().splitlines()[-1])]
    return [Row("rl steps", f"default config, 2 steps on {jax.default_backend()}", f"{seconds:.0f} s with compiles",
                "CPU entropies 3.135, 3.118", "-", "entropies " + ", ".join(entropies))]


# -------------------------------------------------------------------------------------------- table

def print_table(rows: list[Row], title: str) -> None:
    headers = ("check", "setting", "measured", "reference", "ratio", "note")
    cells = [headers] + [dataclasses.astuple(row) for row in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(headers))]
    print(title)
    for i, cell in enumerate(cells):
        print("| " + " | ".join(str(v).ljust(w) for v, w in zip(cell, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="smoke run at toy sizes on a CPU")
    parser.add_argument("--only", nargs="*", default=["sampler", "update", "attention", "memory", "rl"],
                        help="checks to run")
    parser.add_argument("--measure-update-peak", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = CPU_SIZES if args.cpu else GPU_SIZES
    if args.measure_update_peak:
        print(json.dumps(measure_update_peak(args.measure_update_peak, sizes)))
        return
    chip = _chip()
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
    plan_json = os.path.join(tempfile.mkdtemp(prefix="device-check-plan-"), "plan.json")
    memory_model = (_cut_architecture(model_config_lib.architecture_dir("Qwen2.5-0.5B-Instruct"), sizes.layers)
                    if sizes.layers else model_config_lib.architecture_dir("Qwen2.5-0.5B-Instruct"))
    planner = (start_planner(memory_model, sizes, chip.name if chip else "h100-80gb", plan_json)
               if "memory" in args.only else None)
    rows: list[Row] = []
    checks = {"sampler": lambda: sampler_rows(sizes, chip), "update": lambda: update_rows(sizes, chip),
              "attention": lambda: attention_rows(sizes),
              "memory": lambda: memory_rows(sizes, planner, plan_json, memory_model), "rl": lambda: rl_rows(sizes)}
    for name in args.only:
        start = time.perf_counter()
        rows += checks[name]()
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    print_table(rows, f"epo-jax device check on {device}" + (" (CPU smoke run, toy sizes)" if args.cpu else ""))


if __name__ == "__main__":
    main()
