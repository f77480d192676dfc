//! `hilink` rotation backend: a Huawei stick in HiLink (router) mode, such
//! as the E3372h, driven through its web API.
//!
//! Glossary:
//! - **session** (`SesInfo`): a `SessionID=…` cookie the stick hands out.
//! - **token** (`TokInfo`): the `__RequestVerificationToken` header every
//!   POST must carry. Many firmwares accept each token once, so the backend
//!   fetches a fresh one (`GET /api/webserver/SesTokInfo`) before every POST,
//!   unless the previous answer already handed over the next one in its
//!   `__RequestVerificationToken…` headers.
//! - **login**: sticks with a locked web UI answer `100003` (no rights) until
//!   `POST /api/user/login`. With `password` set the backend logs in as
//!   `username` using the stick's advertised `password_type` (4: salted
//!   SHA-256 with the current token; anything else: base64). Sticks that
//!   encrypt the login with RSA are not supported.
//!
//! Ladder, softest first:
//! - `dataswitch`: `POST /api/dialup/mobile-dataswitch` with `0`, a pause,
//!   then `1`.
//! - `reboot`: `POST /api/device/control` with `<Control>1</Control>`, wait
//!   for the API to disappear and come back (the stick re-enumerates on USB).
//!
//! After either, `GET /api/monitoring/status` is polled until
//! `ConnectionStatus` is 901 (connected). The HTTP requests leave through the
//! exit's interface, so several sticks sharing 192.168.8.1 work as long as
//! each has its own interface.
//!
//! The stick's answers are flat XML documents; a small tag extractor reads
//! them (see the pure functions at the end, tested on real-shaped bodies).

use std::collections::VecDeque;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use shared::wire::{Registration, Telemetry};
use tokio::time::Instant;

use super::RotateError;
use crate::net::http::{self, HttpError, Request, Response};

/// Bound on the three telemetry requests together.
const TELEMETRY_TIMEOUT: Duration = Duration::from_secs(8);
/// How often the connection status is polled.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// Per-request bound while probing whether the API is up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the API may stay up after a reboot request before the backend
/// stops waiting for it to go away.
const REBOOT_GOES_DOWN_WITHIN: Duration = Duration::from_secs(20);

fn default_url() -> String {
    "http://192.168.8.1".to_string()
}
fn default_username() -> String {
    "admin".to_string()
}
fn default_reboot_timeout_secs() -> u64 {
    120
}
fn default_dataswitch_pause_secs() -> u64 {
    2
}
fn default_request_timeout_secs() -> u64 {
    10
}

/// `[exit.rotation]` with `backend = "hilink"`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HilinkConfig {
    /// The stick's web API, `http://` only.
    #[serde(default = "default_url")]
    pub url: String,
    /// Login name on locked firmware.
    #[serde(default = "default_username")]
    pub username: String,
    /// Web UI password, for firmware that wants a login; unset for sticks
    /// that only want the session token (the usual E3372h).
    #[serde(default)]
    pub password: Option<String>,
    /// How long a reboot may take until the stick is connected again (the
    /// rotation deadline caps it too).
    #[serde(default = "default_reboot_timeout_secs")]
    pub reboot_timeout_secs: u64,
    /// How long mobile data stays off in the `dataswitch` rung.
    #[serde(default = "default_dataswitch_pause_secs")]
    pub dataswitch_pause_secs: u64,
    /// Bound on each HTTP request.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
}

impl Default for HilinkConfig {
    fn default() -> Self {
        Self {
            url: default_url(),
            username: default_username(),
            password: None,
            reboot_timeout_secs: default_reboot_timeout_secs(),
            dataswitch_pause_secs: default_dataswitch_pause_secs(),
            request_timeout_secs: default_request_timeout_secs(),
        }
    }
}

impl std::fmt::Debug for HilinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HilinkConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "********"))
            .field("reboot_timeout_secs", &self.reboot_timeout_secs)
            .field("dataswitch_pause_secs", &self.dataswitch_pause_secs)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .finish()
    }
}

impl HilinkConfig {
    /// The API base without a trailing slash, or why the config is unusable.
    pub fn validate(&self) -> Result<String, String> {
        let base = self.url.trim().trim_end_matches('/');
        let Some(host) = base.strip_prefix("http://") else {
            return Err(format!(
                "hilink backend: url {:?} must start with http:// (the stick's API has no TLS)",
                self.url
            ));
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!(
                "hilink backend: url {:?} must be http://HOST[:PORT] (no path)",
                self.url
            ));
        }
        if self.reboot_timeout_secs == 0 {
            return Err("hilink backend: reboot_timeout_secs must be at least 1".to_string());
        }
        if self.request_timeout_secs == 0 {
            return Err("hilink backend: request_timeout_secs must be at least 1".to_string());
        }
        if self.password.is_some() && self.username.trim().is_empty() {
            return Err("hilink backend: username is empty".to_string());
        }
        Ok(base.to_string())
    }
}

