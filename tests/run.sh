#!/usr/bin/env bash
# The whole cellgate test suite, as CI runs it: installs what the tests need
# on a fresh Debian/Ubuntu machine, builds the workspace, runs every test.
#
#   ./tests/run.sh            # everything
#   ./tests/run.sh -E 'test(socks)'   # extra arguments go to cargo nextest
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# The device testbed: namespaces and veths (iproute2), carrier NAT and loss
# (nftables), conntrack flushes on rotation (conntrack).
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
command -v conntrack >/dev/null 2>&1 || need_apt+=(conntrack)
if ((${#need_apt[@]})); then
    echo "==> installing ${need_apt[*]}"
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "==> installing cargo-nextest"
    cargo install cargo-nextest --locked
fi

# Customer traffic in the end-to-end tests holds many sockets at once.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

start=$(date +%s)
echo "==> building the workspace (debug)"
cargo build --workspace --all-targets --locked
echo "==> running the tests"
cargo nextest run --workspace --locked --no-fail-fast "$@"
echo "==> all tests passed in $(( $(date +%s) - start )) s"
