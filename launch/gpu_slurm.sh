#!/usr/bin/env bash
#SBATCH --job-name=epo-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --output=epo-jax-%j.out
#
# Runs epo-jax on a SLURM GPU cluster: one process per node, each owning that node's GPUs
# and its own environment pool; process 0's node is the jax.distributed coordinator.
#
#   cd /path/to/epo-jax   # a checkout every node sees (shared filesystem)
#   sbatch --nodes=4 launch/gpu_slurm.sh --workdir=/shared/runs/epo-7b \
#       -- --config.model.path=/shared/models/Qwen2.5-7B-Instruct --config.model.remat=True \
#       --config.mesh.data=1 --config.mesh.tensor=4 --config.mesh.fsdp=-1
#
#   # what it would run, outside SLURM, for a pretend 2-node allocation:
#   SLURM_JOB_NODELIST='gpu[01-02]' SLURM_NTASKS=2 launch/gpu_slurm.sh --dry-run --workdir=/tmp/w
#
# Run `launch/gpu_slurm.sh --help` for every option.
set -euo pipefail

readonly SCRIPT_NAME=gpu_slurm.sh

# The folder of launch/common.sh. sbatch runs a copy of this script from SLURM's spool folder,
# where common.sh is not beside it; then it comes from the checkout: --repo, $EPO_REPO, else the
# directory sbatch was called from.
launch_dir() {
  local here repo=${EPO_REPO:-${SLURM_SUBMIT_DIR:-}}
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  if [[ -f $here/common.sh ]]; then
    printf '%s\n' "$here"
    return
  fi
  while (($#)) && [[ $1 != -- ]]; do
    case $1 in
      --repo=*) repo=${1#--repo=} ;;
      --repo) repo=${2:-} ;;
    esac
    shift
  done
  if [[ ! -f $repo/launch/common.sh ]]; then
    printf '%s: error: launch/common.sh is neither beside this script nor in --repo=%s: submit from the epo-jax checkout or pass --repo\n' \
      "$SCRIPT_NAME" "$repo" >&2
    exit 2
  fi
  printf '%s\n' "$repo/launch"
}
LAUNCH_DIR=$(launch_dir "$@")
# shellcheck source=common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: sbatch [SBATCH_OPTIONS] launch/gpu_slurm.sh [OPTIONS] [-- MAIN_ARGS...]

Inside the allocation it runs, via one `srun` with one task per node,
  PYTHON -m epo_jax.main --config=CONFIG --config.workdir=WORKDIR
      --config.distributed.initialize=True --config.distributed.coordinator_address=HOST:PORT
      --config.distributed.num_processes=$SLURM_NTASKS --config.distributed.process_id=$SLURM_PROCID
      MAIN_ARGS...
where HOST is the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`.

Options (flag, or the environment variable in brackets):
  --workdir DIR      run workdir every node sees: shared filesystem or gs:// [EPO_WORKDIR] (required)
  --config CONFIG    run config [EPO_CONFIG] (default configs/scienceworld.py:paper)
  --port PORT        coordinator port [EPO_COORDINATOR_PORT] (default 20000 + SLURM_JOB_ID % 10000)
  --python PYTHON    interpreter with epo-jax and jax[cuda12] installed [EPO_PYTHON] (default python)
  --repo DIR         the epo-jax checkout [EPO_REPO] (default $SLURM_SUBMIT_DIR, else this script's repo)
  --dry-run          print the srun command and each process's main command instead of running;
                     reads SLURM_JOB_NODELIST and SLURM_NTASKS (set them by hand outside SLURM)
  -h, --help         this message

Environment: XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.92 here; JAX's own default, 0.75, leaves
a fifth of each GPU unused, and nothing else on the node uses GPU memory).
EOF
}

# First host of a SLURM node list without scontrol: the first top-level entry, each bracket
# group replaced by its first value ("gpu[07-09,12],cpu1" -> "gpu07", "r[1-2]-n[3-4]" -> "r1-n3").
first_host_of_nodelist() {
  local list=$1 host="" depth=0 skipping=0 char i
  for ((i = 0; i < ${#list}; i++)); do
    char=${list:i:1}
    case $char in
      '[') depth=$((depth + 1)); skipping=0 ;;
      ']') depth=$((depth - 1)); skipping=0 ;;
      ',' | '-')
        if ((depth > 0)); then
          skipping=1
        elif [[ $char == ',' ]]; then
          break
        else
          host+=$char
        fi ;;
      *) ((skipping)) || host+=$char ;;
    esac
  done
  printf '%s\n' "$host"
}

first_host() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1" | head -n 1
  else
    first_host_of_nodelist "$1"
  fi
}

set_switch() {
  return 1  # --dry-run and --help are the only switches, both parsed in common.sh
}

set_option() {
  local value=$2
  case $1 in
    --workdir) WORKDIR=$value ;;
    --config) CONFIG=$value ;;
    --port) PORT=$value ;;
    --python) PYTHON=$value ;;
    --repo) REPO=$value ;;
    *) return 1 ;;
  esac
}

main() {
  WORKDIR=${EPO_WORKDIR:-}
  CONFIG=${EPO_CONFIG:-configs/scienceworld.py:paper}
  PORT=${EPO_COORDINATOR_PORT:-}
  PYTHON=${EPO_PYTHON:-python}
  REPO=${EPO_REPO:-}
  DRY_RUN=0
  MAIN_ARGS=()
  parse_args "$@"

  [[ -n $WORKDIR ]] || die "--workdir (or \$EPO_WORKDIR) is required: a run folder every node sees (shared filesystem or gs://)"
  [[ -n ${SLURM_JOB_NODELIST:-} ]] || die "SLURM_JOB_NODELIST is not set: submit with sbatch, or set it (e.g. 'gpu[01-02]') for --dry-run"
  [[ ${SLURM_NTASKS:-} =~ ^[1-9][0-9]*$ ]] || die "SLURM_NTASKS='${SLURM_NTASKS:-}' is not a process count: submit with sbatch (--ntasks-per-node=1), or set it for --dry-run"
  if [[ -z $PORT ]]; then
    PORT=$((20000 + ${SLURM_JOB_ID:-0} % 10000))
  fi
  if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
    die "--port=$PORT is not a TCP port (1-65535)"
  fi
  if [[ -z $REPO ]]; then
    REPO=${SLURM_SUBMIT_DIR:-$(cd "$LAUNCH_DIR/.." && pwd)}
  fi
  [[ -f $REPO/epo_jax/main.py ]] || die "--repo=$REPO holds no epo_jax/main.py: submit from the epo-jax checkout or pass --repo"

  local coordinator_host
  coordinator_host=$(first_host "$SLURM_JOB_NODELIST")
  [[ -n $coordinator_host ]] || die "no host in SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
  local coordinator="$coordinator_host:$PORT"
  local main_command=("$PYTHON" -m epo_jax.main "--config=$CONFIG" "--config.workdir=$WORKDIR"
                      --config.distributed.initialize=True
                      "--config.distributed.coordinator_address=$coordinator"
                      "--config.distributed.num_processes=$SLURM_NTASKS")
  # Each task appends its own process id: srun sets SLURM_PROCID per task.
  # shellcheck disable=SC2016  # expanded by each task's bash, not here
  local per_task='exec "$@" --config.distributed.process_id="$SLURM_PROCID"'
  local srun_command=(srun "--ntasks=$SLURM_NTASKS" --ntasks-per-node=1 --kill-on-bad-exit=1 --label "--chdir=$REPO")
  if [[ -n ${SLURM_CPUS_ON_NODE:-} ]]; then
    # The environments run on the node's CPUs: give the one task all of them.
    srun_command+=("--cpus-per-task=$SLURM_CPUS_ON_NODE")
  fi
  srun_command+=(bash -c "$per_task" epo-jax "${main_command[@]}" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})

  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
  if [[ $DRY_RUN == 1 ]]; then
    quote_command export "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
    quote_command "${srun_command[@]}"
    local process
    for ((process = 0; process < SLURM_NTASKS; process++)); do
      printf '# process %d of %d runs, in %s:\n' "$process" "$SLURM_NTASKS" "$REPO"
      quote_command "${main_command[@]}" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"} "--config.distributed.process_id=$process"
    done
    return 0
  fi
  printf 'gpu_slurm.sh: %d processes, coordinator %s, workdir %s\n' "$SLURM_NTASKS" "$coordinator" "$WORKDIR" >&2
  exec "${srun_command[@]}"
}

main "$@"
