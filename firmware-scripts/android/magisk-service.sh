#!/system/bin/sh
# cellgate edge agent on a rooted phone: Magisk runs this script from
# /data/adb/service.d/ at every boot (late_start service), as root.
DIR=/data/adb/cellgate

# Radios and the data connection come up after boot completes.
until [ "$(getprop sys.boot_completed)" = 1 ]; do
    sleep 5
done

(
    while true; do
        # Keep one generation of the log, at most 1 MiB each.
        if [ -f "$DIR/agent.log" ] && [ "$(wc -c <"$DIR/agent.log")" -gt 1048576 ]; then
            mv -f "$DIR/agent.log" "$DIR/agent.log.1"
        fi
        "$DIR/edge-agent" run --config "$DIR/edge-agent.toml" --state-dir "$DIR/state" \
            >>"$DIR/agent.log" 2>&1
        sleep 5
    done
) </dev/null >/dev/null 2>&1 &