/// Why an API call failed.
#[derive(Debug)]
enum ApiError {
    /// No HTTP answer (unreachable, timeout, garbage).
    Http(HttpError),
    /// An HTTP status other than 200.
    Status(u16),
    /// The stick's `<error><code>…</code></error>`.
    Api { code: u32, message: String },
    /// 200 with a body we cannot read.
    Malformed(String),
}

impl ApiError {
    fn describe(&self) -> String {
        match self {
            ApiError::Http(e) => format!("no answer from the stick: {e}"),
            ApiError::Status(s) => format!("the stick answered HTTP {s}"),
            ApiError::Api { code, message } => {
                let known = error_text(*code);
                match (known, message.is_empty()) {
                    (Some(k), true) => format!("the stick answered error {code} ({k})"),
                    (Some(k), false) => format!("the stick answered error {code} ({k}: {message})"),
                    (None, true) => format!("the stick answered error {code}"),
                    (None, false) => format!("the stick answered error {code} ({message})"),
                }
            }
            ApiError::Malformed(m) => format!("unreadable answer from the stick: {m}"),
        }
    }

    /// The session or token was not accepted; fresh ones may work.
    fn is_session(&self) -> bool {
        matches!(self, ApiError::Api { code, .. } if matches!(code, 125001..=125003))
    }

    fn is_no_rights(&self) -> bool {
        matches!(self, ApiError::Api { code: 100003, .. })
    }

    fn into_rotate(self, what: &str) -> RotateError {
        let text = format!("{what}: {}", self.describe());
        match self {
            ApiError::Http(HttpError::Timeout(_)) => RotateError::Timeout(text),
            _ => RotateError::Failed(text),
        }
    }
}

/// Cookie and tokens of the current API session.
#[derive(Default)]
struct Session {
    /// `SessionID=…`, sent as the Cookie header.
    cookie: Option<String>,
    /// Tokens handed over in answer headers, oldest first.
    tokens: VecDeque<String>,
    logged_in: bool,
}

pub struct HilinkBackend {
    base: String,
    interface: Option<String>,
    username: String,
    password: Option<String>,
    reboot_timeout: Duration,
    dataswitch_pause: Duration,
    request_timeout: Duration,
    session: Session,
}

impl HilinkBackend {
    pub fn new(cfg: &HilinkConfig, interface: Option<&str>) -> Result<Self, String> {
        let base = cfg.validate()?;
        Ok(Self {
            base,
            interface: interface.map(str::to_string),
            username: cfg.username.clone(),
            password: cfg.password.clone(),
            reboot_timeout: Duration::from_secs(cfg.reboot_timeout_secs),
            dataswitch_pause: Duration::from_secs(cfg.dataswitch_pause_secs),
            request_timeout: Duration::from_secs(cfg.request_timeout_secs),
            session: Session::default(),
        })
    }

