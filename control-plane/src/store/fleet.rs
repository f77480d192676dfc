//! Fleet tables: exits, rotations, IP history, rotation links, label
//! rotation policies and sampled telemetry.

use serde::Serialize;
use shared::wire::{ExitInfo, Heartbeat};

use super::{BeginWrite, Columns, DeviceRotation, Store, StoreError, now_ms};
use crate::registry::Counters;

#[derive(Debug, Clone, Serialize)]
pub struct ExitRow {
    pub device_id: String,
    pub name: String,
    pub interface: Option<String>,
    pub method: String,
    pub ladder: Vec<String>,
    pub external_ip: Option<String>,
    pub ip_checked_at: Option<i64>,
    pub state: String,
    pub state_reason: Option<String>,
    pub last_rotation_at: Option<i64>,
    pub requests: i64,
    pub successes: i64,
    pub failures: i64,
    pub open_ms_total: i64,
    pub bytes_up: i64,
    pub bytes_down: i64,
}

const EXIT_COLS: &str = "device_id, name, interface, method, ladder, external_ip, ip_checked_at, state, state_reason, \
     last_rotation_at, requests, successes, failures, open_ms_total, bytes_up, bytes_down";

fn exit_from(r: &impl Columns) -> Result<ExitRow, sqlx::Error> {
    Ok(ExitRow {
        device_id: r.col("device_id")?,
        name: r.col("name")?,
        interface: r.col("interface")?,
        method: r.col("method")?,
        ladder: serde_json::from_str(&r.col::<String>("ladder")?).unwrap_or_default(),
        external_ip: r.col("external_ip")?,
        ip_checked_at: r.col("ip_checked_at")?,
        state: r.col("state")?,
        state_reason: r.col("state_reason")?,
        last_rotation_at: r.col("last_rotation_at")?,
        requests: r.col("requests")?,
        successes: r.col("successes")?,
        failures: r.col("failures")?,
        open_ms_total: r.col("open_ms_total")?,
        bytes_up: r.col("bytes_up")?,
        bytes_down: r.col("bytes_down")?,
    })
}

/// One finished rotation.
#[derive(Debug, Clone, Serialize)]
pub struct RotationRow {
    pub id: String,
    pub device_id: String,
    pub exit: String,
    /// What asked for it: api, cli, link, schedule, requests.
    pub cause: String,
    pub method: String,
    /// The ladder rungs that ran, in order (one per attempt that reached
    /// the device).
    pub rungs: Vec<String>,
    pub attempts: i64,
    pub old_ip: Option<String>,
    pub new_ip: Option<String>,
    /// success | failed
    pub outcome: String,
    pub error: Option<String>,
    pub drain_ms: i64,
    pub backend_ms: i64,
    pub duration_ms: i64,
    pub started_at: i64,
    pub finished_at: i64,
}

