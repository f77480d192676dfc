//! Source-address allow lists, persisted bans and webhook addresses of
//! customers.

use serde::Serialize;

use super::{Columns, Store, StoreError, conflict, now_ms};

/// One allow-listed network of a customer, in canonical CIDR text.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CustomerIpRow {
    pub customer_id: String,
    pub cidr: String,
    pub created_at: i64,
}

/// An operator's ban of a customer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BanRow {
    pub customer_id: String,
    /// Unix ms; `None`: until lifted.
    pub until_at: Option<i64>,
    pub reason: String,
    pub created_at: i64,
}

fn ip_from(r: &impl Columns) -> Result<CustomerIpRow, sqlx::Error> {
    Ok(CustomerIpRow {
        customer_id: r.col("customer_id")?,
        cidr: r.col("cidr")?,
        created_at: r.col("created_at")?,
    })
}

fn ban_from(r: &impl Columns) -> Result<BanRow, sqlx::Error> {
    Ok(BanRow {
        customer_id: r.col("customer_id")?,
        until_at: r.col("until_at")?,
        reason: r.col("reason")?,
        created_at: r.col("created_at")?,
    })
}

impl Store {
    // --- allow lists ---------------------------------------------------------

    /// Allow-list `cidr` (canonical text) for a customer; `Err(Conflict)`
    /// when the customer already has it.
    pub async fn add_customer_ip(
        &self,
        customer_id: &str,
        cidr: &str,
    ) -> Result<CustomerIpRow, StoreError> {
        let row = CustomerIpRow {
            customer_id: customer_id.to_string(),
            cidr: cidr.to_string(),
            created_at: now_ms(),
        };
        on_pool!(self, |p| sqlx::query(
            "INSERT INTO customer_ips (customer_id, cidr, created_at) VALUES ($1, $2, $3)"
        )
        .bind(&row.customer_id)
        .bind(&row.cidr)
        .bind(row.created_at)
        .execute(p)
        .await
        .map(drop)
        .map_err(|e| conflict(
            e,
            &format!("{cidr} on customer {customer_id}")
        )))?;
        Ok(row)
    }

    /// A customer's allow-listed networks, oldest first.
    pub async fn customer_ips(&self, customer_id: &str) -> Result<Vec<CustomerIpRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT customer_id, cidr, created_at FROM customer_ips WHERE customer_id = $1 \
                 ORDER BY created_at, cidr",
            )
            .bind(customer_id)
            .fetch_all(p)
            .await?;
            Ok(rows.iter().map(ip_from).collect::<Result<_, _>>()?)
        })
    }

    /// Every allow-listed network of every customer.
    pub async fn all_customer_ips(&self) -> Result<Vec<CustomerIpRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT customer_id, cidr, created_at FROM customer_ips ORDER BY customer_id, cidr",
            )
            .fetch_all(p)
            .await?;
            Ok(rows.iter().map(ip_from).collect::<Result<_, _>>()?)
        })
    }

    /// Remove one network from a customer's allow list; `false` if absent.
    pub async fn delete_customer_ip(
        &self,
        customer_id: &str,
        cidr: &str,
    ) -> Result<bool, StoreError> {
        let n = on_pool!(self, |p| sqlx::query(
            "DELETE FROM customer_ips WHERE customer_id = $1 AND cidr = $2"
        )
        .bind(customer_id)
        .bind(cidr)
        .execute(p)
        .await?
        .rows_affected());
        Ok(n > 0)
    }

    // --- bans ----------------------------------------------------------------

    /// Ban a customer (replacing any earlier ban of it).
    pub async fn set_ban(
        &self,
        customer_id: &str,
        until_at: Option<i64>,
        reason: &str,
    ) -> Result<BanRow, StoreError> {
        let row = BanRow {
            customer_id: customer_id.to_string(),
            until_at,
            reason: reason.to_string(),
            created_at: now_ms(),
        };
        on_pool!(self, |p| sqlx::query(
            "INSERT INTO bans (customer_id, until_at, reason, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (customer_id) DO UPDATE SET until_at = excluded.until_at, \
             reason = excluded.reason, created_at = excluded.created_at"
        )
        .bind(&row.customer_id)
        .bind(row.until_at)
        .bind(&row.reason)
        .bind(row.created_at)
        .execute(p)
        .await
        .map(drop))?;
        Ok(row)
    }

    /// Lift a customer's ban; `false` if there was none.
    pub async fn lift_ban(&self, customer_id: &str) -> Result<bool, StoreError> {
        let n = on_pool!(self, |p| sqlx::query(
            "DELETE FROM bans WHERE customer_id = $1"
        )
        .bind(customer_id)
        .execute(p)
        .await?
        .rows_affected());
        Ok(n > 0)
    }

    /// Bans still in force at `now_ms` (open-ended ones included).
    pub async fn active_bans(&self, now_ms: i64) -> Result<Vec<BanRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT customer_id, until_at, reason, created_at FROM bans \
                 WHERE until_at IS NULL OR until_at > $1 ORDER BY created_at, customer_id",
            )
            .bind(now_ms)
            .fetch_all(p)
            .await?;
            Ok(rows.iter().map(ban_from).collect::<Result<_, _>>()?)
        })
    }

    // --- webhooks --------------------------------------------------------------

    /// Set (`Some`) or clear (`None`) a customer's webhook URL; `false` if
    /// there is no such customer.
    pub async fn set_customer_webhook(
        &self,
        customer_id: &str,
        url: Option<&str>,
    ) -> Result<bool, StoreError> {
        let n = on_pool!(self, |p| sqlx::query(
            "UPDATE customers SET webhook_url = $1 WHERE id = $2"
        )
        .bind(url)
        .bind(customer_id)
        .execute(p)
        .await?
        .rows_affected());
        Ok(n > 0)
    }

    /// A customer's webhook URL, if it has one.
    pub async fn customer_webhook(&self, customer_id: &str) -> Result<Option<String>, StoreError> {
        let url: Option<Option<String>> = on_pool!(self, |p| sqlx::query_scalar(
            "SELECT webhook_url FROM customers WHERE id = $1"
        )
        .bind(customer_id)
        .fetch_optional(p)
        .await?);
        Ok(url.flatten())
    }
}
