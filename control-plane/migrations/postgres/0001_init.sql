-- cellgate schema v1 (PostgreSQL). Keep in step with ../sqlite/0001_init.sql.
-- Times are Unix milliseconds (BIGINT) so both databases store the same values.

CREATE TABLE admin_tokens (
    id          TEXT PRIMARY KEY,
    label       TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,   -- SHA-256 hex of a 256-bit random token
    created_at  BIGINT NOT NULL
);

CREATE TABLE enroll_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,          -- becomes the device's name
    token_hash  TEXT NOT NULL UNIQUE,   -- SHA-256 hex of the token secret
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT,
    device_id   TEXT
);

CREATE TABLE devices (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    cert_fingerprint TEXT NOT NULL UNIQUE, -- SHA-256 hex of the device certificate (DER)
    disabled         BOOLEAN NOT NULL DEFAULT FALSE,
    kind             TEXT NOT NULL DEFAULT 'linux',
    model            TEXT NOT NULL DEFAULT '',
    hostname         TEXT NOT NULL DEFAULT '',
    agent_version    TEXT NOT NULL DEFAULT '',
    last_addr        TEXT,
    last_seen_at     BIGINT,
    connects         BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL
);

CREATE TABLE customers (
    id             TEXT PRIMARY KEY,
    username       TEXT NOT NULL UNIQUE,
    password_hash  TEXT NOT NULL,       -- argon2id PHC string
    disabled       BOOLEAN NOT NULL DEFAULT FALSE,
    created_at     BIGINT NOT NULL
);
