#!/usr/bin/env bash
# The whole cellgate test suite, as CI runs it: installs what the tests need
# on a fresh Debian/Ubuntu machine, builds the workspace, runs every test.
#
#   ./tests/run.sh            # everything
#   ./tests/run.sh -E 'test(socks)'   # extra arguments go to cargo nextest
#
# The store tests run on SQLite and PostgreSQL (a throwaway cluster per test
# process, started by the harness); then a second pass runs the end-to-end
# proxy, API and resilience tests with the control plane on PostgreSQL.
# CELLGATE_SKIP_POSTGRES_PASS=1, or any extra arguments, skip that pass.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# The device testbed: namespaces and veths (iproute2), carrier NAT and loss
# (nftables), conntrack flushes on rotation (conntrack).
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
command -v conntrack >/dev/null 2>&1 || need_apt+=(conntrack)
# The agent update tests tamper with a stored release (sqlite3) and run
# stripped copies of the agent (strip, from binutils).
command -v sqlite3 >/dev/null 2>&1 || need_apt+=(sqlite3)
command -v strip >/dev/null 2>&1 || need_apt+=(binutils)
# Device installers (firmware_scripts): SD card images edited without root
# (sfdisk, mtools, mkfs.fat, debugfs/mke2fs) and the scripts' lint.
command -v sfdisk >/dev/null 2>&1 || need_apt+=(fdisk)
command -v mcopy >/dev/null 2>&1 || need_apt+=(mtools)
command -v mkfs.fat >/dev/null 2>&1 || need_apt+=(dosfstools)
command -v debugfs >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v shellcheck >/dev/null 2>&1 || need_apt+=(shellcheck)
# PostgreSQL server programs for the throwaway test clusters (initdb, pg_ctl;
# Debian keeps them off PATH, in a versioned directory).
have_postgres() {
    local bin
    bin=$(pg_config --bindir 2>/dev/null) && [ -x "$bin/initdb" ] && return 0
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}
have_postgres || need_apt+=(postgresql)
# Device commands over MQTT (mqtt_commands): a throwaway broker and the
# clients operators use by hand. pkill (procps) reloads the broker.
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v pkill >/dev/null 2>&1 || need_apt+=(procps)
# deploy_files: `systemd-analyze verify` of the systemd unit in deploy/.
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
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

# A one-off build (CI) gains nothing from incremental state but disk use.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"; fi

start=$(date +%s)
# A second agent build with another version string, for the self-update
# tests (tests/tests/agent_update.rs). Only the edge-agent crate is rebuilt
# when the variable changes; the workspace build below restores the normal
# target/debug/edge-agent.
echo "==> building the next agent (CELLGATE_AGENT_VERSION=99.0.0-next)"
CELLGATE_AGENT_VERSION=99.0.0-next cargo build --workspace --bin edge-agent --locked
cp target/debug/edge-agent target/debug/edge-agent-next
echo "==> building the workspace (debug)"
cargo build --workspace --all-targets --locked
echo "==> running the tests"
cargo nextest run --workspace --locked --no-fail-fast "$@"
if [ -z "${CELLGATE_SKIP_POSTGRES_PASS:-}" ] && [ "$#" -eq 0 ]; then
    # The same binaries against PostgreSQL: every cluster gets a fresh
    # database. Bulk-transfer tests exercise only the data path and stay out,
    # and so do the update test that tampers with the SQLite file and the
    # minute-long broker outage (nothing of it touches the database).
    pg_start=$(date +%s)
    echo "==> end-to-end tests with the control plane on PostgreSQL"
    pg_tests='binary(auth_and_policy) | binary(rotation_api) | binary(resilience)'
    pg_tests+=' | (binary(proxy_paths) & !test(/50mb/)) | binary(plans_limits)'
    pg_tests+=' | (binary(mqtt_commands) & !test(a_broker_outage_does_not_disturb_proxying_and_loses_no_command))'
    pg_tests+=' | (binary(agent_update) & !test(corrupted_and_foreign_releases_are_refused))'
    CELLGATE_E2E_DATABASE=postgres cargo nextest run --workspace --locked --no-fail-fast -E "$pg_tests"
    echo "==> PostgreSQL pass took $(( $(date +%s) - pg_start )) s"
fi
echo "==> all tests passed in $(( $(date +%s) - start )) s"