    pub fn ladder(&self) -> &'static [&'static str] {
        &["dataswitch", "reboot"]
    }

    pub async fn step(&mut self, rung: usize, deadline: Instant) -> Result<(), RotateError> {
        match super::rung_name(self.ladder(), rung)? {
            "dataswitch" => self.dataswitch(deadline).await,
            _ => self.reboot(deadline).await,
        }
    }

    pub async fn telemetry(&mut self) -> Telemetry {
        let deadline = Instant::now() + TELEMETRY_TIMEOUT;
        let mut t = Telemetry::default();
        match self.get("/api/monitoring/status", deadline).await {
            Ok(doc) => {
                let s = parse_status(&doc);
                t.signal_bars = s.signal_bars;
                t.access_tech = s.access_tech;
                t.registration = s.registration;
            }
            Err(e) => tracing::debug!(error = %e.describe(), "no HiLink status"),
        }
        match self.get("/api/device/signal", deadline).await {
            Ok(doc) => {
                let s = parse_device_signal(&doc);
                t.rssi_dbm = s.rssi_dbm;
                t.rsrp_dbm = s.rsrp_dbm;
                t.rsrq_db = s.rsrq_db;
                t.sinr_db = s.sinr_db;
                t.band = s.band;
                t.cell_id = s.cell_id;
            }
            Err(e) => tracing::debug!(error = %e.describe(), "no HiLink signal"),
        }
        match self.get("/api/net/current-plmn", deadline).await {
            Ok(doc) => t.operator = parse_plmn(&doc),
            Err(e) => tracing::debug!(error = %e.describe(), "no HiLink operator"),
        }
        t
    }

    /// A deadline for switching data back on after a failure: never shorter
    /// than one request, whatever the rotation deadline says.
    fn restore_deadline(&self, deadline: Instant) -> Instant {
        deadline.max(Instant::now() + self.request_timeout)
    }

    async fn dataswitch(&mut self, deadline: Instant) -> Result<(), RotateError> {
        self.post(
            "/api/dialup/mobile-dataswitch",
            "<dataswitch>0</dataswitch>",
            deadline,
        )
        .await
        .map_err(|e| e.into_rotate("switching mobile data off"))?;
        tokio::time::sleep_until((Instant::now() + self.dataswitch_pause).min(deadline)).await;
        let on = "<dataswitch>1</dataswitch>";
        if let Err(e) = self
            .post(
                "/api/dialup/mobile-dataswitch",
                on,
                self.restore_deadline(deadline),
            )
            .await
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if self
                .post(
                    "/api/dialup/mobile-dataswitch",
                    on,
                    self.restore_deadline(deadline),
                )
                .await
                .is_err()
            {
                return Err(e.into_rotate(
                    "switching mobile data back on (the stick may still be offline)",
                ));
            }
        }
        self.wait_connected("mobile data was switched back on", deadline)
            .await
    }

    async fn reboot(&mut self, deadline: Instant) -> Result<(), RotateError> {
        let started = Instant::now();
        match self
            .post("/api/device/control", "<Control>1</Control>", deadline)
            .await
        {
            Ok(()) => {}
            // Some sticks go down before they finish answering.
            Err(ApiError::Http(e)) if went_down_mid_answer(&e) => {
                tracing::info!(error = %e, "the stick dropped the connection while accepting the reboot");
            }
            Err(e) => return Err(e.into_rotate("asking the stick to reboot")),
        }
        // A rebooted stick forgets every session and login.
        self.session = Session::default();
        let until = deadline.min(started + self.reboot_timeout);
        let down_by = until.min(Instant::now() + REBOOT_GOES_DOWN_WITHIN);
        if !self.wait_api(false, down_by).await {
            tracing::warn!(
                "the stick's API kept answering after the reboot request; waiting for the connection anyway"
            );
        } else if !self.wait_api(true, until).await {
            return Err(RotateError::Timeout(format!(
                "the stick's API did not come back within {:?} of the reboot request",
                started.elapsed()
            )));
        }
        self.wait_connected("the stick rebooted", until).await
    }

    /// Poll until the API answers (`up`) or stops answering (`!up`); false
    /// when `until` passes first.
    async fn wait_api(&self, up: bool, until: Instant) -> bool {
        loop {
            let probe_until = until.min(Instant::now() + PROBE_TIMEOUT);
            let answers = self
                .send("GET", "/api/monitoring/status", &[], b"", probe_until)
                .await
                .is_ok();
            if answers == up {
                return true;
            }
            if Instant::now() + Duration::from_millis(500) >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn wait_connected(&mut self, after: &str, until: Instant) -> Result<(), RotateError> {
        let started = Instant::now();
        loop {
            let last = match self.get("/api/monitoring/status", until).await {
                Ok(doc) => {
                    let s = parse_status(&doc);
                    if s.connection_status == Some(901) {
                        tracing::info!(after = ?started.elapsed(), "HiLink stick connected again");
                        return Ok(());
                    }
                    match s.connection_status {
                        Some(c) => format!("ConnectionStatus {c} ({})", connection_status_text(c)),
                        None => "no ConnectionStatus in /api/monitoring/status".to_string(),
                    }
                }
                Err(e) => e.describe(),
            };
            if Instant::now() + POLL_EVERY >= until {
                return Err(RotateError::Timeout(format!(
                    "the stick did not reconnect within {:?} after {after} (last: {last})",
                    started.elapsed()
                )));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// One HTTP exchange with the stick.
    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        deadline: Instant,
    ) -> Result<Response, ApiError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ApiError::Http(HttpError::Timeout(Duration::ZERO)));
        }
        let url = format!("{}{path}", self.base);
        let req = Request {
            method,
            url: &url,
            headers,
            body,
        };
        http::send(
            req,
            self.interface.as_deref(),
            left.min(self.request_timeout),
        )
        .await
        .map_err(ApiError::Http)
    }

    /// Remember the cookie and tokens an answer hands over.
    fn harvest(&mut self, resp: &Response) {
        for (name, value) in &resp.headers {
            if name.eq_ignore_ascii_case("set-cookie") {
                if let Some(c) = session_cookie(value) {
                    self.session.cookie = Some(c);
                }
            } else if name.eq_ignore_ascii_case("__RequestVerificationTokenone")
                || name.eq_ignore_ascii_case("__RequestVerificationTokentwo")
                || name.eq_ignore_ascii_case("__RequestVerificationToken")
            {
                let v = value.trim();
                if !v.is_empty() {
                    self.session.tokens.push_back(v.to_string());
                }
            }
        }
    }

    fn cookie_header(&self) -> Vec<(&str, &str)> {
        match &self.session.cookie {
            Some(c) => vec![("Cookie", c.as_str())],
            None => Vec::new(),
        }
    }

    /// GET `path`; on a session or rights error, renew the session (and log
    /// in when a password is configured) and try once more.
    async fn get(&mut self, path: &str, deadline: Instant) -> Result<String, ApiError> {
        let mut renewed = false;
        loop {
            let headers = self.cookie_header();
            let resp = self.send("GET", path, &headers, b"", deadline).await?;
            self.harvest(&resp);
            match read_answer(&resp) {
                Err(e)
                    if !renewed
                        && (e.is_session() || e.is_no_rights() && self.password.is_some()) =>
                {
                    renewed = true;
                    self.renew(deadline).await?;
                }
                other => return other,
            }
        }
    }

    /// POST `<request>{inner}</request>` to `path` with a fresh token; the
    /// answer must not be an error. Retried once with a new session on a
    /// token/session error (and after logging in on "no rights").
    async fn post(&mut self, path: &str, inner: &str, deadline: Instant) -> Result<(), ApiError> {
        let body = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><request>{inner}</request>");
        let mut renewed = false;
        loop {
            let token = self.fresh_token(deadline).await?;
            let mut headers = self.cookie_header();
            headers.push(("__RequestVerificationToken", token.as_str()));
            headers.push((
                "Content-Type",
                "application/x-www-form-urlencoded; charset=UTF-8",
            ));
            headers.push(("X-Requested-With", "XMLHttpRequest"));
            let resp = self
                .send("POST", path, &headers, body.as_bytes(), deadline)
                .await?;
            self.harvest(&resp);
            match read_answer(&resp) {
                Ok(_) => return Ok(()),
                Err(e)
                    if !renewed
                        && (e.is_session() || e.is_no_rights() && self.password.is_some()) =>
                {
                    tracing::debug!(error = %e.describe(), path, "renewing the HiLink session");
                    renewed = true;
                    self.renew(deadline).await?;
                }
                Err(e) => {
                    return Err(match e {
                        ApiError::Api { code: 100003, .. } if self.password.is_none() => {
                            ApiError::Api {
                                code: 100003,
                                message: "this stick wants a login: set `password`".to_string(),
                            }
                        }
                        e => e,
                    });
                }
            }
        }
    }

    /// Forget the session; log in again when a password is configured.
    async fn renew(&mut self, deadline: Instant) -> Result<(), ApiError> {
        self.session = Session::default();
        if self.password.is_some() {
            self.login(deadline).await?;
        }
        Ok(())
    }

    /// A token for the next POST: one handed over by the previous answer,
    /// else a new session and token from `SesTokInfo`.
    async fn fresh_token(&mut self, deadline: Instant) -> Result<String, ApiError> {
        if let Some(t) = self.session.tokens.pop_front() {
            return Ok(t);
        }
        let headers = self.cookie_header();
        let resp = self
            .send("GET", "/api/webserver/SesTokInfo", &headers, b"", deadline)
            .await?;
        let doc = read_answer(&resp)?;
        let Some((ses, tok)) = parse_ses_tok_info(&doc) else {
            return Err(ApiError::Malformed(
                "/api/webserver/SesTokInfo has no TokInfo".to_string(),
            ));
        };
        // A logged-in session keeps its own cookie; SesTokInfo only adds a
        // token to it.
        if !self.session.logged_in || self.session.cookie.is_none() {
            self.session.cookie = Some(ses);
        }
        Ok(tok)
    }

    async fn login(&mut self, deadline: Instant) -> Result<(), ApiError> {
        let password = self.password.clone().unwrap_or_default();
        let token = self.fresh_token(deadline).await?;
        let headers = self.cookie_header();
        let resp = self
            .send("GET", "/api/user/state-login", &headers, b"", deadline)
            .await?;
        let doc = read_answer(&resp)?;
        if xml_tag(&doc, "State").as_deref() == Some("0") {
            self.session.logged_in = true;
            self.session.tokens.push_front(token);
            return Ok(());
        }
        let password_type: u32 = xml_tag(&doc, "password_type")
            .and_then(|v| v.parse().ok())
            .unwrap_or(4);
        let encoded = login_password(&self.username, &password, &token, password_type);
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><request><Username>{}</Username>\
             <Password>{}</Password><password_type>{password_type}</password_type></request>",
            xml_escape(&self.username),
            encoded
        );
        let mut headers = self.cookie_header();
        headers.push(("__RequestVerificationToken", token.as_str()));
        headers.push((
            "Content-Type",
            "application/x-www-form-urlencoded; charset=UTF-8",
        ));
        headers.push(("X-Requested-With", "XMLHttpRequest"));
        let resp = self
            .send(
                "POST",
                "/api/user/login",
                &headers,
                body.as_bytes(),
                deadline,
            )
            .await?;
        // A successful login opens a new session: only its tokens count.
        self.session.tokens.clear();
        self.harvest(&resp);
        match read_answer(&resp) {
            Ok(_) | Err(ApiError::Api { code: 108003, .. }) => {
                self.session.logged_in = true;
                tracing::info!(username = %self.username, "logged in to the HiLink stick");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Whether a failed exchange may still have delivered the request (the
/// stick went down while answering) rather than never reaching it.
fn went_down_mid_answer(e: &HttpError) -> bool {
    match e {
        HttpError::Malformed(_) | HttpError::Timeout(_) => true,
        HttpError::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionAborted
        ),
        _ => false,
    }
}

/// The body of a 200 answer that is not an `<error>`.
fn read_answer(resp: &Response) -> Result<String, ApiError> {
    let doc = String::from_utf8_lossy(&resp.body).into_owned();
    if let Some((code, message)) = parse_api_error(&doc) {
        return Err(ApiError::Api { code, message });
    }
    if resp.status != 200 {
        return Err(ApiError::Status(resp.status));
    }
    Ok(doc)
}

/// `SessionID=…` from a `Set-Cookie` value.
fn session_cookie(set_cookie: &str) -> Option<String> {
    let first = set_cookie.split(';').next()?.trim();
    first
        .to_ascii_lowercase()
        .starts_with("sessionid=")
        .then(|| first.to_string())
}

/// The `Password` field of `/api/user/login`.
///
/// Type 4: `base64(hex(sha256(username + base64(hex(sha256(password))) +
/// token)))`, hex in lower case. Other types: `base64(password)`.
pub fn login_password(username: &str, password: &str, token: &str, password_type: u32) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    if password_type == 4 {
        let inner = b64.encode(hex::encode(Sha256::digest(password.as_bytes())));
        let outer = Sha256::digest(format!("{username}{inner}{token}").as_bytes());
        b64.encode(hex::encode(outer))
    } else {
        b64.encode(password.as_bytes())
    }
}

/// What the stick's API error codes mean (from Huawei's web UI and public
/// API clients).
pub fn error_text(code: u32) -> Option<&'static str> {
    Some(match code {
        100001 => "unknown error",
        100002 => "not supported by this firmware",
        100003 => "no rights: log in first",
        100004 => "system busy",
        100005 => "request format error",
        100006 => "parameter error",
        100008 => "cannot read the configuration",
        108001 => "wrong username",
        108002 => "wrong password",
        108003 => "already logged in",
        108006 => "wrong username or password",
        108007 => "too many failed logins: login is locked for a while",
        108009 => "logged in elsewhere",
        108010 => "too many login attempts",
        113018 => "system busy",
        115002 => "the password must be changed first",
        120001 => "voice busy",
        125001 => "wrong token",
        125002 => "invalid or reused token, or expired session",
        125003 => "token does not match the session",
        _ => return None,
    })
}

fn connection_status_text(c: u32) -> &'static str {
    match c {
        900 => "connecting",
        901 => "connected",
        902 => "disconnected",
        903 => "disconnecting",
        _ => "not connected",
    }
}

