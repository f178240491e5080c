#!/usr/bin/env bash
# A Slurm cluster of one or more nodes (with accounting) on this machine, for development and CI.
#
#   bash slurm/dev-cluster.sh start [--nodes N]   # install if missing, start, wait for N idle nodes (default 1)
#   bash slurm/dev-cluster.sh status              # daemons, each node's address, sinfo
#   bash slurm/dev-cluster.sh stop                # end what this script started, remove its network
#   bash slurm/dev-cluster.sh fail NODE           # a crash: cut NODE's link, kill -9 all that runs on it
#   bash slurm/dev-cluster.sh restore NODE        # reconnect NODE and start its slurmd again
#
# Each node is a network namespace (ddpm-node1, ...) with one interface, eth0, on a private
# bridge: $SUBNET.0/24 (ddpm-br0, the controller at .1, node K at .(10+K)), no route off the
# machine. Its slurmd is started inside with `nsenter --net` (not `ip netns exec`, which
# remounts /sys and hides the cgroup tree), so what a job starts there (srun tasks, gloo or
# NCCL sockets) sees only that node's address, as on separate machines; files, users and the
# hostname are shared. Node names resolve through a block in /etc/hosts, removed on stop.
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
SUBNET=${DEV_CLUSTER_SUBNET:-10.213.7}   # first three octets of the nodes' private /24
BRIDGE=ddpm-br0
CTL_ADDR=$SUBNET.1
MARK="# written by slurm/dev-cluster.sh"
HOSTS_BEGIN="# begin: node names of slurm/dev-cluster.sh"
HOSTS_END="# end: node names of slurm/dev-cluster.sh"
DAEMONS=(mariadbd munged slurmdbd slurmctld)   # start order, then one slurmd per node; stop runs it backwards

die() { echo "dev-cluster: $*" >&2; exit 1; }
log() { echo "dev-cluster: $*" >&2; }

# --- pids ---------------------------------------------------------------------------------

# A recorded pid counts only while it is alive AND still that daemon (pids get reused).
# Names are the daemon's (slurmctld) or daemon-node (slurmd-node2).
alive() {
    local pidfile=$DIR/pids/$1 pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(</proc/"$pid"/comm) == "${1%%-*}"* ]]
}

# stop_daemon NAME: TERM, up to 30 s to exit, then KILL; forget its pid.
stop_daemon() {
    local pid
    if alive "$1"; then
        pid=$(<"$DIR/pids/$1")
        log "stopping $1 (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$DIR/pids/$1"
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

# write_configs N: slurm.conf for N nodes, slurmdbd.conf.
write_configs() {
    local nodes=$1 host cpus mem k
    host=$(hostname -s)
    cpus=$(nproc)
    # RealMemory must not exceed what slurmd finds, or the node is drained: keep 5% back.
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem * 95 / 100))
    mkdir -p "$CONF_DIR"

    write_conf "$CONF_DIR/slurm.conf" 644 <<EOF
