#!/usr/bin/env bash
# Install the cellgate edge agent on a running Raspberry Pi (or any
# systemd Linux host): system user, binary, config, hardened unit,
# enrollment, service started.
#
#   sudo ./install.sh --binary ./edge-agent --token cgt1_… [--config edge-agent.toml]
#
# --root DIR installs into a staging tree instead of / (no user creation,
# no chown, no systemctl); enrollment then runs the staged binary here.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: install.sh --binary FILE [options]

  --binary FILE          the edge-agent binary built for this device
  --config FILE          agent configuration (default: keep the installed one,
                         or write a minimal one)
  --token TOKEN          one-time enrollment token (control-plane enroll-token create)
  --control-plane H:P    reach the control plane at H:P instead of the token's address
  --root DIR             install below DIR instead of / (staging; no systemctl)
  --no-start             install and enroll, but do not enable or start the unit
  -h, --help             this text
USAGE
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
binary="" config="" token="" control_plane="" root="" start=1
while (($#)); do
    case $1 in
    --binary) binary=${2:?--binary needs a file}; shift 2 ;;
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --token) token=${2:?--token needs a value}; shift 2 ;;
    --control-plane) control_plane=${2:?--control-plane needs host:port}; shift 2 ;;
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --no-start) start=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[ -n "$binary" ] || { usage >&2; die "--binary is required"; }
[ -f "$binary" ] || die "binary not found: $binary"
[ -z "$config" ] || [ -f "$config" ] || die "config not found: $config"
[ -f "$here/cellgate-agent.service" ] || die "cellgate-agent.service missing next to install.sh"

user=cellgate-agent
if [ -n "$root" ]; then
    mkdir -p "$root" || die "cannot create $root"
    root=$(cd "$root" && pwd)
    staging=1
else
    staging=0
    [ "$(id -u)" -eq 0 ] || die "run as root (or use --root DIR to stage an install)"
    command -v systemctl >/dev/null || die "systemctl not found: this installer needs systemd"
fi

bin_path=$root/usr/local/bin/edge-agent
etc_dir=$root/etc/cellgate
config_path=$etc_dir/edge-agent.toml
state_dir=$root/var/lib/cellgate-agent
unit_dir=$root/etc/systemd/system

# 1. The system user (owns the identity; the unit drops to it).
if ((staging)); then
    echo "==> staging root $root: not creating user $user"
elif ! getent passwd "$user" >/dev/null; then
    echo "==> creating system user $user"
    useradd --system --user-group --home-dir /var/lib/cellgate-agent --no-create-home \
        --shell /usr/sbin/nologin "$user"
fi

# 2. Binary: copy next to the target, then rename, so a running agent's
#    executable is replaced rather than rewritten ("text file busy").
echo "==> installing $bin_path"
install -d -m 0755 "$(dirname "$bin_path")"
install -m 0755 "$binary" "$bin_path.new"
mv -f "$bin_path.new" "$bin_path"

# 3. Config: readable by the agent's group only (it may hold HiLink passwords).
install -d -m 0755 "$etc_dir"
if [ -n "$config" ]; then
    echo "==> installing $config_path"
    install -m 0640 "$config" "$config_path"
elif [ ! -f "$config_path" ]; then
    echo "==> writing a minimal $config_path"
    printf '%s\n' '# cellgate edge agent; every key is documented in deploy/edge-agent.example.toml.' \
        'state_dir = "/var/lib/cellgate-agent"' >"$config_path"
    chmod 0640 "$config_path"
else
    echo "==> keeping $config_path"
fi
((staging)) || chown root:"$user" "$config_path"

# 4. State directory: the private key lives here.
install -d -m 0700 "$state_dir"

# 5. The unit.
echo "==> installing $unit_dir/cellgate-agent.service"
install -d -m 0755 "$unit_dir"
install -m 0644 "$here/cellgate-agent.service" "$unit_dir/cellgate-agent.service"

# 6. Enrollment (once: the identity is kept across reinstalls).
if [ -f "$state_dir/identity.json" ]; then
    echo "==> already enrolled ($state_dir/identity.json); token not used"
elif [ -n "$token" ]; then
    echo "==> enrolling"
    args=(enroll "$token" --state-dir "$state_dir")
    [ -z "$control_plane" ] || args+=(--control-plane "$control_plane")
    "$bin_path" "${args[@]}" || die "enrollment failed (is the token valid and unused, and UDP to the control plane open?)"
else
    echo "==> not enrolled: rerun with --token TOKEN" >&2
fi
((staging)) || chown -R "$user:$user" "$state_dir"

# 7. Service.
if ((staging)); then
    echo "==> staged in $root (enable on the target: systemctl enable --now cellgate-agent)"
    exit 0
fi
systemctl daemon-reload
if ((start)) && [ -f "$state_dir/identity.json" ]; then
    echo "==> enabling and starting cellgate-agent.service"
    systemctl enable cellgate-agent.service
    systemctl restart cellgate-agent.service
    systemctl --no-pager --lines=5 status cellgate-agent.service || true
else
    echo "==> cellgate-agent.service installed, not started"
fi
