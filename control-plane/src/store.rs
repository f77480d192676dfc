//! Persistent state (sqlx): SQLite in WAL mode is the embedded default,
//! PostgreSQL lets several control planes share one database.
//!
//! The only module that talks SQL. Queries stick to SQL that SQLite and
//! PostgreSQL both accept (`$n` placeholders, `RETURNING`, `BIGINT`
//! Unix-millisecond times, `BOOLEAN`, `DOUBLE PRECISION`,
//! `ON CONFLICT … DO UPDATE SET x = excluded.x`), and migrations live in a
//! folder per database with the same schema.
//!
//! Glossary:
//! - **backend**: which database a URL names ([`Backend`]).
//! - **pool**: the backend's own sqlx pool. sqlx's `Any` driver would hide
//!   the two behind one type, but in sqlx 0.9 it cannot read SQLite
//!   `BOOLEAN` columns, so each backend keeps its native driver and
//!   `on_pool!` compiles every query once per backend.
//! - **cell**: a Rust type both drivers decode (`Cell`); row mappers read
//!   columns through `Columns`, so a type only one backend knows is a
//!   compile error rather than a runtime surprise on the other.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Decode, Postgres, Sqlite, Type};

use crate::config::Config;

/// Run `$body` with `$p` bound to the store's native pool. The body is
/// compiled once per backend, so both drivers type-check every query.
macro_rules! on_pool {
    ($store:expr, |$p:ident| $body:expr) => {
        match &$store.pool {
            $crate::store::Pool::Sqlite($p) => $body,
            $crate::store::Pool::Postgres($p) => $body,
        }
    };
}

/// Begin a transaction that will write. On SQLite it takes the write lock
/// at once (`BEGIN IMMEDIATE`): a deferred transaction that reads first
/// and writes later fails with "database is locked" at once, without
/// waiting out the busy timeout, whenever another connection wrote in
/// between. PostgreSQL needs nothing special.
pub(crate) trait BeginWrite {
    type Db: sqlx::Database;
    fn begin_write(
        &self,
    ) -> impl std::future::Future<Output = Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error>>
    + Send;
}

impl BeginWrite for SqlitePool {
    type Db = Sqlite;
    fn begin_write(
        &self,
    ) -> impl std::future::Future<Output = Result<sqlx::Transaction<'static, Sqlite>, sqlx::Error>> + Send
    {
        self.begin_with("BEGIN IMMEDIATE")
    }
}

impl BeginWrite for PgPool {
    type Db = Postgres;
    fn begin_write(
        &self,
    ) -> impl std::future::Future<Output = Result<sqlx::Transaction<'static, Postgres>, sqlx::Error>>
    + Send {
        self.begin()
    }
}

mod access;
mod accounts;
mod commands;
mod fleet;
mod plans;
mod ports;
mod releases;
pub use access::*;
pub use accounts::*;
pub use commands::*;
pub use fleet::*;
pub use plans::*;
pub use ports::*;
pub use releases::*;

/// The SQLite file in the data directory when no `database_url` is set.
pub const DB_FILE: &str = "cellgate.db";
/// SQLite serialises writers, so a few connections suffice.
const SQLITE_MAX_CONNECTIONS: u32 = 4;
/// PostgreSQL pool size unless `database_max_connections` says otherwise.
const POSTGRES_MAX_CONNECTIONS: u32 = 10;
/// How long opening the store waits for PostgreSQL to accept a connection.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
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
    #[error(
        "unsupported database URL {0:?}: use sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE"
    )]
    UnsupportedUrl(String),
}

fn conflict(e: sqlx::Error, what: &str) -> StoreError {
    match e.as_database_error() {
        Some(d) if d.is_unique_violation() => StoreError::Conflict(what.to_string()),
        _ => StoreError::Db(e),
    }
}

/// The database behind a URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a URL names by its scheme: `sqlite:` or `postgres:` /
    /// `postgresql:`.
    pub fn of_url(url: &str) -> Option<Self> {
        let scheme = url.split_once(':')?.0.to_ascii_lowercase();
        match scheme.as_str() {
            "sqlite" => Some(Self::Sqlite),
            "postgres" | "postgresql" => Some(Self::Postgres),
            _ => None,
        }
    }
}