$MARK (Slurm $(slurmd -V | awk '{print $2}'))
ClusterName=$CLUSTER
SlurmctldHost=$host($CTL_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again after cred_expire seconds (default 120): keep tests quick.
AuthInfo=cred_expire=10
MpiDefault=none
StateSaveLocation=$DIR/state
# %n: the node's name; every slurmd of this machine needs its own.
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups here (containers, CI): track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MailProg=/bin/true
# submitit's job.result() and the tests read job states from sacct.
AccountingStorageType=accounting_storage/slurmdbd
# The bridge address, so that sacct also works inside a job (in a node's namespace).
AccountingStorageHost=$CTL_ADDR
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
# Preempted or signalled jobs requeue themselves (scontrol requeue).
JobRequeue=1
MaxJobCount=10000
MinJobAge=30
KillWait=30
ReturnToService=2
SlurmctldTimeout=60
# A node that does not answer for this long is DOWN and its jobs end (NODE_FAIL; requeued if
# they allow it). Real clusters use 300; 30 lets a test see a node crash within a minute.
SlurmdTimeout=30
# Every node sees the whole machine: the nodes share its cores and memory.
$(for ((k = 1; k <= nodes; k++)); do
    echo "NodeName=node$k NodeAddr=$(node_addr $k) CPUs=$cpus RealMemory=$mem State=UNKNOWN"
done)
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

# --- network: a bridge, one namespace per node, names in /etc/hosts -----------------------

node_addr() { echo "$SUBNET.$((10 + $1))"; }
node_number() { [[ $1 =~ ^node([0-9]+)$ ]] || die "no such node: $1 (nodes are node1, node2, ...)"; echo "${BASH_REMATCH[1]}"; }

net_up() {
    local nodes=$1 k ns
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        # Never shadow a network this machine already uses.
        if ip -4 route show | grep -q "^$SUBNET\.0/24 "; then
            die "$SUBNET.0/24 is already routed here; choose another with DEV_CLUSTER_SUBNET=a.b.c"
        fi
        ip link add "$BRIDGE" type bridge
        ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    fi
    for ((k = 1; k <= nodes; k++)); do
        ns=ddpm-node$k
        if [[ -e /run/netns/$ns ]]; then
            ip link set "ddpm-v$k" up   # it may have been cut by 'fail'
            continue
        fi
        ip netns add "$ns"
        ip link add "ddpm-v$k" type veth peer name "ddpm-p$k"
        ip link set "ddpm-v$k" master "$BRIDGE" up
        ip link set "ddpm-p$k" netns "$ns"
        # eth0 on every node, as on a real cluster: one GLOO/NCCL_SOCKET_IFNAME fits all.
        ip -n "$ns" link set "ddpm-p$k" name eth0
        ip -n "$ns" addr add "$(node_addr "$k")/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
}

# Kill what still runs in the namespaces (job steps outlive slurmd), then remove them.
net_down() {
    local ns pids
    for ns in $(ip netns list | awk '/^ddpm-node[0-9]+/ {print $1}'); do
        pids=$(ip netns pids "$ns" || true)
        if [[ -n $pids ]]; then
            log "killing what still runs on ${ns#ddpm-}: $(echo $pids)"
            kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$ns"   # takes the veth pair with it
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE"
    fi
}

# /etc/hosts without our block (exact lines, no patterns).
hosts_without_ours() {
    awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {skip = 1; next} $0 == e {skip = 0; next} !skip' /etc/hosts
}

# /etc/hosts is often a bind mount (containers), which a rename cannot replace: it is rewritten
# in place, from text built (and checked) before the file is opened.
hosts_write() {
    local nodes=$1 k base block=$HOSTS_BEGIN
    base=$(hosts_without_ours)
    for ((k = 1; k <= nodes; k++)); do block+=$'\n'"$(node_addr "$k") node$k"; done
    printf '%s\n%s\n%s\n' "$base" "$block" "$HOSTS_END" >/etc/hosts
}

hosts_remove() {
    local base
    grep -qxF "$HOSTS_BEGIN" /etc/hosts || return 0
    base=$(hosts_without_ours)
    printf '%s\n' "$base" >/etc/hosts
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

# start_slurmd NODE: its slurmd inside its namespace (nsenter execs it: the pid is slurmd's).
start_slurmd() {
    mkdir -p "$DIR/spool/$1"
    spawn "slurmd-$1" nsenter --net="/run/netns/ddpm-$1" slurmd -D -N "$1"
}

# nodes_idle N: all N nodes registered and usable.
nodes_idle() { (($(sinfo -h -N -o '%T' | grep -cE '^(idle|mixed|allocated)') >= $1)); }

start() {
    local nodes=1 k
    while (($#)); do
        case $1 in
            --nodes) nodes=${2:-}; shift 2 || die "--nodes needs a number" ;;
            --nodes=*) nodes=${1#--nodes=}; shift ;;
            *) die "start: unknown argument '$1' (usage: start [--nodes N])" ;;
        esac
    done
    [[ $nodes =~ ^[1-9][0-9]?$ && $nodes -le 50 ]] || die "--nodes $nodes: give a number from 1 to 50"
    [[ $(id -u) == 0 ]] || die "needs root (it installs packages, starts daemons, makes namespaces)"
    if alive slurmctld && [[ ! -f $DIR/nodes || $(<"$DIR/nodes") != "$nodes" ]]; then
        die "already running with $(cat "$DIR/nodes" 2>/dev/null || echo "another number of") node(s);" \
            "'stop' it first to start $nodes"
    fi
    install_packages
    mkdir -p "$DIR"/{pids,log,run,state,spool}
    echo "$nodes" >"$DIR/nodes"
    [[ -s $DIR/db.pass ]] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DIR/db.pass")
    net_up "$nodes"
    hosts_write "$nodes"
    write_configs "$nodes"
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then continue; fi
        log "starting $d"
        "start_$d"
    done
    for ((k = 1; k <= nodes; k++)); do
        alive "slurmd-node$k" && continue
        log "starting slurmd on node$k ($(node_addr "$k"), namespace ddpm-node$k)"
        start_slurmd "node$k"
    done
    # A node that was DOWN in saved state (e.g. after an unclean stop) is brought back.
    wait_for "the nodes to register" 60 sinfo -h -N
    if sinfo -h -N -o '%T' | grep -qE 'down|drain'; then
        scontrol update NodeName="node[1-$nodes]" State=RESUME >/dev/null 2>&1 || true
    fi
    wait_for "$nodes node(s) to be idle (sinfo)" 90 nodes_idle "$nodes"
    log "up: $(sinfo -h -N -o '%N %T' | tr '\n' ' ')(state and logs in $DIR)"
}

stop() {
    local i pidfile
    # The nodes first (slurmd-node*, and a one-node cluster's "slurmd" of older versions).
    for pidfile in "$DIR"/pids/slurmd-* "$DIR"/pids/slurmd; do
        if [[ -e $pidfile ]]; then stop_daemon "$(basename "$pidfile")"; fi
    done
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_daemon "${DAEMONS[i]}"
    done
    net_down
    hosts_remove
    rm -f "$DIR/nodes"
}

# fail NODE: what a crash or a pulled cable looks like to the others. The link goes first, so
# not even the kernel's closing of the dead processes' sockets reaches the other nodes.
fail() {
    local node=${1:-} k pids
    k=$(node_number "$node")
    [[ -e /run/netns/ddpm-$node ]] || die "$node is not a node of this cluster"
    ip link set "ddpm-v$k" down
    pids=$(ip netns pids "ddpm-$node" || true)
    [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
    rm -f "$DIR/pids/slurmd-$node"
    log "$node: link cut, killed $(echo $pids | wc -w) process(es) (slurmd and any job steps)"
}

restore() {
    local node=${1:-} k
    k=$(node_number "$node")
    [[ -e /run/netns/ddpm-$node ]] || die "$node is not a node of this cluster"
    ip link set "ddpm-v$k" up
    if ! alive "slurmd-$node"; then
        start_slurmd "$node"
    fi
    log "$node: link up, slurmd started (ReturnToService=2 makes it usable once it registers)"
}

status() {
    local rc=0 k nodes=0
    [[ -f $DIR/nodes ]] && nodes=$(<"$DIR/nodes")
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then
            echo "$d: running (pid $(<"$DIR/pids/$d"))"
        elif [[ $d == munged ]] && munge_works >/dev/null 2>&1; then
            echo "munged: running (not started by this script)"
        else
            echo "$d: stopped"; rc=1
        fi
    done
    for ((k = 1; k <= nodes; k++)); do
        if alive "slurmd-node$k"; then
            echo "slurmd node$k: running (pid $(<"$DIR/pids/slurmd-node$k"), $(node_addr "$k") in namespace ddpm-node$k)"
        else
            echo "slurmd node$k: stopped"; rc=1
        fi
    done
    ((nodes > 0)) || { echo "no nodes (not started)"; rc=1; }
    alive slurmctld && sinfo -N -o '%N %.6D %P %T %c %m'
    return $rc
}

case ${1:-} in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    fail) fail "${2:-}" ;;
    restore) restore "${2:-}" ;;
    *) echo "usage: $0 start [--nodes N] | stop | status | fail NODE | restore NODE" >&2; exit 2 ;;
esac