/// Inner text of the first `<name>…</name>` (or `<name/>`) of a flat XML
/// document, trimmed and unescaped.
pub fn xml_tag(doc: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let empty = format!("<{name}/>");
    let first_open = doc.find(&open);
    let first_empty = doc.find(&empty);
    match first_open {
        Some(o) if first_empty.is_none_or(|e| o < e) => {
            let start = o + open.len();
            let close = format!("</{name}>");
            let end = doc[start..].find(&close)? + start;
            Some(xml_unescape(doc[start..end].trim()))
        }
        _ => first_empty.map(|_| String::new()),
    }
}

fn xml_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `<error><code>125002</code><message></message></error>`.
pub fn parse_api_error(doc: &str) -> Option<(u32, String)> {
    let at = doc.find("<error>")?;
    let err = &doc[at..];
    let code = xml_tag(err, "code")?.parse().ok()?;
    Some((code, xml_tag(err, "message").unwrap_or_default()))
}

/// `(SesInfo, TokInfo)` from `/api/webserver/SesTokInfo`.
pub fn parse_ses_tok_info(doc: &str) -> Option<(String, String)> {
    let tok = xml_tag(doc, "TokInfo").filter(|t| !t.is_empty())?;
    let ses = xml_tag(doc, "SesInfo").unwrap_or_default();
    Some((ses, tok))
}

