//! A Huawei HiLink (E3372h-style) web API emulator for end-to-end tests.
//!
//! It serves the endpoints the `hilink` rotation backend uses, with the
//! stick's quirks:
//! - `GET /api/webserver/SesTokInfo` hands out a session cookie and a
//!   token; every POST needs `__RequestVerificationToken` with an unused
//!   token of its session (single use), else error 125002 (unknown or reused
//!   token) or 125003 (token of another session).
//! - With a password configured, POSTs and `/api/device/signal` answer
//!   100003 until `POST /api/user/login` (type 4, salted SHA-256) succeeded;
//!   the login answer moves the client to a new session.
//! - `mobile-dataswitch` 0 takes the link down at once; 1 brings it back
//!   after `reconnect_delay` (`ConnectionStatus` 900, then 901), with a new
//!   public address or the same one according to [`IpPolicy`].
//! - `device/control` 1 reboots: the API stops answering (connections are
//!   accepted and dropped) for `reboot_offline`, then comes back and
//!   reconnects with a new address; sessions are forgotten.
//!
//! It acts on the network through a [`ModemLink`] (blocking calls, run on
//! the blocking pool) and runs its own runtime thread, so it works from
//! synchronous tests. The listener is bound by the caller (inside a network
//! namespace when needed).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use rand::Rng;
use sha2::{Digest, Sha256};

use super::ModemLink;

/// Whether a reconnect after `mobile-dataswitch` yields a new address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpPolicy {
    /// Every reconnect gets a new public address.
    NewEachTime,
    /// The carrier always hands back the previous address.
    SameEachTime,
    /// The first `n` reconnects keep the address, later ones change it.
    SameFirst(u32),
}

#[derive(Clone, Debug)]
pub struct HilinkOptions {
    /// From `dataswitch` 1 (or the end of a reboot) to connected.
    pub reconnect_delay: Duration,
    /// Applies to data switch reconnects; a reboot always changes address.
    pub ip_policy: IpPolicy,
    /// How long the API is unreachable during a reboot.
    pub reboot_offline: Duration,
    /// When set, the stick wants a login (`username`, type 4).
    pub password: Option<String>,
    pub username: String,
    pub operator: String,
}

