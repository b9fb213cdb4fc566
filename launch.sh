#!/usr/bin/env bash
#SBATCH --job-name=sd3_light
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --output=slurm-%x-%j.out
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
# (no --exclusive here so that CPU tests can share a node; on GPU nodes add --exclusive, --gpus-per-node=8)
#
# launch.sh: start pretrain_sd3.py with torchrun, on SLURM or on this machine.
#
#   sbatch launch.sh [pretrain args]               # batch job; sbatch -N 4 launch.sh ... for 4 nodes
#   bash launch.sh [pretrain args]                 # inside salloc/sbatch: same as above;
#                                                  # outside SLURM: torchrun on this machine
#   NNODES=1 GPUS_PER_NODE=8 bash launch.sh --train-iters 1000 --save ckpt --load ckpt
#
# All arguments go to the entry script unchanged. Settings (environment, default):
#   NNODES          nodes; SLURM_JOB_NUM_NODES (SLURM_NNODES) in an allocation, else 1
#   GPUS_PER_NODE   ranks per node; SLURM_GPUS_ON_NODE, else the GPUs torch sees, else 2 CPU ranks
#                   (the Python side picks gloo when there is no CUDA)
#   MASTER_ADDR     rendezvous host; the first node of SLURM_JOB_NODELIST, else 127.0.0.1
#   MASTER_PORT     rendezvous port; 20000 + SLURM_JOB_ID % 20000 in SLURM (jobs sharing a node
#                   do not collide); outside SLURM a free port (torchrun --standalone)
#   NODE_RANK       this node's rank outside SLURM (inside SLURM: SLURM_NODEID), default 0
#   CONFIG          preset passed as --config; default configs/sd3_light_tiny.toml; empty: none
#   PYTHON          interpreter; default <repo>/.venv/bin/python if present, else python3;
#                   with CONTAINER_IMAGE: python (the container's)
#   ENTRY           script torchrun runs; default <repo>/pretrain_sd3.py (tests put a stand-in here)
#   EXTRA_ARGS      more arguments, word-split, placed before "$@"
#   LAUNCH_SRUN     1: always go through srun, even for one node already in a batch job (below)
#   LAUNCH_CHECK    0: skip the checks and the environment report run once before the ranks
#                   start (below); default 1
#   LAUNCH_DRY_RUN  1: print the commands this script would run (the checks, srun, torchrun or
#                   ft_launcher on each node) and start nothing
#   CONTAINER_IMAGE in SLURM: run the ranks in this container image through pyxis (srun
#                   --container-image; a registry image such as nvcr.io#nvidia/pytorch:25.12-py3 or
#                   a .sqsh file; docker/Dockerfile builds one with this project installed); the
#                   srun step mounts the repository and the working directory at the same paths,
#                   starts in the working directory, and uses the container's python
#   CONTAINER_MOUNTS more pyxis mounts, SRC:DST[,SRC:DST...] (data, checkpoints); with CONTAINER_IMAGE
#   OMP_NUM_THREADS threads per rank; 1 when several ranks share a node (torchrun's default)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun waits for ranks after SIGTERM before SIGKILL (30)
#   MAX_REQUEUES    several nodes: times this script requeues a job whose step failed (3; below)
#   MAX_RESTARTS    in-job restarts of the worker group after a rank fails (the launcher's
#                   --max-restarts; torchrun and ft_launcher alike), default 0
#
# Fault tolerance: with --enable-ft-package among the arguments, nvidia-resiliency-ext's ft_launcher
# runs in place of torchrun (same layout, c10d rendezvous), with a rank monitor per rank that kills
# a rank which stops answering; the workers then restart (MAX_RESTARTS) from the last checkpoint.
# Its timeouts, in seconds (--calc-ft-timeouts learns them from the run instead):
#   FT_INITIAL_HEARTBEAT_TIMEOUT  start-up up to the end of the first iteration (600)
#   FT_HEARTBEAT_TIMEOUT          one training iteration, and the time between the loop's sections (180)
#   FT_EVAL_TIMEOUT               one evaluation with its samples (600)
#   FT_SAVE_TIMEOUT               one checkpoint save (600)
#
# A lost node (several nodes): its peers' collectives fail at once (connection closed), the ranks
# exit and srun ends the step. SLURM requeues the job itself when it marks the node DOWN
# (#SBATCH --requeue, after its SlurmdTimeout); when srun fails first, where SLURM would call the
# job FAILED, this script requeues it (scontrol requeue) at most MAX_REQUEUES times (default 3),
# and says so. The requeued job (SLURM starts it again no sooner than about 2 minutes later, once
# enough nodes are up) runs the same command, which resumes from the last complete checkpoint
# when it has --load. The log of every attempt stays in the job's output file (--open-mode=append).
#
# Before any rank starts, `ENTRY --check-config ARGS` runs once (WORLD_SIZE = nodes x ranks per
# node): a bad flag, TOML key, parallel layout, data path or checkpoint is one line and a non-zero
# exit here, not one traceback per rank. Once the checks pass it prints the environment report
# (`python -m megatron_sd3.env ARGS`: versions, GPUs, and what the run will use).
#
# How it starts the ranks:
#   outside SLURM            exec torchrun --nproc-per-node=GPUS_PER_NODE on this machine.
#   sbatch, one node         exec torchrun directly in the batch step (no srun): every way SLURM
#                            signals the job (scancel, --full, --batch, time limit, preemption)
#                            then reaches torchrun, which passes SIGTERM on to the ranks.
#   several nodes / salloc   srun --ntasks-per-node=1 runs this script again on every node
#                            (LAUNCH_STAGE=node), which execs torchrun with --node-rank=SLURM_NODEID
#                            and MASTER_ADDR:MASTER_PORT as rendezvous (static, c10d store).
#   CONTAINER_IMAGE          always the srun path (one node too): pyxis starts the container in the
#                            srun step; the checks and the report then run in the container, on
#                            every node (node 0 prints them). Outside SLURM: refused (no pyxis).
#
# Stopping a job so that it saves (pass --exit-signal-handler: the ranks save and exit 0 on SIGTERM):
#   scancel --batch --signal=TERM JOBID   graceful in both modes (this script forwards it), job keeps
#                                         running until the checkpoint is written. Recommended.
#   scancel JOBID                         one node: graceful, but SLURM sends SIGKILL KillWait
#                                         seconds later (30 s by default); several nodes: srun
#                                         itself turns SIGTERM into SIGKILL, so use the line above.
#   #SBATCH --signal=B:TERM@120           (set above) SIGTERM 120 s before the time limit, via the
#                                         batch shell; raise it if a save takes longer.
#   Never `scancel --full --signal=TERM` with several nodes: srun answers SIGTERM with SIGKILL.
set -euo pipefail

