#!/usr/bin/env bash
# Starts the same dna_jax command on every worker of the TPU VM, detached, logging to a file.
# With --spot, stays in a loop that recreates a preempted Spot VM, reinstalls and reruns the same
# command, which resumes from the Orbax checkpoints in the gs:// workdir.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

RUN_PID=dna_jax_run.pid   # per worker, in the home directory, like RUN_LOG
RUN_RC=dna_jax_run.rc     # exit status of the finished run

usage() {
  cat <<HELP
Usage: tpu_scripts/launch.sh --config configs/NAME.py --workdir gs://BUCKET/DIR [options]
                             [--config.KEY=VALUE ...] [-- more dna_jax.main flags]

Runs on all workers at once (--worker=all), detached (setsid nohup), output appended to ~/$RUN_LOG:
  cd ~/$REMOTE_DIR && DNA_JAX_DISTRIBUTED=1 python -m dna_jax.main --config CONFIG --workdir WORKDIR ...
(with the venv ~/$REMOTE_VENV of install.sh active). Arguments starting with --config. and all
after -- are passed to dna_jax.main unchanged. Rerunning the same command resumes from the
checkpoints in WORKDIR. A worker where the run is still going is left alone.
Use a gs:// workdir: the hosts of a pod slice share it and it outlives the VM.

Options:
  --config FILE             config file, relative to the code directory (required)
  --workdir DIR             results and checkpoints, gs://... (required)
  --spot                    keep watching: when the VM is PREEMPTED or TERMINATED, delete it,
                            recreate it with --spot, reinstall and relaunch; stop when the run ends.
                            Keep this terminal alive (run it inside tmux or nohup on your machine).
  --poll SECONDS            --spot: seconds between checks (default 300)
  --max-restarts N          --spot: give up after N recreations (default 20)
$COMMON_HELP

Example:
  tpu_scripts/launch.sh --config configs/demo.py --workdir gs://my-bucket/dna_demo --config.stages=distill,rate
HELP
}

CONFIG=""
WORKDIR=""
SPOT=0
POLL=300
MAX_RESTARTS=20
MAIN_ARGS=()
while (($#)); do
  parse_common_option "$@"
  if ((SHIFT_BY)); then
    shift "$SHIFT_BY"
    continue
  fi
  case $1 in
    --config|--config=*) take_value "$@"; CONFIG=$OPTION_VALUE; shift "$SHIFT_BY" ;;
    --config.*) MAIN_ARGS+=("$1"); shift ;;
    --workdir|--workdir=*) take_value "$@"; WORKDIR=$OPTION_VALUE; shift "$SHIFT_BY" ;;
    --spot) SPOT=1; shift ;;
    --poll|--poll=*) take_value "$@"; POLL=$OPTION_VALUE; shift "$SHIFT_BY" ;;
    --max-restarts|--max-restarts=*) take_value "$@"; MAX_RESTARTS=$OPTION_VALUE; shift "$SHIFT_BY" ;;
    --) shift; MAIN_ARGS+=("$@"); break ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done
