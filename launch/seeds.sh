#!/usr/bin/env bash
# Runs one epo-jax config for several seeds, one after the other, on this machine; each seed in
# its own work directory WORKDIR/seed<K>, ready for `python -m epo_jax.report WORKDIR`.
#
#   launch/seeds.sh --seeds 0-2 --workdir runs/sw-epo --config configs/scienceworld.py \
#       -- --config.algo.advantage=grpo
#   launch/seeds.sh --seeds 0,1,2 --workdir runs/sw-epo --dry-run      # print the commands only
#
# Run `launch/seeds.sh --help` for every option.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/seeds.sh --seeds LIST --workdir DIR [OPTIONS] [-- MAIN_ARGS...]

For each seed K of LIST, in order, runs from the repository root
  PYTHON -m epo_jax.main --config=CONFIG --config.seed=K --config.workdir=DIR/seedK MAIN_ARGS...
and appends its output to DIR/seedK/log.txt. A seed that fails does not stop the next ones; the
exit status is 1 when any seed failed. Running the same command again resumes every seed from its
latest checkpoint (a finished seed ends at once), so an interrupted sweep is simply restarted.

Options (flag, or the environment variable in brackets):
  --seeds LIST       seeds: comma-separated numbers and ranges, e.g. 0,1,2 or 0-4 or 0-2,7 [EPO_SEEDS] (required)
  --workdir DIR      parent of the seeds' work directories; relative to the current directory [EPO_WORKDIR] (required)
  --config CONFIG    run config, relative to the repository [EPO_CONFIG] (default configs/scienceworld.py)
  --python PYTHON    interpreter with epo-jax installed [EPO_PYTHON] (default python)
  --report           afterwards, write DIR/report.md with `python -m epo_jax.report DIR`
  --dry-run          print the commands, one per line, instead of running them
  -h, --help         this message
EOF
}

SCRIPT_NAME=seeds.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# "0-2,7" -> SEEDS=(0 1 2 7); anything else is an error naming the flag.
parse_seeds() {
  local list=$1 item low high seed
  local -A seen=()
  SEEDS=()
  [[ -n $list ]] || die "--seeds (or \$EPO_SEEDS) is required, e.g. --seeds 0,1,2 or --seeds 0-2"
  IFS=',' read -r -a items <<<"$list"
  for item in "${items[@]}"; do
    if [[ $item =~ ^[0-9]+$ ]]; then
      low=$item high=$item
    elif [[ $item =~ ^([0-9]+)-([0-9]+)$ ]]; then
      low=${BASH_REMATCH[1]} high=${BASH_REMATCH[2]}
    else
      die "--seeds=$list: '$item' is neither a seed nor a range A-B of non-negative integers"
    fi
    ((10#$low <= 10#$high)) || die "--seeds=$list: the range '$item' runs backwards"
    for ((seed = 10#$low; seed <= 10#$high; seed++)); do
      [[ -z ${seen[$seed]:-} ]] || die "--seeds=$list: seed $seed appears twice"
      seen[$seed]=1
      SEEDS+=("$seed")
    done
  done
}

set_switch() {
  case $1 in
    --report) REPORT=1 ;;
    *) return 1 ;;
  esac
}

set_option() {
  case $1 in
    --seeds) SEEDS_LIST=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --config) CONFIG=$2 ;;
    --python) PYTHON=$2 ;;
    *) return 1 ;;
  esac
}

main() {
  SEEDS_LIST=${EPO_SEEDS:-}
  WORKDIR=${EPO_WORKDIR:-}
  CONFIG=${EPO_CONFIG:-configs/scienceworld.py}
  PYTHON=${EPO_PYTHON:-python}
  DRY_RUN=0
  REPORT=0
  MAIN_ARGS=()
  parse_args "$@"
  parse_seeds "$SEEDS_LIST"
  [[ -n $WORKDIR ]] || die "--workdir (or \$EPO_WORKDIR) is required: the folder that holds one work directory per seed"
  if [[ $WORKDIR != /* && $WORKDIR != *://* ]]; then
    WORKDIR=$PWD/$WORKDIR  # the runs start in the repository root
  fi
  WORKDIR=${WORKDIR%/}
  local repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  [[ -f $repo/epo_jax/main.py ]] || die "$repo holds no epo_jax/main.py: run the script from an epo-jax checkout"

  local seed failed=() command
  for seed in "${SEEDS[@]}"; do
    command=("$PYTHON" -m epo_jax.main "--config=$CONFIG" "--config.seed=$seed"
             "--config.workdir=$WORKDIR/seed$seed" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
    if [[ $DRY_RUN == 1 ]]; then
      quote_command "${command[@]}"
      continue
    fi
    printf 'seeds.sh: seed %s of %s: %s/seed%s\n' "$seed" "$SEEDS_LIST" "$WORKDIR" "$seed" >&2
    local log=/dev/null
    if [[ $WORKDIR != *://* ]]; then
      mkdir -p "$WORKDIR/seed$seed"
      log=$WORKDIR/seed$seed/log.txt
      quote_command "${command[@]}" >>"$log"
    fi
    if ! (cd "$repo" && "${command[@]}") 2>&1 | tee -a "$log"; then
      failed+=("$seed")
      printf 'seeds.sh: seed %s failed (its output: %s)\n' "$seed" "$log" >&2
    fi
  done

  local report_command=("$PYTHON" -m epo_jax.report "$WORKDIR" --out "$WORKDIR/report.md")
  if [[ $REPORT == 1 && $DRY_RUN == 1 ]]; then
    quote_command "${report_command[@]}"
  elif [[ $REPORT == 1 ]]; then
    (cd "$repo" && "${report_command[@]}") || failed+=("report")
  fi
  if ((${#failed[@]})); then
    printf 'seeds.sh: failed: %s\n' "${failed[*]}" >&2
    return 1
  fi
  [[ $DRY_RUN == 1 ]] || printf 'seeds.sh: done; python -m epo_jax.report %s\n' "$WORKDIR" >&2
}

main "$@"
