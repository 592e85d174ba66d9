# shellcheck shell=bash disable=SC2034  # (its variables are used by the scripts that source it)
# Shared by the tpu_scripts/*.sh launchers (sourced, never run): defaults, option parsing, dry-run.
#
# Every script sources this file, defines usage(), then loops over its arguments with
# parse_common_option before its own options. All gcloud calls go through run(), which prints
# the command instead of running it under --dry-run.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Defaults, each overridable from the environment or by the matching option.
TPU_NAME="${TPU_NAME:-dna-jax}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"                               # empty: gcloud's configured project
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"         # v4-8, v4-32, v5litepod-8, v6e-8, ...
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"  # v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e
REPO_URL="${REPO_URL:-}"                             # empty: copy this checkout to the workers
REPO_BRANCH="${REPO_BRANCH:-}"                       # with REPO_URL; empty: the default branch
REMOTE_DIR="${REMOTE_DIR:-dna_jax}"                  # code on every worker, relative to the home directory
REMOTE_VENV="${REMOTE_VENV:-dna_jax_venv}"           # virtual environment, relative to the home directory
REMOTE_PYTHON="${REMOTE_PYTHON:-python3.11}"         # interpreter for the venv (apt-installed if missing)
RUN_LOG="${RUN_LOG:-dna_jax_run.log}"                # per-worker log of launch.sh, in the home directory
DRY_RUN="${DRY_RUN:-0}"

COMMON_HELP="Common options (defaults come from the environment variable in brackets):
  --name NAME               TPU VM name [TPU_NAME, now: $TPU_NAME]
  --zone ZONE               zone [ZONE, now: $ZONE]
  --project PROJECT         project [PROJECT, now: ${PROJECT:-gcloud default}]
  --accelerator-type TYPE   v4-8, v4-32, v5litepod-8, v6e-8, ... [ACCELERATOR_TYPE, now: $ACCELERATOR_TYPE]
  --runtime-version V       TPU software version: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e),
                            v2-alpha-tpuv6e (v6e) [RUNTIME_VERSION, now: $RUNTIME_VERSION]
  --repo-url URL            git URL cloned on the workers; empty: copy this checkout [REPO_URL]
  --branch BRANCH           branch or tag to clone with --repo-url [REPO_BRANCH]
  --dry-run                 print the commands instead of running them
  -h, --help                show this help"

die() {
  echo "error: $*" >&2
  exit 2
}

# Prints WORD quoted for a POSIX shell; words made only of safe characters stay as they are.
shell_quote() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Prints all arguments quoted and joined by spaces: one line a shell would run unchanged.
quote_words() {
  local joined="" word
  for word in "$@"; do
    joined+="${joined:+ }$(shell_quote "$word")"
  done
  printf '%s' "$joined"
}

# Runs a command, or only prints it (to stdout, one line, quoted) under --dry-run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote_words "$@")"
  else
    printf '+ %s\n' "$(quote_words "$@")" >&2
    "$@"
  fi
}

# Parses one common option at the front of "$@". Sets SHIFT_BY to the number of words it used
# (0 when "$1" is not a common option). Accepts both "--opt value" and "--opt=value".
parse_common_option() {
  local option=$1 value="" inline=0
  if [[ $option == --*=* ]]; then
    value=${option#*=}
    option=${option%%=*}
    inline=1
  fi
  SHIFT_BY=1
  case $option in
    --dry-run) DRY_RUN=1; return 0 ;;
    -h|--help) usage; exit 0 ;;
    --name|--zone|--project|--accelerator-type|--runtime-version|--repo-url|--branch) ;;
    *) SHIFT_BY=0; return 0 ;;
  esac
  if ((!inline)); then
    (($# >= 2)) || die "$option needs a value"
    value=$2
    SHIFT_BY=2
  fi
  case $option in
    --name) TPU_NAME=$value ;;
    --zone) ZONE=$value ;;
    --project) PROJECT=$value ;;
    --accelerator-type) ACCELERATOR_TYPE=$value ;;
    --runtime-version) RUNTIME_VERSION=$value ;;
    --repo-url) REPO_URL=$value ;;
    --branch) REPO_BRANCH=$value ;;
  esac
}

# Value of a script-specific option: "--opt value" or "--opt=value". Sets OPTION_VALUE and SHIFT_BY.
take_value() {
  if [[ $1 == --*=* ]]; then
    OPTION_VALUE=${1#*=}
    SHIFT_BY=1
  else
    (($# >= 2)) || die "$1 needs a value"
    OPTION_VALUE=$2
    SHIFT_BY=2
  fi
}

# The common options as arguments, to hand the current settings to another script of this folder.
common_args() {
  COMMON_ARGS=(--name "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR_TYPE"
               --runtime-version "$RUNTIME_VERSION")
  [[ -z $PROJECT ]] || COMMON_ARGS+=(--project "$PROJECT")
  [[ -z $REPO_URL ]] || COMMON_ARGS+=(--repo-url "$REPO_URL")
  [[ -z $REPO_BRANCH ]] || COMMON_ARGS+=(--branch "$REPO_BRANCH")
  if [[ $DRY_RUN == 1 ]]; then
    COMMON_ARGS+=(--dry-run)
  fi
}

# gcloud compute tpus tpu-vm VERB NAME --zone=ZONE [--project=PROJECT] ARGS...
tpu_vm() {
  local verb=$1
  shift
  local command=(gcloud compute tpus tpu-vm "$verb" "$TPU_NAME" "--zone=$ZONE")
  [[ -z $PROJECT ]] || command+=("--project=$PROJECT")
  run "${command[@]}" "$@"
}

# Runs REMOTE_COMMAND through ssh on WORKER (a number or "all").
tpu_ssh() {
  tpu_vm ssh "--worker=$1" "--command=$2"
}

# Copies the local file SOURCE to DESTINATION (relative to the home directory) on all workers.
tpu_scp_to_all() {
  local command=(gcloud compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" "--zone=$ZONE")
  [[ -z $PROJECT ]] || command+=("--project=$PROJECT")
  run "${command[@]}" --worker=all
}
