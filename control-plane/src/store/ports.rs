//! Port per exit: which local port each exit was given (`exit_ports`).

use serde::Serialize;

use super::{Columns, Store, StoreError, now_ms};

/// One exit's port.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ExitPortRow {
    pub port: u16,
    pub device_id: String,
    pub exit_name: String,
    pub assigned_at: i64,
}

fn exit_port_from(r: &impl Columns) -> Result<ExitPortRow, sqlx::Error> {
    let port: i64 = r.col("port")?;
    Ok(ExitPortRow {
        port: u16::try_from(port).unwrap_or(0),
        device_id: r.col("device_id")?,
        exit_name: r.col("exit_name")?,
        assigned_at: r.col("assigned_at")?,
    })
}

/// The lowest port of `lo..=hi` not in `used` (sorted ascending).
pub fn lowest_free_port(used: &[u16], lo: u16, hi: u16) -> Option<u16> {
    let mut want = lo;
    for &p in used.iter().filter(|&&p| p >= lo && p <= hi) {
        if p > want {
            break;
        }
        if p == want {
            if want == hi {
                return None;
            }
            want += 1;
        }
    }
    (want <= hi).then_some(want)
}

/// Attempts when other control planes keep taking the port we chose.
const ASSIGN_ATTEMPTS: usize = 8;

impl Store {
    /// Every assigned port, ascending.
    pub async fn exit_ports(&self) -> Result<Vec<ExitPortRow>, StoreError> {
        on_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT port, device_id, exit_name, assigned_at FROM exit_ports ORDER BY port",
            )
            .fetch_all(p)
            .await?;
            Ok(rows.iter().map(exit_port_from).collect::<Result<_, _>>()?)
        })
    }

    /// The exit's port, if it has one.
    pub async fn exit_port(
        &self,
        device_id: &str,
        exit: &str,
    ) -> Result<Option<ExitPortRow>, StoreError> {
        on_pool!(self, |p| {
            let row = sqlx::query(
                "SELECT port, device_id, exit_name, assigned_at FROM exit_ports \
                 WHERE device_id = $1 AND exit_name = $2",
            )
            .bind(device_id)
            .bind(exit)
            .fetch_optional(p)
            .await?;
            Ok(row.as_ref().map(exit_port_from).transpose()?)
        })
    }

    /// The exit's port, giving it the lowest free port of `lo..=hi` when it
    /// has none (or one outside the range, after the range changed).
    /// `None`: the range is full. Safe against concurrent callers: the
    /// table's unique constraints decide, and a loser tries again.
    pub async fn assign_exit_port(
        &self,
        device_id: &str,
        exit: &str,
        lo: u16,
        hi: u16,
    ) -> Result<Option<u16>, StoreError> {
        for _ in 0..ASSIGN_ATTEMPTS {
            if let Some(row) = self.exit_port(device_id, exit).await? {
                if (lo..=hi).contains(&row.port) {
                    return Ok(Some(row.port));
                }
                on_pool!(self, |p| {
                    sqlx::query("DELETE FROM exit_ports WHERE port = $1")
                        .bind(i64::from(row.port))
                        .execute(p)
                        .await?;
                });
            }
            let used: Vec<i64> = on_pool!(self, |p| sqlx::query_scalar(
                "SELECT port FROM exit_ports WHERE port >= $1 AND port <= $2 ORDER BY port"
            )
            .bind(i64::from(lo))
            .bind(i64::from(hi))
            .fetch_all(p)
            .await?);
            let used: Vec<u16> = used
                .into_iter()
                .filter_map(|p| u16::try_from(p).ok())
                .collect();
            let Some(port) = lowest_free_port(&used, lo, hi) else {
                return Ok(None);
            };
            let n = on_pool!(self, |p| sqlx::query(
                "INSERT INTO exit_ports (port, device_id, exit_name, assigned_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"
            )
            .bind(i64::from(port))
            .bind(device_id)
            .bind(exit)
            .bind(now_ms())
            .execute(p)
            .await?
            .rows_affected());
            if n == 1 {
                return Ok(Some(port));
            }
            // Someone took the port, or gave this exit one meanwhile: the
            // next round sees which.
        }
        Err(StoreError::Conflict(format!(
            "a port for exit {device_id}/{exit} (the range is contended)"
        )))
    }

    /// Free the ports of a device's exits (deleting the device does it too).
    pub async fn release_exit_ports(&self, device_id: &str) -> Result<u64, StoreError> {
        let n = on_pool!(self, |p| sqlx::query(
            "DELETE FROM exit_ports WHERE device_id = $1"
        )
        .bind(device_id)
        .execute(p)
        .await?
        .rows_affected());
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_free_port_comes_first() {
        assert_eq!(lowest_free_port(&[], 4000, 4002), Some(4000));
        assert_eq!(lowest_free_port(&[4000], 4000, 4002), Some(4001));
        assert_eq!(lowest_free_port(&[4000, 4002], 4000, 4002), Some(4001));
        assert_eq!(lowest_free_port(&[4001, 4002], 4000, 4002), Some(4000));
        assert_eq!(lowest_free_port(&[4000, 4001, 4002], 4000, 4002), None);
        // Ports outside the range do not count.
        assert_eq!(lowest_free_port(&[10, 4000, 9000], 4000, 4001), Some(4001));
        assert_eq!(lowest_free_port(&[65535], 65535, 65535), None);
        assert_eq!(lowest_free_port(&[], 65535, 65535), Some(65535));
    }
}
