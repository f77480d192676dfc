//! Targets customers reach through the proxy: a small HTTP/1.1 file server
//! (plain or TLS) and a sentinel listener that proves nothing reached it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Lowercase hex SHA-256 and length of a file, streamed.
pub fn sha256_file(path: &Path) -> (String, u64) {
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        len += n as u64;
        h.update(&buf[..n]);
    }
    (hex::encode(h.finalize()), len)
}

/// A random byte string served by [`FileServer`] at `/blob`; its SHA-256
/// is computed in the background while the test moves it around.
pub struct Blob {
    pub data: Arc<Vec<u8>>,
    pub seed: u64,
    hashing: Mutex<Option<JoinHandle<String>>>,
    sha: OnceLock<String>,
}

impl Blob {
    pub fn random(len: usize, seed: u64) -> Arc<Self> {
        let mut data = vec![0u8; len];
        rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut data);
        let data = Arc::new(data);
        let d = data.clone();
        Arc::new(Self {
            data,
            seed,
            hashing: Mutex::new(Some(std::thread::spawn(move || sha256_hex(&d)))),
            sha: OnceLock::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn sha256(&self) -> &str {
        self.sha.get_or_init(|| {
            let h = self.hashing.lock().unwrap().take();
            match h {
                Some(h) => h.join().expect("hashing thread"),
                None => sha256_hex(&self.data),
            }
        })
    }
}

/// A private CA and a server certificate for `localhost` and `127.0.0.1`,
/// with the CA's PEM written to a file for `curl --cacert`.
pub struct TlsMaterial {
    pub ca_pem: PathBuf,
    pub server: Arc<rustls::ServerConfig>,
}

impl TlsMaterial {
    pub fn generate(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "cellgate e2e test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("self-signed CA");
        let leaf_key = KeyPair::generate().expect("server key");
        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("server cert");
        let ca_pem = dir.join("test-ca.pem");
        std::fs::write(&ca_pem, ca.pem()).expect("write CA PEM");

        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![
                    CertificateDer::from(leaf.der().to_vec()),
                    CertificateDer::from(ca.der().to_vec()),
                ],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .expect("server TLS config");
        Self {
            ca_pem,
            server: Arc::new(server),
        }
    }
}

/// What a [`FileServer`] has seen.
#[derive(Default, Debug)]
pub struct ServerStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    /// Body bytes written by `/trickle` responses.
    pub trickled: AtomicU64,
    /// Source address of every accepted connection, in order.
    pub peers: Mutex<Vec<std::net::IpAddr>>,
}

/// An HTTP/1.1 origin on 127.0.0.1 with keep-alive:
/// - `GET|HEAD /blob`: the [`Blob`] with `Content-Length`; `?rate=N` paces
///   the body at N bytes/s;
/// - `GET /hello`: `hello from <label>\n`;
/// - `GET /ip`: the connection's source address (what an exit's public
///   address looks like to a target);
/// - `GET /headers`: the request line and headers as received;
/// - `GET /chunked`: the blob (or the hello text) with chunked framing;
/// - `GET /trickle`: claims 1 GiB, sends 16 KiB every 10 ms until the
///   client goes away (a transfer that is always in progress);
/// - `POST /sha256`: `<hex sha256> <length>\n` of the request body
///   (Content-Length or chunked; answers `Expect: 100-continue`).
pub struct FileServer {
    pub addr: SocketAddr,
    pub label: String,
    pub stats: Arc<ServerStats>,
    stop: Arc<AtomicBool>,
}

impl FileServer {
    pub fn start(label: &str, blob: Option<Arc<Blob>>) -> Self {
        Self::start_inner(label, blob, None, ([127, 0, 0, 1], 0).into())
    }

    /// Listen on `bind` (e.g. a testbed's internet address, port 0).
    pub fn start_on(label: &str, blob: Option<Arc<Blob>>, bind: SocketAddr) -> Self {
        Self::start_inner(label, blob, None, bind)
    }

    pub fn start_tls(label: &str, blob: Option<Arc<Blob>>, tls: &TlsMaterial) -> Self {
        Self::start_inner(
            label,
            blob,
            Some(tls.server.clone()),
            ([127, 0, 0, 1], 0).into(),
        )
    }

