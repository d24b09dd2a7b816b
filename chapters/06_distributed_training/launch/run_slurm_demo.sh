#!/usr/bin/env bash
# One command: start a local one-node Slurm, submit train.sbatch, wait, show the result.
#
#   sudo bash chapters/06_distributed_training/launch/run_slurm_demo.sh [LOG_DIR]
#
# LOG_DIR (argument, or env LOG_DIR; default runs/slurm-demo) receives
#   slurm-<jobid>.out   the job's output (both torchrun workers' prints)
#   out/                what train_distributed.py wrote (losses.json, final.safetensors)
#   job-<jobid>.txt     `scontrol show job` at the end
# Environment (optional): NPROC_PER_NODE (2), STEPS (5), TRAIN_SCRIPT, JOB_TIMEOUT (600 s),
# STOP_AFTER=1 to shut the Slurm daemons down afterwards.
# Exit status: 0 only if the job COMPLETED with exit code 0.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
cd "$REPO"

LOG_DIR="${1:-${LOG_DIR:-runs/slurm-demo}}"
mkdir -p "$LOG_DIR"
LOG_DIR="$(cd "$LOG_DIR" && pwd)"
JOB_TIMEOUT="${JOB_TIMEOUT:-600}"

echo "== 1. local Slurm"
t0=$(date +%s)
bash "$HERE/setup_local_slurm.sh"
echo "(setup took $(( $(date +%s) - t0 )) s)"

# A free port for the rendezvous, so that the demo never collides with another run.
PYTHON=python3; [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
export MASTER_PORT="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}"
export OUT_DIR="$LOG_DIR/out"
export NPROC_PER_NODE="${NPROC_PER_NODE:-2}"

# Ask for no more CPUs than the node has (train.sbatch asks for 2), or the job would
# wait forever with reason PartitionConfig.
NODE_CPUS="$(sinfo -h -o '%c' | head -n1)"
CPUS_PER_TASK=$(( NODE_CPUS < 2 ? NODE_CPUS : 2 ))

echo "== 2. sbatch"
# Command-line options override the #SBATCH lines of the script.
JOB_ID="$(sbatch --parsable --chdir "$REPO" --nodes 1 --cpus-per-task "$CPUS_PER_TASK" \
          --output "$LOG_DIR/slurm-%j.out" "$HERE/train.sbatch")"
JOB_ID="${JOB_ID%%;*}"   # --parsable prints "jobid[;cluster]"
echo "submitted job $JOB_ID (log: $LOG_DIR/slurm-$JOB_ID.out)"
squeue -j "$JOB_ID" || true

echo "== 3. waiting for job $JOB_ID"
t0=$(date +%s)
state=""
while :; do
  state="$(scontrol show job "$JOB_ID" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')"
  case "$state" in
    COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|BOOT_FAIL|DEADLINE) break ;;
    PENDING)  # reasons that never clear by themselves: give up at once
      reason="$(scontrol show job "$JOB_ID" | sed -n 's/.* Reason=\([^ ]*\).*/\1/p')"
      case "$reason" in
        PartitionConfig|PartitionNodeLimit|PartitionTimeLimit|BadConstraints|ReqNodeNotAvail*|InvalidAccount|InvalidQOS)
          echo "job $JOB_ID cannot start (Reason=$reason): cancelling" >&2
          scancel "$JOB_ID" || true; state="PENDING($reason)"; break ;;
      esac ;;
  esac
  if (( $(date +%s) - t0 > JOB_TIMEOUT )); then
    echo "job $JOB_ID still '$state' after ${JOB_TIMEOUT}s: cancelling" >&2
    scancel "$JOB_ID" || true; state=TIMEOUT_DEMO; break
  fi
  sleep 1
done
echo "job $JOB_ID ended: $state after $(( $(date +%s) - t0 )) s"

echo "== 4. job output ($LOG_DIR/slurm-$JOB_ID.out)"
cat "$LOG_DIR/slurm-$JOB_ID.out" 2>/dev/null || echo "(no output file)"

echo "== 5. job state"
scontrol show job "$JOB_ID" | tee "$LOG_DIR/job-$JOB_ID.txt" \
  | grep -E 'JobId=|JobState=|RunTime=|NumNodes=|NodeList=|StdOut=' | grep -v ReqNodeList || true
# sacct needs an accounting database (slurmdbd); the local setup has none.
if sacct -j "$JOB_ID" --format=JobID,JobName,State,ExitCode,Elapsed >/dev/null 2>&1; then
  sacct -j "$JOB_ID" --format=JobID,JobName,State,ExitCode,Elapsed
else
  echo "(sacct: no accounting database in this local setup; job-completion log instead:)"
  grep "JobId=$JOB_ID " "${SLURM_BASE:-/var/tmp/llm-course-slurm}/log/jobcomp.log" 2>/dev/null | tail -n 1 || true
fi
ls -l "$OUT_DIR" 2>/dev/null || true

if [[ "${STOP_AFTER:-0}" == 1 ]]; then bash "$HERE/setup_local_slurm.sh" --stop; fi

exit_code="$(sed -n 's/.* ExitCode=\([0-9]*\):.*/\1/p' "$LOG_DIR/job-$JOB_ID.txt" | head -n1)"
if [[ "$state" == COMPLETED && "${exit_code:-1}" == 0 ]]; then
  echo "run_slurm_demo: job $JOB_ID COMPLETED"
else
  echo "run_slurm_demo: job $JOB_ID $state (exit ${exit_code:-?})" >&2; exit 1
fi
