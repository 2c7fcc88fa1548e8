#!/usr/bin/env bash
# Bring up a single-node SLURM (munged, slurmctld, slurmd) on this machine,
# for cw's tests: run as root on a disposable machine (CI), loopback only.
#
#   contrib/slurm/ci/up.sh      # installs the Debian packages if missing
#   contrib/slurm/ci/down.sh    # stops the daemons again (by their pidfiles)
#
# The daemons keep their state, logs and pidfiles under $CW_SLURM_CI_DIR
# (default /tmp/cw-slurm-ci), emptied on every start; munged (started only
# if none answers) uses its default socket and pidfile under /run/munge.  slurm.conf goes to
# /etc/slurm/slurm.conf, which this script refuses to overwrite unless it
# wrote it itself.  Every wait is bounded; on failure the daemons' logs are
# shown and the script exits non-zero.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
state=${CW_SLURM_CI_DIR:-/tmp/cw-slurm-ci}
conf=/etc/slurm/slurm.conf
marker="# Written by cw contrib/slurm/ci/up.sh"
host=$(hostname -s)
# Seconds to wait for each daemon to become ready.
timeout=${CW_SLURM_CI_TIMEOUT:-60}

say() { echo "slurm-ci: $*" >&2; }

fail() {
    say "$*"
    for log in "$state"/slurmctld.log "$state"/slurmd.log /var/log/munge/munged.log; do
        if [ -f "$log" ]; then
            say "--- last lines of $log"
            tail -n 20 "$log" >&2 || true
        fi
    done
    exit 1
}

# wait_for SECONDS WHAT COMMAND...: run COMMAND until it succeeds, at most SECONDS.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$(( $(date +%s) + seconds ))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            fail "timed out after ${seconds} s waiting for $what"
        fi
        sleep 0.2
    done
}

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root (it installs packages and starts the SLURM daemons)"
    exit 1
fi

missing=()
for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

if [ -f "$conf" ] && ! grep -qF "$marker" "$conf"; then
    say "$conf exists and was not written by this script; not touching a real SLURM set-up"
    exit 1
fi

# Daemons left from an earlier run are stopped first, so each run starts clean.
"$here/down.sh"
rm -rf "$state"
mkdir -p "$state/ctld" "$state/spool"

# munge: the package ships a key; it must belong to munge with mode 0400.
if [ ! -f /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged
    touch "$state/munged.ours"  # down.sh stops only a munged started here
fi
wait_for "$timeout" "munged (munge -n | unmunge)" sh -c 'munge -n | unmunge'

cat >"$conf" <<CONF
$marker for cw's tests: a single-node cluster on loopback.
ClusterName=cwci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=16 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF

slurmctld
wait_for "$timeout" "slurmctld (scontrol ping)" sh -c 'scontrol ping | grep -q "is UP"'
slurmd -N "$host"
wait_for "$timeout" "node $host to be idle (sinfo)" \
    sh -c "sinfo -h -n '$host' -o %t | grep -qx idle"
say "SLURM is up: controller $host(127.0.0.1), node $host idle; state in $state"
