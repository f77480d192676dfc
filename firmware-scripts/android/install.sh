#!/usr/bin/env bash
# Install the cellgate edge agent on an Android phone over adb, and enroll it.
#
#   ./install.sh [-s SERIAL] --binary edge-agent --config edge-agent.toml --token cgt1_…
#
# Rooted phones (adb shell su -c id answers uid=0, e.g. Magisk): the agent
# lives in /data/adb/cellgate and a Magisk service.d script starts it at boot.
# Otherwise it lives in Termux's home (~/.cellgate) and a Termux:Boot script
# (~/.termux/boot/cellgate-agent) starts it; adb must then be able to write
# Termux's home, which on phones without su means adb running as root
# ("rooted debugging", adb root).
#
# ADB overrides the adb command (e.g. ADB=/opt/platform-tools/adb).
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: install.sh [-s SERIAL] --binary FILE --config FILE --token TOKEN [options]

  -s SERIAL              the phone, as `adb devices` lists it
  --binary FILE          edge-agent built for Android (aarch64-linux-android or
                         armv7-linux-androideabi)
  --config FILE          agent configuration
  --token TOKEN          one-time enrollment token (control-plane enroll-token create)
  --control-plane H:P    enroll through H:P instead of the token's address
  --mode MODE            auto (default), magisk or termux
  --termux-home DIR      Termux's home (default /data/data/com.termux/files/home)
  --no-start             install and enroll, but do not start the agent now
  -h, --help             this text
USAGE
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
serial="" binary="" config="" token="" control_plane="" mode=auto start=1
termux_home=/data/data/com.termux/files/home
while (($#)); do
    case $1 in
    -s) serial=${2:?-s needs a serial}; shift 2 ;;
    --binary) binary=${2:?--binary needs a file}; shift 2 ;;
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --token) token=${2:?--token needs a value}; shift 2 ;;
    --control-plane) control_plane=${2:?--control-plane needs host:port}; shift 2 ;;
    --mode) mode=${2:?--mode needs auto, magisk or termux}; shift 2 ;;
    --termux-home) termux_home=${2:?--termux-home needs a directory}; shift 2 ;;
    --no-start) start=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done
for opt in binary config token; do
    [ -n "${!opt}" ] || { usage >&2; die "--$opt is required"; }
done
[ -f "$binary" ] || die "binary not found: $binary"
[ -f "$config" ] || die "config not found: $config"
# Everything below travels through the phone's shell: only plain characters.
safe='^[A-Za-z0-9_.:/+=~-]+$'
[[ $token =~ $safe ]] || die "the token has unexpected characters"
[ -z "$control_plane" ] || [[ $control_plane =~ $safe ]] || die "bad --control-plane value"
[[ $termux_home =~ $safe ]] || die "bad --termux-home value"
case $mode in auto | magisk | termux) ;; *) die "--mode must be auto, magisk or termux" ;; esac