/// A database URL fit for logs: the password in the user part
/// (`user:PASSWORD@host`) and any `password=` query parameter become `***`.
pub fn redacted_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let mut out = String::with_capacity(url.len());
    if let Some(s) = scheme {
        out.push_str(s);
        out.push_str("://");
    }
    // The authority ends at the first '/', '?' or '#'; its user part at the
    // last '@' (a raw '@' in a password is not percent-encoded by everyone).
    // Without a scheme the text is taken as an authority too, so a URL that
    // lost its `postgres://` still hides its password.
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            match user_info.split_once(':') {
                Some((user, _password)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str(user_info),
            }
            out.push('@');
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    match tail.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            out.push_str(&params.join("&"));
            if let Some(f) = fragment {
                out.push('#');
                out.push_str(f);
            }
        }
        None => out.push_str(tail),
    }
    out
}

/// One backend's native pool (see the module documentation).
#[derive(Clone)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

/// A Rust type both backends decode from a column.
pub(crate) trait Cell:
    for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}

impl<T> Cell for T where
    T: for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}

/// Reading a named column from a row of either backend.
pub(crate) trait Columns {
    fn col<T: Cell>(&self, name: &str) -> Result<T, sqlx::Error>;
}

impl Columns for SqliteRow {
    fn col<T: Cell>(&self, name: &str) -> Result<T, sqlx::Error> {
        sqlx::Row::try_get(self, name)
    }
}

impl Columns for PgRow {
    fn col<T: Cell>(&self, name: &str) -> Result<T, sqlx::Error> {
        sqlx::Row::try_get(self, name)
    }
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
    /// ISO 3166-1 alpha-2, lowercase; set by an administrator.
    pub country: String,
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
    pub plan_id: Option<String>,
    /// The customer's access ends then (Unix ms), whatever the plan.
    pub expires_at: Option<i64>,
    /// A sub-user's parent: limits and quota are the parent's.
    pub parent_id: Option<String>,
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
     operator, region, country, labels, maintenance, rotation_enabled, rotate_every_secs, rotate_jitter_secs, rotate_after_requests";

fn device_from(r: &impl Columns) -> Result<DeviceRow, sqlx::Error> {
    Ok(DeviceRow {
        id: r.col("id")?,
        name: r.col("name")?,
        cert_fingerprint: r.col("cert_fingerprint")?,
        disabled: r.col("disabled")?,
        kind: r.col("kind")?,
        model: r.col("model")?,
        hostname: r.col("hostname")?,
        agent_version: r.col("agent_version")?,
        last_addr: r.col("last_addr")?,
        last_seen_at: r.col("last_seen_at")?,
        connects: r.col("connects")?,
        created_at: r.col("created_at")?,
        operator: r.col("operator")?,
        region: r.col("region")?,
        country: r.col("country")?,
        labels: serde_json::from_str(&r.col::<String>("labels")?).unwrap_or_default(),
        maintenance: r.col("maintenance")?,
        rotation: DeviceRotation {
            enabled: r.col("rotation_enabled")?,
            every_secs: r.col("rotate_every_secs")?,
            jitter_secs: r.col("rotate_jitter_secs")?,
            after_requests: r.col("rotate_after_requests")?,
        },
    })
}

fn customer_from(r: &impl Columns) -> Result<CustomerRow, sqlx::Error> {
    Ok(CustomerRow {
        id: r.col("id")?,
        username: r.col("username")?,
        password_hash: r.col("password_hash")?,
        disabled: r.col("disabled")?,
        created_at: r.col("created_at")?,
        plan_id: r.col("plan_id")?,
        expires_at: r.col("expires_at")?,
        parent_id: r.col("parent_id")?,
    })
}

impl Store {
    /// Open the database the configuration names (`database_url`, else
    /// SQLite [`DB_FILE`] in `data_dir`, created with its directory) and
    /// bring its schema up to date.
    pub async fn open(cfg: &Config) -> Result<Self, StoreError> {
        match &cfg.database_url {
            Some(url) => Self::connect(url, cfg.database_max_connections).await,
            None => {
                std::fs::create_dir_all(&cfg.data_dir)
                    .map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
                let opts = SqliteConnectOptions::new().filename(cfg.data_dir.join(DB_FILE));
                Self::open_sqlite(opts, cfg.database_max_connections).await
            }
        }
    }

