#!/data/data/com.termux/files/usr/bin/sh
# cellgate edge agent without root: Termux:Boot runs the scripts in
# ~/.termux/boot/ when the phone has booted, as the Termux app's user.
DIR="$HOME/.cellgate"

# Keep the CPU awake while the screen is off (termux-api's wake lock).
termux-wake-lock 2>/dev/null || true

(
    while true; do
        if [ -f "$DIR/agent.log" ] && [ "$(wc -c <"$DIR/agent.log")" -gt 1048576 ]; then
            mv -f "$DIR/agent.log" "$DIR/agent.log.1"
        fi
        "$DIR/edge-agent" run --config "$DIR/edge-agent.toml" --state-dir "$DIR/state" \
            >>"$DIR/agent.log" 2>&1
        sleep 5
    done
) </dev/null >/dev/null 2>&1 &
