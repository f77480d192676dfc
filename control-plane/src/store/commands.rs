//! Device commands and their status.

use serde::Serialize;

use super::{Columns, Store, StoreError, conflict, now_ms};

/// One device command. `status` is pending, delivered, succeeded, failed or
/// expired; `channel` is how it was sent (quic or mqtt).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CommandRow {
    pub id: String,
    pub device_id: String,
    pub command: String,
    /// The command as JSON (the MQTT payload).
    pub payload: serde_json::Value,
    pub status: String,
    pub channel: Option<String>,
    pub message: String,
    pub detail: Option<serde_json::Value>,
    pub created_at: i64,
    pub expires_at: i64,
    pub delivered_at: Option<i64>,
    pub finished_at: Option<i64>,
}

impl CommandRow {
    pub fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "expired")
    }
}

const COLUMNS: &str = "id, device_id, command, payload, status, channel, message, detail, \
                       created_at, expires_at, delivered_at, finished_at";

fn json_col(text: Option<String>) -> Option<serde_json::Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

fn command_from(r: &impl Columns) -> Result<CommandRow, sqlx::Error> {
    Ok(CommandRow {
        id: r.col("id")?,
        device_id: r.col("device_id")?,
        command: r.col("command")?,
        payload: json_col(Some(r.col("payload")?)).unwrap_or(serde_json::Value::Null),
        status: r.col("status")?,
        channel: r.col("channel")?,
        message: r.col("message")?,
        detail: json_col(r.col("detail")?),
        created_at: r.col("created_at")?,
        expires_at: r.col("expires_at")?,
        delivered_at: r.col("delivered_at")?,
        finished_at: r.col("finished_at")?,
    })
}

impl Store {
    /// Record a new command; `Err(Conflict)` when the id exists.
    pub async fn insert_command(&self, c: &CommandRow) -> Result<(), StoreError> {
        let payload = c.payload.to_string();
        on_pool!(self, |p| sqlx::query(
            "INSERT INTO device_commands (id, device_id, command, payload, status, channel, \
             message, created_at, expires_at, delivered_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        )
        .bind(&c.id)
        .bind(&c.device_id)
        .bind(&c.command)
        .bind(&payload)
        .bind(&c.status)
        .bind(&c.channel)
        .bind(&c.message)
        .bind(c.created_at)
        .bind(c.expires_at)
        .bind(c.delivered_at)
        .execute(p)
        .await
        .map(drop)
        .map_err(|e| conflict(e, &format!("command {}", c.id))))
    }

    pub async fn command(&self, id: &str) -> Result<Option<CommandRow>, StoreError> {
        on_pool!(self, |p| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM device_commands WHERE id = $1"
            )))
            .bind(id)
            .fetch_optional(p)
            .await?;
            Ok(row.as_ref().map(command_from).transpose()?)
        })
    }

    /// A device's commands, newest first.
    pub async fn device_commands(
        &self,
        device_id: &str,
        limit: i64,
    ) -> Result<Vec<CommandRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM device_commands WHERE device_id = $1 \
                 ORDER BY created_at DESC, id DESC LIMIT $2"
            )))
            .bind(device_id)
            .bind(limit)
            .fetch_all(p)
            .await?;
            Ok(rows.iter().map(command_from).collect::<Result<_, _>>()?)
        })
    }

    /// Mark a command sent on `channel`, unless it already has an outcome.
    pub async fn command_delivered(&self, id: &str, channel: &str) -> Result<(), StoreError> {
        on_pool!(self, |p| {
            sqlx::query(
                "UPDATE device_commands SET status = 'delivered', channel = $2, \
                 delivered_at = $3 WHERE id = $1 AND status = 'pending'",
            )
            .bind(id)
            .bind(channel)
            .bind(now_ms())
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// Record a command's outcome. A late result overrides `expired` (the
    /// device did run it) but never another result: the first one stands.
    pub async fn command_finished(
        &self,
        id: &str,
        status: &str,
        message: &str,
        detail: Option<&serde_json::Value>,
    ) -> Result<bool, StoreError> {
        let detail = detail.map(|d| d.to_string());
        let n = on_pool!(self, |p| {
            sqlx::query(
            "UPDATE device_commands SET status = $2, message = $3, detail = $4, finished_at = $5 \
             WHERE id = $1 AND status IN ('pending', 'delivered', 'expired')"
        )
        .bind(id)
        .bind(status)
        .bind(message)
        .bind(&detail)
        .bind(now_ms())
        .execute(p)
        .await?
        .rows_affected()
        });
        Ok(n > 0)
    }

    /// Expire commands without an outcome past their deadline.
    pub async fn expire_commands(&self, now: i64) -> Result<u64, StoreError> {
        on_pool!(self, |p| Ok(sqlx::query(
            "UPDATE device_commands SET status = 'expired', finished_at = $1, \
             message = 'no result before the command expired' \
             WHERE status IN ('pending', 'delivered') AND expires_at < $1"
        )
        .bind(now)
        .execute(p)
        .await?
        .rows_affected()))
    }
}
