//! A tiny DNS server for scenarios: answers A and AAAA from a map (NXDOMAIN
//! for other names) and records who asked, so a test can check that an
//! exit's lookups left through its own uplink.
//!
//! It takes an already-bound socket, so a test binds it wherever the query
//! should arrive (inside a namespace, on `127.0.0.1:0`). The codec is the
//! agent's own (`edge_agent::net::dns`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use edge_agent::net::dns::{decode_query, testing};

/// Largest answer sent without the TC bit (plain DNS over UDP).
const UDP_LIMIT: usize = 512;

pub struct DnsServer {
    addr: SocketAddr,
    queries: Arc<Mutex<Vec<(String, SocketAddr)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    /// Serve on `bind` until dropped. Names in `records` are matched case
    /// insensitively, without a trailing dot.
    pub fn start(bind: UdpSocket, records: HashMap<String, Vec<IpAddr>>) -> DnsServer {
        let addr = bind.local_addr().expect("bound socket");
        // Short reads so the thread notices `stop` promptly.
        bind.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let records: HashMap<String, Vec<IpAddr>> = records
            .into_iter()
            .map(|(name, ips)| {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                (name, ips)
            })
            .collect();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (queries, stop) = (queries.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("dns-server-{addr}"))
                .spawn(move || serve(bind, records, queries, stop))
                .expect("spawn DNS server thread")
        };
        DnsServer {
            addr,
            queries,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every query so far: the asked name (lower case) and where it came
    /// from.
    pub fn queries(&self) -> Vec<(String, SocketAddr)> {
        self.queries.lock().unwrap().clone()
    }
}

fn serve(
    sock: UdpSocket,
    records: HashMap<String, Vec<IpAddr>>,
    queries: Arc<Mutex<Vec<(String, SocketAddr)>>>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            // ICMP errors from earlier replies surface here; keep serving.
            Err(_) => continue,
        };
        let Ok(question) = decode_query(&buf[..n]) else {
            continue;
        };
        queries.lock().unwrap().push((question.name, from));
        if let Some(reply) = testing::answer(&buf[..n], &records, UDP_LIMIT) {
            let _ = sock.send_to(&reply, from);
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::net::dns::Resolver;

    #[tokio::test]
    async fn answers_and_records_queries() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = DnsServer::start(
            sock,
            HashMap::from([(
                "Exit.Test.".to_string(),
                vec![
                    "203.0.113.7".parse().unwrap(),
                    "2001:db8::7".parse().unwrap(),
                ],
            )]),
        );
        let r = Resolver::new(vec![server.addr()], None);
        let addrs = r.lookup("exit.test", 80).await.unwrap();
        assert_eq!(addrs.len(), 2);
        assert!(addrs[0].is_ipv4());
        assert!(r.lookup("nope.test", 80).await.is_err());
        let q = server.queries();
        assert_eq!(q.len(), 4);
        assert!(q.iter().all(|(_, from)| from.ip().is_loopback()));
        assert!(q.iter().any(|(name, _)| name == "nope.test"));
    }
}