/// The parts of `/api/monitoring/status` we use.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusReading {
    /// 900 connecting, 901 connected, 902 disconnected, 903 disconnecting.
    pub connection_status: Option<u32>,
    pub signal_bars: Option<u8>,
    pub access_tech: Option<String>,
    pub registration: Option<Registration>,
}

pub fn parse_status(doc: &str) -> StatusReading {
    let num = |name: &str| xml_tag(doc, name).and_then(|v| v.parse::<u32>().ok());
    let max = num("maxsignal").filter(|m| *m > 0).unwrap_or(5);
    let signal_bars = num("SignalIcon")
        .map(|icon| (icon * 5 / max).min(5) as u8)
        .or_else(|| {
            // Older firmware: SignalStrength as a percentage.
            num("SignalStrength").map(|pct| ((pct.min(100) * 5 + 50) / 100) as u8)
        });
    let access_tech = num("CurrentNetworkTypeEx")
        .filter(|v| *v != 0)
        .and_then(network_type_ex)
        .or_else(|| num("CurrentNetworkType").and_then(network_type));
    let registration = num("ServiceStatus").map(|s| match s {
        2 if num("RoamingStatus") == Some(1) => Registration::Roaming,
        2 => Registration::Home,
        0 => Registration::NotRegistered,
        _ => Registration::Unknown,
    });
    StatusReading {
        connection_status: num("ConnectionStatus"),
        signal_bars,
        access_tech,
        registration,
    }
}

