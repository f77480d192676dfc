//! A customer's extra logins (credentials), sub-users and API keys.
//!
//! A login names one account across `customers.username` and
//! `credentials.username`: each insert checks the other table inside its
//! transaction, and the table's own unique index covers its own column.

use serde::Serialize;

use super::{BeginWrite, Columns, CustomerRow, Store, StoreError, conflict, customer_from, now_ms};

const CUSTOMER_COLS: &str =
    "id, username, password_hash, disabled, created_at, plan_id, expires_at, parent_id";

/// An extra username/password login of a customer; the hash never leaves
/// the store through this type.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CredentialRow {
    pub id: String,
    pub customer_id: String,
    pub username: String,
    pub created_at: i64,
}

/// An API key as listed: the secret exists only in the answer that
/// created it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ApiKeyRow {
    pub id: String,
    pub customer_id: String,
    pub label: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

fn credential_from(r: &impl Columns) -> Result<CredentialRow, sqlx::Error> {
    Ok(CredentialRow {
        id: r.col("id")?,
        customer_id: r.col("customer_id")?,
        username: r.col("username")?,
        created_at: r.col("created_at")?,
    })
}

fn api_key_from(r: &impl Columns) -> Result<ApiKeyRow, sqlx::Error> {
    Ok(ApiKeyRow {
        id: r.col("id")?,
        customer_id: r.col("customer_id")?,
        label: r.col("label")?,
        created_at: r.col("created_at")?,
        last_used_at: r.col("last_used_at")?,
    })
}

