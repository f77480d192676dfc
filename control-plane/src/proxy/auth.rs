//! Customer authentication: argon2id hashes in the database, a short cache
//! of recently verified credentials so a busy customer costs one argon2 run
//! per minute, not one per connection, and brute-force protection.
//!
//! Glossary:
//! - **source**: where an attempt comes from: an IPv4 address, or the /64
//!   of an IPv6 address (one subscriber usually holds a whole /64).
//! - **strike**: a failed login, counted against its source and against
//!   the username it tried (whether or not that username exists).
//! - **backoff**: once a source or a username has `threshold` strikes, it
//!   must wait before the next attempt is even looked at; the wait doubles
//!   with each further strike, up to a cap. Attempts during a backoff are
//!   refused *cheaply*: no database query, no argon2 run. The customer sees
//!   exactly what a wrong password gives (407, RFC 1929 status 1).
//! - **trusted source**: a source that logged in as a username recently. A
//!   username's backoff does not apply to it, so strangers guessing a
//!   customer's password cannot lock the customer out of their own
//!   machines. The source's own backoff still applies.
//!
//! The bookkeeping ([`Throttle`]) is a plain state machine that takes `now`
//! as an argument; [`Authenticator`] drives it with the clock.
//!
//! Unknown usernames and wrong passwords take the same path, including one
//! argon2 verification (against a dummy hash for unknown users), so timing
//! does not tell an attacker which usernames exist.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::store::Store;

const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 100_000;
/// A backoff refusal is logged at info at most this often per source or
/// username (debug otherwise): a flood of refused attempts must not become
/// a flood of log lines.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Longest username or password accepted (SOCKS5 allows 255 bytes).
pub const MAX_CRED_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub customer_id: String,
    /// The login the password was checked against (the username without
    /// its routing parameters).
    pub username: String,
    /// Whose limits and quota apply: the parent of a sub-user, else the
    /// customer itself.
    pub account_id: String,
    pub plan_id: Option<String>,
    pub expires_at: Option<i64>,
    /// Targeting and sticky-session parameters from the same parse.
    pub params: super::principal::RoutingParams,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// Wrong or missing credentials, or a source or username in backoff:
    /// the customer cannot tell which.
    #[error("invalid credentials")]
    Invalid,
    #[error("authentication unavailable")]
    Unavailable,
    /// The username's routing parameters are malformed; says what to fix
    /// (independent of whether the account exists).
    #[error("{0}")]
    BadParams(String),
}

/// Brute-force limits. Defaults suit a public proxy port; the caller may
/// fill them from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthLimits {
    /// Strikes from one source before it must back off. Higher than the
    /// per-username threshold: many customers may share one NAT address.
    pub source_threshold: u32,
    /// Strikes against one username, from anywhere, before it backs off.
    pub user_threshold: u32,
    /// The first backoff; it doubles with each strike after the threshold.
    pub base_backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
    /// Strikes are forgotten after this long without another one (counted
    /// from the end of the backoff, if any).
    pub forget_after: Duration,
    /// How long a successful login makes its source trusted for that
    /// username.
    pub trust_for: Duration,
    /// Most sources, usernames and trusted pairs tracked (each); beyond
    /// it the least telling entries are dropped, so sprayed usernames or
    /// addresses cannot grow memory without bound.
    pub max_tracked: usize,
}

impl Default for AuthLimits {
    fn default() -> Self {
        Self {
            source_threshold: 20,
            user_threshold: 10,
            base_backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(15 * 60),
            forget_after: Duration::from_secs(3600),
            trust_for: Duration::from_secs(24 * 3600),
            max_tracked: 65_536,
        }
    }
}

/// Where an attempt comes from, as far as counting goes: IPv4 addresses one
/// by one (IPv4-mapped IPv6 included), IPv6 by /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4(Ipv4Addr),
    V6Net(u64),
}

impl From<IpAddr> for SourceKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => SourceKey::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(v4),
                None => SourceKey::V6Net((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceKey::V4(ip) => write!(f, "{ip}"),
            SourceKey::V6Net(net) => {
                write!(
                    f,
                    "{}/64",
                    std::net::Ipv6Addr::from_bits(u128::from(*net) << 64)
                )
            }
        }
    }
}

/// A username as counted: a keyed hash, so memory per username is fixed
/// whatever an attacker sends, and the table holds no attacker-chosen text.
pub type UserKey = u64;

/// Strikes against one source or username.
#[derive(Debug, Clone)]
struct Strikes {
    failures: u32,
    last_failure: Instant,
    blocked_until: Option<Instant>,
    /// Last refusal logged at info.
    logged_at: Option<Instant>,
    /// Sources: the one username every strike was for, if so. A success
    /// for that username clears the source, one for another does not
    /// (credential stuffing tries many usernames from one address).
    only_user: Option<UserKey>,
    /// Usernames: the one source every strike came from, if so. A success
    /// from there clears the username (the customer mistyped); one from
    /// elsewhere does not, or a busy customer's logins would wipe out the
    /// strikes of guessers spread over many addresses.
    only_source: Option<SourceKey>,
    /// Strikes came from more than one counterpart (or an unknown one).
    mixed: bool,
    /// Usernames: the name, if it belongs to a customer (log lines only).
    label: Option<Box<str>>,
}

impl Strikes {
    fn new(now: Instant) -> Self {
        Self {
            failures: 0,
            last_failure: now,
            blocked_until: None,
            logged_at: None,
            only_user: None,
            only_source: None,
            mixed: false,
            label: None,
        }
    }

