# Shared state of the fake Android phone; sourced by the fake executables
# (adb, su, cmd, svc, settings, am, dumpsys), never run on its own.
#
# The phone's state lives in one directory, one small file per fact:
#   serial            adb serial of the phone
#   airplane          1 while airplane mode is on
#   data              1 while mobile data is enabled (the user setting)
#   connected         1 while the data connection is up
#   pending           exists while a reconnect is scheduled
#   gen               bumped on every radio change; a scheduled reconnect
#                     only completes if nothing changed in between
#   delay             seconds from "radio back on" to "data connected" (2)
#   same_ip           exists: the carrier hands back the previous address
#   no_airplane_cmd   exists: `cmd connectivity airplane-mode` is missing,
#                     like Android 10 and older
#   su_denied         exists: `su` refuses (not rooted)
#   airplane_mode_on  the `settings` value (only the broadcast applies it)
#   battery_level, battery_ac, battery_usb, battery_temp (tenths of °C)
#   operator, rssi, rsrp, rsrq, rssnr
#   commands.log      every invocation, one per line
#   net.log           "down" / "up new_ip=true|false", one per link change
#
# With CG_FAKE_PHONE_NET set, link changes also run
# `$CG_TESTBED_NET_BIN --state $CG_FAKE_PHONE_NET data-down|data-up [--same-ip]`
# so the simulated network follows the phone.

: "${CG_FAKE_PHONE_DIR:=@CG_DEFAULT_PHONE_DIR@}"
: "${CG_FAKE_PHONE_NET=@CG_DEFAULT_PHONE_NET@}"
: "${CG_TESTBED_NET_BIN=@CG_DEFAULT_NET_BIN@}"
export CG_FAKE_PHONE_DIR CG_FAKE_PHONE_NET CG_TESTBED_NET_BIN

D=$CG_FAKE_PHONE_DIR
BIN=$(cd "$(dirname "$0")" && pwd)

if [ ! -d "$D" ]; then
    echo "fake phone: state directory '$D' does not exist (set CG_FAKE_PHONE_DIR)" >&2
    exit 70
fi

st_get() {
    if [ -f "$D/$1" ]; then cat "$D/$1"; else printf '%s\n' "$2"; fi
}

st_set() {
    printf '%s\n' "$2" >"$D/$1.tmp.$$" && mv -f "$D/$1.tmp.$$" "$D/$1"
}

log_cmd() {
    printf '%s\n' "$*" >>"$D/commands.log"
}

# The shell user (adb) and root may toggle radios; an app uid may not.
privileged() {
    [ -n "${CG_FAKE_ROOT:-}${CG_FAKE_ADB_SHELL:-}" ]
}

lock() {
    n=0
    while ! mkdir "$D/.lock" 2>/dev/null; do
        n=$((n + 1))
        if [ "$n" -gt 200 ]; then
            # A holder died; ten seconds is far longer than any change.
            rm -rf "$D/.lock"
            n=0
        fi
        sleep 0.05
    done
}

unlock() {
    rmdir "$D/.lock" 2>/dev/null
}

net_down() {
    if [ -n "$CG_FAKE_PHONE_NET" ]; then
        "$CG_TESTBED_NET_BIN" --state "$CG_FAKE_PHONE_NET" data-down >>"$D/net-tool.log" 2>&1 ||
            echo "fake phone: testbed-net data-down failed" >>"$D/net-tool.log"
    fi
    echo down >>"$D/net.log"
}

net_up() {
    if [ -f "$D/same_ip" ]; then
        same=--same-ip
        new=false
    else
        same=
        new=true
    fi
    if [ -n "$CG_FAKE_PHONE_NET" ]; then
        # shellcheck disable=SC2086
        "$CG_TESTBED_NET_BIN" --state "$CG_FAKE_PHONE_NET" data-up $same >>"$D/net-tool.log" 2>&1 ||
            echo "fake phone: testbed-net data-up failed" >>"$D/net-tool.log"
    fi
    echo "up new_ip=$new" >>"$D/net.log"
}

want_up() {
    [ "$(st_get airplane 0)" = 0 ] && [ "$(st_get data 1)" = 1 ]
}

# Bring the data connection in line with airplane mode and mobile data.
# Going down is immediate; coming back takes `delay` seconds and happens in
# the background, like a phone re-attaching, so the command returns at once.
# Call with the lock held.
reconcile() {
    if want_up; then
        if [ "$(st_get connected 1)" = 0 ] && [ ! -f "$D/pending" ]; then
            gen=$(($(st_get gen 0) + 1))
            st_set gen "$gen"
            : >"$D/pending"
            delay=$(st_get delay 2)
            (
                sleep "$delay"
                lock
                if [ "$(st_get gen 0)" = "$gen" ] && want_up; then
                    net_up
                    st_set connected 1
                    rm -f "$D/pending"
                fi
                unlock
            ) </dev/null >/dev/null 2>&1 &
        fi
    else
        st_set gen $(($(st_get gen 0) + 1))
        rm -f "$D/pending"
        if [ "$(st_get connected 1)" = 1 ]; then
            st_set connected 0
            net_down
        fi
    fi
}

deny() {
    # What Android prints when an app uid lacks the permission.
    echo "Exception occurred while executing '$1':" >&2
    echo "java.lang.SecurityException: Permission Denial: $2 requires $3" >&2
    exit 255
}
