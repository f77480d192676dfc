//! Source-address allow lists: customers whose software cannot send proxy
//! credentials are recognised by the address they connect from.
//!
//! Glossary:
//! - **CIDR**: a network, `10.1.0.0/16` or `2001:db8::/32`. IPv4 networks
//!   live in the IPv4-mapped IPv6 space (`::ffff:0:0/96`), so a client that
//!   arrives as `::ffff:10.1.2.3` on a dual-stack listener matches
//!   `10.1.0.0/16` like `10.1.2.3` does.
//! - **table**: the networks of every enabled customer, longest prefix
//!   first; a source belongs to the customer of the longest network that
//!   contains it.
//!
//! The table lives in memory and is rebuilt from the store every
//! [`REFRESH_EVERY`] and right after an admin change. Credentials always win
//! over the source address; the proxies consult the table only when a
//! client sends none.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, info, warn};

use super::auth::Principal;
use crate::state::State;
use crate::store::{StoreError, now_ms};

/// How often the table is rebuilt from the store without an admin change
/// (other control planes sharing a PostgreSQL database may change it).
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// Where IPv4 lives inside the IPv6 space: `::ffff:0:0/96`.
const V4_MAPPED: u128 = 0xffff_u128 << 32;
const V4_OFFSET: u8 = 96;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IP address")]
    Address(String),
    #[error("prefix length {0:?} is not a number from 0 to {1}")]
    Prefix(String, u8),
    #[error("{0} has bits set beyond its prefix; did you mean {1}?")]
    HostBits(String, Cidr),
}

/// A network: the address bits in the IPv6 space and the prefix length
/// there (an IPv4 `/n` is stored as `/96+n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    bits: u128,
    len: u8,
}

fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => V4_MAPPED | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl Cidr {
    /// The network of `len` bits (in `ip`'s own family) around `ip`, host
    /// bits cleared.
    pub fn new(ip: IpAddr, len: u8) -> Option<Self> {
        let len = match ip {
            IpAddr::V4(_) if len <= 32 => len + V4_OFFSET,
            IpAddr::V6(_) if len <= 128 => len,
            _ => return None,
        };
        Some(Self {
            bits: key(ip) & mask(len),
            len,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        key(ip) & mask(self.len) == self.bits
    }

    /// Whether the network lies in the IPv4 space, so it prints as IPv4.
    fn is_v4(&self) -> bool {
        self.len >= V4_OFFSET && self.bits & mask(V4_OFFSET) == V4_MAPPED
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `ADDR/LEN`, or a bare address for a single host. Host bits must be
    /// clear: `10.0.0.1/8` is more likely a typo than a wish for `10/8`.
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip = IpAddr::from_str(addr).map_err(|_| CidrError::Address(addr.to_string()))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => l
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| CidrError::Prefix(l.to_string(), max))?,
            Some(l) => return Err(CidrError::Prefix(l.to_string(), max)),
        };
        let net = Cidr::new(ip, len).ok_or_else(|| CidrError::Prefix(len.to_string(), max))?;
        if net.bits != key(ip) {
            return Err(CidrError::HostBits(s.to_string(), net));
        }
        Ok(net)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_v4() {
            let v4 = Ipv4Addr::from(self.bits as u32);
            write!(f, "{v4}/{}", self.len - V4_OFFSET)
        } else {
            write!(f, "{}/{}", Ipv6Addr::from(self.bits), self.len)
        }
    }
}

/// Networks and their customers, longest prefix first. A linear scan: allow
/// lists are short (a few networks per customer that needs one).
#[derive(Debug, Default, Clone)]
pub struct Table {
    entries: Vec<(Cidr, String)>,
}

impl Table {
    /// Build from `(network, customer)` pairs. Should two customers hold
    /// the same network (the API refuses it, a shared database may not),
    /// the smaller customer id wins, so every control plane agrees.
    pub fn new(mut entries: Vec<(Cidr, String)>) -> Self {
        entries.sort_by(|a, b| b.0.len.cmp(&a.0.len).then_with(|| a.1.cmp(&b.1)));
        entries.dedup_by(|a, b| a.0 == b.0);
        Self { entries }
    }

