//! Agent releases (`releases`, `release_chunks`), the updates sent to
//! devices (`device_updates`) and rolling updates (`rollouts`).
//!
//! Binaries are stored in the database rather than in a directory: several
//! control planes sharing one PostgreSQL database then serve the same
//! releases with nothing else to copy between them, and a backup of the
//! database is a backup of the releases. They are cut into
//! [`RELEASE_CHUNK`]-byte rows so that serving one never loads a whole
//! binary into memory, and no single row approaches a driver's limits.

use serde::{Deserialize, Serialize};

use super::{BeginWrite, Columns, Store, StoreError, conflict, now_ms};

/// Size of one stored piece of a release binary.
pub const RELEASE_CHUNK: usize = 1024 * 1024;

/// A published release (without its bytes).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReleaseRow {
    pub version: String,
    pub target: String,
    /// Hex SHA-256 of the binary.
    pub sha256: String,
    pub size: i64,
    /// Hex ed25519 signature over the manifest.
    pub signature: String,
    /// Hex public key that made the signature.
    pub key_id: String,
    pub created_at: i64,
}

fn release_from(r: &impl Columns) -> Result<ReleaseRow, sqlx::Error> {
    Ok(ReleaseRow {
        version: r.col("version")?,
        target: r.col("target")?,
        sha256: r.col("sha256")?,
        size: r.col("size")?,
        signature: r.col("signature")?,
        key_id: r.col("key_id")?,
        created_at: r.col("created_at")?,
    })
}

const RELEASE_COLS: &str = "version, target, sha256, size, signature, key_id, created_at";

/// One update sent to a device.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceUpdateRow {
    pub id: String,
    pub device_id: String,
    pub from_version: String,
    pub to_version: String,
    pub target: String,
    /// installing | restarting | committed | refused | failed | rolled_back
    pub status: String,
    pub message: String,
    pub rollout_id: Option<String>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

fn update_from(r: &impl Columns) -> Result<DeviceUpdateRow, sqlx::Error> {
    Ok(DeviceUpdateRow {
        id: r.col("id")?,
        device_id: r.col("device_id")?,
        from_version: r.col("from_version")?,
        to_version: r.col("to_version")?,
        target: r.col("target")?,
        status: r.col("status")?,
        message: r.col("message")?,
        rollout_id: r.col("rollout_id")?,
        started_at: r.col("started_at")?,
        finished_at: r.col("finished_at")?,
    })
}

const UPDATE_COLS: &str = "id, device_id, from_version, to_version, target, status, message, rollout_id, started_at, finished_at";

/// One device's place in a rollout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RolloutDevice {
    pub device_id: String,
    /// pending | updating | done | failed
    pub state: String,
    pub message: String,
}

/// A rolling update over the devices of a label.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RolloutRow {
    pub id: String,
    pub version: String,
    pub target: String,
    pub label: String,
    pub batch: i64,
    /// running | done | halted
    pub state: String,
    pub halted_reason: Option<String>,
    pub devices: Vec<RolloutDevice>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

fn rollout_from(r: &impl Columns) -> Result<RolloutRow, sqlx::Error> {
    let devices: String = r.col("devices")?;
    Ok(RolloutRow {
        id: r.col("id")?,
        version: r.col("version")?,
        target: r.col("target")?,
        label: r.col("label")?,
        batch: r.col("batch")?,
        state: r.col("state")?,
        halted_reason: r.col("halted_reason")?,
        devices: serde_json::from_str(&devices).unwrap_or_default(),
        created_at: r.col("created_at")?,
        finished_at: r.col("finished_at")?,
    })
}

const ROLLOUT_COLS: &str =
    "id, version, target, label, batch, state, halted_reason, devices, created_at, finished_at";