/// Why a sub-user could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SubUserError {
    #[error("no such parent customer")]
    NoParent,
    #[error("a sub-user cannot have sub-users")]
    ParentIsSubUser,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    // --- customers by id ---------------------------------------------------

    pub async fn customer_by_id(&self, id: &str) -> Result<Option<CustomerRow>, StoreError> {
        let sql = format!("SELECT {CUSTOMER_COLS} FROM customers WHERE id = $1");
        on_pool!(self, |p| {
            let row = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(id)
                .fetch_optional(p)
                .await?;
            Ok(row.as_ref().map(customer_from).transpose()?)
        })
    }

    /// Create a customer whose username no credential uses either; with
    /// `parent_id`, a sub-user of that customer (which must exist and not
    /// be a sub-user itself). Checked and inserted in one transaction.
    pub async fn insert_account(
        &self,
        id: &str,
        username: &str,
        password_hash: &str,
        parent_id: Option<&str>,
    ) -> Result<CustomerRow, SubUserError> {
        let now = now_ms();
        on_pool!(self, |p| {
            let mut tx = p.begin_write().await.map_err(StoreError::from)?;
            if let Some(parent) = parent_id {
                let grand: Option<Option<String>> =
                    sqlx::query_scalar("SELECT parent_id FROM customers WHERE id = $1")
                        .bind(parent)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                match grand {
                    None => return Err(SubUserError::NoParent),
                    Some(Some(_)) => return Err(SubUserError::ParentIsSubUser),
                    Some(None) => {}
                }
            }
            let taken: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM credentials WHERE username = $1")
                    .bind(username)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
            if taken > 0 {
                return Err(StoreError::Conflict(format!("login {username}")).into());
            }
            sqlx::query(
                "INSERT INTO customers (id, username, password_hash, created_at, parent_id) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(username)
            .bind(password_hash)
            .bind(now)
            .bind(parent_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| conflict(e, &format!("login {username}")))?;
            tx.commit().await.map_err(StoreError::from)?;
            Ok::<(), SubUserError>(())
        })?;
        Ok(CustomerRow {
            id: id.to_string(),
            username: username.to_string(),
            password_hash: password_hash.to_string(),
            disabled: false,
            created_at: now,
            plan_id: None,
            expires_at: None,
            parent_id: parent_id.map(str::to_string),
        })
    }

    pub async fn sub_users(&self, parent_id: &str) -> Result<Vec<CustomerRow>, StoreError> {
        let sql = format!(
            "SELECT {CUSTOMER_COLS} FROM customers WHERE parent_id = $1 ORDER BY created_at, id"
        );
        on_pool!(self, |p| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(parent_id)
                .fetch_all(p)
                .await?;
            Ok(rows.iter().map(customer_from).collect::<Result<_, _>>()?)
        })
    }

    // --- credentials -------------------------------------------------------

    /// Add a login to a customer; `Conflict` when a customer or another
    /// credential already uses the username. `Ok(None)`: no such customer.
    pub async fn insert_credential(
        &self,
        id: &str,
        customer_id: &str,
        username: &str,
        password_hash: &str,
    ) -> Result<Option<CredentialRow>, StoreError> {
        let now = now_ms();
        let inserted = on_pool!(self, |p| {
            let mut tx = p.begin_write().await?;
            let owner: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM customers WHERE id = $1")
                .bind(customer_id)
                .fetch_one(&mut *tx)
                .await?;
            if owner == 0 {
                return Ok(None);
            }
            let taken: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM customers WHERE username = $1")
                    .bind(username)
                    .fetch_one(&mut *tx)
                    .await?;
            if taken > 0 {
                return Err(StoreError::Conflict(format!("login {username}")));
            }
            sqlx::query(
                "INSERT INTO credentials (id, customer_id, username, password_hash, created_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(customer_id)
            .bind(username)
            .bind(password_hash)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| conflict(e, &format!("login {username}")))?;
            tx.commit().await?;
            Ok::<_, StoreError>(Some(()))
        })?;
        Ok(inserted.map(|()| CredentialRow {
            id: id.to_string(),
            customer_id: customer_id.to_string(),
            username: username.to_string(),
            created_at: now,
        }))
    }

    pub async fn credentials_of(
        &self,
        customer_id: &str,
    ) -> Result<Vec<CredentialRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT id, customer_id, username, created_at FROM credentials \
                 WHERE customer_id = $1 ORDER BY created_at, id",
            )
            .bind(customer_id)
            .fetch_all(p)
            .await?;
            Ok(rows.iter().map(credential_from).collect::<Result<_, _>>()?)
        })
    }

    /// Delete a credential; returns its username (to drop cached logins).
    pub async fn delete_credential(&self, id: &str) -> Result<Option<String>, StoreError> {
        let name: Option<String> = on_pool!(self, |p| sqlx::query_scalar(
            "DELETE FROM credentials WHERE id = $1 RETURNING username"
        )
        .bind(id)
        .fetch_optional(p)
        .await?);
        Ok(name)
    }

    /// The customer a credential logs in as, and the credential's hash.
    pub async fn credential_by_username(
        &self,
        login: &str,
    ) -> Result<Option<(CustomerRow, String)>, StoreError> {
        on_pool!(self, |p| {
            let row = sqlx::query(
                "SELECT c.id, c.username, c.password_hash, c.disabled, c.created_at, c.plan_id, \
                 c.expires_at, c.parent_id, k.password_hash AS credential_hash \
                 FROM credentials k JOIN customers c ON c.id = k.customer_id WHERE k.username = $1",
            )
            .bind(login)
            .fetch_optional(p)
            .await?;
            let Some(r) = row else {
                return Ok(None);
            };
            Ok(Some((customer_from(&r)?, r.col("credential_hash")?)))
        })
    }

    // --- API keys ----------------------------------------------------------

    /// Store a key by its SHA-256 hex. `Ok(None)`: no such customer.
    pub async fn insert_api_key(
        &self,
        id: &str,
        customer_id: &str,
        label: &str,
        key_hash: &str,
    ) -> Result<Option<ApiKeyRow>, StoreError> {
        let now = now_ms();
        let owner = on_pool!(self, |p| {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM customers WHERE id = $1")
                .bind(customer_id)
                .fetch_one(p)
                .await?
        });
        if owner == 0 {
            return Ok(None);
        }
        on_pool!(self, |p| {
            sqlx::query(
                "INSERT INTO api_keys (id, customer_id, label, key_hash, created_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(customer_id)
            .bind(label)
            .bind(key_hash)
            .bind(now)
            .execute(p)
            .await
            .map(drop)
            .map_err(|e| conflict(e, "api key"))?
        });
        Ok(Some(ApiKeyRow {
            id: id.to_string(),
            customer_id: customer_id.to_string(),
            label: label.to_string(),
            created_at: now,
            last_used_at: None,
        }))
    }

    pub async fn api_keys_of(&self, customer_id: &str) -> Result<Vec<ApiKeyRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT id, customer_id, label, created_at, last_used_at FROM api_keys \
                 WHERE customer_id = $1 ORDER BY created_at, id",
            )
            .bind(customer_id)
            .fetch_all(p)
            .await?;
            Ok(rows.iter().map(api_key_from).collect::<Result<_, _>>()?)
        })
    }

    pub async fn delete_api_key(&self, id: &str) -> Result<bool, StoreError> {
        let n = on_pool!(self, |p| sqlx::query("DELETE FROM api_keys WHERE id = $1")
            .bind(id)
            .execute(p)
            .await?
            .rows_affected());
        Ok(n > 0)
    }

    /// The customer a key (by SHA-256 hex) belongs to; marks the key used.
    pub async fn customer_by_api_key(
        &self,
        key_hash: &str,
    ) -> Result<Option<CustomerRow>, StoreError> {
        let owner: Option<String> = on_pool!(self, |p| sqlx::query_scalar(
            "UPDATE api_keys SET last_used_at = $1 WHERE key_hash = $2 RETURNING customer_id"
        )
        .bind(now_ms())
        .bind(key_hash)
        .fetch_optional(p)
        .await?);
        match owner {
            Some(id) => self.customer_by_id(&id).await,
            None => Ok(None),
        }
    }
}