    fn start_inner(
        label: &str,
        blob: Option<Arc<Blob>>,
        tls: Option<Arc<rustls::ServerConfig>>,
        bind: SocketAddr,
    ) -> Self {
        let listener = TcpListener::bind(bind).expect("bind file server");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stats = Arc::new(ServerStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = Arc::new(Ctx {
            label: label.to_string(),
            blob,
            stats: stats.clone(),
            stop: stop.clone(),
        });
        let st = stop.clone();
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((tcp, peer)) => {
                        ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut p) = ctx.stats.peers.lock() {
                            p.push(peer.ip());
                        }
                        let ctx = ctx.clone();
                        let tls = tls.clone();
                        std::thread::spawn(move || {
                            let _ = tcp.set_nonblocking(false);
                            let _ = tcp.set_nodelay(true);
                            let _ = tcp.set_read_timeout(Some(Duration::from_secs(60)));
                            let _ = tcp.set_write_timeout(Some(Duration::from_secs(60)));
                            match tls {
                                None => serve_conn(tcp, &ctx, peer),
                                Some(cfg) => {
                                    if let Ok(conn) = rustls::ServerConnection::new(cfg) {
                                        serve_conn(rustls::StreamOwned::new(conn, tcp), &ctx, peer);
                                    }
                                }
                            }
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            addr,
            label: label.to_string(),
            stats,
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `{scheme}://{host}:PORT{path}` for a chosen host name.
    pub fn url_as(&self, scheme: &str, host: &str, path: &str) -> String {
        format!("{scheme}://{host}:{}{path}", self.addr.port())
    }

    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::Relaxed)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Ctx {
    label: String,
    blob: Option<Arc<Blob>>,
    stats: Arc<ServerStats>,
    stop: Arc<AtomicBool>,
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_request<R: BufRead>(r: &mut R) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request line",
        ));
    };
    let (method, path) = (method.to_string(), path.to_string());
    let mut headers = Vec::new();
    let mut total = line.len();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        total += h.len();
        if total > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some(Request {
        method,
        path,
        headers,
    }))
}

/// Feed a request body (Content-Length or chunked) to `sink`.
fn read_body<R: BufRead>(r: &mut R, req: &Request, mut sink: impl FnMut(&[u8])) -> io::Result<()> {
    if req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let size_text = line.trim().split(';').next().unwrap_or("").to_string();
            let size = usize::from_str_radix(&size_text, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "chunk size"))?;
            if size == 0 {
                // Trailers until the empty line.
                loop {
                    let mut t = String::new();
                    if r.read_line(&mut t)? == 0 || t.trim().is_empty() {
                        return Ok(());
                    }
                }
            }
            let mut chunk = vec![0u8; size];
            r.read_exact(&mut chunk)?;
            sink(&chunk);
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    }
    let mut left: u64 = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = (buf.len() as u64).min(left) as usize;
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        sink(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

/// The value of `key` in the query string of `path`, if present.
fn query_param<'a>(path: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = path.split_once('?')?;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn serve_conn<S: Read + Write>(stream: S, ctx: &Ctx, peer: SocketAddr) {
    let mut r = BufReader::with_capacity(64 * 1024, stream);
    while let Ok(Some(req)) = read_request(&mut r) {
        ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let conn_hdr = if close { "close" } else { "keep-alive" };
        let route = req.path.split('?').next().unwrap_or("");
        let ok = match (req.method.as_str(), route) {
            ("GET" | "HEAD", "/blob") if ctx.blob.is_some() => {
                let blob = ctx.blob.as_ref().unwrap();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: {conn_hdr}\r\n\r\n",
                    blob.len(),
                );
                let w = r.get_mut();
                // `?rate=N` paces the body at N bytes/s from this side, so
                // a transfer's duration does not depend on the client.
                let rate = query_param(&req.path, "rate").and_then(|v| v.parse::<u64>().ok());
                let started = std::time::Instant::now();
                let mut sent = 0u64;
                w.write_all(head.as_bytes()).is_ok()
                    && (req.method == "HEAD"
                        || blob.data.chunks(64 * 1024).all(|c| {
                            if let Some(rate) = rate.filter(|r| *r > 0) {
                                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                                if let Some(wait) = due.checked_sub(started.elapsed()) {
                                    std::thread::sleep(wait);
                                }
                            }
                            sent += c.len() as u64;
                            w.write_all(c).is_ok()
                        }))
                    && w.flush().is_ok()
            }
            ("GET", "/chunked") => {
                // The blob (or the hello text) in 64 KiB chunks.
                let hello = format!("hello from {}\n", ctx.label);
                let data: &[u8] = match &ctx.blob {
                    Some(b) => &b.data,
                    None => hello.as_bytes(),
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: {conn_hdr}\r\n\r\n"
                );
                let w = r.get_mut();
                w.write_all(head.as_bytes()).is_ok()
                    && data.chunks(64 * 1024).all(|c| {
                        w.write_all(format!("{:x}\r\n", c.len()).as_bytes()).is_ok()
                            && w.write_all(c).is_ok()
                            && w.write_all(b"\r\n").is_ok()
                    })
                    && w.write_all(b"0\r\n\r\n").is_ok()
                    && w.flush().is_ok()
            }
            ("GET", "/headers") => {
                // The request head as received, for checks on what the
                // proxy forwards.
                let mut body = format!("{} {}\n", req.method, req.path);
                for (k, v) in &req.headers {
                    body.push_str(&format!("{k}: {v}\n"));
                }
                respond(r.get_mut(), 200, &body, conn_hdr)
            }
            ("GET", "/ip") => {
                let body = format!("{}\n", peer.ip());
                respond(r.get_mut(), 200, &body, conn_hdr)
            }
            ("GET", "/hello") => {
                let body = format!("hello from {}\n", ctx.label);
                respond(r.get_mut(), 200, &body, conn_hdr)
            }
            ("GET", "/trickle") => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1073741824\r\nConnection: close\r\n\r\n";
                let w = r.get_mut();
                if w.write_all(head.as_bytes()).is_ok() {
                    let chunk = vec![b'x'; 16 * 1024];
                    while !ctx.stop.load(Ordering::Relaxed) && w.write_all(&chunk).is_ok() {
                        let _ = w.flush();
                        ctx.stats
                            .trickled
                            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                false
            }
            ("POST", "/sha256") => {
                // Like real servers: invite the body when the client waits.
                if req
                    .header("expect")
                    .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
                {
                    let w = r.get_mut();
                    let _ = w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                    let _ = w.flush();
                }
                let mut h = Sha256::new();
                let mut n = 0u64;
                match read_body(&mut r, &req, |b| {
                    n += b.len() as u64;
                    h.update(b);
                }) {
                    Ok(()) => {
                        let body = format!("{} {n}\n", hex::encode(h.finalize()));
                        respond(r.get_mut(), 200, &body, conn_hdr)
                    }
                    Err(_) => false,
                }
            }
            _ => respond(r.get_mut(), 404, "not found\n", conn_hdr),
        };
        if !ok || close {
            break;
        }
    }
}

