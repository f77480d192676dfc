-- cellgate schema v5: device commands issued through the API or seen on MQTT.
-- Same text for SQLite and PostgreSQL; keep both files in step.

-- status: pending, delivered, succeeded, failed, expired.
-- channel: quic or mqtt (NULL until sent).
CREATE TABLE device_commands (
    id           TEXT PRIMARY KEY,
    device_id    TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    command      TEXT NOT NULL,
    payload      TEXT NOT NULL,
    status       TEXT NOT NULL,
    channel      TEXT,
    message      TEXT NOT NULL DEFAULT '',
    detail       TEXT,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    delivered_at BIGINT,
    finished_at  BIGINT
);
CREATE INDEX device_commands_device ON device_commands (device_id, created_at);
CREATE INDEX device_commands_open ON device_commands (status, expires_at);