/// `CurrentNetworkType` codes of the HiLink web UI.
fn network_type(v: u32) -> Option<String> {
    Some(
        match v {
            1..=3 => "GSM",
            4..=7 | 9 | 17 | 18 => "WCDMA",
            8 => "TD-SCDMA",
            10..=16 => "CDMA",
            19 => "LTE",
            20 => "NR5G",
            _ => return None,
        }
        .to_string(),
    )
}

/// `CurrentNetworkTypeEx` codes (newer firmware).
fn network_type_ex(v: u32) -> Option<String> {
    Some(
        match v {
            1..=3 => "GSM",
            21..=39 => "CDMA",
            41..=46 => "WCDMA",
            61..=65 => "TD-SCDMA",
            101 | 1011 => "LTE",
            111 => "NR5G",
            _ => return None,
        }
        .to_string(),
    )
}

/// The parts of `/api/device/signal` we use.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceSignal {
    pub rssi_dbm: Option<i16>,
    pub rsrp_dbm: Option<i16>,
    pub rsrq_db: Option<f32>,
    pub sinr_db: Option<f32>,
    pub band: Option<String>,
    pub cell_id: Option<String>,
}

/// Values come with units (`-89dBm`, `-9.0dB`) and sometimes a bound
/// (`&gt;=-51dBm`).
pub fn parse_device_signal(doc: &str) -> DeviceSignal {
    let val = |name: &str| xml_tag(doc, name).and_then(|v| leading_number(&v));
    let band = xml_tag(doc, "band").filter(|b| !b.is_empty()).map(|b| {
        match xml_tag(doc, "mode").as_deref() {
            Some("7") => format!("LTE BAND {b}"),
            _ => format!("BAND {b}"),
        }
    });
    DeviceSignal {
        rssi_dbm: val("rssi").map(|v| v.round() as i16),
        rsrp_dbm: val("rsrp").map(|v| v.round() as i16),
        rsrq_db: val("rsrq"),
        sinr_db: val("sinr"),
        band,
        cell_id: xml_tag(doc, "cell_id").filter(|c| !c.is_empty()),
    }
}

/// The number at the start of `s`, after an optional `>=`/`<=`/`>`/`<`.
fn leading_number(s: &str) -> Option<f32> {
    let s = s.trim().trim_start_matches(['>', '<', '=']).trim_start();
    let end = s
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || (i == 0 && (c == '-' || c == '+'))))
        .map_or(s.len(), |(i, _)| i);
    s[..end].parse().ok()
}

