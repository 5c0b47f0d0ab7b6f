"""The benchmark suite: one command, one table of where epo-jax's time goes.

    python bench/run_all.py [--quick] [--only sampler update loss envs rl_step] [--out table.md]

Every row is a ratio between two measurements taken in this same run, so a noisy or shared
machine moves both sides alike instead of misleading:

  sampler   new tokens/s of our jitted KV-cache sampler against `transformers` PyTorch `generate`
            on the embedded SmolLM2-135M-Instruct, batch 1 / 8 / 32 (bench/sampler.py), and
            against the memory-bandwidth limit (bytes a decode step reads / measured copy rate);
  update    one jitted PPO+EPO update of SmolLM2 (epo_jax.train.update, rematerialised layers):
            tokens/s, and model FLOPs utilisation = model FLOP/s (PaLM's 6N + 12 L D T per token)
            against the peak FLOP/s of a large jitted matmul measured here, in float32 and in
            bfloat16 compute;
  loss      the EPO objective against plain PPO (value_and_grad step time), and the chunked
            log-prob / entropy head against the naive one (compiled peak memory at a 152k
            vocabulary; bench/loss.py);
  envs      ScienceWorld steps/s, our fast step against the package's step(), 1 / 4 / 8 engines
            (bench/envs.py);
  rl_step   one full RL step of the README's default run (SmolLM2, real ScienceWorld), split into
            generation, environment and update time, each as a fraction of the step (the faster
            of steps 2 and 3: step 1 compiles).

JAX runs on its default backend (an accelerator where present); the PyTorch reference always runs
on the CPU. `--quick` shrinks every section for a smoke run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
SECTIONS = ("sampler", "update", "loss", "envs", "rl_step")


def _bench_module(name: str):
    """A sibling script of bench/ as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(section: str, measurement: str, value: float, unit: str, reference: str, reference_value: float,
         ratio: float, note: str = "") -> dict:
    return dict(section=section, measurement=measurement, value=value, unit=unit, reference=reference,
                reference_value=reference_value, ratio=ratio, note=note)


def sampler_rows(quick: bool) -> list[dict]:
    import torch
    import transformers

    from epo_jax.models import loading
    from epo_jax.models.sampler import Sampler, SamplingParams

    bench = _bench_module("sampler")
    policy = loading.load_pretrained("")
    with tempfile.TemporaryDirectory() as folder:
        loading.save_pretrained(policy.params, policy.config, policy.tokenizer, folder)
        reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    prompt_len, new_tokens = 64, (16 if quick else 64)
    sampler = Sampler(policy.graphdef, policy.config, policy.tokenizer, eos_token_ids=(), prompt_buckets=(prompt_len,))
    sampling = SamplingParams(temperature=1.0, max_new_tokens=new_tokens)
    bandwidth = bench.copy_bandwidth()
    rng = np.random.RandomState(0)
    rows = []
    for batch in ((1, 8) if quick else (1, 8, 32)):
        prompts = [list(rng.randint(100, 40000, prompt_len)) for _ in range(batch)]
        sampler.generate(policy.params, prompts, jax.random.key(0), sampling)  # compile
        bench.time_torch(reference, prompts, 2)  # warm-up
        ours = theirs = np.inf
        for round_index in range(2 if quick else 3):  # interleaved rounds, best of each
            ours = min(ours, bench.time_ours(sampler, policy.params, prompts, sampling, round_index + 1))
            theirs = min(theirs, bench.time_torch(reference, prompts, new_tokens))
        tokens = batch * new_tokens
        step_bytes = bench.bytes_per_step(policy, bench.sampler_batch(batch), prompt_len + new_tokens)
        fraction = step_bytes * (new_tokens / ours) / bandwidth
        rows.append(_row("sampler", f"decode, batch {batch}", tokens / ours, "tok/s",
                         f"transformers generate (CPU, fp32, {torch.get_num_threads()} threads)", tokens / theirs, theirs / ours,
                         f"{fraction:.0%} of the {bandwidth / 1e9:.1f} GB/s copy bandwidth"))
    return rows