    /// Open `url` (`sqlite://PATH` or `postgres://USER:PASSWORD@HOST:PORT/DB`)
    /// and bring its schema up to date. `max_connections` defaults to 4 for
    /// SQLite and 10 for PostgreSQL.
    pub async fn connect(url: &str, max_connections: Option<u32>) -> Result<Self, StoreError> {
        match Backend::of_url(url) {
            Some(Backend::Sqlite) => {
                let opts = SqliteConnectOptions::from_str(url)?;
                let file = opts.get_filename();
                if let Some(dir) = file.parent()
                    && !dir.as_os_str().is_empty()
                    && file != Path::new(":memory:")
                {
                    std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
                }
                Self::open_sqlite(opts, max_connections).await
            }
            Some(Backend::Postgres) => {
                // synchronous_commit stays at the server's default (on): an
                // acknowledged write survives a database crash. Notices
                // ("relation … already exists, skipping" at every migration
                // check) would otherwise be logged at info level.
                let opts = PgConnectOptions::from_str(url)?
                    .application_name("cellgate")
                    .options([("client_min_messages", "warning")]);
                // One plain connection first: a pool retries until its
                // acquire timeout and then reports only that, while this
                // says why (refused, wrong password, no such database).
                let probe =
                    tokio::time::timeout(PG_CONNECT_TIMEOUT, PgConnection::connect_with(&opts))
                        .await
                        .map_err(|_| {
                            sqlx::Error::Io(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!(
                                    "no connection to PostgreSQL within {PG_CONNECT_TIMEOUT:?}"
                                ),
                            ))
                        })??;
                probe.close().await?;
                let pool = PgPoolOptions::new()
                    .max_connections(max_connections.unwrap_or(POSTGRES_MAX_CONNECTIONS))
                    .connect_with(opts)
                    .await?;
                // Concurrent starts of several control planes are safe: the
                // migrator holds an advisory lock while it runs.
                sqlx::migrate!("migrations/postgres").run(&pool).await?;
                Ok(Self {
                    pool: Pool::Postgres(pool),
                })
            }
            None => Err(StoreError::UnsupportedUrl(redacted_url(url))),
        }
    }

    async fn open_sqlite(
        opts: SqliteConnectOptions,
        max_connections: Option<u32>,
    ) -> Result<Self, StoreError> {
        let opts = opts
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.unwrap_or(SQLITE_MAX_CONNECTIONS))
            .connect_with(opts)
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(Self {
            pool: Pool::Sqlite(pool),
        })
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    pub async fn close(&self) {
        on_pool!(self, |p| p.close().await)
    }

    // --- admin tokens ------------------------------------------------------

    pub async fn admin_token_count(&self) -> Result<i64, StoreError> {
        let n: i64 = on_pool!(self, |p| sqlx::query_scalar(
            "SELECT COUNT(*) FROM admin_tokens"
        )
        .fetch_one(p)
        .await?);
        Ok(n)
    }

