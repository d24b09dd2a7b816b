#!/usr/bin/env bash
# Two torchrun agents on ONE machine, started exactly as on TWO machines.
#
# On a real 2-node cluster you would type, on node 0 and node 1 respectively:
#   torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0 --rdzv_backend c10d \
#            --rdzv_endpoint NODE0_HOST:PORT --rdzv_id JOB train_distributed.py ...
#   torchrun --nnodes 2 --nproc_per_node 1 --node_rank 1 --rdzv_backend c10d \
#            --rdzv_endpoint NODE0_HOST:PORT --rdzv_id JOB train_distributed.py ...
# Here both "nodes" are background processes on this host and NODE0_HOST is
# localhost. Nothing else differs: the agents find each other only through the
# rendezvous endpoint, exactly as they would across a network.
#
# Note: with --rdzv_backend c10d, torchrun IGNORES --node_rank (it warns "node_rank is
# only used for static rdzv_backend"): ranks are handed out in the order the agents
# join, so node1.log may well hold global rank 0. We pass it anyway so the command
# is the one you would type; only --rdzv_backend static (--master_addr/--master_port)
# uses it.
#
# Usage:
#   bash chapters/06_distributed_training/launch/two_agents.sh [SCRIPT ARGS...]
# Environment (all optional):
#   SCRIPT       training script (default: chapters/06_distributed_training/train_distributed.py)
#   LOG_DIR      where node0.log / node1.log / out/ go (default: a fresh mktemp dir)
#   NPROC        processes per "node" (default 1)
#   TIMEOUT      seconds before both agents are killed (default 300)
#   TORCHRUN     torchrun executable (default: .venv/bin/torchrun if present, else torchrun)
# If no SCRIPT ARGS are given it uses:
#   --strategy ddp --steps 5 --dtype float32 --out $LOG_DIR/out
# Exit status: 0 only if BOTH agents exit 0.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
cd "$REPO"

SCRIPT="${SCRIPT:-chapters/06_distributed_training/train_distributed.py}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t two_agents.XXXXXX)}"
NPROC="${NPROC:-1}"
TIMEOUT="${TIMEOUT:-300}"
if [[ -z "${TORCHRUN:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/torchrun" ]]; then TORCHRUN="$REPO/.venv/bin/torchrun"; else TORCHRUN=torchrun; fi
fi
PYTHON="$(dirname "$(command -v "$TORCHRUN")")/python"
[[ -x "$PYTHON" ]] || PYTHON=python3
mkdir -p "$LOG_DIR"

if [[ $# -eq 0 ]]; then
  set -- --strategy ddp --steps 5 --dtype float32 --out "$LOG_DIR/out"
fi

# A free TCP port for the rendezvous: bind to port 0, let the kernel choose.
PORT="$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
RDZV_ID="two-agents-$$"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

echo "two_agents: script=$SCRIPT rdzv=localhost:$PORT id=$RDZV_ID logs=$LOG_DIR"

pids=()
for NODE_RANK in 0 1; do
  # 'timeout' bounds each agent so a hung rendezvous can never block forever.
  timeout --signal=TERM --kill-after=10 "$TIMEOUT" \
    "$TORCHRUN" \
      --nnodes 2 \
      --nproc_per_node "$NPROC" \
      --node_rank "$NODE_RANK" \
      --rdzv_backend c10d \
      --rdzv_endpoint "localhost:$PORT" \
      --rdzv_id "$RDZV_ID" \
      --max_restarts 0 \
      "$SCRIPT" "$@" \
      >"$LOG_DIR/node$NODE_RANK.log" 2>&1 &
  pids+=($!)
done

status=0
for i in 0 1; do
  if wait "${pids[$i]}"; then
    echo "two_agents: node$i OK"
  else
    rc=$?
    echo "two_agents: node$i FAILED (exit $rc), log: $LOG_DIR/node$i.log" >&2
    status=1
  fi
done

for i in 0 1; do
  echo "----- node$i.log (last 20 lines) -----"
  tail -n 20 "$LOG_DIR/node$i.log"
done
[[ $status -eq 0 ]] && echo "two_agents: both nodes finished OK (logs in $LOG_DIR)"
exit $status
