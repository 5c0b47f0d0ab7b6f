# shellcheck shell=bash
# Helpers shared by launch/tpu_pod.sh, launch/gpu_slurm.sh and launch/seeds.sh, which source this file.
#
# The sourcing script sets SCRIPT_NAME (the prefix of its error messages) and defines
#   usage                  prints its help
#   set_switch FLAG        sets the variable of a flag that takes no value; returns 1 for others
#   set_option FLAG VALUE  sets the variable of a flag that takes a value; returns 1 for unknown flags
# and reads DRY_RUN (1 after --dry-run) and MAIN_ARGS (the words after `--`), which parse_args sets.

die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$1" >&2
  exit 2
}

# One shell word: as is when it holds only safe characters, else single-quoted.
quote_word() {
  local word=$1
  local escaped_quote="'\\''"
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/$escaped_quote}"
  fi
}

# A command as one line a shell splits back into the same words.
quote_command() {
  local quoted=() word
  for word in "$@"; do
    quoted+=("$(quote_word "$word")")
  done
  printf '%s\n' "${quoted[*]}"
}

# Options as `--flag VALUE` or `--flag=VALUE`, the script's switches, -h/--help, --dry-run, and
# `--`, after which every word is for epo_jax.main.
parse_args() {
  while (($#)); do
    local flag=$1 value=""
    # shellcheck disable=SC2034  # DRY_RUN is read by the sourcing script
    case $flag in
      --) shift; MAIN_ARGS=("$@"); return ;;
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --*=*) value=${flag#*=}; flag=${flag%%=*}; shift ;;
      --*)
        if set_switch "$flag"; then
          shift
          continue
        fi
        (($# >= 2)) || die "$flag needs a value"
        value=$2; shift 2 ;;
      *) die "unexpected argument '$flag'; arguments for epo_jax.main go after '--'" ;;
    esac
    set_option "$flag" "$value" || die "unknown option '$flag' (see --help)"
  done
}
