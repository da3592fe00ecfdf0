#!/usr/bin/env bash
# A real single-node SLURM cluster with accounting, for tests and demos (Debian/Ubuntu, as root).
#
#   tests/slurm/cluster.sh install   apt-get the Debian packages (munge slurmctld slurmd slurm-client
#                                    slurmdbd mariadb-server, --no-install-recommends)
#   tests/slurm/cluster.sh start     install if needed, then start munged, mariadbd, slurmdbd,
#                                    slurmctld and slurmd; wait until the node is idle
#   tests/slurm/cluster.sh stop      cancel this cluster's jobs, stop the daemons it started (by PID)
#   tests/slurm/cluster.sh status    which daemons run, sinfo
#
# Everything lives in $LAYERSCOPE_SLURM_DIR (default /tmp/layerscope-slurm): configs, the MariaDB
# data directory, spool/state directories, logs and one PID file per daemon this script started.
# Clients (sbatch, sacct, and srun inside jobs) find the cluster through symbolic links
# /etc/slurm/{slurm,gres,slurmdbd}.conf -> $LAYERSCOPE_SLURM_DIR/etc/, removed again by `stop`.
# (SLURM_CONF is no alternative: snakemake-executor-plugin-slurm-jobstep 0.6.1 drops every SLURM_*
# variable but the job's identity before its inner `srun`, which then finds no configuration.)
# A machine with its own /etc/slurm/slurm.conf (a real SLURM) is refused, not touched.
# The node has CPUs = nproc, its real memory (memory is not a consumable: CR_Core), and GRES
# gpu:2 backed by /dev/null (gres.conf AutoDetect=off), so jobs that ask for GPUs (--gpus=1)
# schedule on a CPU-only machine and see CUDA_VISIBLE_DEVICES; two such jobs can run at once.
# Exit status 3 (with "SKIP: <reason>" on stderr) means the cluster cannot run here
# (not root, not Debian, packages unavailable); any other non-zero status is a real failure.
set -euo pipefail

STATE=${LAYERSCOPE_SLURM_DIR:-/tmp/layerscope-slurm}
ETC=$STATE/etc
PIDS=$STATE/pids
LOGS=$STATE/log
HOST=$(hostname -s)
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
DB_PORT=${LAYERSCOPE_SLURM_DB_PORT:-13306}
DB_SOCK=$STATE/mysqld/mysqld.sock
CONFS=(slurm.conf gres.conf slurmdbd.conf)

