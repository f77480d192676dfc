-- cellgate schema v6: signed agent releases, device updates, rollouts.
-- Same text for SQLite and PostgreSQL but for the blob type; keep both
-- files in step.

-- One agent build per (version, target). The signature is the release
-- key's ed25519 signature over the canonical manifest (see
-- shared/src/release.rs); key_id is the hex public key that made it.
CREATE TABLE releases (
    version    TEXT NOT NULL,
    target     TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    size       BIGINT NOT NULL,
    signature  TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (version, target)
);

-- The binary itself, in 1 MiB pieces: kept in the database so that every
-- control plane sharing it can serve every release, and served piece by
-- piece so a fetch never holds a whole binary in memory.
CREATE TABLE release_chunks (
    version TEXT NOT NULL,
    target  TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    data    BYTEA NOT NULL,
    PRIMARY KEY (version, target, seq),
    FOREIGN KEY (version, target) REFERENCES releases(version, target) ON DELETE CASCADE
);

-- Every update sent to a device and how it ended: installing, restarting
-- (installed, waiting for the device to come back), committed, refused,
-- failed, rolled_back.
CREATE TABLE device_updates (
    id           TEXT PRIMARY KEY,
    device_id    TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    from_version TEXT NOT NULL,
    to_version   TEXT NOT NULL,
    target       TEXT NOT NULL,
    status       TEXT NOT NULL,
    message      TEXT NOT NULL,
    rollout_id   TEXT,
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT
);
CREATE INDEX device_updates_by_device ON device_updates (device_id, started_at);

-- Rolling updates over a label; devices is JSON
-- [{"device_id", "state", "message"}] with state pending | updating | done | failed.
CREATE TABLE rollouts (
    id            TEXT PRIMARY KEY,
    version       TEXT NOT NULL,
    target        TEXT NOT NULL,
    label         TEXT NOT NULL,
    batch         BIGINT NOT NULL,
    state         TEXT NOT NULL,
    halted_reason TEXT,
    devices       TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    finished_at   BIGINT
);
