#!/usr/bin/env bash
# The accelerator check of epo-jax on one GPU (H100 / H200), in under 8 minutes; prints one table
# (bench/device_check.py says what each row measures and against what).
#
#   bash bench/device_check.sh                 # on the GPU machine
#   bash bench/device_check.sh --cpu           # smoke run of the same code paths at toy sizes (CI)
#   bash bench/device_check.sh --only sampler attention
#
# Environment: DEVICE_CHECK_TIMEOUT (seconds, default 480) bounds the whole run.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

if [[ " $* " == *" --cpu "* ]]; then
  export JAX_PLATFORMS=cpu
else
  # The checks run one after another in this process and in child processes (the planner on the
  # host's CPUs, the memory measurement, the RL steps): none may hold the device's memory up front.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
fi

exec timeout --foreground "${DEVICE_CHECK_TIMEOUT:-480}" python bench/device_check.py "$@"
