//! Customer webhooks: limit events (quota 80 % / 100 %, strike lockouts)
//! POSTed as JSON to the URL stored for the customer.
//!
//! Delivery runs in background tasks with a per-attempt timeout and a few
//! retries with backoff, so a slow or dead receiver never holds up the
//! once-a-second loop that hands events over. The client is the agent's
//! small HTTP/1.1 client: `http://` URLs only; an `https://` URL is stored
//! but not delivered to (logged).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::limits::LimitEvent;
use crate::state::State;
use crate::store::now_ms;

/// How long one delivery attempt may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries after a failed first attempt.
pub const RETRIES: u32 = 3;
/// Wait before the first retry; doubles each time.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// Whether `url` is a webhook address the API accepts: `http://` or
/// `https://`, a host, no spaces or control characters, bounded length.
pub fn valid_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    let Some(rest) = rest else { return false };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    url.len() <= 2048
        && !host.is_empty()
        && !host.starts_with(':')
        && !host.contains('@')
        && url.bytes().all(|b| b.is_ascii_graphic())
}

/// The account an event is about and the JSON body sent for it.
pub fn payload(ev: &LimitEvent) -> (&str, Value) {
    match ev {
        LimitEvent::QuotaCrossed {
            customer_id,
            percent,
            used_bytes,
            quota_bytes,
            month,
        } => (
            customer_id,
            json!({
                "event": if *percent >= 100 { "quota_100" } else { "quota_80" },
                "customer_id": customer_id,
                "percent": percent,
                "used_bytes": used_bytes,
                "quota_bytes": quota_bytes,
                "month": month,
                "sent_at": now_ms(),
            }),
        ),
        LimitEvent::LockedOut {
            customer_id,
            until_ms,
            connections_closed,
        } => (
            customer_id,
            json!({
                "event": "locked_out",
                "customer_id": customer_id,
                "until_ms": until_ms,
                "connections_closed": connections_closed,
                "sent_at": now_ms(),
            }),
        ),
    }
}

/// Hand limit events over for delivery; returns at once.
pub fn dispatch(state: &Arc<State>, events: Vec<LimitEvent>) {
    for ev in events {
        info!(event = ?ev, "customer limit event");
        let (customer, body) = payload(&ev);
        let customer = customer.to_string();
        let st = state.clone();
        state.tasks.spawn(async move {
            let url = match st.store.customer_webhook(&customer).await {
                Ok(Some(u)) => u,
                Ok(None) => return,
                Err(e) => {
                    warn!(%customer, "webhook address unavailable: {e}");
                    return;
                }
            };
            deliver(&customer, &url, &body).await;
        });
    }
}

/// POST `body` to `url`, retrying with backoff; logs the outcome once.
async fn deliver(customer: &str, url: &str, body: &Value) {
    if !url.starts_with("http://") {
        warn!(%customer, "webhook not sent: only http:// webhook URLs are supported");
        return;
    }
    let bytes = body.to_string().into_bytes();
    let mut backoff = FIRST_BACKOFF;
    let mut last = String::new();
    for attempt in 0..=RETRIES {
        if attempt > 0 {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
        let req = edge_agent::net::http::Request {
            method: "POST",
            url,
            headers: &[
                ("Content-Type", "application/json"),
                ("User-Agent", "cellgate-webhook"),
            ],
            body: &bytes,
        };
        match edge_agent::net::http::send(req, None, ATTEMPT_TIMEOUT).await {
            Ok(r) if (200..300).contains(&r.status) => {
                debug!(%customer, attempt, "webhook delivered");
                return;
            }
            Ok(r) => last = format!("status {}", r.status),
            Err(e) => last = e.to_string(),
        }
    }
    warn!(%customer, attempts = RETRIES + 1, "webhook not delivered: {last}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_named_payloads() {
        let ev = LimitEvent::QuotaCrossed {
            customer_id: "cus-1".into(),
            percent: 80,
            used_bytes: 800,
            quota_bytes: 1000,
            month: "2026-11".into(),
        };
        let (c, v) = payload(&ev);
        assert_eq!(c, "cus-1");
        assert_eq!(v["event"], "quota_80");
        assert_eq!(v["customer_id"], "cus-1");
        assert_eq!(v["quota_bytes"], 1000);
        let ev = LimitEvent::QuotaCrossed {
            customer_id: "cus-1".into(),
            percent: 100,
            used_bytes: 1000,
            quota_bytes: 1000,
            month: "2026-11".into(),
        };
        assert_eq!(payload(&ev).1["event"], "quota_100");
        let ev = LimitEvent::LockedOut {
            customer_id: "cus-2".into(),
            until_ms: 5,
            connections_closed: 3,
        };
        let (c, v) = payload(&ev);
        assert_eq!((c, v["event"].as_str()), ("cus-2", Some("locked_out")));
    }

    #[test]
    fn webhook_urls_are_checked() {
        for ok in [
            "http://hooks.example.com/cellgate",
            "https://example.com",
            "http://127.0.0.1:8080/x?y=1",
        ] {
            assert!(valid_url(ok), "{ok}");
        }
        for bad in [
            "",
            "ftp://example.com",
            "http://",
            "http:///path",
            "http://exa mple.com",
            "http://user@example.com/",
            "example.com",
            "http://:80/",
        ] {
            assert!(!valid_url(bad), "{bad}");
        }
    }
}
