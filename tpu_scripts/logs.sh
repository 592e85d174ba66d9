#!/usr/bin/env bash
# Shows the log that launch.sh writes on the workers (worker 0 by default, or all of them).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: tpu_scripts/logs.sh [options]

Follows ~/$RUN_LOG on a worker of the TPU VM (Ctrl-C stops following; the run goes on).

Options:
  --worker N|all            which worker (default 0: process 0 writes the results and summary)
  --lines N                 lines of history to show first (default 100)
  --no-follow               print and exit instead of following
$COMMON_HELP
HELP
}

WORKER=0
LINES=100
FOLLOW=1
while (($#)); do
  parse_common_option "$@"
  if ((SHIFT_BY)); then
    shift "$SHIFT_BY"
    continue
  fi
  case $1 in
    --worker|--worker=*) take_value "$@"; WORKER=$OPTION_VALUE; shift "$SHIFT_BY" ;;
    --lines|--lines=*) take_value "$@"; LINES=$OPTION_VALUE; shift "$SHIFT_BY" ;;
    --no-follow) FOLLOW=0; shift ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a number or 'all', got: $WORKER"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number, got: $LINES"

TAIL=(tail -n "$LINES")
if ((FOLLOW)); then
  TAIL+=(-F)
fi
tpu_ssh "$WORKER" "$(quote_words "${TAIL[@]}" "$RUN_LOG")"
