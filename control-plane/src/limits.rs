//! Customer limits: what a customer's plan allows, enforced across the whole
//! fleet (every exit, both proxy protocols) because every customer
//! connection is admitted here first. Sub-users and credentials of one
//! customer share its limits: everything is keyed by the customer id.
//!
//! Glossary:
//! - **plan** ([`PlanLimits`]): the limits sold to a customer; every field
//!   is optional (`None` = unlimited).
//! - **thread**: one admitted customer connection (the seed's "simultaneous
//!   socket"). An [`Admission`] holds one; dropping it frees it.
//! - **over**: the customer keeps asking for more threads than the plan
//!   allows. Precisely: an *over run* starts at an admission refused for the
//!   thread limit and goes on while every following such refusal comes at
//!   most [`LimiterConfig::over_gap`] (default 60 s) after the previous one.
//!   A gap longer than that ends the run.
//! - **strike**: a thread-limit refusal that comes at least
//!   [`LimiterConfig::strike_window`] (default 15 min) after its run began.
//!   It locks the customer out for [`LimiterConfig::lockout`] (default 1 h)
//!   and closes all its connections. So a customer is locked out only when
//!   it was still being refused at the end of the window, having been
//!   refused at least once a minute all along.
//! - **kick**: closing a customer's open connections. Every admission
//!   carries a child of the customer's [`CancellationToken`]; a kick cancels
//!   the parent (and installs a fresh one for later admissions). Strikes,
//!   bans and an exhausted quota kick.
//! - **ban**: an operator's manual lockout, with a reason and an optional end.
//! - **month**: the calendar month in UTC. The quota counts bytes in both
//!   directions and resets on the first of the month.
//! - **metering**: counting a flow's bytes toward the quota while it runs,
//!   one [`QUOTA_STEP`] at a time, through the relay's [`Throttle`] hook
//!   (see [`Admission::relay_throttle`]); the flow's end charges only the
//!   rest. Overshoot bound: while the count is under the quota, each open
//!   flow of the customer has relayed less than one step (plus the chunk
//!   being counted) that the count does not show yet; once the count
//!   reaches the quota every flow is kicked (with
//!   [`LimiterConfig::kick_on_quota`], the default) and relays at most one
//!   more read in each direction. So the customer moves at most one step
//!   plus the reads in flight per open flow beyond the quota.
//!
//! Time is the caller's: admission and the strike clock take a [`Now`]
//! (monotonic instant for intervals, wall clock for dates, expiry and
//! months), so tests step through fifteen minutes without sleeping. Only
//! the bandwidth throttle reads the clock itself (tokio's, which tests can
//! pause), and it too has a `now`-taking core.
//!
//! Memory: per-customer state exists only for customers that were admitted
//! or refused after authentication, and [`Limiter::tick`] drops it once the
//! customer is idle (no connection, no lockout, ban or over run, no
//! admission attempt for [`LimiterConfig::idle_after`]) and has moved no
//! bytes this month. Customers that did move bytes keep an entry until the
//! month ends, because the limiter is where their monthly count lives; that
//! is bounded by the number of real customers.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use shared::policy::DENIED_PORTS;
use shared::quic::relay::{Direction, Throttle};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------
// Configuration

/// Knobs of the limiter itself (the plans carry the customer-specific ones).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimiterConfig {
    /// How long a customer must stay over the thread limit before a strike.
    pub strike_window: Duration,
    /// Longest pause between two thread-limit refusals that still counts as
    /// staying over.
    pub over_gap: Duration,
    /// How long a strike locks the customer out.
    pub lockout: Duration,
    /// How long an unused customer's state is kept after its last admission
    /// attempt.
    pub idle_after: Duration,
    /// Close a customer's connections when its monthly quota is used up (the
    /// seed's "blocks + kicks"); otherwise only new admissions are refused.
    pub kick_on_quota: bool,
    /// Events kept for [`Limiter::take_events`]; the oldest are dropped
    /// first when nobody polls.
    pub max_events: usize,
}

pub fn default_strike_window() -> Duration {
    Duration::from_secs(15 * 60)
}

pub fn default_over_gap() -> Duration {
    Duration::from_secs(60)
}

pub fn default_lockout() -> Duration {
    Duration::from_secs(60 * 60)
}

pub fn default_idle_after() -> Duration {
    Duration::from_secs(10 * 60)
}

pub fn default_max_events() -> usize {
    10_000
}

impl Default for LimiterConfig {
    fn default() -> Self {
        Self {
            strike_window: default_strike_window(),
            over_gap: default_over_gap(),
            lockout: default_lockout(),
            idle_after: default_idle_after(),
            kick_on_quota: true,
            max_events: default_max_events(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("limits: {0} must be longer than zero")]
    Zero(&'static str),
    #[error("limits: over_gap must not be longer than strike_window")]
    GapOverWindow,
    #[error("limits: idle_after must be at least over_gap")]
    IdleUnderGap,
}

impl LimiterConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, d) in [
            ("strike_window", self.strike_window),
            ("over_gap", self.over_gap),
            ("lockout", self.lockout),
            ("idle_after", self.idle_after),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.over_gap > self.strike_window {
            return Err(ConfigError::GapOverWindow);
        }
        // An entry dropped while its over run could still continue would
        // forget the run.
        if self.idle_after < self.over_gap {
            return Err(ConfigError::IdleUnderGap);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Plans

/// What a plan allows. Stored by the store and edited through the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanLimits {
    /// Shown to the customer in refusals ("plan basic").
    pub name: String,
    /// Concurrent connections.
    #[serde(default)]
    pub max_threads: Option<u32>,
    /// New connections per second; bursts up to the same number.
    #[serde(default)]
    pub new_conn_per_sec: Option<u32>,
    /// Bytes per second per connection, each direction.
    #[serde(default)]
    pub bw_conn_bps: Option<u64>,
    /// Bytes per second over all the customer's connections, each direction.
    #[serde(default)]
    pub bw_customer_bps: Option<u64>,
    /// Bytes per calendar month (UTC), both directions together.
    #[serde(default)]
    pub quota_bytes: Option<u64>,
    /// End of the plan, milliseconds since the Unix epoch.
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
    /// Target ports the plan may reach, as inclusive ranges; `None` is the
    /// default policy (every port but the mail ports). See
    /// [`PlanLimits::check_port`].
    #[serde(default)]
    pub allowed_ports: Option<Vec<(u16, u16)>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("plan name is empty")]
    EmptyName,
    #[error("{0} must be greater than zero (leave it out for no limit)")]
    Zero(&'static str),
    #[error("port range {0}-{1} is backwards")]
    BadRange(u16, u16),
}

impl PlanLimits {
    /// A plan with no limits at all.
    pub fn unlimited(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            max_threads: None,
            new_conn_per_sec: None,
            bw_conn_bps: None,
            bw_customer_bps: None,
            quota_bytes: None,
            expires_at_ms: None,
            allowed_ports: None,
        }
    }

    /// Refuse plans the limiter could only guess at: a zero rate would mean
    /// "never" for a bucket, which nobody sells on purpose. A zero
    /// `max_threads` or quota is allowed (a suspended plan).
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.name.trim().is_empty() {
            return Err(PlanError::EmptyName);
        }
        if self.new_conn_per_sec == Some(0) {
            return Err(PlanError::Zero("new_conn_per_sec"));
        }
        if self.bw_conn_bps == Some(0) {
            return Err(PlanError::Zero("bw_conn_bps"));
        }
        if self.bw_customer_bps == Some(0) {
            return Err(PlanError::Zero("bw_customer_bps"));
        }
        for &(lo, hi) in self.allowed_ports.iter().flatten() {
            if lo > hi {
                return Err(PlanError::BadRange(lo, hi));
            }
        }
        Ok(())
    }

    /// May this plan reach `port`?
    ///
    /// - `allowed_ports: None`: every port except the mail ports (25, 465,
    ///   587), exactly the global policy ([`shared::policy::DENIED_PORTS`]).
    /// - `Some(ranges)`: the port must lie in a range. A mail port is open
    ///   only when a range *names* it as its start or end (`(25, 25)`,
    ///   `(465, 587)`), so a wide range such as `(1, 65535)` never opens mail
    ///   by accident.
    ///
    /// This is the customer-specific first gate, with a message the customer
    /// can act on. The global policy, here and on the agents, still refuses
    /// the mail ports whatever the plan says; a plan that opens them takes
    /// effect only once that policy learns a per-customer exception.
    pub fn check_port(&self, port: u16) -> Result<(), Denial> {
        let mail = DENIED_PORTS.contains(&port);
        let allowed = match &self.allowed_ports {
            None => !mail,
            Some(ranges) => ranges
                .iter()
                .any(|&(lo, hi)| (lo..=hi).contains(&port) && (!mail || lo == port || hi == port)),
        };
        if allowed {
            return Ok(());
        }
        let message = if mail {
            format!("port {port} is closed: mail ports (25, 465, 587) are blocked")
        } else {
            format!("port {port} is not allowed (plan {})", self.name)
        };
        Err(Denial {
            kind: DenialKind::Port,
            message,
            retry_after: None,
        })
    }
}

// ---------------------------------------------------------------------------
// Time

/// The caller's idea of the present: a monotonic instant for intervals
/// (buckets, strikes, lockouts) and the wall clock for dates (expiry,
/// months, what refusals print).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

impl Now {
    pub fn system() -> Self {
        Self {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    pub fn new(mono: Instant, wall: SystemTime) -> Self {
        Self { mono, wall }
    }

    fn wall_ms(&self) -> i64 {
        wall_ms(self.wall)
    }
}

impl std::ops::Add<Duration> for Now {
    type Output = Now;
    fn add(self, d: Duration) -> Now {
        Now {
            mono: self.mono + d,
            wall: self.wall + d,
        }
    }
}

fn wall_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// A calendar month in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Month {
    year: i32,
    month: u32,
}

impl Month {
    fn of(t: SystemTime) -> Self {
        let d = DateTime::<Utc>::from(t);
        Self {
            year: d.year(),
            month: d.month(),
        }
    }