    pub async fn insert_admin_token(
        &self,
        id: &str,
        label: &str,
        hash: &str,
    ) -> Result<(), StoreError> {
        on_pool!(self, |p| sqlx::query(
            "INSERT INTO admin_tokens (id, label, token_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(label)
        .bind(hash)
        .bind(now_ms())
        .execute(p)
        .await
        .map(drop)?);
        Ok(())
    }

    pub async fn delete_admin_token(&self, hash: &str) -> Result<(), StoreError> {
        on_pool!(self, |p| sqlx::query(
            "DELETE FROM admin_tokens WHERE token_hash = $1"
        )
        .bind(hash)
        .execute(p)
        .await
        .map(drop)?);
        Ok(())
    }

    pub async fn admin_token_exists(&self, hash: &str) -> Result<bool, StoreError> {
        let n: i64 = on_pool!(self, |p| sqlx::query_scalar(
            "SELECT COUNT(*) FROM admin_tokens WHERE token_hash = $1"
        )
        .bind(hash)
        .fetch_one(p)
        .await?);
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
        on_pool!(self, |p| {
            sqlx::query(
            "INSERT INTO enroll_tokens (id, name, token_hash, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(name)
        .bind(hash)
        .bind(now_ms())
        .bind(expires_at_ms)
        .execute(p)
        .await
        .map(drop)?
        });
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
        on_pool!(self, |p| {
            let mut tx = p.begin_write().await?;
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
        })
    }

    // --- devices -----------------------------------------------------------

    pub async fn device_by_fingerprint(&self, fp: &str) -> Result<Option<DeviceRow>, StoreError> {
        on_pool!(self, |p| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {DEVICE_COLS} FROM devices WHERE cert_fingerprint = $1"
            )))
            .bind(fp)
            .fetch_optional(p)
            .await?;
            Ok(row.as_ref().map(device_from).transpose()?)
        })
    }

    pub async fn device(&self, id: &str) -> Result<Option<DeviceRow>, StoreError> {
        on_pool!(self, |p| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {DEVICE_COLS} FROM devices WHERE id = $1"
            )))
            .bind(id)
            .fetch_optional(p)
            .await?;
            Ok(row.as_ref().map(device_from).transpose()?)
        })
    }

    pub async fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {DEVICE_COLS} FROM devices ORDER BY created_at, id"
            )))
            .fetch_all(p)
            .await?;
            Ok(rows.iter().map(device_from).collect::<Result<_, _>>()?)
        })
    }

    pub async fn set_device_disabled(&self, id: &str, disabled: bool) -> Result<bool, StoreError> {
        let n = on_pool!(self, |p| sqlx::query(
            "UPDATE devices SET disabled = $1 WHERE id = $2"
        )
        .bind(disabled)
        .bind(id)
        .execute(p)
        .await?
        .rows_affected());
        Ok(n > 0)
    }

    pub async fn delete_device(&self, id: &str) -> Result<bool, StoreError> {
        let n = on_pool!(self, |p| sqlx::query("DELETE FROM devices WHERE id = $1")
            .bind(id)
            .execute(p)
            .await?
            .rows_affected());
        Ok(n > 0)
    }

    /// Record a (re)connection.
    pub async fn device_connected(&self, id: &str, seen: &DeviceSeen) -> Result<(), StoreError> {
        on_pool!(self, |p| {
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
        .execute(p)
        .await
        .map(drop)?
        });
        Ok(())
    }

    pub async fn device_seen(&self, id: &str, addr: &str) -> Result<(), StoreError> {
        on_pool!(self, |p| sqlx::query(
            "UPDATE devices SET last_seen_at = $1, last_addr = $2 WHERE id = $3"
        )
        .bind(now_ms())
        .bind(addr)
        .bind(id)
        .execute(p)
        .await
        .map(drop)?);
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
        on_pool!(self, |p| {
            sqlx::query(
            "INSERT INTO customers (id, username, password_hash, created_at) VALUES ($1, $2, $3, $4)"
        )
        .bind(id)
        .bind(username)
        .bind(password_hash)
        .bind(now)
        .execute(p)
        .await
        .map(drop)
        .map_err(|e| conflict(e, &format!("customer {username}")))?
        });
        Ok(CustomerRow {
            id: id.to_string(),
            username: username.to_string(),
            password_hash: password_hash.to_string(),
            disabled: false,
            created_at: now,
            plan_id: None,
            expires_at: None,
            parent_id: None,
        })
    }

    pub async fn set_customer_password(
        &self,
        username: &str,
        password_hash: &str,
    ) -> Result<bool, StoreError> {
        let n = on_pool!(self, |p| sqlx::query(
            "UPDATE customers SET password_hash = $1 WHERE username = $2"
        )
        .bind(password_hash)
        .bind(username)
        .execute(p)
        .await?
        .rows_affected());
        Ok(n > 0)
    }

    pub async fn customers(&self) -> Result<Vec<CustomerRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT id, username, password_hash, disabled, created_at, plan_id, expires_at, parent_id FROM customers ORDER BY created_at, id",
            )
            .fetch_all(p)
            .await?;
            Ok(rows.iter().map(customer_from).collect::<Result<_, _>>()?)
        })
    }

    pub async fn customer_by_username(
        &self,
        username: &str,
    ) -> Result<Option<CustomerRow>, StoreError> {
        on_pool!(self, |p| {
            let row = sqlx::query(
                "SELECT id, username, password_hash, disabled, created_at, plan_id, expires_at, parent_id FROM customers WHERE username = $1",
            )
            .bind(username)
            .fetch_optional(p)
            .await?;
            Ok(row.as_ref().map(customer_from).transpose()?)
        })
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
        let name: Option<String> = on_pool!(self, |p| sqlx::query_scalar(sql)
            .bind(id_or_name)
            .fetch_optional(p)
            .await?);
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("cg-store-{}", rand::random::<u64>()));
        let cfg = Config {
            data_dir: dir.clone(),
            ..Config::default()
        };
        let s = Store::open(&cfg).await.unwrap();
        assert_eq!(s.backend(), Backend::Sqlite);
        assert!(dir.join(DB_FILE).is_file());
        (s, dir)
    }

    #[test]
    fn passwords_never_reach_logs() {
        let cases = [
            (
                "postgres://cellgate:s3cret@db.example.net:5432/cellgate",
                "postgres://cellgate:***@db.example.net:5432/cellgate",
            ),
            (
                "postgresql://u:p%40ss@127.0.0.1/db?sslmode=require",
                "postgresql://u:***@127.0.0.1/db?sslmode=require",
            ),
            // A raw '@' in the password: the host starts after the last one.
            ("postgres://u:a@b@h:1/d", "postgres://u:***@h:1/d"),
            (
                "postgres://h/d?user=u&password=hunter2&sslmode=disable",
                "postgres://h/d?user=u&password=***&sslmode=disable",
            ),
            ("postgres://u@h/d", "postgres://u@h/d"),
            ("postgres://h:5432", "postgres://h:5432"),
            (
                "sqlite:///var/lib/cellgate/cellgate.db",
                "sqlite:///var/lib/cellgate/cellgate.db",
            ),
            ("sqlite://data/c.db?mode=rwc", "sqlite://data/c.db?mode=rwc"),
            ("sqlite::memory:", "sqlite::memory:"),
            ("sqlite:data/c.db", "sqlite:data/c.db"),
            ("cellgate:s3cret@db/cellgate", "cellgate:***@db/cellgate"),
        ];
        for (url, want) in cases {
            assert_eq!(redacted_url(url), want, "{url}");
        }
        for secret in ["s3cret", "hunter2", "p%40ss"] {
            for (url, _) in cases {
                assert!(!redacted_url(url).contains(secret), "{url}");
            }
        }
    }

    #[test]
    fn backend_follows_the_scheme() {
        assert_eq!(Backend::of_url("sqlite://x.db"), Some(Backend::Sqlite));
        assert_eq!(Backend::of_url("sqlite::memory:"), Some(Backend::Sqlite));
        assert_eq!(Backend::of_url("postgres://h/d"), Some(Backend::Postgres));
        assert_eq!(Backend::of_url("PostgreSQL://h/d"), Some(Backend::Postgres));
        assert_eq!(Backend::of_url("mysql://h/d"), None);
        assert_eq!(Backend::of_url("/var/lib/cellgate.db"), None);
    }

    #[tokio::test]
    async fn unsupported_urls_are_refused_without_their_password() {
        let e = Store::connect("mysql://root:topsecret@h/d", None)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, StoreError::UnsupportedUrl(_)));
        assert!(!e.to_string().contains("topsecret"), "{e}");
    }

    #[tokio::test]
    async fn a_sqlite_url_opens_and_creates_its_directory() {
        let dir = std::env::temp_dir().join(format!("cg-store-url-{}", rand::random::<u64>()));
        let file = dir.join("nested/db.sqlite");
        let s = Store::connect(&format!("sqlite://{}", file.display()), None)
            .await
            .unwrap();
        assert_eq!(s.admin_token_count().await.unwrap(), 0);
        s.close().await;
        assert!(file.is_file());
        let _ = std::fs::remove_dir_all(dir);
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
