#!/usr/bin/env bash
# Stop what contrib/slurm/ci/up.sh started: slurmd, slurmctld, then munged
# (if up.sh started it), each by the PID in its pidfile (SIGTERM, then
# SIGKILL after a bounded wait).  Safe to run when nothing runs.
set -uo pipefail

state=${CW_SLURM_CI_DIR:-/tmp/cw-slurm-ci}
# Seconds each daemon gets to exit after SIGTERM.
timeout=${CW_SLURM_CI_TIMEOUT:-30}

say() { echo "slurm-ci: $*" >&2; }

# comm_of PID: the command name of PID, empty if it does not run.
comm_of() { cat "/proc/$1/comm" 2>/dev/null || true; }

# stop PIDFILE NAME: stop the process in PIDFILE if it is still NAME.
stop() {
    local pidfile=$1 name=$2 pid
    [ -f "$pidfile" ] || return 0
    pid=$(tr -dc '0-9' <"$pidfile")
    if [ -z "$pid" ] || [ "$(comm_of "$pid")" != "$name" ]; then
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$(( $(date +%s) + timeout ))
    while [ "$(comm_of "$pid")" = "$name" ]; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            say "$name (pid $pid) did not exit within ${timeout} s of SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
    done
    rm -f "$pidfile"
}

stop "$state/slurmd.pid" slurmd
stop "$state/slurmctld.pid" slurmctld
if [ -f "$state/munged.ours" ]; then
    stop /run/munge/munged.pid munged
    rm -f "$state/munged.ours"
fi
exit 0