    fn label(self) -> String {
        format!("{:04}-{:02}", self.year, self.month)
    }

    /// The day the quota resets.
    fn next_start(self) -> String {
        let (y, m) = if self.month == 12 {
            (self.year + 1, 1)
        } else {
            (self.year, self.month + 1)
        };
        NaiveDate::from_ymd_opt(y, m, 1)
            .map(|d| d.format("%Y-%m-%d").to_string())
            .unwrap_or_else(|| format!("{y:04}-{m:02}-01"))
    }
}

// ---------------------------------------------------------------------------
// Refusals and events

/// Why an admission was refused, with a message for the customer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denial {
    pub kind: DenialKind,
    /// Says what limit, how much, and until when; safe to show the customer.
    pub message: String,
    /// When trying again can succeed, if that is known (HTTP `Retry-After`).
    pub retry_after: Option<Duration>,
}

/// The limit that refused. Intended mapping: `Threads`, `ConnRate` and
/// `LockedOut` are HTTP 429; `Quota`, `Expired`, `Banned` and `Port` are
/// 403; all are SOCKS5 reply 0x02 (not allowed by ruleset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenialKind {
    Threads,
    ConnRate,
    Quota,
    Expired,
    LockedOut,
    Banned,
    Port,
}

/// Something an operator or customer should hear about; see
/// [`Limiter::take_events`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LimitEvent {
    /// Monthly usage reached `percent` (80 or 100) of the quota. Once per
    /// threshold, customer and month.
    QuotaCrossed {
        customer_id: String,
        percent: u8,
        used_bytes: u64,
        quota_bytes: u64,
        /// `YYYY-MM`.
        month: String,
    },
    /// A strike: connections closed, admission refused until `until_ms`.
    LockedOut {
        customer_id: String,
        until_ms: i64,
        connections_closed: u32,
    },
}

/// A customer's live state, for the API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CustomerLive {
    pub customer_id: String,
    /// Connections open now.
    pub threads: u32,
    /// Admissions per second, averaged over about the last ten seconds.
    pub conns_per_sec_recent: f64,
    pub bytes_this_month: u64,
    /// `YYYY-MM` the byte count belongs to.
    pub month: Option<String>,
    /// Start of the current over run, if the customer is over now.
    pub over_since_ms: Option<i64>,
    pub locked_until_ms: Option<i64>,
    pub ban: Option<BanInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BanInfo {
    /// `None`: until an operator lifts it.
    pub until_ms: Option<i64>,
    pub reason: String,
}

// ---------------------------------------------------------------------------
// Buckets

const NANOS: u128 = 1_000_000_000;

/// Burst tolerance of the bandwidth buckets: one second of the rate.
const BURST_NS: u64 = 1_000_000_000;

/// A byte-rate bucket in GCRA form: one atomic "theoretical arrival time"
/// (nanoseconds since the limiter's epoch) that each charge pushes forward
/// by `n / rate`. A charge never fails; it returns how long the caller must
/// wait, so concurrent chargers queue in arrival order (FIFO) and the bucket
/// takes debt rather than splitting chunks.
#[derive(Debug)]
struct Gcra {
    /// Bytes per second; 0 = no limit.
    rate: AtomicU64,
    tat: AtomicU64,
}

impl Gcra {
    fn new(rate: u64) -> Self {
        Self {
            rate: AtomicU64::new(rate),
            tat: AtomicU64::new(0),
        }
    }

    /// Charge `n` bytes at `now_ns`; the wait in nanoseconds.
    fn charge(&self, n: u64, now_ns: u64) -> u64 {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return 0;
        }
        let cost = u64::try_from(u128::from(n) * NANOS / u128::from(rate)).unwrap_or(u64::MAX);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now_ns).saturating_add(cost);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next.saturating_sub(BURST_NS).saturating_sub(now_ns),
                Err(seen) => tat = seen,
            }
        }
    }
}

/// The new-connection bucket: capacity = rate (at least 1), refilled
/// continuously.
#[derive(Debug, Clone, Copy)]
struct ConnRate {
    tokens: f64,
    at: Instant,
}

