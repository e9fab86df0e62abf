#!/bin/sh
# Runs as root inside a VM booted by `cargo xtask vmtest` (xtask/src/vm.rs).
#
# Usage: vm-guest.sh RESULTS WORKDIR SECONDS NAME=BINARY...
#
# vng's own exit status says nothing (it is 255 whatever happens here), so everything
# the host needs is written into RESULTS, which is shared read-write with the host:
#   kernel-release, proc-version     what actually booted
#   mounts                           debugfs/tracefs mounts left when the tests start
#   NAME.out, NAME.status            each test binary's output and exit status
#                                    (124 or 137: it ran out of its SECONDS)
#   heartbeat                        rewritten every 20 s: uptime, load and the
#                                    newest processes with where they wait, so a
#                                    guest that stops is told from a slow one
#   finished                         written last: the guest got to the end
set -u

results=$1
workdir=$2
limit=$3
shift 3

# The host's PATH does not cross into the guest; the tests call ip, nft, ss, promtool.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

uname -r >"$results/kernel-release"
cat /proc/version >"$results/proc-version"

# virtme mounts debugfs and tracefs; a fresh host of this project's kind has neither,
# and the daemon must mount tracefs itself there. Unmount both (tracefs also shows
# up automounted under debugfs) so the tests start from that state.
umount /sys/kernel/tracing 2>/dev/null
umount /sys/kernel/debug/tracing 2>/dev/null
umount /sys/kernel/debug 2>/dev/null
grep -E ' (debugfs|tracefs) ' /proc/mounts >"$results/mounts"

(
    while sleep 20; do
        {
            echo "uptime $(cut -d' ' -f1 /proc/uptime) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
            ps -eo pid,stat,etime,wchan:24,args --sort=start_time | tail -n 6
        } >"$results/heartbeat.new" 2>&1 && mv "$results/heartbeat.new" "$results/heartbeat"
    done
) &
heartbeat=$!

# The kernel patches its code the first time TCP hashes a connection (DO_ONCE static
# keys for the hash secrets); under software emulation that patching, racing the other
# vCPU, once killed a 6.12 guest with an int3 oops in inet_ehashfn. One loopback
# connection per family now, before any test runs threads, does it while quiet.
python3 -c '
import socket
for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    l = socket.socket(fam); l.bind((host, 0)); l.listen(1)
    c = socket.create_connection(l.getsockname()[:2]); l.accept()[0].close(); c.close()
' 2>"$results/warm-up.err"

# The native run starts the binaries from the workspace root; do the same.
cd "$workdir" || exit 1

# Each argument: NAME=BINARY:SKIP,SKIP (the tests that run natively only).
for pair in "$@"; do
    name=${pair%%=*}
    spec=${pair#*=}
    bin=${spec%%:*}
    set --
    for t in $(echo "${spec#*:}" | tr ',' ' '); do set -- "$@" --skip "$t"; done
    echo "vm-guest: running $name ($bin) $*"
    # A hung test must not cost the other suite its run: each binary gets its share
    # of the VM's deadline.
    timeout --kill-after=10 "$limit" "$bin" --ignored --test-threads=1 --show-output "$@" >"$results/$name.out" 2>&1
    echo $? >"$results/$name.status"
done

kill "$heartbeat" 2>/dev/null
echo done >"$results/finished"
sync
