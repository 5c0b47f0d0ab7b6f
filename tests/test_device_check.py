"""bench/device_check.sh --cpu: the device check's code paths at toy sizes on the CPU (the GPU run
itself needs an H100 / H200). Checks the script is shellcheck-clean where shellcheck is installed,
that the smoke run prints one table with a row per check, and the roofline's byte count."""
import os
import shutil
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import device_check  # noqa: E402

from epo_jax.models import transformer  # noqa: E402
from epo_jax.models.config import ModelConfig  # noqa: E402


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_device_check_script_is_shellcheck_clean():
    subprocess.run(["shellcheck", os.path.join(ROOT, "bench", "device_check.sh")], check=True)


def test_decode_bytes_are_the_weights_and_the_whole_cache():
    config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=4, tie_word_embeddings=True, dtype="bfloat16")
    _, params = transformer.init_params(config, jax.random.key(0))
    weights = 64 * 16 + 3 * (16 * 16 + 2 * 16 * 8 + 16 * 16 + 3 * 16 * 32 + 2 * 16) + 16  # embedding, layers, norm
    cache = 2 * 3 * 5 * 2 * 100 * 4  # keys and values x layers x batch x KV heads x slots x head dim
    assert device_check.decode_bytes(params, config, batch=5, cache_len=100) == 4 * weights + 2 * cache


@pytest.mark.slow
def test_cpu_smoke_run_prints_one_table():
    # The check runs on one device, as on the GPU: without the suite's 8 simulated CPU devices.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "device_check.sh"), "--cpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, env=dict(env, DEVICE_CHECK_TIMEOUT="880"))
    assert out.returncode == 0, out.stderr[-2000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("|")]
    checks = [line.split("|")[1].strip() for line in table[2:]]
    assert checks == ["sampler"] * 4 + ["update", "attention", "memory", "rl steps"]
    assert "tok/s" in table[2] and "TFLOP/s" in table[6]
    assert "planner" in table[8]