impl ConnRate {
    /// Take one token, or say how long until one is there.
    fn take(slot: &mut Option<ConnRate>, rate: u32, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(rate.max(1));
        let b = slot.get_or_insert(ConnRate {
            tokens: rate,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.at = now.max(b.at);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

// ---------------------------------------------------------------------------
// Per-customer state

/// No quota, in [`Customer::quota`].
const NO_QUOTA: u64 = u64::MAX;
const REPORTED_80: u8 = 1;
const REPORTED_100: u8 = 2;

/// Time constant of the admissions-per-second average.
const RATE_TAU_SECS: f64 = 10.0;

struct Customer {
    id: String,
    /// Admitted connections still open. Incremented under `state`'s lock
    /// (so the limit is checked and taken atomically), decremented without
    /// it by [`Admission`]'s drop, which can only make room.
    threads: AtomicU32,
    month_bytes: AtomicU64,
    /// The part of `month_bytes` that open flows charged while running
    /// (not yet in the usage table), kept across [`Limiter::load_usage`].
    in_flows: AtomicU64,
    /// Kicks so far. An admission remembers the count it was admitted at,
    /// so its relay hook sees a kick with one atomic load (the token's own
    /// flag sits behind a mutex).
    kicks: AtomicU64,
    /// Quota thresholds already reported this month.
    reported: AtomicU8,
    /// The quota of the plan seen at the latest admission, for crossing
    /// checks where no plan is at hand.
    quota: AtomicU64,
    /// Customer-wide bandwidth, per [`Direction`]; rate 0 = none.
    bw: [Gcra; 2],
    state: Mutex<CustomerState>,
}

struct CustomerState {
    /// Parent of every admission's token; replaced after each kick.
    token: CancellationToken,
    conn_rate: Option<ConnRate>,
    over: Option<OverRun>,
    locked_until: Option<Now>,
    ban: Option<Ban>,
    /// Last admission attempt, for idle cleanup.
    last_seen: Instant,
    admits_avg: f64,
    admits_avg_at: Instant,
}

#[derive(Debug, Clone, Copy)]
struct OverRun {
    since: Now,
    last: Instant,
}

#[derive(Debug, Clone)]
struct Ban {
    until: Option<SystemTime>,
    reason: String,
}

impl Customer {
    fn new(id: &str, now: Instant) -> Self {
        Self {
            id: id.to_string(),
            threads: AtomicU32::new(0),
            month_bytes: AtomicU64::new(0),
            in_flows: AtomicU64::new(0),
            kicks: AtomicU64::new(0),
            reported: AtomicU8::new(0),
            quota: AtomicU64::new(NO_QUOTA),
            bw: [Gcra::new(0), Gcra::new(0)],
            state: Mutex::new(CustomerState {
                token: CancellationToken::new(),
                conn_rate: None,
                over: None,
                locked_until: None,
                ban: None,
                last_seen: now,
                admits_avg: 0.0,
                admits_avg_at: now,
            }),
        }
    }

    fn set_plan(&self, plan: &PlanLimits) {
        self.quota
            .store(plan.quota_bytes.unwrap_or(NO_QUOTA), Ordering::Relaxed);
        for b in &self.bw {
            b.rate
                .store(plan.bw_customer_bps.unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// Count `n` bytes and report quota thresholds crossed. The
    /// `fetch_or` on `reported` makes each report happen once even when
    /// several connections cross at the same time.
    fn add_bytes(&self, shared: &Shared, n: u64) {
        if n == 0 {
            return;
        }
        let used = self
            .month_bytes
            .fetch_add(n, Ordering::Relaxed)
            .saturating_add(n);
        let quota = self.quota.load(Ordering::Relaxed);
        if quota == NO_QUOTA {
            return;
        }
        for (bit, percent) in [(REPORTED_80, 80u8), (REPORTED_100, 100u8)] {
            if !reached(used, quota, percent) {
                continue;
            }
            if self.reported.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
                continue;
            }
            let month = lock(&shared.month).map(Month::label).unwrap_or_default();
            shared.push(LimitEvent::QuotaCrossed {
                customer_id: self.id.clone(),
                percent,
                used_bytes: used,
                quota_bytes: quota,
                month,
            });
            if percent == 100 && shared.kick_on_quota {
                self.kick(&mut lock(&self.state));
            }
        }
    }

    /// Close every open connection (`st` is this customer's locked state).
    fn kick(&self, st: &mut CustomerState) {
        st.kick();
        self.kicks.fetch_add(1, Ordering::Release);
    }

    /// Thresholds already behind `used`, as `reported` bits.
    fn reported_bits(used: u64, quota: Option<u64>) -> u8 {
        let Some(q) = quota else { return 0 };
        let mut bits = 0;
        if reached(used, q, 80) {
            bits |= REPORTED_80;
        }
        if reached(used, q, 100) {
            bits |= REPORTED_100;
        }
        bits
    }
}

fn reached(used: u64, quota: u64, percent: u8) -> bool {
    u128::from(used) * 100 >= u128::from(quota) * u128::from(percent)
}

impl CustomerState {
    /// Cancel every open connection's token; later admissions get a fresh
    /// parent. Call it through [`Customer::kick`], which also counts it.
    fn kick(&mut self) {
        self.token.cancel();
        self.token = CancellationToken::new();
    }

    fn over_now(&self, now: Instant, gap: Duration) -> Option<OverRun> {
        self.over
            .filter(|r| now.saturating_duration_since(r.last) <= gap)
    }

    fn rate_at(&self, now: Instant) -> f64 {
        let dt = now
            .saturating_duration_since(self.admits_avg_at)
            .as_secs_f64();
        self.admits_avg * (-dt / RATE_TAU_SECS).exp()
    }
}

// ---------------------------------------------------------------------------
// The limiter

struct Shared {
    epoch: Instant,
    kick_on_quota: bool,
    max_events: usize,
    events: Mutex<VecDeque<LimitEvent>>,
    dropped_events: AtomicU64,
    /// The month byte counts belong to; set by the first call with a `now`.
    month: Mutex<Option<Month>>,
}

impl Shared {
    fn push(&self, e: LimitEvent) {
        let mut q = lock(&self.events);
        while q.len() >= self.max_events.max(1) {
            q.pop_front();
            self.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(e);
    }
}

/// Admits customer connections against their plans; one per control plane.
pub struct Limiter {
    cfg: LimiterConfig,
    shared: Arc<Shared>,
    customers: Mutex<HashMap<String, Arc<Customer>>>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("cfg", &self.cfg)
            .field("customers", &lock(&self.customers).len())
            .finish()
    }
}

/// Lock ignoring poison: a panic elsewhere must not turn every later
/// admission into a panic too. The guarded data stays consistent because
/// no critical section here leaves it half-updated across a panic point.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Limiter {
    pub fn new(cfg: LimiterConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                epoch: Instant::now(),
                kick_on_quota: cfg.kick_on_quota,
                max_events: cfg.max_events,
                events: Mutex::new(VecDeque::new()),
                dropped_events: AtomicU64::new(0),
                month: Mutex::new(None),
            }),
            cfg,
            customers: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &LimiterConfig {
        &self.cfg
    }

    fn entry(&self, customer_id: &str, now: Instant) -> Arc<Customer> {
        let mut map = lock(&self.customers);
        if let Some(c) = map.get(customer_id) {
            return c.clone();
        }
        let c = Arc::new(Customer::new(customer_id, now));
        map.insert(customer_id.to_string(), c.clone());
        c
    }

    /// Move to `now`'s month if it is later than the current one: byte
    /// counts and reported thresholds start again from zero. A clock that
    /// steps back does not undo a month.
    fn roll_month(&self, now: Now) -> Month {
        let m = Month::of(now.wall);
        let mut cur = lock(&self.shared.month);
        match *cur {
            Some(c) if c >= m => c,
            Some(_) => {
                for c in lock(&self.customers).values() {
                    c.month_bytes.store(0, Ordering::Relaxed);
                    c.reported.store(0, Ordering::Relaxed);
                }
                *cur = Some(m);
                m
            }
            None => {
                *cur = Some(m);
                m
            }
        }
    }

    /// Set a customer's usage for `now`'s month, as the store recorded it
    /// (at start-up, or after an operator corrected it). Thresholds the
    /// usage is already past count as reported: the process that counted
    /// those bytes reported them.
    pub fn load_usage(&self, customer_id: &str, plan: &PlanLimits, used_bytes: u64, now: Now) {
        self.roll_month(now);
        let c = self.entry(customer_id, now.mono);
        c.set_plan(plan);
        // Open flows' running charges are not in the store's figure yet;
        // their ends will charge only the rest.
        let in_flows = c.in_flows.load(Ordering::Relaxed);
        c.month_bytes
            .store(used_bytes.saturating_add(in_flows), Ordering::Relaxed);
        c.reported.store(
            Customer::reported_bits(used_bytes, plan.quota_bytes),
            Ordering::Relaxed,
        );
    }

    /// Admit one customer connection, or say why not. Checks, in order:
    /// ban, lockout, expiry, quota, threads, connection rate. Only a refusal
    /// for the thread limit feeds the strike clock; only an admission takes
    /// a connection-rate token.
    pub fn admit(
        &self,
        customer_id: &str,
        plan: &PlanLimits,
        now: Now,
    ) -> Result<Admission, Denial> {
        let month = self.roll_month(now);
        let cust = self.entry(customer_id, now.mono);
        cust.set_plan(plan);
        let mut st = lock(&cust.state);
        st.last_seen = now.mono;

        if let Some(ban) = &st.ban {
            if ban.until.is_none_or(|u| now.wall < u) {
                return Err(banned(ban, now));
            }
            st.ban = None;
        }
        if let Some(until) = st.locked_until {
            if now.mono < until.mono {
                return Err(self.locked_out(until, now));
            }
            st.locked_until = None;
        }
        if let Some(exp) = plan.expires_at_ms
            && now.wall_ms() >= exp
        {
            return Err(Denial {
                kind: DenialKind::Expired,
                message: format!("plan expired on {} (plan {})", fmt_ms(exp), plan.name),
                retry_after: None,
            });
        }
        if let Some(quota) = plan.quota_bytes
            && cust.month_bytes.load(Ordering::Relaxed) >= quota
        {
            return Err(Denial {
                kind: DenialKind::Quota,
                message: format!(
                    "monthly data quota of {} used up; resets on {}",
                    fmt_bytes(quota),
                    month.next_start()
                ),
                retry_after: None,
            });
        }
        let in_use = cust.threads.load(Ordering::Acquire);
        if let Some(max) = plan.max_threads
            && in_use >= max
        {
            let run = match st.over_now(now.mono, self.cfg.over_gap) {
                Some(r) => OverRun {
                    since: r.since,
                    last: now.mono,
                },
                None => OverRun {
                    since: now,
                    last: now.mono,
                },
            };
            st.over = Some(run);
            if now.mono.saturating_duration_since(run.since.mono) >= self.cfg.strike_window {
                let until = now + self.cfg.lockout;
                st.over = None;
                st.locked_until = Some(until);
                cust.kick(&mut st);
                drop(st);
                self.shared.push(LimitEvent::LockedOut {
                    customer_id: customer_id.to_string(),
                    until_ms: until.wall_ms(),
                    connections_closed: in_use,
                });
                tracing::info!(
                    customer = customer_id,
                    "locked out after staying over the connection limit"
                );
                return Err(self.locked_out(until, now));
            }
            return Err(Denial {
                kind: DenialKind::Threads,
                message: format!(
                    "connection limit reached: {in_use} of {max} concurrent connections in use (plan {})",
                    plan.name
                ),
                retry_after: None,
            });
        }
        if let Some(rate) = plan.new_conn_per_sec
            && let Err(wait) = ConnRate::take(&mut st.conn_rate, rate, now.mono)
        {
            return Err(Denial {
                kind: DenialKind::ConnRate,
                message: format!(
                    "connection rate limit reached: at most {rate} new connections per second (plan {})",
                    plan.name
                ),
                retry_after: Some(wait),
            });
        }

        cust.threads.fetch_add(1, Ordering::AcqRel);
        st.admits_avg = st.rate_at(now.mono) + 1.0 / RATE_TAU_SECS;
        st.admits_avg_at = now.mono.max(st.admits_avg_at);
        let token = st.token.child_token();
        let kicks = cust.kicks.load(Ordering::Acquire);
        drop(st);
        let throttle = (plan.bw_conn_bps.is_some() || plan.bw_customer_bps.is_some()).then(|| {
            Arc::new(BandwidthThrottle {
                conn: plan.bw_conn_bps.map(|r| [Gcra::new(r), Gcra::new(r)]),
                customer: cust.clone(),
                epoch: self.shared.epoch,
            })
        });
        Ok(Admission {
            customer: cust,
            shared: self.shared.clone(),
            token,
            kicks,
            throttle,
            meter: plan.quota_bytes.is_some().then(QuotaMeter::default),
        })
    }

    fn locked_out(&self, until: Now, now: Now) -> Denial {
        Denial {
            kind: DenialKind::LockedOut,
            message: format!(
                "locked out until {} after staying over the connection limit for {}",
                fmt_wall(until.wall),
                fmt_duration(self.cfg.strike_window)
            ),
            retry_after: Some(until.mono.saturating_duration_since(now.mono)),
        }
    }

    /// The strike clock and housekeeping; call about once a second. Ends
    /// over runs that went quiet, lockouts and bans that ran out, rolls the
    /// month, and drops idle customers.
    pub fn tick(&self, now: Now) {
        self.roll_month(now);
        let gap = self.cfg.over_gap;
        let idle_after = self.cfg.idle_after;
        lock(&self.customers).retain(|_, c| {
            let mut st = lock(&c.state);
            if st.over.is_some() && st.over_now(now.mono, gap).is_none() {
                st.over = None;
            }
            if st.locked_until.is_some_and(|u| now.mono >= u.mono) {
                st.locked_until = None;
            }
            if st
                .ban
                .as_ref()
                .is_some_and(|b| b.until.is_some_and(|u| now.wall >= u))
            {
                st.ban = None;
            }
            // Only the map holds it: no admission or throttle is alive, and
            // none can appear while we hold the map's lock.
            let idle = Arc::strong_count(c) == 1
                && c.threads.load(Ordering::Acquire) == 0
                && c.month_bytes.load(Ordering::Relaxed) == 0
                && st.over.is_none()
                && st.locked_until.is_none()
                && st.ban.is_none()
                && now.mono.saturating_duration_since(st.last_seen) >= idle_after;
            !idle
        });
    }

    /// Ban a customer until `until` (`None`: until [`Limiter::unban`]) and
    /// close its connections.
    pub fn ban(&self, customer_id: &str, until: Option<SystemTime>, reason: &str) {
        let c = self.entry(customer_id, Instant::now());
        let mut st = lock(&c.state);
        st.ban = Some(Ban {
            until,
            reason: reason.to_string(),
        });
        c.kick(&mut st);
    }

    /// Lift a ban and any strike lockout; `false` if there was neither.
    pub fn unban(&self, customer_id: &str) -> bool {
        let Some(c) = lock(&self.customers).get(customer_id).cloned() else {
            return false;
        };
        let mut st = lock(&c.state);
        let had = st.ban.is_some() || st.locked_until.is_some();
        st.ban = None;
        st.locked_until = None;
        st.over = None;
        had
    }

    /// A customer's live state; `None` when the limiter holds nothing for it
    /// (never seen, or idle and dropped).
    pub fn snapshot(&self, customer_id: &str, now: Now) -> Option<CustomerLive> {
        let c = lock(&self.customers).get(customer_id).cloned()?;
        Some(self.live(&c, now))
    }

    /// Every customer the limiter holds, e.g. to persist monthly usage.
    pub fn snapshot_all(&self, now: Now) -> Vec<CustomerLive> {
        let all: Vec<Arc<Customer>> = lock(&self.customers).values().cloned().collect();
        all.iter().map(|c| self.live(c, now)).collect()
    }

    fn live(&self, c: &Customer, now: Now) -> CustomerLive {
        let month = lock(&self.shared.month).map(Month::label);
        let st = lock(&c.state);
        CustomerLive {
            customer_id: c.id.clone(),
            threads: c.threads.load(Ordering::Acquire),
            conns_per_sec_recent: st.rate_at(now.mono),
            bytes_this_month: c.month_bytes.load(Ordering::Relaxed),
            month,
            over_since_ms: st
                .over_now(now.mono, self.cfg.over_gap)
                .map(|r| r.since.wall_ms()),
            locked_until_ms: st
                .locked_until
                .filter(|u| now.mono < u.mono)
                .map(|u| u.wall_ms()),
            ban: st.ban.as_ref().map(|b| BanInfo {
                until_ms: b.until.map(wall_ms),
                reason: b.reason.clone(),
            }),
        }
    }

    /// Events since the last call, oldest first.
    pub fn take_events(&self) -> Vec<LimitEvent> {
        lock(&self.shared.events).drain(..).collect()
    }

    /// Events dropped because nobody took them in time.
    pub fn dropped_events(&self) -> u64 {
        self.shared.dropped_events.load(Ordering::Relaxed)
    }

    /// Customers held in memory.
    pub fn tracked_customers(&self) -> usize {
        lock(&self.customers).len()
    }
}

fn banned(ban: &Ban, now: Now) -> Denial {
    let mut message = String::from("access suspended by the operator");
    if let Some(u) = ban.until {
        message.push_str(&format!(" until {}", fmt_wall(u)));
    }
    if !ban.reason.is_empty() {
        message.push_str(": ");
        message.push_str(&ban.reason);
    }
    Denial {
        kind: DenialKind::Banned,
        message,
        retry_after: ban
            .until
            .map(|u| u.duration_since(now.wall).unwrap_or_default()),
    }
}

// ---------------------------------------------------------------------------
// Admissions and the throttle

/// Bytes a flow relays between two charges to the customer's monthly
/// count; the overshoot past a quota is at most about one step per open
/// flow (see the module's glossary, "metering"). The relay's own read size,
/// so a busy flow charges about once per read and an idle one never.
pub const QUOTA_STEP: u64 = 64 * 1024;

/// How long a direction of a kicked flow waits before it reads again: long
/// enough for the connection's task to see the cancelled token and shut
/// the customer's socket, so no further chunk gets through.
const KICKED_PAUSE: Duration = Duration::from_millis(20);

/// A running flow's share of the monthly count. Pure bookkeeping on two
/// atomics: the relay calls [`QuotaMeter::count`] once per chunk and
/// charges whatever it hands back.
#[derive(Debug, Default)]
struct QuotaMeter {
    /// Relayed but not charged yet; under one step between calls.
    pending: AtomicU64,
    /// Charged to the month while the flow ran and not yet settled.
    charged: AtomicU64,
}

impl QuotaMeter {
    /// Note `n` relayed bytes. Once a step is full, everything pending is
    /// taken (and counted as charged) and returned for the caller to
    /// charge.
    fn count(&self, n: u64) -> Option<u64> {
        let pending = self
            .pending
            .fetch_add(n, Ordering::Relaxed)
            .saturating_add(n);
        if pending < QUOTA_STEP {
            return None;
        }
        let due = self.pending.swap(0, Ordering::Relaxed);
        if due == 0 {
            return None;
        }
        self.charged.fetch_add(due, Ordering::Relaxed);
        Some(due)
    }

    /// The flow ended having moved `total` bytes: (what is still to be
    /// charged, what was charged while it ran). Settles once; a second call
    /// sees nothing charged.
    fn settle(&self, total: u64) -> (u64, u64) {
        self.pending.store(0, Ordering::Relaxed);
        let charged = self.charged.swap(0, Ordering::Relaxed);
        (total.saturating_sub(charged), charged)
    }
}

/// One admitted connection. Dropping it frees the thread slot.
#[must_use = "dropping the admission frees its connection slot at once"]
pub struct Admission {
    customer: Arc<Customer>,
    shared: Arc<Shared>,
    token: CancellationToken,
    /// The customer's kick count when this connection was admitted.
    kicks: u64,
    throttle: Option<Arc<BandwidthThrottle>>,
    /// `Some` when the plan has a quota: the relay counts toward it.
    meter: Option<QuotaMeter>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("customer", &self.customer.id)
            .field("cancelled", &self.token.is_cancelled())
            .field("throttled", &self.throttle.is_some())
            .field("metered", &self.meter.is_some())
            .finish()
    }
}

impl Admission {
    pub fn customer_id(&self) -> &str {
        &self.customer.id
    }

    /// Cancelled when the connection must close (strike, ban, quota used
    /// up). The connection's task selects on it and resets both sides.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.token
    }

    /// The connection's bandwidth throttle; `None` when the plan has no
    /// bandwidth limit.
    pub fn throttle(&self) -> Option<Arc<BandwidthThrottle>> {
        self.throttle.clone()
    }

    /// The relay hook for this connection, in the form
    /// [`shared::quic::relay::relay_throttled`] takes: `None` when the plan
    /// has neither a bandwidth limit nor a quota, so an unlimited customer's
    /// relay runs without any hook. Otherwise every chunk is paced by the
    /// bandwidth throttle (if any) and counted toward the quota (if any),
    /// one [`QUOTA_STEP`] at a time; a kicked connection is paused so it
    /// relays nothing more while it closes.
    pub fn relay_throttle(&self) -> Option<&dyn Throttle> {
        (self.throttle.is_some() || self.meter.is_some()).then_some(self as &dyn Throttle)
    }

    /// Count bytes this connection moved toward the monthly quota:
    /// increments, not running totals. Bytes the relay hook already counted
    /// are not subtracted; a flow's end uses [`Admission::record_flow_total`].
    pub fn record_bytes(&self, up: u64, down: u64) {
        self.customer
            .add_bytes(&self.shared, up.saturating_add(down));
    }

    /// The flow ended having moved `up` and `down` bytes in all: charge
    /// what the relay hook has not charged yet, so the month counts every
    /// byte exactly once. Call it once per flow.
    pub fn record_flow_total(&self, up: u64, down: u64) {
        let total = up.saturating_add(down);
        let Some(m) = &self.meter else {
            self.customer.add_bytes(&self.shared, total);
            return;
        };
        let (rest, charged) = m.settle(total);
        self.customer.in_flows.fetch_sub(charged, Ordering::Relaxed);
        self.customer.add_bytes(&self.shared, rest);
    }
}

impl Throttle for Admission {
    fn pace(&self, dir: Direction, n: usize) -> Option<Duration> {
        if let Some(due) = self.meter.as_ref().and_then(|m| m.count(n as u64)) {
            self.customer.in_flows.fetch_add(due, Ordering::Relaxed);
            // Reaching the quota here fires the events and the kick.
            self.customer.add_bytes(&self.shared, due);
        }
        if self.customer.kicks.load(Ordering::Acquire) != self.kicks {
            return Some(KICKED_PAUSE);
        }
        self.throttle.as_deref().and_then(|t| t.pace(dir, n))
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(m) = &self.meter {
            // A flow that never settled: its running charge stays in the
            // month (those bytes were relayed) but is no longer in flight.
            let (_, charged) = m.settle(0);
            self.customer.in_flows.fetch_sub(charged, Ordering::Relaxed);
        }
        self.customer.threads.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-connection bandwidth limit, plus the customer's shared one.
///
/// Each direction has its own buckets, so a plan's rate is like a
/// symmetric line: a download at full rate leaves the upload (requests,
/// acknowledgements) its own budget. Burst: one second of the rate.
///
/// Fairness: the customer buckets are FIFO over charges, and a connection
/// charges again only after its wait, so with k busy connections each
/// waits for at most one chunk of every other and gets about 1/k of the
/// rate (in proportion to its chunk sizes). The wait for one chunk is
/// bounded by (that chunk + one chunk per other busy connection) / rate,
/// minus the burst.
pub struct BandwidthThrottle {
    /// `None` when the plan limits only the customer as a whole.
    conn: Option<[Gcra; 2]>,
    customer: Arc<Customer>,
    epoch: Instant,
}

impl fmt::Debug for BandwidthThrottle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BandwidthThrottle")
            .field("customer", &self.customer.id)
            .field("conn", &self.conn)
            .field("customer_bw", &self.customer.bw)
            .finish()
    }
}

fn dir_index(dir: Direction) -> usize {
    match dir {
        Direction::ToQuic => 0,
        Direction::ToTcp => 1,
    }
}

impl BandwidthThrottle {
    /// [`Throttle::pace`] at a given instant.
    pub fn pace_at(&self, dir: Direction, n: usize, now: Instant) -> Option<Duration> {
        let now_ns =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let i = dir_index(dir);
        let n = n as u64;
        let conn = self.conn.as_ref().map_or(0, |b| b[i].charge(n, now_ns));
        let customer = self.customer.bw[i].charge(n, now_ns);
        let wait = conn.max(customer);
        (wait > 0).then(|| Duration::from_nanos(wait))
    }
}

impl Throttle for BandwidthThrottle {
    fn pace(&self, dir: Direction, n: usize) -> Option<Duration> {
        // tokio's clock, so tests with paused time see their own time.
        self.pace_at(dir, n, tokio::time::Instant::now().into_std())
    }
}

// ---------------------------------------------------------------------------
// Formatting for customers

fn fmt_wall(t: SystemTime) -> String {
    DateTime::<Utc>::from(t)
        .format("%Y-%m-%d %H:%M UTC")
        .to_string()
}

fn fmt_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|d| d.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| format!("{ms} ms after 1970"))
}

