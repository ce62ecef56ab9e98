#!/usr/bin/env bash
# A real single-node Slurm cluster for php-run's tests and CI: MUNGE, slurmctld, slurmd, and
# slurmdbd on a private MariaDB (so sacct and submitit's job states work), with fake GPUs for GRES.
#
#   scripts/services/slurm.sh start   install what is missing, start what is not running, print
#                                     `export SLURM_CONF=...` (also in .services/slurm.env and .services/env)
#   scripts/services/slurm.sh stop    stop the daemons this checkout started
#
# Everything lives in one state folder, $PHP_RUN_SLURM_DIR (default /tmp/php-run-slurm), shared by
# every checkout on the machine: Slurm's ports are machine-wide, so a second checkout reuses the
# running cluster instead of starting another. Only the checkout whose start launched a daemon
# stops it (its .services/slurm-started lists them). Needs root (apt-get, daemons as root, mknod):
# PID 1 is not systemd here and package scripts may not start daemons, so each one starts by hand.
# Facts behind the settings: ../shared/reference/services.md (measured on these machines).
set -euo pipefail

VERB=${1:-}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SERVICES="$ROOT/.services"
STATE=${PHP_RUN_SLURM_DIR:-/tmp/php-run-slurm}
CONF="$STATE/etc/slurm.conf"
STARTED="$SERVICES/slurm-started"
MYSQL_PORT=${PHP_RUN_SLURM_MYSQL_PORT:-3307}
CLUSTER=phprun
PARTITION=debug
FAKE_GPUS=2
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
HOST=$(hostname -s)

log() { echo "slurm.sh: $*" >&2; }

alive() {  # alive PIDFILE: the process named in PIDFILE exists and is not a zombie
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ -d /proc/$pid ]] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds
  local seconds=$1 what=$2
  shift 2
  for ((i = 0; i < seconds * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  log "timed out after ${seconds}s waiting for $what (logs in $STATE/log)"
  return 1
}

started() { mkdir -p "$SERVICES"; echo "$1" >>"$STARTED"; }

install_packages() {
  local missing=()
  for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  if ! apt-cache show "${missing[0]}" >/dev/null 2>&1; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq
  fi
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

write_config() {
  local cpus memory
  cpus=$(nproc)
  # Leave the node some memory of its own; slurmd refuses a RealMemory above what it finds.
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  mkdir -p "$STATE"/{etc,state,spool,log,run,dev,mysql}
  for ((g = 0; g < FAKE_GPUS; g++)); do
    # Character devices (copies of /dev/null): slurmd rejects plain files as GRES devices.
    [[ -c $STATE/dev/gpu$g ]] || mknod "$STATE/dev/gpu$g" c 1 3
  done
  cat >"$CONF" <<EOF
# Written by scripts/services/slurm.sh; a single-node test cluster without cgroups or systemd.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default every job reserves the whole node's memory and jobs run one at a time.
DefMemPerCPU=1024
GresTypes=gpu
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/none
# Fast turnaround for tests: finished jobs leave squeue quickly, the scheduler looks often.
MinJobAge=30
SchedulerParameters=sched_interval=2
KillWait=5
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory Gres=gpu:$FAKE_GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$STATE/etc/gres.conf" <<EOF
NodeName=$HOST Name=gpu File=$STATE/dev/gpu[0-$((FAKE_GPUS - 1))]
EOF
  cat >"$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$STATE/etc/slurmdbd.conf"  # slurmdbd refuses a readable file (it holds the password)
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munged sh -c 'munge -n </dev/null | unmunge'
  started munge
}

mysql_client() { mariadb --protocol=socket --socket="$STATE/run/mysqld.sock" -u root "$@"; }

start_mariadb() {
  if alive "$STATE/run/mysqld.pid"; then return 0; fi
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  chown mysql:mysql "$STATE/mysql" "$STATE/run" "$STATE/log"
  if [[ ! -d $STATE/mysql/mysql ]]; then
    mariadb-install-db --user=mysql --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
      --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1
  fi
  setsid nohup /usr/sbin/mariadbd --user=mysql --datadir="$STATE/mysql" --socket="$STATE/run/mysqld.sock" \
    --pid-file="$STATE/run/mysqld.pid" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
    --innodb-buffer-pool-size=256M --log-error="$STATE/log/mariadb.log" </dev/null >/dev/null 2>&1 &
  wait_for 30 MariaDB mysql_client -e "SELECT 1"
  mysql_client -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  started mariadb
}

start_slurmdbd() {
  if alive "$STATE/run/slurmdbd.pid"; then return 0; fi
  SLURM_CONF=$CONF /usr/sbin/slurmdbd
  wait_for 30 slurmdbd env SLURM_CONF="$CONF" sacctmgr -n list cluster
  started slurmdbd
}

start_slurmctld() {
  if alive "$STATE/run/slurmctld.pid"; then return 0; fi
  SLURM_CONF=$CONF sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  /usr/sbin/slurmctld -f "$CONF"
  wait_for 30 slurmctld env SLURM_CONF="$CONF" scontrol ping
  started slurmctld
}

start_slurmd() {
  if ! alive "$STATE/run/slurmd.pid"; then
    /usr/sbin/slurmd -f "$CONF"
    started slurmd
  fi
  wait_for 30 "node $HOST idle" sh -c "SLURM_CONF='$CONF' sinfo -h -n '$HOST' -o %T | grep -Eq '^(idle|mixed|allocated)'"
}

export_conf() {
  # scripts/services.sh collects each part's .services/<part>.env (and `export` lines on stdout) into
  # .services/env; when this script runs alone, it updates .services/env itself.
  local line="export SLURM_CONF=$CONF" env="$SERVICES/env"
  mkdir -p "$SERVICES"
  echo "$line" >"$SERVICES/slurm.env"
  touch "$env"
  { grep -v '^export SLURM_CONF=' "$env" || true; echo "$line"; } >"$env.tmp"
  mv "$env.tmp" "$env"
  echo "$line"
}

stop_one() {  # stop_one NAME PIDFILE
  local pid
  alive "$2" || return 0
  pid=$(<"$2")
  kill "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do alive "$2" || return 0; sleep 0.1; done  # a zombie counts as stopped
  log "$1 (pid $pid) did not stop on SIGTERM; killing it"
  kill -9 "$pid" 2>/dev/null || true
}

case $VERB in
  start)
    [[ $(id -u) == 0 ]] || { log "needs root (apt-get, daemons, mknod)"; exit 1; }
    install_packages
    write_config
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    export_conf
    log "cluster $CLUSTER up: SLURM_CONF=$CONF (partition $PARTITION, $FAKE_GPUS fake GPUs)"
    ;;
  stop)
    [[ -f $STARTED ]] || exit 0
    # Reverse order of start; munge last since the others authenticate through it.
    for name in slurmd slurmctld slurmdbd mariadb munge; do
      grep -qx "$name" "$STARTED" || continue
      case $name in
        mariadb) stop_one mariadb "$STATE/run/mysqld.pid" ;;
        munge) stop_one munge /run/munge/munged.pid ;;
        *) stop_one "$name" "$STATE/run/$name.pid" ;;
      esac
    done
    rm -f "$STARTED"
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
