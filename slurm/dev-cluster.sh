#!/usr/bin/env bash
# A one-node Slurm cluster (with accounting) on this machine, for development and CI.
#
#   bash slurm/dev-cluster.sh start    # install if missing, start, wait for the node to be idle
#   bash slurm/dev-cluster.sh status   # daemons, sinfo
#   bash slurm/dev-cluster.sh stop     # end the daemons this script started (by pid)
#
# Service scripts may be blocked (containers, CI), so every daemon is started directly
# in the foreground mode, backgrounded in its own session, and its pid recorded under
# $DEV_CLUSTER_DIR (default /tmp/ddpm-slurm). MariaDB gets its own data directory there,
# so the system database is never touched. Needs root.
set -euo pipefail

DIR=${DEV_CLUSTER_DIR:-/tmp/ddpm-slurm}
CONF_DIR=/etc/slurm                # where sbatch/srun/sacct look without SLURM_CONF
CLUSTER=${DEV_CLUSTER_NAME:-ddpm-dev}
DB_PORT=${DEV_CLUSTER_DB_PORT:-16033}
MARK="# written by slurm/dev-cluster.sh"
DAEMONS=(mariadbd munged slurmdbd slurmctld slurmd)   # start order; stop runs it backwards

die() { echo "dev-cluster: $*" >&2; exit 1; }
log() { echo "dev-cluster: $*" >&2; }

# --- pids ---------------------------------------------------------------------------------

# A recorded pid counts only while it is alive AND still that daemon (pids get reused).
alive() {
    local pidfile=$DIR/pids/$1 pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(</proc/"$pid"/comm) == "$1"* ]]
}

# spawn NAME CMD...: run CMD detached from this shell's session, record its pid.
spawn() {
    local name=$1; shift
    setsid "$@" >>"$DIR/log/$name.out" 2>&1 </dev/null &
    echo $! >"$DIR/pids/$name"
}

# wait_for WHAT SECONDS CMD...: poll CMD until it succeeds.
wait_for() {
    local what=$1 secs=$2 i; shift 2
    for ((i = 0; i < secs * 4; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    die "timed out after ${secs}s waiting for $what (logs: $DIR/log/)"
}

# --- install ------------------------------------------------------------------------------

install_packages() {
    local missing=()
    for bin in slurmctld slurmd slurmdbd sbatch munged mariadbd; do
        command -v "$bin" >/dev/null || missing+=("$bin")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing Slurm, munge and MariaDB (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurmdbd slurm-client munge mariadb-server >/dev/null
}

# --- configuration ------------------------------------------------------------------------

# Write a file under /etc/slurm only when it is absent or ours: never clobber a real cluster's.
write_conf() {
    local path=$1 mode=$2 tmp
    if [[ -f $path ]] && ! grep -qF "$MARK" "$path"; then
        die "$path exists and was not written by this script; move it away to use the dev cluster"
    fi
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$path"
}

write_configs() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # RealMemory must not exceed what slurmd finds, or the node is drained: keep 5% back.
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem * 95 / 100))
    mkdir -p "$CONF_DIR"

    write_conf "$CONF_DIR/slurm.conf" 644 <<EOF
$MARK (Slurm $(slurmd -V | awk '{print $2}'))
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again after cred_expire seconds (default 120): keep tests quick.
AuthInfo=cred_expire=10
MpiDefault=none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups here (containers, CI): track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MailProg=/bin/true
# submitit's job.result() and the tests read job states from sacct.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
# Preempted or signalled jobs requeue themselves (scontrol requeue).
JobRequeue=1
MaxJobCount=10000
MinJobAge=30
KillWait=30
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

    write_conf "$CONF_DIR/slurmdbd.conf" 600 <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(<"$DIR/db.pass")
StorageLoc=slurm_acct_db
EOF
}

# --- daemons ------------------------------------------------------------------------------