    /// The customer whose longest network contains `ip`, with that network.
    pub fn find(&self, ip: IpAddr) -> Option<(&Cidr, &str)> {
        self.entries
            .iter()
            .find(|(net, _)| net.contains(ip))
            .map(|(net, c)| (net, c.as_str()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What a matched customer connects with.
#[derive(Debug, Clone)]
struct Grant {
    account_id: String,
    plan_id: Option<String>,
    expires_at: Option<i64>,
}

#[derive(Debug, Default)]
struct Snapshot {
    table: Table,
    grants: HashMap<String, Grant>,
}

/// One control plane's allow list (see the module documentation).
pub struct AllowList {
    snapshot: RwLock<Arc<Snapshot>>,
    /// The control plane it belongs to; see [`of`].
    state: Weak<State>,
    last_refresh: Mutex<Option<Instant>>,
    refreshing: AtomicBool,
    /// Stored bans go back into the limiter once, at the first refresh.
    bans_applied: AtomicBool,
}

impl AllowList {
    /// The customer a source address belongs to, as a principal for
    /// accounting (`username` is `ip:<network>`).
    pub fn lookup(&self, ip: IpAddr) -> Option<Principal> {
        let snap = self.snapshot.read().ok()?.clone();
        let (net, customer) = snap.table.find(ip)?;
        let g = snap.grants.get(customer)?;
        Some(Principal {
            customer_id: customer.to_string(),
            username: format!("ip:{net}"),
            account_id: g.account_id.clone(),
            plan_id: g.plan_id.clone(),
            expires_at: g.expires_at,
            params: Default::default(),
        })
    }
}

/// Allow lists by the address of their `State`. The coordinator has no
/// slot for this table yet; a process may run several control planes
/// (tests), so the key is the state and a list whose state is gone is
/// never returned.
static LISTS: Mutex<Vec<(usize, Arc<AllowList>)>> = Mutex::new(Vec::new());

fn addr_of(state: &State) -> usize {
    std::ptr::from_ref(state) as usize
}

/// The allow list of a running control plane; `None` before its first
/// [`tick`] (nothing is allow-listed yet then).
pub fn of(state: &State) -> Option<Arc<AllowList>> {
    let at = addr_of(state);
    let lists = LISTS.lock().ok()?;
    lists
        .iter()
        .find(|(a, l)| *a == at && l.state.upgrade().is_some_and(|s| addr_of(&s) == at))
        .map(|(_, l)| l.clone())
}

fn register(state: &Arc<State>) -> Arc<AllowList> {
    if let Some(l) = of(state) {
        return l;
    }
    let list = Arc::new(AllowList {
        snapshot: RwLock::new(Arc::new(Snapshot::default())),
        state: Arc::downgrade(state),
        last_refresh: Mutex::new(None),
        refreshing: AtomicBool::new(false),
        bans_applied: AtomicBool::new(false),
    });
    if let Ok(mut lists) = LISTS.lock() {
        lists.retain(|(_, l)| l.state.strong_count() > 0);
        lists.push((addr_of(state), list.clone()));
    }
    list
}

/// The customer allow-listed for `ip` on this control plane.
pub fn lookup(state: &State, ip: IpAddr) -> Option<Principal> {
    of(state)?.lookup(ip)
}

/// Called once a second: rebuild the table in the background when it is
/// due. Never waits for the store.
pub fn tick(state: &Arc<State>) {
    let list = register(state);
    let due = list
        .last_refresh
        .lock()
        .map(|t| t.is_none_or(|t| t.elapsed() >= REFRESH_EVERY))
        .unwrap_or(false);
    if !due || list.refreshing.swap(true, Ordering::AcqRel) {
        return;
    }
    let st = state.clone();
    state.tasks.spawn(async move {
        if let Err(e) = refresh(&st).await {
            warn!("loading allow lists failed: {e}");
        }
        list.refreshing.store(false, Ordering::Release);
    });
}

/// Rebuild the table from the store now (after an admin change, and from
/// [`tick`]). The first successful run also puts stored bans back into the
/// limiter, which forgets them at restart.
pub async fn refresh(state: &Arc<State>) -> Result<(), StoreError> {
    let list = register(state);
    let ips = state.store.all_customer_ips().await?;
    let customers = state.store.customers().await?;
    let disabled: std::collections::HashSet<&str> = customers
        .iter()
        .filter(|c| c.disabled)
        .map(|c| c.id.as_str())
        .collect();
    let grants: HashMap<String, Grant> = customers
        .iter()
        .filter(|c| !c.disabled && c.parent_id.as_deref().is_none_or(|p| !disabled.contains(p)))
        .map(|c| {
            (
                c.id.clone(),
                Grant {
                    account_id: c.parent_id.clone().unwrap_or_else(|| c.id.clone()),
                    plan_id: c.plan_id.clone(),
                    expires_at: c.expires_at,
                },
            )
        })
        .collect();
    let mut entries = Vec::with_capacity(ips.len());
    for row in ips {
        if !grants.contains_key(&row.customer_id) {
            continue;
        }
        match row.cidr.parse::<Cidr>() {
            Ok(net) => entries.push((net, row.customer_id)),
            Err(e) => warn!(customer = %row.customer_id, "stored allow-list entry skipped: {e}"),
        }
    }
    let table = Table::new(entries);
    debug!(networks = table.len(), "allow lists loaded");
    if let Ok(mut s) = list.snapshot.write() {
        *s = Arc::new(Snapshot { table, grants });
    }
    if let Ok(mut t) = list.last_refresh.lock() {
        *t = Some(Instant::now());
    }
    if !list.bans_applied.load(Ordering::Acquire) {
        let bans = state.store.active_bans(now_ms()).await?;
        for b in &bans {
            let account = customers
                .iter()
                .find(|c| c.id == b.customer_id)
                .and_then(|c| c.parent_id.clone())
                .unwrap_or_else(|| b.customer_id.clone());
            state
                .limiter
                .ban(&account, until_time(b.until_at), &b.reason);
        }
        if !bans.is_empty() {
            info!(bans = bans.len(), "stored bans applied");
        }
        list.bans_applied.store(true, Ordering::Release);
    }
    Ok(())
}

/// A stored Unix-ms end as the limiter's wall-clock time.
pub fn until_time(until_ms: Option<i64>) -> Option<SystemTime> {
    until_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_canonical_networks() {
        for (input, canon) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("127.0.0.1", "127.0.0.1/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("2001:DB8:0:0::1", "2001:db8::1/128"),
            ("::/0", "::/0"),
            ("::ffff:10.1.0.0/112", "10.1.0.0/16"),
            (" 192.168.1.0/24 ", "192.168.1.0/24"),
        ] {
            assert_eq!(net(input).to_string(), canon, "{input}");
        }
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/08x",
            "::/129",
            "example.com/8",
            "10.0.0/8",
            "10.0.0.1/8",
            "2001:db8::1/32",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
        match "10.0.0.1/8".parse::<Cidr>() {
            Err(CidrError::HostBits(_, suggestion)) => {
                assert_eq!(suggestion.to_string(), "10.0.0.0/8")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn longest_prefix_wins_across_families() {
        let t = Table::new(vec![
            (net("10.0.0.0/8"), "cus-wide".into()),
            (net("10.1.0.0/16"), "cus-narrow".into()),
            (net("10.1.2.3"), "cus-host".into()),
            (net("2001:db8::/32"), "cus-v6".into()),
        ]);
        let who = |s: &str| t.find(ip(s)).map(|(_, c)| c.to_string());
        assert_eq!(who("10.9.9.9").as_deref(), Some("cus-wide"));
        assert_eq!(who("10.1.9.9").as_deref(), Some("cus-narrow"));
        assert_eq!(who("10.1.2.3").as_deref(), Some("cus-host"));
        assert_eq!(who("::ffff:10.1.2.3").as_deref(), Some("cus-host"));
        assert_eq!(who("::ffff:10.1.9.9").as_deref(), Some("cus-narrow"));
        assert_eq!(who("2001:db8:1::5").as_deref(), Some("cus-v6"));
        assert_eq!(who("11.0.0.1"), None);
        assert_eq!(who("2001:db9::1"), None);
        // A v4 network never swallows native IPv6 sources, nor the reverse.
        let all_v4 = Table::new(vec![(net("0.0.0.0/0"), "cus-any4".into())]);
        assert!(all_v4.find(ip("2001:db8::1")).is_none());
        assert!(all_v4.find(ip("::ffff:8.8.8.8")).is_some());
        let t = Table::new(vec![(net("::/0"), "cus-any".into())]);
        assert!(t.find(ip("8.8.8.8")).is_some());
    }

    #[test]
    fn same_network_twice_goes_to_one_customer() {
        let t = Table::new(vec![
            (net("10.0.0.0/24"), "cus-b".into()),
            (net("10.0.0.0/24"), "cus-a".into()),
        ]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.find(ip("10.0.0.7")).unwrap().1, "cus-a");
    }

    fn any_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            any::<u128>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        ]
    }

    /// The address as 128 bits, IPv4 mapped, written out independently of
    /// the code under test.
    fn naive_bits(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => u128::from(v6),
        }
    }

    proptest! {
        #[test]
        fn network_contains_exactly_the_addresses_sharing_its_prefix(
            base in any_ip(), len in 0u8..=128, probe in any_ip(),
        ) {
            let (max, offset) = if base.is_ipv4() { (32, 96) } else { (128, 0) };
            let len = len % (max + 1);
            let n = Cidr::new(base, len).unwrap();
            prop_assert!(n.contains(base));
            let (a, b) = (naive_bits(base), naive_bits(probe));
            let same = (0..u32::from(len + offset)).all(|i| (a >> (127 - i)) & 1 == (b >> (127 - i)) & 1);
            prop_assert_eq!(n.contains(probe), same);
            // IPv4-mapped IPv6 sources match like their IPv4 address.
            if let IpAddr::V4(v4) = probe {
                prop_assert_eq!(n.contains(IpAddr::V6(v4.to_ipv6_mapped())), same);
            }
            // Canonical text parses back to the same network.
            prop_assert_eq!(n.to_string().parse::<Cidr>().unwrap(), n);
        }
    }
}