/// Decimal units, as data plans are sold.
fn fmt_bytes(n: u64) -> String {
    const UNITS: [(f64, &str); 4] = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")];
    let x = n as f64;
    for (scale, unit) in UNITS {
        if x >= scale {
            return format!("{:.1} {unit}", x / scale);
        }
    }
    format!("{n} bytes")
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{} h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    /// 2026-11-20 12:00:00 UTC.
    const T0_SECS: u64 = 1_795_176_000;

    fn t0() -> Now {
        Now::new(Instant::now(), UNIX_EPOCH + Duration::from_secs(T0_SECS))
    }

    fn plan() -> PlanLimits {
        PlanLimits::unlimited("basic")
    }

    fn limiter() -> Limiter {
        Limiter::new(LimiterConfig::default())
    }

    fn kind(r: Result<Admission, Denial>) -> DenialKind {
        r.expect_err("should be refused").kind
    }

    #[test]
    fn t0_is_what_the_messages_assume() {
        assert_eq!(fmt_wall(t0().wall), "2026-11-20 12:00 UTC");
    }

    #[test]
    fn unlimited_plan_admits_and_counts_threads() {
        let l = limiter();
        let now = t0();
        let a = l.admit("c1", &plan(), now).unwrap();
        let b = l.admit("c1", &plan(), now).unwrap();
        assert_eq!(a.customer_id(), "c1");
        assert!(a.throttle().is_none());
        assert_eq!(l.snapshot("c1", now).unwrap().threads, 2);
        drop(a);
        drop(b);
        assert_eq!(l.snapshot("c1", now).unwrap().threads, 0);
    }

    #[test]
    fn thread_limit_refuses_with_count_and_frees_on_drop() {
        let l = limiter();
        let now = t0();
        let p = PlanLimits {
            max_threads: Some(2),
            ..plan()
        };
        let a = l.admit("c1", &p, now).unwrap();
        let _b = l.admit("c1", &p, now).unwrap();
        let d = l.admit("c1", &p, now).unwrap_err();
        assert_eq!(d.kind, DenialKind::Threads);
        assert_eq!(
            d.message,
            "connection limit reached: 2 of 2 concurrent connections in use (plan basic)"
        );
        // Another customer is not affected.
        let _other = l.admit("c2", &p, now).unwrap();
        drop(a);
        let _c = l.admit("c1", &p, now).unwrap();
    }

    #[test]
    fn connection_rate_bucket_bursts_then_refills_with_time() {
        let l = limiter();
        let now = t0();
        let p = PlanLimits {
            new_conn_per_sec: Some(5),
            ..plan()
        };
        for _ in 0..5 {
            drop(l.admit("c1", &p, now).unwrap());
        }
        let d = l.admit("c1", &p, now).unwrap_err();
        assert_eq!(d.kind, DenialKind::ConnRate);
        assert_eq!(
            d.message,
            "connection rate limit reached: at most 5 new connections per second (plan basic)"
        );
        let wait = d.retry_after.unwrap();
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-6, "{wait:?}");
        // 100 ms later: still half a token short.
        assert_eq!(
            kind(l.admit("c1", &p, now + Duration::from_millis(100))),
            DenialKind::ConnRate
        );
        let later = now + Duration::from_millis(200);
        drop(l.admit("c1", &p, later).unwrap());
        assert_eq!(kind(l.admit("c1", &p, later)), DenialKind::ConnRate);
        // A long pause refills only up to the burst.
        let much_later = now + Duration::from_secs(60);
        for _ in 0..5 {
            drop(l.admit("c1", &p, much_later).unwrap());
        }
        assert_eq!(kind(l.admit("c1", &p, much_later)), DenialKind::ConnRate);
    }

    #[test]
    fn rate_of_one_below_one_per_second_still_admits_one() {
        let l = limiter();
        let now = t0();
        let p = PlanLimits {
            new_conn_per_sec: Some(1),
            ..plan()
        };
        drop(l.admit("c1", &p, now).unwrap());
        assert_eq!(kind(l.admit("c1", &p, now)), DenialKind::ConnRate);
        drop(l.admit("c1", &p, now + Duration::from_secs(1)).unwrap());
    }

    #[test]
    fn thread_refusals_do_not_spend_rate_tokens() {
        let l = limiter();
        let now = t0();
        let p = PlanLimits {
            max_threads: Some(1),
            new_conn_per_sec: Some(2),
            ..plan()
        };
        let a = l.admit("c1", &p, now).unwrap();
        for _ in 0..10 {
            assert_eq!(kind(l.admit("c1", &p, now)), DenialKind::Threads);
        }
        drop(a);
        drop(l.admit("c1", &p, now).unwrap());
    }

    /// Refuse `c1` for the thread limit every `every` from `from` to `to`
    /// (inclusive), ticking each second in between like the caller does.
    fn stay_over(
        l: &Limiter,
        p: &PlanLimits,
        start: Now,
        from: Duration,
        to: Duration,
        every: Duration,
    ) -> Vec<DenialKind> {
        let mut kinds = Vec::new();
        let mut t = from;
        while t <= to {
            l.tick(start + t);
            kinds.push(kind(l.admit("c1", p, start + t)));
            t += every;
        }
        kinds
    }

    #[test]
    fn over_for_fourteen_minutes_is_no_strike() {
        let l = limiter();
        let start = t0();
        let p = PlanLimits {
            max_threads: Some(1),
            ..plan()
        };
        let held = l.admit("c1", &p, start).unwrap();
        let kinds = stay_over(
            &l,
            &p,
            start,
            Duration::ZERO,
            14 * MIN,
            Duration::from_secs(30),
        );
        assert!(kinds.iter().all(|k| *k == DenialKind::Threads), "{kinds:?}");
        let live = l.snapshot("c1", start + 14 * MIN).unwrap();
        assert_eq!(live.over_since_ms, Some(start.wall_ms()));
        assert!(!held.cancel_token().is_cancelled());
        // They stop; a minute and a bit later the run is over, and starting
        // again starts a new run.
        l.tick(start + 15 * MIN + Duration::from_secs(1));
        assert_eq!(
            l.snapshot("c1", start + 15 * MIN).unwrap().over_since_ms,
            None
        );
        let kinds = stay_over(&l, &p, start, 16 * MIN, 30 * MIN, Duration::from_secs(30));
        assert!(kinds.iter().all(|k| *k == DenialKind::Threads), "{kinds:?}");
        assert!(!held.cancel_token().is_cancelled());
        assert!(l.take_events().is_empty());
    }

    #[test]
    fn a_gap_longer_than_a_minute_restarts_the_window() {
        let l = limiter();
        let start = t0();
        let p = PlanLimits {
            max_threads: Some(1),
            ..plan()
        };
        let held = l.admit("c1", &p, start).unwrap();
        stay_over(&l, &p, start, Duration::ZERO, 10 * MIN, MIN);
        // 61 s of quiet, then over again until 20 min: the run began at
        // 11:01, so 20 min is still inside its window.
        let kinds = stay_over(
            &l,
            &p,
            start,
            11 * MIN + Duration::from_secs(1),
            20 * MIN,
            MIN,
        );
        assert!(kinds.iter().all(|k| *k == DenialKind::Threads), "{kinds:?}");
        assert!(!held.cancel_token().is_cancelled());
    }

    #[test]
    fn over_for_fifteen_minutes_locks_out_and_kicks() {
        let l = limiter();
        let start = t0();
        let p = PlanLimits {
            max_threads: Some(2),
            ..plan()
        };
        let a = l.admit("c1", &p, start).unwrap();
        let b = l.admit("c1", &p, start).unwrap();
        let kinds = stay_over(&l, &p, start, Duration::ZERO, 15 * MIN, MIN);
        let (last, before) = kinds.split_last().unwrap();
        assert!(
            before.iter().all(|k| *k == DenialKind::Threads),
            "{before:?}"
        );
        assert_eq!(*last, DenialKind::LockedOut);
        assert!(a.cancel_token().is_cancelled());
        assert!(b.cancel_token().is_cancelled());
        assert_eq!(
            l.take_events(),
            vec![LimitEvent::LockedOut {
                customer_id: "c1".into(),
                until_ms: (start + 15 * MIN + 60 * MIN).wall_ms(),
                connections_closed: 2,
            }]
        );
        // The connections close.
        drop(a);
        drop(b);
        let at = start + 15 * MIN + Duration::from_secs(1);
        let d = l.admit("c1", &p, at).unwrap_err();
        assert_eq!(d.kind, DenialKind::LockedOut);
        assert_eq!(
            d.message,
            "locked out until 2026-11-20 13:15 UTC after staying over the connection limit for 15 min"
        );
        assert_eq!(d.retry_after, Some(60 * MIN - Duration::from_secs(1)));
        let live = l.snapshot("c1", at).unwrap();
        assert_eq!(live.threads, 0);
        assert_eq!(live.locked_until_ms, Some((start + 75 * MIN).wall_ms()));
        // Refused all hour, ticks or not.
        for m in [16, 30, 74] {
            l.tick(start + m * MIN);
            assert_eq!(
                kind(l.admit("c1", &p, start + m * MIN)),
                DenialKind::LockedOut
            );
        }
        l.tick(start + 75 * MIN);
        let after = l.admit("c1", &p, start + 75 * MIN).unwrap();
        assert!(
            !after.cancel_token().is_cancelled(),
            "fresh token after the kick"
        );
        assert_eq!(
            l.snapshot("c1", start + 75 * MIN).unwrap().locked_until_ms,
            None
        );
    }

    #[test]
    fn strike_durations_are_configurable() {
        let l = Limiter::new(LimiterConfig {
            strike_window: 2 * MIN,
            over_gap: Duration::from_secs(10),
            lockout: 5 * MIN,
            ..LimiterConfig::default()
        });
        let start = t0();
        let p = PlanLimits {
            max_threads: Some(1),
            ..plan()
        };
        let held = l.admit("c1", &p, start).unwrap();
        // Every 20 s is too sparse for a 10 s gap: never a strike.
        let kinds = stay_over(
            &l,
            &p,
            start,
            Duration::ZERO,
            5 * MIN,
            Duration::from_secs(20),
        );
        assert!(kinds.iter().all(|k| *k == DenialKind::Threads));
        let kinds = stay_over(&l, &p, start, 6 * MIN, 8 * MIN, Duration::from_secs(10));
        assert_eq!(*kinds.last().unwrap(), DenialKind::LockedOut);
        let d = l.admit("c1", &p, start + 9 * MIN).unwrap_err();
        assert!(d.message.ends_with("for 2 min"), "{}", d.message);
        drop(held);
        drop(l.admit("c1", &p, start + 13 * MIN).unwrap());
    }

    #[test]
    fn quota_refuses_and_reports_each_threshold_once() {
        let l = limiter();
        let now = t0();
        let p = PlanLimits {
            quota_bytes: Some(10_000_000_000),
            ..plan()
        };
        let a = l.admit("c1", &p, now).unwrap();
        let b = l.admit("c1", &p, now).unwrap();
        a.record_bytes(4_000_000_000, 3_000_000_000);
        assert!(l.take_events().is_empty());
        b.record_bytes(1_000_000_000, 0);
        b.record_bytes(1, 0);
        let ev = l.take_events();
        assert_eq!(
            ev,
            vec![LimitEvent::QuotaCrossed {
                customer_id: "c1".into(),
                percent: 80,
                used_bytes: 8_000_000_000,
                quota_bytes: 10_000_000_000,
                month: "2026-11".into(),
            }]
        );
        assert!(!a.cancel_token().is_cancelled());
        a.record_bytes(0, 2_000_000_000);
        let ev = l.take_events();
        assert!(
            matches!(
                ev.as_slice(),
                [LimitEvent::QuotaCrossed {
                    percent: 100,
                    used_bytes: 10_000_000_001,
                    ..
                }]
            ),
            "{ev:?}"
        );
        // Used up: open connections are kicked, new ones refused.
        assert!(a.cancel_token().is_cancelled());
        assert!(b.cancel_token().is_cancelled());
        let d = l.admit("c1", &p, now).unwrap_err();
        assert_eq!(d.kind, DenialKind::Quota);
        assert_eq!(
            d.message,
            "monthly data quota of 10.0 GB used up; resets on 2026-12-01"
        );
        a.record_bytes(5, 5);
        assert!(l.take_events().is_empty(), "100 % is reported once");
        assert_eq!(
            l.snapshot("c1", now).unwrap().bytes_this_month,
            10_000_000_011
        );
    }

    #[test]
    fn both_thresholds_in_one_step_report_both_in_order() {
        let l = limiter();
        let p = PlanLimits {
            quota_bytes: Some(1000),
            ..plan()
        };
        l.admit("c1", &p, t0()).unwrap().record_bytes(600, 600);
        let percents: Vec<u8> = l
            .take_events()
            .into_iter()
            .map(|e| match e {
                LimitEvent::QuotaCrossed { percent, .. } => percent,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(percents, [80, 100]);
    }

    #[test]
    fn quota_kick_can_be_turned_off() {
        let l = Limiter::new(LimiterConfig {
            kick_on_quota: false,
            ..LimiterConfig::default()
        });
        let p = PlanLimits {
            quota_bytes: Some(100),
            ..plan()
        };
        let a = l.admit("c1", &p, t0()).unwrap();
        a.record_bytes(100, 0);
        assert!(!a.cancel_token().is_cancelled());
        assert_eq!(kind(l.admit("c1", &p, t0())), DenialKind::Quota);
    }

    // -- metering while a flow runs ---------------------------------------------

    #[test]
    fn meter_charges_whole_steps_and_settles_the_rest() {
        let m = QuotaMeter::default();
        assert_eq!(m.count(QUOTA_STEP - 1), None);
        // The chunk that fills the step takes everything pending with it.
        assert_eq!(m.count(10), Some(QUOTA_STEP + 9));
        assert_eq!(m.count(QUOTA_STEP / 2), None);
        assert_eq!(
            m.count(QUOTA_STEP * 3),
            Some(QUOTA_STEP * 3 + QUOTA_STEP / 2)
        );
        assert_eq!(m.count(5), None);
        let charged = 4 * QUOTA_STEP + 9 + QUOTA_STEP / 2;
        // The flow's end (with 100 bytes the relay never saw, e.g. a
        // request head) charges exactly the rest, once.
        let total = charged + 5 + 100;
        assert_eq!(m.settle(total), (105, charged));
        assert_eq!(m.settle(total), (total, 0));
        // A short flow never reaches a step: its end charges everything.
        let m = QuotaMeter::default();
        assert_eq!(m.count(1000), None);
        assert_eq!(m.settle(1000), (1000, 0));
    }

    #[test]
    fn only_plans_with_a_limit_get_a_relay_hook() {
        let l = limiter();
        let a = l.admit("free", &plan(), t0()).unwrap();
        assert!(a.relay_throttle().is_none(), "unlimited: no hook at all");
        let bw = PlanLimits {
            bw_conn_bps: Some(1_000_000),
            ..plan()
        };
        let a = l.admit("bw", &bw, t0()).unwrap();
        let hook = a.relay_throttle().unwrap();
        hook.pace(Direction::ToTcp, 4 * QUOTA_STEP as usize);
        assert_eq!(
            l.snapshot("bw", t0()).unwrap().bytes_this_month,
            0,
            "no quota: nothing counted while the flow runs"
        );
        let q = PlanLimits {
            quota_bytes: Some(1_000_000_000),
            ..plan()
        };
        let a = l.admit("quota", &q, t0()).unwrap();
        let hook = a.relay_throttle().unwrap();
        // Counting never pauses a flow that is under its quota.
        assert_eq!(hook.pace(Direction::ToTcp, 2 * QUOTA_STEP as usize), None);
        assert_eq!(
            l.snapshot("quota", t0()).unwrap().bytes_this_month,
            2 * QUOTA_STEP
        );
    }

    #[test]
    fn a_long_flow_is_cut_at_its_quota_within_one_step() {
        let l = limiter();
        let quota = 3_000_000u64;
        let p = PlanLimits {
            quota_bytes: Some(quota),
            bw_conn_bps: Some(1_000_000_000),
            ..plan()
        };
        let a = l.admit("c1", &p, t0()).unwrap();
        let other = l.admit("c1", &p, t0()).unwrap();
        let hook = a.relay_throttle().unwrap();
        // A download in 16 KiB chunks, with a little upload, until the
        // hook says stop.
        let (mut up, mut down) = (0u64, 0u64);
        loop {
            let paused = hook.pace(Direction::ToTcp, 16_384);
            down += 16_384;
            if down % (256 * 1024) == 0 {
                hook.pace(Direction::ToQuic, 100);
                up += 100;
            }
            if paused == Some(KICKED_PAUSE) {
                break;
            }
            assert!(down < 2 * quota, "never cut off");
        }
        // Cut off within one step of the quota, with both thresholds
        // reported while the flow ran and every connection kicked.
        assert!(
            up + down >= quota && up + down < quota + QUOTA_STEP,
            "{up}+{down}"
        );
        let ev = l.take_events();
        let percents: Vec<u8> = ev
            .iter()
            .filter_map(|e| match e {
                LimitEvent::QuotaCrossed { percent, .. } => Some(*percent),
                _ => None,
            })
            .collect();
        assert_eq!(percents, vec![80, 100]);
        assert!(a.cancel_token().is_cancelled() && other.cancel_token().is_cancelled());
        // The other flow relays nothing more either.
        assert_eq!(
            other.relay_throttle().unwrap().pace(Direction::ToTcp, 1),
            Some(KICKED_PAUSE)
        );
        assert_eq!(kind(l.admit("c1", &p, t0())), DenialKind::Quota);
        // The flow's end (plus 200 bytes of heads the relay never saw)
        // charges only the rest: each byte counted once.
        a.record_flow_total(up + 200, down);
        drop(a);
        assert_eq!(
            l.snapshot("c1", t0()).unwrap().bytes_this_month,
            up + down + 200
        );
        assert!(l.take_events().is_empty(), "each threshold once");
    }

    #[test]
    fn without_kick_on_quota_a_metered_flow_goes_on() {
        let l = Limiter::new(LimiterConfig {
            kick_on_quota: false,
            ..LimiterConfig::default()
        });
        let p = PlanLimits {
            quota_bytes: Some(QUOTA_STEP),
            ..plan()
        };
        let a = l.admit("c1", &p, t0()).unwrap();
        let hook = a.relay_throttle().unwrap();
        assert_eq!(hook.pace(Direction::ToTcp, 2 * QUOTA_STEP as usize), None);
        assert_eq!(hook.pace(Direction::ToTcp, 2 * QUOTA_STEP as usize), None);
        assert!(!a.cancel_token().is_cancelled());
        // New connections are refused at once, not at the flow's end.
        assert_eq!(kind(l.admit("c1", &p, t0())), DenialKind::Quota);
    }

    #[test]
    fn loaded_usage_keeps_what_open_flows_charged() {
        let l = limiter();
        let p = PlanLimits {
            quota_bytes: Some(1_000_000_000),
            ..plan()
        };
        let a = l.admit("c1", &p, t0()).unwrap();
        a.relay_throttle()
            .unwrap()
            .pace(Direction::ToTcp, 3 * QUOTA_STEP as usize);
        // The store does not have the open flow's bytes yet.
        l.load_usage("c1", &p, 1000, t0());
        let month = |l: &Limiter| l.snapshot("c1", t0()).unwrap().bytes_this_month;
        assert_eq!(month(&l), 1000 + 3 * QUOTA_STEP);
        a.record_flow_total(0, 3 * QUOTA_STEP + 7);
        assert_eq!(month(&l), 1000 + 3 * QUOTA_STEP + 7);
        drop(a);
        // Nothing is left in flight, so a later load is the store's figure.
        l.load_usage("c1", &p, 5000, t0());
        assert_eq!(month(&l), 5000);
    }

    #[test]
    fn loaded_usage_counts_and_does_not_report_again() {
        let l = limiter();
        let now = t0();
        let p = PlanLimits {
            quota_bytes: Some(1000),
            ..plan()
        };
        l.load_usage("c1", &p, 850, now);
        let a = l.admit("c1", &p, now).unwrap();
        a.record_bytes(100, 0);
        assert!(
            l.take_events().is_empty(),
            "80 % was reported before the restart"
        );
        a.record_bytes(50, 0);
        assert_eq!(l.take_events().len(), 1);
        l.load_usage("c2", &p, 1000, now);
        assert_eq!(kind(l.admit("c2", &p, now)), DenialKind::Quota);
    }

    #[test]
    fn a_new_month_resets_usage_and_reports() {
        let l = limiter();
        let now = t0();
        let p = PlanLimits {
            quota_bytes: Some(1000),
            ..plan()
        };
        // A long download, still open when the month ends.
        let long = l.admit("c1", &p, now).unwrap();
        long.record_bytes(1000, 0);
        assert_eq!(l.take_events().len(), 2);
        assert_eq!(kind(l.admit("c1", &p, now)), DenialKind::Quota);
        // 2026-12-01 00:00:01 UTC.
        let december = now + Duration::from_secs(11 * 86_400 + 12 * 3600 + 1);
        l.tick(december);
        let live = l.snapshot("c1", december).unwrap();
        assert_eq!(
            (live.bytes_this_month, live.month.as_deref()),
            (0, Some("2026-12"))
        );
        let a = l.admit("c1", &p, december).unwrap();
        a.record_bytes(800, 0);
        let ev = l.take_events();
        assert!(
            matches!(ev.as_slice(), [LimitEvent::QuotaCrossed { percent: 80, month, .. }] if month == "2026-12"),
            "{ev:?}"
        );
        // A clock stepping back does not reopen November.
        l.tick(now);
        assert_eq!(l.snapshot("c1", now).unwrap().bytes_this_month, 800);
        drop((a, long));
    }

    #[test]
    fn a_customer_idle_over_the_month_end_starts_afresh() {
        let l = limiter();
        let now = t0();
        let p = PlanLimits {
            quota_bytes: Some(1000),
            ..plan()
        };
        l.admit("c1", &p, now).unwrap().record_bytes(1000, 0);
        let december = now + Duration::from_secs(11 * 86_400 + 12 * 3600 + 1);
        l.tick(december);
        // Nothing left to remember: November's bytes are gone with it.
        assert!(l.snapshot("c1", december).is_none());
        drop(l.admit("c1", &p, december).unwrap());
    }

    #[test]
    fn expired_plans_are_refused() {
        let l = limiter();
        let now = t0();
        let p = PlanLimits {
            expires_at_ms: Some(now.wall_ms() + 1000),
            ..plan()
        };
        drop(l.admit("c1", &p, now).unwrap());
        let d = l.admit("c1", &p, now + Duration::from_secs(1)).unwrap_err();
        assert_eq!(d.kind, DenialKind::Expired);
        assert_eq!(
            d.message,
            "plan expired on 2026-11-20 12:00 UTC (plan basic)"
        );
    }

    #[test]
    fn bans_kick_refuse_and_lift() {
        let l = limiter();
        let now = t0();
        let a = l.admit("c1", &plan(), now).unwrap();
        l.ban("c1", None, "abuse report 1234");
        assert!(a.cancel_token().is_cancelled());
        let d = l.admit("c1", &plan(), now).unwrap_err();
        assert_eq!(d.kind, DenialKind::Banned);
        assert_eq!(
            d.message,
            "access suspended by the operator: abuse report 1234"
        );
        assert_eq!(d.retry_after, None);
        let live = l.snapshot("c1", now).unwrap();
        assert_eq!(live.ban.unwrap().reason, "abuse report 1234");
        // Bans keep their entry however long nobody comes.
        drop(a);
        l.tick(now + 24 * 60 * MIN);
        assert!(l.snapshot("c1", now).is_some());
        assert!(l.unban("c1"));
        assert!(!l.unban("c1"));
        let b = l.admit("c1", &plan(), now).unwrap();
        assert!(!b.cancel_token().is_cancelled());
        assert!(!l.unban("nobody"));
    }

    #[test]
    fn timed_bans_end_by_themselves() {
        let l = limiter();
        let now = t0();
        l.ban("c1", Some(now.wall + 60 * MIN), "");
        let d = l.admit("c1", &plan(), now).unwrap_err();
        assert_eq!(
            d.message,
            "access suspended by the operator until 2026-11-20 13:00 UTC"
        );
        assert_eq!(d.retry_after, Some(60 * MIN));
        assert_eq!(
            kind(l.admit("c1", &plan(), now + 59 * MIN)),
            DenialKind::Banned
        );
        drop(l.admit("c1", &plan(), now + 60 * MIN).unwrap());
    }

    #[test]
    fn unban_lifts_a_strike_lockout() {
        let l = limiter();
        let start = t0();
        let p = PlanLimits {
            max_threads: Some(1),
            ..plan()
        };
        let held = l.admit("c1", &p, start).unwrap();
        stay_over(&l, &p, start, Duration::ZERO, 15 * MIN, MIN);
        drop(held);
        assert_eq!(
            kind(l.admit("c1", &p, start + 16 * MIN)),
            DenialKind::LockedOut
        );
        assert!(l.unban("c1"));
        drop(l.admit("c1", &p, start + 16 * MIN).unwrap());
    }

    #[test]
    fn idle_customers_are_forgotten() {
        let l = limiter();
        let now = t0();
        for i in 0..1000 {
            drop(l.admit(&format!("c{i}"), &plan(), now).unwrap());
        }
        let held = l.admit("busy", &plan(), now).unwrap();
        let user = l.admit("user", &plan(), now).unwrap();
        user.record_bytes(1, 0);
        drop(user);
        let throttled = l
            .admit(
                "throttled",
                &PlanLimits {
                    bw_conn_bps: Some(1000),
                    ..plan()
                },
                now,
            )
            .unwrap()
            .throttle()
            .unwrap();
        assert_eq!(l.tracked_customers(), 1003);
        l.tick(now + 9 * MIN);
        assert_eq!(l.tracked_customers(), 1003, "not idle long enough");
        l.tick(now + 10 * MIN);
        // Kept: an open connection, this month's bytes, a live throttle.
        assert_eq!(l.tracked_customers(), 3);
        assert!(l.snapshot("busy", now).is_some());
        assert!(l.snapshot("user", now).is_some());
        drop(held);
        drop(throttled);
        l.tick(now + 20 * MIN);
        assert_eq!(l.tracked_customers(), 1);
        assert!(l.snapshot("c5", now).is_none());
    }

    #[test]
    fn recent_connection_rate_is_reported() {
        let l = limiter();
        let now = t0();
        for _ in 0..20 {
            drop(l.admit("c1", &plan(), now).unwrap());
        }
        let r = l.snapshot("c1", now).unwrap().conns_per_sec_recent;
        assert!((r - 2.0).abs() < 1e-9, "{r}");
        let later = l
            .snapshot("c1", now + Duration::from_secs(60))
            .unwrap()
            .conns_per_sec_recent;
        assert!(later < 0.01, "{later}");
    }

    #[test]
    fn events_are_bounded() {
        let l = Limiter::new(LimiterConfig {
            max_events: 3,
            ..LimiterConfig::default()
        });
        let p = PlanLimits {
            quota_bytes: Some(10),
            ..plan()
        };
        for i in 0..5 {
            l.admit(&format!("c{i}"), &p, t0())
                .unwrap()
                .record_bytes(8, 0);
        }
        assert_eq!(l.take_events().len(), 3);
        assert_eq!(l.dropped_events(), 2);
    }

    // -- ports ----------------------------------------------------------------

    #[test]
    fn default_port_policy_matches_the_global_one() {
        let p = plan();
        for port in [1, 22, 80, 443, 8080, 65535] {
            assert!(p.check_port(port).is_ok(), "{port}");
        }
        for port in DENIED_PORTS {
            let d = p.check_port(*port).unwrap_err();
            assert_eq!(d.kind, DenialKind::Port);
            assert_eq!(
                d.message,
                format!("port {port} is closed: mail ports (25, 465, 587) are blocked")
            );
        }
    }

    #[test]
    fn plan_port_ranges() {
        let p = PlanLimits {
            allowed_ports: Some(vec![(80, 80), (443, 443), (1, 65535)]),
            ..plan()
        };
        // A wide range opens everything except mail.
        assert!(p.check_port(8080).is_ok());
        assert_eq!(p.check_port(25).unwrap_err().kind, DenialKind::Port);
        let web = PlanLimits {
            allowed_ports: Some(vec![(80, 80), (443, 443)]),
            ..plan()
        };
        assert!(web.check_port(443).is_ok());
        assert_eq!(
            web.check_port(22).unwrap_err().message,
            "port 22 is not allowed (plan basic)"
        );
        let mail = PlanLimits {
            allowed_ports: Some(vec![(25, 25), (465, 587)]),
            ..plan()
        };
        assert!(mail.check_port(25).is_ok());
        assert!(mail.check_port(465).is_ok());
        assert!(mail.check_port(587).is_ok());
        assert!(mail.check_port(500).is_ok());
        assert!(mail.check_port(26).is_err());
    }

    #[test]
    fn plans_round_trip_through_json_and_validate() {
        let p = PlanLimits {
            name: "pro".into(),
            max_threads: Some(50),
            new_conn_per_sec: Some(20),
            bw_conn_bps: Some(1_000_000),
            bw_customer_bps: Some(10_000_000),
            quota_bytes: Some(10_000_000_000),
            expires_at_ms: Some(1_800_000_000_000),
            allowed_ports: Some(vec![(80, 80), (1024, 65535)]),
        };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<PlanLimits>(&json).unwrap(), p);
        assert!(p.validate().is_ok());
        let minimal: PlanLimits = serde_json::from_str(r#"{"name":"basic"}"#).unwrap();
        assert_eq!(minimal, plan());
        assert!(serde_json::from_str::<PlanLimits>(r#"{"name":"x","threads":5}"#).is_err());
        let bad = |f: fn(&mut PlanLimits)| {
            let mut p = plan();
            f(&mut p);
            p.validate().unwrap_err()
        };
        assert_eq!(bad(|p| p.name = " ".into()), PlanError::EmptyName);
        assert_eq!(
            bad(|p| p.bw_conn_bps = Some(0)),
            PlanError::Zero("bw_conn_bps")
        );
        assert_eq!(
            bad(|p| p.new_conn_per_sec = Some(0)),
            PlanError::Zero("new_conn_per_sec")
        );
        assert_eq!(
            bad(|p| p.allowed_ports = Some(vec![(90, 80)])),
            PlanError::BadRange(90, 80)
        );
    }

    #[test]
    fn config_validation() {
        assert!(LimiterConfig::default().validate().is_ok());
        let c = LimiterConfig {
            lockout: Duration::ZERO,
            ..LimiterConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::Zero("lockout")));
        let c = LimiterConfig {
            over_gap: 20 * MIN,
            ..LimiterConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::GapOverWindow));
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_bytes(10_000_000_000), "10.0 GB");
        assert_eq!(fmt_bytes(1_500_000), "1.5 MB");
        assert_eq!(fmt_bytes(999), "999 bytes");
        assert_eq!(fmt_duration(15 * MIN), "15 min");
        assert_eq!(fmt_duration(60 * MIN), "1 h");
        assert_eq!(fmt_duration(Duration::from_secs(90)), "90 s");
        assert_eq!(
            Month {
                year: 2026,
                month: 12
            }
            .next_start(),
            "2027-01-01"
        );
    }

    // -- bandwidth --------------------------------------------------------------

    fn throttle_for(
        l: &Limiter,
        customer: &str,
        p: &PlanLimits,
    ) -> (Admission, Arc<BandwidthThrottle>) {
        let a = l.admit(customer, p, t0()).unwrap();
        let t = a.throttle().unwrap();
        (a, t)
    }

    #[test]
    fn connection_bandwidth_bursts_one_second_then_paces() {
        let l = limiter();
        let p = PlanLimits {
            bw_conn_bps: Some(100_000),
            ..plan()
        };
        let (_a, t) = throttle_for(&l, "c1", &p);
        let now = Instant::now();
        // One second's worth passes at once.
        assert_eq!(t.pace_at(Direction::ToTcp, 100_000, now), None);
        // The next 50 kB must wait half a second.
        assert_eq!(
            t.pace_at(Direction::ToTcp, 50_000, now),
            Some(Duration::from_millis(500))
        );
        // The other direction has its own budget.
        assert_eq!(t.pace_at(Direction::ToQuic, 100_000, now), None);
        // After the wait and a further second, a full burst again.
        let later = now + Duration::from_millis(1500);
        assert_eq!(t.pace_at(Direction::ToTcp, 100_000, later), None);
    }

    /// Simulate `chunks[i]`-sized reads on connection `i` for `secs`
    /// virtual seconds, each connection moving its next chunk as soon as
    /// its last wait ends; bytes moved per connection.
    fn simulate(
        throttles: &[Arc<BandwidthThrottle>],
        chunks: &[usize],
        start: Instant,
        secs: u64,
    ) -> Vec<u64> {
        let end = start + Duration::from_secs(secs);
        let mut next = vec![start; throttles.len()];
        let mut moved = vec![0u64; throttles.len()];
        loop {
            let (i, &at) = next.iter().enumerate().min_by_key(|(_, t)| **t).unwrap();
            if at >= end {
                return moved;
            }
            moved[i] += chunks[i] as u64;
            let wait = throttles[i]
                .pace_at(Direction::ToTcp, chunks[i], at)
                .unwrap_or_default();
            // A real relay also spends time on the bytes themselves.
            next[i] = at + wait.max(Duration::from_micros(10));
        }
    }

    #[test]
    fn customer_bandwidth_is_shared_fairly_and_holds_the_rate() {
        let l = limiter();
        let rate = 1_000_000u64;
        let p = PlanLimits {
            bw_customer_bps: Some(rate),
            ..plan()
        };
        let (_a, t1) = throttle_for(&l, "c1", &p);
        let (_b, t2) = throttle_for(&l, "c1", &p);
        let (_c, t3) = throttle_for(&l, "c1", &p);
        // Another customer has a budget of its own.
        let (_d, other) = throttle_for(&l, "c2", &p);
        let secs = 100;
        let moved = simulate(&[t1, t2, t3, other], &[65_536; 4], Instant::now(), secs);
        let ours: u64 = moved[..3].iter().sum();
        let budget = rate * (secs + 1) + 3 * 65_536;
        assert!(ours <= budget, "{ours} > {budget}");
        assert!(ours >= rate * secs * 95 / 100, "{ours}");
        for m in &moved[..3] {
            let share = *m as f64 / ours as f64;
            assert!((share - 1.0 / 3.0).abs() < 0.02, "{moved:?}");
        }
        assert!(moved[3] >= rate * secs * 95 / 100, "{moved:?}");
    }

    #[test]
    fn a_small_reader_is_not_starved_by_a_big_one() {
        let l = limiter();
        let p = PlanLimits {
            bw_customer_bps: Some(100_000),
            ..plan()
        };
        let (_a, big) = throttle_for(&l, "c1", &p);
        let (_b, small) = throttle_for(&l, "c1", &p);
        let start = Instant::now();
        // The big one has run up a debt...
        for _ in 0..4 {
            big.pace_at(Direction::ToTcp, 65_536, start);
        }
        // ...and the small one waits for that debt, not for more.
        let wait = small.pace_at(Direction::ToTcp, 1000, start).unwrap();
        let bound = Duration::from_secs_f64((4.0 * 65_536.0 + 1000.0) / 100_000.0);
        assert!(wait <= bound, "{wait:?} > {bound:?}");
    }

    #[test]
    fn connection_and_customer_limits_combine() {
        let l = limiter();
        let p = PlanLimits {
            bw_conn_bps: Some(1_000_000),
            bw_customer_bps: Some(1_500_000),
            ..plan()
        };
        let (_a, t1) = throttle_for(&l, "c1", &p);
        let start = Instant::now();
        let moved = simulate(std::slice::from_ref(&t1), &[16_384], start, 50);
        // Alone, a connection gets its own limit...
        assert!(moved[0] <= 1_000_000 * 51 + 16_384, "{moved:?}");
        assert!(moved[0] >= 1_000_000 * 48, "{moved:?}");
        let (_b, t2) = throttle_for(&l, "c1", &p);
        let (_c, t3) = throttle_for(&l, "c1", &p);
        // ...three share the customer's (later, on a clock past the first run).
        let moved = simulate(
            &[t1, t2, t3],
            &[16_384; 3],
            start + Duration::from_secs(60),
            50,
        );
        let total: u64 = moved.iter().sum();
        assert!(total <= 1_500_000 * 52 + 3 * 16_384, "{moved:?}");
        assert!(total >= 1_500_000 * 48, "{moved:?}");
    }

    #[tokio::test]
    async fn throttle_paces_through_the_relay_trait() {
        // Through the trait, on tokio's clock: 3 s of data at 100 kB/s with
        // a one-second burst cannot finish in under 2 s.
        let l = limiter();
        let p = PlanLimits {
            bw_conn_bps: Some(100_000),
            ..plan()
        };
        let a = l.admit("c1", &p, Now::system()).unwrap();
        let t = a.relay_throttle().unwrap();
        let started = tokio::time::Instant::now();
        for _ in 0..30 {
            if let Some(d) = t.pace(Direction::ToQuic, 10_000) {
                tokio::time::sleep(d).await;
            }
        }
        assert!(
            started.elapsed() >= Duration::from_millis(1600),
            "{:?}",
            started.elapsed()
        );
    }

    // -- concurrency --------------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_admissions_never_exceed_the_limit() {
        let l = Arc::new(limiter());
        let p = Arc::new(PlanLimits {
            max_threads: Some(10),
            ..plan()
        });
        let held = Arc::new(AtomicU32::new(0));
        let peak = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (l, p, held, peak) = (l.clone(), p.clone(), held.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                let mut admitted = 0u32;
                for _ in 0..500 {
                    if let Ok(a) = l.admit("c1", &p, Now::system()) {
                        admitted += 1;
                        let n = held.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(n, Ordering::SeqCst);
                        assert!(l.snapshot("c1", Now::system()).unwrap().threads <= 10);
                        tokio::task::yield_now().await;
                        held.fetch_sub(1, Ordering::SeqCst);
                        drop(a);
                    } else {
                        tokio::task::yield_now().await;
                    }
                }
                admitted
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += t.await.unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= 10);
        assert!(admitted > 0);
        assert_eq!(l.snapshot("c1", Now::system()).unwrap().threads, 0);
    }
}