    fn wait(&self, now: Instant) -> Option<Duration> {
        self.blocked_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Forgotten: `forget_after` has passed since the last strike and the
    /// end of the last backoff. Counting from the end of the backoff keeps
    /// a guesser who waits out a long backoff at one guess per backoff,
    /// instead of a fresh threshold's worth.
    fn stale(&self, now: Instant, forget_after: Duration) -> bool {
        let quiet_since = self
            .blocked_until
            .map_or(self.last_failure, |b| b.max(self.last_failure));
        now.saturating_duration_since(quiet_since) >= forget_after
    }

    /// One more strike; `true` when this one reached the threshold.
    fn strike(&mut self, threshold: u32, limits: &AuthLimits, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        self.last_failure = now;
        if self.failures >= threshold {
            let doublings = (self.failures - threshold).min(31);
            let backoff = limits
                .base_backoff
                .saturating_mul(1u32 << doublings)
                .min(limits.max_backoff);
            self.blocked_until = Some(now + backoff);
        }
        self.failures == threshold
    }
}

/// What an attempt was refused for, or what crossed a threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Source(SourceKey),
    /// A username: its name when it belongs to a customer.
    User(UserKey, Option<Box<str>>),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Source(s) => write!(f, "{s}"),
            Subject::User(_, Some(name)) => write!(f, "user {name}"),
            // Not echoed: people type passwords into username fields.
            Subject::User(key, None) => write!(f, "unknown username #{:08x}", key >> 32),
        }
    }
}

/// A cheap refusal: who is backing off, after how many strikes, how long
/// is left, and whether this refusal deserves an info line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub subject: Subject,
    pub failures: u32,
    pub left: Duration,
    pub log: bool,
}

/// A source or username that has just reached its threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub subject: Subject,
    pub failures: u32,
    pub backoff: Duration,
}

/// Brute-force bookkeeping: strikes per source and per username, and the
/// sources trusted for a username. No I/O, no clock.
pub struct Throttle {
    limits: AuthLimits,
    hasher: RandomState,
    sources: HashMap<SourceKey, Strikes>,
    users: HashMap<UserKey, Strikes>,
    trusted: HashMap<(UserKey, SourceKey), Instant>,
}

impl Throttle {
    pub fn new(limits: AuthLimits) -> Self {
        Self {
            limits,
            hasher: RandomState::new(),
            sources: HashMap::new(),
            users: HashMap::new(),
            trusted: HashMap::new(),
        }
    }

    pub fn user_key(&self, username: &[u8]) -> UserKey {
        self.hasher.hash_one(username)
    }

    /// May this attempt go ahead to the database and argon2? A refusal
    /// because of the username counts as a strike against the source too
    /// (it is still an attempt with credentials nobody checked); one
    /// because of the source counts against nothing, so a source in
    /// backoff cannot push other customers' usernames into backoff.
    pub fn check(
        &mut self,
        source: Option<SourceKey>,
        user: Option<UserKey>,
        now: Instant,
    ) -> Result<(), (Refusal, Option<Alert>)> {
        let forget = self.limits.forget_after;
        if let Some(s) = source {
            if self.sources.get(&s).is_some_and(|e| e.stale(now, forget)) {
                self.sources.remove(&s);
            }
            if let Some(e) = self.sources.get_mut(&s)
                && let Some(left) = e.wait(now)
            {
                let log = take_log_turn(e, now);
                return Err((
                    Refusal {
                        subject: Subject::Source(s),
                        failures: e.failures,
                        left,
                        log,
                    },
                    None,
                ));
            }
        }
        let Some(u) = user else {
            return Ok(());
        };
        if self.users.get(&u).is_some_and(|e| e.stale(now, forget)) {
            self.users.remove(&u);
        }
        let trusted = source.is_some_and(|s| self.is_trusted(u, s, now));
        let Some(e) = self.users.get_mut(&u) else {
            return Ok(());
        };
        let Some(left) = e.wait(now).filter(|_| !trusted) else {
            return Ok(());
        };
        let log = take_log_turn(e, now);
        let refusal = Refusal {
            subject: Subject::User(u, e.label.clone()),
            failures: e.failures,
            left,
            log,
        };
        let alert = source.and_then(|s| self.strike_source(s, Some(u), now));
        Err((refusal, alert))
    }

    /// A login failed after the full check (or was malformed). `label`: the
    /// username, when it belongs to a customer.
    pub fn failed(
        &mut self,
        source: Option<SourceKey>,
        user: Option<UserKey>,
        label: Option<&str>,
        now: Instant,
    ) -> Vec<Alert> {
        let mut alerts = Vec::new();
        if let Some(s) = source {
            alerts.extend(self.strike_source(s, user, now));
        }
        if let Some(u) = user {
            make_room(&mut self.users, &u, &self.limits, now);
            let limits = self.limits;
            let e = self.users.entry(u).or_insert_with(|| Strikes::new(now));
            if let (None, Some(l)) = (&e.label, label) {
                e.label = Some(l.into());
            }
            attribute(e.failures == 0, &mut e.only_source, &mut e.mixed, source);
            if e.strike(limits.user_threshold, &limits, now) {
                alerts.push(Alert {
                    subject: Subject::User(u, e.label.clone()),
                    failures: e.failures,
                    backoff: e.wait(now).unwrap_or_default(),
                });
            }
        }
        alerts
    }