def matmul_peak(dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted n x n x n matmul chain in `dtype` (the best of `repeats`)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype) / np.sqrt(n)

    @jax.jit
    def chain(x):
        for _ in range(4):
            x = x @ a
        return x

    chain(a).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        chain(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 4 * 2 * n**3 / best


def _update_batch(rows: int, prompt: int, response: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "tokens": rng.integers(3, vocab, size=(rows, prompt + response)).astype(np.int32),
        "attention_mask": np.ones((rows, prompt + response), bool),
        "response_mask": np.ones((rows, response), np.float32),
        "old_logprobs": (-4.0 + 0.3 * rng.standard_normal((rows, response))).astype(np.float32),
        "ref_logprobs": (-4.0 + 0.3 * rng.standard_normal((rows, response))).astype(np.float32),
        "advantages": rng.standard_normal((rows, response)).astype(np.float32),
        "returns": rng.standard_normal((rows, response)).astype(np.float32),
        "old_values": rng.standard_normal((rows, response)).astype(np.float32),
        "turn_index": np.zeros(rows, np.int32),
        "traj_id": np.arange(rows, dtype=np.int32),
    }


def update_rows(quick: bool) -> list[dict]:
    import runpy

    from epo_jax.models.loading import load_pretrained
    from epo_jax.train import actor_critic, optim, sharding
    from epo_jax.train.update import init_train_state, make_update_fn

    rows_per_batch, prompt, response = 2, (64 if quick else 256), 64
    out = []
    for dtype in ("float32", "bfloat16"):
        config = runpy.run_path(str(ROOT / "configs" / "scienceworld.py"))["get_config"]()
        config.algo.micro_batch_size = rows_per_batch
        config.rollout.max_response_len = response
        config.model.dtype = dtype
        loaded = load_pretrained("", dtype=dtype, remat=True)
        mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
        params = actor_critic.init_params(config, loaded.params, loaded.config.hidden_size)
        optimizer = optim.make_optimizer(config.optim, 100)
        state = init_train_state(config, params, optimizer, mesh)
        update = jax.jit(make_update_fn(config, actor_critic.make_forward_fn(config, loaded.graphdef), optimizer),
                         donate_argnums=(0,))
        batch = sharding.shard_batch(_update_batch(rows_per_batch, prompt, response, loaded.config.vocab_size), mesh)
        state, _ = update(state, batch)  # compile
        jax.block_until_ready(state)
        best = np.inf
        for _ in range(1 if quick else 2):
            start = time.perf_counter()
            state, metrics = update(state, batch)
            jax.block_until_ready(metrics)
            best = min(best, time.perf_counter() - start)
        cfg = loaded.config
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(loaded.params))
        seq = prompt + response
        tokens = rows_per_batch * seq
        model_flops = tokens * (6 * n_params + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq)
        peak = matmul_peak(jnp.dtype(dtype))
        out.append(_row("update", f"PPO+EPO update, {dtype} compute, {rows_per_batch} x {seq} tokens",
                        tokens / best, "tok/s", f"{dtype} 2048^3 matmul peak", peak / 1e9,
                        model_flops / best / peak,
                        f"ratio = MFU: {model_flops / best / 1e9:.1f} model GFLOP/s of {peak / 1e9:.0f} peak"))
    return out


