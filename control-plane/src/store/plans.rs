//! Plans, customer access settings, usage and the request log.

use serde::Serialize;

use super::{BeginWrite, Columns, Store, StoreError, conflict, now_ms};
use crate::limits::PlanLimits;
use crate::routing::Strategy;
use crate::usage::{LogMode, LogRow, UsageCounts, UsageKey};

/// A plan as stored: its limits, its exit pools, strategy and log mode.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlanRow {
    pub id: String,
    pub limits: PlanLimits,
    /// Exit pools (device labels); empty: every exit.
    pub allowed_labels: Vec<String>,
    pub strategy: Strategy,
    pub log_mode: LogMode,
    pub created_at: i64,
}

const PLAN_COLS: &str = "id, name, max_threads, new_conn_per_sec, bw_conn_bps, bw_customer_bps, quota_bytes, \
     allowed_labels, allowed_ports, strategy, log_mode, created_at";

fn plan_from(r: &impl Columns) -> Result<PlanRow, sqlx::Error> {
    let opt_u64 = |v: Option<i64>| v.map(|x| x.max(0) as u64);
    Ok(PlanRow {
        id: r.col("id")?,
        limits: PlanLimits {
            name: r.col("name")?,
            max_threads: r
                .col::<Option<i64>>("max_threads")?
                .map(|x| x.max(0) as u32),
            new_conn_per_sec: r
                .col::<Option<i64>>("new_conn_per_sec")?
                .map(|x| x.max(0) as u32),
            bw_conn_bps: opt_u64(r.col("bw_conn_bps")?),
            bw_customer_bps: opt_u64(r.col("bw_customer_bps")?),
            quota_bytes: opt_u64(r.col("quota_bytes")?),
            expires_at_ms: None,
            allowed_ports: r
                .col::<Option<String>>("allowed_ports")?
                .and_then(|t| serde_json::from_str(&t).ok()),
        },
        allowed_labels: serde_json::from_str(&r.col::<String>("allowed_labels")?)
            .unwrap_or_default(),
        strategy: Strategy::parse(&r.col::<String>("strategy")?).unwrap_or_default(),
        log_mode: LogMode::parse(&r.col::<String>("log_mode")?).unwrap_or_default(),
        created_at: r.col("created_at")?,
    })
}

impl PlanRow {
    /// What customers without a plan get: no limits, every exit.
    pub fn unlimited() -> Self {
        Self {
            id: String::new(),
            limits: PlanLimits::unlimited("none"),
            allowed_labels: Vec::new(),
            strategy: Strategy::default(),
            log_mode: LogMode::default(),
            created_at: 0,
        }
    }
}

/// Milliseconds at the start of the UTC month containing `ms`.
pub fn month_start_ms(ms: i64) -> i64 {
    use chrono::{Datelike, TimeZone, Utc};
    let t = Utc
        .timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(Utc::now);
    Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .single()
        .map(|m| m.timestamp_millis())
        .unwrap_or(0)
}

impl Store {
    // --- plans ---------------------------------------------------------------

