#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests: munged, slurmctld and slurmd in DIR, on ports of
# their own (a cluster already running here is left alone).
#
#   bash launch/testing/local_slurm.sh start DIR   # prints `export SLURM_CONF=DIR/slurm.conf`
#   SLURM_CONF=DIR/slurm.conf sbatch ...; squeue; scancel ...
#   bash launch/testing/local_slurm.sh stop DIR    # stops the three daemons by their pid files
#
# Needs Debian's slurmctld, slurmd, slurm-client and munge packages. Runs as the calling user (root on
# CI); that user is SlurmUser, so jobs run as that user only. No cgroups: processes are tracked by
# their parent ids (proctrack/linuxproc) and tasks are not bound to cores (task/none).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)

free_port() {  # a random port in 20000-59999 that nothing on localhost listens on
  local port
  for _ in $(seq 100); do
    port=$((20000 + $(od -An -N2 -tu2 /dev/urandom) % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  echo "local_slurm: no free port found" >&2
  exit 1
}

wait_for_pidfile() {  # daemons write their pid file once they are up
  for _ in $(seq 100); do
    [ -s "$1" ] && return 0
    sleep 0.1
  done
  echo "local_slurm: $2 did not start; the end of its log ($3):" >&2
  tail -n 20 "$3" >&2 || true
  return 1
}

stop_pid() {  # TERM, then KILL after 10 s; only the process named in the pid file
  local pidfile=$1 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

case "$action" in
  start)
    for binary in munged mungekey slurmctld slurmd sbatch srun; do
      command -v "$binary" >/dev/null || { echo "local_slurm: $binary is not installed (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 1; }
    done
    if [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
      echo "local_slurm: a cluster is already running in $dir; stop it first" >&2
      exit 1
    fi
    # munged wants every directory above its socket searchable by all (pytest's temporary folders are
    # not), so the socket gets a folder of its own in /tmp.
    socket_dir=$(mktemp -d /tmp/local_slurm_munge.XXXXXX)
    chmod 755 "$socket_dir"
    echo "$socket_dir" > "$dir/munge_socket_dir"
    mkdir -p "$dir/state" "$dir/spool"
    rm -f "$dir/munge.key"
    mungekey --create --keyfile="$dir/munge.key" --bits=1024
    chmod 600 "$dir/munge.key"
    user=$(id -un)
    # The node as slurmd sees this machine (CPUs, sockets, cores, threads), named localhost. Memory is
    # left at its default: with CR_CPU it is not allocated.
    node=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]*/NodeName=localhost NodeAddr=127.0.0.1/' -e 's/ RealMemory=[0-9]*//')
    cat > "$dir/slurm.conf" <<CONF
ClusterName=localtest
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket_dir/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=3600
# jax.distributed's SLURM coordinator port is 61440 + job id % 4096: a random first id keeps two
# clusters on one machine (two test sessions) off each other's ports.
FirstJobId=$((1 + $(od -An -N2 -tu2 /dev/urandom)))
KillWait=30
$node State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
    munged --socket="$socket_dir/munge.socket" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
      --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
    wait_for_pidfile "$dir/munged.pid" munged "$dir/munged.log"
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -c
    wait_for_pidfile "$dir/slurmctld.pid" slurmctld "$dir/slurmctld.log"
    slurmd -N localhost
    wait_for_pidfile "$dir/slurmd.pid" slurmd "$dir/slurmd.log"
    # Up when the node is idle (it registers with slurmctld a moment after slurmd starts).
    for _ in $(seq 150); do
      state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
      if [ "$state" = idle ]; then
        echo "export SLURM_CONF=$dir/slurm.conf"
        exit 0
      fi
      sleep 0.2
    done
    echo "local_slurm: the node did not become idle (state '${state:-none}'); slurmctld and slurmd logs:" >&2
    tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    exit 1
    ;;
  stop)
    # Jobs first: their step daemons (slurmstepd) would outlive slurmd.
    if [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
      export SLURM_CONF="$dir/slurm.conf"
      scancel --user="$(id -un)" 2>/dev/null || true
      for _ in $(seq 600); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.1
      done
    fi
    stop_pid "$dir/slurmd.pid"
    stop_pid "$dir/slurmctld.pid"
    stop_pid "$dir/munged.pid"
    if [ -s "$dir/munge_socket_dir" ]; then
      rm -rf "$(cat "$dir/munge_socket_dir")"
      rm -f "$dir/munge_socket_dir"
    fi
    ;;
  *)
    usage
    ;;
esac
