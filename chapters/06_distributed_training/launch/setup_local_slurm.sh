#!/usr/bin/env bash
# Start a one-node Slurm "cluster" on this machine, for trying train.sbatch.
#
#   sudo bash chapters/06_distributed_training/launch/setup_local_slurm.sh         # install + start
#   sudo bash chapters/06_distributed_training/launch/setup_local_slurm.sh --stop  # stop the daemons
#   sudo bash chapters/06_distributed_training/launch/setup_local_slurm.sh --status
#
# What it does (every step is skipped when already done, so rerunning is safe):
#   1. apt-get install slurm-wlm munge           (Debian/Ubuntu; needs root)
#   2. creates a munge key                        (munge authenticates Slurm's messages)
#   3. writes /etc/slurm/slurm.conf for ONE node: this host, all its CPUs
#   4. starts munged, slurmctld (the controller) and slurmd (the node daemon)
#   5. waits until `sinfo` shows the node idle
#
# The configuration avoids cgroups (proctrack/linuxproc, task/none), so it also
# works inside Docker/containers where cgroups cannot be managed. There is no
# accounting database (slurmdbd), so `sacct` is not available; use
# `scontrol show job ID` (kept for MinJobAge seconds after a job ends) and the
# job-completion log ($SLURM_BASE/log/jobcomp.log) instead.
#
# Environment (optional):
#   SLURM_BASE   where state, spool and logs live (default /var/tmp/llm-course-slurm)
#   SLURM_WAIT   seconds to wait for the node to become idle (default 60)
set -euo pipefail

SLURM_BASE="${SLURM_BASE:-/var/tmp/llm-course-slurm}"
SLURM_WAIT="${SLURM_WAIT:-60}"
CONF=/etc/slurm/slurm.conf
NODE="$(hostname -s)"

log() { echo "[setup_local_slurm] $*"; }
die() { echo "[setup_local_slurm] ERROR: $*" >&2; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "run as root (sudo): slurmd and munged need it"

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_all() {
  # Ask the controller to stop itself and all slurmd daemons.
  if command -v scontrol >/dev/null && pid_alive "$SLURM_BASE/run/slurmctld.pid"; then
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  # Anything left: stop it by the pid file that it wrote (never by name).
  for pf in "$SLURM_BASE/run/slurmd.pid" "$SLURM_BASE/run/slurmctld.pid" /run/munge/munged.pid; do
    for _ in $(seq 1 20); do pid_alive "$pf" || break; kill "$(cat "$pf")" 2>/dev/null || true; sleep 0.5; done
    pid_alive "$pf" && kill -9 "$(cat "$pf")" 2>/dev/null || true
    rm -f "$pf"
  done
  log "stopped slurmctld, slurmd and munged"
}

case "${1:-}" in
  --stop) stop_all; exit 0 ;;
  --status)
    for d in munged:/run/munge/munged.pid slurmctld:$SLURM_BASE/run/slurmctld.pid slurmd:$SLURM_BASE/run/slurmd.pid; do
      if pid_alive "${d#*:}"; then echo "${d%%:*}: running (pid $(cat "${d#*:}"))"; else echo "${d%%:*}: stopped"; fi
    done
    pid_alive "$SLURM_BASE/run/slurmctld.pid" && sinfo
    exit 0 ;;
  "") ;;
  *) die "unknown argument '$1' (use --stop, --status or nothing)" ;;
esac

# ---- 1. packages -------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge with apt-get ..."
  t0=$(date +%s)
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q slurm-wlm munge
  log "apt-get took $(( $(date +%s) - t0 )) s"
else
  log "slurm and munge already installed ($(slurmctld -V))"
fi

# ---- 2. munge key ------------------------------------------------------------
# Every node of a real cluster must share the SAME key (copy it to all nodes).
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating /etc/munge/munge.key"
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile=/etc/munge/munge.key --force
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

