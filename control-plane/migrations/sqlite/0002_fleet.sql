-- cellgate schema v2: exits, rotation, IP history, telemetry.
-- Same text for SQLite and PostgreSQL; keep both files in step.

ALTER TABLE devices ADD COLUMN operator TEXT NOT NULL DEFAULT '';
ALTER TABLE devices ADD COLUMN region TEXT NOT NULL DEFAULT '';
ALTER TABLE devices ADD COLUMN labels TEXT NOT NULL DEFAULT '[]';   -- JSON array of strings
ALTER TABLE devices ADD COLUMN maintenance BOOLEAN NOT NULL DEFAULT FALSE;
-- Rotation settings; NULL falls back to the first matching label policy.
ALTER TABLE devices ADD COLUMN rotation_enabled BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE devices ADD COLUMN rotate_every_secs BIGINT;
ALTER TABLE devices ADD COLUMN rotate_jitter_secs BIGINT;
ALTER TABLE devices ADD COLUMN rotate_after_requests BIGINT;

-- One row per uplink of a device (a modem, a phone); what customers leave through.
CREATE TABLE exits (
    device_id        TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    name             TEXT NOT NULL,
    interface        TEXT,
    method           TEXT NOT NULL DEFAULT 'none',
    ladder           TEXT NOT NULL DEFAULT '[]',     -- JSON array of rung names
    external_ip      TEXT,
    ip_checked_at    BIGINT,
    state            TEXT NOT NULL DEFAULT 'ready',  -- ready | failed (live states are not stored)
    state_reason     TEXT,
    last_rotation_at BIGINT,
    requests         BIGINT NOT NULL DEFAULT 0,
    successes        BIGINT NOT NULL DEFAULT 0,
    failures         BIGINT NOT NULL DEFAULT 0,
    open_ms_total    BIGINT NOT NULL DEFAULT 0,      -- sum of successful open times
    bytes_up         BIGINT NOT NULL DEFAULT 0,
    bytes_down       BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    PRIMARY KEY (device_id, name)
);

CREATE TABLE label_rotation (
    label                 TEXT PRIMARY KEY,
    rotate_every_secs     BIGINT,
    rotate_jitter_secs    BIGINT,
    rotate_after_requests BIGINT
);

CREATE TABLE rotations (
    id          TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL,
    exit_name   TEXT NOT NULL,
    cause       TEXT NOT NULL,          -- api | cli | link | schedule | requests
    method      TEXT NOT NULL,
    rungs       TEXT NOT NULL,          -- JSON array of the rungs that ran, in order
    attempts    BIGINT NOT NULL,
    old_ip      TEXT,
    new_ip      TEXT,
    outcome     TEXT NOT NULL,          -- success | failed
    error       TEXT,
    drain_ms    BIGINT NOT NULL,
    backend_ms  BIGINT NOT NULL,        -- time spent in the device's backend steps
    duration_ms BIGINT NOT NULL,        -- whole rotation, drain included
    started_at  BIGINT NOT NULL,
    finished_at BIGINT NOT NULL
);
CREATE INDEX rotations_by_exit ON rotations (device_id, exit_name, started_at);

CREATE TABLE ip_history (
    device_id   TEXT NOT NULL,
    exit_name   TEXT NOT NULL,
    ip          TEXT NOT NULL,
    first_seen  BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL,
    requests    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, exit_name, ip)
);

CREATE TABLE rotation_links (
    id                TEXT PRIMARY KEY,
    device_id         TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    exit_name         TEXT NOT NULL,
    token_hash        TEXT NOT NULL UNIQUE,  -- SHA-256 hex of a 192-bit random token
    min_interval_secs BIGINT NOT NULL,
    last_used_at      BIGINT,
    uses              BIGINT NOT NULL DEFAULT 0,
    created_at        BIGINT NOT NULL
);

-- Sampled heartbeat readings, kept for a day for charts.
CREATE TABLE telemetry (
    device_id      TEXT NOT NULL,
    exit_name      TEXT NOT NULL,
    sampled_at     BIGINT NOT NULL,
    link_up        BOOLEAN NOT NULL,
    rssi_dbm       BIGINT,
    rsrp_dbm       BIGINT,
    rsrq_db        DOUBLE PRECISION,
    sinr_db        DOUBLE PRECISION,
    signal_bars    BIGINT,
    access_tech    TEXT,
    band           TEXT,
    operator       TEXT,
    registration   TEXT,
    cell_id        TEXT,
    battery_pct    BIGINT,
    charging       BOOLEAN,
    temperature_dc BIGINT,
    active_flows   BIGINT NOT NULL,
    load_centi     BIGINT NOT NULL
);
CREATE INDEX telemetry_by_exit ON telemetry (device_id, exit_name, sampled_at);
