//! Choosing an exit for a customer connection: filters (country, region,
//! operator, device kind, label, device, exit, the plan's allowed labels),
//! strategies (round robin, least connections, random, weighted by score,
//! IP hash on the customer's address) and sticky sessions with a TTL.
//!
//! A sticky session remembers the exit *and the address it had*: when the
//! exit goes away, stops matching, or rotated to another address, the next
//! connection of the session moves to an equivalent exit (one matching the
//! same filter) and the move is logged.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::registry::{Registry, Route};

/// How to choose among matching exits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    RoundRobin,
    LeastConnections,
    Random,
    /// Random, weighted by success rate and open latency.
    Weighted,
    /// The same customer address maps to the same exit while the set of
    /// exits stays the same.
    IpHash,
}

impl Strategy {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "round_robin" => Strategy::RoundRobin,
            "least_connections" => Strategy::LeastConnections,
            "random" => Strategy::Random,
            "weighted" => Strategy::Weighted,
            "ip_hash" => Strategy::IpHash,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastConnections => "least_connections",
            Strategy::Random => "random",
            Strategy::Weighted => "weighted",
            Strategy::IpHash => "ip_hash",
        }
    }
}

/// A device's attributes exits are filtered by.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceAttrs {
    pub name: String,
    pub country: String,
    pub region: String,
    pub operator: String,
    pub kind: String,
    pub labels: Vec<String>,
}

impl DeviceAttrs {
    pub fn of(d: &crate::store::DeviceRow) -> Self {
        Self {
            name: d.name.clone(),
            country: d.country.clone(),
            region: d.region.clone(),
            operator: d.operator.clone(),
            kind: d.kind.clone(),
            labels: d.labels.clone(),
        }
    }
}

/// What a connection asks of its exit; every set field must match
/// (case-insensitively for names).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub country: Option<String>,
    pub region: Option<String>,
    pub operator: Option<String>,
    pub kind: Option<String>,
    pub label: Option<String>,
    /// A device name or id.
    pub device: Option<String>,
    pub exit: Option<String>,
    /// The plan's pools: when non-empty, the device must carry one of them.
    pub allowed_labels: Vec<String>,
}

/// Names compare case-insensitively, with `-` and `_` equal: usernames
/// cannot carry `-` inside a value, so `region-eu_central` targets the
/// region `eu-central`.
fn eq_ci(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).all(|(x, y)| {
            let n = |c: u8| {
                if c == b'-' {
                    b'_'
                } else {
                    c.to_ascii_lowercase()
                }
            };
            n(x) == n(y)
        })
}

impl Filter {
    pub fn matches(&self, device_id: &str, exit: &str, d: &DeviceAttrs) -> bool {
        let opt =
            |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| eq_ci(w, have));
        opt(&self.country, &d.country)
            && opt(&self.region, &d.region)
            && opt(&self.kind, &d.kind)
            && opt(&self.exit, exit)
            && self
                .operator
                .as_deref()
                .is_none_or(|w| operator_matches(w, &d.operator))
            && self
                .label
                .as_deref()
                .is_none_or(|w| d.labels.iter().any(|l| eq_ci(l, w)))
            && self
                .device
                .as_deref()
                .is_none_or(|w| eq_ci(w, &d.name) || eq_ci(w, device_id))
            && (self.allowed_labels.is_empty()
                || self
                    .allowed_labels
                    .iter()
                    .any(|a| d.labels.iter().any(|l| eq_ci(l, a))))
    }
}

/// Operators are matched on their name's words, so `vodafone` matches
/// `Vodafone.de` and `Vodafone UK`.
fn operator_matches(want: &str, have: &str) -> bool {
    let want = want.to_ascii_lowercase();
    have.to_ascii_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| w == want)
        || eq_ci(want.as_str(), have)
}

/// Score in (0, 1] for weighted choice: smoothed success rate over
/// latency.
fn score(r: &Route) -> f64 {
    let c = r.exit.counters();
    let success = (c.successes as f64 + 1.0) / (c.requests as f64 + 2.0);
    let avg_ms = if c.successes > 0 {
        c.open_ms_total as f64 / c.successes as f64
    } else {
        100.0
    };
    success * 100.0 / (avg_ms + 100.0)
}