# ---- 3. slurm.conf -----------------------------------------------------------
mkdir -p "$SLURM_BASE"/{state,spool,log,run} /etc/slurm
# (not plain `nproc`: it obeys OMP_NUM_THREADS, which torch users often set to 1)
CPUS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))   # 90% of RAM
NEW_CONF="$(mktemp)"
cat >"$NEW_CONF" <<EOF
# Written by chapters/06_distributed_training/launch/setup_local_slurm.sh
# A one-node Slurm cluster: controller and compute node are both "$NODE".
ClusterName=llmcourse
SlurmctldHost=$NODE
# Daemons run as root: simplest for a local sandbox (real clusters use a 'slurm' user).
SlurmUser=root
AuthType=auth/munge
# No cgroups: works in containers. Real clusters use proctrack/cgroup + task/cgroup.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Schedule individual CPUs (and GPUs, with GRES) rather than whole nodes.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# No accounting database (so no sacct); a plain text log of finished jobs instead.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$SLURM_BASE/log/jobcomp.log
# Keep finished jobs visible to 'scontrol show job' for 10 minutes.
MinJobAge=600
# A node that was down comes back by itself when its slurmd registers again.
ReturnToService=2
StateSaveLocation=$SLURM_BASE/state
SlurmdSpoolDir=$SLURM_BASE/spool
SlurmctldPidFile=$SLURM_BASE/run/slurmctld.pid
SlurmdPidFile=$SLURM_BASE/run/slurmd.pid
SlurmctldLogFile=$SLURM_BASE/log/slurmctld.log
SlurmdLogFile=$SLURM_BASE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
MpiDefault=none
# No mail server here; silences "MailProg is invalid".
MailProg=/bin/true
# The one node and the one partition ("queue").
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
CONF_CHANGED=0
if ! cmp -s "$NEW_CONF" "$CONF"; then
  [[ -f "$CONF" ]] && cp "$CONF" "$CONF.bak.$(date +%s)"
  install -m 0644 "$NEW_CONF" "$CONF"
  CONF_CHANGED=1
  log "wrote $CONF (node $NODE, $CPUS CPUs, ${MEM_MB} MB)"
fi
rm -f "$NEW_CONF"

# ---- 4. daemons --------------------------------------------------------------
if [[ $CONF_CHANGED -eq 1 ]] && { pid_alive "$SLURM_BASE/run/slurmctld.pid" || pid_alive "$SLURM_BASE/run/slurmd.pid"; }; then
  log "configuration changed: restarting the Slurm daemons"
  scontrol shutdown >/dev/null 2>&1 || true
  for _ in $(seq 1 20); do
    pid_alive "$SLURM_BASE/run/slurmctld.pid" || pid_alive "$SLURM_BASE/run/slurmd.pid" || break; sleep 0.5
  done
fi

t0=$(date +%s)
if ! pid_alive /run/munge/munged.pid; then
  log "starting munged"
  # munged refuses to run as root; run it as the 'munge' user.
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
fi
for _ in $(seq 1 20); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munge does not work (see /var/log/munge/munged.log)"

if ! pid_alive "$SLURM_BASE/run/slurmctld.pid"; then
  log "starting slurmctld"
  slurmctld || die "slurmctld failed (see $SLURM_BASE/log/slurmctld.log)"
fi
if ! pid_alive "$SLURM_BASE/run/slurmd.pid"; then
  log "starting slurmd"
  slurmd || die "slurmd failed (see $SLURM_BASE/log/slurmd.log)"
fi

# ---- 5. wait for the node ----------------------------------------------------
state=""
for _ in $(seq 1 $(( SLURM_WAIT * 2 ))); do
  state="$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true)"
  case "$state" in
    idle|mixed|allocated) break ;;
    drained|draining|down|down\*|drained\*)
      scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle|mixed|allocated) ;;
  *) sinfo -R || true; die "node $NODE is '$state', not idle after ${SLURM_WAIT}s (logs in $SLURM_BASE/log)" ;;
esac
log "Slurm is up in $(( $(date +%s) - t0 )) s:"
sinfo
