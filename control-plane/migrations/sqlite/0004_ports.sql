-- cellgate schema v4: port per exit ([ports] range).
-- Same text for SQLite and PostgreSQL; keep both files in step.

-- A port is given to an exit the first time it is seen and kept; the two
-- unique constraints make concurrent assignments (several control planes on
-- one database) safe: a loser retries with the next free port.
CREATE TABLE exit_ports (
    port        BIGINT PRIMARY KEY,
    device_id   TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    exit_name   TEXT NOT NULL,
    assigned_at BIGINT NOT NULL,
    UNIQUE (device_id, exit_name)
);