    /// A login succeeded: the source is trusted for the username from now
    /// on; the username's strikes go if they all came from this source,
    /// and the source's strikes go if they were all for this username.
    pub fn succeeded(&mut self, source: Option<SourceKey>, user: UserKey, now: Instant) {
        let Some(s) = source else {
            return;
        };
        if self
            .users
            .get(&user)
            .is_some_and(|e| !e.mixed && e.only_source == Some(s))
        {
            self.users.remove(&user);
        }
        if self
            .sources
            .get(&s)
            .is_some_and(|e| !e.mixed && e.only_user == Some(user))
        {
            self.sources.remove(&s);
        }
        if !self.trusted.contains_key(&(user, s)) && self.trusted.len() >= self.limits.max_tracked {
            let trust_for = self.limits.trust_for;
            self.trusted
                .retain(|_, at| now.saturating_duration_since(*at) < trust_for);
            if self.trusted.len() >= self.limits.max_tracked {
                evict_eighth(&mut self.trusted, |at| *at);
            }
        }
        self.trusted.insert((user, s), now);
    }

    fn is_trusted(&self, user: UserKey, source: SourceKey, now: Instant) -> bool {
        self.trusted
            .get(&(user, source))
            .is_some_and(|at| now.saturating_duration_since(*at) < self.limits.trust_for)
    }

    fn strike_source(
        &mut self,
        s: SourceKey,
        user: Option<UserKey>,
        now: Instant,
    ) -> Option<Alert> {
        make_room(&mut self.sources, &s, &self.limits, now);
        let limits = self.limits;
        let e = self.sources.entry(s).or_insert_with(|| Strikes::new(now));
        attribute(e.failures == 0, &mut e.only_user, &mut e.mixed, user);
        e.strike(limits.source_threshold, &limits, now)
            .then(|| Alert {
                subject: Subject::Source(s),
                failures: e.failures,
                backoff: e.wait(now).unwrap_or_default(),
            })
    }

    /// Sources and usernames currently tracked (for tests and metrics).
    pub fn tracked(&self) -> (usize, usize, usize) {
        (self.sources.len(), self.users.len(), self.trusted.len())
    }
}

/// Note the counterpart (source or username) of a strike about to be
/// counted: `sole` holds the only one so far.
fn attribute<K: PartialEq>(first: bool, sole: &mut Option<K>, mixed: &mut bool, who: Option<K>) {
    match who {
        Some(k) if first => *sole = Some(k),
        Some(k) if sole.as_ref() == Some(&k) => {}
        _ => *mixed = true,
    }
}

fn take_log_turn(e: &mut Strikes, now: Instant) -> bool {
    let due = e
        .logged_at
        .is_none_or(|at| now.saturating_duration_since(at) >= REFUSAL_LOG_EVERY);
    if due {
        e.logged_at = Some(now);
    }
    due
}

/// Before inserting `key`: if the table is full, drop forgotten entries,
/// then if need be the least telling eighth (not in backoff, fewest
/// strikes, oldest). Spraying fresh names or addresses thus evicts other
/// one-strike entries, not the backoffs that matter. Amortised O(1) per
/// insert: a full pass frees an eighth of the table.
fn make_room<K: Eq + Hash + Copy>(
    map: &mut HashMap<K, Strikes>,
    key: &K,
    limits: &AuthLimits,
    now: Instant,
) {
    if map.len() < limits.max_tracked || map.contains_key(key) {
        return;
    }
    map.retain(|_, e| !e.stale(now, limits.forget_after));
    if map.len() >= limits.max_tracked {
        evict_eighth(map, |e| (e.wait(now).is_some(), e.failures, e.last_failure));
    }
}

fn evict_eighth<K: Eq + Hash + Copy, V, O: Ord>(map: &mut HashMap<K, V>, rank: impl Fn(&V) -> O) {
    let n = (map.len() / 8).max(1);
    let mut order: Vec<(O, K)> = map.iter().map(|(k, v)| (rank(v), *k)).collect();
    if n < order.len() {
        order.select_nth_unstable_by(n, |a, b| a.0.cmp(&b.0));
    }
    for (_, k) in order.into_iter().take(n) {
        map.remove(&k);
    }
}

/// Counters for metrics and alerting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthStats {
    /// argon2 verifications started (real and dummy hashes alike).
    pub hash_runs: u64,
    /// Attempts refused by a backoff, without a database query or argon2.
    pub refused_in_backoff: u64,
    /// Sources and usernames that reached their threshold.
    pub alerts: u64,
}

/// A verified credential.
///
/// The principal is a copy of account data (plan id, expiry, whether the
/// parent is enabled) read when the password was checked. The plan itself
/// is not copied, only its id: a plan edit reaches cached logins through
/// the plans cache at once. Everything else is kept fresh by invalidation:
/// a change to any account the entry was read from drops the entry, so a
/// sub-user or an extra credential does not keep its parent's old plan,
/// expiry or enabled state until the entry ages out. That costs nothing per
/// connection, unlike reading the parent again on every cache hit.
struct Cached {
    principal: Principal,
    /// A keyed digest of the password.
    digest: [u8; 32],
    at: Instant,
    /// Usernames of the customers whose rows decided `principal`: the
    /// login's own customer, the owner of a credential, the parent of a
    /// sub-user. [`Authenticator::invalidate`] of any of them drops it.
    accounts: Vec<String>,
}

