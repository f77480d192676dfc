#!/bin/sh
# First boot of an image made by make-image: create the agent's user,
# enroll with the one-time token from the boot partition, then hand over
# to cellgate-agent.service and disable this unit.
set -eu

STATE=/var/lib/cellgate-agent
ETC=/etc/cellgate
BIN=/usr/local/bin/edge-agent
USER_NAME=cellgate-agent

# Raspberry Pi OS mounts the FAT partition at /boot/firmware (bookworm and
# later) or /boot (before).
BOOT=""
for d in /boot/firmware/cellgate /boot/cellgate; do
    if [ -d "$d" ]; then
        BOOT=$d
        break
    fi
done

if ! getent passwd "$USER_NAME" >/dev/null; then
    useradd --system --user-group --home-dir "$STATE" --no-create-home \
        --shell /usr/sbin/nologin "$USER_NAME"
fi
install -d -m 0700 -o "$USER_NAME" -g "$USER_NAME" "$STATE"

# A config on the boot partition (edited on another computer before the
# first boot) replaces the one in the image.
if [ -n "$BOOT" ] && [ -f "$BOOT/edge-agent.toml" ]; then
    cp "$BOOT/edge-agent.toml" "$ETC/edge-agent.toml"
fi
chown root:"$USER_NAME" "$ETC/edge-agent.toml"
chmod 0640 "$ETC/edge-agent.toml"

if [ ! -f "$STATE/identity.json" ]; then
    if [ -z "$BOOT" ] || [ ! -s "$BOOT/enroll-token" ]; then
        echo "cellgate-firstboot: no enrollment token in /boot/firmware/cellgate/enroll-token" >&2
        exit 1
    fi
    token=$(tr -d ' \t\r\n' <"$BOOT/enroll-token")
    # The network (or the clock, which TLS needs) may not be ready yet:
    # retry with a growing pause, as long as it takes.
    pause=5
    set -- enroll "$token" --state-dir "$STATE"
    if [ -s "$BOOT/control-plane" ]; then
        set -- "$@" --control-plane "$(tr -d ' \t\r\n' <"$BOOT/control-plane")"
    fi
    until "$BIN" "$@"; do
        echo "cellgate-firstboot: enrollment failed, retrying in ${pause}s" >&2
        sleep "$pause"
        [ "$pause" -ge 60 ] || pause=$((pause * 2))
    done
    chown -R "$USER_NAME:$USER_NAME" "$STATE"
fi

# The token is spent; do not leave it on the card.
if [ -n "$BOOT" ]; then
    rm -f "$BOOT/enroll-token" "$BOOT/control-plane"
fi
systemctl enable cellgate-agent.service
systemctl start --no-block cellgate-agent.service
systemctl disable cellgate-firstboot.service
