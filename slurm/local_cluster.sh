#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for tests and for trying things by hand:
# munged + slurmctld + two slurmd daemons (node1, node2), both at 127.0.0.1 on their own port.
#
#   slurm/local_cluster.sh up       start what is not running (idempotent); prints SLURM_CONF
#   slurm/local_cluster.sh down     cancel all jobs, stop the daemons this script started
#   slurm/local_cluster.sh status   sinfo of the cluster
#   slurm/local_cluster.sh env      print `export SLURM_CONF=...` (eval it in your shell)
#
# Needs root and Debian's slurmctld slurmd slurm-client munge packages
# (apt-get install -y slurmctld slurmd slurm-client munge). Exit status 3: not possible here
# (missing binaries or not root), with the reason on stderr.
#
# State, config and logs live in $WBSCALE_SLURM_DIR (default /tmp/wbscale-slurm); ports are
# $WBSCALE_SLURM_PORT (controller, default 16817) and the next two (node1, node2), so a real
# SLURM on the standard ports is left alone. Nothing outside that folder is written, except
# munge's runtime folder (/run/munge) and its key when the machine has none.
set -euo pipefail

STATE=${WBSCALE_SLURM_DIR:-/tmp/wbscale-slurm}
PORT=${WBSCALE_SLURM_PORT:-16817}
CONF=$STATE/slurm.conf
NODES=(node1 node2)
export SLURM_CONF=$CONF

say() { echo "local_cluster: $*" >&2; }
die() { say "$1"; exit "${2:-1}"; }

need_tools() {
    local missing=()
    for tool in munged munge slurmctld slurmd sinfo scontrol sbatch squeue scancel; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    ((${#missing[@]} == 0)) || die "missing ${missing[*]}; install with: apt-get install -y slurmctld slurmd slurm-client munge" 3
    [[ $(id -u) == 0 ]] || die "needs root (SlurmUser=root, munged as user munge)" 3
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS WHAT CMD...
    local limit=$1 what=$2; shift 2
    for ((i = 0; i < limit * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "$what did not come up within ${limit}s; logs in $STATE/log"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge && chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    runuser -u munge -- munged --force
    touch "$STATE/munged.ours"
    wait_for 10 munged sh -c 'munge -n | unmunge'
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # MB per node: half each
    mkdir -p "$STATE/ctld" "$STATE/log" "$STATE/run"
    for node in "${NODES[@]}"; do mkdir -p "$STATE/spool/$node"; done
    local tmp=$CONF.tmp
    cat >"$tmp" <<EOF
# Written by slurm/local_cluster.sh: two slurmd (node1, node2) on this host, for wbscale's tests.
ClusterName=wbscale-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# the hardware is shared by both nodes: take the node lines below as they are
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=120
InactiveLimit=0
KillWait=15
MinJobAge=3600
# wbscale exits 75 (EX_TEMPFAIL) when it saved a checkpoint but could not requeue itself
RequeueExit=75
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
    else
        mv "$tmp" "$CONF"
        # daemons already running read the new file (restarted ones read it anyway)
        if alive "$STATE/run/slurmctld.pid"; then scontrol reconfigure >/dev/null 2>&1 || true; fi
    fi
}

nodes_idle() {
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    for node in "${NODES[@]}"; do
        grep -Eq "^$node (idle|mix|alloc)" <<<"$states" || return 1
    done
}

up() {
    need_tools
    mkdir -p "$STATE"
    start_munge
    write_conf
    if ! alive "$STATE/run/slurmctld.pid"; then
        slurmctld -i
        wait_for 30 slurmctld scontrol ping
    fi
    for node in "${NODES[@]}"; do
        if ! alive "$STATE/run/slurmd-$node.pid"; then
            slurmd -N "$node"
        fi
    done
    for ((i = 0; i < 150; i++)); do
        nodes_idle && break
        # a node left down/drained by an earlier session comes back
        if ((i % 10 == 9)); then scontrol update nodename=node1,node2 state=resume >/dev/null 2>&1 || true; fi
        sleep 0.2
    done
    nodes_idle || die "nodes not idle after 30s: $(sinfo -h -N -o '%N %t %E' 2>&1 | tr '\n' ';') logs in $STATE/log"
    say "up: $(sinfo -h -o '%P %D nodes %t' | head -1); use: export SLURM_CONF=$CONF"
}

down() {
    if [[ -f $CONF ]] && alive "$STATE/run/slurmctld.pid"; then
        scancel --full --quiet "--user=$(id -un)" 2>/dev/null || true
    fi
    for pidfile in "$STATE"/run/slurmd-*.pid "$STATE/run/slurmctld.pid"; do
        [[ -f $pidfile ]] || continue
        if alive "$pidfile"; then
            local pid
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
        fi
        rm -f "$pidfile"
    done
    if [[ -f $STATE/munged.ours ]]; then
        local mpid
        mpid=$(cat /run/munge/munged.pid 2>/dev/null || true)
        [[ -n $mpid ]] && kill "$mpid" 2>/dev/null || true
        rm -f "$STATE/munged.ours"
    fi
    say "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) sinfo -N -l ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "usage: $0 up|down|status|env" 2 ;;
esac