fn rotation_from(r: &impl Columns) -> Result<RotationRow, sqlx::Error> {
    Ok(RotationRow {
        id: r.col("id")?,
        device_id: r.col("device_id")?,
        exit: r.col("exit_name")?,
        cause: r.col("cause")?,
        method: r.col("method")?,
        rungs: serde_json::from_str(&r.col::<String>("rungs")?).unwrap_or_default(),
        attempts: r.col("attempts")?,
        old_ip: r.col("old_ip")?,
        new_ip: r.col("new_ip")?,
        outcome: r.col("outcome")?,
        error: r.col("error")?,
        drain_ms: r.col("drain_ms")?,
        backend_ms: r.col("backend_ms")?,
        duration_ms: r.col("duration_ms")?,
        started_at: r.col("started_at")?,
        finished_at: r.col("finished_at")?,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct IpRow {
    pub exit: String,
    pub ip: String,
    pub first_seen: i64,
    pub last_seen: i64,
    pub requests: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RotationLinkRow {
    pub id: String,
    pub device_id: String,
    pub exit: String,
    pub min_interval_secs: i64,
    pub last_used_at: Option<i64>,
    pub uses: i64,
    pub created_at: i64,
}

/// The outcome of presenting a rotation link's token.
#[derive(Debug)]
pub enum LinkUse {
    Granted {
        device_id: String,
        exit: String,
        /// When this use was recorded, and the use before it (for
        /// [`Store::refund_rotation_link`]).
        used_at: i64,
        previous_use: Option<i64>,
    },
    /// Used too recently; may be used again after this many milliseconds.
    TooSoon {
        retry_after_ms: i64,
    },
    Unknown,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LabelRotation {
    pub label: String,
    pub every_secs: Option<i64>,
    pub jitter_secs: Option<i64>,
    pub after_requests: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TelemetryRow {
    pub exit: String,
    pub at: i64,
    pub link_up: bool,
    pub rssi_dbm: Option<i64>,
    pub rsrp_dbm: Option<i64>,
    pub rsrq_db: Option<f64>,
    pub sinr_db: Option<f64>,
    pub signal_bars: Option<i64>,
    pub access_tech: Option<String>,
    pub band: Option<String>,
    pub operator: Option<String>,
    pub registration: Option<String>,
    pub cell_id: Option<String>,
    pub battery_pct: Option<i64>,
    pub charging: Option<bool>,
    pub temperature_c: Option<f64>,
    pub active_flows: i64,
    pub load: f64,
}

/// Fields an administrator may change on a device.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    pub name: Option<String>,
    pub region: Option<String>,
    pub country: Option<String>,
    pub labels: Option<Vec<String>>,
    pub maintenance: Option<bool>,
}

impl Store {
    // --- exits -------------------------------------------------------------

    /// Record the exits a device declared; returns every stored exit of it.
    pub async fn upsert_exits(
        &self,
        device_id: &str,
        exits: &[ExitInfo],
    ) -> Result<Vec<ExitRow>, StoreError> {
        on_pool!(self, |p| {
            let now = now_ms();
            let mut tx = p.begin_write().await?;
            for e in exits {
                sqlx::query(
                    "INSERT INTO exits (device_id, name, interface, method, ladder, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (device_id, name) DO UPDATE SET \
                     interface = excluded.interface, method = excluded.method, ladder = excluded.ladder",
                )
                .bind(device_id)
                .bind(&e.name)
                .bind(&e.interface)
                .bind(&e.method)
                .bind(serde_json::to_string(&e.ladder).unwrap_or_else(|_| "[]".into()))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            self.exits_of(device_id).await
        })
    }

    pub async fn exits_of(&self, device_id: &str) -> Result<Vec<ExitRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {EXIT_COLS} FROM exits WHERE device_id = $1 ORDER BY name"
            )))
            .bind(device_id)
            .fetch_all(p)
            .await?;
            Ok(rows.iter().map(exit_from).collect::<Result<_, _>>()?)
        })
    }

    /// Record a verified public address of an exit, and in its IP history.
    pub async fn exit_ip_seen(
        &self,
        device_id: &str,
        exit: &str,
        ip: &str,
    ) -> Result<(), StoreError> {
        on_pool!(self, |p| {
            let now = now_ms();
            let mut tx = p.begin_write().await?;
            sqlx::query(
                "UPDATE exits SET external_ip = $1, ip_checked_at = $2 WHERE device_id = $3 AND name = $4",
            )
            .bind(ip)
            .bind(now)
            .bind(device_id)
            .bind(exit)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO ip_history (device_id, exit_name, ip, first_seen, last_seen) VALUES ($1, $2, $3, $4, $4) \
                 ON CONFLICT (device_id, exit_name, ip) DO UPDATE SET last_seen = excluded.last_seen",
            )
            .bind(device_id)
            .bind(exit)
            .bind(ip)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    pub async fn set_exit_state(
        &self,
        device_id: &str,
        exit: &str,
        state: &str,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        on_pool!(self, |p| {
            sqlx::query(
                "UPDATE exits SET state = $1, state_reason = $2 WHERE device_id = $3 AND name = $4",
            )
            .bind(state)
            .bind(reason)
            .bind(device_id)
            .bind(exit)
            .execute(p)
            .await?;
            Ok(())
        })
    }

    /// Add counter deltas to an exit, and its requests to the IP it had.
    pub async fn add_exit_counters(
        &self,
        device_id: &str,
        exit: &str,
        d: &Counters,
        ip: Option<&str>,
    ) -> Result<(), StoreError> {
        on_pool!(self, |p| {
            let mut tx = p.begin_write().await?;
            sqlx::query(
                "UPDATE exits SET requests = requests + $1, successes = successes + $2, failures = failures + $3, \
                 open_ms_total = open_ms_total + $4, bytes_up = bytes_up + $5, bytes_down = bytes_down + $6 \
                 WHERE device_id = $7 AND name = $8",
            )
            .bind(d.requests as i64)
            .bind(d.successes as i64)
            .bind(d.failures as i64)
            .bind(d.open_ms_total as i64)
            .bind(d.bytes_up as i64)
            .bind(d.bytes_down as i64)
            .bind(device_id)
            .bind(exit)
            .execute(&mut *tx)
            .await?;
            if let Some(ip) = ip
                && d.requests > 0
            {
                sqlx::query(
                    "UPDATE ip_history SET requests = requests + $1, last_seen = $2 \
                     WHERE device_id = $3 AND exit_name = $4 AND ip = $5",
                )
                .bind(d.requests as i64)
                .bind(now_ms())
                .bind(device_id)
                .bind(exit)
                .bind(ip)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    // --- rotations and IP history ------------------------------------------

    pub async fn insert_rotation(&self, r: &RotationRow) -> Result<(), StoreError> {
        on_pool!(self, |p| {
            let mut tx = p.begin_write().await?;
            sqlx::query(
                "INSERT INTO rotations (id, device_id, exit_name, cause, method, rungs, attempts, old_ip, new_ip, \
                 outcome, error, drain_ms, backend_ms, duration_ms, started_at, finished_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            )
            .bind(&r.id)
            .bind(&r.device_id)
            .bind(&r.exit)
            .bind(&r.cause)
            .bind(&r.method)
            .bind(serde_json::to_string(&r.rungs).unwrap_or_else(|_| "[]".into()))
            .bind(r.attempts)
            .bind(&r.old_ip)
            .bind(&r.new_ip)
            .bind(&r.outcome)
            .bind(&r.error)
            .bind(r.drain_ms)
            .bind(r.backend_ms)
            .bind(r.duration_ms)
            .bind(r.started_at)
            .bind(r.finished_at)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE exits SET last_rotation_at = $1 WHERE device_id = $2 AND name = $3",
            )
            .bind(r.finished_at)
            .bind(&r.device_id)
            .bind(&r.exit)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Latest rotations, newest first; of one device when given.
    pub async fn rotations(
        &self,
        device_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RotationRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = match device_id {
                Some(d) => {
                    sqlx::query(
                        "SELECT * FROM rotations WHERE device_id = $1 ORDER BY started_at DESC, id LIMIT $2",
                    )
                    .bind(d)
                    .bind(limit)
                    .fetch_all(p)
                    .await?
                }
                None => {
                    sqlx::query("SELECT * FROM rotations ORDER BY started_at DESC, id LIMIT $1")
                        .bind(limit)
                        .fetch_all(p)
                        .await?
                }
            };
            Ok(rows.iter().map(rotation_from).collect::<Result<_, _>>()?)
        })
    }

    /// The exit's last `n` distinct addresses, most recent first.
    pub async fn recent_ips(
        &self,
        device_id: &str,
        exit: &str,
        n: i64,
    ) -> Result<Vec<String>, StoreError> {
        on_pool!(self, |p| {
            Ok(sqlx::query_scalar(
                "SELECT ip FROM ip_history WHERE device_id = $1 AND exit_name = $2 \
                 ORDER BY last_seen DESC, ip LIMIT $3",
            )
            .bind(device_id)
            .bind(exit)
            .bind(n)
            .fetch_all(p)
            .await?)
        })
    }

    pub async fn ip_history(&self, device_id: &str, limit: i64) -> Result<Vec<IpRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT exit_name, ip, first_seen, last_seen, requests FROM ip_history \
                 WHERE device_id = $1 ORDER BY last_seen DESC, ip LIMIT $2",
            )
            .bind(device_id)
            .bind(limit)
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(IpRow {
                        exit: r.col("exit_name")?,
                        ip: r.col("ip")?,
                        first_seen: r.col("first_seen")?,
                        last_seen: r.col("last_seen")?,
                        requests: r.col("requests")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    // --- rotation links ----------------------------------------------------

    pub async fn insert_rotation_link(
        &self,
        id: &str,
        device_id: &str,
        exit: &str,
        token_hash: &str,
        min_interval_secs: i64,
    ) -> Result<RotationLinkRow, StoreError> {
        on_pool!(self, |p| {
            let now = now_ms();
            sqlx::query(
                "INSERT INTO rotation_links (id, device_id, exit_name, token_hash, min_interval_secs, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(device_id)
            .bind(exit)
            .bind(token_hash)
            .bind(min_interval_secs)
            .bind(now)
            .execute(p)
            .await?;
            Ok(RotationLinkRow {
                id: id.to_string(),
                device_id: device_id.to_string(),
                exit: exit.to_string(),
                min_interval_secs,
                last_used_at: None,
                uses: 0,
                created_at: now,
            })
        })
    }

    pub async fn rotation_links(
        &self,
        device_id: &str,
    ) -> Result<Vec<RotationLinkRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT id, device_id, exit_name, min_interval_secs, last_used_at, uses, created_at \
                 FROM rotation_links WHERE device_id = $1 ORDER BY created_at, id",
            )
            .bind(device_id)
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(RotationLinkRow {
                        id: r.col("id")?,
                        device_id: r.col("device_id")?,
                        exit: r.col("exit_name")?,
                        min_interval_secs: r.col("min_interval_secs")?,
                        last_used_at: r.col("last_used_at")?,
                        uses: r.col("uses")?,
                        created_at: r.col("created_at")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    pub async fn delete_rotation_link(&self, id: &str) -> Result<bool, StoreError> {
        on_pool!(self, |p| {
            let r = sqlx::query("DELETE FROM rotation_links WHERE id = $1")
                .bind(id)
                .execute(p)
                .await?;
            Ok(r.rows_affected() > 0)
        })
    }

    /// Spend one use of a link: a single conditional update, so concurrent
    /// requests cannot both pass the rate limit.
    /// Undo a granted use whose rotation could not start (the exit was
    /// busy, disabled or offline), so it neither counts nor blocks the
    /// link. No-op when another use came since.
    pub async fn refund_rotation_link(
        &self,
        token_hash: &str,
        used_at: i64,
        previous_use: Option<i64>,
    ) -> Result<(), StoreError> {
        on_pool!(self, |p| {
            sqlx::query(
                "UPDATE rotation_links SET last_used_at = $3, uses = uses - 1 \
                 WHERE token_hash = $1 AND last_used_at = $2",
            )
            .bind(token_hash)
            .bind(used_at)
            .bind(previous_use)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    pub async fn use_rotation_link(&self, token_hash: &str) -> Result<LinkUse, StoreError> {
        on_pool!(self, |p| {
            let now = now_ms();
            // Read before the conditional UPDATE: if another use slips in
            // between, that UPDATE fails its condition and nothing is lost.
            let previous_use: Option<i64> =
                sqlx::query_scalar("SELECT last_used_at FROM rotation_links WHERE token_hash = $1")
                    .bind(token_hash)
                    .fetch_optional(p)
                    .await?
                    .flatten();
            let row = sqlx::query(
                "UPDATE rotation_links SET last_used_at = $1, uses = uses + 1 \
                 WHERE token_hash = $2 AND (last_used_at IS NULL OR last_used_at + min_interval_secs * 1000 <= $1) \
                 RETURNING device_id, exit_name",
            )
            .bind(now)
            .bind(token_hash)
            .fetch_optional(p)
            .await?;
            if let Some(r) = row {
                return Ok(LinkUse::Granted {
                    device_id: r.col("device_id")?,
                    exit: r.col("exit_name")?,
                    used_at: now,
                    previous_use,
                });
            }
            let next: Option<i64> = sqlx::query_scalar(
                "SELECT last_used_at + min_interval_secs * 1000 FROM rotation_links WHERE token_hash = $1",
            )
            .bind(token_hash)
            .fetch_optional(p)
            .await?;
            Ok(match next {
                Some(at) => LinkUse::TooSoon {
                    retry_after_ms: (at - now).max(1),
                },
                None => LinkUse::Unknown,
            })
        })
    }

    // --- device settings ---------------------------------------------------

    pub async fn patch_device(&self, id: &str, patch: &DevicePatch) -> Result<bool, StoreError> {
        on_pool!(self, |p| {
            let mut tx = p.begin_write().await?;
            let exists: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
            if exists == 0 {
                return Ok(false);
            }
            if let Some(n) = &patch.name {
                sqlx::query("UPDATE devices SET name = $1 WHERE id = $2")
                    .bind(n)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(r) = &patch.region {
                sqlx::query("UPDATE devices SET region = $1 WHERE id = $2")
                    .bind(r)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(c) = &patch.country {
                sqlx::query("UPDATE devices SET country = $1 WHERE id = $2")
                    .bind(c.to_ascii_lowercase())
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(l) = &patch.labels {
                sqlx::query("UPDATE devices SET labels = $1 WHERE id = $2")
                    .bind(serde_json::to_string(l).unwrap_or_else(|_| "[]".into()))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(m) = patch.maintenance {
                sqlx::query("UPDATE devices SET maintenance = $1 WHERE id = $2")
                    .bind(m)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    pub async fn set_device_rotation(
        &self,
        id: &str,
        r: &DeviceRotation,
    ) -> Result<bool, StoreError> {
        on_pool!(self, |p| {
            let res = sqlx::query(
                "UPDATE devices SET rotation_enabled = $1, rotate_every_secs = $2, rotate_jitter_secs = $3, \
                 rotate_after_requests = $4 WHERE id = $5",
            )
            .bind(r.enabled)
            .bind(r.every_secs)
            .bind(r.jitter_secs)
            .bind(r.after_requests)
            .bind(id)
            .execute(p)
            .await?;
            Ok(res.rows_affected() > 0)
        })
    }

    pub async fn set_label_rotation(&self, policy: &LabelRotation) -> Result<(), StoreError> {
        on_pool!(self, |p| {
            sqlx::query(
                "INSERT INTO label_rotation (label, rotate_every_secs, rotate_jitter_secs, rotate_after_requests) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (label) DO UPDATE SET \
                 rotate_every_secs = excluded.rotate_every_secs, rotate_jitter_secs = excluded.rotate_jitter_secs, \
                 rotate_after_requests = excluded.rotate_after_requests",
            )
            .bind(&policy.label)
            .bind(policy.every_secs)
            .bind(policy.jitter_secs)
            .bind(policy.after_requests)
            .execute(p)
            .await?;
            Ok(())
        })
    }

    pub async fn delete_label_rotation(&self, label: &str) -> Result<bool, StoreError> {
        on_pool!(self, |p| {
            let r = sqlx::query("DELETE FROM label_rotation WHERE label = $1")
                .bind(label)
                .execute(p)
                .await?;
            Ok(r.rows_affected() > 0)
        })
    }

    pub async fn label_rotations(&self) -> Result<Vec<LabelRotation>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT label, rotate_every_secs, rotate_jitter_secs, rotate_after_requests \
                 FROM label_rotation ORDER BY label",
            )
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(LabelRotation {
                        label: r.col("label")?,
                        every_secs: r.col("rotate_every_secs")?,
                        jitter_secs: r.col("rotate_jitter_secs")?,
                        after_requests: r.col("rotate_after_requests")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    // --- telemetry ---------------------------------------------------------

    pub async fn insert_telemetry(
        &self,
        device_id: &str,
        hb: &Heartbeat,
        at: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self, |p| {
            let mut tx = p.begin_write().await?;
            for e in &hb.exits {
                let t = &e.telemetry;
                sqlx::query(
                    "INSERT INTO telemetry (device_id, exit_name, sampled_at, link_up, rssi_dbm, rsrp_dbm, rsrq_db, \
                     sinr_db, signal_bars, access_tech, band, operator, registration, cell_id, battery_pct, charging, \
                     temperature_dc, active_flows, load_centi) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
                )
                .bind(device_id)
                .bind(&e.name)
                .bind(at)
                .bind(e.link_up)
                .bind(t.rssi_dbm.map(i64::from))
                .bind(t.rsrp_dbm.map(i64::from))
                .bind(t.rsrq_db.map(f64::from))
                .bind(t.sinr_db.map(f64::from))
                .bind(t.signal_bars.map(i64::from))
                .bind(&t.access_tech)
                .bind(&t.band)
                .bind(&t.operator)
                .bind(t.registration.map(|r| r.as_str()))
                .bind(&t.cell_id)
                .bind(t.battery_pct.map(i64::from))
                .bind(t.charging)
                .bind(t.temperature_dc.map(i64::from))
                .bind(i64::from(hb.active_flows))
                .bind(i64::from(hb.load_centi))
                .execute(&mut *tx)
                .await?;
            }
            // The device's operator, as its first exit that knows one says.
            if let Some(op) = hb
                .exits
                .iter()
                .find_map(|e| e.telemetry.operator.as_deref())
            {
                sqlx::query("UPDATE devices SET operator = $1 WHERE id = $2 AND operator <> $1")
                    .bind(op)
                    .bind(device_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Samples of a device since `since_ms`, oldest first: the newest
    /// `limit` of them.
    pub async fn telemetry(
        &self,
        device_id: &str,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<TelemetryRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT * FROM telemetry WHERE device_id = $1 AND sampled_at >= $2 \
                 ORDER BY sampled_at DESC, exit_name DESC LIMIT $3",
            )
            .bind(device_id)
            .bind(since_ms)
            .bind(limit)
            .fetch_all(p)
            .await?;
            rows.iter()
                .rev()
                .map(|r| {
                    Ok(TelemetryRow {
                        exit: r.col("exit_name")?,
                        at: r.col("sampled_at")?,
                        link_up: r.col("link_up")?,
                        rssi_dbm: r.col("rssi_dbm")?,
                        rsrp_dbm: r.col("rsrp_dbm")?,
                        rsrq_db: r.col("rsrq_db")?,
                        sinr_db: r.col("sinr_db")?,
                        signal_bars: r.col("signal_bars")?,
                        access_tech: r.col("access_tech")?,
                        band: r.col("band")?,
                        operator: r.col("operator")?,
                        registration: r.col("registration")?,
                        cell_id: r.col("cell_id")?,
                        battery_pct: r.col("battery_pct")?,
                        charging: r.col("charging")?,
                        temperature_c: r
                            .col::<Option<i64>>("temperature_dc")?
                            .map(|t| t as f64 / 10.0),
                        active_flows: r.col("active_flows")?,
                        load: r.col::<i64>("load_centi")? as f64 / 100.0,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    /// Drop telemetry samples older than `before_ms`.
    pub async fn prune_telemetry(&self, before_ms: i64) -> Result<u64, StoreError> {
        on_pool!(self, |p| {
            let r = sqlx::query("DELETE FROM telemetry WHERE sampled_at < $1")
                .bind(before_ms)
                .execute(p)
                .await?;
            Ok(r.rows_affected())
        })
    }
}
