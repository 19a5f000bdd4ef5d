#!/bin/bash
# The project's copy of the sandbox recipe (see tests/system/conftest.py): a real systemd as PID 1 of a
# systemd-nspawn container over a throw-away overlay of this machine's own /.
# Boot a throw-away real systemd (PID 1 of a systemd-nspawn container) whose root is a tmpfs-backed
# overlay of this machine's own / : the guest sees the same python, venvs, java and Pub/Sub emulator.
# Needs: apt-get install -y systemd-container   (root, full capabilities; ~20 s once per machine)
# Usage: [NET=host] [BINDS="--bind=SRC:DST --bind-ro=SRC:DST"] [SANDBOX_DIR=/tmp/sdbox] boot.sh NAME
# Prints the guest's leader PID on the last line. Then, from outside:
#   nsenter -t LEADER -a CMD                 (always works)
#   systemctl -M NAME ... / systemd-run -M NAME --pipe --wait CMD
#   journalctl --root=/proc/LEADER/root -u UNIT -o json   (or nsenter ... journalctl)
# Stop it with teardown.sh NAME.
set -euo pipefail
NAME=${1:?name}
D=${SANDBOX_DIR:-/tmp/sdbox}
mkdir -p "$D"
ROOT=$D/hostroot
mkdir -p "$ROOT"
# nspawn refuses --volatile=overlay on "/" itself; a non-recursive bind of / works.
# DANGER: while mounted, $ROOT *is* the host's /. Never rm -rf $D before teardown.sh has unmounted it.
mountpoint -q "$ROOT" || mount --bind / "$ROOT"
NETOPT=--private-network            # guest has only its own lo; NET=host shares the host's loopback
[ "${NET:-}" = host ] && NETOPT=""
# --system-call-filter: nspawn's own allow-list (not a real host's) lacks these; the unit uses them.
# Put nspawn in its own cgroups first: with no host systemd it creates sub-cgroups next to itself,
# and these keep them off the host's root cgroup.
for h in systemd unified; do mkdir -p /sys/fs/cgroup/$h/sdbox-$NAME; done
setsid bash -c "for h in systemd unified; do echo \$\$ > /sys/fs/cgroup/\$h/sdbox-$NAME/cgroup.procs; done; exec \"\$0\" \"\$@\"" \
  systemd-nspawn --quiet --directory="$ROOT" --volatile=overlay --machine="$NAME" \
    --register=no --keep-unit $NETOPT --system-call-filter="bpf landlock_create_ruleset landlock_add_rule landlock_restrict_self" ${BINDS:-} \
    --boot --console=passive \
    systemd.mask=postgresql.service systemd.mask=timers.target \
    > "$D/nspawn-$NAME.log" 2>&1 < /dev/null &
P=$!
echo $P > "$D/nspawn-$NAME.pid"
L=""
for _ in $(seq 1 200); do L=$(pgrep -P $P -x systemd || true); [ -n "$L" ] && break; sleep 0.05; done
[ -n "$L" ] || { echo "container did not start:" >&2; cat "$D/nspawn-$NAME.log" >&2; exit 1; }
# What systemd-machined would write: lets `systemctl -M NAME` and `systemd-run -M NAME` find the guest.
mkdir -p /run/systemd/machines
printf 'LEADER=%s\nCLASS=container\n' "$L" > /run/systemd/machines/$NAME
st=""
for _ in $(seq 1 300); do
  st=$(nsenter -t $L -a systemctl is-system-running 2>/dev/null || true)
  case "$st" in running|degraded) break;; esac
  sleep 0.1
done
case "$st" in running|degraded) ;; *) echo "guest not up (state '$st')" >&2; exit 1;; esac
echo "$L"