# ---- where the repository is (sbatch runs a copy of this file from the spool directory) ----------
self=${BASH_SOURCE[0]}
if [[ -z ${LAUNCH_ROOT:-} ]]; then
    if [[ -n ${SLURM_JOB_ID:-} && $(basename "$self") == slurm_script ]]; then
        cmd=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -1)
        if [[ -n $cmd && -f $cmd ]]; then LAUNCH_ROOT=$(cd "$(dirname "$cmd")" && pwd)
        else LAUNCH_ROOT=${SLURM_SUBMIT_DIR:-$PWD}; fi
    else
        LAUNCH_ROOT=$(cd "$(dirname "$self")" && pwd)
    fi
fi
export LAUNCH_ROOT
ROOT=$LAUNCH_ROOT

if [[ -z ${PYTHON:-} ]]; then
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then PYTHON=python  # the container's, not this host's .venv
    elif [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
ENTRY=${ENTRY:-$ROOT/pretrain_sd3.py}
CONFIG=${CONFIG-$ROOT/configs/sd3_light_tiny.toml}
EXTRA_ARGS=${EXTRA_ARGS:-}
export PYTHON ENTRY CONFIG EXTRA_ARGS

log() { echo "launch.sh: $*" >&2; }

DRY_RUN=${LAUNCH_DRY_RUN:-0}
# LAUNCH_DRY_RUN=1: one command, shell-quoted, on stdout, after a comment line saying what it is.
show() {
    local what=$1
    shift
    echo "# $what"
    printf '%q ' "$@" | sed 's/ $//'
    echo
}

ranks_per_node() {
    if [[ -n ${GPUS_PER_NODE:-} ]]; then echo "$GPUS_PER_NODE"; return; fi
    local n=0
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        n=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null 2>&1 || [[ -e /dev/nvidiactl || -e /dev/kfd ]]; then
        # torch honours CUDA_VISIBLE_DEVICES; nvidia-smi does not.
        n=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    fi
    if [[ ${n:-0} -gt 0 ]]; then echo "$n"; else echo 2; fi
}

# The entry's arguments: --config CONFIG, EXTRA_ARGS, then the caller's.
entry_args() {
    ENTRY_ARGS=()
    [[ -n $CONFIG ]] && ENTRY_ARGS+=(--config "$CONFIG")
    # shellcheck disable=SC2206  # EXTRA_ARGS is meant to be word-split
    [[ -n $EXTRA_ARGS ]] && ENTRY_ARGS+=($EXTRA_ARGS)
    ENTRY_ARGS+=("$@")
}

# The entry's checks, once for the whole job: $1 = nnodes, $2 = print (1) or not (0), then the
# entry's arguments. Exits with the entry's status (its one-line error on stderr) when they fail.
check_config() {
    local nnodes=$1 loud=$2 world rc=0
    shift 2
    [[ ${LAUNCH_CHECK:-1} == 0 ]] && return 0
    world=$((nnodes * $(ranks_per_node)))
    entry_args "$@"
    if [[ $DRY_RUN == 1 ]]; then
        show "the checks and the environment report, once (WORLD_SIZE=$world)" \
            env WORLD_SIZE="$world" "$PYTHON" "$ENTRY" --check-config "${ENTRY_ARGS[@]}"
        return 0
    fi
    if [[ $loud == 1 ]]; then
        WORLD_SIZE=$world "$PYTHON" "$ENTRY" --check-config "${ENTRY_ARGS[@]}" || rc=$?
    else
        WORLD_SIZE=$world "$PYTHON" "$ENTRY" --check-config "${ENTRY_ARGS[@]}" >/dev/null 2>&1 || rc=$?
    fi
    if [[ $rc -ne 0 ]]; then exit "$rc"; fi
}

# Is --enable-ft-package among the entry's arguments (EXTRA_ARGS included)? $@ = the caller's.
wants_ft() {
    local a
    entry_args "$@"
    for a in "${ENTRY_ARGS[@]}"; do [[ $a == --enable-ft-package ]] && return 0; done
    return 1
}

# ft_launcher's options: the rank monitors' section timeouts (megatron_sd3/training/fault_tolerance.py).
# The library's plain heartbeat timeouts are off (inf): the sections do that job, so that a long save
# or evaluation has its own timeout. GPU and NIC health checks need NVML: off where there is none.
ft_options() {
    FT_OPTIONS=(--ft-initial-rank-heartbeat-timeout=inf --ft-rank-heartbeat-timeout=inf
        "--ft-rank-section-timeouts=setup:${FT_INITIAL_HEARTBEAT_TIMEOUT:-600},step:${FT_HEARTBEAT_TIMEOUT:-180},eval:${FT_EVAL_TIMEOUT:-600},checkpointing:${FT_SAVE_TIMEOUT:-600}"
        "--ft-rank-out-of-section-timeout=${FT_HEARTBEAT_TIMEOUT:-180}")
    if ! command -v nvidia-smi >/dev/null 2>&1; then FT_OPTIONS+=(--ft-enable-nic-monitor=false); fi
}

# torchrun's (or ft_launcher's) command for one node, in TORCHRUN_CMD (its ranks in NPROC):
# $1 = nnodes, $2 = node rank, then the entry's arguments.
torchrun_cmd() {
    local nnodes=$1 node_rank=$2 nproc
    shift 2
    nproc=$(ranks_per_node)
    NPROC=$nproc
    # torch warns at import when pynvml (a dependency of nvidia-resiliency-ext) is installed
    local -a cmd=("$PYTHON" -W "ignore:The pynvml package is deprecated:FutureWarning")
    local ft=0
    if wants_ft "$@"; then ft=1; fi
    if [[ $ft == 1 ]]; then
        ft_options
        cmd+=(-m nvidia_resiliency_ext.fault_tolerance.launcher "${FT_OPTIONS[@]}")
    else
        cmd+=(-m torch.distributed.run)
    fi
    cmd+=(--nnodes="$nnodes" --nproc-per-node="$nproc" --max-restarts="${MAX_RESTARTS:-0}")
    if [[ $nnodes -eq 1 && -z ${MASTER_PORT:-} ]]; then
        cmd+=(--standalone)
    elif [[ $ft == 1 ]]; then  # restarts across nodes need the c10d rendezvous (node ranks from it)
        cmd+=(--rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
              --rdzv-id="${SLURM_JOB_ID:-sd3}")
    else
        cmd+=(--node-rank="$node_rank" --master-addr="${MASTER_ADDR:-127.0.0.1}"
              --master-port="${MASTER_PORT:-29500}")
    fi
    entry_args "$@"
    cmd+=("$ENTRY" "${ENTRY_ARGS[@]}")
    TORCHRUN_CMD=("${cmd[@]}")
}

# exec torchrun (or ft_launcher) for one node: $1 = nnodes, $2 = node rank, then the entry's arguments.
exec_torchrun() {
    local nnodes=$1 node_rank=$2
    torchrun_cmd "$@"
    if [[ $DRY_RUN == 1 ]]; then
        show "node $node_rank of $nnodes: the ranks" "${TORCHRUN_CMD[@]}"
        exit 0
    fi
    # torchrun's own default for several ranks, set here so that it does not print a banner about it
    if [[ $NPROC -gt 1 && -z ${OMP_NUM_THREADS:-} ]]; then export OMP_NUM_THREADS=1; fi
    log "node $node_rank/$nnodes on $(hostname): ${TORCHRUN_CMD[*]}"
    exec "${TORCHRUN_CMD[@]}"
}

# ---- 1. outside SLURM ---------------------------------------------------------------------------
if [[ -z ${SLURM_JOB_ID:-} && -n ${CONTAINER_IMAGE:-} ]]; then
    log "CONTAINER_IMAGE runs the ranks through SLURM's pyxis (srun --container-image): use sbatch/salloc, or start the container yourself and run launch.sh in it without CONTAINER_IMAGE"
    exit 2
fi
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    check_config "${NNODES:-1}" 1 "$@"
    exec_torchrun "${NNODES:-1}" "${NODE_RANK:-0}" "$@"
fi

# ---- inside a SLURM allocation ------------------------------------------------------------------
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
if [[ -z ${MASTER_ADDR:-} ]]; then
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-localhost}}" | head -n 1)
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export NNODES MASTER_ADDR MASTER_PORT

