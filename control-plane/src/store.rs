//! Persistent state (sqlx; SQLite in WAL mode is the embedded default).
//!
//! The only module that talks SQL. Queries stick to SQL that SQLite and
//! PostgreSQL both accept (`RETURNING`, `BIGINT` Unix-millisecond times,
//! `BOOLEAN`), and migrations live in a folder per database.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

mod fleet;
pub use fleet::*;

pub const DB_FILE: &str = "cellgate.db";
/// Customer ids look like `cus-0123456789ab`; usernames may not start so.
pub const CUSTOMER_ID_PREFIX: &str = "cus-";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("already exists: {0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

fn conflict(e: sqlx::Error, what: &str) -> StoreError {
    match e.as_database_error() {
        Some(d) if d.is_unique_violation() => StoreError::Conflict(what.to_string()),
        _ => StoreError::Db(e),
    }
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceRow {
    pub id: String,
    pub name: String,
    pub cert_fingerprint: String,
    pub disabled: bool,
    pub kind: String,
    pub model: String,
    pub hostname: String,
    pub agent_version: String,
    pub last_addr: Option<String>,
    pub last_seen_at: Option<i64>,
    pub connects: i64,
    pub created_at: i64,
    pub operator: String,
    pub region: String,
    pub labels: Vec<String>,
    pub maintenance: bool,
    pub rotation: DeviceRotation,
}

/// A device's own rotation settings (`None`: use the label policy).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DeviceRotation {
    pub enabled: bool,
    pub every_secs: Option<i64>,
    pub jitter_secs: Option<i64>,
    pub after_requests: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CustomerRow {
    pub id: String,
    pub username: String,
    #[serde(skip)]
    pub password_hash: String,
    pub disabled: bool,
    pub created_at: i64,
}

/// Fields a device reports when it connects.
#[derive(Debug, Clone, Default)]
pub struct DeviceSeen {
    pub kind: String,
    pub model: String,
    pub hostname: String,
    pub agent_version: String,
    pub operator: String,
    pub addr: String,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const DEVICE_COLS: &str = "id, name, cert_fingerprint, disabled, kind, model, hostname, agent_version, last_addr, last_seen_at, connects, created_at, \
     operator, region, labels, maintenance, rotation_enabled, rotate_every_secs, rotate_jitter_secs, rotate_after_requests";

fn device_from(r: &sqlx::sqlite::SqliteRow) -> Result<DeviceRow, sqlx::Error> {
    Ok(DeviceRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        cert_fingerprint: r.try_get("cert_fingerprint")?,
        disabled: r.try_get("disabled")?,
        kind: r.try_get("kind")?,
        model: r.try_get("model")?,
        hostname: r.try_get("hostname")?,
        agent_version: r.try_get("agent_version")?,
        last_addr: r.try_get("last_addr")?,
        last_seen_at: r.try_get("last_seen_at")?,
        connects: r.try_get("connects")?,
        created_at: r.try_get("created_at")?,
        operator: r.try_get("operator")?,
        region: r.try_get("region")?,
        labels: serde_json::from_str(&r.try_get::<String, _>("labels")?).unwrap_or_default(),
        maintenance: r.try_get("maintenance")?,
        rotation: DeviceRotation {
            enabled: r.try_get("rotation_enabled")?,
            every_secs: r.try_get("rotate_every_secs")?,
            jitter_secs: r.try_get("rotate_jitter_secs")?,
            after_requests: r.try_get("rotate_after_requests")?,
        },
    })
}

fn customer_from(r: &sqlx::sqlite::SqliteRow) -> Result<CustomerRow, sqlx::Error> {
    Ok(CustomerRow {
        id: r.try_get("id")?,
        username: r.try_get("username")?,
        password_hash: r.try_get("password_hash")?,
        disabled: r.try_get("disabled")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// Open (creating if needed) the database in `data_dir` and migrate it.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
        let url = format!("sqlite://{}", data_dir.join(DB_FILE).display());
        let opts = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // --- admin tokens ------------------------------------------------------

    pub async fn admin_token_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM admin_tokens")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn insert_admin_token(
        &self,
        id: &str,
        label: &str,
        hash: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO admin_tokens (id, label, token_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(label)
        .bind(hash)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn delete_admin_token(&self, hash: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM admin_tokens WHERE token_hash = $1")
            .bind(hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn admin_token_exists(&self, hash: &str) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM admin_tokens WHERE token_hash = $1")
            .bind(hash)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    // --- enrollment --------------------------------------------------------

    pub async fn insert_enroll_token(
        &self,
        id: &str,
        name: &str,
        hash: &str,
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO enroll_tokens (id, name, token_hash, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(name)
        .bind(hash)
        .bind(now_ms())
        .bind(expires_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Spend a token and create its device in one transaction. Returns the
    /// device's name, or `None` when the token is unknown, used or expired:
    /// the conditional update makes a token work exactly once even when two
    /// agents race with it.
    pub async fn enroll_device(
        &self,
        token_hash: &str,
        device_id: &str,
        cert_fingerprint: &str,
        seen: &DeviceSeen,
    ) -> Result<Option<String>, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let name: Option<String> = sqlx::query_scalar(
            "UPDATE enroll_tokens SET used_at = $1, device_id = $2 \
             WHERE token_hash = $3 AND used_at IS NULL AND expires_at > $1 RETURNING name",
        )
        .bind(now)
        .bind(device_id)
        .bind(token_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(name) = name else {
            return Ok(None);
        };
        sqlx::query(
            "INSERT INTO devices (id, name, cert_fingerprint, kind, model, hostname, agent_version, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(device_id)
        .bind(&name)
        .bind(cert_fingerprint)
        .bind(&seen.kind)
        .bind(&seen.model)
        .bind(&seen.hostname)
        .bind(&seen.agent_version)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| conflict(e, "device"))?;
        tx.commit().await?;
        Ok(Some(name))
    }

    // --- devices -----------------------------------------------------------

    pub async fn device_by_fingerprint(&self, fp: &str) -> Result<Option<DeviceRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {DEVICE_COLS} FROM devices WHERE cert_fingerprint = $1"
        )))
        .bind(fp)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(device_from).transpose()?)
    }

    pub async fn device(&self, id: &str) -> Result<Option<DeviceRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {DEVICE_COLS} FROM devices WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(device_from).transpose()?)
    }

    pub async fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {DEVICE_COLS} FROM devices ORDER BY created_at, id"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(device_from).collect::<Result<_, _>>()?)
    }

    pub async fn set_device_disabled(&self, id: &str, disabled: bool) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE devices SET disabled = $1 WHERE id = $2")
            .bind(disabled)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn delete_device(&self, id: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM devices WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Record a (re)connection.
    pub async fn device_connected(&self, id: &str, seen: &DeviceSeen) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE devices SET kind = $1, model = $2, hostname = $3, agent_version = $4, last_addr = $5, \
             last_seen_at = $6, connects = connects + 1, operator = $7 WHERE id = $8",
        )
        .bind(&seen.kind)
        .bind(&seen.model)
        .bind(&seen.hostname)
        .bind(&seen.agent_version)
        .bind(&seen.addr)
        .bind(now_ms())
        .bind(&seen.operator)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn device_seen(&self, id: &str, addr: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE devices SET last_seen_at = $1, last_addr = $2 WHERE id = $3")
            .bind(now_ms())
            .bind(addr)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // --- customers ---------------------------------------------------------

    pub async fn insert_customer(
        &self,
        id: &str,
        username: &str,
        password_hash: &str,
    ) -> Result<CustomerRow, StoreError> {
        let now = now_ms();
        sqlx::query("INSERT INTO customers (id, username, password_hash, created_at) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(username)
            .bind(password_hash)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(|e| conflict(e, &format!("customer {username}")))?;
        Ok(CustomerRow {
            id: id.to_string(),
            username: username.to_string(),
            password_hash: password_hash.to_string(),
            disabled: false,
            created_at: now,
        })
    }

    pub async fn set_customer_password(
        &self,
        username: &str,
        password_hash: &str,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE customers SET password_hash = $1 WHERE username = $2")
            .bind(password_hash)
            .bind(username)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn customers(&self) -> Result<Vec<CustomerRow>, StoreError> {
        let rows = sqlx::query("SELECT id, username, password_hash, disabled, created_at FROM customers ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(customer_from).collect::<Result<_, _>>()?)
    }

    pub async fn customer_by_username(
        &self,
        username: &str,
    ) -> Result<Option<CustomerRow>, StoreError> {
        let row = sqlx::query("SELECT id, username, password_hash, disabled, created_at FROM customers WHERE username = $1")
            .bind(username)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(customer_from).transpose()?)
    }

    /// Delete by id (`cus-…`) or else by username; returns the deleted
    /// username. Usernames cannot start with `cus-`, so one call never
    /// matches two customers.
    pub async fn delete_customer(&self, id_or_name: &str) -> Result<Option<String>, StoreError> {
        let sql = if id_or_name.starts_with(CUSTOMER_ID_PREFIX) {
            "DELETE FROM customers WHERE id = $1 RETURNING username"
        } else {
            "DELETE FROM customers WHERE username = $1 RETURNING username"
        };
        let name: Option<String> = sqlx::query_scalar(sql)
            .bind(id_or_name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("cg-store-{}", rand::random::<u64>()));
        (Store::open(&dir).await.unwrap(), dir)
    }

    #[tokio::test]
    async fn token_works_once_and_not_after_expiry() {
        let (s, dir) = store().await;
        s.insert_enroll_token("t1", "pi-01", "h1", now_ms() + 60_000)
            .await
            .unwrap();
        s.insert_enroll_token("t2", "pi-02", "h2", now_ms() - 1)
            .await
            .unwrap();
        let seen = DeviceSeen::default();
        assert_eq!(
            s.enroll_device("h1", "dev-a", "fp-a", &seen)
                .await
                .unwrap()
                .as_deref(),
            Some("pi-01")
        );
        assert_eq!(
            s.enroll_device("h1", "dev-b", "fp-b", &seen).await.unwrap(),
            None
        );
        assert_eq!(
            s.enroll_device("h2", "dev-c", "fp-c", &seen).await.unwrap(),
            None
        );
        assert_eq!(
            s.enroll_device("nope", "dev-d", "fp-d", &seen)
                .await
                .unwrap(),
            None
        );
        assert_eq!(s.devices().await.unwrap().len(), 1);
        let d = s.device_by_fingerprint("fp-a").await.unwrap().unwrap();
        assert_eq!(d.id, "dev-a");
        assert!(s.set_device_disabled("dev-a", true).await.unwrap());
        assert!(s.device("dev-a").await.unwrap().unwrap().disabled);
        assert!(s.delete_device("dev-a").await.unwrap());
        assert!(!s.delete_device("dev-a").await.unwrap());
        s.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn customers_are_unique() {
        let (s, dir) = store().await;
        s.insert_customer("c1", "alice", "$argon2id$x")
            .await
            .unwrap();
        assert!(matches!(
            s.insert_customer("c2", "alice", "x").await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(
            s.customer_by_username("alice").await.unwrap().unwrap().id,
            "c1"
        );
        assert_eq!(
            s.delete_customer("alice").await.unwrap().as_deref(),
            Some("alice")
        );
        assert!(s.customer_by_username("alice").await.unwrap().is_none());
        // An id deletes that customer only, never a username equal to it.
        s.insert_customer("cus-000000000001", "carol", "x")
            .await
            .unwrap();
        s.insert_customer("cus-000000000002", "dave", "x")
            .await
            .unwrap();
        assert_eq!(
            s.delete_customer("cus-000000000001")
                .await
                .unwrap()
                .as_deref(),
            Some("carol")
        );
        assert!(s.customer_by_username("dave").await.unwrap().is_some());
        assert!(!crate::api::valid_username("cus-000000000002"));
        s.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