    pub async fn insert_plan(&self, p: &PlanRow) -> Result<(), StoreError> {
        let l = &p.limits;
        on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO plans (id, name, max_threads, new_conn_per_sec, bw_conn_bps, bw_customer_bps, \
                 quota_bytes, allowed_labels, allowed_ports, strategy, log_mode, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(&p.id)
            .bind(&l.name)
            .bind(l.max_threads.map(i64::from))
            .bind(l.new_conn_per_sec.map(i64::from))
            .bind(l.bw_conn_bps.map(|x| x as i64))
            .bind(l.bw_customer_bps.map(|x| x as i64))
            .bind(l.quota_bytes.map(|x| x as i64))
            .bind(serde_json::to_string(&p.allowed_labels).unwrap_or_else(|_| "[]".into()))
            .bind(
                l.allowed_ports
                    .as_ref()
                    .map(|r| serde_json::to_string(r).unwrap_or_default()),
            )
            .bind(p.strategy.as_str())
            .bind(p.log_mode.as_str())
            .bind(p.created_at)
            .execute(pool)
            .await
            .map(drop)
            .map_err(|e| conflict(e, &format!("plan {}", l.name)))
        })
    }

    /// Overwrite every editable field of plan `p.id` (not `created_at`) in
    /// one statement; `Ok(false)` when no such plan exists,
    /// `Err(Conflict)` when another plan has the new name.
    pub async fn update_plan(&self, p: &PlanRow) -> Result<bool, StoreError> {
        let l = &p.limits;
        let n = on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE plans SET name = $2, max_threads = $3, new_conn_per_sec = $4, \
                 bw_conn_bps = $5, bw_customer_bps = $6, quota_bytes = $7, allowed_labels = $8, \
                 allowed_ports = $9, strategy = $10, log_mode = $11 WHERE id = $1",
            )
            .bind(&p.id)
            .bind(&l.name)
            .bind(l.max_threads.map(i64::from))
            .bind(l.new_conn_per_sec.map(i64::from))
            .bind(l.bw_conn_bps.map(|x| x as i64))
            .bind(l.bw_customer_bps.map(|x| x as i64))
            .bind(l.quota_bytes.map(|x| x as i64))
            .bind(serde_json::to_string(&p.allowed_labels).unwrap_or_else(|_| "[]".into()))
            .bind(
                l.allowed_ports
                    .as_ref()
                    .map(|r| serde_json::to_string(r).unwrap_or_default()),
            )
            .bind(p.strategy.as_str())
            .bind(p.log_mode.as_str())
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(|e| conflict(e, &format!("plan {}", l.name)))
        })?;
        Ok(n > 0)
    }

    pub async fn plans(&self) -> Result<Vec<PlanRow>, StoreError> {
        let sql = format!("SELECT {PLAN_COLS} FROM plans ORDER BY name");
        on_pool!(self, |p| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .fetch_all(p)
                .await?;
            Ok(rows.iter().map(plan_from).collect::<Result<_, _>>()?)
        })
    }

    /// A plan by id or name.
    pub async fn plan(&self, id_or_name: &str) -> Result<Option<PlanRow>, StoreError> {
        let sql = format!("SELECT {PLAN_COLS} FROM plans WHERE id = $1 OR name = $1");
        on_pool!(self, |p| {
            let row = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(id_or_name)
                .fetch_optional(p)
                .await?;
            Ok(row.as_ref().map(plan_from).transpose()?)
        })
    }

    /// Delete a plan nobody uses; `Err(Conflict)` while customers are on it.
    pub async fn delete_plan(&self, id: &str) -> Result<bool, StoreError> {
        let users: i64 = on_pool!(self, |p| sqlx::query_scalar(
            "SELECT COUNT(*) FROM customers WHERE plan_id = $1"
        )
        .bind(id)
        .fetch_one(p)
        .await?);
        if users > 0 {
            return Err(StoreError::Conflict(format!(
                "customers on plan {id} ({users}); move them first"
            )));
        }
        let n = on_pool!(self, |p| sqlx::query("DELETE FROM plans WHERE id = $1")
            .bind(id)
            .execute(p)
            .await?
            .rows_affected());
        Ok(n > 0)
    }

    /// Set a customer's plan, expiry and disabled flag (each `None` keeps
    /// the current value; `Some(None)` clears).
    pub async fn update_customer_access(
        &self,
        id: &str,
        plan_id: Option<Option<&str>>,
        expires_at: Option<Option<i64>>,
        disabled: Option<bool>,
    ) -> Result<bool, StoreError> {
        let mut found = false;
        if let Some(plan) = plan_id {
            found |= on_pool!(self, |p| sqlx::query(
                "UPDATE customers SET plan_id = $1 WHERE id = $2"
            )
            .bind(plan)
            .bind(id)
            .execute(p)
            .await?
            .rows_affected())
                > 0;
        }
        if let Some(exp) = expires_at {
            found |= on_pool!(self, |p| sqlx::query(
                "UPDATE customers SET expires_at = $1 WHERE id = $2"
            )
            .bind(exp)
            .bind(id)
            .execute(p)
            .await?
            .rows_affected())
                > 0;
        }
        if let Some(d) = disabled {
            found |= on_pool!(self, |p| sqlx::query(
                "UPDATE customers SET disabled = $1 WHERE id = $2"
            )
            .bind(d)
            .bind(id)
            .execute(p)
            .await?
            .rows_affected())
                > 0;
        }
        Ok(found)
    }

    // --- usage -----------------------------------------------------------------

    /// Add a batch of usage counts, in one transaction.
    pub async fn add_usage(&self, rows: &[(UsageKey, UsageCounts)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        on_pool!(self, |p| {
            let mut tx = p.begin_write().await?;
            for (k, c) in rows {
                sqlx::query(
                    "INSERT INTO usage_daily (day, customer_id, credential, device_id, exit_name, \
                     bytes_up, bytes_down, connections, requests) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                     ON CONFLICT (day, customer_id, credential, device_id, exit_name) DO UPDATE SET \
                     bytes_up = usage_daily.bytes_up + excluded.bytes_up, \
                     bytes_down = usage_daily.bytes_down + excluded.bytes_down, \
                     connections = usage_daily.connections + excluded.connections, \
                     requests = usage_daily.requests + excluded.requests",
                )
                .bind(k.day)
                .bind(&k.customer_id)
                .bind(&k.credential)
                .bind(&k.device_id)
                .bind(&k.exit)
                .bind(c.bytes_up as i64)
                .bind(c.bytes_down as i64)
                .bind(c.connections as i64)
                .bind(c.requests as i64)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Bytes (both directions) a customer used since `since_day`.
    pub async fn customer_bytes_since(
        &self,
        customer_id: &str,
        since_day: i64,
    ) -> Result<u64, StoreError> {
        let n: Option<i64> = on_pool!(self, |p| {
            sqlx::query_scalar(
            "SELECT CAST(SUM(bytes_up + bytes_down) AS BIGINT) FROM usage_daily WHERE customer_id = $1 AND day >= $2"
        )
        .bind(customer_id)
        .bind(since_day)
        .fetch_one(p)
        .await?
        });
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// Daily usage rows of a customer since `since_day`, summed over
    /// credentials and exits when `by_exit` is false.
    pub async fn customer_usage(
        &self,
        customer_id: &str,
        since_day: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT day, CAST(SUM(bytes_up) AS BIGINT) AS up, CAST(SUM(bytes_down) AS BIGINT) AS down, \
                 CAST(SUM(connections) AS BIGINT) AS conns, CAST(SUM(requests) AS BIGINT) AS reqs \
                 FROM usage_daily WHERE customer_id = $1 AND day >= $2 GROUP BY day ORDER BY day",
            )
            .bind(customer_id)
            .bind(since_day)
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok((
                        r.col::<i64>("day")?,
                        UsageCounts {
                            bytes_up: r.col::<i64>("up")?.max(0) as u64,
                            bytes_down: r.col::<i64>("down")?.max(0) as u64,
                            connections: r.col::<i64>("conns")?.max(0) as u64,
                            requests: r.col::<i64>("reqs")?.max(0) as u64,
                        },
                    ))
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    // --- request log ---------------------------------------------------------

    pub async fn insert_request_log(&self, rows: &[LogRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        on_pool!(self, |p| {
            let mut tx = p.begin_write().await?;
            for r in rows {
                sqlx::query(
                    "INSERT INTO request_log (started_at, customer_id, credential, device_id, exit_name, \
                     target_host, target_port, target_path, bytes_up, bytes_down, duration_ms, outcome, error) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                )
                .bind(r.started_at)
                .bind(&r.customer_id)
                .bind(&r.credential)
                .bind(&r.device_id)
                .bind(&r.exit)
                .bind(&r.target_host)
                .bind(r.target_port.map(i64::from))
                .bind(&r.target_path)
                .bind(r.bytes_up as i64)
                .bind(r.bytes_down as i64)
                .bind(r.duration_ms as i64)
                .bind(&r.outcome)
                .bind(&r.error)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Request-log rows, newest first; of one customer when given.
    pub async fn request_log(
        &self,
        customer_id: Option<&str>,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<LogRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT * FROM request_log WHERE ($1 IS NULL OR customer_id = $1) AND started_at >= $2 \
                 ORDER BY started_at DESC LIMIT $3",
            )
            .bind(customer_id)
            .bind(since_ms)
            .bind(limit)
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(LogRow {
                        started_at: r.col("started_at")?,
                        customer_id: r.col("customer_id")?,
                        credential: r.col("credential")?,
                        device_id: r.col("device_id")?,
                        exit: r.col("exit_name")?,
                        target_host: r.col("target_host")?,
                        target_port: r
                            .col::<Option<i64>>("target_port")?
                            .map(|x| x.clamp(0, 65535) as u16),
                        target_path: r.col("target_path")?,
                        bytes_up: r.col::<i64>("bytes_up")?.max(0) as u64,
                        bytes_down: r.col::<i64>("bytes_down")?.max(0) as u64,
                        duration_ms: r.col::<i64>("duration_ms")?.max(0) as u64,
                        outcome: r.col("outcome")?,
                        error: r.col("error")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    /// Delete request-log rows older than `before_ms`.
    pub async fn prune_request_log(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(on_pool!(self, |p| sqlx::query(
            "DELETE FROM request_log WHERE started_at < $1"
        )
        .bind(before_ms)
        .execute(p)
        .await?
        .rows_affected()))
    }
}

/// Today's UTC day number.
pub fn today() -> i64 {
    crate::usage::day_of(now_ms())
}