impl Default for HilinkOptions {
    fn default() -> Self {
        Self {
            reconnect_delay: Duration::from_secs(2),
            ip_policy: IpPolicy::NewEachTime,
            reboot_offline: Duration::from_secs(8),
            password: None,
            username: "admin".into(),
            operator: "Cellgate Test".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conn {
    Connected,
    Connecting,
    Disconnected,
}

impl Conn {
    fn code(self) -> u32 {
        match self {
            Conn::Connected => 901,
            Conn::Connecting => 900,
            Conn::Disconnected => 902,
        }
    }
}

struct EmuState {
    /// Session id → logged in.
    sessions: HashMap<String, bool>,
    /// Unused token → its session id.
    tokens: HashMap<String, String>,
    conn: Conn,
    data_enabled: bool,
    /// Bumped on every change; a scheduled reconnect completes only when
    /// nothing happened in between.
    generation: u64,
    /// Data switch reconnects so far (for the IP policy).
    reconnects: u32,
    /// Carrier-side address counter, shown as WanIPAddress.
    wan: u32,
    /// Errors to answer the next POSTs with: (code, how many).
    inject: Option<(u32, u32)>,
}

struct Shared {
    opts: HilinkOptions,
    link: Arc<dyn ModemLink>,
    state: Mutex<EmuState>,
    rebooting: AtomicBool,
    dataswitch_cycles: AtomicU32,
    reboots: AtomicU32,
    logins: AtomicU32,
    rejected_posts: AtomicU32,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, EmuState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running emulator; stopped when dropped.
pub struct HilinkEmu {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HilinkEmu {
    /// Serve on `listener` (already bound) from a runtime thread of its own.
    pub fn start(
        listener: std::net::TcpListener,
        link: Arc<dyn ModemLink>,
        opts: HilinkOptions,
    ) -> HilinkEmu {
        let addr = listener.local_addr().expect("listener address");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let shared = Arc::new(Shared {
            opts,
            link,
            state: Mutex::new(EmuState {
                sessions: HashMap::new(),
                tokens: HashMap::new(),
                conn: Conn::Connected,
                data_enabled: true,
                generation: 0,
                reconnects: 0,
                wan: 1,
                inject: None,
            }),
            rebooting: AtomicBool::new(false),
            dataswitch_cycles: AtomicU32::new(0),
            reboots: AtomicU32::new(0),
            logins: AtomicU32::new(0),
            rejected_posts: AtomicU32::new(0),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let served = shared.clone();
        let thread = std::thread::Builder::new()
            .name("hilink-emu".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("emulator runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let app = router(served.clone());
                    let gated = GatedListener {
                        inner: listener,
                        shared: served,
                    };
                    tokio::select! {
                        _ = axum::serve(gated, app).into_future() => {}
                        _ = rx => {}
                    }
                });
                rt.shutdown_background();
            })
            .expect("emulator thread");
        HilinkEmu {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the backend's `url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Completed off→on data switch cycles (counted when `1` arrives after `0`).
    pub fn dataswitch_cycles(&self) -> u32 {
        self.shared.dataswitch_cycles.load(Ordering::SeqCst)
    }

    pub fn reboots(&self) -> u32 {
        self.shared.reboots.load(Ordering::SeqCst)
    }

    pub fn logins(&self) -> u32 {
        self.shared.logins.load(Ordering::SeqCst)
    }

    /// POSTs refused for a bad token, session or missing login.
    pub fn rejected_posts(&self) -> u32 {
        self.shared.rejected_posts.load(Ordering::SeqCst)
    }

    /// 900 connecting, 901 connected, 902 disconnected.
    pub fn connection_status(&self) -> u32 {
        self.shared.lock().conn.code()
    }

    /// The API is down for a reboot.
    pub fn rebooting(&self) -> bool {
        self.shared.rebooting.load(Ordering::SeqCst)
    }

    /// Answer the next `count` POSTs with error `code` (before any other
    /// check), e.g. 125002 to exercise token refreshing.
    pub fn fail_next_posts(&self, code: u32, count: u32) {
        self.shared.lock().inject = (count > 0).then_some((code, count));
    }
}

impl Drop for HilinkEmu {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts connections, but while the stick reboots drops them unanswered.
struct GatedListener {
    inner: tokio::net::TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for GatedListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    if self.shared.rebooting.load(Ordering::SeqCst) {
                        drop(stream);
                        continue;
                    }
                    return (stream, peer);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/webserver/SesTokInfo", get(ses_tok_info))
        .route("/api/user/state-login", get(state_login))
        .route("/api/user/login", post(login))
        .route("/api/monitoring/status", get(monitoring_status))
        .route("/api/device/signal", get(device_signal))
        .route("/api/device/information", get(device_information))
        .route("/api/net/current-plmn", get(current_plmn))
        .route(
            "/api/dialup/mobile-dataswitch",
            get(dataswitch_state).post(dataswitch),
        )
        .route("/api/device/control", post(control))
        .fallback(|| async { xml_error(100002) })
        .with_state(shared)
}

fn random_id(len: usize) -> String {
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn xml(body: String) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html")],
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{body}"),
    )
        .into_response()
}

fn xml_ok() -> Response {
    xml("<response>OK</response>".to_string())
}

/// The stick answers errors with HTTP 200 and an `<error>` document.
fn xml_error(code: u32) -> Response {
    xml(format!(
        "<error>\n<code>{code}</code>\n<message></message>\n</error>"
    ))
}

/// `SessionID=…` from the request's Cookie header.
fn session_of(headers: &HeaderMap) -> Option<String> {
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    cookies.split(';').find_map(|c| {
        let c = c.trim();
        c.strip_prefix("SessionID=").map(str::to_string)
    })
}

/// Inner text of `<name>…</name>` in a request body.
fn tag<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&format!("</{name}>"))? + start;
    Some(body[start..end].trim())
}

fn logged_in(st: &EmuState, session: Option<&str>) -> bool {
    session.is_some_and(|s| st.sessions.get(s).copied().unwrap_or(false))
}

async fn ses_tok_info(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let mut st = sh.lock();
    let session = match session_of(&headers) {
        Some(s) if st.sessions.contains_key(&s) => s,
        _ => {
            let s = random_id(64);
            st.sessions.insert(s.clone(), false);
            s
        }
    };
    let token = random_id(32);
    st.tokens.insert(token.clone(), session.clone());
    xml(format!(
        "<response>\n<SesInfo>SessionID={session}</SesInfo>\n<TokInfo>{token}</TokInfo>\n</response>"
    ))
}

async fn state_login(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let st = sh.lock();
    let session = session_of(&headers);
    let logged = logged_in(&st, session.as_deref());
    xml(format!(
        "<response>\n<State>{}</State>\n<Username>{}</Username>\n<password_type>4</password_type>\n\
         <extern_password_type>1</extern_password_type>\n<firstlogin>0</firstlogin>\n\
         <accounts_number>1</accounts_number>\n</response>",
        if logged { 0 } else { -1 },
        if logged {
            sh.opts.username.as_str()
        } else {
            ""
        }
    ))
}

/// Check a POST's token and session (and login when required). The token is
/// used up whatever the outcome. `Ok` carries the session id.
fn check_post(sh: &Shared, headers: &HeaderMap, needs_login: bool) -> Result<String, u32> {
    let mut st = sh.lock();
    if let Some((code, left)) = st.inject {
        st.inject = (left > 1).then_some((code, left - 1));
        return Err(code);
    }
    let token = headers
        .get("__RequestVerificationToken")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(token_session) = st.tokens.remove(token) else {
        return Err(125002);
    };
    let session = session_of(headers);
    if session.as_deref() != Some(token_session.as_str()) {
        return Err(125003);
    }
    if needs_login && sh.opts.password.is_some() && !logged_in(&st, session.as_deref()) {
        return Err(100003);
    }
    Ok(token_session)
}

fn rejected(sh: &Shared, code: u32) -> Response {
    sh.rejected_posts.fetch_add(1, Ordering::SeqCst);
    xml_error(code)
}

async fn login(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: String) -> Response {
    let token = headers
        .get("__RequestVerificationToken")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if let Err(code) = check_post(&sh, &headers, false) {
        return rejected(&sh, code);
    }
    let Some(expected) = &sh.opts.password else {
        // Unlocked sticks accept any login.
        return xml_ok();
    };
    let user = tag(&body, "Username").unwrap_or("");
    let given = tag(&body, "Password").unwrap_or("");
    let b64 = base64::engine::general_purpose::STANDARD;
    let inner = b64.encode(hex::encode(Sha256::digest(expected.as_bytes())));
    let want = b64.encode(hex::encode(Sha256::digest(
        format!("{}{inner}{token}", sh.opts.username).as_bytes(),
    )));
    if user != sh.opts.username || given != want {
        return xml_error(108006);
    }
    sh.logins.fetch_add(1, Ordering::SeqCst);
    // A login opens a new session and hands over its first tokens.
    let mut st = sh.lock();
    let session = random_id(64);
    st.sessions.insert(session.clone(), true);
    let one = random_id(32);
    let two = random_id(32);
    st.tokens.insert(one.clone(), session.clone());
    st.tokens.insert(two.clone(), session.clone());
    drop(st);
    let mut resp = xml_ok();
    let h = resp.headers_mut();
    h.insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!("SessionID={session}; path=/; HttpOnly")).unwrap(),
    );
    h.insert(
        "__RequestVerificationTokenone",
        HeaderValue::from_str(&one).unwrap(),
    );
    h.insert(
        "__RequestVerificationTokentwo",
        HeaderValue::from_str(&two).unwrap(),
    );
    resp
}

async fn monitoring_status(State(sh): State<Arc<Shared>>) -> Response {
    let st = sh.lock();
    let connected = st.conn == Conn::Connected;
    let wan = if connected {
        format!("10.64.{}.{}", st.wan / 250, 2 + st.wan % 250)
    } else {
        String::new()
    };
    xml(format!(
        "<response>\n<ConnectionStatus>{}</ConnectionStatus>\n<WifiConnectionStatus></WifiConnectionStatus>\n\
         <SignalStrength></SignalStrength>\n<SignalIcon>4</SignalIcon>\n<CurrentNetworkType>19</CurrentNetworkType>\n\
         <CurrentServiceDomain>3</CurrentServiceDomain>\n<RoamingStatus>0</RoamingStatus>\n<BatteryStatus></BatteryStatus>\n\
         <BatteryLevel></BatteryLevel>\n<BatteryPercent></BatteryPercent>\n<simlockStatus>0</simlockStatus>\n\
         <WanIPAddress>{wan}</WanIPAddress>\n<WanIPv6Address></WanIPv6Address>\n\
         <PrimaryDns>10.74.210.210</PrimaryDns>\n<SecondaryDns>10.74.210.211</SecondaryDns>\n<PrimaryIPv6Dns></PrimaryIPv6Dns>\n\
         <SecondaryIPv6Dns></SecondaryIPv6Dns>\n<CurrentWifiUser></CurrentWifiUser>\n<TotalWifiUser></TotalWifiUser>\n\
         <currenttotalwifiuser>0</currenttotalwifiuser>\n<ServiceStatus>2</ServiceStatus>\n<SimStatus>1</SimStatus>\n\
         <WifiStatus></WifiStatus>\n<CurrentNetworkTypeEx>101</CurrentNetworkTypeEx>\n<maxsignal>5</maxsignal>\n\
         <wifiindooronly>0</wifiindooronly>\n<wififrequence>0</wififrequence>\n<classify>hilink</classify>\n\
         <flymode>0</flymode>\n<cellroam>1</cellroam>\n</response>",
        st.conn.code()
    ))
}

async fn device_signal(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let st = sh.lock();
    if sh.opts.password.is_some() && !logged_in(&st, session_of(&headers).as_deref()) {
        return xml_error(100003);
    }
    xml("<response>\n<pci>302</pci>\n<sc></sc>\n<cell_id>26617601</cell_id>\n<rsrq>-9.0dB</rsrq>\n\
         <rsrp>-95dBm</rsrp>\n<rssi>-67dBm</rssi>\n<sinr>12dB</sinr>\n<rscp></rscp>\n<ecio></ecio>\n\
         <mode>7</mode>\n<ulbandwidth>20MHz</ulbandwidth>\n<dlbandwidth>20MHz</dlbandwidth>\n\
         <txpower>PPusch:-3dBm PPucch:-11dBm PSrs:0dBm PPrach:-4dBm</txpower>\n<tdd></tdd>\n\
         <ul_mcs>mcsUpCarrier1:20</ul_mcs>\n<dl_mcs>mcsDownCarrier1Code0:17 mcsDownCarrier1Code1:17</dl_mcs>\n\
         <earfcn>DL:1300 UL:19300</earfcn>\n<rrc_status>1</rrc_status>\n<rac></rac>\n<lac></lac>\n\
         <tac>40305</tac>\n<band>3</band>\n<nei_cellid>No1:277No2:90</nei_cellid>\n<plmn>26202</plmn>\n\
         <ims>0</ims>\n<wdlfreq></wdlfreq>\n<lteulfreq>17550</lteulfreq>\n<ltedlfreq>18500</ltedlfreq>\n\
         <transmode>TM[3]</transmode>\n<enodeb_id>0103975</enodeb_id>\n<cqi0>11</cqi0>\n<cqi1>11</cqi1>\n\
         <ulfrequency>1755000kHz</ulfrequency>\n<dlfrequency>1850000kHz</dlfrequency>\n<arfcn></arfcn>\n\
         <bsic></bsic>\n<rxlev></rxlev>\n</response>"
        .to_string())
}

async fn device_information() -> Response {
    xml("<response>\n<DeviceName>E3372h-320</DeviceName>\n<SerialNumber>FUH7S19C05000123</SerialNumber>\n\
         <Imei>861234045678901</Imei>\n<Imsi>262021234567890</Imsi>\n<Iccid>8949022123456789012</Iccid>\n\
         <Msisdn></Msisdn>\n<HardwareVersion>CL4E3372HM</HardwareVersion>\n\
         <SoftwareVersion>11.0.1.1(H697SP1C983)</SoftwareVersion>\n\
         <WebUIVersion>WEBUI 11.0.1.1(W13SP2C7201)</WebUIVersion>\n<MacAddress1>0C:5B:8F:27:9A:64</MacAddress1>\n\
         <MacAddress2></MacAddress2>\n<ProductFamily>LTE</ProductFamily>\n<Classify>hilink</Classify>\n\
         <supportmode>LTE|WCDMA|GSM</supportmode>\n<workmode>LTE</workmode>\n</response>"
        .to_string())
}

async fn current_plmn(State(sh): State<Arc<Shared>>) -> Response {
    xml(format!(
        "<response>\n<State>0</State>\n<FullName>{0}</FullName>\n<ShortName>{0}</ShortName>\n\
         <Numeric>26202</Numeric>\n<Rat>7</Rat>\n<Spn></Spn>\n</response>",
        sh.opts.operator
    ))
}

async fn dataswitch_state(State(sh): State<Arc<Shared>>) -> Response {
    let on = sh.lock().data_enabled;
    xml(format!(
        "<response>\n<dataswitch>{}</dataswitch>\n</response>",
        u8::from(on)
    ))
}

async fn dataswitch(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: String) -> Response {
    if let Err(code) = check_post(&sh, &headers, true) {
        return rejected(&sh, code);
    }
    match tag(&body, "dataswitch") {
        Some("0") => {
            let was_on = {
                let mut st = sh.lock();
                let was = st.data_enabled;
                st.data_enabled = false;
                st.generation += 1;
                let had_link = st.conn == Conn::Connected;
                st.conn = Conn::Disconnected;
                was && had_link
            };
            if was_on {
                let link = sh.link.clone();
                let _ = tokio::task::spawn_blocking(move || link.data_down()).await;
            }
            xml_ok()
        }
        Some("1") => {
            let generation = {
                let mut st = sh.lock();
                if st.data_enabled {
                    return xml_ok();
                }
                st.data_enabled = true;
                st.generation += 1;
                st.conn = Conn::Connecting;
                st.generation
            };
            sh.dataswitch_cycles.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(reconnect(sh.clone(), generation, false));
            xml_ok()
        }
        _ => xml_error(100005),
    }
}

/// Bring the link back after `reconnect_delay`, unless something changed
/// meanwhile. `after_reboot` always yields a new address.
async fn reconnect(sh: Arc<Shared>, generation: u64, after_reboot: bool) {
    tokio::time::sleep(sh.opts.reconnect_delay).await;
    let new_ip = {
        let mut st = sh.lock();
        if st.generation != generation {
            return;
        }
        let new_ip = after_reboot
            || match sh.opts.ip_policy {
                IpPolicy::NewEachTime => true,
                IpPolicy::SameEachTime => false,
                IpPolicy::SameFirst(n) => st.reconnects >= n,
            };
        if !after_reboot {
            st.reconnects += 1;
        }
        new_ip
    };
    let link = sh.link.clone();
    let _ = tokio::task::spawn_blocking(move || link.data_up(new_ip)).await;
    let mut st = sh.lock();
    if st.generation == generation {
        if new_ip {
            st.wan += 1;
        }
        st.conn = Conn::Connected;
    }
}

async fn control(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: String) -> Response {
    if let Err(code) = check_post(&sh, &headers, true) {
        return rejected(&sh, code);
    }
    if tag(&body, "Control") != Some("1") {
        return xml_error(100005);
    }
    sh.reboots.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(reboot(sh.clone()));
    xml_ok()
}

async fn reboot(sh: Arc<Shared>) {
    // The answer goes out before the stick disappears.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sh.rebooting.store(true, Ordering::SeqCst);
    let had_link = {
        let mut st = sh.lock();
        st.sessions.clear();
        st.tokens.clear();
        st.generation += 1;
        let had = st.conn == Conn::Connected;
        st.conn = Conn::Disconnected;
        had
    };
    if had_link {
        let link = sh.link.clone();
        let _ = tokio::task::spawn_blocking(move || link.data_down()).await;
    }
    tokio::time::sleep(sh.opts.reboot_offline).await;
    let generation = {
        let mut st = sh.lock();
        st.data_enabled = true;
        st.generation += 1;
        st.conn = Conn::Connecting;
        st.generation
    };
    sh.rebooting.store(false, Ordering::SeqCst);
    reconnect(sh, generation, true).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testbed::RecordingLink;
    use std::io::{Read, Write};
    use std::time::Instant;

    struct Answer {
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Answer {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// One HTTP/1.1 exchange over a plain socket; `None` when the
    /// connection is dropped without an answer.
    fn http(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Option<Answer> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let mut lines = head.lines();
        let status = lines.next()?;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Some(Answer {
            headers,
            body: body.to_string(),
        })
    }

    fn tag_of(doc: &str, name: &str) -> String {
        tag(doc, name).unwrap_or_default().to_string()
    }

    fn ses_tok(addr: SocketAddr, cookie: Option<&str>) -> (String, String) {
        let headers: Vec<(&str, &str)> = cookie.map(|c| ("Cookie", c)).into_iter().collect();
        let a = http(addr, "GET", "/api/webserver/SesTokInfo", &headers, "").unwrap();
        (tag_of(&a.body, "SesInfo"), tag_of(&a.body, "TokInfo"))
    }

    fn post(addr: SocketAddr, path: &str, cookie: &str, token: &str, inner: &str) -> Answer {
        let body = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><request>{inner}</request>");
        http(
            addr,
            "POST",
            path,
            &[("Cookie", cookie), ("__RequestVerificationToken", token)],
            &body,
        )
        .unwrap()
    }

    fn status(addr: SocketAddr) -> Option<u32> {
        let a = http(addr, "GET", "/api/monitoring/status", &[], "")?;
        tag_of(&a.body, "ConnectionStatus").parse().ok()
    }

    fn error_code(a: &Answer) -> Option<u32> {
        a.body
            .contains("<error>")
            .then(|| tag_of(&a.body, "code").parse().unwrap())
    }

    fn emu(opts: HilinkOptions) -> (HilinkEmu, Arc<RecordingLink>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let link = Arc::new(RecordingLink::default());
        let e = HilinkEmu::start(listener, link.clone(), opts);
        (e, link)
    }

    fn quick() -> HilinkOptions {
        HilinkOptions {
            reconnect_delay: Duration::from_millis(200),
            reboot_offline: Duration::from_millis(800),
            ..Default::default()
        }
    }

    fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < timeout,
                "{what} did not happen within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn events(link: &RecordingLink) -> Vec<String> {
        link.events.lock().unwrap().clone()
    }

    #[test]
    fn dataswitch_cycle_with_single_use_tokens() {
        let (e, link) = emu(quick());
        let a = e.addr();
        assert_eq!(status(a), Some(901));

        // No token at all.
        let no_token = http(
            a,
            "POST",
            "/api/dialup/mobile-dataswitch",
            &[],
            "<request><dataswitch>0</dataswitch></request>",
        )
        .unwrap();
        assert_eq!(error_code(&no_token), Some(125002));

        let (cookie, token) = ses_tok(a, None);
        assert!(cookie.starts_with("SessionID="), "{cookie}");
        let off = post(
            a,
            "/api/dialup/mobile-dataswitch",
            &cookie,
            &token,
            "<dataswitch>0</dataswitch>",
        );
        assert_eq!(error_code(&off), None, "{}", off.body);
        assert!(off.body.contains("<response>OK</response>"));
        assert_eq!(events(&link), ["down"]);
        assert_eq!(status(a), Some(902));

        // The same token again is refused.
        let reused = post(
            a,
            "/api/dialup/mobile-dataswitch",
            &cookie,
            &token,
            "<dataswitch>1</dataswitch>",
        );
        assert_eq!(error_code(&reused), Some(125002));

        // A token of another session is refused too.
        let (_, other_token) = ses_tok(a, None);
        let foreign = post(
            a,
            "/api/dialup/mobile-dataswitch",
            &cookie,
            &other_token,
            "<dataswitch>1</dataswitch>",
        );
        assert_eq!(error_code(&foreign), Some(125003));
        assert_eq!(e.rejected_posts(), 3);

        let (cookie, token) = ses_tok(a, Some(&cookie));
        let on = post(
            a,
            "/api/dialup/mobile-dataswitch",
            &cookie,
            &token,
            "<dataswitch>1</dataswitch>",
        );
        assert_eq!(error_code(&on), None);
        assert_eq!(status(a), Some(900));
        wait_for("reconnect", Duration::from_secs(5), || {
            status(a) == Some(901)
        });
        assert_eq!(events(&link), ["down", "up new_ip=true"]);
        assert_eq!(e.dataswitch_cycles(), 1);
        assert_eq!(link.public_ip(), std::net::Ipv4Addr::new(198, 51, 100, 1));
    }

    #[test]
    fn same_ip_policy() {
        let (e, link) = emu(HilinkOptions {
            ip_policy: IpPolicy::SameFirst(1),
            ..quick()
        });
        let a = e.addr();
        for _ in 0..2 {
            for v in [0, 1] {
                let (c, t) = ses_tok(a, None);
                post(
                    a,
                    "/api/dialup/mobile-dataswitch",
                    &c,
                    &t,
                    &format!("<dataswitch>{v}</dataswitch>"),
                );
            }
            wait_for("reconnect", Duration::from_secs(5), || {
                status(a) == Some(901)
            });
        }
        assert_eq!(
            events(&link),
            ["down", "up new_ip=false", "down", "up new_ip=true"]
        );
        assert_eq!(e.dataswitch_cycles(), 2);
    }

    #[test]
    fn reboot_goes_away_and_comes_back_with_a_new_address() {
        let (e, link) = emu(quick());
        let a = e.addr();
        let (c, t) = ses_tok(a, None);
        let r = post(a, "/api/device/control", &c, &t, "<Control>1</Control>");
        assert_eq!(error_code(&r), None);
        wait_for("the API going away", Duration::from_secs(3), || {
            status(a).is_none()
        });
        assert!(e.rebooting());
        wait_for("the API coming back", Duration::from_secs(5), || {
            status(a).is_some()
        });
        wait_for("reconnect", Duration::from_secs(5), || {
            status(a) == Some(901)
        });
        assert_eq!(e.reboots(), 1);
        assert_eq!(events(&link), ["down", "up new_ip=true"]);
        // The old session is gone.
        let stale = post(
            a,
            "/api/dialup/mobile-dataswitch",
            &c,
            &t,
            "<dataswitch>0</dataswitch>",
        );
        assert_eq!(error_code(&stale), Some(125002));
    }

    #[test]
    fn locked_stick_wants_a_login() {
        let (e, link) = emu(HilinkOptions {
            password: Some("s3cret".into()),
            ..quick()
        });
        let a = e.addr();
        let (c, t) = ses_tok(a, None);
        let r = post(
            a,
            "/api/dialup/mobile-dataswitch",
            &c,
            &t,
            "<dataswitch>0</dataswitch>",
        );
        assert_eq!(error_code(&r), Some(100003));
        let signal = http(a, "GET", "/api/device/signal", &[("Cookie", &c)], "").unwrap();
        assert_eq!(error_code(&signal), Some(100003));

        let login_body = |token: &str, password: &str| {
            let p = edge_agent::rotate::hilink::login_password("admin", password, token, 4);
            format!(
                "<Username>admin</Username><Password>{p}</Password><password_type>4</password_type>"
            )
        };
        let (c, t) = ses_tok(a, None);
        let wrong = post(a, "/api/user/login", &c, &t, &login_body(&t, "guess"));
        assert_eq!(error_code(&wrong), Some(108006));

        let (c, t) = ses_tok(a, None);
        let ok = post(a, "/api/user/login", &c, &t, &login_body(&t, "s3cret"));
        assert_eq!(error_code(&ok), None, "{}", ok.body);
        let cookie = ok
            .header("set-cookie")
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let token = ok
            .header("__RequestVerificationTokenone")
            .unwrap()
            .to_string();
        let r = post(
            a,
            "/api/dialup/mobile-dataswitch",
            &cookie,
            &token,
            "<dataswitch>0</dataswitch>",
        );
        assert_eq!(error_code(&r), None, "{}", r.body);
        assert_eq!(events(&link), ["down"]);
        assert_eq!(e.logins(), 1);
        let state = http(
            a,
            "GET",
            "/api/user/state-login",
            &[("Cookie", &cookie)],
            "",
        )
        .unwrap();
        assert_eq!(tag_of(&state.body, "State"), "0");
    }

    #[test]
    fn injected_errors_and_unknown_endpoints() {
        let (e, _link) = emu(quick());
        let a = e.addr();
        e.fail_next_posts(100004, 1);
        let (c, t) = ses_tok(a, None);
        let busy = post(a, "/api/device/control", &c, &t, "<Control>1</Control>");
        assert_eq!(error_code(&busy), Some(100004));
        assert_eq!(e.reboots(), 0);
        let unknown = http(a, "GET", "/api/nope", &[], "").unwrap();
        assert_eq!(error_code(&unknown), Some(100002));
        let plmn = http(a, "GET", "/api/net/current-plmn", &[], "").unwrap();
        assert_eq!(
            edge_agent::rotate::hilink::parse_plmn(&plmn.body).as_deref(),
            Some("Cellgate Test")
        );
    }
}