impl Store {
    /// Store a release and its binary in one transaction. `Conflict` when
    /// that version and target exist.
    pub async fn insert_release(&self, row: &ReleaseRow, data: &[u8]) -> Result<(), StoreError> {
        let what = format!("release {} for {}", row.version, row.target);
        on_pool!(self, |p| {
            let mut tx = p.begin_write().await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO releases ({RELEASE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            )))
            .bind(&row.version)
            .bind(&row.target)
            .bind(&row.sha256)
            .bind(row.size)
            .bind(&row.signature)
            .bind(&row.key_id)
            .bind(row.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| conflict(e, &what))?;
            for (seq, piece) in data.chunks(RELEASE_CHUNK).enumerate() {
                sqlx::query(
                    "INSERT INTO release_chunks (version, target, seq, data) VALUES ($1, $2, $3, $4)",
                )
                .bind(&row.version)
                .bind(&row.target)
                .bind(seq as i64)
                .bind(piece)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Every release, newest first.
    pub async fn releases(&self) -> Result<Vec<ReleaseRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {RELEASE_COLS} FROM releases ORDER BY created_at DESC, version, target"
            )))
            .fetch_all(p)
            .await?;
            Ok(rows.iter().map(release_from).collect::<Result<_, _>>()?)
        })
    }

    pub async fn release(
        &self,
        version: &str,
        target: &str,
    ) -> Result<Option<ReleaseRow>, StoreError> {
        on_pool!(self, |p| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {RELEASE_COLS} FROM releases WHERE version = $1 AND target = $2"
            )))
            .bind(version)
            .bind(target)
            .fetch_optional(p)
            .await?;
            Ok(row.as_ref().map(release_from).transpose()?)
        })
    }

    /// Piece `seq` of a release's binary.
    pub async fn release_chunk(
        &self,
        version: &str,
        target: &str,
        seq: i64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        on_pool!(self, |p| {
            Ok(sqlx::query_scalar(
                "SELECT data FROM release_chunks WHERE version = $1 AND target = $2 AND seq = $3",
            )
            .bind(version)
            .bind(target)
            .bind(seq)
            .fetch_optional(p)
            .await?)
        })
    }

    pub async fn insert_device_update(&self, row: &DeviceUpdateRow) -> Result<(), StoreError> {
        on_pool!(self, |p| {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO device_updates ({UPDATE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            )))
            .bind(&row.id)
            .bind(&row.device_id)
            .bind(&row.from_version)
            .bind(&row.to_version)
            .bind(&row.target)
            .bind(&row.status)
            .bind(&row.message)
            .bind(&row.rollout_id)
            .bind(row.started_at)
            .bind(row.finished_at)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// Set an update's status; `finished` stamps its end.
    pub async fn set_device_update(
        &self,
        id: &str,
        status: &str,
        message: &str,
        finished: bool,
    ) -> Result<(), StoreError> {
        let at = finished.then(now_ms);
        on_pool!(self, |p| {
            sqlx::query(
                "UPDATE device_updates SET status = $1, message = $2, finished_at = COALESCE($3, finished_at) WHERE id = $4",
            )
            .bind(status)
            .bind(message)
            .bind(at)
            .bind(id)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// A device's updates, newest first.
    pub async fn device_updates(
        &self,
        device_id: &str,
        limit: i64,
    ) -> Result<Vec<DeviceUpdateRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {UPDATE_COLS} FROM device_updates WHERE device_id = $1 \
                 ORDER BY started_at DESC, id DESC LIMIT $2"
            )))
            .bind(device_id)
            .bind(limit)
            .fetch_all(p)
            .await?;
            Ok(rows.iter().map(update_from).collect::<Result<_, _>>()?)
        })
    }

    pub async fn insert_rollout(&self, row: &RolloutRow) -> Result<(), StoreError> {
        let devices = serde_json::to_string(&row.devices).unwrap_or_else(|_| "[]".into());
        on_pool!(self, |p| {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO rollouts ({ROLLOUT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            )))
            .bind(&row.id)
            .bind(&row.version)
            .bind(&row.target)
            .bind(&row.label)
            .bind(row.batch)
            .bind(&row.state)
            .bind(&row.halted_reason)
            .bind(&devices)
            .bind(row.created_at)
            .bind(row.finished_at)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// Write a rollout's progress.
    pub async fn save_rollout(&self, row: &RolloutRow) -> Result<(), StoreError> {
        let devices = serde_json::to_string(&row.devices).unwrap_or_else(|_| "[]".into());
        on_pool!(self, |p| {
            sqlx::query(
                "UPDATE rollouts SET state = $1, halted_reason = $2, devices = $3, finished_at = $4 WHERE id = $5",
            )
            .bind(&row.state)
            .bind(&row.halted_reason)
            .bind(&devices)
            .bind(row.finished_at)
            .bind(&row.id)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    pub async fn rollout(&self, id: &str) -> Result<Option<RolloutRow>, StoreError> {
        on_pool!(self, |p| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {ROLLOUT_COLS} FROM rollouts WHERE id = $1"
            )))
            .bind(id)
            .fetch_optional(p)
            .await?;
            Ok(row.as_ref().map(rollout_from).transpose()?)
        })
    }

    /// Rollouts, newest first.
    pub async fn rollouts(&self) -> Result<Vec<RolloutRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {ROLLOUT_COLS} FROM rollouts ORDER BY created_at DESC, id DESC"
            )))
            .fetch_all(p)
            .await?;
            Ok(rows.iter().map(rollout_from).collect::<Result<_, _>>()?)
        })
    }
}
