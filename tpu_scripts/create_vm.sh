#!/usr/bin/env bash
# Creates a Cloud TPU VM: one host (v4-8, v5litepod-8, v6e-8) or a pod slice (v4-32, v5litepod-32, ...).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: tpu_scripts/create_vm.sh [options] [-- extra gcloud create flags]

Creates the TPU VM (all hosts of a pod slice at once) with
  gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=VERSION [--spot]
Flags after -- go to gcloud unchanged (e.g. --network=NET --service-account=SA).

Options:
  --spot                    create a Spot TPU (cheaper, can be preempted; see launch.sh --spot)
$COMMON_HELP

Examples:
  tpu_scripts/create_vm.sh --name dna --zone us-central2-b --accelerator-type v4-8
  tpu_scripts/create_vm.sh --zone us-west4-a --accelerator-type v5litepod-8 --runtime-version v2-alpha-tpuv5-lite --spot
HELP
}

SPOT=0
EXTRA_FLAGS=()
while (($#)); do
  parse_common_option "$@"
  if ((SHIFT_BY)); then
    shift "$SHIFT_BY"
    continue
  fi
  case $1 in
    --spot) SPOT=1; shift ;;
    --) shift; EXTRA_FLAGS=("$@"); break ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

FLAGS=("--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
if ((SPOT)); then
  FLAGS+=(--spot)
fi
tpu_vm create "${FLAGS[@]}" ${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"}