skip() { echo "SKIP: $*" >&2; exit 3; }
die() { echo "cluster.sh: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }

# wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.2 s until it succeeds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

alive() { # alive NAME: the daemon NAME was started by this script and still runs
    local f=$PIDS/$1.pid
    [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

need_root() { [[ $(id -u) == 0 ]] || skip "not root (a local SLURM needs root to run slurmd and install packages)"; }

have_packages() {
    local b
    for b in munged slurmctld slurmd slurmdbd sbatch sacct mariadbd mariadb-install-db; do
        command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || return 1
    done
}

cmd_install() {
    need_root
    have_packages && return 0
    command -v apt-get >/dev/null || skip "no apt-get: install ${PACKAGES[*]} by hand"
    log "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${PACKAGES[@]}" >"$STATE.apt.log" 2>&1; then
        apt-get update >>"$STATE.apt.log" 2>&1 || true
        apt-get install -y --no-install-recommends "${PACKAGES[@]}" >>"$STATE.apt.log" 2>&1 ||
            skip "apt-get install ${PACKAGES[*]} failed (offline?): see $STATE.apt.log"
    fi
    have_packages || skip "packages installed but daemons missing (see $STATE.apt.log)"
}

write_configs() {
    local ncpu mem
    ncpu=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
    mkdir -p "$ETC" "$PIDS" "$LOGS" "$STATE/ctld" "$STATE/spool"
    cat >"$ETC/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: a one-node cluster with accounting (slurmdbd on MariaDB).
ClusterName=layerscope
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
AccountingStoreFlags=job_comment
NodeName=$HOST CPUs=$ncpu RealMemory=$mem Gres=gpu:2 Features=fakegpu State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$ETC/gres.conf" <<EOF
# Fake GPUs: two GRES entries backed by harmless device files, so GPU jobs schedule on CPUs.
AutoDetect=off
NodeName=$HOST Name=gpu File=/dev/null
NodeName=$HOST Name=gpu File=/dev/zero
EOF
    cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=layerscope
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
}

# link_configs: /etc/slurm/<conf> -> $ETC/<conf>; refuse a configuration that is not ours.
link_configs() {
    local c
    mkdir -p /etc/slurm
    for c in "${CONFS[@]}"; do
        if [[ -e /etc/slurm/$c && ! -L /etc/slurm/$c ]]; then
            skip "/etc/slurm/$c exists (a real SLURM here?); not replacing it"
        fi
    done
    for c in "${CONFS[@]}"; do
        ln -sfn "$ETC/$c" "/etc/slurm/$c"
    done
}

unlink_configs() {
    local c
    for c in "${CONFS[@]}"; do
        if [[ -L /etc/slurm/$c && $(readlink "/etc/slurm/$c") == "$ETC/$c" ]]; then
            rm -f "/etc/slurm/$c"
        fi
    done
}

# launch NAME CMD...: start a foreground daemon in the background, record its PID.
launch() {
    local name=$1
    shift
    "$@" >>"$LOGS/$name.out" 2>&1 </dev/null &
    echo $! >"$PIDS/$name.pid"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already running (not ours; left alone)"
        return
    fi
    [[ -s /etc/munge/munge.key ]] || { mungekey --create >/dev/null 2>&1 || die "no /etc/munge/munge.key"; }
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    launch munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
    wait_for 10 munged sh -c 'munge -n </dev/null | unmunge' || die "munged did not start: $(tail -5 "$LOGS/munged.out")"
}

start_mariadb() {
    local data=$STATE/mysql
    if [[ ! -d $data/mysql ]]; then
        install -d -o mysql -g mysql "$data"
        mariadb-install-db --no-defaults --user=mysql --datadir="$data" --skip-test-db \
            --auth-root-authentication-method=socket >"$LOGS/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed: see $LOGS/mariadb-install.log"
    fi
    install -d -o mysql -g mysql "$STATE/mysqld"
    chown -R mysql:mysql "$data"
    launch mariadbd mariadbd --no-defaults --user=mysql --datadir="$data" --socket="$DB_SOCK" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$STATE/mysqld/mariadbd.pid" \
        --log-error="$LOGS/mariadbd.log" --skip-name-resolve --innodb-buffer-pool-size=64M
    wait_for 30 mariadbd mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping ||
        die "mariadbd did not start: $(tail -5 "$LOGS/mariadbd.log")"
    mariadb --no-defaults --socket="$DB_SOCK" -uroot <<'SQL' || die "could not create the slurm database user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'layerscope';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'layerscope';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
}

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1; }

cmd_start() {
    need_root
    mkdir -p "$STATE"
    cmd_install
    getent hosts "$HOST" >/dev/null || die "the short hostname '$HOST' does not resolve (add it to /etc/hosts)"
    if alive slurmctld && alive slurmd && scontrol ping >/dev/null 2>&1; then
        echo "already-running"
        return 0
    fi
    cmd_stop >/dev/null 2>&1 || true # leftovers of a half-started cluster
    write_configs
    link_configs
    start_munge
    start_mariadb
    launch slurmdbd slurmdbd -D
    wait_for 30 slurmdbd sacctmgr -n show cluster ||
        die "slurmdbd did not answer: $(tail -5 "$LOGS/slurmdbd.log")"
    launch slurmctld slurmctld -D
    wait_for 30 slurmctld scontrol ping || die "slurmctld did not start: $(tail -5 "$LOGS/slurmctld.log")"
    launch slurmd slurmd -D
    local deadline=$((SECONDS + 30)) st=""
    while ((SECONDS < deadline)); do
        st=$(node_state)
        [[ $st == idle* ]] && break
        sleep 0.3
    done
    [[ $st == idle* ]] || die "node $HOST is '$st', not idle: $(scontrol show node "$HOST" | grep -i reason) $(tail -5 "$LOGS/slurmd.log")"
    # sacct must answer for the plugin's status checks (the cluster registers itself with slurmdbd).
    wait_for 20 sacct sh -c 'sacctmgr -n -P show cluster format=cluster | grep -qx layerscope' ||
        die "slurmctld did not register with slurmdbd: $(tail -5 "$LOGS/slurmctld.log")"
    echo "started"
}

# stop_pid NAME: SIGTERM the daemon we started, SIGKILL after 15 s.
stop_pid() {
    local f=$PIDS/$1.pid pid
    [[ -f $f ]] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        local i
        for i in $(seq 75); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$1 ($pid) ignored SIGTERM; killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$f"
}

cmd_stop() {
    if alive slurmctld; then
        # every job on this private cluster is ours: cancel them so no slurmstepd outlives slurmd
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            scancel $jobs 2>/dev/null || true
            wait_for 20 squeue-empty sh -c '[ -z "$(squeue -h -o %i)" ]' || log "jobs still listed: $jobs"
        fi
    fi
    local d
    for d in slurmd slurmctld slurmdbd mariadbd munged; do
        stop_pid "$d"
    done
    unlink_configs
    echo "stopped"
}

cmd_status() {
    local d rc=0
    for d in munged mariadbd slurmdbd slurmctld slurmd; do
        if alive "$d"; then
            echo "$d: running (pid $(cat "$PIDS/$d.pid"))"
        else
            if [[ $d == munged ]]; then
                echo "munged: not started by this script"
            else
                echo "$d: not running"
                rc=1
            fi
        fi
    done
    sinfo 2>/dev/null || rc=1
    return $rc
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 install|start|stop|status" >&2
    exit 2
    ;;
esac
