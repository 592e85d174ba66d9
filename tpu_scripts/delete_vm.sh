#!/usr/bin/env bash
# Deletes the TPU VM (all hosts of a pod slice). Checkpoints and results in a gs:// workdir stay.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: tpu_scripts/delete_vm.sh [options]

Deletes the TPU VM with
  gcloud compute tpus tpu-vm delete NAME --zone=ZONE [--quiet]
Anything stored only on the VM (the code copy, the run log) is lost; a gs:// workdir is kept.

Options:
  --yes                     do not ask for confirmation (passes --quiet to gcloud)
$COMMON_HELP
HELP
}

QUIET=0
while (($#)); do
  parse_common_option "$@"
  if ((SHIFT_BY)); then
    shift "$SHIFT_BY"
    continue
  fi
  case $1 in
    --yes|--quiet) QUIET=1; shift ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

FLAGS=()
if ((QUIET)); then
  FLAGS+=(--quiet)
fi
tpu_vm delete ${FLAGS[@]+"${FLAGS[@]}"}