fn choose(
    candidates: &[&Route],
    strategy: Strategy,
    client: IpAddr,
    rr: &AtomicUsize,
) -> Option<Route> {
    if candidates.is_empty() {
        return None;
    }
    let i = match strategy {
        Strategy::RoundRobin => rr.fetch_add(1, Ordering::Relaxed) % candidates.len(),
        Strategy::Random => rand::rng().random_range(0..candidates.len()),
        Strategy::LeastConnections => {
            let min = candidates
                .iter()
                .map(|r| r.exit.active_flows.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0);
            let least: Vec<usize> = (0..candidates.len())
                .filter(|&i| candidates[i].exit.active_flows.load(Ordering::Relaxed) == min)
                .collect();
            least[rr.fetch_add(1, Ordering::Relaxed) % least.len()]
        }
        Strategy::Weighted => {
            let weights: Vec<f64> = candidates.iter().map(|r| score(r)).collect();
            let total: f64 = weights.iter().sum();
            let mut x = rand::rng().random_range(0.0..total.max(f64::MIN_POSITIVE));
            let mut pick = candidates.len() - 1;
            for (i, w) in weights.iter().enumerate() {
                if x < *w {
                    pick = i;
                    break;
                }
                x -= w;
            }
            pick
        }
        Strategy::IpHash => {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            client.hash(&mut h);
            (h.finish() % candidates.len() as u64) as usize
        }
    };
    Some(candidates[i].clone())
}

/// Where a sticky session is bound.
#[derive(Clone, Debug)]
struct Binding {
    device_id: String,
    exit: String,
    /// The exit's address when bound; a rotation away from it moves the
    /// session.
    ip: Option<String>,
    expires: Instant,
}

/// The outcome of a routing decision, for the connection's log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stickiness {
    None,
    /// A new session was bound.
    Bound,
    /// The session kept its exit.
    Kept,
    /// The session's exit went away, stopped matching, or rotated.
    Moved {
        from: String,
        why: &'static str,
    },
}

/// Sticky sessions of every customer, bounded in size.
pub struct Sessions {
    map: Mutex<HashMap<(String, String), Binding>>,
    max: usize,
}