pub struct Authenticator {
    store: Store,
    /// Per-process random key so cache entries are not plain password hashes.
    cache_key: [u8; 32],
    cache: Mutex<HashMap<String, Cached>>,
    /// Bumped by every invalidation: a check that began before one may
    /// have read the old rows, so its answer is returned but not cached.
    generation: AtomicU64,
    dummy_hash: String,
    /// Argon2 runs at once. Each takes 19 MiB and a core for tens of
    /// milliseconds; without a bound, a flood of wrong passwords would run
    /// hundreds at a time on the blocking pool and exhaust memory. Callers
    /// wait for a permit under their handshake deadline.
    hashers: std::sync::Arc<tokio::sync::Semaphore>,
    throttle: Mutex<Throttle>,
    hash_runs: AtomicU64,
    refused_in_backoff: AtomicU64,
    alerts: AtomicU64,
}

/// argon2id with the crate defaults (19 MiB, t=2, p=1) and a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn verify(password: &[u8], phc: &str) -> bool {
    Argon2::default().verify_password(password, phc).is_ok()
}

tokio::task_local! {
    static CONNECTION: Connection;
}

/// The customer connection a credential check belongs to: set by the
/// accept loop around each connection's task, so the protocol handlers
/// need not pass it along.
struct Connection {
    source: IpAddr,
    /// Released once the connection authenticates (or when it ends): the
    /// accept loop's handshake slot.
    until_authenticated: Mutex<Option<Box<dyn Send>>>,
}