fn respond<W: Write>(w: &mut W, status: u16, body: &str, conn: &str) -> bool {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Status",
    };
    let msg = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{body}",
        body.len()
    );
    w.write_all(msg.as_bytes()).is_ok() && w.flush().is_ok()
}

/// Listeners on 127.0.0.1:PORT and, when the host has IPv6 loopback,
/// [::1]:PORT (same port), counting every connection they accept. Used to
/// prove that denied targets were never dialed.
pub struct Sentinel {
    pub port: u16,
    pub has_v6: bool,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Sentinel {
    pub fn start() -> Self {
        let mut last_err = None;
        for _ in 0..20 {
            let v4 = TcpListener::bind("127.0.0.1:0").expect("bind sentinel");
            let port = v4.local_addr().unwrap().port();
            match TcpListener::bind((Ipv6Addr::LOCALHOST, port)) {
                Ok(v6) => return Self::run(port, vec![v4, v6], true),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_err = Some(e),
                // No IPv6 loopback here: IPv4 only.
                Err(_) => return Self::run(port, vec![v4], false),
            }
        }
        panic!("no port free on both 127.0.0.1 and [::1]: {last_err:?}");
    }

    fn run(port: u16, listeners: Vec<TcpListener>, has_v6: bool) -> Self {
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        for l in listeners {
            l.set_nonblocking(true).unwrap();
            let (a, s) = (accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut held: Vec<TcpStream> = Vec::new();
                while !s.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((c, peer)) => {
                            eprintln!("sentinel on port {port} accepted a connection from {peer}");
                            a.fetch_add(1, Ordering::Relaxed);
                            held.push(c);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        }
        Self {
            port,
            has_v6,
            accepted,
            stop,
        }
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