impl Sessions {
    pub fn new(max: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            max,
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drop expired sessions.
    pub fn prune(&self, now: Instant) {
        if let Ok(mut m) = self.map.lock() {
            m.retain(|_, b| b.expires > now);
        }
    }

    /// A customer's live sessions: (session, device, exit, seconds left).
    pub fn of_customer(&self, customer: &str, now: Instant) -> Vec<(String, String, String, u64)> {
        let m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = m
            .iter()
            .filter(|((c, _), b)| c == customer && b.expires > now)
            .map(|((_, s), b)| {
                (
                    s.clone(),
                    b.device_id.clone(),
                    b.exit.clone(),
                    b.expires.saturating_duration_since(now).as_secs(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Forget a session so its next connection picks a new exit.
    pub fn release(&self, customer: &str, session: &str) -> bool {
        self.map
            .lock()
            .map(|mut m| {
                m.remove(&(customer.to_string(), session.to_string()))
                    .is_some()
            })
            .unwrap_or(false)
    }

    /// The session's exit, if it is still bound.
    pub fn exit_of(&self, customer: &str, session: &str) -> Option<(String, String)> {
        let m = self.map.lock().ok()?;
        m.get(&(customer.to_string(), session.to_string()))
            .map(|b| (b.device_id.clone(), b.exit.clone()))
    }
}

/// One routing request.
pub struct Want<'a> {
    pub filter: &'a Filter,
    pub strategy: Strategy,
    pub client: IpAddr,
    /// (customer id, session id, ttl)
    pub session: Option<(&'a str, &'a str, Duration)>,
    /// Exits already tried for this connection.
    pub exclude: &'a [(String, String)],
}

/// The router: strategies over the registry's routes, plus sticky sessions.
pub struct Router {
    rr: AtomicUsize,
    pub sessions: Sessions,
}

impl Default for Router {
    fn default() -> Self {
        Self {
            rr: AtomicUsize::new(0),
            sessions: Sessions::new(100_000),
        }
    }
}

impl Router {
    /// Choose an exit; `None` when no available exit matches.
    pub fn pick(&self, reg: &Registry, want: &Want<'_>) -> Option<(Route, Stickiness)> {
        let now = Instant::now();
        reg.with_routes(|routes| {
            let ok = |r: &Route| {
                r.exit.available()
                    && !want
                        .exclude
                        .iter()
                        .any(|(d, n)| *d == r.exit.device_id && *n == r.exit.name)
                    && want
                        .filter
                        .matches(&r.exit.device_id, &r.exit.name, &r.exit.attrs())
            };
            let mut moved = None;
            if let Some((customer, session, ttl)) = want.session {
                let key = (customer.to_string(), session.to_string());
                let bound = self
                    .sessions
                    .map
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&key).cloned());
                if let Some(b) = bound.filter(|b| b.expires > now) {
                    let found = routes
                        .iter()
                        .find(|r| r.exit.device_id == b.device_id && r.exit.name == b.exit);
                    let why = match found {
                        None => Some("the exit went offline"),
                        Some(r) if !ok(r) => Some("the exit is not available"),
                        Some(r) if b.ip.is_some() && r.exit.external_ip() != b.ip => {
                            Some("the exit rotated to a new address")
                        }
                        Some(r) => {
                            if let Ok(mut m) = self.sessions.map.lock()
                                && let Some(e) = m.get_mut(&key)
                            {
                                e.expires = now + ttl;
                            }
                            return Some((r.clone(), Stickiness::Kept));
                        }
                    };
                    moved = why.map(|w| (format!("{}/{}", b.device_id, b.exit), w));
                }
                let candidates: Vec<&Route> = routes.iter().filter(|r| ok(r)).collect();
                let r = choose(&candidates, want.strategy, want.client, &self.rr)?;
                if let Ok(mut m) = self.sessions.map.lock() {
                    if m.len() >= self.sessions.max && !m.contains_key(&key) {
                        m.retain(|_, b| b.expires > now);
                    }
                    if m.len() < self.sessions.max || m.contains_key(&key) {
                        m.insert(
                            key,
                            Binding {
                                device_id: r.exit.device_id.clone(),
                                exit: r.exit.name.clone(),
                                ip: r.exit.external_ip(),
                                expires: now + ttl,
                            },
                        );
                    }
                }
                let st = match moved {
                    Some((from, why)) => Stickiness::Moved { from, why },
                    None => Stickiness::Bound,
                };
                return Some((r, st));
            }
            let candidates: Vec<&Route> = routes.iter().filter(|r| ok(r)).collect();
            choose(&candidates, want.strategy, want.client, &self.rr).map(|r| (r, Stickiness::None))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(country: &str, op: &str, labels: &[&str]) -> DeviceAttrs {
        DeviceAttrs {
            name: "pi03".into(),
            country: country.into(),
            region: "eu-central".into(),
            operator: op.into(),
            kind: "usb_modem".into(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn filters_match_every_set_field() {
        let d = attrs("de", "Vodafone.de", &["berlin", "pool-a"]);
        let f = |g: fn(&mut Filter)| {
            let mut x = Filter::default();
            g(&mut x);
            x.matches("dev-1", "m0", &d)
        };
        assert!(f(|_| {}));
        assert!(f(|x| x.country = Some("DE".into())));
        assert!(f(|x| x.region = Some("eu_central".into())));
        assert!(f(|x| x.label = Some("pool_a".into())));
        assert!(!f(|x| x.country = Some("fr".into())));
        assert!(f(|x| x.operator = Some("vodafone".into())));
        assert!(!f(|x| x.operator = Some("telekom".into())));
        assert!(f(|x| x.label = Some("berlin".into())));
        assert!(!f(|x| x.label = Some("paris".into())));
        assert!(f(|x| x.device = Some("pi03".into())));
        assert!(f(|x| x.device = Some("dev-1".into())));
        assert!(!f(|x| x.device = Some("pi04".into())));
        assert!(f(|x| x.kind = Some("usb_modem".into())));
        assert!(!f(|x| x.exit = Some("m1".into())));
        assert!(f(
            |x| x.allowed_labels = vec!["pool-a".into(), "pool-b".into()]
        ));
        assert!(!f(|x| x.allowed_labels = vec!["pool-b".into()]));
    }

    #[test]
    fn strategies_parse_and_render() {
        for s in [
            "round_robin",
            "least_connections",
            "random",
            "weighted",
            "ip_hash",
        ] {
            assert_eq!(Strategy::parse(s).unwrap().as_str(), s);
        }
        assert!(Strategy::parse("fastest").is_none());
    }

    #[test]
    fn sessions_are_bounded_and_listed() {
        let s = Sessions::new(2);
        let now = Instant::now();
        {
            let mut m = s.map.lock().unwrap();
            for (i, exp) in [(1, 10), (2, 0)] {
                m.insert(
                    ("c".into(), format!("s{i}")),
                    Binding {
                        device_id: "d".into(),
                        exit: "m0".into(),
                        ip: None,
                        expires: now + Duration::from_secs(exp),
                    },
                );
            }
        }
        assert_eq!(
            s.of_customer("c", now).len(),
            1,
            "expired ones are not listed"
        );
        s.prune(now);
        assert_eq!(s.len(), 1);
        assert!(s.release("c", "s1"));
        assert!(s.is_empty());
    }
}