/// Run `fut`, one customer connection from `source`, so that
/// [`Authenticator::verify`] counts its attempts against `source` and drops
/// `until_authenticated` as soon as the connection authenticates.
pub async fn for_connection<F: Future>(
    source: IpAddr,
    until_authenticated: Box<dyn Send>,
    fut: F,
) -> F::Output {
    let conn = Connection {
        source,
        until_authenticated: Mutex::new(Some(until_authenticated)),
    };
    CONNECTION.scope(conn, fut).await
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Authenticator {
    pub fn new(store: Store) -> Self {
        Self::with_limits(store, AuthLimits::default())
    }

    pub fn with_limits(store: Store, limits: AuthLimits) -> Self {
        Self {
            store,
            cache_key: rand::random(),
            cache: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            dummy_hash: hash_password("cellgate-dummy-password").unwrap_or_default(),
            hashers: std::sync::Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism()
                    .map_or(2, |n| n.get())
                    .clamp(1, 16),
            )),
            throttle: Mutex::new(Throttle::new(limits)),
            hash_runs: AtomicU64::new(0),
            refused_in_backoff: AtomicU64::new(0),
            alerts: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> AuthStats {
        AuthStats {
            hash_runs: self.hash_runs.load(Ordering::Relaxed),
            refused_in_backoff: self.refused_in_backoff.load(Ordering::Relaxed),
            alerts: self.alerts.load(Ordering::Relaxed),
        }
    }

    fn digest(&self, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update(password);
        h.finalize().into()
    }

    /// Check a username and password (raw bytes, as customers sent them)
    /// for the connection being handled (see [`for_connection`]).
    pub async fn verify(&self, username: &[u8], password: &[u8]) -> Result<Principal, AuthError> {
        let source = CONNECTION.try_with(|c| c.source).ok();
        let r = self.verify_from(source, username, password).await;
        if r.is_ok() {
            let _ = CONNECTION.try_with(|c| lock(&c.until_authenticated).take());
        }
        r
    }

    /// Check credentials sent from `source` (`None`: not counted per
    /// source).
    pub async fn verify_from(
        &self,
        source: Option<IpAddr>,
        username: &[u8],
        password: &[u8],
    ) -> Result<Principal, AuthError> {
        let source = source.map(SourceKey::from);
        if username.is_empty() || username.len() > MAX_CRED_LEN || password.len() > MAX_CRED_LEN {
            self.failed(source, None, None);
            return Err(AuthError::Invalid);
        }
        let Ok(full) = std::str::from_utf8(username) else {
            self.failed(source, None, None);
            return Err(AuthError::Invalid);
        };
        // One parse gives both the login checked below and the routing
        // parameters returned with it.
        let parsed = match super::principal::parse_username(full) {
            Ok(p) => p,
            Err(e) => {
                self.failed(source, None, None);
                return Err(AuthError::BadParams(e.to_string()));
            }
        };
        let username = parsed.login.as_str();
        let params = parsed.params;
        // Once usernames carry routing parameters, callers pass the login
        // alone here, so varying parameters cannot dodge this count.
        let user = lock(&self.throttle).user_key(username.as_bytes());
        self.admit(source, user)?;
        let digest = self.digest(password);
        if let Some(mut p) = self.cached(username, &digest) {
            lock(&self.throttle).succeeded(source, user, Instant::now());
            p.params = params;
            return Ok(p);
        }
        let generation = self.generation.load(Ordering::Acquire);
        let row = self
            .store
            .customer_by_username(username)
            .await
            .map_err(|_| AuthError::Unavailable)?;
        // A login no customer has may be a credential: it authenticates as
        // its owner, with its own hash, and is accounted under the login.
        let row = match row {
            Some(r) => Some((r.password_hash.clone(), r)),
            None => self
                .store
                .credential_by_username(username)
                .await
                .map_err(|_| AuthError::Unavailable)?
                .map(|(owner, phc)| (phc, owner)),
        };
        // A sub-user connects under its parent's plan and expiry; a missing
        // or disabled parent disables it.
        let parent = match row.as_ref().and_then(|(_, r)| r.parent_id.as_deref()) {
            Some(pid) => Some(
                self.store
                    .customer_by_id(pid)
                    .await
                    .map_err(|_| AuthError::Unavailable)?
                    .filter(|p| !p.disabled),
            ),
            None => None,
        };
        // Unknown users cost the same argon2 run as wrong passwords, so
        // response timing does not reveal which usernames exist.
        let (phc, principal) = match &row {
            Some((phc, r)) if !r.disabled && !matches!(parent, Some(None)) => {
                let (plan_id, expires_at) = match parent.as_ref().and_then(|p| p.as_ref()) {
                    Some(p) => (
                        p.plan_id.clone(),
                        match (r.expires_at, p.expires_at) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        },
                    ),
                    None => (r.plan_id.clone(), r.expires_at),
                };
                let mut accounts = vec![r.username.clone()];
                if let Some(Some(p)) = &parent {
                    accounts.push(p.username.clone());
                }
                (
                    phc.clone(),
                    Some((
                        Principal {
                            customer_id: r.id.clone(),
                            username: username.to_string(),
                            account_id: r.parent_id.clone().unwrap_or_else(|| r.id.clone()),
                            plan_id,
                            expires_at,
                            params: Default::default(),
                        },
                        accounts,
                    )),
                )
            }
            _ => (self.dummy_hash.clone(), None),
        };
        let pw = password.to_vec();
        // The permit moves into the blocking task, so a caller that gives up
        // (deadline) does not free a slot while its hash is still running:
        // an abandoned task's result, permit included, is dropped when the
        // hash ends.
        let permit = self
            .hashers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AuthError::Unavailable)?;
        // The wait for a hasher may have been long. Meanwhile a parallel
        // connection may have verified these very credentials (a customer
        // opening many connections at once costs one run per hasher, not
        // one per connection), or strikes may have put the source or the
        // username into backoff (a parallel burst of guesses is cut short).
        if let Some(mut p) = self.cached(username, &digest) {
            lock(&self.throttle).succeeded(source, user, Instant::now());
            p.params = params;
            return Ok(p);
        }
        self.admit(source, user)?;
        self.hash_runs.fetch_add(1, Ordering::Relaxed);
        // The permit comes back with the result and is held until the cache
        // has the answer, so the next waiter for a hasher finds it there.
        let (ok, permit) =
            match tokio::task::spawn_blocking(move || (verify(&pw, &phc), permit)).await {
                Ok((ok, permit)) => (ok, Some(permit)),
                Err(_) => (false, None),
            };
        match (ok, principal) {
            (true, Some((p, accounts))) => {
                let mut cache = lock(&self.cache);
                if self.generation.load(Ordering::Acquire) == generation {
                    if cache.len() >= CACHE_MAX {
                        cache.retain(|_, c| c.at.elapsed() < CACHE_TTL);
                    }
                    cache.insert(
                        username.to_string(),
                        Cached {
                            principal: p.clone(),
                            digest,
                            at: Instant::now(),
                            accounts,
                        },
                    );
                }
                drop(cache);
                drop(permit);
                lock(&self.throttle).succeeded(source, user, Instant::now());
                let mut p = p;
                p.params = params;
                Ok(p)
            }
            (_, p) => {
                let label = p.as_ref().map(|(p, _)| p.username.as_str());
                self.failed(source, Some(user), label);
                Err(AuthError::Invalid)
            }
        }
    }

    fn cached(&self, username: &str, digest: &[u8; 32]) -> Option<Principal> {
        let cache = lock(&self.cache);
        let c = cache.get(username)?;
        (&c.digest == digest && c.at.elapsed() < CACHE_TTL).then(|| c.principal.clone())
    }

    /// Refuse cheaply while the source or the username backs off.
    fn admit(&self, source: Option<SourceKey>, user: UserKey) -> Result<(), AuthError> {
        let verdict = lock(&self.throttle).check(source, Some(user), Instant::now());
        let Err((r, alert)) = verdict else {
            return Ok(());
        };
        self.refused_in_backoff.fetch_add(1, Ordering::Relaxed);
        let secs = r.left.as_secs_f64().ceil() as u64;
        if r.log {
            info!(
                "auth: backoff for {} ({} failures), {secs} s left",
                r.subject, r.failures
            );
        } else {
            debug!(
                "auth: backoff for {} ({} failures), {secs} s left",
                r.subject, r.failures
            );
        }
        if let Some(a) = alert {
            self.alert(&a);
        }
        Err(AuthError::Invalid)
    }

    fn failed(&self, source: Option<SourceKey>, user: Option<UserKey>, label: Option<&str>) {
        let alerts = lock(&self.throttle).failed(source, user, label, Instant::now());
        for a in &alerts {
            self.alert(a);
        }
    }

    fn alert(&self, a: &Alert) {
        self.alerts.fetch_add(1, Ordering::Relaxed);
        warn!(
            alert = "auth_brute_force",
            "auth: {} reached {} failed logins; further attempts refused for {} s, doubling with each failure",
            a.subject,
            a.failures,
            a.backoff.as_secs()
        );
    }

    /// Forget a login's cached credentials (deleted, password changed,
    /// access changed) and those of every login that depends on it: the
    /// customer's sub-users and extra credentials.
    pub fn invalidate(&self, username: &str) {
        let mut cache = lock(&self.cache);
        self.generation.fetch_add(1, Ordering::AcqRel);
        cache.retain(|login, c| login != username && !c.accounts.iter().any(|a| a == username));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_and_verify() {
        let h = hash_password("pw").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify(b"pw", &h));
        assert!(!verify(b"pW", &h));
        assert!(!verify(b"pw", "not a hash"));
    }

    const S: Duration = Duration::from_secs(1);

    fn ip(s: &str) -> Option<SourceKey> {
        Some(SourceKey::from(s.parse::<IpAddr>().unwrap()))
    }

    fn limits() -> AuthLimits {
        AuthLimits {
            source_threshold: 5,
            user_threshold: 3,
            base_backoff: 10 * S,
            max_backoff: 100 * S,
            forget_after: 1000 * S,
            trust_for: 5000 * S,
            max_tracked: 64,
        }
    }

    fn refused(r: Result<(), (Refusal, Option<Alert>)>) -> Refusal {
        r.expect_err("expected a refusal").0
    }

    #[test]
    fn a_source_backs_off_after_its_threshold_and_the_wait_doubles_to_the_cap() {
        let mut t = Throttle::new(limits());
        let t0 = Instant::now();
        let src = ip("192.0.2.7");
        // Five different usernames: the per-username threshold stays out
        // of the way.
        for i in 0..4u8 {
            let u = t.user_key(&[b'u', i]);
            assert!(t.check(src, Some(u), t0).is_ok());
            assert!(t.failed(src, Some(u), None, t0).is_empty());
        }
        let u = t.user_key(b"u4");
        let alerts = t.failed(src, Some(u), None, t0);
        assert_eq!(
            alerts,
            [Alert {
                subject: Subject::Source(src.unwrap()),
                failures: 5,
                backoff: 10 * S
            }]
        );
        // Refused for anyone from there, even a username never tried.
        let fresh = t.user_key(b"fresh");
        let r = refused(t.check(src, Some(fresh), t0 + S));
        assert_eq!(r.subject, Subject::Source(src.unwrap()));
        assert_eq!((r.failures, r.left, r.log), (5, 9 * S, true));
        // Refusals are not strikes; only logged once per interval.
        let r = refused(t.check(src, Some(fresh), t0 + 2 * S));
        assert_eq!((r.failures, r.log), (5, false));
        // Other sources are unaffected.
        assert!(t.check(ip("192.0.2.8"), Some(fresh), t0 + S).is_ok());
        // Once the wait is over, one more failure doubles it.
        assert!(t.check(src, Some(fresh), t0 + 10 * S).is_ok());
        assert!(t.failed(src, Some(fresh), None, t0 + 10 * S).is_empty());
        assert_eq!(refused(t.check(src, None, t0 + 10 * S)).left, 20 * S);
        let mut now = t0 + 30 * S;
        for want in [40, 80, 100, 100] {
            assert!(t.check(src, None, now).is_ok(), "after the wait");
            t.failed(src, None, None, now);
            assert_eq!(refused(t.check(src, None, now)).left, want * S);
            now += want * S;
        }
        // A wait that is over lets the right password through (the
        // expiry path, with time injected).
        assert!(t.check(src, Some(fresh), now).is_ok());
    }

    #[test]
    fn a_username_backs_off_from_anywhere_except_where_it_logged_in() {
        let mut t = Throttle::new(limits());
        let t0 = Instant::now();
        let alice = t.user_key(b"alice");
        let home = ip("198.51.100.1");
        t.succeeded(home, alice, t0);
        // Three guesses from three addresses.
        for (i, a) in ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
            .iter()
            .enumerate()
        {
            assert!(t.check(ip(a), Some(alice), t0).is_ok());
            let alerts = t.failed(ip(a), Some(alice), Some("alice"), t0);
            assert_eq!(alerts.len(), usize::from(i == 2), "{alerts:?}");
        }
        // A fourth address: refused, and that counts against the address.
        let r = refused(t.check(ip("203.0.113.4"), Some(alice), t0 + S));
        assert_eq!(r.subject, Subject::User(alice, Some("alice".into())));
        assert_eq!(r.to_string_for_test(), "user alice (3 failures), 9 s left");
        assert_eq!(t.sources[&ip("203.0.113.4").unwrap()].failures, 1);
        // Where alice logged in before, the username's backoff does not
        // apply: strangers cannot lock a customer out of their machines.
        assert!(t.check(home, Some(alice), t0 + S).is_ok());
        // Other usernames are unaffected anywhere.
        let bob = t.user_key(b"bob");
        assert!(t.check(ip("203.0.113.1"), Some(bob), t0 + S).is_ok());
        // After the wait alice gets in from a new address; that does not
        // wipe out strikes that came from elsewhere (they fade after
        // `forget_after`): the next guess doubles the wait.
        assert!(t.check(ip("203.0.113.9"), Some(alice), t0 + 10 * S).is_ok());
        t.succeeded(ip("203.0.113.9"), alice, t0 + 10 * S);
        t.failed(ip("203.0.113.5"), Some(alice), None, t0 + 11 * S);
        let r = refused(t.check(ip("203.0.113.6"), Some(alice), t0 + 11 * S));
        assert_eq!((r.failures, r.left), (4, 20 * S));
    }

    impl Refusal {
        fn to_string_for_test(&self) -> String {
            format!(
                "{} ({} failures), {} s left",
                self.subject,
                self.failures,
                self.left.as_secs()
            )
        }
    }

    #[test]
    fn a_success_clears_the_source_only_if_it_tried_that_username_alone() {
        let mut t = Throttle::new(limits());
        let t0 = Instant::now();
        let (alice, bob) = (t.user_key(b"alice"), t.user_key(b"bob"));
        let typo = ip("192.0.2.1");
        let stuffer = ip("192.0.2.2");
        for _ in 0..2 {
            t.failed(typo, Some(alice), None, t0);
        }
        t.succeeded(typo, alice, t0);
        assert!(!t.sources.contains_key(&typo.unwrap()));
        assert!(!t.users.contains_key(&alice));
        // Strikes from two addresses: a success from one of them leaves
        // the username's count alone.
        let carol = t.user_key(b"carol");
        t.failed(typo, Some(carol), None, t0);
        t.failed(ip("192.0.2.9"), Some(carol), None, t0);
        t.succeeded(typo, carol, t0);
        assert_eq!(t.users[&carol].failures, 2);
        // Stuffing: one address, many usernames; one hit clears nothing.
        for i in 0..4u8 {
            let u = t.user_key(&[b's', i]);
            t.failed(stuffer, Some(u), None, t0);
        }
        t.failed(stuffer, Some(bob), None, t0);
        assert!(t.check(stuffer, Some(alice), t0).is_err());
        t.failed(stuffer, None, None, t0);
        t.succeeded(stuffer, bob, t0);
        assert_eq!(t.sources[&stuffer.unwrap()].failures, 6);
        // Malformed attempts (no username) count against the source.
        let garbage = ip("192.0.2.3");
        t.failed(garbage, None, None, t0);
        t.succeeded(garbage, alice, t0);
        assert_eq!(t.sources[&garbage.unwrap()].failures, 1);
    }

    #[test]
    fn strikes_are_forgotten_after_a_quiet_period() {
        let mut t = Throttle::new(limits());
        let t0 = Instant::now();
        let src = ip("192.0.2.1");
        for _ in 0..4 {
            t.failed(src, None, None, t0);
        }
        let later = t0 + 1000 * S;
        assert!(t.check(src, None, later).is_ok());
        // Forgotten: four more strikes do not reach the threshold of five.
        for _ in 0..4 {
            t.failed(src, None, None, later);
        }
        assert!(t.check(src, None, later).is_ok());
        t.failed(src, None, None, later);
        assert!(t.check(src, None, later).is_err());
        // In backoff (10 s): remembered until `forget_after` past its end,
        // so one more guess there doubles the wait.
        let end = later + 10 * S;
        assert!(t.check(src, None, end + 999 * S).is_ok());
        t.failed(src, None, None, end + 999 * S);
        assert_eq!(refused(t.check(src, None, end + 999 * S)).left, 20 * S);
        let end = end + 999 * S + 20 * S;
        assert!(t.check(src, None, end + 1000 * S).is_ok());
        assert!(!t.sources.contains_key(&src.unwrap()));
    }

    #[test]
    fn ipv6_counts_by_slash_64_and_mapped_ipv4_as_ipv4() {
        let a = ip("2001:db8:1:2::1").unwrap();
        assert_eq!(a, ip("2001:db8:1:2:ffff::9").unwrap());
        assert_ne!(a, ip("2001:db8:1:3::1").unwrap());
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_eq!(ip("::ffff:192.0.2.1"), ip("192.0.2.1"));
    }

    #[test]
    fn spraying_usernames_and_addresses_keeps_memory_bounded_and_keeps_real_backoffs() {
        let mut t = Throttle::new(limits());
        let t0 = Instant::now();
        let victim = t.user_key(b"victim");
        let attacker = ip("192.0.2.66");
        for _ in 0..3 {
            t.failed(attacker, Some(victim), Some("victim"), t0);
        }
        for _ in 0..5 {
            t.failed(attacker, None, None, t0);
        }
        for i in 0..10_000u32 {
            let src = Some(SourceKey::V4(Ipv4Addr::from(0x0a00_0000 + i)));
            let u = t.user_key(&i.to_be_bytes());
            if t.check(src, Some(u), t0 + S).is_ok() {
                t.failed(src, Some(u), None, t0 + S);
            }
            t.succeeded(src, u ^ 1, t0 + S);
            let (s, u, tr) = t.tracked();
            assert!(s <= 64 && u <= 64 && tr <= 64, "{s} {u} {tr} after {i}");
        }
        assert!(t.check(ip("192.0.2.1"), Some(victim), t0 + 2 * S).is_err());
        assert!(t.check(attacker, None, t0 + 2 * S).is_err());
    }

    // ---- the authenticator over a real store --------------------------

    async fn store_with_alice() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("cg-auth-{}", rand::random::<u64>()));
        let cfg = crate::config::Config {
            data_dir: dir.clone(),
            ..Default::default()
        };
        let store = Store::open(&cfg).await.unwrap();
        let hash = hash_password("alice-right-password").unwrap();
        store
            .insert_customer("cus-0000000000a1", "alice", &hash)
            .await
            .unwrap();
        (store, dir)
    }

    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }

    /// The timing-oracle property, asserted structurally: an unknown
    /// username and a wrong password each cost exactly one argon2
    /// verification, through the same code path. The medians are printed
    /// for the record only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_users_and_wrong_passwords_cost_one_argon2_run_each() {
        let (store, dir) = store_with_alice().await;
        let open = AuthLimits {
            source_threshold: u32::MAX,
            user_threshold: u32::MAX,
            ..AuthLimits::default()
        };
        let auth = Authenticator::with_limits(store.clone(), open);
        let src = Some(IpAddr::from([192, 0, 2, 1]));
        // Warm up: the first database query and the blocking pool.
        let _ = auth.verify_from(src, b"warm-up", b"x").await;
        let mut unknown = Vec::new();
        let mut wrong = Vec::new();
        for i in 0..30 {
            let before = auth.stats().hash_runs;
            let t = Instant::now();
            let r = auth
                .verify_from(
                    src,
                    format!("nobody-{i}").as_bytes(),
                    b"alice-right-password",
                )
                .await;
            unknown.push(t.elapsed());
            assert_eq!(r, Err(AuthError::Invalid));
            assert_eq!(auth.stats().hash_runs, before + 1, "unknown user #{i}");

            let before = auth.stats().hash_runs;
            let t = Instant::now();
            let r = auth
                .verify_from(src, b"alice", format!("wrong-{i}").as_bytes())
                .await;
            wrong.push(t.elapsed());
            assert_eq!(r, Err(AuthError::Invalid));
            assert_eq!(auth.stats().hash_runs, before + 1, "wrong password #{i}");
        }
        let (mu, mw) = (median(unknown), median(wrong));
        let diff = mu.abs_diff(mw);
        eprintln!(
            "median over 30 attempts: unknown user {mu:?}, wrong password {mw:?}, difference {diff:?}"
        );
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backoff_refusals_cost_no_argon2_and_look_like_wrong_passwords() {
        let (store, dir) = store_with_alice().await;
        let auth = Authenticator::new(store.clone());
        let (attacker, home) = (
            Some(IpAddr::from([203, 0, 113, 9])),
            Some(IpAddr::from([198, 51, 100, 1])),
        );
        let right = b"alice-right-password".as_slice();
        assert!(auth.verify_from(home, b"alice", right).await.is_ok());
        let before = auth.stats();
        let threshold = AuthLimits::default().user_threshold;
        for i in 0..threshold {
            let r = auth
                .verify_from(attacker, b"alice", format!("guess-{i}").as_bytes())
                .await;
            assert_eq!(r, Err(AuthError::Invalid));
        }
        let s = auth.stats();
        assert_eq!(s.hash_runs - before.hash_runs, u64::from(threshold));
        assert_eq!(s.alerts - before.alerts, 1);
        // In backoff: even the right password is refused, with the same
        // error, and without a hash.
        for pw in [b"guess-x".as_slice(), right] {
            let r = auth.verify_from(attacker, b"alice", pw).await;
            assert_eq!(r, Err(AuthError::Invalid));
        }
        let t = auth.stats();
        assert_eq!(t.hash_runs, s.hash_runs);
        assert_eq!(t.refused_in_backoff - s.refused_in_backoff, 2);
        // From where alice logged in before, she still gets in (cached).
        assert!(auth.verify_from(home, b"alice", right).await.is_ok());
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_connections_with_the_right_password_hashes_once_per_hasher() {
        let (store, dir) = store_with_alice().await;
        let auth = std::sync::Arc::new(Authenticator::new(store.clone()));
        let hashers = auth.hashers.available_permits() as u64;
        let src = Some(IpAddr::from([192, 0, 2, 1]));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..40 {
            let a = auth.clone();
            set.spawn(async move { a.verify_from(src, b"alice", b"alice-right-password").await });
        }
        while let Some(r) = set.join_next().await {
            assert!(r.unwrap().is_ok());
        }
        let runs = auth.stats().hash_runs;
        assert!(
            (1..=hashers).contains(&runs),
            "{runs} argon2 runs for 40 connections with {hashers} hashers"
        );
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parents_change_reaches_the_cached_logins_of_its_sub_users_and_credentials() {
        let (store, dir) = store_with_alice().await;
        let alice = "cus-0000000000a1";
        let hash = hash_password("team-password").unwrap();
        store
            .insert_account("cus-0000000000b2", "alice-team", &hash, Some(alice))
            .await
            .unwrap();
        store
            .insert_credential("crd-0000000000c3", alice, "alice-bot", &hash)
            .await
            .unwrap();
        let auth = Authenticator::new(store.clone());
        let src = Some(IpAddr::from([192, 0, 2, 1]));
        let plan_of = async |login: &[u8]| {
            auth.verify_from(src, login, b"team-password")
                .await
                .map(|p| p.plan_id)
        };
        for login in [b"alice-team".as_slice(), b"alice-bot"] {
            assert_eq!(plan_of(login).await, Ok(None));
        }
        let runs = auth.stats().hash_runs;
        store
            .update_customer_access(alice, Some(Some("plan-big")), None, None)
            .await
            .unwrap();
        // Cached: nothing told the cache yet.
        assert_eq!(plan_of(b"alice-team").await, Ok(None));
        assert_eq!(auth.stats().hash_runs, runs);
        // What the access API does after a change to alice.
        auth.invalidate("alice");
        for login in [b"alice-team".as_slice(), b"alice-bot"] {
            assert_eq!(plan_of(login).await, Ok(Some("plan-big".into())));
        }
        // A disabled parent shuts its sub-user out at once.
        store
            .update_customer_access(alice, None, None, Some(true))
            .await
            .unwrap();
        auth.invalidate("alice");
        assert_eq!(plan_of(b"alice-team").await, Err(AuthError::Invalid));
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_releases_its_handshake_slot_once_authenticated() {
        let (store, dir) = store_with_alice().await;
        let auth = Authenticator::new(store.clone());
        let slot = std::sync::Arc::new(());
        let src = IpAddr::from([192, 0, 2, 1]);
        let key = SourceKey::from(src);
        let strikes = || lock(&auth.throttle).sources.get(&key).map(|e| e.failures);
        let seen = for_connection(src, Box::new(slot.clone()), async {
            let _ = auth.verify(b"alice", b"wrong-password").await;
            let after_failure = (std::sync::Arc::strong_count(&slot), strikes());
            let _ = auth.verify(b"alice", b"alice-right-password").await;
            (
                after_failure,
                (std::sync::Arc::strong_count(&slot), strikes()),
            )
        })
        .await;
        // The failure counted against the connection's source and kept the
        // slot; the success released it and cleared the source's typo.
        assert_eq!(seen, ((2, Some(1)), (1, None)));
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
