#!/usr/bin/env bash
# A real SLURM on this machine, for testing launch.sh (and for trying it by hand): one node on
# localhost, or several nodes, each slurmd in a network namespace of its own with its own hostname.
#
#   tools/slurm_local.sh start [--nodes N]   # write slurm.conf, start munged + slurmctld + slurmd(s),
#                                            # wait until every node is idle (N defaults to 1)
#   tools/slurm_local.sh stop     # stop the daemons (and remove the namespaces) this script started;
#                                 # munged is left running
#   tools/slurm_local.sh status [--nodes N]  # exit 0 when the cluster answers and every node is
#                                            # usable (with --nodes: and it has N nodes)
#   tools/slurm_local.sh env      # print `export SLURM_CONF=...` (eval "$(tools/slurm_local.sh env)")
#   tools/slurm_local.sh kill-node NAME    # several nodes: SIGKILL every process of node NAME (its
#                                          # namespace: slurmd, the jobs' steps and ranks), as when
#                                          # a machine dies; slurmctld marks it DOWN after
#                                          # SlurmdTimeout (30 s here)
#   tools/slurm_local.sh revive-node NAME  # start NAME's slurmd again; wait until the node is usable
#
# Needs root and Debian's packages: apt-get install -y --no-install-recommends slurmctld slurmd munge
# (slurm-client comes with slurmctld); several nodes also need `ip` (iproute2), `unshare`
# and `nsenter` (util-linux). No systemd: the daemons are started directly.
# Idempotent: `start` on a running cluster only checks it (and starts what is missing); `stop` on a
# stopped one does nothing. A stopped cluster starts again empty: no job of the earlier run is
# recovered. One cluster per SLURM_LOCAL_DIR: `start --nodes 2` while a 1-node
# cluster runs there fails; stop it first (or use another SLURM_LOCAL_DIR and SLURM_LOCAL_PORT).
#
# One node (default): NodeName=localhost, everything on 127.0.0.1.
#
# N nodes (N >= 2): nodes sd3node1..sd3nodeN. For node i the script creates a network namespace
# sd3node<i> and a veth pair sd3h<i> (root namespace) / sd3n<i> (inside, address NET.(10+i)/24), and
# a bridge sd3br0 in the root namespace with address NET.1/24 that joins the host ends of the veths
# and nothing else. slurmctld runs in the root network namespace and is reached at NET.1; it listens
# on SlurmctldPort. Each slurmd runs inside its node's namespace (`nsenter --net`) and in its own
# UTS and mount namespace (`unshare --uts --mount`): its hostname is the node name, and
# $SLURM_LOCAL_DIR/hosts (the node names and NET.1 = sd3ctl) is bind-mounted on /etc/hosts, so that
# `scontrol show hostnames` names (launch.sh's MASTER_ADDR), torchrun and gloo resolve to the
# namespace addresses; slurmctld runs with the same hosts file plus the machine's own /etc/hosts.
# All these daemons see $SLURM_LOCAL_DIR/resolv.conf (nameserver 127.0.0.1) as /etc/resolv.conf.
# Jobs inherit the node's namespaces. The namespaces have no route but NET.0/24, so no traffic
# leaves them; the host's own interfaces and /etc/hosts are not touched. munge is shared through its
# filesystem socket. `stop` ends the jobs' processes left in the namespaces, deletes the veths, the
# bridge and the namespaces: exactly what `start` recorded in $SLURM_LOCAL_DIR/created.
#
# Nothing outside SLURM_LOCAL_DIR is written except munge's key (/etc/munge/munge.key, created by
# the munge package or by `mungekey` when missing), munged's socket under /run/munge, and (several
# nodes) the namespaces under /run/netns. The cluster's config lives in $SLURM_LOCAL_DIR/slurm.conf,
# NOT /etc/slurm, so a machine's own SLURM is never overwritten; clients find it through SLURM_CONF
# (the `env` command prints it).
#
# Environment (defaults):
#   SLURM_LOCAL_DIR   /tmp/megatron_sd3_slurm   config, state, logs, spool
#   SLURM_LOCAL_PORT  6817                      slurmctld port (slurmd uses PORT+1)
#   SLURM_LOCAL_WAIT  60                        seconds to wait for the nodes to become idle
#   SLURM_LOCAL_NET   10.231.0                  several nodes: the private /24 used inside the
#                                               namespaces (start refuses one already in use here)
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/megatron_sd3_slurm}
PORT=${SLURM_LOCAL_PORT:-6817}
WAIT=${SLURM_LOCAL_WAIT:-60}
NET=${SLURM_LOCAL_NET:-10.231.0}
CONF=$DIR/slurm.conf
CREATED=$DIR/created
export SLURM_CONF=$CONF

