-- cellgate schema v3: plans, credentials, sub-users, allow lists, bans,
-- usage and the request log. Same text for SQLite and PostgreSQL.

CREATE TABLE plans (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL UNIQUE,
    max_threads      BIGINT,                 -- concurrent connections; NULL = unlimited
    new_conn_per_sec BIGINT,
    bw_conn_bps      BIGINT,                 -- bytes/s per connection, each direction
    bw_customer_bps  BIGINT,                 -- bytes/s per customer, each direction
    quota_bytes      BIGINT,                 -- per calendar month (UTC)
    allowed_labels   TEXT NOT NULL DEFAULT '[]',  -- JSON array; empty = every exit
    allowed_ports    TEXT,                   -- JSON [[lo, hi], ...]; NULL = default port policy
    strategy         TEXT NOT NULL DEFAULT 'round_robin',
    log_mode         TEXT NOT NULL DEFAULT 'host',  -- request log: off | host (host only) | full (host, port, path)
    created_at       BIGINT NOT NULL
);

ALTER TABLE customers ADD COLUMN plan_id TEXT;
ALTER TABLE customers ADD COLUMN expires_at BIGINT;
-- A sub-user belongs to a parent customer and shares its limits and quota.
ALTER TABLE customers ADD COLUMN parent_id TEXT;
ALTER TABLE customers ADD COLUMN webhook_url TEXT;

ALTER TABLE devices ADD COLUMN country TEXT NOT NULL DEFAULT '';

-- Extra username/password logins of a customer.
CREATE TABLE credentials (
    id            TEXT PRIMARY KEY,
    customer_id   TEXT NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,          -- argon2id PHC string
    created_at    BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    customer_id  TEXT NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    label        TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,    -- SHA-256 hex of a 256-bit random key
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT
);

-- Source networks that authenticate a customer without credentials.
CREATE TABLE customer_ips (
    customer_id TEXT NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    cidr        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (customer_id, cidr)
);

CREATE TABLE bans (
    customer_id TEXT PRIMARY KEY REFERENCES customers(id) ON DELETE CASCADE,
    until_at    BIGINT,                   -- NULL = until lifted
    reason      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

-- Usage per UTC day, customer, credential and exit; added to in batches.
CREATE TABLE usage_daily (
    day         BIGINT NOT NULL,          -- days since 1970-01-01 (UTC)
    customer_id TEXT NOT NULL,
    credential  TEXT NOT NULL,            -- the login used (username, "key:<id>" or "ip:<cidr>")
    device_id   TEXT NOT NULL,
    exit_name   TEXT NOT NULL,
    bytes_up    BIGINT NOT NULL DEFAULT 0,
    bytes_down  BIGINT NOT NULL DEFAULT 0,
    connections BIGINT NOT NULL DEFAULT 0,
    requests    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (day, customer_id, credential, device_id, exit_name)
);
CREATE INDEX usage_by_customer ON usage_daily (customer_id, day);
CREATE INDEX usage_by_device ON usage_daily (device_id, day);

CREATE TABLE request_log (
    started_at  BIGINT NOT NULL,
    customer_id TEXT NOT NULL,
    credential  TEXT NOT NULL,
    device_id   TEXT,
    exit_name   TEXT,
    target_host TEXT,                     -- NULL when the plan logs nothing of targets
    target_port BIGINT,
    target_path TEXT,                     -- plain HTTP in full mode only
    bytes_up    BIGINT NOT NULL,
    bytes_down  BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    outcome     TEXT NOT NULL,            -- ok | refused | failed | limited
    error       TEXT
);
CREATE INDEX request_log_by_time ON request_log (started_at);
CREATE INDEX request_log_by_customer ON request_log (customer_id, started_at);
