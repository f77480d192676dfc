//! Usage accounting and the request log, on the hot path without a
//! database write per connection.
//!
//! Every finished connection (or plain-HTTP request) adds its bytes to an
//! in-memory table keyed by (UTC day, customer, credential, device, exit)
//! and, depending on the customer's plan, queues one request-log row. A
//! background task drains both every `flush_secs` into `usage_daily` and
//! `request_log`; a graceful shutdown drains them once more, so the sums in
//! the database equal the bytes relayed. A crash loses at most one flush
//! interval. The request-log queue is bounded: under a flood, rows beyond
//! it are dropped and counted, never the usage sums.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// What a plan keeps of each request's target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogMode {
    /// No request-log rows.
    Off,
    /// The target host only.
    #[default]
    Host,
    /// Host, port, and for plain HTTP the path.
    Full,
}

impl LogMode {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "off" => LogMode::Off,
            "host" => LogMode::Host,
            "full" => LogMode::Full,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogMode::Off => "off",
            LogMode::Host => "host",
            LogMode::Full => "full",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UsageKey {
    /// Days since 1970-01-01, UTC.
    pub day: i64,
    pub customer_id: String,
    pub credential: String,
    pub device_id: String,
    pub exit: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UsageCounts {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub connections: u64,
    pub requests: u64,
}

impl UsageCounts {
    fn add(&mut self, o: &UsageCounts) {
        self.bytes_up += o.bytes_up;
        self.bytes_down += o.bytes_down;
        self.connections += o.connections;
        self.requests += o.requests;
    }
}

/// One request-log row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogRow {
    pub started_at: i64,
    pub customer_id: String,
    pub credential: String,
    pub device_id: Option<String>,
    pub exit: Option<String>,
    pub target_host: Option<String>,
    pub target_port: Option<u16>,
    pub target_path: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    /// ok | refused | failed | limited
    pub outcome: String,
    pub error: Option<String>,
}

impl LogRow {
    /// Apply a plan's privacy mode; `None` when nothing is logged.
    pub fn redacted(mut self, mode: LogMode) -> Option<Self> {
        match mode {
            LogMode::Off => None,
            LogMode::Host => {
                self.target_port = None;
                self.target_path = None;
                Some(self)
            }
            LogMode::Full => Some(self),
        }
    }
}

pub fn day_of(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(86_400_000)
}

/// The in-memory side of accounting.
pub struct Usage {
    table: Mutex<HashMap<UsageKey, UsageCounts>>,
    log: Mutex<Vec<LogRow>>,
    log_cap: usize,
    /// Request-log rows dropped because the queue was full.
    pub log_dropped: AtomicU64,
    /// Bytes recorded since start (both directions), for checks.
    pub bytes_recorded: AtomicU64,
}

impl Usage {
    pub fn new(log_cap: usize) -> Self {
        Self {
            table: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            log_cap,
            log_dropped: AtomicU64::new(0),
            bytes_recorded: AtomicU64::new(0),
        }
    }

    /// Add a finished connection's or request's counts.
    pub fn record(&self, key: UsageKey, c: UsageCounts) {
        self.bytes_recorded
            .fetch_add(c.bytes_up + c.bytes_down, Ordering::Relaxed);
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.entry(key).or_default().add(&c);
    }

    /// Queue a request-log row (already redacted for the plan).
    pub fn log(&self, row: LogRow) {
        let mut l = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() >= self.log_cap {
            self.log_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        l.push(row);
    }

    /// Everything recorded since the last call.
    pub fn take(&self) -> (Vec<(UsageKey, UsageCounts)>, Vec<LogRow>) {
        let t = std::mem::take(&mut *self.table.lock().unwrap_or_else(|e| e.into_inner()));
        let l = std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()));
        (t.into_iter().collect(), l)
    }

    /// Put back what could not be written (the database was down), so the
    /// next flush retries it.
    pub fn restore(&self, usage: Vec<(UsageKey, UsageCounts)>, log: Vec<LogRow>) {
        {
            let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            for (k, c) in usage {
                t.entry(k).or_default().add(&c);
            }
        }
        let mut l = self.log.lock().unwrap_or_else(|e| e.into_inner());
        for row in log {
            if l.len() >= self.log_cap {
                self.log_dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                l.push(row);
            }
        }
    }

    /// Unflushed usage of one customer (for live views).
    pub fn pending_of(&self, customer_id: &str) -> UsageCounts {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut sum = UsageCounts::default();
        for (k, c) in t.iter() {
            if k.customer_id == customer_id {
                sum.add(c);
            }
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: &str, day: i64) -> UsageKey {
        UsageKey {
            day,
            customer_id: c.into(),
            credential: "alice".into(),
            device_id: "dev-1".into(),
            exit: "m0".into(),
        }
    }

    fn counts(up: u64, down: u64) -> UsageCounts {
        UsageCounts {
            bytes_up: up,
            bytes_down: down,
            connections: 1,
            requests: 1,
        }
    }

    #[test]
    fn records_sum_per_key_and_take_empties() {
        let u = Usage::new(10);
        u.record(key("c1", 1), counts(10, 100));
        u.record(key("c1", 1), counts(5, 50));
        u.record(key("c1", 2), counts(1, 1));
        u.record(key("c2", 1), counts(7, 7));
        assert_eq!(u.pending_of("c1").bytes_down, 151);
        let (t, _) = u.take();
        assert_eq!(t.len(), 3);
        let c1d1 = t.iter().find(|(k, _)| *k == key("c1", 1)).unwrap().1;
        assert_eq!(
            (c1d1.bytes_up, c1d1.bytes_down, c1d1.connections),
            (15, 150, 2)
        );
        assert!(u.take().0.is_empty());
        assert_eq!(u.bytes_recorded.load(Ordering::Relaxed), 15 + 150 + 2 + 14);
    }

    #[test]
    fn restore_merges_back() {
        let u = Usage::new(10);
        u.record(key("c1", 1), counts(1, 1));
        let (t, l) = u.take();
        u.record(key("c1", 1), counts(2, 2));
        u.restore(t, l);
        let (t, _) = u.take();
        assert_eq!(t[0].1.bytes_up, 3);
    }

    #[test]
    fn log_is_bounded_and_redacted() {
        let u = Usage::new(2);
        let row = LogRow {
            started_at: 0,
            customer_id: "c".into(),
            credential: "alice".into(),
            device_id: None,
            exit: None,
            target_host: Some("example.com".into()),
            target_port: Some(443),
            target_path: Some("/x".into()),
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            outcome: "ok".into(),
            error: None,
        };
        assert!(row.clone().redacted(LogMode::Off).is_none());
        let h = row.clone().redacted(LogMode::Host).unwrap();
        assert_eq!((h.target_port, h.target_path.as_deref()), (None, None));
        assert_eq!(row.clone().redacted(LogMode::Full).unwrap(), row);
        for _ in 0..3 {
            u.log(row.clone());
        }
        assert_eq!(u.log_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(u.take().1.len(), 2);
    }

    #[test]
    fn days_are_utc() {
        assert_eq!(day_of(0), 0);
        assert_eq!(day_of(86_400_000 - 1), 0);
        assert_eq!(day_of(86_400_000), 1);
        assert_eq!(day_of(-1), -1);
        assert_eq!(LogMode::parse("full"), Some(LogMode::Full));
        assert_eq!(LogMode::parse("x"), None);
    }
}
