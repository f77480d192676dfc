#!/usr/bin/env bash
# Installs (and reports) the benchmark peers used by `cargo run --release -p tests --bin bench`.
#
#   tests/bench/peers.sh install   # idempotent; quick when everything is present
#   tests/bench/peers.sh status    # one line per peer: "name path" or "name missing"
#
# Peers: iperf3, microsocks, dante-server (Debian names its sockd binary `danted`); rathole from crates.io,
# built without its default `tls` feature (which needs OpenSSL headers) and without
# `--locked` (its lockfile's `time` crate fails to build on rustc 1.95).
# A peer that cannot be installed is reported and skipped: the bench prints "n/a" for it.
set -u

APT_PKGS=(iperf3 microsocks dante-server)
# command that proves each apt package is present
declare -A APT_BIN=([iperf3]=iperf3 [microsocks]=microsocks [dante-server]=danted)

export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin:/usr/sbin:/sbin"

have() { command -v "$1" >/dev/null 2>&1; }

bounded() { # bounded SECONDS CMD... : never let an install hang the bench
    local secs=$1; shift
    if have timeout; then timeout --kill-after=10 "$secs" "$@"; else "$@"; fi
}

install_apt() {
    local missing=()
    for p in "${APT_PKGS[@]}"; do
        have "${APT_BIN[$p]}" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! have apt-get; then
        echo "peers.sh: apt-get not available; cannot install ${missing[*]}" >&2
        return 0
    fi
    local sudo=()
    [ "$(id -u)" -ne 0 ] && have sudo && sudo=(sudo -n)
    export DEBIAN_FRONTEND=noninteractive
    # Try first without refreshing the index; refresh once if a package is not found.
    if ! bounded 600 "${sudo[@]}" apt-get install -y -q "${missing[@]}" >&2; then
        echo "peers.sh: apt-get install failed; running apt-get update and retrying" >&2
        bounded 300 "${sudo[@]}" apt-get update -q >&2 || true
        # one package at a time so one unavailable package does not block the others
        for p in "${missing[@]}"; do
            bounded 600 "${sudo[@]}" apt-get install -y -q "$p" >&2 \
                || echo "peers.sh: could not install $p (bench will print n/a)" >&2
        done
    fi
    # The dante package starts its own daemon on port 1080 on some setups; the bench runs its own.
    if have systemctl && systemctl is-active --quiet danted 2>/dev/null; then
        systemctl stop danted >/dev/null 2>&1 || true
    fi
    if have service; then service danted stop >/dev/null 2>&1 || true; fi
}

install_rathole() {
    have rathole && return 0
    if ! have cargo; then
        echo "peers.sh: cargo not found; cannot install rathole" >&2
        return 0
    fi
    echo "peers.sh: installing rathole from crates.io (a few minutes of CPU)" >&2
    bounded 1800 cargo install rathole --no-default-features --features server,client,noise >&2 \
        || echo "peers.sh: could not install rathole (bench will print n/a)" >&2
}

status() {
    for b in iperf3 microsocks danted rathole; do
        if have "$b"; then echo "$b $(command -v "$b")"; else echo "$b missing"; fi
    done
}

case "${1:-install}" in
    install)
        install_apt
        install_rathole
        status
        ;;
    status) status ;;
    *)
        echo "usage: $0 [install|status]" >&2
        exit 2
        ;;
esac
exit 0
