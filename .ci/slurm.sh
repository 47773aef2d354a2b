#!/usr/bin/env bash
# A real single-node SLURM cluster for the tests (Debian packages, as root, no systemd needed).
#   bash .ci/slurm.sh install   apt-get install slurm-wlm and munge (skipped when already installed)
#   bash .ci/slurm.sh start     start munged, slurmctld and slurmd; wait until the node is idle
#   bash .ci/slurm.sh stop      stop slurmd, slurmctld and munged (by their pid files)
#   bash .ci/slurm.sh status    show the node (exit status 1 when the cluster does not answer)
# Clients need `export SLURM_CONF=$SIS_CI_SLURM_DIR/slurm.conf` (default /tmp/sis-ci-slurm/slurm.conf).
# Every command is idempotent. The daemons talk over 127.0.0.1, so the host name need not resolve.
# See /work/shared/docs/slurm.md for why the configuration looks like this.
set -euo pipefail

DIR=${SIS_CI_SLURM_DIR:-/tmp/sis-ci-slurm}
export SLURM_CONF=$DIR/slurm.conf
MUNGE_PID=/run/munge/munged.pid
START_TIMEOUT=60  # seconds to wait for the node to become usable

log() { echo "slurm.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

installed() {
    command -v sbatch >/dev/null && command -v slurmctld >/dev/null \
        && command -v slurmd >/dev/null && command -v munged >/dev/null
}

do_install() {
    if installed; then
        log "slurm-wlm and munge already installed"
        return
    fi
    log "installing slurm-wlm and munge"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
}

# True when the process named in pid file $1 is alive.
alive() {
    [ -s "$1" ] && as_root kill -0 "$(cat "$1")" 2>/dev/null
}

munge_works() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
    if munge_works; then
        return
    fi
    as_root mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        as_root dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    as_root chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    as_root chmod 400 /etc/munge/munge.key
    as_root runuser -u munge -- munged
    for _ in $(seq 20); do
        munge_works && return
        sleep 0.5
    done
    log "munged does not answer (munge -n | unmunge fails)"
    exit 1
}

# Memory the node offers to jobs (MB): all of it but 1 GB for the system, capped at 8000 MB as in
# the documented configuration.
node_memory_mb() {
    local total
    total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    total=$((total - 1024))
    [ "$total" -gt 8000 ] && total=8000
    echo "$total"
}

write_conf() {
    local host
    host=$(hostname -s)
    as_root mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    as_root tee "$SLURM_CONF" >/dev/null <<EOF
ClusterName=test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/ctld.log
SlurmdLogFile=$DIR/log/d.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
JobAcctGatherParams=OverMemoryKill
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$(node_memory_mb) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() {
    sinfo -h -N -o %t 2>/dev/null | head -n 1
}

node_usable() {
    case "$(node_state)" in
        idle | mix | alloc | comp) return 0 ;;
        *) return 1 ;;
    esac
}

do_start() {
    if ! installed; then
        log "SLURM is not installed: run 'bash .ci/slurm.sh install' first"
        exit 1
    fi
    start_munge
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_usable; then
        log "already running (node $(node_state)); SLURM_CONF=$SLURM_CONF"
        return
    fi
    stop_daemons
    write_conf
    as_root slurmctld -c -f "$SLURM_CONF"  # -c: a clean start, the node unknown until slurmd registers
    as_root slurmd -f "$SLURM_CONF"
    local waited=0
    until [ "$(node_state)" = idle ]; do
        if [ "$waited" -ge "$START_TIMEOUT" ]; then
            log "the node is not idle after ${START_TIMEOUT} s (state: '$(node_state)'); logs follow"
            tail -n 20 "$DIR/log/ctld.log" "$DIR/log/d.log" >&2 || true
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    log "cluster up (node idle after ${waited} s); export SLURM_CONF=$SLURM_CONF"
}

# Stops the process named in pid file $1 and waits until it has exited.
stop_pidfile() {
    alive "$1" || return 0
    local pid
    pid=$(cat "$1")
    as_root kill "$pid"
    for _ in $(seq 50); do
        as_root kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    log "pid $pid (from $1) did not exit after 10 s"
    exit 1
}

stop_daemons() {
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
}

do_stop() {
    stop_daemons
    stop_pidfile "$MUNGE_PID"
    log "stopped"
}

do_status() {
    if ! sinfo -N 2>/dev/null; then
        log "no cluster answers (SLURM_CONF=$SLURM_CONF)"
        exit 1
    fi
}

case "${1:-}" in
    install) do_install ;;
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    *)
        echo "usage: $0 install|start|stop|status" >&2
        exit 2
        ;;
esac