def loss_rows(quick: bool) -> list[dict]:
    bench = _bench_module("loss")
    epo_config, ppo_config = bench.run_config("epo"), bench.run_config("none")
    state = bench.loss_state_with_history(epo_config)
    vocab, hidden, chunk = 151936, 896, 1024
    params, data = bench.make_inputs(1 if quick else 2, 256 if quick else 512, vocab, hidden)
    forward = bench.chunked_forward(chunk)
    times = {}
    for name, config in (("ppo", ppo_config), ("epo", epo_config)):
        step = jax.jit(jax.value_and_grad(bench.loss_fn_for(config, forward), has_aux=True))
        times[name] = bench.time_step(step, params, data, state, 2 if quick else 3)
    tokens = data["targets"].size
    rows = [_row("loss", "EPO objective (paper mode), value_and_grad", times["epo"], "s/step",
                 "plain PPO objective", times["ppo"], times["epo"] / times["ppo"],
                 f"head only: {tokens} tokens, V = {vocab}, D = {hidden}")]
    batch, seq = (8, 1024) if quick else (64, 1024)
    shapes = bench.input_shapes(batch, seq, vocab, hidden)
    chunked = bench.memory_row(forward, epo_config, *shapes, state)
    naive = bench.memory_row(bench.naive_forward, epo_config, *shapes, state)
    rows.append(_row("loss", f"chunked log-prob/entropy head, {batch} x {seq} x {vocab}", chunked["total"],
                     "GiB peak", "naive [B, T, V] logits", naive["total"], chunked["total"] / naive["total"],
                     "compiled memory_analysis(), never executed"))
    return rows


def env_rows(quick: bool) -> list[dict]:
    bench = _bench_module("envs")
    rows = []
    for r in bench.scienceworld_rows((1, 4) if quick else (1, 4, 8), rounds=10 if quick else 30,
                                     repeats=2 if quick else 3):
        if r["variant"] != "ours":
            continue
        rows.append(_row("envs", f"ScienceWorld fast step, {r['num_envs']} engines", r["steps_per_s"], "steps/s",
                         "the package's step()", r["reference_steps_per_s"], r["ratio"]))
    return rows


def rl_step_rows(quick: bool) -> list[dict]:
    """Three RL steps of the README's default run in a fresh work directory; the fastest of steps
    2 and 3 is reported (step 1 compiles, and a batch of a new bucket shape compiles again)."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "epo_jax.main", "--config=configs/scienceworld.py",
                   f"--config.workdir={workdir}", "--config.train.total_steps=3", "--config.eval.every_steps=0",
                   "--config.checkpoint.every_steps=1000"]
        if quick:
            command += ["--config.env.max_turns=2", "--config.rollout.max_response_len=16"]
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"the RL step run failed:\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    step = min(records[1:], key=lambda r: r["time/step_s"])
    total = step["time/step_s"]
    parts = {"generation (sampler)": step["time/generate_s"], "environment steps": step["time/env_s"],
             "update (score, advantages, PPO+EPO)": step["time/update_s"]}
    parts["other (prompts, parsing, batching)"] = total - sum(parts.values())
    note = (f"step {step['step']}: {int(step['batch/turn_samples'])} turn samples, {int(step['rollout/new_tokens'])} new tokens, "
            f"{step['throughput/rollout_tokens_per_s']:.0f} tok/s while generating")
    return [_row("rl_step", part, seconds, "s", "the whole RL step", total, seconds / total, note)
            for part, seconds in parts.items()]


def format_table(rows: list[dict]) -> str:
    lines = ["| section | measurement | value | reference | reference value | ratio | note |",
             "| --- | --- | ---: | --- | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['section']} | {r['measurement']} | {r['value']:,.3g} {r['unit']} | {r['reference']} | "
                     f"{r['reference_value']:,.3g} | {r['ratio']:.2f} | {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every section")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", default="", help="also write the table (markdown) to this file")
    args = parser.parse_args()
    functions = {"sampler": sampler_rows, "update": update_rows, "loss": loss_rows, "envs": env_rows,
                 "rl_step": rl_step_rows}
    device = jax.devices()[0]
    header = (f"epo-jax benchmark suite: jax {jax.__version__} on {device.platform} ({device.device_kind}), "
              f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
              f"load average {os.getloadavg()[0]:.1f} at start")
    print(header, flush=True)
    rows = []
    for section in args.only:
        start = time.perf_counter()
        new = functions[section](args.quick)
        rows.extend(new)
        print(f"[{section}: {time.perf_counter() - start:.0f} s]", flush=True)
        print(format_table(new), flush=True)
    table = format_table(rows)
    print(f"\n{header}; load average {os.getloadavg()[0]:.1f} at the end\n{table}")
    if args.out:
        pathlib.Path(args.out).write_text(f"{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