# ---- 2. one task of our own srun step (or of a user's `srun --ntasks-per-node=1 launch.sh`) ------
if [[ ${LAUNCH_STAGE:-} == node || -n ${SLURM_STEP_ID:-} ]]; then
    # our own srun step was checked by the batch shell when it could count the ranks; otherwise
    # (a user's srun, salloc on a login node) every node checks and node 0 says why
    if [[ ${LAUNCH_CHECKED:-0} != 1 ]]; then
        check_config "${SLURM_STEP_NUM_NODES:-$NNODES}" "$([[ ${SLURM_NODEID:-0} == 0 ]] && echo 1 || echo 0)" "$@"
    fi
    exec_torchrun "${SLURM_STEP_NUM_NODES:-$NNODES}" "${SLURM_NODEID:?SLURM_NODEID not set}" "$@"
fi

# ---- 3. batch shell on the (only) node: torchrun directly, so every signal reaches it ----------
if [[ -n ${SLURMD_NODENAME:-} && $NNODES -eq 1 && ${LAUNCH_SRUN:-0} != 1 && -z ${CONTAINER_IMAGE:-} ]]; then
    check_config 1 1 "$@"
    exec_torchrun 1 0 "$@"
fi

# ---- 4. several nodes (or salloc on a login node): one torchrun per node through srun ----------
# srun answers SIGTERM with SIGKILL to its tasks, so the batch shell must never pass SIGTERM to
# srun: it asks slurmctld to signal the job's steps instead (scancel without --full/--batch).
# The checks run here when this shell can count the ranks per node (a batch job runs on the first
# node of its allocation), else on the nodes (below, stage 2).
# With CONTAINER_IMAGE this shell is outside the container: the nodes check, in it (stage 2).
checked=0
if [[ -z ${CONTAINER_IMAGE:-} ]] && [[ -n ${GPUS_PER_NODE:-} || -n ${SLURM_GPUS_ON_NODE:-} || -n ${SLURMD_NODENAME:-} ]]; then
    check_config "$NNODES" 1 "$@"
    checked=1