BRIDGE=sd3br0
CTL_HOST=sd3ctl

die() { echo "slurm_local: $*" >&2; exit 1; }
log() { echo "slurm_local: $*" >&2; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Nodes of the cluster configured in $DIR (1 when none is).
conf_nodes() { if [[ -f $DIR/nodes ]]; then cat "$DIR/nodes"; else echo 1; fi; }

node_name() { if [[ $1 -eq 0 ]]; then echo localhost; else echo "sd3node$1"; fi; }
node_names() {
    local n=$1 i
    if [[ $n -eq 1 ]]; then echo localhost; return; fi
    for i in $(seq "$n"); do node_name "$i"; done
}
slurmd_pidfile() { if [[ $2 -eq 1 ]]; then echo "$DIR/slurmd.pid"; else echo "$DIR/slurmd-$1.pid"; fi; }

write_conf() {
    local n=$1 cpus mem_mb ctl nodes_line i
    cpus=$(nproc)
    # slurmd drains a node whose RealMemory exceeds what it finds: declare 80% of MemTotal.
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    mkdir -p "$DIR"/{state,spool,log}
    if [[ $n -eq 1 ]]; then
        ctl=localhost
        nodes_line="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    else
        ctl="$CTL_HOST($NET.1)"
        nodes_line=""
        for i in $(seq "$n"); do
            nodes_line+="NodeName=$(node_name "$i") NodeAddr=$NET.$((10 + i)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"$'\n'
        done
    fi
    cat >"$CONF.tmp" <<EOF
# Written by tools/slurm_local.sh: a $n-node test cluster on this machine.
ClusterName=megatron_sd3_local
SlurmctldHost=$ctl
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$( [[ $n -eq 1 ]] && echo "$DIR/slurmd.pid" || echo "$DIR/slurmd-%n.pid" )
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$( [[ $n -eq 1 ]] && echo "$DIR/log/slurmd.log" || echo "$DIR/log/slurmd-%n.log" )
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
# Seconds without an answer from a slurmd before its node is DOWN and its jobs are requeued or
# ended (SLURM's default is 300; short here so that tests of a lost node finish quickly).
SlurmdTimeout=30
MinJobAge=300
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
${nodes_line%$'\n'}
PartitionName=debug Nodes=$(node_names "$n" | paste -sd,) Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
    echo "$n" >"$DIR/nodes"
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

# ---- several nodes: namespaces, veths, bridge -----------------------------------------------------

created() { [[ -f $CREATED ]] && grep -qx "$1 $2" "$CREATED"; }
record() { echo "$1 $2" >>"$CREATED"; }
netns_exists() { [[ -e /run/netns/$1 ]]; }
link_exists() { ip link show "$1" >/dev/null 2>&1; }

# Refuse names or an address range that something else on this machine already uses.
check_net_free() {
    local n=$1 i
    [[ $NET =~ ^(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){2}$ ]] ||
        die "SLURM_LOCAL_NET=$NET is not the first three numbers of an IPv4 /24 (e.g. 10.231.0)"
    if link_exists "$BRIDGE" && ! created link "$BRIDGE"; then
        die "interface $BRIDGE exists but was not created by this script in $DIR: remove it or use that SLURM_LOCAL_DIR"
    fi
    for i in $(seq "$n"); do
        if netns_exists "sd3node$i" && ! created netns "sd3node$i"; then
            die "network namespace sd3node$i exists but was not created by this script in $DIR: \`ip netns del sd3node$i\` or use that SLURM_LOCAL_DIR"
        fi
        if link_exists "sd3h$i" && ! created link "sd3h$i"; then
            die "interface sd3h$i exists but was not created by this script in $DIR: remove it or use that SLURM_LOCAL_DIR"
        fi
    done
    local used
    used=$( { ip -4 -o addr show; ip -4 route show; } | grep -F " $NET." | grep -vw "$BRIDGE" || true)
    used+=$(ip -4 route show | awk -v p="$NET." 'index($1, p) == 1' | grep -vw "$BRIDGE" || true)
    [[ -z $used ]] || die "SLURM_LOCAL_NET=$NET.0/24 is already in use on this machine ($(echo "$used" | head -1)); pick a free /24 with SLURM_LOCAL_NET"
}

setup_net() {
    local n=$1 i ns host peer
    check_net_free "$n"
    if ! link_exists "$BRIDGE"; then
        ip link add "$BRIDGE" type bridge
        record link "$BRIDGE"
    fi
    ip addr replace "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for i in $(seq "$n"); do
        ns=sd3node$i host=sd3h$i peer=sd3n$i
        if ! netns_exists "$ns"; then
            ip netns add "$ns"
            record netns "$ns"
        fi
        if ! link_exists "$host"; then
            ip link add "$host" type veth peer name "$peer"
            record link "$host"
            ip link set "$peer" netns "$ns"
        fi
        ip link set "$host" master "$BRIDGE"
        ip link set "$host" up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip addr replace "$NET.$((10 + i))/24" dev "$peer"
        ip netns exec "$ns" ip link set "$peer" up
    done
}

write_hosts() {
    local n=$1 i
    {
        echo "# Written by tools/slurm_local.sh: the $n-node test cluster's names (bind-mounted on /etc/hosts)."
        echo "127.0.0.1 localhost"
        echo "::1 localhost ip6-localhost ip6-loopback"
        echo "$NET.1 $CTL_HOST"
        for i in $(seq "$n"); do echo "$NET.$((10 + i)) $(node_name "$i")"; done
    } >"$DIR/hosts"
    { cat "$DIR/hosts"; echo "# this machine's /etc/hosts:"; cat /etc/hosts; } >"$DIR/hosts.ctl"
    printf '# Written by tools/slurm_local.sh: no DNS for the test cluster, names come from /etc/hosts.\nnameserver 127.0.0.1\n' >"$DIR/resolv.conf"
}

# Start a daemon in new UTS and mount namespaces: hostname $1, $DIR/$2 bind-mounted on /etc/hosts
# and $DIR/resolv.conf on /etc/resolv.conf (names resolve from the hosts file only; any other name
# lookup goes to 127.0.0.1, never to the machine's DNS server). The rest is the command; run it
# under nsenter --net=... to put it into a node's network namespace.
IN_UTS='hostname "$1" && mount --bind "$2" /etc/hosts &&
    { [ ! -e /etc/resolv.conf ] || mount --bind "$3" /etc/resolv.conf; } && shift 3 && exec "$@"'
in_uts() {
    local name=$1 hosts=$2
    shift 2
    unshare --uts --mount --propagation private sh -c "$IN_UTS" sh "$name" "$DIR/$hosts" "$DIR/resolv.conf" "$@"
}

# Processes still in a namespace this script created (the jobs' leftovers): TERM, then KILL.
kill_netns_pids() {
    local ns=$1 pids
    netns_exists "$ns" || return 0
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [[ -n $pids ]] || return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 50); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [[ -n $pids ]] || return 0
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
}

teardown_net() {
    [[ -f $CREATED ]] || return 0
    local kind name
    # Namespaces first (their veth ends go with them), then links, newest first.
    while read -r kind name; do
        [[ $kind == netns ]] || continue
        kill_netns_pids "$name"
        if netns_exists "$name"; then ip netns del "$name" || log "could not delete netns $name"; fi
    done < <(tac "$CREATED")
    while read -r kind name; do
        [[ $kind == link ]] || continue
        if link_exists "$name"; then ip link del "$name" || log "could not delete interface $name"; fi
    done < <(tac "$CREATED")
    rm -f "$CREATED"
}

# ---- state --------------------------------------------------------------------------------------

node_state() { sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -1; }

# Ready: slurmctld sees the node responding (sinfo appends `*` to the state of a node that does
# not respond, e.g. one recovered from saved state before slurmd registers); one node: and slurmd
# answers locally.
node_ready() {
    if [[ $1 == localhost ]]; then scontrol show slurmd >/dev/null 2>&1 || return 1; fi
    case "$(node_state "$1")" in idle|mixed|allocated|completing|idle+*|mixed+*|allocated+*) return 0 ;; esac
    return 1
}