/// The operator from `/api/net/current-plmn`.
pub fn parse_plmn(doc: &str) -> Option<String> {
    ["FullName", "ShortName", "Numeric"]
        .iter()
        .find_map(|t| xml_tag(doc, t).filter(|v| !v.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// E3372h-320 (firmware 22.x), connected on LTE.
    const STATUS_CONNECTED: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<response>
<ConnectionStatus>901</ConnectionStatus>
<WifiConnectionStatus></WifiConnectionStatus>
<SignalStrength></SignalStrength>
<SignalIcon>4</SignalIcon>
<CurrentNetworkType>19</CurrentNetworkType>
<CurrentServiceDomain>3</CurrentServiceDomain>
<RoamingStatus>0</RoamingStatus>
<BatteryStatus></BatteryStatus>
<BatteryLevel></BatteryLevel>
<BatteryPercent></BatteryPercent>
<simlockStatus>0</simlockStatus>
<PrimaryDns>10.74.210.210</PrimaryDns>
<SecondaryDns>10.74.210.211</SecondaryDns>
<wififrequence></wififrequence>
<flymode>0</flymode>
<PrimaryIPv6Dns></PrimaryIPv6Dns>
<SecondaryIPv6Dns></SecondaryIPv6Dns>
<CurrentWifiUser></CurrentWifiUser>
<TotalWifiUser></TotalWifiUser>
<currenttotalwifiuser>0</currenttotalwifiuser>
<ServiceStatus>2</ServiceStatus>
<SimStatus>1</SimStatus>
<WifiStatus></WifiStatus>
<CurrentNetworkTypeEx>101</CurrentNetworkTypeEx>
<maxsignal>5</maxsignal>
<wifiindooronly>0</wifiindooronly>
<classify>hilink</classify>
<usbup>0</usbup>
<wifiswitchstatus>0</wifiswitchstatus>
<WifiStatusExCustom>0</WifiStatusExCustom>
<hvdcp_online>0</hvdcp_online>
</response>
"#;

    const STATUS_OLD_DISCONNECTED: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<response>
<ConnectionStatus>902</ConnectionStatus>
<SignalStrength>60</SignalStrength>
<SignalIcon></SignalIcon>
<CurrentNetworkType>9</CurrentNetworkType>
<RoamingStatus>1</RoamingStatus>
<ServiceStatus>2</ServiceStatus>
</response>"#;

    const SIGNAL: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<response>
<pci>302</pci>
<sc></sc>
<cell_id>26617601</cell_id>
<rsrq>-9.0dB</rsrq>
<rsrp>-95dBm</rsrp>
<rssi>&gt;=-51dBm</rssi>
<sinr>12dB</sinr>
<rscp></rscp>
<ecio></ecio>
<mode>7</mode>
<ulbandwidth>20MHz</ulbandwidth>
<dlbandwidth>20MHz</dlbandwidth>
<txpower>PPusch:-3dBm PPucch:-11dBm PSrs:0dBm PPrach:-4dBm</txpower>
<tdd></tdd>
<ul_mcs>mcsUpCarrier1:20</ul_mcs>
<dl_mcs>mcsDownCarrier1Code0:17 mcsDownCarrier1Code1:17</dl_mcs>
<earfcn>DL:1300 UL:19300</earfcn>
<rrc_status>1</rrc_status>
<rac></rac>
<lac></lac>
<tac>40305</tac>
<band>3</band>
<nei_cellid>No1:277No2:90</nei_cellid>
<plmn>26202</plmn>
<ims>0</ims>
<wdlfreq></wdlfreq>
<lteulfreq>17550</lteulfreq>
<ltedlfreq>18500</ltedlfreq>
<transmode>TM[3]</transmode>
<enodeb_id>0103975</enodeb_id>
<cqi0>11</cqi0>
<cqi1>11</cqi1>
<ulfrequency>1755000kHz</ulfrequency>
<dlfrequency>1850000kHz</dlfrequency>
<arfcn></arfcn>
<bsic></bsic>
<rxlev></rxlev>
</response>"#;

    const PLMN: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<response>
<State>0</State>
<FullName>Vodafone.de</FullName>
<ShortName>Vodafone</ShortName>
<Numeric>26202</Numeric>
<Rat>7</Rat>
<Spn></Spn>
</response>"#;

    const SES_TOK: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<response>
<SesInfo>SessionID=yIZ5Jn0H5kI8zN7sY0E2uK1x9mQvVbRaT3pWcLdFgHhJj6kLmNnOoPpQqRrSsTtUu</SesInfo>
<TokInfo>Zx8b2mR9kL0pQ4sT7vW1yA3cE5gI6jN8</TokInfo>
</response>"#;

    #[test]
    fn status_connected_lte() {
        assert_eq!(
            parse_status(STATUS_CONNECTED),
            StatusReading {
                connection_status: Some(901),
                signal_bars: Some(4),
                access_tech: Some("LTE".into()),
                registration: Some(Registration::Home),
            }
        );
    }

    #[test]
    fn status_old_firmware() {
        let s = parse_status(STATUS_OLD_DISCONNECTED);
        assert_eq!(s.connection_status, Some(902));
        assert_eq!(s.signal_bars, Some(3));
        assert_eq!(s.access_tech.as_deref(), Some("WCDMA"));
        assert_eq!(s.registration, Some(Registration::Roaming));
    }

    #[test]
    fn device_signal_with_units() {
        assert_eq!(
            parse_device_signal(SIGNAL),
            DeviceSignal {
                rssi_dbm: Some(-51),
                rsrp_dbm: Some(-95),
                rsrq_db: Some(-9.0),
                sinr_db: Some(12.0),
                band: Some("LTE BAND 3".into()),
                cell_id: Some("26617601".into()),
            }
        );
        let empty = parse_device_signal("<response><rssi></rssi><rsrp/></response>");
        assert_eq!(empty, DeviceSignal::default());
    }

    #[test]
    fn plmn_and_tokens() {
        assert_eq!(parse_plmn(PLMN).as_deref(), Some("Vodafone.de"));
        assert_eq!(
            parse_plmn("<response><FullName></FullName><ShortName>O2</ShortName></response>")
                .as_deref(),
            Some("O2")
        );
        let (ses, tok) = parse_ses_tok_info(SES_TOK).unwrap();
        assert!(ses.starts_with("SessionID=yIZ5"));
        assert_eq!(tok, "Zx8b2mR9kL0pQ4sT7vW1yA3cE5gI6jN8");
        assert_eq!(
            parse_ses_tok_info("<response><TokInfo></TokInfo></response>"),
            None
        );
    }

    #[test]
    fn api_errors() {
        let doc = r#"<?xml version="1.0" encoding="UTF-8"?>
<error>
<code>125002</code>
<message></message>
</error>"#;
        assert_eq!(parse_api_error(doc), Some((125002, String::new())));
        assert_eq!(parse_api_error(STATUS_CONNECTED), None);
        let e = ApiError::Api {
            code: 125002,
            message: String::new(),
        };
        assert!(e.is_session());
        assert!(e.describe().contains("125002 (invalid or reused token"));
        let e = ApiError::Api {
            code: 100003,
            message: String::new(),
        };
        assert!(e.is_no_rights());
        assert!(e.describe().contains("no rights"));
        assert!(error_text(108006).unwrap().contains("wrong"));
    }

    #[test]
    fn tag_extractor_edges() {
        assert_eq!(xml_tag("<a>x</a><a>y</a>", "a").as_deref(), Some("x"));
        assert_eq!(xml_tag("<a/><a>y</a>", "a").as_deref(), Some(""));
        assert_eq!(xml_tag("<ab>x</ab>", "a"), None);
        assert_eq!(xml_tag("<a>unterminated", "a"), None);
        assert_eq!(
            xml_tag("<a> R&amp;D &lt;3 </a>", "a").as_deref(),
            Some("R&D <3")
        );
        assert_eq!(leading_number("-9.5dB"), Some(-9.5));
        assert_eq!(leading_number("<=-120dBm"), Some(-120.0));
        assert_eq!(leading_number("dBm"), None);
    }

    #[test]
    fn login_hash() {
        // Type 4 is deterministic given the token; check its shape and that
        // every input matters.
        let a = login_password("admin", "secret", "tok1", 4);
        assert_eq!(a, login_password("admin", "secret", "tok1", 4));
        assert_ne!(a, login_password("admin", "secret", "tok2", 4));
        assert_ne!(a, login_password("admin", "Secret", "tok1", 4));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&a)
            .unwrap();
        assert_eq!(raw.len(), 64, "hex of a SHA-256");
        assert!(
            raw.iter()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(login_password("admin", "secret", "tok1", 0), "c2VjcmV0");
    }

    #[test]
    fn session_cookie_from_set_cookie() {
        assert_eq!(
            session_cookie("SessionID=abc123; path=/; HttpOnly").as_deref(),
            Some("SessionID=abc123")
        );
        assert_eq!(session_cookie("lang=en; path=/"), None);
    }

    #[test]
    fn config_validation_and_masking() {
        let cfg: HilinkConfig = toml::from_str("").unwrap();
        assert_eq!(cfg.url, "http://192.168.8.1");
        assert_eq!(cfg.reboot_timeout_secs, 120);
        let b = HilinkBackend::new(&cfg, Some("eth1")).unwrap();
        assert_eq!(b.base, "http://192.168.8.1");
        assert_eq!(b.ladder(), &["dataswitch", "reboot"]);

        let cfg: HilinkConfig =
            toml::from_str("url = \"http://192.168.9.1:8080/\"\npassword = \"hunter2\"").unwrap();
        assert_eq!(cfg.validate().unwrap(), "http://192.168.9.1:8080");
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");

        for bad in [
            "url = \"https://192.168.8.1\"",
            "url = \"http://192.168.8.1/html\"",
            "reboot_timeout_secs = 0",
        ] {
            let cfg: HilinkConfig = toml::from_str(bad).unwrap();
            assert!(HilinkBackend::new(&cfg, None).is_err(), "{bad}");
        }
        assert!(toml::from_str::<HilinkConfig>("pin = \"1234\"").is_err());
    }
}