# mariadbd drops to the mysql user, so its socket, pid and log live in a dir that user owns.
sql() { mariadb --no-defaults --socket="$DIR/db/mysql.sock" -uroot -e "$1"; }

start_mariadbd() {
    install -d -o mysql -g mysql -m 0750 "$DIR/db"
    if [[ ! -d $DIR/db/data/mysql ]]; then
        mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/db/data" \
            --auth-root-authentication-method=socket --skip-test-db >>"$DIR/log/mariadbd.out" 2>&1 \
            || die "mariadb-install-db failed (see $DIR/log/mariadbd.out)"
    fi
    spawn mariadbd mariadbd --no-defaults --user=mysql --datadir="$DIR/db/data" \
        --socket="$DIR/db/mysql.sock" --pid-file="$DIR/db/mariadbd.pid" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
        --innodb-buffer-pool-size=32M --log-error="$DIR/db/mariadbd.log"
    wait_for "MariaDB" 60 sql "SELECT 1"
    local pass
    pass=$(<"$DIR/db.pass")
    sql "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
         CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
         CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

munge_works() { munge -n | unmunge; }

start_munged() {
    # A munged already serving the default socket (e.g. the system's) is good enough.
    if munge_works >/dev/null 2>&1; then
        log "munged already running (not started by this script); using it"
        rm -f "$DIR/pids/munged"
        return 0
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key && chmod 0600 /etc/munge/munge.key
    fi
    spawn munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
    wait_for "munged" 30 munge_works
}

start_slurmdbd() {
    spawn slurmdbd slurmdbd -D
    wait_for "slurmdbd" 60 sacctmgr -n list cluster
    # The cluster, an account and root's association: what sacct and submitit rely on.
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -i add account dev Cluster="$CLUSTER" Description=dev Organization=dev >/dev/null 2>&1 || true
    sacctmgr -i add user root Account=dev Cluster="$CLUSTER" >/dev/null 2>&1 || true
    local user=${SUDO_USER:-}
    if [[ -n $user && $user != root ]]; then
        sacctmgr -i add user "$user" Account=dev Cluster="$CLUSTER" >/dev/null 2>&1 || true
    fi
}

start_slurmctld() {
    spawn slurmctld slurmctld -D
    wait_for "slurmctld" 60 scontrol ping
}

start_slurmd() {
    spawn slurmd slurmd -D
}

node_idle() { sinfo -h -N -o '%T' | grep -qE '^(idle|mixed|allocated)'; }

start() {
    [[ $(id -u) == 0 ]] || die "needs root (it installs packages and starts daemons)"
    install_packages
    mkdir -p "$DIR"/{pids,log,run,state,spool}
    [[ -s $DIR/db.pass ]] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DIR/db.pass")
    write_configs
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then continue; fi
        log "starting $d"
        "start_$d"
    done
    # A node that was DOWN in saved state (e.g. after an unclean stop) is brought back.
    wait_for "the node to register" 60 sinfo -h -N
    if sinfo -h -N -o '%T' | grep -qE 'down|drain'; then
        scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
    fi
    wait_for "the node to be idle (sinfo)" 90 node_idle
    log "up: $(sinfo -h -N -o '%N %T %c CPUs %m MB') (state and logs in $DIR)"
}

stop() {
    local i d pid
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d=${DAEMONS[i]}
        if alive "$d"; then
            pid=$(<"$DIR/pids/$d")
            log "stopping $d (pid $pid)"
            kill -TERM "$pid"
            for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        fi
        rm -f "$DIR/pids/$d"
    done
}

status() {
    local rc=0
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then
            echo "$d: running (pid $(<"$DIR/pids/$d"))"
        elif [[ $d == munged ]] && munge_works >/dev/null 2>&1; then
            echo "munged: running (not started by this script)"
        else
            echo "$d: stopped"; rc=1
        fi
    done
    ((rc == 0)) && sinfo -N
    return $rc
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
