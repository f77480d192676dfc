#!/usr/bin/env bash
# Install the cellgate edge agent on an OpenWrt router over ssh, or into a
# staging root (an image builder's files/ directory, a mounted rootfs).
#
#   ./install.sh --host root@192.168.1.1 --binary edge-agent --token cgt1_… [--config FILE]
#   ./install.sh --root ./files --binary edge-agent [--config FILE]
#
# SSH and SCP override the commands (defaults: ssh, and scp -O, since
# OpenWrt's dropbear has no sftp server for newer scp's default protocol).
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: install.sh (--host USER@ROUTER | --root DIR) --binary FILE [options]

  --host USER@ROUTER     install over ssh/scp
  --root DIR             install below DIR instead (no ssh; nothing started)
  --binary FILE          edge-agent built for the router (aarch64 or mips musl)
  --config FILE          agent configuration (default: keep the installed one,
                         or write a minimal one)
  --token TOKEN          one-time enrollment token (control-plane enroll-token create)
  --control-plane H:P    enroll through H:P instead of the token's address
  --no-start             install (and enroll), but do not enable or start the service
  -h, --help             this text
USAGE
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
host="" root="" binary="" config="" token="" control_plane="" start=1
while (($#)); do
    case $1 in
    --host) host=${2:?--host needs USER@ROUTER}; shift 2 ;;
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --binary) binary=${2:?--binary needs a file}; shift 2 ;;
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --token) token=${2:?--token needs a value}; shift 2 ;;
    --control-plane) control_plane=${2:?--control-plane needs host:port}; shift 2 ;;
    --no-start) start=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[ -n "$binary" ] || { usage >&2; die "--binary is required"; }
[ -f "$binary" ] || die "binary not found: $binary"
[ -z "$config" ] || [ -f "$config" ] || die "config not found: $config"
{ [ -n "$host" ] && [ -z "$root" ]; } || { [ -z "$host" ] && [ -n "$root" ]; } ||
    { usage >&2; die "give exactly one of --host and --root"; }
safe='^[A-Za-z0-9_.:/+=~-]+$'
[ -z "$token" ] || [[ $token =~ $safe ]] || die "the token has unexpected characters"
[ -z "$control_plane" ] || [[ $control_plane =~ $safe ]] || die "bad --control-plane value"
[ -f "$here/cellgate-agent.init" ] || die "cellgate-agent.init missing next to install.sh"

read -ra ssh_cmd <<<"${SSH:-ssh}"
read -ra scp_cmd <<<"${SCP:-scp -O}"
if [ -n "$root" ]; then
    mkdir -p "$root" || die "cannot create $root"
    root=$(cd "$root" && pwd)
else
    command -v "${ssh_cmd[0]}" >/dev/null 2>&1 || die "ssh not found (${ssh_cmd[0]}); set SSH"
    command -v "${scp_cmd[0]}" >/dev/null 2>&1 || die "scp not found (${scp_cmd[0]}); set SCP"
fi

# A command on the router (or, staged, here, with paths below the root).
on_router() {
    if [ -n "$root" ]; then
        sh -c "$1"
    else
        "${ssh_cmd[@]}" "$host" "$1"
    fi
}
# Copy SRC to the router's DST with MODE.
put() {
    local src=$1 dst=$2 mode=$3
    if [ -n "$root" ]; then
        install -D -m "$mode" "$src" "$root$dst"
    else
        "${scp_cmd[@]}" "$src" "$host:$dst.new" >/dev/null || die "copying $src to $host failed"
        on_router "chmod $mode $dst.new && mv -f $dst.new $dst" || die "installing $dst on $host failed"
    fi
}

r=$root
on_router "mkdir -p $r/usr/bin $r/etc/init.d $r/etc/config $r/lib/upgrade/keep.d $r/etc/cellgate/state && chmod 0700 $r/etc/cellgate/state" ||
    die "cannot reach ${host:-$root} or create directories there"

echo "==> installing /usr/bin/edge-agent and /etc/init.d/cellgate-agent"
put "$binary" /usr/bin/edge-agent 0755
put "$here/cellgate-agent.init" /etc/init.d/cellgate-agent 0755

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -n "$config" ]; then
    put "$config" /etc/cellgate/edge-agent.toml 0600
elif ! on_router "test -f $r/etc/cellgate/edge-agent.toml"; then
    printf '%s\n' '# cellgate edge agent; every key is documented in deploy/edge-agent.example.toml.' \
        'state_dir = "/etc/cellgate/state"' >"$tmp/edge-agent.toml"
    put "$tmp/edge-agent.toml" /etc/cellgate/edge-agent.toml 0600
fi
if ! on_router "test -f $r/etc/config/cellgate"; then
    printf '%s\n' "config agent 'agent'" "	option enabled '1'" \
        "	option config '/etc/cellgate/edge-agent.toml'" \
        "	option state_dir '/etc/cellgate/state'" >"$tmp/uci"
    put "$tmp/uci" /etc/config/cellgate 0644
fi
# sysupgrade keeps the identity and configuration.
printf '%s\n' /etc/cellgate/ /etc/config/cellgate >"$tmp/keep"
put "$tmp/keep" /lib/upgrade/keep.d/cellgate-agent 0644

if on_router "test -f $r/etc/cellgate/state/identity.json"; then
    echo "==> already enrolled; token not used"
elif [ -n "$token" ]; then
    echo "==> enrolling"
    enroll="$r/usr/bin/edge-agent enroll $token --state-dir $r/etc/cellgate/state"
    [ -z "$control_plane" ] || enroll="$enroll --control-plane $control_plane"
    on_router "$enroll" || die "enrollment failed (is the token valid and unused, and UDP to the control plane open?)"
else
    echo "==> not enrolled: rerun with --token TOKEN" >&2
fi

if [ -n "$root" ]; then
    mkdir -p "$root/etc/rc.d"
    ln -sf ../init.d/cellgate-agent "$root/etc/rc.d/S99cellgate-agent"
    ln -sf ../init.d/cellgate-agent "$root/etc/rc.d/K10cellgate-agent"
    echo "==> staged in $root"
elif ((start)); then
    on_router "/etc/init.d/cellgate-agent enable && /etc/init.d/cellgate-agent restart" ||
        die "starting the service failed (logread -e cellgate on the router)"
    echo "==> cellgate-agent enabled and started on $host"
fi