[[ -n $CONFIG ]] || die "--config is required (see --help)"
[[ -n $WORKDIR ]] || die "--workdir is required (see --help)"
[[ $POLL =~ ^[0-9]+$ && $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--poll and --max-restarts take whole numbers"
if [[ $WORKDIR != gs://* ]]; then
  if ((SPOT)); then
    die "--spot needs a gs:// workdir: a preempted VM loses its disk, and with it the checkpoints"
  fi
  echo "warning: workdir $WORKDIR is on the VM's disk; on a pod slice every host needs the same" \
       "shared directory (use gs://...)" >&2
fi

# The command every worker runs (its home directory is the starting directory).
remote_launch_command() {
  local main=(python -m dna_jax.main --config "$CONFIG" --workdir "$WORKDIR")
  main+=(${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
  local job
  job="(source $(shell_quote "$REMOTE_VENV/bin/activate") && cd $(shell_quote "$REMOTE_DIR")"
  job+=" && export PYTHONUNBUFFERED=1 && DNA_JAX_DISTRIBUTED=1 $(quote_words "${main[@]}")); echo \$? > $RUN_RC"
  printf '%s' "if [ -f $RUN_PID ] && kill -0 \"\$(cat $RUN_PID)\" 2>/dev/null; then"
  printf '%s' " echo \"dna_jax is already running on \$(hostname), not started again\"; exit 0; fi;"
  printf '%s' " rm -f $RUN_RC; echo \"=== \$(date -u +%FT%TZ) launch on \$(hostname)\" >> $RUN_LOG;"
  printf '%s' " setsid nohup bash -c $(shell_quote "$job") >> $RUN_LOG 2>&1 < /dev/null & echo \$! > $RUN_PID;"
  printf '%s' " echo \"dna_jax started on \$(hostname), log: ~/$RUN_LOG\""
}

# Prints one word per worker: DNA_JAX_RC=<status>, DNA_JAX_RUNNING or DNA_JAX_STOPPED.
remote_status_command() {
  printf '%s' "if [ -f $RUN_RC ]; then echo \"DNA_JAX_RC=\$(cat $RUN_RC)\";"
  printf '%s' " elif [ -f $RUN_PID ] && kill -0 \"\$(cat $RUN_PID)\" 2>/dev/null; then echo DNA_JAX_RUNNING;"
  printf '%s' " else echo DNA_JAX_STOPPED; fi"
}

launch_on_all_workers() {
  tpu_ssh all "$(remote_launch_command)"
}

vm_state() {
  tpu_vm describe '--format=value(state)'
}

common_args
recreate_vm() {
  "$SCRIPTS/create_vm.sh" "${COMMON_ARGS[@]}" --spot && "$SCRIPTS/install.sh" "${COMMON_ARGS[@]}"
}

if ((!SPOT)); then
  launch_on_all_workers
  if [[ $DRY_RUN != 1 ]]; then
    echo "Follow the log with: tpu_scripts/logs.sh --name $TPU_NAME --zone $ZONE" >&2
  fi
  exit 0
fi

if [[ $DRY_RUN == 1 ]]; then
  echo "# --spot: every ${POLL}s the state of the VM is read with:" >&2
  vm_state
  echo "# while READY, the run is checked on all workers with:" >&2
  tpu_ssh all "$(remote_status_command)"
  echo "# when PREEMPTED or TERMINATED (or missing), the VM is rebuilt and the run relaunched:" >&2
  tpu_vm delete --quiet
  recreate_vm
  launch_on_all_workers
  exit 0
fi

restarts=0
launched=0
while true; do
  state=$(vm_state 2>/dev/null) || state=MISSING
  echo "$(date -u +%FT%TZ) $TPU_NAME: ${state:-UNKNOWN}" >&2
  case $state in
    READY)
      if ((!launched)); then
        launch_on_all_workers && launched=1
      else
        status=$(tpu_ssh all "$(remote_status_command)" 2>/dev/null) || status=""
        if grep -q 'DNA_JAX_RC=[1-9]' <<<"$status"; then
          echo "The run failed on a worker (not a preemption):" >&2
          echo "$status" >&2
          echo "See tpu_scripts/logs.sh --worker all; rerun this command to resume." >&2
          exit 1
        elif grep -q 'DNA_JAX_RC=0' <<<"$status" && ! grep -q 'DNA_JAX_RUNNING\|DNA_JAX_STOPPED' <<<"$status"; then
          echo "The run finished on all workers. Results: $WORKDIR" >&2
          exit 0
        elif grep -q 'DNA_JAX_STOPPED' <<<"$status" && ! grep -q 'DNA_JAX_RUNNING' <<<"$status"; then
          echo "The run stopped without an exit status (host restarted?): relaunching." >&2
          launched=0
          continue
        fi
      fi
      ;;
    PREEMPTED|TERMINATED|MISSING)
      if [[ $state != MISSING ]]; then
        restarts=$((restarts + 1))
        if ((restarts > MAX_RESTARTS)); then
          die "gave up after $MAX_RESTARTS recreations (--max-restarts)"
        fi
        tpu_vm delete --quiet || true
      fi
      launched=0
      if recreate_vm && launch_on_all_workers; then
        launched=1
      else
        echo "Recreating $TPU_NAME failed (no Spot capacity?); trying again in ${POLL}s." >&2
      fi
      ;;
    *) ;;  # CREATING, RESTARTING, REPAIRING, ...: wait.
  esac
  sleep "$POLL"
done