read -ra adb <<<"${ADB:-adb}"
((${#adb[@]})) || die "ADB is empty"
[ -z "$serial" ] || adb+=(-s "$serial")
command -v "${adb[0]}" >/dev/null 2>&1 ||
    die "adb not found (${adb[0]}): install Android platform-tools or set ADB=/path/to/adb"

# One command line on the phone; its output, and adb's exit status (adb
# passes the remote status through since Android 7).
phone() {
    "${adb[@]}" shell "$1"
}

# ---- the phone -------------------------------------------------------------

state=$("${adb[@]}" get-state 2>&1) || true
if [ "$state" != device ]; then
    die "no phone ready over adb${serial:+ with serial $serial} (adb said: ${state:-nothing}); \
plug it in, enable USB debugging, accept this computer's key on the phone, or pick one with -s SERIAL"
fi

if [ "$mode" = auto ]; then
    if phone "su -c id" 2>/dev/null | grep -q 'uid=0'; then
        mode=magisk
    else
        mode=termux
    fi
fi
echo "==> installing for $mode"

staging=/data/local/tmp/cellgate
if [ "$mode" = magisk ]; then
    dir=/data/adb/cellgate
    boot_src=$here/magisk-service.sh
    boot_dst=/data/adb/service.d/cellgate-agent.sh
    as_root() { phone "su -c '$1'"; }
else
    dir=$termux_home/.cellgate
    boot_src=$here/termux-boot.sh
    boot_dst=$termux_home/.termux/boot/cellgate-agent
    as_root() { phone "$1"; }
fi
[ -f "$boot_src" ] || die "$(basename "$boot_src") missing next to install.sh"

# ---- files -------------------------------------------------------------------

if [ "$mode" = termux ]; then
    phone "mkdir -p $dir && test -w $dir" >/dev/null 2>&1 ||
        die "adb cannot write Termux's home ($termux_home) on this phone: root it (Magisk), \
enable rooted debugging and run adb root, or check that Termux and Termux:Boot are installed"
fi

# adb push lands as the shell user in /data/local/tmp; from there the files
# move into place with the right owner and modes.
phone "mkdir -p $staging" >/dev/null || die "cannot create $staging on the phone"
push() {
    "${adb[@]}" push "$1" "$staging/$2" >/dev/null || die "adb push of $1 failed"
}
push "$binary" edge-agent
push "$config" edge-agent.toml
push "$boot_src" boot.sh
# One command line (adb shell, su -c): no single quotes in it.
setup="mkdir -p $dir/state $(dirname "$boot_dst")"
setup+=" && mv -f $staging/edge-agent $dir/edge-agent"
setup+=" && mv -f $staging/edge-agent.toml $dir/edge-agent.toml"
setup+=" && mv -f $staging/boot.sh $boot_dst"
setup+=" && chmod 0755 $dir/edge-agent $boot_dst"
setup+=" && chmod 0600 $dir/edge-agent.toml"
setup+=" && chmod 0700 $dir $dir/state"
if [ "$mode" = termux ]; then
    # Written by adb as root: hand the files to the Termux app's user and
    # give them Termux's SELinux label.
    setup+=" && chown -R \$(stat -c %u:%g $termux_home) $dir $termux_home/.termux"
    setup+=" && { restorecon -R $dir $termux_home/.termux 2>/dev/null || true; }"
fi
setup+=" && echo cellgate-setup-ok"
out=$(as_root "$setup" 2>&1) || true
grep -q cellgate-setup-ok <<<"$out" || die "installing the files on the phone failed: $out"
phone "rmdir $staging" >/dev/null 2>&1 || true
echo "==> installed $dir/edge-agent and $boot_dst"

# ---- enrollment --------------------------------------------------------------

if as_root "test -f $dir/state/identity.json && echo cellgate-enrolled" 2>/dev/null | grep -q cellgate-enrolled; then
    echo "==> already enrolled ($dir/state); token not used"
else
    enroll="$dir/edge-agent enroll $token --state-dir $dir/state"
    [ -z "$control_plane" ] || enroll="$enroll --control-plane $control_plane"
    out=$(as_root "$enroll" 2>&1) || true
    grep -q 'enrolled as' <<<"$out" ||
        die "enrollment on the phone failed (is the token valid and unused, and UDP to the control plane open?): $out"
    echo "==> $(grep 'enrolled as' <<<"$out")"
    if [ "$mode" = termux ]; then
        as_root "chown -R \$(stat -c %u:%g $termux_home) $dir/state" >/dev/null 2>&1 || true
    fi
fi

# ---- start -------------------------------------------------------------------

if ((start)); then
    if [ "$mode" = magisk ]; then
        as_root "sh $boot_dst" >/dev/null 2>&1 || die "starting the agent failed"
        echo "==> agent started; it starts again at every boot"
    else
        echo "==> open Termux:Boot once (Android only runs its boot scripts after that), then reboot"
    fi
fi
