#!/usr/bin/env bash
# A real single-node SLURM on localhost, for testing launch.sh (and for trying it by hand).
#
#   tools/slurm_local.sh start    # write slurm.conf, start munged + slurmctld + slurmd, wait for idle
#   tools/slurm_local.sh stop     # stop the daemons this script started (munged is left running)
#   tools/slurm_local.sh status   # exit 0 when the local cluster answers and the node is usable
#   tools/slurm_local.sh env      # print `export SLURM_CONF=...` (eval "$(tools/slurm_local.sh env)")
#
# Needs root and Debian's packages: apt-get install -y --no-install-recommends slurmctld slurmd munge
# (slurm-client comes with slurmctld). No systemd: the daemons are started directly.
# Idempotent: `start` on a running cluster only checks it; `stop` on a stopped one does nothing.
#
# Nothing outside SLURM_LOCAL_DIR is written except munge's key (/etc/munge/munge.key, created by
# the munge package or by `mungekey` when missing) and munged's socket under /run/munge. The
# cluster's config lives in $SLURM_LOCAL_DIR/slurm.conf, NOT /etc/slurm, so a machine's own SLURM
# is never overwritten; clients find it through SLURM_CONF (the `env` command prints it).
#
# Environment (defaults):
#   SLURM_LOCAL_DIR   /tmp/megatron_sd3_slurm   config, state, logs, spool
#   SLURM_LOCAL_PORT  6817                      slurmctld port (slurmd uses PORT+1)
#   SLURM_LOCAL_WAIT  60                        seconds to wait for the node to become idle
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/megatron_sd3_slurm}
PORT=${SLURM_LOCAL_PORT:-6817}
WAIT=${SLURM_LOCAL_WAIT:-60}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

die() { echo "slurm_local: $*" >&2; exit 1; }
log() { echo "slurm_local: $*" >&2; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    # slurmd drains a node whose RealMemory exceeds what it finds: declare 80% of MemTotal.
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    mkdir -p "$DIR"/{state,spool,log}
    cat >"$CONF.tmp" <<EOF
# Written by tools/slurm_local.sh: a single-node test cluster on localhost.
ClusterName=megatron_sd3_local
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (containers, no systemd): track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled or hits its time limit.
KillWait=30
MinJobAge=300
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    command -v munged >/dev/null || die "munged not found: apt-get install -y munge"
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then mungekey --create --force
        else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 0400 /etc/munge/munge.key
    fi
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    if id munge >/dev/null 2>&1; then
        chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge /etc/munge/munge.key
        chmod 0755 /run/munge
        runuser -u munge -- munged
    else
        munged --force
    fi
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

node_state() { sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -1; }

cluster_ok() {
    pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid" || return 1
    node_ready
}

# Ready: slurmd answers locally and slurmctld sees the node responding (sinfo appends `*` to the
# state of a node that does not respond, e.g. one recovered from saved state before slurmd registers).
node_ready() {
    scontrol show slurmd >/dev/null 2>&1 || return 1
    case "$(node_state)" in idle|mixed|allocated|completing|idle+*|mixed+*|allocated+*) return 0 ;; esac
    return 1
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (the daemons run as root here)"
    for b in slurmctld slurmd sinfo sbatch scontrol; do
        command -v "$b" >/dev/null ||
            die "$b not found: apt-get install -y --no-install-recommends slurmctld slurmd munge"
    done
    if [[ -f $CONF ]] && cluster_ok; then log "already running ($CONF)"; return 0; fi
    start_munge
    # Rewrite the config only while no daemon uses it.
    if ! pid_alive "$DIR/slurmctld.pid" && ! pid_alive "$DIR/slurmd.pid"; then write_conf; fi
    if ! pid_alive "$DIR/slurmctld.pid"; then
        # -i: ignore unreadable state from an older run; -c would also clear queued jobs.
        slurmctld -f "$CONF" -i
    fi
    if ! pid_alive "$DIR/slurmd.pid"; then
        slurmd -f "$CONF" -N localhost
    fi
    local s=""
    for _ in $(seq $((WAIT * 2))); do
        s=$(node_state || true)
        if node_ready; then log "node localhost is $(node_state); export SLURM_CONF=$CONF"; return 0; fi
        case "$s" in
            down*|drain*) scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "node localhost not idle after ${WAIT}s (state: ${s:-no answer})"
}

stop_pidfile() {
    local f=$1 pid
    pid_alive "$f" || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$f"
}

cmd_stop() {
    if [[ -f $CONF ]] && pid_alive "$DIR/slurmctld.pid"; then
        scancel --full --signal=KILL --partition=debug 2>/dev/null || true
    fi
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
    log "stopped"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) [[ -f $CONF ]] && cluster_ok && { sinfo; exit 0; }; exit 1 ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 {start|stop|status|env}" >&2; exit 2 ;;
esac