daemons_alive() {
    local n=$1 name
    pid_alive "$DIR/slurmctld.pid" || return 1
    for name in $(node_names "$n"); do pid_alive "$(slurmd_pidfile "$name" "$n")" || return 1; done
}

cluster_ok() {
    local n=$1 name
    daemons_alive "$n" || return 1
    for name in $(node_names "$n"); do node_ready "$name" || return 1; done
}

any_daemon_alive() {
    local f
    for f in "$DIR"/slurmctld.pid "$DIR"/slurmd*.pid; do pid_alive "$f" && return 0; done
    return 1
}

cmd_start() {
    local n=$1 name i s=""
    [[ $n =~ ^[1-9][0-9]*$ && $n -le 200 ]] || die "--nodes must be a whole number from 1 to 200, got '$n'"
    [[ $(id -u) -eq 0 ]] || die "must run as root (the daemons run as root here)"
    for b in slurmctld slurmd sinfo sbatch scontrol; do
        command -v "$b" >/dev/null ||
            die "$b not found: apt-get install -y --no-install-recommends slurmctld slurmd munge"
    done
    if [[ $n -gt 1 ]]; then
        command -v ip >/dev/null || die "ip not found: apt-get install -y iproute2"
        for b in unshare nsenter; do
            command -v "$b" >/dev/null || die "$b not found: apt-get install -y util-linux"
        done
    fi
    if [[ -f $CONF ]] && any_daemon_alive && [[ $(conf_nodes) -ne $n ]]; then
        die "a $(conf_nodes)-node cluster is running in $DIR: \`tools/slurm_local.sh stop\` first (or use another SLURM_LOCAL_DIR and SLURM_LOCAL_PORT)"
    fi
    if [[ -f $CONF ]] && cluster_ok "$n"; then log "already running ($n node(s), $CONF)"; return 0; fi
    start_munge
    # Rewrite the config only while no daemon uses it.
    if ! any_daemon_alive; then write_conf "$n"; fi
    if [[ $n -eq 1 ]]; then
        if ! pid_alive "$DIR/slurmctld.pid"; then
            # -c: a fresh cluster. Recovering the saved state of an earlier run brings back its
            # jobs, and one still running when that cluster stopped would hold the nodes for ever.
            slurmctld -f "$CONF" -c
        fi
        if ! pid_alive "$DIR/slurmd.pid"; then
            slurmd -f "$CONF" -N localhost
        fi
    else
        mkdir -p "$DIR"
        setup_net "$n"
        write_hosts "$n"
        if ! pid_alive "$DIR/slurmctld.pid"; then
            in_uts "$CTL_HOST" hosts.ctl slurmctld -f "$CONF" -c  # a fresh cluster (see above)
        fi
        for i in $(seq "$n"); do start_slurmd "$i" "$n"; done
    fi
    local names
    names=$(node_names "$n" | paste -sd' ')
    for _ in $(seq $((WAIT * 2))); do
        if cluster_ok "$n"; then
            log "node(s) $names up ($(sinfo -h -N -o '%N=%T' | paste -sd' ')); export SLURM_CONF=$CONF"
            return 0
        fi
        for name in $names; do
            s=$(node_state "$name" || true)
            case "$s" in
                down*|drain*) scontrol update NodeName="$name" State=RESUME 2>/dev/null || true ;;
            esac
        done
        sleep 0.5
    done
    tail -n 20 "$DIR"/log/*.log >&2 || true
    die "node(s) $names not all idle after ${WAIT}s ($(sinfo -h -N -o '%N=%T' 2>/dev/null | paste -sd' ' || echo 'no answer'))"
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

# Start node $1's slurmd (several nodes) in its namespaces, unless it runs.
start_slurmd() {
    local i=$1 n=$2 name
    name=$(node_name "$i")
    pid_alive "$(slurmd_pidfile "$name" "$n")" && return 0
    mkdir -p "$DIR/spool/slurmd-$name"
    # nsenter, not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup from slurmd.
    nsenter --net="/run/netns/sd3node$i" \
        unshare --uts --mount --propagation private sh -c "$IN_UTS" \
        sh "$name" "$DIR/hosts" "$DIR/resolv.conf" slurmd -f "$CONF" -N "$name"
}

# The index of node name $1 in a cluster of several nodes (dies with a usage line otherwise).
node_index() {
    local name=$1 n i
    n=$(conf_nodes)
    [[ -f $CONF && $n -ge 2 ]] || die "$cmd needs a running cluster of several nodes (start --nodes 2)"
    for i in $(seq "$n"); do [[ $(node_name "$i") == "$name" ]] && { echo "$i"; return 0; }; done
    die "no node '$name' in this cluster (nodes: $(node_names "$n" | paste -sd' '))"
}

cmd_kill_node() {
    local name=$1 i pids
    i=$(node_index "$name")
    pids=$(ip netns pids "sd3node$i" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
    for _ in $(seq 50); do
        [[ -z $(ip netns pids "sd3node$i" 2>/dev/null || true) ]] && break
        sleep 0.1
    done
    rm -f "$(slurmd_pidfile "$name" "$(conf_nodes)")"
    log "node $name killed ($(echo $pids | wc -w) processes, slurmd included)"
}

cmd_revive_node() {
    local name=$1 i s
    i=$(node_index "$name")
    start_slurmd "$i" "$(conf_nodes)"
    for _ in $(seq $((WAIT * 2))); do
        if node_ready "$name"; then log "node $name up ($(node_state "$name"))"; return 0; fi
        s=$(node_state "$name" || true)
        case "$s" in down*|drain*) scontrol update NodeName="$name" State=RESUME 2>/dev/null || true ;; esac
        sleep 0.5
    done
    die "node $name not usable after ${WAIT}s ($(node_state "$name" || echo 'no answer'))"
}

cmd_stop() {
    local f
    if [[ -f $CONF ]] && pid_alive "$DIR/slurmctld.pid"; then
        scancel --full --signal=KILL --partition=debug 2>/dev/null || true
        # let the slurmd kill the jobs' processes before they stop (at most 20 s)
        for _ in $(seq 40); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
    fi
    for f in "$DIR"/slurmd*.pid; do [[ -e $f ]] && stop_pidfile "$f"; done
    stop_pidfile "$DIR/slurmctld.pid"
    teardown_net
    log "stopped"
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
nodes=""
target=""
USAGE="usage: $0 {start [--nodes N]|stop|status [--nodes N]|env|kill-node NAME|revive-node NAME}"
if [[ $cmd == kill-node || $cmd == revive-node ]]; then
    [[ $# -eq 1 ]] || die "$cmd needs one node name, e.g. $cmd sd3node2 ($USAGE)"
    target=$1
    shift
fi
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) [[ $# -ge 2 ]] || die "--nodes needs a number, e.g. --nodes 2"; nodes=$2; shift 2 ;;
        --nodes=*) nodes=${1#--nodes=}; shift ;;
        *) die "unknown argument '$1' ($USAGE)" ;;
    esac
done
case "$cmd" in
    start) cmd_start "${nodes:-1}" ;;
    stop) cmd_stop ;;
    status)
        [[ -f $CONF ]] || exit 1
        [[ -z $nodes || $nodes == "$(conf_nodes)" ]] || exit 1
        cluster_ok "$(conf_nodes)" && { sinfo; exit 0; }
        exit 1 ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    kill-node) cmd_kill_node "$target" ;;
    revive-node) cmd_revive_node "$target" ;;
    *) echo "$USAGE" >&2; exit 2 ;;
esac
