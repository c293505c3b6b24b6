#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the data.executor=slurm test and for
# trying `scaletrain prepare --data.executor=slurm` without a real cluster.
#
#   scripts/slurm_single_node.sh start DIR   # prints: export SLURM_CONF=DIR/slurm.conf
#   scripts/slurm_single_node.sh stop DIR
#
# Needs Debian's slurm-wlm and munge (`apt-get install slurm-wlm munge`) and root (the
# daemons run as root here; a real cluster runs them as the slurm / munge users). All of
# its state lives in DIR: slurm.conf, a fresh munge key, munged's socket, the daemons'
# pid, log, state and spool files, so it touches nothing in /etc and two clusters in two
# DIRs only have to differ in ports (SLURMCTLD_PORT, default 6817; SLURMD_PORT, 6818).
# No cgroups: process tracking by /proc (proctrack/linuxproc), no task plugin, no
# accounting — what a container without systemd allows.
set -euo pipefail

cmd=${1:?usage: $0 start|stop DIR}
dir=$(realpath -m "${2:?usage: $0 start|stop DIR}")
port=${SLURMCTLD_PORT:-6817}
dport=${SLURMD_PORT:-6818}

stop() {
  # Only the daemons this script started, by the pids they wrote.
  # Waits for each to exit: slurmctld writes its state files on the way out.
  for name in slurmd slurmctld munged; do
    if [[ -f $dir/$name.pid ]]; then
      pid=$(cat "$dir/$name.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/$name.pid"
    fi
  done
}

if [[ $cmd == stop ]]; then
  stop
  exit 0
fi
[[ $cmd == start ]] || { echo "$0: unknown command '$cmd' (start|stop)" >&2; exit 2; }
for bin in munged mungekey slurmctld slurmd sbatch sinfo; do
  command -v "$bin" >/dev/null || {
    echo "$0: $bin not found (apt-get install slurm-wlm munge)" >&2; exit 2; }
done

mkdir -p "$dir"/{state,spool,munge}
chmod 700 "$dir" "$dir/munge"
host=$(hostname -s)
cpus=$(nproc)
# Memory Slurm may hand out: 80% of the machine, in MB (sbatch --mem-per-cpu is checked
# against it).
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 8 / 10 / 1024 ))

rm -f "$dir/munge/munge.key"
mungekey --create --keyfile="$dir/munge/munge.key" --force
chmod 400 "$dir/munge/munge.key"
# --force: munged refuses to run as root or with its files outside /etc/munge otherwise.
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" \
  --seed-file="$dir/munge/munge.seed"

cat > "$dir/slurm.conf" <<EOF
ClusterName=scaletrain
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$dport
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF=$dir/slurm.conf
slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"

# Ready when the node is idle (slurmd registered with the controller).
for _ in $(seq 60); do
  if [[ $(sinfo -h -o %t 2>/dev/null) == idle ]]; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "$0: the node did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
sinfo >&2 || true
stop
exit 1