fi
srun_args=(--nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
           --export=ALL,LAUNCH_STAGE=node,LAUNCH_CHECKED=$checked)
[[ -n ${SLURM_CPUS_ON_NODE:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
if [[ -n ${CONTAINER_IMAGE:-} ]]; then  # pyxis: the same paths inside, starting where we are
    mounts="$ROOT:$ROOT"
    [[ $PWD != "$ROOT" && $PWD != "$ROOT"/* ]] && mounts+=",$PWD:$PWD"
    [[ -n ${CONTAINER_MOUNTS:-} ]] && mounts+=",$CONTAINER_MOUNTS"
    srun_args+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts" --container-workdir="$PWD")
fi
if [[ $DRY_RUN == 1 ]]; then
    show "the srun step: one task per node (job ${SLURM_JOB_ID}, nodes ${SLURM_JOB_NODELIST:-?})" \
        srun "${srun_args[@]}" bash "$ROOT/launch.sh" "$@"
    [[ $checked == 0 ]] && check_config "$NNODES" 1 "$@"
    for ((node = 0; node < NNODES; node++)); do
        torchrun_cmd "$NNODES" "$node" "$@"
        show "node $node of $NNODES (in the srun step${CONTAINER_IMAGE:+, in the container}): the ranks" "${TORCHRUN_CMD[@]}"
    done
    exit 0
fi
log "srun ${srun_args[*]} on ${SLURM_JOB_NODELIST:-?}, rendezvous $MASTER_ADDR:$MASTER_PORT"
if [[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]]; then
    log "job $SLURM_JOB_ID runs again: requeue ${SLURM_RESTART_COUNT} (SLURM_RESTART_COUNT)"
fi
srun "${srun_args[@]}" bash "$ROOT/launch.sh" "$@" &
srun_pid=$!
signalled=0
forward() {
    signalled=1
    log "got SIG$1: signalling the job's steps (job $SLURM_JOB_ID)"
    scancel --signal="$1" "$SLURM_JOB_ID" || true
}
for sig in TERM INT USR1 USR2 HUP; do
    # shellcheck disable=SC2064
    trap "forward $sig" "$sig"
done
rc=0
while true; do
    set +e
    wait "$srun_pid"
    rc=$?
    set -e
    # wait returns >128 when a trapped signal interrupted it; srun is still running then.
    kill -0 "$srun_pid" 2>/dev/null || break
done
# The step failed on its own (a rank, a node): requeue the job rather than end it FAILED.
if [[ $rc -ne 0 && $signalled == 0 ]]; then
    restarts=${SLURM_RESTART_COUNT:-0}
    if [[ $restarts -lt ${MAX_REQUEUES:-3} ]]; then
        log "the job's step failed (exit $rc): requeueing job $SLURM_JOB_ID ($((restarts + 1)) of at most ${MAX_REQUEUES:-3}, MAX_REQUEUES); it resumes from the last checkpoint when enough nodes are up"
        if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
        log "scontrol requeue $SLURM_JOB_ID failed: the job ends FAILED"
    else
        log "the job's step failed (exit $rc) and the job was requeued $restarts times already (MAX_REQUEUES=${MAX_REQUEUES:-3}): not again"
    fi
fi
exit "$rc"
