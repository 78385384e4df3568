#!/bin/sh
# Finds nats-server (the peer of `streamfarm bench`) or installs Debian's package, then prints
# its path and version. `streamfarm bench` (without --quick or --no-install) does the same itself.
set -eu
find_nats() {
    command -v nats-server 2>/dev/null || { [ -x /usr/sbin/nats-server ] && echo /usr/sbin/nats-server; } || true
}
bin=$(find_nats)
if [ -z "$bin" ]; then
    echo "nats-server not found: installing Debian's package" >&2
    apt-get update -qq
    apt-get install -y -qq nats-server >/dev/null
    bin=$(find_nats)
fi
[ -n "$bin" ] || { echo "nats-server: not found" >&2; exit 1; }
echo "$bin: $("$bin" --version)"
